//! `chorus events tail`, `chorus replay` and `chorus restore`: reading the streams as an
//! operator does, and backing them up.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::{Backbone, Message, ReplayOptions, StartPosition};
use chorus_consumers::dashboard::parse_since;
use chorus_consumers::events::{one_line, tail, EventFilter};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli_agent::open_backbone;

/// Where the streams are: a running `chorus up` or dashboard (`--url`), NATS, or an embedded
/// store directory no other process holds.
#[derive(clap::Args, Clone)]
pub struct Source {
    /// A running `chorus up` / `chorus dashboard` (its embedded store is locked by it).
    #[arg(long)]
    url: Option<String>,
    /// NATS URLs (comma separated).
    #[arg(long, env = "CHORUS_NATS")]
    nats: Option<String>,
    /// Embedded store directory.
    #[arg(long, default_value = "chorus-data/streams")]
    data: PathBuf,
}

impl Source {
    async fn backbone(&self) -> anyhow::Result<Arc<dyn Backbone>> {
        open_backbone(self.nats.as_deref(), &self.data)
            .await
            .map_err(|e| e.context("hint: while `chorus up` runs, read through it with --url http://127.0.0.1:8080"))
    }
}

#[derive(clap::Subcommand)]
pub enum EventsCommand {
    /// Print events as they are stored, oldest first, then keep following.
    ///
    /// Examples:
    ///   chorus events tail --url http://127.0.0.1:8080 --type alive --node 'sim-0000*'
    ///   chorus events tail --nats nats://broker:4222 --kind rpc_request,audit --since 1h
    ///   chorus events tail --kind lifecycle --no-follow --json > lifecycle.jsonl
    Tail(TailArgs),
}

#[derive(clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    source: Source,
    /// Kinds, comma separated: lifecycle, transition, watcher, rpc_request, rpc_reply, audit, deadletter.
    #[arg(long, value_delimiter = ',')]
    kind: Vec<String>,
    /// Event types, comma separated: full (`io.choria.lifecycle.v1.alive`) or short (`alive`).
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Node identity glob (`*` and `?`).
    #[arg(long)]
    node: Option<String>,
    /// Only events stored since: an RFC 3339 time or a duration back from now (`10m`, `2h`).
    #[arg(long)]
    since: Option<String>,
    /// Stop at the end of the streams instead of following.
    #[arg(long)]
    no_follow: bool,
    /// One JSON document per line (stream, sequence, stored, subject, id, event).
    #[arg(long)]
    json: bool,
}

pub async fn events(cmd: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Tail(args) = cmd;
    match tail_events(args).await {
        // `chorus events tail | head`: the reader is gone, which is not an error.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => {
            Ok(())
        }
        other => other,
    }
}

async fn tail_events(args: TailArgs) -> anyhow::Result<()> {
    let since = args.since.as_deref().map(parse_since).transpose().map_err(anyhow::Error::msg)?;
    let filter = EventFilter {
        kinds: args.kind.clone(),
        types: args.types.clone(),
        node: args.node.clone(),
        since,
        follow: !args.no_follow,
    };
    filter.validate().map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    if let Some(url) = &args.source.url {
        let mut query = vec![("follow", (!args.no_follow).to_string())];
        if !args.kind.is_empty() {
            query.push(("kind", args.kind.join(",")));
        }
        if !args.types.is_empty() {
            query.push(("type", args.types.join(",")));
        }
        if let Some(n) = &args.node {
            query.push(("node", n.clone()));
        }
        if let Some(s) = &args.since {
            query.push(("since", s.clone()));
        }
        let endpoint = format!("{}/api/events", url.trim_end_matches('/'));
        let mut response = reqwest::Client::new()
            .get(&endpoint)
            .query(&query)
            .send()
            .await
            .with_context(|| format!("GET {endpoint}"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "{endpoint}: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        let mut pending = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if args.json {
                    out.write_all(&line)?;
                } else {
                    writeln!(out, "{}", remote_line(&line))?;
                }
            }
            out.flush()?;
        }
        return Ok(());
    }
    let backbone = args.source.backbone().await?;
    let mut stream = tail(backbone, filter).await?;
    while let Some(item) = tokio::select! { item = stream.next() => item, _ = crate::cli_agent::terminated() => None } {
        let e = item?;
        if args.json {
            serde_json::to_writer(&mut out, &e)?;
            out.write_all(b"\n")?;
        } else {
            writeln!(out, "{}", one_line(&e))?;
        }
        out.flush()?;
    }
    Ok(())
}

