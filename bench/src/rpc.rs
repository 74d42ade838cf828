//! `chorus bench rpc`: one broadcast `rpcutil ping` answered by N simulated nodes in this
//! process, round trip until every reply is in, three ways in interleaved rounds on one
//! private nats-server:
//!
//! * raw async-nats: one subscription answers for N "nodes" with a JSON reply each, and the
//!   client counts N replies: what a user would write without Chorus (no policy, no records,
//!   no signatures), the floor;
//! * Chorus unsigned: the RPC server of N simulated nodes (policy decision, request and reply
//!   recorded as events, reply sent) and the RPC client;
//! * Chorus signed: the same with every node holding its own key and node credential and
//!   every caller authenticated: the request signed by the caller's key and checked by the
//!   nodes (issuer → credential → signature, replay cache), every recorded event and every
//!   reply signed by its node, every reply verified by the client.
//!
//! Recorded events go to a sink that drops them (after signing, in the signed fleet), so the
//! figures are RPC and signing, not the event store, which `chorus bench backbone` measures.
//! CPU is this process's (client and nodes), per reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use chorus_identity::{Credential, CredentialSpec, Identity, Issuers};
use chorus_keys::{Algorithm, FileSigner, Signer};
use chorus_platform::{EventSink, PlatformError};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_rpc::{NatsTransport, RequestOptions, RequestSecurity, RpcClient, Transport};
use chorus_schemas::{EventRecord, RpcReply, RpcRequest, StatusCode};
use futures::StreamExt;

/// Arguments of `chorus bench rpc`.
#[derive(clap::Args)]
pub struct Args {
    /// Simulated nodes answering each request.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Interleaved rounds of the three measurements; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Use this NATS server instead of starting a private nats-server.
    #[arg(long)]
    nats: Option<String>,
    /// Leave out the signed fleet (raw and unsigned only: quicker, and a cleaner profile).
    #[arg(long)]
    without_signing: bool,
    /// Leave out the inventory discovery measurement (the round trips alone, for profiling).
    #[arg(long)]
    without_discovery: bool,
}

/// Drops what it is given: the nodes' records are produced (and signed) but not stored.
struct Discard;

#[async_trait]
impl EventSink for Discard {
    async fn store(&self, _records: Vec<EventRecord>) -> Result<(), PlatformError> {
        Ok(())
    }
}

