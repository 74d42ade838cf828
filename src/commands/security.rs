//! `chorus security`: Ed25519 signing keys in a file or on a PKCS#11 token (see
//! docs/SECURITY.md, "Signatures and PKCS#11").

use std::path::PathBuf;

use anyhow::Context as _;
use chorus_keys::{public_key_pem, Ed25519FileSigner, Pkcs11Config, Pkcs11Signer, Signer};

/// Subcommands of `chorus security`.
#[derive(clap::Subcommand)]
pub enum SecurityCommand {
    /// Create a signing key: a PKCS#8 PEM file (mode 0600, never overwritten) or a key pair
    /// on a PKCS#11 token (private key sensitive, not extractable). Prints the key id and
    /// the public key (SPKI PEM) for verifiers' trust directories.
    Keygen(KeyArgs),
    /// Print the key id and public key (SPKI PEM) of an existing signing key.
    Pubkey(KeyArgs),
}

/// Where the key is: `--file`, or a token (`--key-label` with the token options).
#[derive(clap::Args)]
pub struct KeyArgs {
    /// The key file (PKCS#8 PEM).
    #[arg(long, conflicts_with = "key_label")]
    file: Option<PathBuf>,
    /// `CKA_LABEL` of the key pair on the PKCS#11 token.
    #[arg(long, required_unless_present = "file")]
    key_label: Option<String>,
    /// PKCS#11 module of the token.
    #[arg(long, default_value = chorus_keys::DEFAULT_PKCS11_MODULE)]
    module: PathBuf,
    /// Label of the token.
    #[arg(long)]
    token_label: Option<String>,
    /// Slot id of the token (instead of --token-label).
    #[arg(long, conflicts_with = "token_label")]
    slot: Option<u64>,
    /// File holding the user PIN.
    #[arg(long)]
    pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[arg(long, default_value = "CHORUS_PKCS11_PIN")]
    pin_env: String,
    /// Also write the public key (SPKI PEM) to this file.
    #[arg(long)]
    public_out: Option<PathBuf>,
}

impl KeyArgs {
    fn pkcs11(&self, key_label: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: self.module.clone(),
            slot: self.slot,
            token_label: self.token_label.clone(),
            pin: None,
            pin_file: self.pin_file.clone(),
            pin_env: self.pin_file.is_none().then(|| self.pin_env.clone()),
            key_label: key_label.to_owned(),
        }
    }
}

/// Runs a `security` subcommand.
pub fn run(command: SecurityCommand) -> anyhow::Result<()> {
    let (args, generate) = match &command {
        SecurityCommand::Keygen(args) => (args, true),
        SecurityCommand::Pubkey(args) => (args, false),
    };
    let signer: Box<dyn Signer> = match (&args.file, &args.key_label) {
        (Some(file), _) if generate => Box::new(Ed25519FileSigner::generate(file)?),
        (Some(file), _) => Box::new(Ed25519FileSigner::load(file)?),
        (None, Some(label)) if generate => Box::new(Pkcs11Signer::generate(&args.pkcs11(label))?),
        (None, Some(label)) => Box::new(Pkcs11Signer::open(&args.pkcs11(label))?),
        (None, None) => anyhow::bail!("give --file or --key-label"),
    };
    let pem = public_key_pem(&signer.public_key());
    if let Some(out) = &args.public_out {
        std::fs::write(out, &pem).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("key id: {}", signer.key_id());
    print!("{pem}");
    Ok(())
}
