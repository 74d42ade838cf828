//! The stream replicator against real nats-servers: crashes and restarts on every side end
//! with the target holding exactly the source's events (count and ids), no loss and no
//! duplicate; sites federated into a hub over a leafnode with rewrite, sampling, provenance
//! and loop prevention; an embedded outbox copied to JetStream.

use chorus_runtime::{Service as _, Shutdown};
use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message};
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_replicator::{LinkConfig, Replicator, ReplicatorConfig};
use chorus_schemas::lifecycle::{Alive, Startup};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::EventRecord;
use chorus_testkit::conformance::read_all;
use chorus_testkit::eventually;
use chorus_testkit::nats::{LeafnodeSites, NatsServer};

pub(crate) async fn js(url: &str) -> Arc<dyn Backbone> {
    Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(url)).await.expect("connect"))
}

/// Startup events of nodes `<prefix>-<i>` for i in `range`, as producers publish them.
pub(crate) fn startups(prefix: &str, range: std::ops::Range<usize>, site: Option<&str>) -> Vec<Message> {
    range
        .map(|i| {
            let mut r = EventRecord::new(Startup::new(format!("{prefix}-{i}"), "server", "1.0.0"), 1);
            if let Some(site) = site {
                r = r.with_site(site);
            }
            Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())
        })
        .collect()
}

pub(crate) async fn publish_all(b: &dyn Backbone, messages: Vec<Message>) {
    for chunk in messages.chunks(500) {
        b.publish_batch(chunk.to_vec()).await.expect("publish");
    }
}

pub(crate) async fn count(b: &dyn Backbone, stream: &str) -> u64 {
    b.stream_info(stream).await.map(|i| i.messages).unwrap_or(0)
}

/// Waits until `stream` in `b` holds `n` messages, failing with what it saw.
pub(crate) async fn wait_for_count(b: &dyn Backbone, stream: &str, n: u64, within: Duration) {
    eventually(&format!("{stream} to hold {n} messages"), within, || async move {
        let c = count(b, stream).await;
        if c >= n {
            Ok(())
        } else {
            Err(format!("{stream} holds {c} of {n}"))
        }
    })
    .await
}

/// Target holds exactly the source's events: same count, same ids, no id twice.
async fn assert_same_events(source: &dyn Backbone, target: &dyn Backbone, stream: &str) -> usize {
    assert_copied(source, stream, target, stream).await
}

/// [`assert_same_events`] between streams of different names.
async fn assert_copied(source: &dyn Backbone, stream: &str, target: &dyn Backbone, copy: &str) -> usize {
    let src: Vec<String> = read_all(source, stream).await.into_iter().map(|m| m.id).collect();
    let dst: Vec<String> = read_all(target, copy).await.into_iter().map(|m| m.id).collect();
    let dst_set: HashSet<&String> = dst.iter().collect();
    assert_eq!(dst_set.len(), dst.len(), "the target holds {} duplicate ids", dst.len() - dst_set.len());
    let missing = src.iter().filter(|id| !dst_set.contains(id)).count();
    assert_eq!(missing, 0, "{missing} of {} source events are missing from the target", src.len());
    assert_eq!(dst.len(), src.len(), "target holds events the source does not");
    src.len()
}

pub(crate) fn link_yaml(name: &str, source: &str, target: &str, stream: &str, batch: usize) -> String {
    format!(
        "  - name: {name}\n    source: {{ nats: {{ servers: [\"{source}\"] }} }}\n    target: {{ nats: {{ servers: [\"{target}\"] }} }}\n    batch: {batch}\n    max_backoff: 500ms\n    streams:\n      - stream: {stream}\n"
    )
}

/// `chorus replicate` as a process: one link `east` copying `CHORUS_LIFECYCLE` from `source`
/// to `target`, serving `/healthz` and `/metrics` on the address returned (with the state
/// directory, kept while the process runs).
pub(crate) fn replicator_process(source: &str, target: &str) -> (tempfile::TempDir, Child, std::net::SocketAddr) {
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("replicate.yaml");
    let ops: std::net::SocketAddr =
        format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();
    let yaml = format!(
        "state_dir: {}\nlisten: {ops}\nlinks:\n{}",
        state.path().join("state").display(),
        link_yaml("east", source, target, CHORUS_LIFECYCLE, 500)
    );
    std::fs::write(&config, yaml).unwrap();
    let child = spawn_replicator(&config);
    (state, child, ops)
}

/// The first copier's entry in the `/healthz` of a replicator process serving on `ops`.
async fn first_copier(ops: std::net::SocketAddr) -> Result<serde_json::Value, String> {
    let body = match tokio::time::timeout(Duration::from_secs(5), try_http_get(ops, "/healthz")).await {
        Ok(Ok(body)) => body,
        other => return Err(format!("{other:?}")),
    };
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or_default()).map_err(|e| format!("{e}: {body}"))?;
    Ok(json["services"][0]["copiers"][0].clone())
}

