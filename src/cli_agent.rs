//! `chorus agent`, `chorus simulate` and `chorus rpc`: the node side of the platform.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_producers::emitter::BackboneSink;
use chorus_producers::rpc::{parse_fact_filter, NatsTransport, RequestOptions, RpcClient, Target};
use chorus_producers::simulator::{resident_bytes, SimConfig, Simulator};
use chorus_producers::streams::{ensure_platform_streams, StreamLimits};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// Waits for SIGTERM or Ctrl-C.
pub async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Agent configuration file (YAML): identity, state_dir, nats, machines_dir, policy_dir, …
    #[arg(long, short)]
    config: PathBuf,
}

/// Runs a node agent until SIGTERM, then records the shutdown event and drains the outbox.
pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)?;
    let identity = config.identity.clone();
    let agent = NodeAgent::start(config).await?;
    eprintln!("chorus agent {identity} running; SIGTERM to stop");
    terminated().await;
    agent.shutdown().await?;
    Ok(())
}

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// How many simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// NATS server(s) to publish to (comma-separated); without it, an embedded store.
    #[arg(long)]
    nats: Option<String>,
    /// Embedded store directory when no --nats is given.
    #[arg(long, default_value = "chorus-data/simulate")]
    data: PathBuf,
    /// Alive interval of every simulated node (each gets a random slot within it).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    alive_interval: Duration,
    /// Send a startup storm and exit, instead of running until SIGTERM.
    #[arg(long)]
    once: bool,
    /// Action Policy directory for the simulated nodes' RPC servers (with --nats); without
    /// it every request is denied, as on a real node.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
}

/// The backbone named by `--nats`, or an embedded store in `data`.
pub async fn open_backbone(nats: Option<&str>, data: &std::path::Path) -> anyhow::Result<Arc<dyn Backbone>> {
    Ok(match nats {
        Some(urls) => Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(urls)).await?),
        None => {
            std::fs::create_dir_all(data)?;
            Arc::new(EmbeddedBackbone::open_path(data).with_context(|| {
                format!(
                    "opening the embedded store {} (one process at a time: is another chorus using it?)",
                    data.display()
                )
            })?)
        }
    })
}

pub async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let backbone = open_backbone(args.nats.as_deref(), &args.data).await?;
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let mut config = SimConfig::new(args.nodes);
    config.alive_interval = args.alive_interval;
    let sim = Arc::new(Simulator::new(config, Arc::new(BackboneSink(backbone)))?);
    let storm = sim.startup_storm().await?;
    println!(
        "{} simulated nodes started: {} startup events in {:.2?} ({:.0} events/s)",
        args.nodes,
        storm.events,
        storm.took,
        storm.rate()
    );
    if args.once {
        return Ok(());
    }
    let _rpc = match &args.nats {
        Some(urls) => {
            let client = NatsConfig::from_url_list(urls).connect(None).await?;
            let server = sim.host_rpc(Arc::new(NatsTransport::new(client)), "choria", args.policy_dir.clone()).await?;
            println!("{} simulated nodes answer RPC in collective choria", server.node_count());
            Some(server)
        }
        None => None,
    };
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let runner = {
        let sim = sim.clone();
        tokio::spawn(async move { sim.run_alive(stop_rx).await })
    };
    terminated().await;
    let _ = stop.send(true);
    runner.await??;
    let down = sim.shutdown_all().await?;
    println!("{} shutdown events", down.events);
    Ok(())
}

#[derive(clap::Args)]
pub struct RpcArgs {
    /// Agent to call, e.g. rpcutil.
    agent: String,
    /// Action, e.g. ping.
    action: String,
    /// Action inputs as key=value (values parsed as JSON when they are JSON).
    inputs: Vec<String>,
    /// NATS server(s), comma-separated.
    #[arg(long, env = "CHORUS_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    #[arg(long, default_value = "choria")]
    collective: String,
    /// Caller id the request is made as.
    #[arg(long, env = "CHORUS_CALLERID", default_value = "choria=cli")]
    callerid: String,
    /// Discovery filter on facts, e.g. `-F country=uk` (repeatable).
    #[arg(short = 'F', long = "wf")]
    facts: Vec<String>,
    /// Only these nodes (repeatable); requests are sent directly to each.
    #[arg(short = 'I', long = "identity")]
    identities: Vec<String>,
    /// Nodes expected to reply (stop waiting once they have; report those that did not).
    #[arg(long)]
    expect: Option<usize>,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print every reply as JSON.
    #[arg(long)]
    json: bool,
    /// Have requests signed by a Chorus AAA service (`chorus aaa`) instead of holding a key:
    /// its URL, e.g. https://aaa.example.net:8443. Needs a token (`--token` or
    /// CHORUS_AAA_TOKEN), or a login with --user and CHORUS_AAA_PASSWORD.
    #[arg(long, env = "CHORUS_AAA_URL")]
    aaa: Option<String>,
    /// JWT from the AAA service's /login.
    #[arg(long, env = "CHORUS_AAA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Log in to the AAA service as this user (password from CHORUS_AAA_PASSWORD).
    #[arg(long)]
    user: Option<String>,
    /// CA certificate of the AAA service's HTTPS listener.
    #[arg(long)]
    aaa_ca: Option<std::path::PathBuf>,
}

