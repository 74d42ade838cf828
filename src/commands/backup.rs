//! `chorus replay` and `chorus restore`: a stream to a JSON lines file and back, byte for
//! byte (format: `chorus_backbone::backup`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use chorus_backbone::backup::{read_lines, write_line};
use chorus_backbone::{ReplayOptions, StartPosition};
use chorus_consumers::events::parse_since;
use chorus_platform::ensure_platform_streams;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use super::events::Source;

/// Arguments of `chorus replay`: a stream written out as JSON lines, for backups, audits and
/// moving data.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// Stream to read (CHORUS_LIFECYCLE, CHORUS_MACHINE, CHORUS_RPC, CHORUS_AUDIT, CHORUS_DEADLETTER).
    stream: String,
    #[command(flatten)]
    source: Source,
    /// Output file (JSON lines: sequence, time, subject, id, headers, payload or payload_base64);
    /// standard output if unset.
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

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Writes the stream out.
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
    let bar = if args.out.is_some() { progress_bar(info.messages) } else { ProgressBar::hidden() };
    let mut n = 0u64;
    while let Some(m) = stream.next().await {
        write_line(&mut out, &m?)?;
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

/// Arguments of `chorus restore`: publishes what `chorus replay` wrote; ids dedupe, so a
/// restore can be repeated or resumed safely (within the stream's dedupe window).
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// A file written by `chorus replay`.
    file: PathBuf,
    #[command(flatten)]
    source: Source,
}

/// Publishes the file's messages in order, 1,000 per batch.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let backbone = args.source.backbone().await?;
    ensure_platform_streams(&*backbone, &Default::default()).await?;
    let open = || std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()));
    let total = read_lines(std::io::BufReader::new(open()?)).count() as u64;
    let bar = progress_bar(total);
    let (mut batch, mut stored, mut duplicates) = (Vec::new(), 0u64, 0u64);
    let mut lines = read_lines(std::io::BufReader::new(open()?)).peekable();
    while let Some(line) = lines.next() {
        let line = line.with_context(|| args.file.display().to_string())?;
        batch.push(line.to_message().map_err(anyhow::Error::msg)?);
        if batch.len() >= 1000 || lines.peek().is_none() {
            for a in backbone.publish_batch(std::mem::take(&mut batch)).await? {
                if a.duplicate {
                    duplicates += 1
                } else {
                    stored += 1
                }
            }
            bar.set_position(stored + duplicates);
        }
    }
    bar.finish_and_clear();
    eprintln!("{stored} events restored, {duplicates} already present");
    Ok(())
}