/// Waits until the replicator process serving on `ops` has checkpointed the whole source
/// `CHORUS_LIFECYCLE` with nothing left to send and `also` holds for its copier, then kills it.
async fn checkpointed_then_killed(
    ops: std::net::SocketAddr,
    source: &dyn Backbone,
    child: &mut Child,
    also: impl Fn(&serde_json::Value) -> bool,
) {
    let last = source.stream_info(CHORUS_LIFECYCLE).await.unwrap().last_sequence;
    eventually("the replicator's checkpoint at the source's end", Duration::from_secs(60), || {
        let also = &also;
        async move {
            let copier = first_copier(ops).await?;
            if copier["checkpoint"] == last && copier["lag_events"] == 0 && also(&copier) {
                Ok(())
            } else {
                Err(copier.to_string())
            }
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// 20,000 more events published to `source` in 40 bursts while a test kills replicators.
fn live_events(source: Arc<dyn Backbone>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for round in 0..40 {
            publish_all(&*source, startups(&format!("live{round}"), 0..500, Some("east"))).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Platform streams on both sides, a backlog of 20,000 events at the source, and where a
/// replicator process keeps its state and configuration and serves `/healthz`.
async fn backlog_for_a_process(
    source: &dyn Backbone,
    target: &dyn Backbone,
) -> (tempfile::TempDir, std::path::PathBuf, std::net::SocketAddr) {
    ensure_platform_streams(source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(target, &StreamLimits::default()).await.unwrap();
    publish_all(source, startups("pre", 0..20_000, Some("east"))).await;
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("replicate.yaml");
    let ops = format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();
    (state, config, ops)
}

pub(crate) fn spawn_replicator(config: &std::path::Path) -> Child {
    Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"))
        .arg("replicate")
        .arg("--config")
        .arg(config)
        .spawn()
        .expect("spawn chorus replicate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_killed_mid_copy_resumes_without_loss_or_duplicates() {
    killed_mid_copy(None).await;
}

/// The same with the subjects rewritten into a stream the link owns: sequenced publishes,
/// no ids remembered by the target, resumed after the newest copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequenced_copier_killed_mid_copy_resumes_without_loss_or_duplicates() {
    killed_mid_copy(Some(TRANSFORM)).await;
}

/// Rewrites a link's subjects into a stream of its own, `EAST`.
const TRANSFORM: &str = "        rewrite: [{ from: \"choria.>\", to: \"east.choria.>\" }]\n        target_stream: { name: EAST, subjects: [\"east.>\"] }\n";

async fn killed_mid_copy(transform: Option<&str>) {
    let copy = if transform.is_some() { "EAST" } else { CHORUS_LIFECYCLE };
    let src = NatsServer::start().unwrap();
    let dst = NatsServer::start().unwrap();
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    let (state, config, ops) = backlog_for_a_process(&*source, &*target).await;
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nlisten: {ops}\nlinks:\n{}",
            state.path().join("state").display(),
            link_yaml("east", &src.url(), &dst.url(), CHORUS_LIFECYCLE, 200) + transform.unwrap_or_default()
        ),
    )
    .unwrap();
    ReplicatorConfig::load(&config).expect("the test's config is valid");

    // Events keep arriving at the source while the replicator is killed and restarted.
    let producer = live_events(source.clone());
    // Each kill comes while the replicator has a backlog of at least 15,000 events, however
    // fast it copies: 20,000 events are published before it first starts (killed at 5,000),
    // and a burst of 20,000 while it is down (killed 2,000 into it).
    let kill = |child: &mut std::process::Child| {
        child.kill().unwrap(); // SIGKILL: no chance to finish a batch or its checkpoint
        child.wait().unwrap();
    };
    let mid_copy = || async {
        let copied = count(&*target, copy).await;
        let at_source = count(&*source, CHORUS_LIFECYCLE).await;
        assert!(copied < at_source, "killed after the copy finished ({copied} of {at_source}): not mid-copy");
        copied
    };
    let mut child = spawn_replicator(&config);
    wait_for_count(&*target, copy, 5_000, Duration::from_secs(120)).await;
    kill(&mut child);
    let copied = mid_copy().await;
    publish_all(&*source, startups("burst", 0..20_000, Some("east"))).await;
    child = spawn_replicator(&config);
    wait_for_count(&*target, copy, copied + 2_000, Duration::from_secs(120)).await;
    kill(&mut child);
    mid_copy().await;
    child = spawn_replicator(&config);
    producer.await.unwrap();
    wait_for_count(&*target, copy, 60_000, Duration::from_secs(120)).await;
    // The replicator has checkpointed the whole source: it has nothing left to send.
    checkpointed_then_killed(ops, &*source, &mut child, |c| c["sequenced"] == transform.is_some()).await;
    assert_eq!(assert_copied(&*source, CHORUS_LIFECYCLE, &*target, copy).await, 60_000);
}

/// Runs a replicator in-process over `link` (YAML of one link) while a producer publishes 30
/// batches to `source`, calls `disrupt` in the middle, and checks the target ends with
/// exactly the source's events, copied the way `path` says.
async fn copy_through(
    source: Arc<dyn Backbone>,
    (target, copy): (Arc<dyn Backbone>, &str),
    link: String,
    path: &str,
    disrupt: impl FnOnce(),
) {
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let yaml = format!("state_dir: {}\nlinks:\n{link}", state.path().display());
    let config = ReplicatorConfig::from_yaml(&yaml).unwrap();
    let mut handle = Replicator::from_config(&config).await.unwrap().start(Shutdown::new()).await.unwrap();
    let producer = {
        let source = source.clone();
        tokio::spawn(async move {
            for round in 0..30 {
                // The backbone retries through the outage with the same ids.
                publish_all(&*source, startups(&format!("r{round}"), 0..1_000, None)).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait_for_count(&*target, copy, 8_000, Duration::from_secs(60)).await;
    assert!(count(&*target, copy).await < 30_000, "disrupted after the copy finished: not mid-copy");
    assert_eq!(handle.copiers()[0].path, Some(path), "{:?}", handle.copiers());
    // A copier appends to a stream of its own with sequenced publishes.
    assert_eq!(handle.copiers()[0].sequenced, copy != CHORUS_LIFECYCLE && path == "copy", "{:?}", handle.copiers());
    tokio::task::block_in_place(disrupt);
    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("the producer's publishes did not complete within 120 s of the disruption")
        .unwrap();
    eventually("the target to hold 30000 events", Duration::from_secs(120), || {
        let (target, handle) = (&*target, &handle);
        async move {
            let c = count(target, copy).await;
            if c >= 30_000 {
                Ok(())
            } else {
                let (copiers, metrics) = (handle.copiers(), handle.metrics().encode());
                Err(format!("target holds {c} of 30000; replicator health: {copiers:?}\n{metrics}"))
            }
        }
    })
    .await;
    assert!(
        handle.wait_caught_up(Duration::from_secs(60)).await,
        "replicator did not catch up: {:?}",
        handle.copiers()
    );
    let metrics = handle.metrics().encode();
    handle.stop().await.unwrap();
    assert_eq!(assert_copied(&*source, CHORUS_LIFECYCLE, &*target, copy).await, 30_000);
    assert!(metrics.contains("chorus_replicator_copied_total"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "chorus_replicator_path{{link=\"east\",stream=\"CHORUS_LIFECYCLE\",path=\"{path}\"}} 1"
        )),
        "{metrics}"
    );
}

/// Two servers that do not reach each other: only the copier can copy between them.
/// With `transform`, subjects are rewritten into a stream of the link's own (sequenced).
async fn copy_between_servers(transform: bool, disrupt: fn(&mut NatsServer, &mut NatsServer)) {
    let (mut src, mut dst) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    let mut link = link_yaml("east", &src.url(), &dst.url(), CHORUS_LIFECYCLE, 500);
    let copy = if transform {
        link += TRANSFORM;
        "EAST"
    } else {
        CHORUS_LIFECYCLE
    };
    copy_through(source, (target, copy), link, "copy", || disrupt(&mut src, &mut dst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_copier_source_and_target_restarts_lose_and_duplicate_nothing() {
    copy_between_servers(true, |src, dst| {
        bounce(src, 1);
        bounce(dst, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_server_restart_loses_and_duplicates_nothing() {
    copy_between_servers(false, |src, _| {
        bounce(src, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_server_restart_loses_and_duplicates_nothing() {
    copy_between_servers(false, |_, dst| {
        bounce(dst, 2);
    })
    .await;
}

/// A site in domain `east` behind the hub's leafnode, event subjects isolated: a plain link
/// between them is copied by a native source the replicator sets up on the hub.
fn east_and_hub() -> LeafnodeSites {
    let sites = LeafnodeSites::start_named(&["east".into()], &["choria.>", "chorus.>"]).unwrap();
    sites.wait_connected(Duration::from_secs(10)).unwrap();
    sites
}

/// A plain link from `east` (reached through the hub by its domain) into the hub.
fn native_link_yaml(hub: &str, extra: &str) -> String {
    format!(
        "  - name: east\n    source: {{ nats: {{ servers: [\"{hub}\"], domain: east }} }}\n    target: {{ nats: {{ servers: [\"{hub}\"] }} }}\n    max_backoff: 500ms\n    streams:\n      - stream: {CHORUS_LIFECYCLE}\n{extra}"
    )
}

/// How a plain link from `east` into the hub is set up.
#[derive(Clone, Copy, PartialEq)]
enum Native {
    /// A source added to the hub's `CHORUS_LIFECYCLE`.
    Source,
    /// A stream `EAST` made as its mirror.
    Mirror,
    /// Subjects rewritten into a stream `EAST` of the link's own: a source with a subject
    /// transform on nats-server 2.10+ (`path: native`), the (sequenced) copier before.
    Transform,
}

async fn copy_natively(how: Native, disrupt: fn(&mut LeafnodeSites)) {
    let mut sites = east_and_hub();
    let (source, target) = (js(&sites.sites[0].url()).await, js(&sites.hub.url()).await);
    let version = target.as_any().downcast_ref::<JetStreamBackbone>().unwrap().server_version().unwrap();
    let (copy, extra, path) = match how {
        Native::Source => (CHORUS_LIFECYCLE, "", "native"),
        Native::Mirror => ("EAST", "        target_stream: { name: EAST, subjects: [] }\n", "native"),
        // `auto` keeps a rewrite into a stream of the link's own on the sequenced copier
        // (faster); `native` asks for the transforming source where the server has them.
        Native::Transform if chorus_backbone::jetstream::transforms_sources(&version) => {
            ("EAST", &*format!("{TRANSFORM}        path: native\n"), "native")
        }
        Native::Transform => ("EAST", TRANSFORM, "copy"),
    };
    let link = native_link_yaml(&sites.hub.url(), extra);
    copy_through(source, (target.clone(), copy), link, path, || {
        disrupt(&mut sites);
        sites.wait_connected(Duration::from_secs(30)).unwrap();
    })
    .await;
    if how == Native::Transform {
        let copies = read_all(&*target, copy).await;
        assert!(copies.iter().all(|m| m.subject.starts_with("east.choria.lifecycle.")), "{:?}", copies[0].subject);
    }
    if path == "native" && how != Native::Mirror {
        // An edit of the stream's limits (`chorus streams edit`) keeps its sources whole,
        // subject transforms included.
        let sources = |info: serde_json::Value| info["config"]["sources"].clone();
        let js = target.as_any().downcast_ref::<JetStreamBackbone>().unwrap().context().clone();
        let info = |js: async_nats::jetstream::Context| async move {
            js.request::<_, _, serde_json::Value>(format!("STREAM.INFO.{copy}"), &serde_json::json!({})).await.unwrap()
        };
        let before = sources(info(js.clone()).await);
        assert_eq!(before.as_array().map(Vec::len), Some(1), "{before}");
        let mut config = target.stream_config(copy).await.unwrap();
        config.max_messages = 1_000_000;
        target.update_stream(&config).await.unwrap();
        assert_eq!(sources(info(js).await), before);
    }
}

/// Kills `server` (SIGKILL) and starts it again after `down` seconds.
fn bounce(server: &mut NatsServer, down: u64) {
    server.kill().unwrap();
    std::thread::sleep(Duration::from_secs(down));
    server.restart().unwrap();
}

/// Kills and restarts the site, then the hub.
fn restart_site_then_hub(sites: &mut LeafnodeSites) {
    bounce(&mut sites.sites[0], 1);
    bounce(&mut sites.hub, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_link_between_domains_loses_and_duplicates_nothing_through_restarts() {
    copy_natively(Native::Transform, restart_site_then_hub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_source_site_restart_loses_and_duplicates_nothing() {
    copy_natively(Native::Source, |sites| {
        bounce(&mut sites.sites[0], 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_source_hub_restart_loses_and_duplicates_nothing() {
    copy_natively(Native::Source, |sites| {
        bounce(&mut sites.hub, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mirror_site_and_hub_restarts_lose_and_duplicate_nothing() {
    copy_natively(Native::Mirror, restart_site_then_hub).await;
}

/// The copier's checkpoint hands over to a native source: a link copied by the copier is
/// killed mid-copy, restarted with `path: auto` (native, between domains), killed twice more
/// while events keep arriving, and the hub ends with exactly the site's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_link_killed_mid_copy_goes_on_natively_without_loss_or_duplicates() {
    let sites = east_and_hub();
    let (source, target) = (js(&sites.sites[0].url()).await, js(&sites.hub.url()).await);
    let (state, config, ops) = backlog_for_a_process(&*source, &*target).await;
    let write = |path: &str| {
        let link = native_link_yaml(&sites.hub.url(), &format!("        path: {path}\n"));
        let yaml = format!("state_dir: {}\nlisten: {ops}\nlinks:\n{link}", state.path().join("state").display());
        std::fs::write(&config, yaml).unwrap();
        ReplicatorConfig::load(&config).expect("the test's config is valid");
    };
    let kill = |child: &mut Child| {
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    };
    let path_of = || first_copier(ops);

    write("copy");
    let mut child = spawn_replicator(&config);
    wait_for_count(&*target, CHORUS_LIFECYCLE, 2_000, Duration::from_secs(120)).await;
    kill(&mut child);
    let copied = count(&*target, CHORUS_LIFECYCLE).await;
    assert!(copied < 20_000, "killed after the copy finished ({copied}): not mid-copy");

    write("auto");
    let producer = live_events(source.clone());
    for _ in 0..2 {
        child = spawn_replicator(&config);
        eventually("the link to go native", Duration::from_secs(60), || async {
            let copier = path_of().await?;
            if copier["path"] == "native" {
                Ok(())
            } else {
                Err(copier.to_string())
            }
        })
        .await;
        kill(&mut child);
    }
    child = spawn_replicator(&config);
    producer.await.unwrap();
    eventually("the hub to hold 40000 events", Duration::from_secs(120), || {
        let target = &*target;
        async move {
            match count(target, CHORUS_LIFECYCLE).await {
                40_000.. => Ok(()),
                c => Err(format!("{c} of 40000; replicator: {:?}", path_of().await)),
            }
        }
    })
    .await;
    checkpointed_then_killed(ops, &*source, &mut child, |c| c["healthy"] == true).await;
    assert_eq!(assert_same_events(&*source, &*target, CHORUS_LIFECYCLE).await, 40_000);
}

fn alive_at(identity: &str, version: &str, timestamp: i64) -> Message {
    let mut a = Alive::new(identity, "server", version, Some(60));
    a.timestamp = timestamp;
    let r = EventRecord::new(a, 1);
    Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())
}

/// Two sites over leafnodes into one hub, the replicator connected only to the hub and
/// reaching each site's JetStream through its domain; plus the hub copied back to site0
/// (publishes do not follow domains, so the down-link connects to site0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_federate_into_a_hub_with_rewrite_sampling_provenance_and_no_loops() {
    let sites =
        LeafnodeSites::start_named(&["site0".into(), "site1".into()], &["choria.>", "chorus.>", "sites.>"]).unwrap();
    sites.wait_connected(Duration::from_secs(10)).unwrap();
    let hub_url = sites.hub.url();
    let site = |name: &str| {
        let mut c = NatsConfig::from_url_list(&hub_url);
        c.domain = Some(name.into());
        c
    };
    // Producers publish at their own site; the replicator reaches the sites only through
    // the hub's leafnodes, by JetStream domain.
    let site0 = js(&sites.sites[0].url()).await;
    let site1 = js(&sites.sites[1].url()).await;
    ensure_platform_streams(&*site0, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*site1, &StreamLimits::default()).await.unwrap();
    let via_hub = JetStreamBackbone::connect(&site("site0")).await.unwrap();
    assert_eq!(
        via_hub.stream_info(CHORUS_LIFECYCLE).await.unwrap().messages,
        0,
        "site0's JetStream is reachable from the hub"
    );
    let site0_local = site0.clone();

    // site0: legacy producers without a site; 10 nodes beating every 60 s for 20 minutes,
    // upgraded at minute 12. site1: producers that stamp their site.
    publish_all(&*site0, startups("s0", 0..200, None)).await;
    let t0 = 1_700_000_000i64;
    let mut alives = Vec::new();
    for k in 0..20i64 {
        for n in 0..10 {
            alives.push(alive_at(&format!("s0-{n}"), if k >= 12 { "2.0.0" } else { "1.0.0" }, t0 + 60 * k));
        }
    }
    publish_all(&*site0, alives).await;
    publish_all(&*site1, startups("s1", 0..300, Some("site1"))).await;

    let state = tempfile::tempdir().unwrap();
    let hub_stream = "  target_stream: { name: HUB_LIFECYCLE, subjects: [\"sites.*.choria.lifecycle.>\"] }";
    let yaml = format!(
        r#"state_dir: {state}
listen: 127.0.0.1:0
links:
  - name: site0-hub
    source: {{ nats: {{ servers: ["{hub}"], domain: site0 }} }}
    target: {{ nats: {{ servers: ["{hub}"] }} }}
    source_site: site0
    target_site: hub
    sampling: {{ interval: 5m }}
    streams:
      - stream: CHORUS_LIFECYCLE
        rewrite: [{{ from: "choria.lifecycle.>", to: "sites.site0.choria.lifecycle.>" }}]
        {hub_stream}
  - name: site1-hub
    source: {{ nats: {{ servers: ["{hub}"], domain: site1 }} }}
    target: {{ nats: {{ servers: ["{hub}"] }} }}
    source_site: site1
    target_site: hub
    streams:
      - stream: CHORUS_LIFECYCLE
        rewrite: [{{ from: "choria.lifecycle.>", to: "sites.site1.choria.lifecycle.>" }}]
        {hub_stream}
  - name: hub-site0
    source: {{ nats: {{ servers: ["{hub}"] }} }}
    target: {{ nats: {{ servers: ["{site0}"] }} }}
    target_site: site0
    streams:
      - stream: HUB_LIFECYCLE
        target_stream: {{ name: FROM_HUB, subjects: ["sites.>"] }}
"#,
        state = state.path().display(),
        hub = hub_url,
        site0 = sites.sites[0].url(),
        hub_stream = hub_stream.trim_start(),
    );
    let config = ReplicatorConfig::from_yaml(&yaml).unwrap();
    let mut handle = Replicator::from_config(&config).await.unwrap().start(Shutdown::new()).await.unwrap();
    // Sampling: per node k = 0, 5, 10, then 12 (version changed), 17 → 5 of 20 alive events.
    let expected_hub = 200 + 10 * 5 + 300;
    let hub = js(&hub_url).await;
    wait_for_count(&*hub, "HUB_LIFECYCLE", expected_hub, Duration::from_secs(60)).await;
    wait_for_count(&*site0_local, "FROM_HUB", 300, Duration::from_secs(60)).await;
    assert!(handle.wait_caught_up(Duration::from_secs(30)).await, "{:?}", handle.copiers());

    let mut by_site: BTreeMap<(String, String), usize> = BTreeMap::new();
    for m in read_all(&*hub, "HUB_LIFECYCLE").await {
        let r = EventRecord::decode(&m.payload).expect("copied events stay valid");
        let site = r.site.clone().expect("every copied event carries its site");
        assert!(m.subject.starts_with(&format!("sites.{site}.choria.lifecycle.event.")), "{} from {site}", m.subject);
        *by_site.entry((site, r.data.event_type().to_string())).or_default() += 1;
    }
    assert_eq!(by_site.get(&("site0".into(), "io.choria.lifecycle.v1.startup".into())), Some(&200));
    assert_eq!(by_site.get(&("site0".into(), "io.choria.lifecycle.v1.alive".into())), Some(&50));
    assert_eq!(by_site.get(&("site1".into(), "io.choria.lifecycle.v1.startup".into())), Some(&300));
    assert_eq!(count(&*hub, "HUB_LIFECYCLE").await, expected_hub);

    // Back to site0 (every copier caught up, above): only site1's events; site0's own were
    // stopped by loop prevention.
    let back = read_all(&*site0_local, "FROM_HUB").await;
    assert_eq!(back.len(), 300);
    assert!(back.iter().all(|m| EventRecord::decode(&m.payload).unwrap().site.as_deref() == Some("site1")));

    let addr = handle.local_addr().expect("metrics listener");
    let metrics = http_get(addr, "/metrics").await;
    assert!(
        metrics.contains(
            r#"chorus_replicator_skipped_total{link="site0-hub",stream="CHORUS_LIFECYCLE",reason="sampled"} 150"#
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"chorus_replicator_skipped_total{link="hub-site0",stream="HUB_LIFECYCLE",reason="loop"} 250"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"chorus_replicator_copied_total{link="site1-hub",stream="CHORUS_LIFECYCLE"} 300"#),
        "{metrics}"
    );
    assert!(metrics.contains("chorus_replicator_lag_events"), "{metrics}");
    let health = http_get(addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.contains(r#""healthy":true"#), "{health}");
    handle.stop().await.unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    try_http_get(addr, path).await.unwrap()
}

/// `GET path` over HTTP/1.1: the whole response, status line and headers included.
pub(crate) async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// A node's embedded outbox copied to JetStream with the library, as `chorus up` wires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_copies_to_jetstream_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let outbox: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("outbox")).unwrap());
    let server = NatsServer::start().unwrap();
    let hub = js(&server.url()).await;
    ensure_platform_streams(&*outbox, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*hub, &StreamLimits::default()).await.unwrap();
    publish_all(&*outbox, startups("n", 0..5_000, Some("edge"))).await;
    let link: LinkConfig = serde_yaml::from_str(
        "name: outbox\nsource: { embedded: { path: unused } }\ntarget: { nats: { servers: [unused] } }\nstreams: [ { stream: CHORUS_LIFECYCLE } ]\n",
    )
    .unwrap();
    let mut r = Replicator::new(&dir.path().join("state")).unwrap();
    r.add_link(link, outbox.clone(), hub.clone());
    let mut handle = r.start(Shutdown::new()).await.unwrap();
    publish_all(&*outbox, startups("m", 0..5_000, Some("edge"))).await;
    wait_for_count(&*hub, CHORUS_LIFECYCLE, 10_000, Duration::from_secs(60)).await;
    assert!(handle.wait_caught_up(Duration::from_secs(30)).await);
    assert_eq!(handle.checkpoint("outbox", CHORUS_LIFECYCLE).await.unwrap(), 10_000);
    handle.stop().await.unwrap();
    assert_eq!(assert_same_events(&*outbox, &*hub, CHORUS_LIFECYCLE).await, 10_000);
}

/// `chorus replicate` started while its hub is down says so in `/healthz` (503, the target's
/// error), and once the hub is up copies everything once, go-choria's id-less events too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_started_with_its_hub_down_copies_everything_once_the_hub_is_up() {
    let src = NatsServer::start().unwrap();
    let mut dst = NatsServer::start().unwrap();
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("pre", 0..3_000, Some("east"))).await;
    // As go-choria publishes: no Nats-Msg-Id, one event stored twice.
    let raw = async_nats::jetstream::new(async_nats::connect(src.url()).await.unwrap());
    for payload in [
        &b"{\"protocol\":\"io.choria.lifecycle.v1.alive\"}"[..],
        &b"{\"protocol\":\"io.choria.lifecycle.v1.alive\"}"[..],
        b"not json",
    ] {
        raw.publish("choria.lifecycle.event.alive.server", bytes::Bytes::copy_from_slice(payload))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    tokio::task::block_in_place(|| dst.stop()).unwrap();

    let (_state, mut child, ops) = replicator_process(&src.url(), &dst.url());
    eventually("the replicator to report its hub down", Duration::from_secs(30), || async move {
        match tokio::time::timeout(Duration::from_secs(5), try_http_get(ops, "/healthz")).await {
            Ok(Ok(body)) if body.starts_with("HTTP/1.1 503") && body.contains("target: ") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the replicator keeps running while its hub is down");

    tokio::task::block_in_place(|| dst.restart()).unwrap();
    wait_for_count(&*target, CHORUS_LIFECYCLE, 3_003, Duration::from_secs(60)).await;
    eventually("healthy again", Duration::from_secs(30), || async move {
        match tokio::time::timeout(Duration::from_secs(5), try_http_get(ops, "/healthz")).await {
            Ok(Ok(body)) if body.starts_with("HTTP/1.1 200") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Exactly the source's messages: ids as the source has them, derived for the id-less.
    let src_ids: Vec<String> = read_all(&*source, CHORUS_LIFECYCLE).await.iter().map(|m| m.copy_id()).collect();
    let dst_ids: Vec<String> = read_all(&*target, CHORUS_LIFECYCLE).await.into_iter().map(|m| m.id).collect();
    assert_eq!(dst_ids, src_ids);
}

/// A replicator started before its source stream exists is not ready (503, the source's
/// error) and copies everything once the stream appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_started_before_its_source_stream_exists_copies_it_once_it_appears() {
    let (src, dst) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    let (_state, mut child, ops) = replicator_process(&src.url(), &dst.url());
    let health = |want: &'static str| async move {
        match tokio::time::timeout(Duration::from_secs(5), try_http_get(ops, "/healthz")).await {
            Ok(Ok(body)) if body.starts_with(want) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    };
    let body =
        eventually("503 while the source stream is missing", Duration::from_secs(10), || health("HTTP/1.1 503")).await;
    assert!(body.contains("source: "), "{body}");
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("late", 0..1_000, None)).await;
    wait_for_count(&*target, CHORUS_LIFECYCLE, 1_000, Duration::from_secs(60)).await;
    eventually("200 once it copies", Duration::from_secs(30), || health("HTTP/1.1 200")).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(assert_same_events(&*source, &*target, CHORUS_LIFECYCLE).await, 1_000);
}

/// Events the source's retention removes before the replicator copied them are a gap: it
/// is counted, shown in health and recorded on the target, and copying goes on from the
/// oldest event left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_removed_by_retention_before_they_were_copied_are_a_recorded_gap() {
    let (src, dst) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    let mut limited = chorus_backbone::StreamConfig::new(CHORUS_LIFECYCLE, vec!["choria.lifecycle.>".into()]);
    limited.max_messages = 200;
    source.ensure_stream(&limited).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("first", 0..100, None)).await;
    let state = tempfile::tempdir().unwrap();
    let ops: std::net::SocketAddr =
        format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();
    let yaml = format!(
        "state_dir: {}\nlisten: {ops}\nlinks:\n{}",
        state.path().display(),
        link_yaml("east", &src.url(), &dst.url(), CHORUS_LIFECYCLE, 50)
    );
    let config = ReplicatorConfig::from_yaml(&yaml).unwrap();
    let mut handle = Replicator::from_config(&config).await.unwrap().start(Shutdown::new()).await.unwrap();
    wait_for_count(&*target, CHORUS_LIFECYCLE, 100, Duration::from_secs(60)).await;
    assert!(handle.wait_caught_up(Duration::from_secs(30)).await, "{:?}", handle.copiers());
    handle.stop().await.unwrap();
    drop(handle); // its checkpoint store, which the next one opens

    // While it is stopped, 500 more arrive; the source keeps the newest 200 (401..=600).
    publish_all(&*source, startups("later", 0..500, None)).await;
    let mut handle = Replicator::from_config(&config).await.unwrap().start(Shutdown::new()).await.unwrap();
    wait_for_count(&*target, CHORUS_LIFECYCLE, 300, Duration::from_secs(60)).await;
    assert!(handle.wait_caught_up(Duration::from_secs(30)).await, "{:?}", handle.copiers());
    let gaps: Vec<serde_json::Value> = read_all(&*target, "CHORUS_DEADLETTER")
        .await
        .iter()
        .filter(|m| m.subject == "chorus.deadletter.replicator")
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!((gaps[0]["from_sequence"].as_u64(), gaps[0]["to_sequence"].as_u64()), (Some(101), Some(400)));
    let health = http_get(ops, "/healthz").await;
    assert!(health.contains(r#""gap_events":300"#), "{health}");
    let metrics = http_get(ops, "/metrics").await;
    assert!(
        metrics.contains(r#"chorus_replicator_gap_events_total{link="east",stream="CHORUS_LIFECYCLE"} 300"#),
        "{metrics}"
    );
    handle.stop().await.unwrap();
    assert_eq!(count(&*target, CHORUS_LIFECYCLE).await, 300, "the 100 copied before, the 200 left after the gap");
}

/// Two replicators of one link, one elected; the leader is killed with SIGKILL mid-copy while
/// events keep arriving. The standby takes over from the leader's checkpoint (kept on the
/// hub): the hub ends with exactly the site's events, none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replicator_takes_over_from_a_killed_leader_without_loss_or_duplicates() {
    use chorus_platform::election::Candidate;
    let src = NatsServer::start().unwrap();
    let dst = NatsServer::start().unwrap();
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("pre", 0..20_000, Some("east"))).await;
    let state = tempfile::tempdir().unwrap();
    let spawn = |i: usize| {
        let config = state.path().join(format!("replicate{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "state_dir: {}\nelection: {{ttl: 2s, candidate: r{i}}}\nlinks:\n{}",
                state.path().join(format!("state{i}")).display(),
                link_yaml("east", &src.url(), &dst.url(), CHORUS_LIFECYCLE, 200)
            ),
        )
        .unwrap();
        ReplicatorConfig::load(&config).expect("the test's config is valid");
        spawn_replicator(&config)
    };
    let mut instances = [spawn(0), spawn(1)];
    let producer = {
        let source = source.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                publish_all(&*source, startups(&format!("live{round}"), 0..500, Some("east"))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    wait_for_count(&*target, CHORUS_LIFECYCLE, 3_000, Duration::from_secs(120)).await;
    let leader = Candidate::leader_of(&*target, "replicator", Duration::from_secs(2)).await.unwrap().expect("a leader");
    let (dead, alive) = if instances[0].id() == leader.pid { (0, 1) } else { (1, 0) };
    assert_eq!(instances[dead].id(), leader.pid, "the leader is one of the two instances");
    instances[dead].kill().unwrap(); // SIGKILL
    instances[dead].wait().unwrap();
    let copied = count(&*target, CHORUS_LIFECYCLE).await;
    assert!(copied < count(&*source, CHORUS_LIFECYCLE).await, "killed after the copy finished: not mid-copy");
    producer.await.unwrap();
    wait_for_count(&*target, CHORUS_LIFECYCLE, 30_000, Duration::from_secs(180)).await;
    let now = Candidate::leader_of(&*target, "replicator", Duration::from_secs(2)).await.unwrap().expect("a leader");
    assert_eq!(now.pid, instances[alive].id(), "the standby leads");
    // Its checkpoint on the hub is at the source's end: nothing left to send.
    let bucket = target.bucket(&chorus_backbone::BucketConfig::new("REPLICATOR_replicator")).await.unwrap();
    let last = source.stream_info(CHORUS_LIFECYCLE).await.unwrap().last_sequence;
    let b = &bucket;
    eventually("the shared checkpoint at the source's end", Duration::from_secs(60), || async move {
        let cp = b.get(&format!("east/{CHORUS_LIFECYCLE}")).await.map_err(|e| e.to_string())?;
        let cp = cp.map(|e| u64::from_be_bytes(e.value.as_ref().try_into().unwrap())).unwrap_or(0);
        if cp == last {
            Ok(())
        } else {
            Err(format!("checkpoint {cp} of {last}"))
        }
    })
    .await;
    instances[alive].kill().unwrap();
    instances[alive].wait().unwrap();
    assert_eq!(assert_same_events(&*source, &*target, CHORUS_LIFECYCLE).await, 30_000);
}

/// A native source meets an event the target already holds under the same id (here one
/// published to the hub directly). nats-server 2.9 stops the source for good there: the
/// replicator sees it make no progress while behind, removes it and copies the rest with
/// its copier, and health says why. Newer servers drop the duplicate and go on natively.
/// Either way the hub ends with exactly the site's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_source_meeting_an_event_the_target_holds_loses_and_duplicates_nothing() {
    let sites = east_and_hub();
    let (source, target) = (js(&sites.sites[0].url()).await, js(&sites.hub.url()).await);
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    let events = startups("n", 0..3_000, Some("east"));
    publish_all(&*target, vec![events[1_000].clone()]).await;
    publish_all(&*source, events).await;
    let version = target.as_any().downcast_ref::<JetStreamBackbone>().unwrap().server_version().unwrap();
    let stops = chorus_backbone::jetstream::sources_stop_at_duplicates(&version);
    let state = tempfile::tempdir().unwrap();
    let yaml = format!("state_dir: {}\nlinks:\n{}", state.path().display(), native_link_yaml(&sites.hub.url(), ""));
    let config = ReplicatorConfig::from_yaml(&yaml).unwrap();
    let mut handle = Replicator::from_config(&config).await.unwrap().start(Shutdown::new()).await.unwrap();
    let path = if stops { "copy" } else { "native" };
    eventually(&format!("the hub to hold every event, copied by the {path} path"), Duration::from_secs(60), || {
        let (handle, target) = (&handle, &*target);
        async move {
            let copier = &handle.copiers()[0];
            let held = count(target, CHORUS_LIFECYCLE).await;
            match (copier.path, held) {
                (Some(p), 3_000) if p == path => Ok(()),
                _ => Err(format!("hub holds {held}; {copier:?}")),
            }
        }
    })
    .await;
    let copier = handle.copiers()[0].clone();
    assert!(!stops || copier.path_reason.as_deref().unwrap_or_default().contains("no progress"), "{copier:?}");
    assert!(handle.wait_caught_up(Duration::from_secs(30)).await, "{:?}", handle.copiers());
    handle.stop().await.unwrap();
    assert_eq!(assert_same_events(&*source, &*target, CHORUS_LIFECYCLE).await, 3_000);
}
