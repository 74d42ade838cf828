//! `chorus`: the command that wires the Chorus platform together.
//!
//! Every command is a module of [`commands`]; argument groups shared by several commands
//! are in [`args`]; signals are handled in [`signal`] and nowhere else.

mod args;
mod commands;
mod signal;

use clap::{CommandFactory, Parser, Subcommand};

use commands::*;

/// Chorus: event-sourced fleet automation in the line of Choria.
///
/// Every action in the fleet (a node starting, an autonomous agent changing state, an RPC
/// request and its reply, an authorisation decision) is a CloudEvents 1.0 record on a durable
/// stream. The streams live in NATS JetStream or, with no server at all, in an embedded store.
#[derive(Parser)]
#[command(
    name = "chorus",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CHORUS_COMMIT"), ")"),
    about,
    long_about = None,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure Chorus against raw async-nats and nats-server, in one run on this machine
    /// (runs `chorus-bench`).
    Bench(bench::BenchArgs),
    /// Run a node agent: lifecycle events, outbox, autonomous agents, RPC server.
    Agent(agent::AgentArgs),
    /// Run many simulated nodes in this process (startup storm, alive events).
    Simulate(simulate::SimulateArgs),
    /// Make an RPC request to the fleet and summarise the replies.
    Rpc(Box<rpc::RpcArgs>),
    /// List the nodes a filter selects (broadcast, inventory, a nodes file or an external
    /// command).
    Discover(Box<discover::DiscoverArgs>),
    /// Show the values of one fact across the selected nodes, with how many have each.
    Facts(Box<discover::FactsArgs>),
    /// The inventory of nodes, built from the lifecycle stream: list, show, summary, serve.
    Inventory(inventory::InventoryArgs),
    /// Export audit and RPC records to a SIEM (syslog RFC 5424/5425, Splunk HEC, JSON lines).
    AuditExport(audit_export::AuditExportArgs),
    /// Provision nodes that start in provisioning mode: configured RPC steps, once per node.
    Provision(provision::ProvisionArgs),
    /// React to events: rules over the streams that run RPC requests, webhooks, commands or
    /// publish events, exactly once per (rule, event).
    React(react::ReactArgs),
    /// Copy streams between sites (site → hub, outbox → JetStream) without loss or duplicates.
    Replicate(replicate::ReplicateArgs),
    /// Follow events across the streams, with filters (kind, type, node, since).
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// The platform streams on a broker: create and size them, adopt existing ones, show,
    /// change. No other command changes an existing stream.
    #[command(subcommand)]
    Streams(streams::StreamsCommand),
    /// Scout checks on the nodes: status, trigger, maintenance, resume (Choria's `choria scout`).
    Scout(scout::ScoutArgs),
    /// Key-value buckets: put, get, create, update, history, watch (JetStream KV on NATS).
    Kv(kv::KvArgs),
    /// Governors: fleet-wide semaphores with expiring leases (`run NAME -- COMMAND`).
    Governor(governor::GovernorArgs),
    /// Write a stream out as JSON lines (backups, audits, moving data).
    Replay(backup::ReplayArgs),
    /// Publish a file written by `chorus replay` (ids dedupe: safe to repeat).
    Restore(backup::RestoreArgs),
    /// Centralised AAA: login to short-lived tokens, request signing, every decision audited.
    Aaa(aaa::AaaArgs),
    /// Broker security: generate nats-server.conf (accounts per tenant, least-privilege users,
    /// TLS) and nftables rules from a broker description.
    #[command(subcommand)]
    Broker(broker::BrokerCommand),
    /// Keys (Ed25519 or P-256) in a file or on a PKCS#11 token: create one, show one.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Credentials binding a key to a caller id or a node identity: issue, show, verify.
    #[command(subcommand)]
    Credential(credential::CredentialCommand),
    /// Agents' descriptions (DDL): list the agents, or document one.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// The whole platform in one process: simulated nodes, inventory, audit export, dashboard.
    Up(up::UpArgs),
    /// The inventory projection and the version dashboard over existing streams.
    Dashboard(dashboard::DashboardArgs),
    /// Print the shell completion script for a shell (`chorus completions bash`).
    Completions(manual::CompletionsArgs),
    /// Write the man pages of every command into a directory.
    Man(manual::ManArgs),
    /// Configuration files: check one, print its JSON Schema, or the whole reference.
    #[command(subcommand)]
    Config(config::ConfigCommand),
}

/// mimalloc rather than glibc's allocator: profiles of RPC (`chorus bench rpc`) spent about
/// 40% of the CPU of a reply in malloc and free; with mimalloc a reply costs 37% less CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    chorus_runtime::logging::init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Bench(args) => bench::run(args),
            Command::Agent(args) => agent::run(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Rpc(args) => rpc::run(*args).await,
            Command::Discover(args) => discover::discover(*args).await,
            Command::Facts(args) => discover::facts(*args).await,
            Command::Inventory(args) => inventory::run(args).await,
            Command::AuditExport(args) => audit_export::run(args).await,
            Command::Provision(args) => provision::run(args).await,
            Command::React(args) => react::run(args).await,
            Command::Replicate(args) => replicate::run(args).await,
            Command::Events(cmd) => events::run(cmd).await,
            Command::Streams(cmd) => streams::run(cmd).await,
            Command::Kv(args) => kv::run(args).await,
            Command::Scout(args) => scout::run(args).await,
            Command::Governor(args) => governor::run(args).await,
            Command::Replay(args) => backup::replay(args).await,
            Command::Restore(args) => backup::restore(args).await,
            Command::Aaa(args) => aaa::run(args).await,
            Command::Broker(cmd) => broker::run(cmd),
            Command::Keys(cmd) => keys::run(cmd),
            Command::Credential(cmd) => credential::run(cmd),
            Command::Plugin(cmd) => plugin::run(cmd),
            Command::Up(args) => up::run(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Completions(args) => manual::completions(args, Cli::command()),
            Command::Man(args) => manual::man(args, Cli::command()),
            Command::Config(cmd) => config::run(cmd),
        }
    })
}
