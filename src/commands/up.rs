//! `chorus up`: the whole platform in one process, started as a list of services under one
//! shutdown and stopped in reverse order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::jetstream::NatsConfig;
use chorus_consumers::audit_export::{AuditExport, ExportConfig, JsonlConfig, SinkConfig};
use chorus_consumers::dashboard::{Actions, Views, ViewsOptions};
use chorus_consumers::inventory::StatusPolicy;
use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig, Step};
use chorus_identity::{Credential, CredentialSpec, Identity, Issuers};
use chorus_keys::{Algorithm, FileSigner, KeyConfig, Signer};
use chorus_platform::{ensure_platform_streams, BackboneSink, StreamLimits};
use chorus_producers::machine::{Machine, Manifest};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_rpc::{
    ClientSecurity, LocalTransport, NatsTransport, RequestOptions, RequestSecurity, RpcClient, Transport,
};
use chorus_runtime::{ServiceError, Services, Shutdown, Tasks};

use crate::args::StreamArgs;
use crate::signal::terminated;

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
    /// The streams (embedded under --data, or NATS with --nats), the views and the audit
    /// file. Kept between runs: a restart resumes the inventory where it stopped.
    #[command(flatten)]
    streams: StreamArgs,
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

/// Starts the platform, serves until SIGTERM or Ctrl-C, then stops every service in reverse
/// order and reports every error.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let data = args.streams.data.clone();
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let engine = if args.streams.embedded() { "the embedded store" } else { "NATS JetStream" };
    println!("Chorus: starting on {engine} (data in {})", data.display());
    let backbone = args.streams.open().await?;
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let shutdown = Shutdown::new();
    let mut services = Services::new();
    // The demo machines' scripts directory, removed once every service has stopped.
    let machine_dir = tempfile::tempdir()?;
    if let Err(e) = start(&args, backbone, &shutdown, machine_dir.path(), &mut services).await {
        eprintln!("chorus up: {e:#}; stopping what started");
        if let Err(stop) = services.stop().await {
            eprintln!("{stop}");
        }
        return Err(e);
    }
    terminated().await;
    println!("stopping: shutdown events, then views and exports");
    services.stop().await?;
    Ok(())
}