/// Makes an RPC request, showing replies as they arrive and a summary at the end.
pub async fn rpc(args: RpcArgs) -> anyhow::Result<()> {
    let nats = NatsConfig::from_url_list(&args.nats);
    let client = nats.connect(None).await?;
    let mut rpc = RpcClient::new(Arc::new(NatsTransport::new(client)), &args.callerid, &args.collective);
    if let Some(url) = &args.aaa {
        let aaa = chorus_producers::aaa::AaaClient::new(url, args.aaa_ca.as_deref())?;
        let token = match (&args.token, &args.user) {
            (Some(token), _) => token.clone(),
            (None, Some(user)) => {
                let password =
                    std::env::var("CHORUS_AAA_PASSWORD").context("--user needs the password in CHORUS_AAA_PASSWORD")?;
                aaa.login(user, &password).await?.token
            }
            (None, None) => anyhow::bail!("--aaa needs --token (or CHORUS_AAA_TOKEN) or --user"),
        };
        rpc = rpc.with_request_signer(Arc::new(chorus_producers::aaa::AaaSigner::new(aaa, token)));
    }
    let mut data = serde_json::Map::new();
    for kv in &args.inputs {
        let (k, v) = kv.split_once('=').with_context(|| format!("input {kv:?} is not key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        data.insert(k.to_string(), value);
    }
    let mut options = RequestOptions::default();
    for f in &args.facts {
        options.filter.fact.push(parse_fact_filter(f)?);
    }
    options.target = match args.identities.len() {
        0 => Target::Broadcast,
        1 => Target::Node(args.identities[0].clone()),
        _ => Target::Nodes(args.identities.clone()),
    };
    options.expected = args.expect.or(if args.identities.is_empty() { None } else { Some(args.identities.len()) });
    options.timeout = args.timeout;
    let bar = match options.expected {
        Some(n) => ProgressBar::new(n as u64),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} replies {wide_bar} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut stream = rpc.request(&args.agent, &args.action, data, options).await?;
    let mut failures = Vec::new();
    while let Some(reply) = stream.next().await {
        bar.inc(1);
        if args.json {
            bar.suspend(|| println!("{}", serde_json::to_string(&reply).unwrap_or_default()));
        } else if reply.statuscode as u8 != 0 || !reply.authorized {
            failures.push(format!("{:<40} {}", reply.identity, reply.statusmsg));
        }
    }
    bar.finish_and_clear();
    for f in &failures {
        println!("{f}");
    }
    let s = stream.summary();
    println!(
        "\n{} replies: {} ok, {} denied, {} failed{} in {:.2?} (request {})",
        s.replies,
        s.ok,
        s.denied,
        s.failed,
        s.no_response.map(|n| format!(", {n} did not respond")).unwrap_or_default(),
        s.elapsed,
        s.requestid
    );
    if s.ok < s.replies || s.no_response.unwrap_or(0) > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchSimulateArgs {
    #[arg(long, default_value_t = 50_000)]
    nodes: usize,
    /// Use this NATS server instead of starting a private nats-server.
    #[arg(long)]
    nats: Option<String>,
}

/// `chorus bench simulate`: N simulated nodes in this process, their startup storm fully
/// stored in JetStream; memory per node and events/s, against raw async-nats publishing the
/// same events on the same server.
pub async fn bench_simulate(args: BenchSimulateArgs) -> anyhow::Result<()> {
    let (_server, url) = crate::bench::nats_url(args.nats.as_deref())?;
    let backbone: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([url.clone()])).await?);
    for (name, _) in chorus_schemas::subject::streams() {
        let _ = backbone.delete_stream(name).await;
    }
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let before = resident_bytes().unwrap_or(0);
    let sim = Simulator::new(SimConfig::new(args.nodes), Arc::new(BackboneSink(backbone.clone())))?;
    let after = resident_bytes().unwrap_or(0);
    let storm = sim.startup_storm().await?;
    let stored = backbone.stream_info("CHORUS_LIFECYCLE").await?.messages;
    anyhow::ensure!(stored as usize == args.nodes, "startup storm: {stored} of {} events stored", args.nodes);

    // Raw baseline: the same startup events, pipelined by async-nats with message ids.
    let records: Vec<_> = (0..args.nodes)
        .map(|i| {
            let r = chorus_schemas::EventRecord::new(
                chorus_schemas::lifecycle::Startup::new(
                    sim.nodes()[i].identity.to_string(),
                    "server",
                    sim.version_of(i),
                ),
                1,
            );
            (r.id.clone(), bytes::Bytes::from(r.encode()))
        })
        .collect();
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream("RAW_SIM").await;
    let took = crate::bench::raw_publish(&js, "RAW_SIM", "rawsim", &records, 2048).await?;
    let raw = crate::bench::rate(records.len(), took);
    let per_node = after.saturating_sub(before) as f64 / args.nodes as f64;
    println!("\n### Simulated startup storm ({} nodes, one process, one connection)\n", args.nodes);
    println!("| measurement | value |");
    println!("|---|---:|");
    println!("| startup events stored | {stored} |");
    println!("| storm duration | {:.2} s |", storm.took.as_secs_f64());
    println!("| chorus simulator events/s | {:.0} |", storm.rate());
    println!("| raw async-nats events/s (same events) | {raw:.0} |");
    println!("| ratio | {:.2} |", storm.rate() / raw);
    println!("| simulator memory per node | {per_node:.0} bytes |");
    println!("| process resident memory | {:.1} MiB |", resident_bytes().unwrap_or(0) as f64 / 1048576.0);
    Ok(())
}
