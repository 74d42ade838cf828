//! `chorus bench react`.
//!
//! One stream of simulated lifecycle events (a startup storm, then alive rounds), read in
//! the same run on the same server by the raw baseline (an async-nats ordered consumer
//! reading and dropping every message) and by the reactor: every event read, parsed and
//! evaluated against the rules, state, positions and firings committed per batch. Two rule
//! sets: an expression over every alive event (no state), and an absence rule per node (every
//! event re-arms its node's deadline: one state write per event). CPU per event is the
//! process's user + system time over the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_consumers::reactor::{Reactor, ReactorConfig};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::subject::CHORUS_LIFECYCLE;

use super::{median_sample, print_table, process_cpu, CpuMeter, Row};

#[derive(clap::Args)]
pub struct Args {
    /// Lifecycle events in the stream (one startup per node, then alive rounds).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Simulated nodes.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[command(flatten)]
    common: super::CommonArgs,
}

const EXPRESSION_RULES: &str = r#"
  - name: old_version
    match: {stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.alive, expression: 'data.version == "0.0.0" && event.subject endsWith ".example"'}
    actions: [{command: {run: ["true"]}}]
"#;

const ABSENCE_RULES: &str = r#"
  - name: silent
    match: {stream: CHORUS_LIFECYCLE, type: 'io.choria.lifecycle.v1.*'}
    when: {absent_for: 24h}
"#;

/// The reactor over the whole stream from a fresh state: wall time and CPU until every
/// event is evaluated.
async fn react(b: &Arc<dyn Backbone>, rules: &str, n: u64) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let config = ReactorConfig::from_yaml(&format!(
        "name: bench\nstate_dir: {}\nstart: first\nrules:{rules}",
        dir.path().display()
    ))?;
    let cpu = process_cpu();
    let started = Instant::now();
    let mut reactor = Reactor::start(b.clone(), None, config, false, Shutdown::new()).await?;
    while reactor.stats().evaluated < n {
        anyhow::ensure!(!reactor.failed(), "reactor failed: {:?}", reactor.health());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    let cpu = process_cpu() - cpu;
    reactor.stop().await?;
    Ok((took, cpu))
}

/// Evaluation alone, on the stream's payloads already in memory: reading each into expr
/// values and applying the rules, no backbone, no store. What the rules cost per event.
async fn evaluate_only(b: &Arc<dyn Backbone>, rules: &str) -> anyhow::Result<(Duration, Duration, usize)> {
    use chorus_consumers::reactor::{read_event, Counts, Rules};
    use futures::StreamExt;
    let mut replay = b.replay(CHORUS_LIFECYCLE, Default::default()).await?;
    let mut messages = Vec::new();
    while let Some(m) = replay.next().await {
        messages.push(m?);
    }
    let config = ReactorConfig::from_yaml(&format!("name: bench\nrules:{rules}"))?;
    let mut compiled = Rules::new(&config).map_err(|e| anyhow::anyhow!(e))?;
    let needs = compiled.needs();
    let (mut counts, mut out) = (Counts::default(), Vec::new());
    let cpu = process_cpu();
    let started = Instant::now();
    for m in &messages {
        let event = read_event(m, &needs).map_err(|(code, why)| anyhow::anyhow!("{code}: {why}"))?;
        compiled.apply(&event.seen(m), &mut counts, &mut out);
    }
    Ok((started.elapsed(), process_cpu() - cpu, messages.len()))
}

async fn raw_ordered(js: &jetstream::Context, n: u64) -> anyhow::Result<(Duration, Duration)> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures::StreamExt;
    let cpu = process_cpu();
    let started = Instant::now();
    let stream = js.get_stream(CHORUS_LIFECYCLE).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await?;
    let mut messages = consumer.messages().await?;
    for _ in 0..n {
        let m = messages.next().await.ok_or_else(|| anyhow::anyhow!("ordered consumer ended"))??;
        drop(m);
    }
    Ok((started.elapsed(), process_cpu() - cpu))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (server, url) = super::nats_url(args.common.nats.as_deref())?;
    let meter = CpuMeter::with_server(server.as_ref());
    let config = NatsConfig::new([url.clone()]);
    let client = config.connect(None).await?;
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::from_client(client.clone(), &config));
    for (name, _) in chorus_schemas::subject::streams() {
        b.delete_stream(name).await.ok();
    }
    let n = super::views::preload_lifecycle(&b, args.events, args.nodes).await?;
    println!("# chorus bench react: {n} lifecycle events of {} simulated nodes", args.nodes.min(args.events));
    let js = jetstream::new(client);
    let (mut raw, mut replay, mut expr, mut absence) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let took = |r: anyhow::Result<(Duration, Duration)>| r.map(|(took, _)| took);
    for round in 0..args.common.rounds.max(1) {
        raw.push(meter.sample(async { took(raw_ordered(&js, n).await) }).await?);
        // The backbone's replay alone (what the reactor's reader does), read and dropped.
        replay.push(meter.sample(super::views::chorus_replay(&b, n, false)).await?);
        expr.push(meter.sample(async { took(react(&b, EXPRESSION_RULES, n).await) }).await?);
        absence.push(meter.sample(async { took(react(&b, ABSENCE_RULES, n).await) }).await?);
        eprintln!("round {} done", round + 1);
    }
    let n = n as usize;
    let raw = Row::of("raw async-nats ordered consumer, read and drop", n, median_sample(raw), None);
    let base = Some(raw.rate());
    let rows = [
        Row::of("chorus backbone replay alone, read and drop", n, median_sample(replay), base),
        Row::of("reactor: an expression rule over every alive event", n, median_sample(expr), base),
        Row::of("reactor: an absence rule per node, state written per event", n, median_sample(absence), base),
    ];
    let (eval_t, eval_c, eval_n) = evaluate_only(&b, EXPRESSION_RULES).await?;
    let (_, abs_only_c, _) = evaluate_only(&b, ABSENCE_RULES).await?;
    println!(
        "\nwhere the time goes: reading each event into expr values (the parts the rules use) and applying the expression rule costs {:.2} µs CPU per event ({:.0} events/s on one core), the absence rule {:.2} µs, with no backbone and no store",
        eval_c.as_secs_f64() * 1e6 / eval_n as f64,
        super::rate(eval_n, eval_t),
        abs_only_c.as_secs_f64() * 1e6 / eval_n as f64,
    );
    let ratio = rows[1].rate() / raw.rate();
    let ratio_state = rows[2].rate() / raw.rate();
    let mut all = vec![raw];
    all.extend(rows);
    print_table(
        &format!(
            "Reactor rule evaluation vs raw consume on JetStream (same stream, median of {} rounds)",
            args.common.rounds.max(1)
        ),
        &all,
    );
    println!("\nratio {ratio:.2} (expression rule), {ratio_state:.2} (absence per node); goal >= 0.8");
    Ok(())
}
