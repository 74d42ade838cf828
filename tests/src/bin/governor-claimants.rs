//! Test helper: `N` claimants of one governor in one process. Each takes a lease, appends
//! `+ <id>` to the log, holds it for a moment, appends `- <id>` and releases; the log's lines
//! (appended whole, `O_APPEND`) show how many leases were held at once across processes.
//!
//! Usage: `governor-claimants --nats URL --governor NAME --claimants N --hold-ms MS --log PATH
//! --id PREFIX`. Prints `DONE` when every claimant has run.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_platform::governor::Governor;
use chorus_runtime::Shutdown;

fn arg(args: &[String], name: &str) -> String {
    let i = args.iter().position(|a| a == name).unwrap_or_else(|| panic!("missing {name}"));
    args[i + 1].clone()
}

fn append(path: &str, line: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the log");
    f.write_all(line.as_bytes()).expect("append to the log");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let b: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&arg(&args, "--nats"))).await.expect("connect"));
    let governor = Arc::new(Governor::open(&*b, &arg(&args, "--governor")).await.expect("open the governor"));
    let n: usize = arg(&args, "--claimants").parse().unwrap();
    let hold = Duration::from_millis(arg(&args, "--hold-ms").parse().unwrap());
    let (log, prefix) = (arg(&args, "--log"), arg(&args, "--id"));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (governor, log, id) = (governor.clone(), log.clone(), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let lease = governor
                .claim(&id, Duration::from_secs(300), &Shutdown::new())
                .await
                .expect("claim")
                .expect("a lease within the wait");
            append(&log, &format!("+ {id}\n"));
            tokio::time::sleep(hold).await;
            append(&log, &format!("- {id}\n"));
            lease.release().await.expect("release");
        }));
    }
    for t in tasks {
        t.await.expect("a claimant");
    }
    println!("DONE");
}
