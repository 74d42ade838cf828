//! `chorus rpc`: a request to the fleet, its replies as they arrive, and a summary.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_aaa::{AaaClient, AaaSigner};
use chorus_backbone::jetstream::NatsConfig;
use chorus_identity::{Identity, Issuers, Role};
use chorus_keys::{Algorithm, FileSigner, KeyConfig, Signer};
use chorus_rpc::{parse_fact_filter, CallerSigner, NatsTransport, RequestOptions, RpcClient, Target};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `chorus rpc`.
#[derive(clap::Args)]
pub struct RpcArgs {
    /// Agent to call, e.g. rpcutil.
    agent: String,
    /// Action, e.g. ping.
    action: String,
    /// Action inputs as key=value (values parsed as JSON when they are JSON).
    inputs: Vec<String>,
    /// NATS server(s), comma-separated.
    #[arg(long, env = "CHORUS_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// The collective (sub-network) to address.
    #[arg(long, default_value = "choria")]
    collective: String,
    /// Caller id the request is made as, on fleets that do not authenticate callers. With
    /// --credential the caller id is the credential's.
    #[arg(long, env = "CHORUS_CALLERID")]
    callerid: Option<String>,
    /// Your key (a file or a PKCS#11 URI): every request is signed with it.
    #[arg(long, env = "CHORUS_KEY", requires = "credential")]
    key: Option<String>,
    /// Your client credential for that key (`chorus credential issue --client`).
    #[arg(long, env = "CHORUS_CREDENTIAL", requires = "key")]
    credential: Option<std::path::PathBuf>,
    /// Trusted issuers (public key files or directories, comma-separated): only replies
    /// signed by the node they claim to come from are counted; the others are shown as
    /// unverified.
    #[arg(long = "issuer", env = "CHORUS_ISSUERS", value_delimiter = ',')]
    issuers: Vec<std::path::PathBuf>,
    /// Discovery filter on facts, e.g. `-F country=uk` (repeatable).
    #[arg(short = 'F', long = "wf")]
    facts: Vec<String>,
    /// Fact and class filters in one (Choria's `-W`): space-separated parts, each a fact
    /// filter when it reads as one (`os.family=debian`), else a class (`apache`).
    #[arg(short = 'W', long = "with")]
    with: Vec<String>,
    /// A compound filter in Choria's expression language (repeatable: all must hold), e.g.
    /// `-S 'with("customer=acme") and (with("/^web/") or fact("cpus") >= 8)'`; checked before
    /// anything is sent.
    #[arg(short = 'S', long = "select")]
    select: Vec<String>,
    /// The agent's description (Choria JSON DDL) when it is not a built-in agent: inputs are
    /// typed, checked and defaulted by it before anything is sent.
    #[arg(long)]
    ddl: Option<std::path::PathBuf>,
    /// Only nodes with this configuration-management class, exact or `/regex/`
    /// (repeatable: all must match).
    #[arg(short = 'C', long = "wc")]
    classes: Vec<String>,
    /// Send to the nodes named in this file, directly: one identity per line (`#` comments,
    /// YAML `- ` items), a JSON list, or the JSON lines of an earlier `chorus rpc --json`
    /// (chaining: the nodes that answered one request receive the next).
    #[arg(long, conflicts_with = "identities")]
    nodes: Option<std::path::PathBuf>,
    /// Only nodes with this agent, exact or `/regex/` (repeatable: all must match).
    #[arg(short = 'A', long = "wa")]
    agents: Vec<String>,
    /// Only these nodes (repeatable). Exact identities are addressed directly; a `/regex/`
    /// is a discovery filter on a broadcast request.
    #[arg(short = 'I', long = "identity")]
    identities: Vec<String>,
    /// Nodes expected to reply (stop waiting once they have; report those that did not).
    #[arg(long)]
    expect: Option<usize>,
    /// How long to wait for replies.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long nodes accept the request after it was made; nodes refuse TTLs above their
    /// maximum (default 5m), and run each request once within it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Print every reply as JSON.
    #[arg(long)]
    json: bool,
    /// Which replies to print: ok, failed, all or none (default: as the action's DDL says,
    /// else failed).
    #[arg(long, value_enum)]
    display: Option<Display>,
    /// Have requests signed by a Chorus AAA service (`chorus aaa`) instead of holding a
    /// credential: its URL, e.g. https://aaa.example.net:8443. Needs a login with --user and
    /// CHORUS_AAA_PASSWORD (with a fresh key for this run), or a token and the key it was
    /// issued for (--token and --aaa-key).
    #[arg(long, env = "CHORUS_AAA_URL", conflicts_with = "credential")]
    aaa: Option<String>,
    /// JWT from the AAA service's /login.
    #[arg(long, env = "CHORUS_AAA_TOKEN", hide_env_values = true, requires = "aaa_key")]
    token: Option<String>,
    /// The key the --token was issued for (a file or a PKCS#11 URI).
    #[arg(long, env = "CHORUS_AAA_KEY")]
    aaa_key: Option<String>,
    /// Log in to the AAA service as this user (password from CHORUS_AAA_PASSWORD).
    #[arg(long)]
    user: Option<String>,
    /// CA certificate of the AAA service's HTTPS listener.
    #[arg(long)]
    aaa_ca: Option<std::path::PathBuf>,
}

