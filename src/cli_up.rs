//! `chorus up` (the whole platform in one process) and `chorus dashboard`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::jetstream::NatsConfig;
use chorus_backbone::Backbone;
use chorus_consumers::audit_export::{self, ExportConfig, JsonlConfig, SinkConfig};
use chorus_consumers::dashboard::{Dashboard, StreamRates};
use chorus_consumers::inventory::{Inventory, StatusPolicy};
use chorus_consumers::projection::Store;
use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig, Step};
use chorus_producers::emitter::BackboneSink;
use chorus_producers::machine::{Machine, Manifest};
use chorus_producers::rpc::{LocalTransport, NatsTransport, RequestOptions, RpcClient, Transport};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_producers::streams::{ensure_platform_streams, StreamLimits};
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

    // Views and the dashboard first, so the page fills as nodes start.
    let views = Views::start(backbone.clone(), &args.data.join("views"), args.listen, None, false, &stop_rx).await?;
    let url = views.url.clone();

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
    std::fs::write(
        policy_dir.join("rpcutil.policy"),
        "policy default deny\nallow\tchorus=demo-operator choria=provisioner\t*\t*\t*\n",
    )?;
    let rpc = sim.host_rpc(transport.clone(), "choria", Some(policy_dir.clone())).await?;

    // The provisioner, and new nodes for it: they start in provisioning mode and are
    // configured over RPC (rpcutil ping then get_fact stand in for Choria's
    // choria_provision steps), each exactly once.
    let mut provisioning = ProvisionerConfig::new(vec![
        Step { agent: "rpcutil".into(), action: "ping".into(), data: Default::default(), timeout: None },
        Step {
            agent: "rpcutil".into(),
            action: "get_fact".into(),
            data: serde_json::json!({"fact": "os"}).as_object().cloned().unwrap_or_default(),
            timeout: None,
        },
    ]);
    provisioning.state_dir = args.data.join("provisioner");
    let provisioner = Provisioner::start(backbone.clone(), transport.clone(), provisioning)
        .await
        .context("starting the provisioner")?;
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
    println!(
        "{} simulated nodes started ({} startup events in {:.2?}); {} answer RPC",
        args.nodes,
        storm.events,
        storm.took,
        rpc.node_count()
    );
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
        machines.push(Machine::start(
            manifest.clone(),
            &*node.identity,
            machine_dir.path().to_path_buf(),
            node.emitter.clone(),
        )?);
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
                let options =
                    RequestOptions { expected: Some(nodes), timeout: Duration::from_secs(10), ..Default::default() };
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
    views.finish().await
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
    let verifier = if args.trust.is_empty() {
        None
    } else {
        let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) = args.trust.iter().cloned().partition(|p| p.is_dir());
        Some(
            chorus_schemas::signature::Verifier::from_paths(files, dirs)
                .map_err(|e| anyhow::anyhow!("--trust: {e}"))?,
        )
    };
    let (stop, stop_rx) = watch::channel(false);
    let views = Views::start(backbone, &args.state, args.listen, verifier, args.rebuild, &stop_rx).await?;
    println!("Dashboard: {}", views.url);
    terminated().await;
    let _ = stop.send(true);
    views.finish().await
}

/// The inventory projection and the dashboard over `backbone`, running until `stop` turns
/// true: what `chorus up` and `chorus dashboard` both serve.
struct Views {
    url: String,
    projection: tokio::task::JoinHandle<
        Result<chorus_consumers::projection::RunStats, chorus_consumers::projection::ProjectionError>,
    >,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    rates: tokio::task::JoinHandle<()>,
}

impl Views {
    /// Opens the view store in `state`, optionally verifying signatures (`verifier`) and
    /// rebuilding from the first event, and serves the dashboard on `listen`.
    async fn start(
        backbone: Arc<dyn Backbone>,
        state: &std::path::Path,
        listen: SocketAddr,
        verifier: Option<chorus_schemas::signature::Verifier>,
        rebuild: bool,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Views> {
        let stopped = |rx: &watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let store = Store::open(state).context("opening the view store")?;
        let mut projector = Inventory::projector(backbone.clone(), &store)?;
        if let Some(verifier) = verifier {
            let options = chorus_consumers::projection::ProjectorOptions {
                verifier: Some(Arc::new(verifier)),
                ..Default::default()
            };
            projector = projector.with_options(options);
        }
        if rebuild {
            projector.rebuild()?;
        }
        let inventory = Inventory::open(&store, StatusPolicy::default())?.with_progress(projector.progress());
        let projection = tokio::spawn({
            let shutdown = stopped(stop);
            async move { projector.run(shutdown).await }
        });
        let streams = chorus_schemas::subject::streams().iter().map(|(name, _)| name.to_string()).collect();
        let (rates, rates_task) = StreamRates::spawn(backbone.clone(), streams, Duration::from_secs(2));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the dashboard to {listen}"))?;
        let url = format!("http://{}/", listener.local_addr()?);
        let server =
            tokio::spawn(Dashboard::new(inventory, rates).with_events(backbone).serve(listener, stopped(stop)));
        Ok(Views { url, projection, server, rates: rates_task })
    }

    /// Waits for the server and the projection to end after the stop request.
    async fn finish(self) -> anyhow::Result<()> {
        self.rates.abort();
        let _ = self.server.await;
        self.projection.await?.context("inventory projection")?;
        Ok(())
    }
}
