//! `chorus up` (the whole platform in one process) and `chorus dashboard`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::Backbone;
use chorus_consumers::audit_export::{self, ExportConfig, JsonlConfig, SinkConfig};
use chorus_consumers::dashboard::{Dashboard, StreamRates};
use chorus_consumers::inventory::{Inventory, StatusPolicy};
use chorus_consumers::projection::Store;
use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig, Step};
use chorus_producers::machine::{Machine, Manifest};
use chorus_producers::rpc::{LocalTransport, NatsTransport, RequestOptions, RpcClient, Transport};
use chorus_producers::streams::{ensure_platform_streams, StreamLimits};
use chorus_producers::emitter::BackboneSink;
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_backbone::jetstream::NatsConfig;
use tokio::sync::watch;

use crate::cli_agent::{open_backbone, terminated};

/// `chorus up`: simulated nodes with their agents and autonomous agents, the inventory, the
/// audit export and the dashboard, on the embedded backbone (or JetStream with `--nats`).
#[derive(clap::Args)]
pub struct UpArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 300)]
    nodes: usize,
    /// Where the dashboard listens; its URL is printed.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the embedded streams, views and the audit file. Kept between runs:
    /// a restart resumes the inventory where it stopped.
    #[arg(long, default_value = "chorus-data")]
    data: PathBuf,
    /// Run on NATS JetStream at these URLs (comma separated) instead of the embedded store.
    #[arg(long, env = "CHORUS_NATS")]
    nats: Option<String>,
    /// Alive interval of the simulated nodes; short so the dashboard's rates move.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    alive_interval: Duration,
    /// Simulated nodes that also run the demo autonomous agent (every transition and watcher
    /// state is an event in CHORUS_MACHINE).
    #[arg(long, default_value_t = 20)]
    machines: usize,
    /// New nodes that start in provisioning mode (component `provision_mode_server`); the
    /// provisioner configures each once over RPC and records a provisioned event.
    #[arg(long, default_value_t = 50)]
    new_nodes: usize,
}

/// The demo autonomous agent of `chorus up`: a node alternating between idle and busy on
/// timers, so CHORUS_MACHINE fills without running scripts on the host.
const DEMO_MACHINE: &str = r#"
name: demo
version: "1.0.0"
initial_state: idle
transitions:
  - { name: work, from: [idle], destination: busy }
  - { name: rest, from: [busy], destination: idle }
watchers:
  - name: idle_timer
    type: timer
    state_match: [idle]
    fail_transition: work
    properties: { timer: 40s, splay: true }
  - name: busy_timer
    type: timer
    state_match: [busy]
    fail_transition: rest
    properties: { timer: 20s, splay: true }