/// Makes an RPC request, showing replies as they arrive and a summary at the end.
pub async fn run(args: RpcArgs) -> anyhow::Result<()> {
    let nats = NatsConfig::from_url_list(&args.nats);
    let client = nats.connect(None).await?;
    let transport = Arc::new(NatsTransport::new(client));
    let mut rpc = match (&args.key, &args.credential) {
        (Some(key), Some(credential)) => {
            let key = KeyConfig::parse(key).context("--key")?;
            let identity = Identity::load(&key, credential, Role::Client, None).context("--credential")?;
            let subject = identity.subject().to_string();
            if let Some(callerid) = &args.callerid {
                anyhow::ensure!(*callerid == subject, "--callerid {callerid} is not the credential's caller {subject}");
            }
            RpcClient::new(transport, subject, &args.collective).with_request_signer(Arc::new(CallerSigner(identity)))
        }
        _ => RpcClient::new(transport, args.callerid.as_deref().unwrap_or("choria=cli"), &args.collective),
    };
    if let Some(url) = &args.aaa {
        let aaa = AaaClient::new(url, args.aaa_ca.as_deref())?;
        let (token, key, callerid): (String, Arc<dyn Signer>, Option<String>) = match (&args.token, &args.user) {
            (Some(token), _) => {
                let key = args.aaa_key.as_deref().context("--token needs --aaa-key, the key it was issued for")?;
                let claims = chorus_aaa::Claims::read_unverified(token).context("--token")?;
                (token.clone(), KeyConfig::parse(key)?.open().context("--aaa-key")?, Some(claims.callerid))
            }
            (None, Some(user)) => {
                let password =
                    std::env::var("CHORUS_AAA_PASSWORD").context("--user needs the password in CHORUS_AAA_PASSWORD")?;
                let key: Arc<dyn Signer> = Arc::new(FileSigner::random(Algorithm::Ed25519));
                let grant = aaa.login(user, &password, key.as_ref()).await?;
                (grant.token, key, Some(grant.callerid))
            }
            (None, None) => {
                anyhow::bail!("--aaa needs --user (password in CHORUS_AAA_PASSWORD), or --token and --aaa-key")
            }
        };
        if let Some(callerid) = callerid {
            if let Some(given) = &args.callerid {
                anyhow::ensure!(*given == callerid, "--callerid {given} is not the token's caller {callerid}");
            }
            rpc = RpcClient::new(Arc::new(NatsTransport::new(nats.connect(None).await?)), callerid, &args.collective);
        }
        rpc = rpc.with_request_signer(Arc::new(AaaSigner::new(aaa, token, key)));
    }
    if !args.issuers.is_empty() {
        rpc = rpc.with_trust(Arc::new(Issuers::from_paths(&args.issuers).context("--issuer")?));
    }
    let pairs = args
        .inputs
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').with_context(|| format!("input {kv:?} is not key=value"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ddl = agent_ddl(&args)?;
    let data = inputs(&args, ddl.as_ref(), &pairs)?;
    let mut options = RequestOptions::default();
    for f in &args.facts {
        options.filter.fact.push(parse_fact_filter(f)?);
    }
    options.filter.cf_class = args.classes.clone();
    for expression in &args.select {
        let mut entry = serde_json::Map::new();
        entry.insert("expr".into(), expression.clone().into());
        options.filter.compound.push(vec![entry]);
    }
    for combined in &args.with {
        add_combined(&mut options.filter, combined)?;
    }
    options.filter.agent = args.agents.clone();
    let is_regex = |i: &String| i.len() >= 2 && i.starts_with('/') && i.ends_with('/');
    let named = match &args.nodes {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let nodes = read_nodes(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            anyhow::ensure!(!nodes.is_empty(), "{} names no node; nothing was sent", path.display());
            nodes
        }
        None => args.identities.clone(),
    };
    let (patterns, exact): (Vec<String>, Vec<String>) = named.into_iter().partition(is_regex);
    if !patterns.is_empty() {
        // Any identity may match: the exact ones join the patterns in the filter.
        options.filter.identity = patterns.into_iter().chain(exact).collect();
        options.target = Target::Broadcast;
        options.expected = args.expect;
    } else {
        options.target = match exact.len() {
            0 => Target::Broadcast,
            1 => Target::Node(exact[0].clone()),
            _ => Target::Nodes(exact.clone()),
        };
        options.expected = args.expect.or(if exact.is_empty() { None } else { Some(exact.len()) });
    }
    options.timeout = args.timeout;
    options.ttl = args.ttl.as_secs().max(1);
    let bar = match options.expected {
        Some(n) => ProgressBar::new(n as u64),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} replies {wide_bar} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut stream = rpc.request(&args.agent, &args.action, data, options).await?;
    let display = args.display.unwrap_or_else(|| Display::of_action(ddl.as_ref(), &args.action));
    let mut shown = Vec::new();
    while let Some(reply) = stream.next().await {
        bar.inc(1);
        let ok = reply.statuscode as u8 == 0 && reply.authorized;
        if args.json {
            bar.suspend(|| println!("{}", serde_json::to_string(&reply).unwrap_or_default()));
        } else if display.shows(ok) {
            shown.push(if ok {
                format!("{:<40} {}", reply.identity, serde_json::Value::Object(reply.data.clone()))
            } else {
                format!("{:<40} {}", reply.identity, reply.statusmsg)
            });
        }
    }
    bar.finish_and_clear();
    for line in &shown {
        println!("{line}");
    }
    for rejected in stream.rejected() {
        println!("{:<40} UNVERIFIED: {}", rejected.identity, rejected.reason);
    }
    let s = stream.summary();
    println!(
        "\n{} replies: {} ok, {} denied, {} failed{}{} in {:.2?} (request {})",
        s.replies,
        s.ok,
        s.denied,
        s.failed,
        if s.unverified > 0 { format!(", {} unverified", s.unverified) } else { String::new() },
        s.no_response.map(|n| format!(", {n} did not respond")).unwrap_or_default(),
        s.elapsed,
        s.requestid
    );
    if s.ok < s.replies || s.unverified > 0 || s.no_response.unwrap_or(0) > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Which replies `chorus rpc` prints (Choria's `--display`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Display {
    /// Replies with status OK.
    Ok,
    /// Replies with another status, or denied.
    Failed,
    /// Every reply.
    All,
    /// None: the summary only.
    None,
}

impl Display {
    /// What the action's DDL asks for (`ok`, `failed`, `always`); `failed` without one.
    fn of_action(ddl: Option<&chorus_rpc::ddl::Ddl>, action: &str) -> Self {
        match ddl.and_then(|d| d.action(action)).and_then(|a| a.display.as_deref()) {
            Some("ok") => Display::Ok,
            Some("always") => Display::All,
            _ => Display::Failed,
        }
    }

    fn shows(self, ok: bool) -> bool {
        match self {
            Display::Ok => ok,
            Display::Failed => !ok,
            Display::All => true,
            Display::None => false,
        }
    }
}

/// The agent's description: `--ddl`, else the built-in one, else none.
fn agent_ddl(args: &RpcArgs) -> anyhow::Result<Option<chorus_rpc::ddl::Ddl>> {
    match &args.ddl {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(chorus_rpc::ddl::Ddl::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?))
        }
        None => Ok(chorus_rpc::agents::builtin_ddl(&args.agent).cloned()),
    }
}