/// A JSON line from `/api/events` as the one-line form.
fn remote_line(line: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Shown {
        stream: String,
        sequence: u64,
        stored: chrono::DateTime<chrono::Utc>,
        subject: String,
        id: String,
        event: Option<serde_json::Value>,
        error: Option<String>,
    }
    let Ok(s) = serde_json::from_slice::<Shown>(line) else {
        return String::from_utf8_lossy(line).trim_end().to_string();
    };
    let decoded = s.event.as_ref().and_then(|e| chorus_schemas::EventRecord::decode(e.to_string().as_bytes()).ok());
    let shown = chorus_consumers::events::ShownEvent {
        stream: s.stream,
        sequence: s.sequence,
        stored: s.stored,
        subject: s.subject,
        id: s.id,
        event: None,
        error: s.error,
        record: decoded,
    };
    one_line(&shown)
}

/// `chorus replay`: a stream written out as JSON lines, for backups, audits and moving data.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Stream to read (CHORUS_LIFECYCLE, CHORUS_MACHINE, CHORUS_RPC, CHORUS_AUDIT, CHORUS_DEADLETTER).
    stream: String,
    #[command(flatten)]
    source: Source,
    /// Output file (JSON lines: sequence, time, subject, id, payload); standard output if unset.
    #[arg(long)]
    out: Option<PathBuf>,
    /// First sequence.
    #[arg(long)]
    from: Option<u64>,
    /// Only messages stored since (RFC 3339 or a duration back from now).
    #[arg(long)]
    since: Option<String>,
    /// Only subjects matching this filter.
    #[arg(long)]
    subject: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    sequence: u64,
    time: chrono::DateTime<chrono::Utc>,
    subject: String,
    id: String,
    payload: Box<serde_json::value::RawValue>,
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.source.url.is_none(), "replay reads the store directly: stop `chorus up` or use --nats");
    let backbone = args.source.backbone().await?;
    let info = backbone.stream_info(&args.stream).await?;
    let start = match (args.from, &args.since) {
        (Some(seq), _) => StartPosition::Sequence(seq),
        (None, Some(s)) => StartPosition::Time(parse_since(s).map_err(anyhow::Error::msg)?),
        _ => StartPosition::First,
    };
    let options = ReplayOptions { start, filter_subjects: args.subject.iter().cloned().collect(), follow: false };
    let mut stream = backbone.replay(&args.stream, options).await?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let bar = if args.out.is_some() { ProgressBar::new(info.messages) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut n = 0u64;
    while let Some(m) = stream.next().await {
        let m = m?;
        let payload = match serde_json::from_slice::<Box<serde_json::value::RawValue>>(&m.payload) {
            Ok(p) => p,
            Err(_) => serde_json::value::to_raw_value(&String::from_utf8_lossy(&m.payload))?,
        };
        serde_json::to_writer(
            &mut out,
            &Line { sequence: m.sequence, time: m.time, subject: m.subject, id: m.id, payload },
        )?;
        out.write_all(b"\n")?;
        n += 1;
        bar.inc(1);
    }
    out.flush()?;
    bar.finish_and_clear();
    if let Some(p) = &args.out {
        eprintln!("{n} events of {} written to {}", args.stream, p.display());
    }
    Ok(())
}

/// `chorus restore`: publishes what `chorus replay` wrote; ids dedupe, so a restore can be
/// repeated or resumed safely (within the stream's dedupe window).
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// A file written by `chorus replay`.
    file: PathBuf,
    #[command(flatten)]
    source: Source,
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let backbone = args.source.backbone().await?;
    chorus_producers::streams::ensure_platform_streams(&*backbone, &Default::default()).await?;
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let total = std::io::BufReader::new(std::fs::File::open(&args.file)?).lines().count() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut batch, mut stored, mut duplicates) = (Vec::new(), 0u64, 0u64);
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line: Line =
            serde_json::from_str(&line?).with_context(|| format!("{} line {}", args.file.display(), i + 1))?;
        let payload = match serde_json::from_str::<String>(line.payload.get()) {
            Ok(text) => text.into_bytes(),
            Err(_) => line.payload.get().as_bytes().to_vec(),
        };
        batch.push(Message::new(line.id, line.subject, payload));
        if batch.len() >= 1000 {
            for a in backbone.publish_batch(std::mem::take(&mut batch)).await? {
                if a.duplicate {
                    duplicates += 1
                } else {
                    stored += 1
                }
            }
            bar.set_position((stored + duplicates).min(total));
        }
    }
    for a in backbone.publish_batch(batch).await? {
        if a.duplicate {
            duplicates += 1
        } else {
            stored += 1
        }
    }
    bar.finish_and_clear();
    eprintln!("{stored} events restored, {duplicates} already present");
    Ok(())
}