/// One measured round trip: wall time and the CPU of this process and of the server.
async fn measure<F: std::future::Future<Output = anyhow::Result<()>>>(
    meter: &super::CpuMeter,
    run: F,
) -> anyhow::Result<super::Sample> {
    meter
        .sample(async {
            let started = Instant::now();
            run.await?;
            Ok(started.elapsed())
        })
        .await
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.nodes;
    let (server, url) = super::nats_url(args.nats.as_deref())?;
    let meter = super::CpuMeter::with_server(server.as_ref());
    let connect = || async_nats::connect(url.clone());
    let transport = |c: async_nats::Client| -> Arc<dyn Transport> { Arc::new(NatsTransport::new(c)) };
    let policies = tempfile::tempdir()?;
    std::fs::write(policies.path().join("rpcutil.policy"), "policy default deny\nallow\t*\tping\t*\t*\n")?;
    let day = Duration::from_secs(86_400);

    // The fleets, each on its own connection, as a real fleet's nodes have their own.
    let plain = Simulator::new(SimConfig { prefix: "plain".into(), ..SimConfig::new(n) }, Arc::new(Discard))?;
    let plain_server =
        plain.host_rpc(transport(connect().await?), "plain", Some(policies.path().to_path_buf()), None).await?;
    let issuer = FileSigner::random(Algorithm::Ed25519);
    let issuers = Arc::new(Issuers::new().with(issuer.public_key().clone()));
    let signed = Simulator::new(SimConfig { prefix: "signed".into(), ..SimConfig::new(n) }, Arc::new(Discard))?
        .with_identities(&issuer, day)?;
    let security = Arc::new(RequestSecurity::new(issuers.clone()));
    let _signed_server = signed
        .host_rpc(transport(connect().await?), "signed", Some(policies.path().to_path_buf()), Some(security))
        .await?;
    let raw_responder = tokio::spawn(raw_nodes(connect().await?, n));

    let plain_client = RpcClient::new(transport(connect().await?), "choria=bench", "plain");
    let caller_key = FileSigner::random(Algorithm::Ed25519);
    let credential = Credential::issue(
        &issuer,
        &CredentialSpec::client("choria=bench", caller_key.public_key().clone(), day),
        chrono::Utc::now().timestamp() - 60,
    )?;
    let caller = Identity::new(Arc::new(caller_key), credential)?;
    let signed_client = RpcClient::signed(transport(connect().await?), caller, "signed").with_trust(issuers);
    let raw_client = connect().await?;

    let options = RequestOptions { expected: Some(n), timeout: Duration::from_secs(300), ..Default::default() };
    let call = |client: &RpcClient| {
        let (client, options) = (client.clone(), options.clone());
        async move {
            let results = client.call("rpcutil", "ping", Default::default(), options).await?;
            let s = &results.summary;
            anyhow::ensure!(s.ok == n && s.unverified == 0, "{n} nodes asked, {s:?}");
            Ok(())
        }
    };
    // A warm-up round of each, not measured (first-use allocations, credential cache).
    raw_round(&raw_client, n).await?;
    call(&plain_client).await?;
    if !args.without_signing {
        call(&signed_client).await?;
    }

    let (mut raw, mut unsigned, mut with_signatures) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        raw.push(measure(&meter, raw_round(&raw_client, n)).await?);
        unsigned.push(measure(&meter, call(&plain_client)).await?);
        if !args.without_signing {
            with_signatures.push(measure(&meter, call(&signed_client)).await?);
        }
        eprintln!("round {} done", round + 1);
    }
    raw_responder.abort();

    let (raw, unsigned) = (super::median_sample(raw), super::median_sample(unsigned));
    let names = meter.names();
    println!("\n### RPC round trip: one broadcast ping, {n} simulated nodes (median of {} rounds)\n", args.rounds);
    println!(
        "| measurement | replies | round trip s | replies/s | vs raw | vs unsigned |{}",
        names.iter().map(|p| format!(" {p} µs CPU per reply |")).collect::<String>()
    );
    println!("|---|---:|---:|---:|---:|---:|{}", "---:|".repeat(names.len()));
    let row = |name: &str, s: &super::Sample| {
        println!(
            "| {name} | {n} | {:.3} | {:.0} | {:.2} | {:.2} |{}",
            s.took.as_secs_f64(),
            super::rate(n, s.took),
            s.took.as_secs_f64() / raw.took.as_secs_f64(),
            s.took.as_secs_f64() / unsigned.took.as_secs_f64(),
            s.cpu.per_event(n).iter().map(|c| format!(" {c:.1} |")).collect::<String>()
        )
    };
    row("raw async-nats (one subscription answers for every node)", &raw);
    row("chorus, unsigned", &unsigned);
    if !args.without_signing {
        let with_signatures = super::median_sample(with_signatures);
        row("chorus, signed requests, events and replies", &with_signatures);
        let overhead = with_signatures.took.as_secs_f64() / unsigned.took.as_secs_f64() - 1.0;
        println!("\nsigning adds {:.0}% to the round trip (goal: at most 20%)", overhead * 100.0);
    }
    println!(
        "\nchorus unsigned: {:.3} s for {n} nodes (goal: at most 1.0 s), {:.2}x the raw replies/s (goal: at least 0.8x)",
        unsigned.took.as_secs_f64(),
        raw.took.as_secs_f64() / unsigned.took.as_secs_f64()
    );
    signature_costs(unsigned.cpu.per_event(n)[0])?;
    if !args.without_discovery {
        inventory_discovery(&plain_server, &plain, "plain", args.rounds.max(1)).await?;
    }
    Ok(())
}

/// Inventory discovery over the registrations of every node of `sim` (hosted by `server`):
/// they are published into an embedded store and projected, then the nodes a filter selects
/// are found from the view, with the nodes' own filter code, no traffic to the nodes.
async fn inventory_discovery(
    server: &chorus_rpc::RpcServer,
    sim: &Simulator,
    collective: &str,
    rounds: usize,
) -> anyhow::Result<()> {
    use chorus_consumers::inventory::Inventory;
    use chorus_consumers::projection::Store;
    use chorus_platform::{ensure_platform_streams, BackboneSink, Emitter, StreamLimits};

    let dir = tempfile::tempdir()?;
    let backbone: Arc<dyn chorus_backbone::Backbone> =
        Arc::new(chorus_backbone::embedded::EmbeddedBackbone::open_path(dir.path().join("streams"))?);
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let emitter = Emitter::new(Arc::new(BackboneSink(backbone.clone())), 1, None);
    let started = Instant::now();
    for node in sim.nodes() {
        let content = server.registration(collective, &node.identity).context("a hosted node")?;
        emitter.emit(chorus_schemas::Registration::new(content)).await?;
    }
    let published = started.elapsed();
    let store = Store::open(dir.path().join("views"))?;
    let started = Instant::now();
    Inventory::registration_projector(backbone, &store)?.catch_up().await?;
    let projected = started.elapsed();
    let inventory = Inventory::open(&store, Default::default())?;
    let n = sim.nodes().len();
    println!("\n### Inventory discovery: {n} registered nodes (median of {rounds} rounds)\n");
    println!("registrations published in {published:.2?}, projected in {projected:.2?}\n");
    println!("| filter | nodes selected | discovery s | CPU µs per registered node |");
    println!("|---|---:|---:|---:|");
    let fact = chorus_rpc::parse_fact_filter("country=uk")?;
    let cases = [
        (
            "agent rpcutil (every node)",
            chorus_schemas::rpc::Filter { agent: vec!["rpcutil".into()], ..Default::default() },
        ),
        ("fact country=uk", chorus_schemas::rpc::Filter { fact: vec![fact], ..Default::default() }),
    ];
    for (name, filter) in cases {
        let compiled = chorus_rpc::CompiledFilter::new(&filter).map_err(anyhow::Error::msg)?;
        let mut times = Vec::new();
        let mut selected = 0;
        for _ in 0..rounds {
            // Discovery reads the local view only: this process's CPU is all of it.
            let round = measure(&super::CpuMeter::new(Vec::new()), async {
                selected = inventory.discover(&compiled, collective, chrono::Utc::now())?.nodes.len();
                Ok(())
            })
            .await?;
            times.push(round);
        }
        let median = super::median_sample(times);
        let cpu = median.cpu.per_event(n)[0];
        println!("| {name} | {selected} | {:.3} | {cpu:.1} |", median.took.as_secs_f64());
    }
    Ok(())
}