/// The request's inputs from `key=value` pairs: typed, checked and defaulted by the agent's
/// DDL, as Choria's client does; without one, values that read as JSON are sent as JSON,
/// with a warning that nothing checked them.
fn inputs(
    args: &RpcArgs,
    ddl: Option<&chorus_rpc::ddl::Ddl>,
    pairs: &[(String, String)],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let Some(ddl) = ddl else {
        eprintln!("no DDL for agent {}: inputs are sent unchecked (give one with --ddl)", args.agent);
        return Ok(pairs
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.clone()))))
            .collect());
    };
    let action = ddl.action(&args.action).with_context(|| format!("unknown action {}#{}", args.agent, args.action))?;
    action.inputs_from_text(pairs).map_err(|e| anyhow::anyhow!("invalid input: {e}; nothing was sent"))
}

/// The node identities in a nodes file (see `--nodes`), in order, each once.
fn read_nodes(text: &str) -> anyhow::Result<Vec<String>> {
    let mut nodes: Vec<String> = Vec::new();
    let mut add = |identity: &str| -> anyhow::Result<()> {
        anyhow::ensure!(
            !identity.is_empty() && !identity.contains(char::is_whitespace),
            "{identity:?} is not a node identity"
        );
        if !nodes.iter().any(|n| n == identity) {
            nodes.push(identity.to_string());
        }
        Ok(())
    };
    if let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(text) {
        for item in items {
            add(item.as_str().context("a JSON nodes list holds identity strings")?)?;
        }
    } else {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.starts_with('{') {
                let reply: serde_json::Value = serde_json::from_str(line).context("a JSON line that is not JSON")?;
                let identity = reply.get("identity").or_else(|| reply.get("sender")).and_then(|v| v.as_str());
                add(identity.context("a JSON line without an identity")?)?;
            } else {
                add(line.strip_prefix("- ").unwrap_or(line).trim())?;
            }
        }
    }
    Ok(nodes)
}

