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
    /// Serve `/metrics` (`chorus_agent_*`) and `/healthz` on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
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
    let agent = NodeAgent::start(config, shutdown.clone()).await?;
    let restart = agent.restart_signal();
    let http = crate::args::OpsServer::start(args.listen, std::sync::Arc::new(agent.monitor())).await?;
    services.push(agent);
    eprintln!("chorus agent {identity} running; SIGTERM to stop");
    let restarting = tokio::select! {
        _ = until_shutdown_or_failure(&shutdown, &services) => false,
        _ = restart.notified() => true,
    };
    services.stop().await?;
    http.stop().await?;
    if restarting {
        // Enrolled: the configuration file now holds the node's normal configuration; the
        // same command line starts the agent with it (its shutdown event was recorded).
        eprintln!("chorus agent {identity} enrolled; restarting");
        use std::os::unix::process::CommandExt as _;
        let err = std::process::Command::new(std::env::current_exe()?).args(std::env::args_os().skip(1)).exec();
        return Err(anyhow::anyhow!("restarting after enrolment: {err}"));
    }
    Ok(())
}
