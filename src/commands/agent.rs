//! `chorus agent`: a node agent until SIGTERM.

use std::path::PathBuf;

use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_runtime::{Services, Shutdown};

use crate::signal::until_signal_or_failure;

/// Arguments of `chorus agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// Agent configuration file (YAML): identity, state_dir, nats, machines_dir, policy_dir, …
    #[arg(long, short)]
    config: PathBuf,
}

/// Runs a node agent until SIGTERM, then records the shutdown event and drains the outbox.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig::load(&args.config)?;
    let identity = config.identity.clone();
    let mut services = Services::new();
    services.push(NodeAgent::start(config, Shutdown::new()).await?);
    eprintln!("chorus agent {identity} running; SIGTERM to stop");
    until_signal_or_failure(&services).await;
    services.stop().await?;
    Ok(())
}