/// Adds a combined filter (`-W`): space-separated parts, each a fact filter when it reads as
/// one, else a class, as Choria splits them. A part that starts or ends with an operator is
/// a fact filter written with spaces (`os.family = debian`), which Choria would take as
/// three classes matching nothing: refused.
fn add_combined(filter: &mut chorus_schemas::rpc::Filter, combined: &str) -> anyhow::Result<()> {
    let operator = |c: char| matches!(c, '=' | '<' | '>' | '!' | '~');
    for part in combined.split(' ').filter(|p| !p.is_empty()) {
        anyhow::ensure!(
            !part.starts_with(operator) && !part.ends_with(operator),
            "-W {combined:?}: {part:?} belongs to a fact filter written with spaces; write it without them"
        );
        match parse_fact_filter(part) {
            Ok(fact) => filter.fact.push(fact),
            Err(_) => filter.cf_class.push(part.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::add_combined;

    #[test]
    fn nodes_files_of_every_form_give_their_identities() {
        let read = |text: &str| super::read_nodes(text).unwrap();
        assert_eq!(
            read("# web\nweb1.example.net\n\nweb2.example.net\nweb1.example.net\n"),
            ["web1.example.net", "web2.example.net"]
        );
        assert_eq!(read("- a.example.net\n- b.example.net\n"), ["a.example.net", "b.example.net"]);
        assert_eq!(read(r#"["a", "b"]"#), ["a", "b"]);
        let chained = r#"{"identity":"n1","statuscode":0,"data":{}}
{"identity":"n2","statuscode":1,"data":{}}"#;
        assert_eq!(read(chained), ["n1", "n2"]);
        assert!(super::read_nodes("web1 web2").is_err(), "two names on one line");
        assert!(super::read_nodes(r#"{"statuscode":0}"#).is_err());
    }

    #[test]
    fn combined_filters_split_into_facts_and_classes() {
        let mut filter = chorus_schemas::rpc::Filter::default();
        add_combined(&mut filter, "apache  os.family=debian /^web/ cpus>=4").unwrap();
        assert_eq!(filter.cf_class, ["apache", "/^web/"]);
        let facts: Vec<(&str, &str, &str)> =
            filter.fact.iter().map(|f| (f.fact.as_str(), f.operator.as_str(), f.value.as_str())).collect();
        assert_eq!(facts, [("os.family", "==", "debian"), ("cpus", ">=", "4")]);
        let error = add_combined(&mut filter, "os.family = debian").unwrap_err().to_string();
        assert!(error.contains("written with spaces"), "{error}");
    }
}