/// Starts every service of the platform into `services`, in dependency order: views first
/// (the page fills as nodes start), then the audit export, the fleet, the provisioner and
/// the demo operator.
async fn start(
    args: &UpArgs,
    backbone: Arc<dyn chorus_backbone::Backbone>,
    shutdown: &Shutdown,
    machine_dir: &std::path::Path,
    services: &mut Services,
) -> anyhow::Result<()> {
    let data = &args.streams.data;
    let options = ViewsOptions {
        state: args.streams.views_dir(),
        listen: args.listen,
        rebuild: false,
        policy: StatusPolicy::default(),
        streams: args.streams.stream_map(),
    };
    // The transport the nodes listen on: NATS with --nats, else in this process, relayed
    // over the dashboard's HTTP (`chorus rpc --url`) so a second terminal can reach it.
    let transport: Arc<dyn Transport> = match &args.streams.nats {
        Some(urls) => Arc::new(NatsTransport::new(NatsConfig::from_url_list(urls).connect(None).await?)),
        None => Arc::new(LocalTransport::new()),
    };
    // Identity: an issuer for this platform, a key and node credential for every simulated
    // node, client credentials for the demo operator, the dashboard and the provisioner.
    // Every request is signed by its caller and every reply by its node, as on a real
    // secure fleet.
    let identity = PlatformIdentity::open(&data.join("identity"))?;
    let security = Some(Arc::new(RequestSecurity::new(identity.issuers.clone())));
    let dashboard = RpcClient::signed(transport.clone(), identity.client("chorus=dashboard")?, "choria")
        .with_trust(identity.issuers.clone());
    let routes = |inventory: &chorus_consumers::inventory::Inventory| {
        chorus_rpc::relay::router(transport.clone()).merge(Actions::new(dashboard, inventory.clone()).router())
    };
    let views = Views::start_with_routes(backbone.clone(), &options, None, routes, shutdown.child()).await?;
    let url = views.url().to_string();
    // The dashboard's /metrics and /healthz cover every service of the platform.
    let ops = views.ops().clone();
    services.push(views);

    let audit_file = data.join("audit.jsonl");
    let export = ExportConfig::new(SinkConfig::Jsonl(JsonlConfig { path: audit_file.clone() }));
    let export =
        AuditExport::start(backbone.clone(), export, shutdown.child()).await.context("starting the audit export")?;
    ops.add(Arc::new(export.monitor()));
    services.push(export);

    // The fleet.
    let mut config = SimConfig::new(args.nodes);
    config.alive_interval = args.alive_interval;
    let sim = Arc::new(
        Simulator::new(config, Arc::new(BackboneSink(backbone.clone())))?
            .with_identities(&identity.issuer, CREDENTIAL_VALIDITY)?,
    );
    // The demo fleet lets the demo operator, the dashboard's action page and you
    // (`chorus=operator`, whose key and credential are written to <data>/identity) call
    // rpcutil (read-only); everything else stays denied by default, as on a real fleet.
    let policy_dir = data.join("policy");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(
        policy_dir.join("rpcutil.policy"),
        "policy default deny\nallow\tchorus=demo-operator chorus=operator chorus=dashboard choria=provisioner\t*\t*\t*\n",
    )?;
    let storm = sim.startup_storm().await?;
    services.push(sim.clone().start("simulated fleet", shutdown.child()));
    let rpc = sim.host_rpc(transport.clone(), "choria", Some(policy_dir.clone()), security.clone()).await?;
    sim.register(&rpc, "choria").await?;
    println!(
        "{} simulated nodes started ({} startup events in {:.2?}); {} answer RPC",
        args.nodes,
        storm.events,
        storm.took,
        rpc.node_count()
    );
    services.push(rpc);

    // The provisioner, and new nodes for it: they start in provisioning mode and are
    // configured over RPC (rpcutil ping then get_fact stand in for Choria's
    // choria_provision steps), each exactly once.
    let mut provisioning = ProvisionerConfig::new(vec![
        Step::new("rpcutil", "ping"),
        Step::new("rpcutil", "get_fact")
            .with_data(serde_json::json!({"fact": "os"}).as_object().cloned().unwrap_or_default()),
    ]);
    provisioning.state_dir = data.join("provisioner");
    provisioning.security = Some(identity.client_files("choria=provisioner")?);
    let provisioner = Provisioner::start(backbone.clone(), transport.clone(), provisioning, shutdown.child())
        .await
        .context("starting the provisioner")?;
    ops.add(Arc::new(provisioner.monitor()));
    services.push(provisioner);
    let mut fresh = SimConfig::new(args.new_nodes.max(1));
    fresh.prefix = "new".into();
    fresh.component = "provision_mode_server".into();
    fresh.alive_interval = args.alive_interval;
    let new_nodes = Arc::new(
        Simulator::new(fresh, Arc::new(BackboneSink(backbone.clone())))?
            .with_identities(&identity.issuer, CREDENTIAL_VALIDITY)?,
    );
    let new_rpc = new_nodes.host_rpc(transport.clone(), "choria", Some(policy_dir), security).await?;
    new_nodes.register(&new_rpc, "choria").await?;
    services.push(new_rpc);
    if args.new_nodes > 0 {
        new_nodes.startup_storm().await?;
        println!("{} new nodes started in provisioning mode", args.new_nodes);
    }
    services.push(new_nodes.clone().start("new nodes", shutdown.child()));

    let manifest = Manifest::from_yaml(DEMO_MACHINE).context("the demo machine manifest")?;
    let mut machines = 0;
    for node in sim.nodes().iter().take(args.machines) {
        let dir = machine_dir.to_path_buf();
        services.push(Machine::start(manifest.clone(), &*node.identity, dir, node.emitter.clone(), shutdown.child())?);
        machines += 1;
    }
    println!("{machines} nodes run the demo autonomous agent");
    // A demo operator pings the fleet every minute: every request and reply is recorded in
    // CHORUS_RPC and exported to the audit file.
    let client = RpcClient::signed(transport.clone(), identity.client("chorus=demo-operator")?, "choria")
        .with_trust(identity.issuers.clone());
    services.push(DemoOperator::start(client, args.nodes, shutdown.child()));
    let operator = identity.client_files("chorus=operator")?;
    let KeyConfig::KeyFile(key) = &operator.key else { anyhow::bail!("the operator key is a file") };
    println!("\nDashboard: {url}\n  JSON: {url}api/summary  {url}api/nodes  Prometheus: {url}metrics");
    println!("  Run an action: {url}rpc");
    println!(
        "From another terminal:\n  chorus rpc rpcutil ping --url {url} --key {} --credential {} --issuer {}",
        key.display(),
        operator.credential.display(),
        operator.issuers.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",")
    );
    println!("Audit records: {}\nPress Ctrl-C to stop.", audit_file.display());
    Ok(())
}

