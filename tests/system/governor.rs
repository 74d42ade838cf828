//! Governors against a real nats-server: the capacity holds for claimants in several
//! processes, and the lease of a holder killed with SIGKILL expires.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use chorus_platform::governor::{Governor, GovernorSpec};
use chorus_runtime::Shutdown;
use chorus_testkit::nats::NatsServer;
use chorus_testkit::{eventually, workspace_bin};

use crate::replicate::js;

/// 50 claimants, 25 in each of two processes, of a governor of capacity 3: every one runs,
/// and the log never shows more than 3 leases held at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_claimants_in_two_processes_never_exceed_the_capacity() {
    const CAPACITY: usize = 3;
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    Governor::add(&*b, "upgrades", GovernorSpec { capacity: CAPACITY as u32, expires: Duration::from_secs(30) })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("held.log");
    let spawn = |id: &str| {
        Command::new(workspace_bin("governor-claimants").expect("the helper"))
            .args(["--nats", &server.url(), "--governor", "upgrades", "--claimants", "25", "--hold-ms", "40"])
            .args(["--id", id, "--log"])
            .arg(&log)
            .output()
    };
    let (a, b_out) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("a"));
        let b = s.spawn(|| spawn("b"));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    for out in [&a, &b_out] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut held, mut most, mut ran) = (std::collections::BTreeSet::new(), 0, 0);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("+", id)) => {
                assert!(held.insert(id.to_owned()), "{id} held twice");
                most = most.max(held.len());
                ran += 1;
            }
            Some(("-", id)) => assert!(held.remove(id), "{id} released unheld"),
            _ => panic!("log line {line:?}"),
        }
    }
    assert_eq!(ran, 50, "every claimant ran");
    assert!(most <= CAPACITY, "{most} leases held at once, capacity {CAPACITY}");
    assert!(most >= 2, "the claimants never ran side by side ({most}): not a concurrency test");
    let governor = Governor::open(&*b, "upgrades").await.unwrap();
    assert!(governor.holders().await.unwrap().is_empty(), "every lease released");
}

/// A holder killed with SIGKILL stops renewing: its lease expires and the next claimant gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_of_a_killed_holder_expires() {
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    let governor =
        Governor::add(&*b, "db", GovernorSpec { capacity: 1, expires: Duration::from_secs(2) }).await.unwrap();
    let mut holder = Command::new(workspace_bin("chorus").unwrap())
        .args(["governor", "--nats", &server.url(), "run", "db", "--holder", "doomed", "--", "sleep", "600"])
        .process_group(0)
        .spawn()
        .unwrap();
    let g = &governor;
    eventually("the holder to take the lease", Duration::from_secs(30), || async move {
        match g.holders().await.map_err(|e| e.to_string())?.as_slice() {
            [(0, h)] if h.holder == "doomed" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // It renews: the slot's value is written again, at new revisions, by the same holder,
    // for longer than one expiry (four renewals at a third of it; seen by polling the
    // bucket, not by waiting for a claim to fail).
    let slots =
        b.bucket(&chorus_backbone::BucketConfig::new("GOVERNOR_db").with_ttl(Duration::from_secs(2))).await.unwrap();
    let first = slots.get("slot.0").await.unwrap().expect("the lease").revision;
    let s = &slots;
    eventually("the lease renewed past its expiry", Duration::from_secs(30), || async move {
        match s.get("slot.0").await.map_err(|e| e.to_string())? {
            Some(e) if e.revision >= first + 4 && String::from_utf8_lossy(&e.value).contains("doomed") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let shutdown = Shutdown::new();
    // SIGKILL to the holder and its command.
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    holder.wait().unwrap();
    let lease = governor.claim("next", Duration::from_secs(30), &shutdown).await.unwrap().expect("the lease expired");
    assert_eq!(lease.slot(), 0);
    lease.release().await.unwrap();
}
