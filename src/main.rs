//! `chorus`: the command that wires the Chorus platform together.

mod bench;
mod cli_aaa;
mod cli_agent;
mod cli_audit_export;
mod cli_broker;
mod cli_events;
mod cli_inventory;
mod cli_provision;
mod cli_security;
mod cli_up;

use clap::{Parser, Subcommand};

/// Chorus: event-sourced fleet automation in the line of Choria.
///
/// Every action in the fleet (a node starting, an autonomous agent changing state, an RPC
/// request and its reply, an authorisation decision) is a CloudEvents 1.0 record on a durable
/// stream. The streams live in NATS JetStream or, with no server at all, in an embedded store.
#[derive(Parser)]
#[command(name = "chorus", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure Chorus against raw async-nats and nats-server, in one run on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a node agent: lifecycle events, outbox, autonomous agents, RPC server.
    Agent(cli_agent::AgentArgs),
    /// Run many simulated nodes in this process (startup storm, alive events).
    Simulate(cli_agent::SimulateArgs),
    /// Make an RPC request to the fleet and summarise the replies.
    Rpc(cli_agent::RpcArgs),
    /// The inventory of nodes, built from the lifecycle stream: list, show, summary, serve.
    Inventory(cli_inventory::InventoryArgs),
    /// Export audit and RPC records to a SIEM (syslog RFC 5424/5425, Splunk HEC, JSON lines).
    AuditExport(cli_audit_export::AuditExportArgs),
    /// Provision nodes that start in provisioning mode: configured RPC steps, once per node.
    Provision(cli_provision::ProvisionArgs),
    /// Copy streams between sites (site → hub, outbox → JetStream) without loss or duplicates.
    Replicate(ReplicateArgs),
    /// Follow events across the streams, with filters (kind, type, node, since).
    #[command(subcommand)]
    Events(cli_events::EventsCommand),
    /// Write a stream out as JSON lines (backups, audits, moving data).
    Replay(cli_events::ReplayArgs),
    /// Publish a file written by `chorus replay` (ids dedupe: safe to repeat).
    Restore(cli_events::RestoreArgs),
    /// Centralised AAA: login to short-lived tokens, request signing, every decision audited.
    Aaa(cli_aaa::AaaArgs),
    /// Broker security: generate nats-server.conf (accounts per tenant, least-privilege users,
    /// TLS) and nftables rules from a broker description.
    #[command(subcommand)]
    Broker(cli_broker::BrokerCommand),
    /// Signing keys for events and RPC requests: in a file or on a PKCS#11 token.
    #[command(subcommand)]
    Security(cli_security::SecurityCommand),
    /// The whole platform in one process: simulated nodes, inventory, audit export, dashboard.
    Up(cli_up::UpArgs),
    /// The inventory projection and the version dashboard over existing streams.
    Dashboard(cli_up::DashboardArgs),
}

#[derive(clap::Args)]
struct ReplicateArgs {
    /// Replicator configuration (YAML): links, streams, sampling, state directory.
    #[arg(long)]
    config: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::Agent(args) => cli_agent::agent(args).await,
            Command::Simulate(args) => cli_agent::simulate(args).await,
            Command::Rpc(args) => cli_agent::rpc(args).await,
            Command::Inventory(args) => cli_inventory::run(args).await,
            Command::AuditExport(args) => cli_audit_export::run(args).await,
            Command::Provision(args) => cli_provision::run(args).await,
            Command::Events(cmd) => cli_events::events(cmd).await,
            Command::Replay(args) => cli_events::replay(args).await,
            Command::Restore(args) => cli_events::restore(args).await,
            Command::Aaa(args) => cli_aaa::run(args).await,
            Command::Broker(cmd) => cli_broker::run(cmd),
            Command::Security(cmd) => cli_security::run(cmd),
            Command::Up(args) => cli_up::up(args).await,
            Command::Dashboard(args) => cli_up::dashboard(args).await,
            Command::Replicate(args) => Ok(chorus_replicator::run_until_signal(&args.config).await?),
        }
    })
}
