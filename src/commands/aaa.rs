//! `chorus aaa`: the centralised AAA service (login → token, request signer, audited
//! decisions), and its helpers `hash-password` and `keygen`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chorus_aaa::AaaConfig;
use chorus_keys::{Algorithm, FileSigner, Signer as _};
use chorus_runtime::{Services, Shutdown};

use crate::signal::until_signal_or_failure;

/// Arguments of `chorus aaa`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AaaArgs {
    /// Service configuration (YAML): identity, site, listen, tls, users_file, tenants, jwt,
    /// signer, audit; see docs/SECURITY.md.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen here (`ip:port`) instead of the configuration's `listen`: the API, `/metrics`
    /// (`chorus_aaa_*`, `chorus_outbox_*`) and `/healthz` share the listener.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<AaaCommand>,
}

#[derive(clap::Subcommand)]
enum AaaCommand {
    /// Print an argon2id hash of a password read from standard input (one line), for the
    /// users file's `password_hash`.
    HashPassword,
    /// Create a new key (PKCS#8 PEM, mode 0600) for `jwt.key` or `signer.key`, and print its
    /// key id and public key.
    Keygen {
        /// Where to write the private key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
        /// ed25519, or p256.
        #[arg(long, default_value = "ed25519")]
        algorithm: Algorithm,
    },
}

/// Runs the service, or one of its helpers.
pub async fn run(args: AaaArgs) -> anyhow::Result<()> {
    match (args.command, args.config) {
        (Some(AaaCommand::HashPassword), _) => {
            let password = read_secret_line()?;
            println!("{}", chorus_aaa::hash_password(&password)?);
            Ok(())
        }
        (Some(AaaCommand::Keygen { out, algorithm }), _) => {
            let key = FileSigner::generate(&out, algorithm).with_context(|| format!("creating {}", out.display()))?;
            eprintln!("wrote {} (key id {})", out.display(), key.key_id());
            print!("{}", key.public_key().to_pem());
            Ok(())
        }
        (None, Some(config)) => serve(config, args.listen).await,
        (None, None) => anyhow::bail!("chorus aaa needs --config FILE (or a subcommand: hash-password, keygen)"),
    }
}

async fn serve(path: PathBuf, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let mut config = AaaConfig::load(&path)?;
    if let Some(listen) = listen {
        config.listen = listen.to_string();
    }
    let running = chorus_aaa::start(&config, Shutdown::new(), Duration::from_secs(10)).await?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    eprintln!(
        "chorus aaa {} ({}) on {scheme}://{}: POST /login, POST /sign, GET /keys; SIGTERM to stop",
        config.identity, config.site, running.addr
    );
    let mut services = Services::new();
    services.push(running);
    until_signal_or_failure(&services).await;
    services.stop().await?;
    Ok(())
}

/// One line from standard input without its line ending; refuses an empty one.
pub fn read_secret_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!password.is_empty(), "empty password (give it on standard input)");
    Ok(password)
}