"#;

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
    let engine = if args.nats.is_some() { "NATS JetStream" } else { "the embedded store" };
    println!("Chorus: starting on {engine} (data in {})", args.data.display());
    let backbone = open_backbone(args.nats.as_deref(), &args.data.join("streams")).await?;
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let (stop, stop_rx) = watch::channel(false);
    let stopped = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Views and the dashboard first, so the page fills as nodes start.
    let store = Store::open(args.data.join("views")).context("opening the view store")?;
    let mut projector = Inventory::projector(backbone.clone(), &store)?;
    let inventory = Inventory::open(&store, StatusPolicy::default())?.with_progress(projector.progress());
    let projection = tokio::spawn({
        let shutdown = stopped(&stop_rx);
        async move { projector.run(shutdown).await }
    });
    let streams = chorus_schemas::subject::streams().iter().map(|(name, _)| name.to_string()).collect();
    let (rates, rates_task) = StreamRates::spawn(backbone.clone(), streams, Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding the dashboard to {}", args.listen))?;
    let url = format!("http://{}/", listener.local_addr()?);
    let dashboard = tokio::spawn(Dashboard::new(inventory.clone(), rates).with_events(backbone.clone()).serve(listener, stopped(&stop_rx)));

    let audit = audit_export::spawn(
        backbone.clone(),
        ExportConfig::new(SinkConfig::Jsonl(JsonlConfig { path: args.data.join("audit.jsonl") })),
    )
    .await
    .context("starting the audit export")?;

    // The fleet.
    let mut config = SimConfig::new(args.nodes);
    config.alive_interval = args.alive_interval;
    let sim = Arc::new(Simulator::new(config, Arc::new(BackboneSink(backbone.clone())))?);
    let transport: Arc<dyn Transport> = match &args.nats {
        Some(urls) => Arc::new(NatsTransport::new(NatsConfig::from_url_list(urls).connect(None).await?)),
        None => Arc::new(LocalTransport::new()),
    };
    // The demo fleet lets the demo operator call rpcutil (read-only); everything else stays
    // denied by default, as on a real fleet.
    let policy_dir = args.data.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join("rpcutil.policy"), "policy default deny\nallow\tchorus=demo-operator choria=provisioner\t*\t*\t*\n")?;
    let rpc = sim.host_rpc(transport.clone(), "choria", Some(policy_dir.clone())).await?;

    // The provisioner, and new nodes for it: they start in provisioning mode and are
    // configured over RPC (rpcutil ping then get_fact stand in for Choria's
    // choria_provision steps), each exactly once.
    let mut provisioning = ProvisionerConfig::new(vec![
        Step { agent: "rpcutil".into(), action: "ping".into(), data: Default::default(), timeout: None },
        Step { agent: "rpcutil".into(), action: "get_fact".into(), data: serde_json::json!({"fact": "os"}).as_object().cloned().unwrap_or_default(), timeout: None },
    ]);
    provisioning.state_dir = args.data.join("provisioner");
    let provisioner = Provisioner::start(backbone.clone(), transport.clone(), provisioning).await.context("starting the provisioner")?;
    let mut fresh = SimConfig::new(args.new_nodes.max(1));
    fresh.prefix = "new".into();
    fresh.component = "provision_mode_server".into();
    fresh.alive_interval = args.alive_interval;
    let new_nodes = Arc::new(Simulator::new(fresh, Arc::new(BackboneSink(backbone.clone())))?);
    let _new_rpc = new_nodes.host_rpc(transport.clone(), "choria", Some(policy_dir)).await?;

    let storm = sim.startup_storm().await?;
    if args.new_nodes > 0 {
        new_nodes.startup_storm().await?;
        println!("{} new nodes started in provisioning mode", args.new_nodes);
    }
    println!("{} simulated nodes started ({} startup events in {:.2?}); {} answer RPC", args.nodes, storm.events, storm.took, rpc.node_count());
    let alive = tokio::spawn({
        let sim = sim.clone();
        let rx = stop_rx.clone();
        async move { sim.run_alive(rx).await }
    });
    let new_alive = tokio::spawn({
        let sim = new_nodes.clone();
        let rx = stop_rx.clone();
        async move { sim.run_alive(rx).await }
    });
    let manifest = Manifest::from_yaml(DEMO_MACHINE).context("the demo machine manifest")?;
    let machine_dir = tempfile::tempdir()?;
    let mut machines = Vec::new();
    for node in sim.nodes().iter().take(args.machines) {
        machines.push(Machine::start(manifest.clone(), &*node.identity, machine_dir.path().to_path_buf(), node.emitter.clone())?);
    }
    println!("{} nodes run the demo autonomous agent", machines.len());
    // A demo operator pings the fleet every minute: every request and reply is recorded in
    // CHORUS_RPC and exported to the audit file.
    let operator = tokio::spawn({
        let client = RpcClient::new(transport.clone(), "chorus=demo-operator", "choria");
        let nodes = args.nodes;
        let mut rx = stop_rx.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|s| *s) => return,
                }
                let options = RequestOptions { expected: Some(nodes), timeout: Duration::from_secs(10), ..Default::default() };
                match client.call("rpcutil", "ping", Default::default(), options).await {
                    Ok(r) => tracing::info!(replies = r.replies.len(), "demo operator: rpcutil ping"),
                    Err(e) => tracing::warn!(error = %e, "demo operator: rpcutil ping failed"),
                }
            }
        }
    });
    println!("\nDashboard: {url}\n  JSON: {url}api/summary  {url}api/nodes  Prometheus: {url}metrics");
    println!("Audit records: {}\nPress Ctrl-C to stop.", args.data.join("audit.jsonl").display());

    terminated().await;
    println!("stopping: shutdown events, then views and exports");
    for m in machines {
        m.stop().await;
    }
    let _ = sim.shutdown_all().await;
    let _ = new_nodes.shutdown_all().await;
    let _ = provisioner.stop().await;
    let _ = stop.send(true);
    let _ = operator.await;
    let _ = alive.await;
    let _ = new_alive.await;
    let _ = audit.stop().await;
    rates_task.abort();
    let _ = dashboard.await;
    projection.await?.context("inventory projection")?;
    Ok(())
}

/// `chorus dashboard`: the inventory projection and the dashboard over existing streams.
#[derive(clap::Args)]
pub struct DashboardArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// NATS URLs (comma separated) of the streams; or `--embedded`.
    #[arg(long, env = "CHORUS_NATS")]
    nats: Option<String>,
    /// Embedded store directory holding the streams.
    #[arg(long, default_value = "chorus-data/streams")]
    embedded: PathBuf,
    /// Directory of the local view store.
    #[arg(long, default_value = "chorus-data/views")]
    state: PathBuf,
    /// Rebuild the inventory from the first event.
    #[arg(long)]
    rebuild: bool,
    /// Accept only events signed by these public keys (files, or directories of `.pub`
    /// files); forged and unsigned events go to the dead-letter stream with the reason.
    #[arg(long)]
    trust: Vec<PathBuf>,
}

pub async fn dashboard(args: DashboardArgs) -> anyhow::Result<()> {
    let backbone: Arc<dyn Backbone> = open_backbone(args.nats.as_deref(), &args.embedded).await?;
    let store = Store::open(&args.state)?;
    let mut projector = Inventory::projector(backbone.clone(), &store)?;
    if !args.trust.is_empty() {
        let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) = args.trust.iter().cloned().partition(|p| p.is_dir());
        let verifier = chorus_schemas::signature::Verifier::from_paths(files, dirs).map_err(|e| anyhow::anyhow!("--trust: {e}"))?;
        let options = chorus_consumers::projection::ProjectorOptions { verifier: Some(Arc::new(verifier)), ..Default::default() };
        projector = projector.with_options(options);
    }
    if args.rebuild {
        projector.rebuild()?;
    }
    let inventory = Inventory::open(&store, StatusPolicy::default())?.with_progress(projector.progress());
    let streams = chorus_schemas::subject::streams().iter().map(|(name, _)| name.to_string()).collect();
    let (rates, _task) = StreamRates::spawn(backbone.clone(), streams, Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("Dashboard: http://{}/", listener.local_addr()?);
    let (stop, rx) = watch::channel(false);
    let mut rx2 = rx.clone();
    let server = tokio::spawn(Dashboard::new(inventory, rates).with_events(backbone.clone()).serve(listener, async move {
        let _ = rx2.wait_for(|s| *s).await;
    }));
    let mut rx3 = rx.clone();
    let projection = tokio::spawn(async move {
        projector
            .run(async move {
                let _ = rx3.wait_for(|s| *s).await;
            })
            .await
    });
    terminated().await;
    let _ = stop.send(true);
    let _ = server.await;
    projection.await??;
    Ok(())
}