/// How long the credentials `chorus up` issues are valid (they are issued again at every start).
const CREDENTIAL_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// The issuer of a `chorus up` platform, kept in `<data>/identity` so events signed in an
/// earlier run still verify.
struct PlatformIdentity {
    dir: std::path::PathBuf,
    issuer: FileSigner,
    issuers: Arc<Issuers>,
}

impl PlatformIdentity {
    /// Opens (or creates) the issuer key in `dir` and writes its public key beside it.
    fn open(dir: &std::path::Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("issuer.key");
        let issuer =
            if path.exists() { FileSigner::load(&path)? } else { FileSigner::generate(&path, Algorithm::Ed25519)? };
        std::fs::write(dir.join("issuer.pub"), issuer.public_key().to_pem())?;
        let issuers = Arc::new(Issuers::new().with(issuer.public_key().clone()));
        Ok(PlatformIdentity { dir: dir.to_path_buf(), issuer, issuers })
    }

    /// A fresh key and client credential for `callerid`, in memory.
    fn client(&self, callerid: &str) -> anyhow::Result<Identity> {
        let key = FileSigner::random(Algorithm::Ed25519);
        let spec = CredentialSpec::client(callerid, key.public_key().clone(), CREDENTIAL_VALIDITY);
        let credential = Credential::issue(&self.issuer, &spec, chrono::Utc::now().timestamp())?;
        Ok(Identity::new(Arc::new(key), credential)?)
    }

    /// A key and client credential for `callerid` written to files, as a service's
    /// configuration names them.
    fn client_files(&self, callerid: &str) -> anyhow::Result<ClientSecurity> {
        let name = callerid.replace(['=', '/'], "-");
        let key_path = self.dir.join(format!("{name}.key"));
        let key = if key_path.exists() {
            FileSigner::load(&key_path)?
        } else {
            FileSigner::generate(&key_path, Algorithm::Ed25519)?
        };
        let spec = CredentialSpec::client(callerid, key.public_key().clone(), CREDENTIAL_VALIDITY);
        let credential = Credential::issue(&self.issuer, &spec, chrono::Utc::now().timestamp())?;
        let credential_path = self.dir.join(format!("{name}.cred"));
        std::fs::write(&credential_path, format!("{}\n", credential.token()))?;
        Ok(ClientSecurity {
            key: KeyConfig::KeyFile(key_path),
            credential: credential_path,
            issuers: vec![self.dir.join("issuer.pub")],
        })
    }
}

/// The demo operator: an `rpcutil ping` of the fleet every minute.
struct DemoOperator {
    tasks: Tasks,
}

impl DemoOperator {
    fn start(client: RpcClient, nodes: usize, shutdown: Shutdown) -> Self {
        let mut tasks = Tasks::new("demo operator", shutdown);
        let stop = tasks.shutdown().clone();
        tasks.spawn("ping", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.requested() => return Ok::<_, ServiceError>(()),
                }
                let options =
                    RequestOptions { expected: Some(nodes), timeout: Duration::from_secs(10), ..Default::default() };
                match client.call("rpcutil", "ping", Default::default(), options).await {
                    Ok(r) => tracing::info!(replies = r.replies.len(), "demo operator: rpcutil ping"),
                    Err(e) => tracing::warn!(error = %e, "demo operator: rpcutil ping failed"),
                }
            }
        });
        DemoOperator { tasks }
    }
}

chorus_runtime::service_of_tasks!(DemoOperator, tasks);
