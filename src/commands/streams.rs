//! `chorus streams`: operators create, size and adopt the platform streams on purpose.
//! No other command changes an existing stream (see `Backbone::ensure_stream`).

use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::StreamConfig;
use chorus_platform::{capturing, drift, missing_subjects, platform_streams, StreamLimits};

use crate::args::StreamArgs;

#[derive(clap::Subcommand)]
pub enum StreamsCommand {
    /// Create the platform streams that are missing, sized as given. Existing streams
    /// (Chorus's or made by another tool) are adopted as they are; how they differ from
    /// what this would create is listed.
    ///
    /// Example: chorus streams create --nats nats://broker:4222 --replicas 3 --max-age 30d
    Create(CreateArgs),
    /// Show each platform stream: messages, bytes, replicas, limits, and subjects missing.
    Info(InfoArgs),
    /// Change platform streams' replicas, limits or dedupe window: only the settings given
    /// change.
    ///
    /// Example: chorus streams edit CHORUS_AUDIT --nats nats://broker:4222 --max-age 400d
    Edit(EditArgs),
}

/// Sizes a stream can be given.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Sizes {
    /// Copies kept by a JetStream cluster (1, 3 or 5).
    #[arg(long)]
    replicas: Option<usize>,
    /// Remove events older than this (e.g. 30d); `0` keeps them until the size limits.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// Keep at most this many bytes (oldest removed first); 0 = unlimited.
    #[arg(long)]
    max_bytes: Option<u64>,
    /// How long an event id is remembered for dedupe (retries, replicated copies, restores).
    #[arg(long, value_parser = humantime::parse_duration)]
    dedupe_window: Option<Duration>,
}

impl Sizes {
    /// `config` with the sizes given applied.
    fn apply(&self, mut config: StreamConfig) -> StreamConfig {
        if let Some(r) = self.replicas {
            config.replicas = r;
        }
        if let Some(age) = self.max_age {
            config.max_age = (!age.is_zero()).then_some(age);
        }
        if let Some(b) = self.max_bytes {
            config.max_bytes = b;
        }
        if let Some(w) = self.dedupe_window {
            config.dedupe_window = w;
        }
        config
    }

    fn is_empty(&self) -> bool {
        self.replicas.is_none() && self.max_age.is_none() && self.max_bytes.is_none() && self.dedupe_window.is_none()
    }
}

/// Arguments of `chorus streams create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    streams: StreamArgs,
    #[command(flatten)]
    sizes: Sizes,
}

/// Arguments of `chorus streams info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    streams: StreamArgs,
    /// One JSON object per stream instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `chorus streams edit`.
#[derive(clap::Args)]
pub struct EditArgs {
    /// The stream to change (CHORUS_LIFECYCLE, …), or `all` for every platform stream.
    stream: String,
    #[command(flatten)]
    streams: StreamArgs,
    #[command(flatten)]
    sizes: Sizes,
    /// Also add the subjects Chorus stores on that the stream lacks.
    #[arg(long)]
    add_missing_subjects: bool,
}

pub async fn run(command: StreamsCommand) -> anyhow::Result<()> {
    match command {
        StreamsCommand::Create(args) => create(args).await,
        StreamsCommand::Info(args) => info(args).await,
        StreamsCommand::Edit(args) => edit(args).await,
    }
}

/// What the platform streams would be created as: the defaults with `sizes` applied.
fn wanted(sizes: &Sizes) -> Vec<StreamConfig> {
    platform_streams(&StreamLimits::default()).into_iter().map(|c| sizes.apply(c)).collect()
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    let mut existing = backbone.streams().await?;
    for cfg in wanted(&args.sizes) {
        let Some(used) = capturing(&existing, &cfg).cloned() else {
            backbone.ensure_stream(&cfg).await.with_context(|| format!("creating {}", cfg.name))?;
            println!("{}: created ({})", cfg.name, describe(&cfg));
            existing.push(cfg);
            continue;
        };
        let differences = drift(&used, &cfg);
        let whose = if used.name == cfg.name { String::new() } else { format!(" {} holds its subjects:", used.name) };
        if differences.is_empty() {
            println!("{}:{whose} exists, as asked", cfg.name);
        } else {
            println!("{}:{whose} exists, adopted as it is ({})", cfg.name, describe(&used));
            for d in differences {
                println!("  {} {} here, {} asked: `chorus streams edit` changes it", d.field, d.existing, d.chorus);
            }
        }
    }
    Ok(())
}

