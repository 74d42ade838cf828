//! `chorus credential`: issue, show and verify credentials — an issuer's statement that a
//! key speaks for a caller id or a node identity (see docs/SECURITY.md, "Identity").

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chorus_identity::{jws, Credential, CredentialSpec, Issuers, Role};
use chorus_keys::{KeyConfig, PublicKey};

/// Subcommands of `chorus credential`.
#[derive(clap::Subcommand)]
pub enum CredentialCommand {
    /// Issue a client or node credential for a public key, signed by the issuer key.
    Issue(IssueArgs),
    /// Print a credential's header and claims, without checking who signed it.
    Show {
        /// The credential file.
        file: PathBuf,
    },
    /// Check a credential against trusted issuers (exit 1, with the reason, when refused).
    Verify {
        /// The credential file.
        file: PathBuf,
        /// Trusted issuer public keys: files or directories (repeatable).
        #[arg(long, required = true)]
        issuer: Vec<PathBuf>,
        /// The role it must have.
        #[arg(long, value_parser = ["client", "node"])]
        role: Option<String>,
    },
}

/// Arguments of `chorus credential issue`.
#[derive(clap::Args)]
pub struct IssueArgs {
    /// The issuer's key: a file or a PKCS#11 URI (`pkcs11:token=…;object=…`).
    #[arg(long)]
    issuer_key: String,
    /// A client credential for this caller id (`up=alice`, `choria=provisioner`).
    #[arg(long, conflicts_with = "node", required_unless_present = "node")]
    client: Option<String>,
    /// A node credential for this node identity.
    #[arg(long)]
    node: Option<String>,
    /// The holder's public key (SPKI PEM or `<alg>:<base64url>`), a file.
    #[arg(long, conflicts_with = "for_key", required_unless_present = "for_key")]
    public_key: Option<PathBuf>,
    /// Take the public key from the holder's own key (a file or a PKCS#11 URI).
    #[arg(long)]
    for_key: Option<String>,
    /// Client: allowed agent.action patterns, comma-separated (`rpcutil.*,puppet.status`).
    #[arg(long, value_delimiter = ',', default_value = "*")]
    agents: Vec<String>,
    /// Collectives the holder may address or serve in, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    collectives: Vec<String>,
    /// The holder's tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Client: may sign requests on behalf of other callers (the AAA signer).
    #[arg(long)]
    delegator: bool,
    /// How long it is valid.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    validity: Duration,
    /// Write it here (mode 0644) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs a `credential` subcommand.
pub fn run(command: CredentialCommand) -> anyhow::Result<()> {
    match command {
        CredentialCommand::Issue(args) => issue(args),
        CredentialCommand::Show { file } => {
            let credential = Credential::read_file(&file)?;
            let header = jws::parse(credential.token())?.header;
            let shown = serde_json::json!({
                "header": header,
                "claims": credential.claims(),
                "key_id": credential.public_key().key_id(),
                "verified": false,
            });
            println!("{}", serde_json::to_string_pretty(&shown)?);
            eprintln!("(not verified: use `chorus credential verify --issuer …`)");
            Ok(())
        }
        CredentialCommand::Verify { file, issuer, role } => {
            let issuers = Issuers::from_paths(&issuer)?;
            let token = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let unverified = Credential::parse_unverified(&token)?;
            let role = match role.as_deref() {
                Some("client") => Role::Client,
                Some("node") => Role::Node,
                _ => unverified.role(),
            };
            match issuers.verify(&token, role, chrono::Utc::now().timestamp()) {
                Ok(credential) => {
                    let c = credential.claims();
                    println!(
                        "valid {} credential for {:?} (key {}), issued by {}, expires {}",
                        c.purpose.name(),
                        c.sub,
                        c.public_key.key_id(),
                        c.iss,
                        chrono::DateTime::from_timestamp(c.exp, 0).map(|t| t.to_rfc3339()).unwrap_or_default()
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("refused ({}): {e}", e.code());
                    std::process::exit(1);
                }
            }
        }
    }
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let issuer = KeyConfig::parse(&args.issuer_key).context("--issuer-key")?.open().context("--issuer-key")?;
    let public_key = match (&args.public_key, &args.for_key) {
        (Some(file), _) => PublicKey::read_file(file)?,
        (None, Some(key)) => KeyConfig::parse(key)?.open().context("--for-key")?.public_key().clone(),
        (None, None) => anyhow::bail!("give --public-key or --for-key"),
    };
    let mut spec = match (&args.client, &args.node) {
        (Some(callerid), _) => {
            let mut spec = CredentialSpec::client(callerid, public_key, args.validity);
            spec.agents = args.agents.clone();
            spec.delegator = args.delegator;
            spec
        }
        (None, Some(identity)) => {
            anyhow::ensure!(!args.delegator, "--delegator is for client credentials");
            CredentialSpec::node(identity, public_key, args.validity)
        }
        (None, None) => anyhow::bail!("give --client CALLERID or --node IDENTITY"),
    };
    spec.collectives = args.collectives.clone();
    spec.tenant = args.tenant.clone();
    let credential = Credential::issue(issuer.as_ref(), &spec, chrono::Utc::now().timestamp())?;
    match &args.out {
        Some(out) => {
            write_public(out, &format!("{}\n", credential.token()))?;
            eprintln!(
                "wrote {} ({} credential for {:?}, key {})",
                out.display(),
                credential.role(),
                credential.subject(),
                credential.public_key().key_id()
            );
        }
        None => println!("{}", credential.token()),
    }
    Ok(())
}

/// Writes a credential file readable by everyone (mode 0644 whatever the umask): it is
/// public, it only says whom a key speaks for.
fn write_public(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
