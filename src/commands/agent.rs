//! `chorus agent`: a node agent until SIGTERM.

use std::path::PathBuf;

use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_runtime::{Services, Shutdown};

use crate::signal::{request_on_signal, until_shutdown_or_failure};

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
    // Handled from here on: a SIGTERM while the agent starts (its broker down) still stops
    // it with its shutdown event kept in the outbox.
    let shutdown = Shutdown::new();
    request_on_signal(&shutdown);
    let mut services = Services::new();
    services.push(NodeAgent::start(config, shutdown.clone()).await?);
    eprintln!("chorus agent {identity} running; SIGTERM to stop");
    until_shutdown_or_failure(&shutdown, &services).await;
    services.stop().await?;
    Ok(())
}
