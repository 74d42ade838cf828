//! `chorus inventory`: the inventory view (every node the fleet has heard from) on the command
//! line and over HTTP.
//!
//! The view lives in a local store (`--state`) and is brought up to date from
//! `CHORUS_LIFECYCLE` before each query, so `list` and `show` always answer for the whole
//! stream; `serve` follows the stream and serves the JSON API while it does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::Backbone;
use chorus_consumers::dashboard::{Views, ViewsOptions};
use chorus_consumers::inventory::{Inventory, InventoryView, NodeFilter, NodeView, Status, StatusPolicy};
use chorus_consumers::projection::{Projector, Store};
use chorus_platform::{resolve_platform_streams, StreamLimits};
use chorus_runtime::{Services, Shutdown};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chrono::Utc;

use crate::args::StreamArgs;
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus inventory`.
#[derive(clap::Args)]
pub struct InventoryArgs {
    #[command(flatten)]
    streams: StreamArgs,
    /// Directory of the local view store [default: <data>/views].
    #[arg(long, global = true)]
    state: Option<PathBuf>,
    /// Discard the view and rebuild it from the first event of the stream.
    #[arg(long, global = true)]
    rebuild: bool,
    /// A node is missing after this much silence [default: 3 × its alive interval, or 90m
    /// for nodes that advertise none].
    #[arg(long, value_parser = humantime::parse_duration, global = true)]
    missing_after: Option<Duration>,
    /// A node is expired after this much silence.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration, global = true)]
    expire_after: Duration,
    #[command(subcommand)]
    command: InventoryCommand,
}

#[derive(clap::Subcommand)]
enum InventoryCommand {
    /// List nodes, with filters.
    #[command(disable_version_flag = true)]
    List {
        /// Only nodes with this status: alive, missing, shutdown, expired.
        #[arg(long)]
        status: Option<Status>,
        /// Only nodes of this component (server, provision_mode_server, ...).
        #[arg(long)]
        component: Option<String>,
        /// Only nodes running this version.
        #[arg(long)]
        version: Option<String>,
        /// Only identities matching this glob (`*`, `?`).
        #[arg(long)]
        identity: Option<String>,
        /// Print JSON (the same documents as GET /api/nodes).
        #[arg(long)]
        json: bool,
    },
    /// Show one node as JSON.
    Show {
        /// The node's identity.
        identity: String,
    },
    /// Counts by status and versions per component.
    Summary {
        /// Print JSON (the same document as GET /api/summary).
        #[arg(long)]
        json: bool,
    },
    /// Follow the stream and serve the JSON API (GET /api/nodes, /api/nodes/{identity},
    /// /api/summary) until SIGTERM.
    Serve {
        /// Where the API listens.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
}

impl InventoryArgs {
    fn policy(&self) -> StatusPolicy {
        StatusPolicy { missing_after: self.missing_after, expire_after: self.expire_after, ..Default::default() }
    }

    fn state(&self) -> PathBuf {
        self.state.clone().unwrap_or_else(|| self.streams.views_dir())
    }

    /// The projector of the inventory over the chosen backbone, rebuilt first with --rebuild.
    async fn projector(&self, backbone: Arc<dyn Backbone>) -> anyhow::Result<(Store, Projector<InventoryView>)> {
        let state = self.state();
        let store = Store::open(&state).with_context(|| format!("opening view store {}", state.display()))?;
        let found =
            resolve_platform_streams(&*backbone, &StreamLimits::default(), &self.streams.stream_map(), false).await?;
        anyhow::ensure!(
            found.holding(CHORUS_LIFECYCLE).is_some(),
            "no stream holds the lifecycle subjects (choria.lifecycle.>): `chorus streams create` creates {CHORUS_LIFECYCLE}"
        );
        let mut projector = Inventory::projector_on(backbone, &found.streams, &store)?;
        if self.rebuild {
            projector.rebuild()?;
        }
        Ok((store, projector))
    }
}

/// Brings the view up to date, then answers the query (or serves the API).
pub async fn run(args: InventoryArgs) -> anyhow::Result<()> {
    if let InventoryCommand::Serve { listen } = &args.command {
        // A service: started while its broker is down, it reports not ready and connects later.
        let backbone = args.streams.open_for_service().await?;
        return serve(&args, backbone, *listen).await;
    }
    let backbone = args.streams.open().await?;
    let (store, mut projector) = args.projector(backbone).await?;
    let stats = projector.catch_up().await?;
    if stats.dead_lettered > 0 {
        eprintln!("{} malformed events dead-lettered on chorus.deadletter.inventory", stats.dead_lettered);
    }
    let inventory = Inventory::open(&store, args.policy())?;
    let now = Utc::now();
    match &args.command {
        InventoryCommand::List { status, component, version, identity, json } => {
            let filter = NodeFilter {
                status: *status,
                component: component.clone(),
                version: version.clone(),
                identity: identity.clone(),
                limit: None,
            };
            let nodes = inventory.list(&filter, now)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print_nodes(&nodes, now);
            }
        }
        InventoryCommand::Show { identity } => match inventory.get(identity, now)? {
            Some(node) => println!("{}", serde_json::to_string_pretty(&node)?),
            None => anyhow::bail!("node {identity:?} is not in the inventory"),
        },
        InventoryCommand::Summary { json } => {
            let s = inventory.summary(now)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{} nodes (stream sequence {})", s.total, s.checkpoint);
                for st in Status::ALL {
                    println!("  {:<9} {}", st.as_str(), s.status.get(st));
                }
                println!("versions (nodes not expired):");
                for (component, versions) in &s.versions {
                    let list: Vec<String> = versions.iter().map(|(v, n)| format!("{v}: {n}")).collect();
                    println!("  {component:<24} {}", list.join(", "));
                }
            }
        }
        InventoryCommand::Serve { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn ago(now: chrono::DateTime<Utc>, then: chrono::DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    if secs < 0 {
        return "in the future".into();
    }
    let secs = secs as u64;
    let rounded = if secs < 120 {
        secs
    } else if secs < 7200 {
        secs / 60 * 60
    } else {
        secs / 3600 * 3600
    };
    format!("{} ago", humantime::format_duration(Duration::from_secs(rounded)))
}

fn print_nodes(nodes: &[NodeView], now: chrono::DateTime<Utc>) {
    let width = nodes.iter().map(|n| n.node.identity.len()).max().unwrap_or(8).max(8);
    println!(
        "{:<width$}  {:<8}  {:<22}  {:<12}  {:<11}  LAST SEEN",
        "IDENTITY", "STATUS", "COMPONENT", "VERSION", "LAST EVENT"
    );
    for n in nodes {
        println!(
            "{:<width$}  {:<8}  {:<22}  {:<12}  {:<11}  {}",
            n.node.identity,
            n.status.as_str(),
            n.node.component,
            n.node.version.as_deref().unwrap_or("-"),
            n.node.last_event,
            ago(now, n.node.last_seen)
        );
    }
    println!("\n{} nodes", nodes.len());
}

/// Follows the stream and serves the API (the dashboard's, which includes the inventory's
/// JSON routes) until SIGTERM or until the projection fails.
async fn serve(args: &InventoryArgs, backbone: Arc<dyn Backbone>, listen: SocketAddr) -> anyhow::Result<()> {
    let options = ViewsOptions {
        state: args.state(),
        listen,
        rebuild: args.rebuild,
        policy: args.policy(),
        streams: args.streams.stream_map(),
    };
    let views = Views::start(backbone, &options, None, Shutdown::new()).await?;
    eprintln!("inventory API on {}api/summary, /api/nodes, /api/nodes/{{identity}}; SIGTERM to stop", views.url());
    let inventory = views.inventory().clone();
    let mut services = Services::new();
    services.push(views);
    until_signal_or_failure(&services).await;
    services.stop().await?;
    if let Some(p) = inventory.progress() {
        eprintln!("stopped at stream sequence {} ({} events applied)", p.applied_sequence, p.applied);
    }
    Ok(())
}
