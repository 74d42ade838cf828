//! `chorus kv`: key-value buckets on the streams' backbone (JetStream KV on NATS, the same
//! buckets `nats kv` shows; the embedded store otherwise).

use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::{BucketConfig, KvEntry, KvOperation};
use futures::StreamExt;

use crate::args::StreamArgs;

#[derive(clap::Subcommand)]
pub enum KvCommand {
    /// Create a bucket (an existing one is left as it is).
    Add {
        /// Bucket name.
        bucket: String,
        /// Values kept per key.
        #[arg(long, default_value_t = 1)]
        history: u8,
        /// Values expire this long after they were written (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Copies kept by a JetStream cluster.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Write a value.
    Put { bucket: String, key: String, value: String },
    /// Write a value only when the key has none.
    Create { bucket: String, key: String, value: String },
    /// Write a value only when the key is at REVISION.
    Update { bucket: String, key: String, value: String, revision: u64 },
    /// Print a key's value.
    Get {
        bucket: String,
        key: String,
        /// Print revision and time too.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Delete a key's value.
    Del { bucket: String, key: String },
    /// A key's kept values, oldest first.
    History { bucket: String, key: String },
    /// The keys that have a value.
    Ls { bucket: String },
    /// Print changes of keys matching PATTERN (default all) as they happen, current values first.
    Watch {
        bucket: String,
        #[arg(default_value = ">")]
        pattern: String,
    },
}

/// Arguments of `chorus kv`.
#[derive(clap::Args)]
pub struct KvArgs {
    #[command(subcommand)]
    command: KvCommand,
    #[command(flatten)]
    streams: StreamArgs,
}

fn line(e: &KvEntry) -> String {
    let value = match e.operation {
        KvOperation::Put => String::from_utf8_lossy(&e.value).into_owned(),
        KvOperation::Delete => "(deleted)".into(),
    };
    format!("{} rev={} {} {value}", e.key, e.revision, e.created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    let open = |name: &str| {
        let backbone = backbone.clone();
        let config = BucketConfig::new(name);
        async move { backbone.bucket(&config).await.with_context(|| format!("bucket {}", config.name)) }
    };
    match args.command {
        KvCommand::Add { bucket, history, ttl, replicas } => {
            let config = BucketConfig { name: bucket, history, ttl, replicas };
            backbone.bucket(&config).await?;
            println!("bucket {} ready", config.name);
        }
        KvCommand::Put { bucket, key, value } => println!("{}", open(&bucket).await?.put(&key, value.into()).await?),
        KvCommand::Create { bucket, key, value } => {
            println!("{}", open(&bucket).await?.create(&key, value.into()).await?)
        }
        KvCommand::Update { bucket, key, value, revision } => {
            println!("{}", open(&bucket).await?.update(&key, value.into(), revision).await?)
        }
        KvCommand::Get { bucket, key, verbose } => match open(&bucket).await?.get(&key).await? {
            Some(e) if verbose => println!("{}", line(&e)),
            Some(e) => println!("{}", String::from_utf8_lossy(&e.value)),
            None => anyhow::bail!("{key}: no value"),
        },
        KvCommand::Del { bucket, key } => open(&bucket).await?.delete(&key, None).await?,
        KvCommand::History { bucket, key } => {
            for e in open(&bucket).await?.history(&key).await? {
                println!("{}", line(&e));
            }
        }
        KvCommand::Ls { bucket } => {
            for k in open(&bucket).await?.keys().await? {
                println!("{k}");
            }
        }
        KvCommand::Watch { bucket, pattern } => {
            let mut watch = open(&bucket).await?.watch(&pattern).await?;
            loop {
                tokio::select! {
                    e = watch.next() => match e {
                        Some(e) => println!("{}", line(&e?)),
                        None => break,
                    },
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
    }
    Ok(())
}