/// What one signature costs on this machine, against the CPU of a whole unsigned reply: the
/// floor under any design that signs each reply on its node and checks it at the client.
fn signature_costs(unsigned_cpu_per_reply: f64) -> anyhow::Result<()> {
    const N: usize = 2_000;
    let message = vec![b'x'; 600];
    println!("\n### What one signature costs (µs, {N} operations on a 600-byte message)\n");
    println!("| algorithm | sign | verify | verify in batches of 256 | floor per reply (sign + verify) vs unsigned reply CPU |");
    println!("|---|---:|---:|---:|---:|");
    for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        let key = FileSigner::random(algorithm);
        let per_op = |started: Instant| started.elapsed().as_secs_f64() * 1e6 / N as f64;
        let started = Instant::now();
        let signatures = (0..N).map(|_| key.sign(&message)).collect::<Result<Vec<_>, _>>()?;
        let sign = per_op(started);
        let public = key.public_key();
        let started = Instant::now();
        anyhow::ensure!(signatures.iter().all(|s| public.verify(&message, s)), "a fresh signature does not verify");
        let verify = per_op(started);
        let items: Vec<(&chorus_keys::PublicKey, &[u8], &[u8; 64])> =
            signatures.iter().map(|s| (public, message.as_slice(), s)).collect();
        let started = Instant::now();
        anyhow::ensure!(items.chunks(256).all(chorus_keys::PublicKey::verify_all), "a batch does not verify");
        let batch = per_op(started);
        let floor = sign + batch.min(verify);
        println!(
            "| {algorithm} | {sign:.1} | {verify:.1} | {batch:.1} | {floor:.1} µs = {:.0}% of {unsigned_cpu_per_reply:.1} µs |",
            floor / unsigned_cpu_per_reply * 100.0
        );
    }
    Ok(())
}

/// The raw responder: one subscription on the broadcast subject answers each request with a
/// JSON reply for each of `n` nodes.
async fn raw_nodes(client: async_nats::Client, n: usize) -> anyhow::Result<()> {
    let mut requests = client.subscribe("raw.broadcast.agent.rpcutil").await?;
    while let Some(message) = requests.next().await {
        let request: RpcRequest = serde_json::from_slice(&message.payload)?;
        let reply_to = message.reply.context("raw request without reply subject")?;
        for i in 0..n {
            let mut data = chorus_schemas::rpc::JsonObject::new();
            data.insert("pong".into(), chrono::Utc::now().timestamp().into());
            let reply = RpcReply::new(&request, format!("raw-{i:06}.example.net"), StatusCode::Ok, data);
            client.publish(reply_to.clone(), Bytes::from(serde_json::to_vec(&reply)?)).await?;
        }
        client.flush().await?;
    }
    Ok(())
}

/// One raw round trip: publish the request, count `n` replies.
async fn raw_round(client: &async_nats::Client, n: usize) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let request = RpcRequest::new("choria=bench", "bench", "raw", "rpcutil", "ping", Default::default());
    client.publish_with_reply("raw.broadcast.agent.rpcutil", inbox, Bytes::from(serde_json::to_vec(&request)?)).await?;
    client.flush().await?;
    for _ in 0..n {
        let reply = replies.next().await.context("raw replies ended")?;
        let _: RpcReply = serde_json::from_slice(&reply.payload)?;
    }
    Ok(())
}
