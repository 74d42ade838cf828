//! `chorus governor`: fleet-wide semaphores with expiring leases, as Choria's governor.

use std::time::Duration;

use anyhow::Context as _;
use chorus_platform::governor::{Governor, GovernorSpec};
use chorus_runtime::Shutdown;

use crate::args::StreamArgs;

#[derive(clap::Subcommand)]
pub enum GovernorCommand {
    /// Define a governor: at most CAPACITY leases at once, each expiring unless renewed.
    ///
    /// Example: chorus governor add upgrades 10 --expires 5m
    Add {
        name: String,
        capacity: u32,
        /// A lease not renewed for this long is gone (its holder died).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        expires: Duration,
    },
    /// List the governors, with the leases held now.
    List,
    /// Run a command under a lease: wait for a free one, run, release.
    ///
    /// Example: chorus governor run upgrades -- apt-get -y upgrade
    Run {
        name: String,
        /// Give up after waiting this long for a lease (exit status 1).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        max_wait: Duration,
        /// Who holds the lease, as listed [default: host:pid].
        #[arg(long)]
        holder: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
}

/// Arguments of `chorus governor`.
#[derive(clap::Args)]
pub struct GovernorArgs {
    #[command(subcommand)]
    command: GovernorCommand,
    #[command(flatten)]
    streams: StreamArgs,
}

pub async fn run(args: GovernorArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    match args.command {
        GovernorCommand::Add { name, capacity, expires } => {
            Governor::add(&*backbone, &name, GovernorSpec { capacity, expires }).await?;
            println!(
                "governor {name}: capacity {capacity}, leases expire after {}",
                humantime::format_duration(expires)
            );
        }
        GovernorCommand::List => {
            for (name, spec) in Governor::list(&*backbone).await? {
                let held = Governor::open(&*backbone, &name).await?.holders().await?;
                println!(
                    "{name}: capacity {}, expires {}, {} held",
                    spec.capacity,
                    humantime::format_duration(spec.expires),
                    held.len()
                );
                for (slot, h) in held {
                    println!("  slot {slot}: {} since {}", h.holder, h.since);
                }
            }
        }
        GovernorCommand::Run { name, max_wait, holder, command } => {
            let governor = Governor::open(&*backbone, &name).await?;
            let holder = holder.unwrap_or_else(chorus_platform::election::default_candidate);
            let shutdown = Shutdown::new();
            let Some(mut lease) = governor.claim(&holder, max_wait, &shutdown).await? else {
                eprintln!("governor {name}: no lease within {}", humantime::format_duration(max_wait));
                std::process::exit(1);
            };
            let mut child = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .env("CHORUS_GOVERNOR", &name)
                .env("CHORUS_GOVERNOR_SLOT", lease.slot().to_string())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("running {}", command[0]))?;
            let status = tokio::select! {
                s = child.wait() => s?,
                _ = lease.lost() => {
                    // Another claimant may hold the slot now: stop rather than exceed the capacity.
                    eprintln!("governor {name}: the lease was lost; stopping {}", command[0]);
                    child.kill().await.ok();
                    lease.release().await?;
                    std::process::exit(3);
                }
            };
            lease.release().await?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}
