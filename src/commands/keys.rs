//! `chorus keys`: signing keys (Ed25519 or P-256) in a file or on a PKCS#11 token (see
//! docs/SECURITY.md, "Keys").

use std::path::PathBuf;

use anyhow::Context as _;
use chorus_keys::{Algorithm, FileSigner, KeyConfig, Pkcs11Signer, Signer};

/// Subcommands of `chorus keys`.
#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key: a PKCS#8 PEM file (mode 0600, never overwritten) or a key pair on a
    /// PKCS#11 token (private key sensitive, not extractable). Prints its key id and public
    /// key (SPKI PEM), what `chorus credential issue` and trust directories need.
    New {
        #[command(flatten)]
        key: KeyArgs,
        /// Algorithm of the new key: ed25519, or p256 for tokens and smart cards without
        /// Ed25519.
        #[arg(long, default_value = "ed25519")]
        algorithm: Algorithm,
    },
    /// Print the key id, algorithm and public key (SPKI PEM) of an existing key.
    Show(KeyArgs),
}

/// Which key.
#[derive(clap::Args)]
pub struct KeyArgs {
    /// The key: a file, or a PKCS#11 URI such as
    /// `pkcs11:token=chorus;object=node?pin-source=/etc/chorus/pin` (PIN from
    /// CHORUS_PKCS11_PIN when the URI names none).
    #[arg(long)]
    key: String,
    /// Also write the public key (SPKI PEM) to this file.
    #[arg(long)]
    public_out: Option<PathBuf>,
}

/// Runs a `keys` subcommand.
pub fn run(command: KeysCommand) -> anyhow::Result<()> {
    let (args, create) = match &command {
        KeysCommand::New { key, algorithm } => (key, Some(*algorithm)),
        KeysCommand::Show(args) => (args, None),
    };
    let key = KeyConfig::parse(&args.key).context("--key")?;
    let signer: Box<dyn Signer> = match (&key, create) {
        (KeyConfig::KeyFile(path), Some(algorithm)) => Box::new(FileSigner::generate(path, algorithm)?),
        (KeyConfig::Pkcs11(token), Some(algorithm)) => Box::new(Pkcs11Signer::generate(token, algorithm)?),
        (KeyConfig::KeyFile(path), None) => Box::new(FileSigner::load(path)?),
        (KeyConfig::Pkcs11(token), None) => Box::new(Pkcs11Signer::open(token)?),
    };
    let pem = signer.public_key().to_pem();
    if let Some(out) = &args.public_out {
        std::fs::write(out, &pem).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("key id: {} ({})", signer.key_id(), signer.algorithm());
    print!("{pem}");
    Ok(())
}
