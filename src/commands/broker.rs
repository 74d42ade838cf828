//! `chorus broker`: broker security. `config` turns a typed broker description (tenants,
//! collectives, users per component, TLS, JetStream, firewall) into a nats-server
//! configuration and an nftables rule set.

use std::path::PathBuf;

use anyhow::Context as _;
use chorus_broker::{self as broker, BrokerConfig};

/// Subcommands of `chorus broker`.
#[derive(clap::Subcommand)]
pub enum BrokerCommand {
    /// Generate nats-server.conf (one account per tenant, least-privilege users, bcrypt
    /// hashes, TLS) and, with a `firewall` or `client_networks` section, an nftables rule set
    /// (and with `client_networks` the edge server's configuration).
    Config {
        /// Broker description (YAML); see docs/SECURITY.md.
        #[arg(long, short)]
        config: PathBuf,
        /// Where to write the nats-server configuration.
        #[arg(long)]
        out: PathBuf,
        /// Where to write the nftables rules (default: next to --out, `.nft`).
        #[arg(long)]
        nftables: Option<PathBuf>,
        /// With `client_networks`: where to write the edge server's configuration (default:
        /// next to --out, `.edge.conf`). Run it beside the main server.
        #[arg(long)]
        edge_out: Option<PathBuf>,
    },
    /// Print a bcrypt hash (as nats-server reads it) of a password read from standard
    /// input, for `password_hash`.
    HashPassword {
        /// bcrypt cost.
        #[arg(long, default_value_t = broker::DEFAULT_BCRYPT_COST)]
        cost: u32,
    },
}

/// Runs a `broker` subcommand.
pub fn run(command: BrokerCommand) -> anyhow::Result<()> {
    match command {
        BrokerCommand::Config { config, out, nftables, edge_out } => {
            let description = BrokerConfig::load(&config)?;
            let rendered = description.render().map_err(|e| e.in_file(&config))?;
            write_private(&out, &rendered.nats_conf)?;
            eprintln!("wrote {} ({} tenants)", out.display(), description.tenants.len());
            if let Some(rules) = rendered.nftables {
                let path = nftables.unwrap_or_else(|| out.with_extension("nft"));
                write_private(&path, &rules)?;
                eprintln!("wrote {} (load with: nft -f {})", path.display(), path.display());
            }
            if let Some(edge) = rendered.edge_conf {
                let path = edge_out.unwrap_or_else(|| out.with_extension("edge.conf"));
                write_private(&path, &edge)?;
                eprintln!(
                    "wrote {} (the edge server for connections from outside the client networks)",
                    path.display()
                );
            }
            Ok(())
        }
        BrokerCommand::HashPassword { cost } => {
            let password = crate::commands::aaa::read_secret_line()?;
            println!("{}", broker::hash_password(&password, cost)?);
            Ok(())
        }
    }
}

/// Writes `text` readable by the owner only: the file holds password hashes.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