async fn info(args: InfoArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    if !args.json {
        println!(
            "{:<22} {:>10} {:>12} {:>8} {:>10} {:>12} {:>8}  notes",
            "stream", "messages", "bytes", "replicas", "max age", "max bytes", "dedupe"
        );
    }
    let existing = backbone.streams().await?;
    for wanted in wanted(&Sizes::default()) {
        let name = &wanted.name;
        let Some(config) = capturing(&existing, &wanted).cloned() else {
            match args.json {
                true => println!("{}", serde_json::json!({"stream": name, "exists": false})),
                false => println!("{name:<22} {:>10}  missing: `chorus streams create` creates it", "-"),
            }
            continue;
        };
        let info = backbone.stream_info(&config.name).await?;
        let missing = missing_subjects(&config, &wanted);
        if args.json {
            let line = serde_json::json!({
                "stream": name, "exists": true, "held_by": config.name, "messages": info.messages, "bytes": info.bytes,
                "first_sequence": info.first_sequence, "last_sequence": info.last_sequence,
                "consumers": info.consumers, "config": config, "missing_subjects": missing,
            });
            println!("{line}");
            continue;
        }
        let age = config.max_age.map_or("-".to_string(), |a| humantime::format_duration(a).to_string());
        let bytes = if config.max_bytes == 0 { "-".to_string() } else { config.max_bytes.to_string() };
        let mut notes = if config.name == *name { String::new() } else { format!("held by {} ", config.name) };
        if !missing.is_empty() {
            notes.push_str(&format!("missing subjects {missing:?}"));
        }
        println!(
            "{name:<22} {:>10} {:>12} {:>8} {age:>10} {bytes:>12} {:>8}  {notes}",
            info.messages,
            info.bytes,
            config.replicas,
            humantime::format_duration(config.dedupe_window).to_string(),
        );
    }
    Ok(())
}

async fn edit(args: EditArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.sizes.is_empty() || args.add_missing_subjects,
        "nothing to change: give --replicas, --max-age, --max-bytes, --dedupe-window or --add-missing-subjects"
    );
    let backbone = args.streams.open().await?;
    let all = wanted(&Sizes::default());
    let selected: Vec<&StreamConfig> = all.iter().filter(|c| args.stream == "all" || c.name == args.stream).collect();
    anyhow::ensure!(
        !selected.is_empty(),
        "{} is not a platform stream ({})",
        args.stream,
        all.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    let existing = backbone.streams().await?;
    for wanted in selected {
        let Some(current) = capturing(&existing, wanted).cloned() else {
            anyhow::bail!("{} does not exist: `chorus streams create` creates it", wanted.name)
        };
        let mut changed = args.sizes.apply(current.clone());
        if args.add_missing_subjects {
            changed.subjects.extend(missing_subjects(&current, wanted));
        }
        if changed == current {
            println!("{}: unchanged", wanted.name);
            continue;
        }
        backbone.update_stream(&changed).await.with_context(|| format!("changing {}", current.name))?;
        println!("{}: {} -> {}", current.name, describe(&current), describe(&changed));
    }
    Ok(())
}

fn describe(c: &StreamConfig) -> String {
    format!(
        "replicas {}, max age {}, max bytes {}, dedupe window {}",
        c.replicas,
        c.max_age.map_or("unlimited".into(), |a| humantime::format_duration(a).to_string()),
        if c.max_bytes == 0 { "unlimited".into() } else { c.max_bytes.to_string() },
        humantime::format_duration(c.dedupe_window)
    )
}
