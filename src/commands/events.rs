//! `chorus events tail`: following the streams as an operator does.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::Backbone;
use chorus_consumers::events::{one_line, parse_since, tail, EventFilter};
use futures::StreamExt;

use crate::args::StreamArgs;
use crate::signal::request_on_signal;

/// Where the streams are: a running `chorus up` or dashboard (`--url`), NATS, or an embedded
/// store no other process holds.
#[derive(clap::Args, Clone)]
pub struct Source {
    /// A running `chorus up` / `chorus dashboard` (its embedded store is locked by it).
    #[arg(long)]
    pub url: Option<String>,
    #[command(flatten)]
    pub streams: StreamArgs,
}

impl Source {
    /// The backbone, with a hint when the embedded store is held by a running `chorus up`.
    pub async fn backbone(&self) -> anyhow::Result<Arc<dyn Backbone>> {
        self.streams
            .open()
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

/// Arguments of `chorus events tail`.
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

/// Runs an `events` subcommand.
pub async fn run(cmd: EventsCommand) -> anyhow::Result<()> {
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
    let stop = chorus_runtime::Shutdown::new();
    request_on_signal(&stop);
    while let Some(item) = tokio::select! { item = stream.next() => item, _ = stop.requested() => None } {
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
