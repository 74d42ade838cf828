//! `chorus rpc`: a request to the fleet, its replies as they arrive, and a summary.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_aaa::{AaaClient, AaaSigner};
use chorus_backbone::jetstream::NatsConfig;
use chorus_identity::{Identity, Issuers, Role};
use chorus_keys::{Algorithm, FileSigner, KeyConfig, Signer};
use chorus_rpc::relay::HttpTransport;
use chorus_rpc::replies::{ReplyFilter, Summaries};
use chorus_rpc::{CallerSigner, NatsTransport, RequestOptions, RpcClient, Target, Transport};

use super::targeting::TargetArgs;
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
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// The agent's description (Choria JSON DDL) when it is not a built-in agent: inputs are
    /// typed, checked and defaulted by it before anything is sent.
    #[arg(long)]
    ddl: Option<std::path::PathBuf>,
    /// Nodes expected to reply to a broadcast (stop waiting once they have; report those
    /// that did not). With a discovery step, the discovered nodes are expected.
    #[arg(long)]
    expect: Option<usize>,
    /// How long to wait for replies (per batch).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long nodes accept the request after it was made; nodes refuse TTLs above their
    /// maximum (default 5m), and run each request once within it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Send to this many discovered nodes at a time.
    #[arg(long)]
    batch: Option<usize>,
    /// Pause between batches.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, requires = "batch")]
    batch_sleep: Duration,
    /// Send to only this many of the discovered nodes (`N`) or this share of them (`N%`),
    /// chosen at random.
    #[arg(long)]
    limit: Option<String>,
    /// Seed of the --limit choice, to choose the same nodes again.
    #[arg(long, requires = "limit")]
    limit_seed: Option<u64>,
    /// Keep only replies this expression selects (Choria's `--filter-replies`): they are
    /// shown, summarised and written as JSON; the rest are only counted. E.g.
    /// `ok() && data("ensure") == "5.3.3"`.
    #[arg(long)]
    filter_replies: Option<String>,
    /// Print every kept reply as a JSON line (a nodes file for the next request).
    #[arg(long, conflicts_with = "table")]
    json: bool,
    /// Print the kept replies as a table of the action's outputs.
    #[arg(long)]
    table: bool,
    /// Which replies to print: ok, failed, all or none (default: as the action's DDL says,
    /// else failed).
    #[arg(long, value_enum)]
    display: Option<Display>,
}

/// Who the caller is and how requests reach the fleet: shared by every command that
/// makes requests.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// NATS server(s), comma-separated.
    #[arg(long, env = "CHORUS_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Reach the fleet through a platform's HTTP relay instead of NATS, e.g. the
    /// `chorus up` dashboard at http://127.0.0.1:8080 (its inventory is then the default
    /// discovery).
    #[arg(long, env = "CHORUS_URL")]
    pub url: Option<String>,
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

impl ClientArgs {
    /// A client for `collective`, signing as these options say.
    pub async fn connect(&self, collective: &str) -> anyhow::Result<RpcClient> {
        let args = self;
        let transport: Arc<dyn Transport> = match &args.url {
            Some(url) => Arc::new(HttpTransport::new(url)),
            None => Arc::new(NatsTransport::new(NatsConfig::from_url_list(&args.nats).connect(None).await?)),
        };
        let mut rpc = match (&args.key, &args.credential) {
            (Some(key), Some(credential)) => {
                let key = KeyConfig::parse(key).context("--key")?;
                let identity = Identity::load(&key, credential, Role::Client, None).context("--credential")?;
                let subject = identity.subject().to_string();
                if let Some(callerid) = &args.callerid {
                    anyhow::ensure!(
                        *callerid == subject,
                        "--callerid {callerid} is not the credential's caller {subject}"
                    );
                }
                RpcClient::new(transport.clone(), subject, collective)
                    .with_request_signer(Arc::new(CallerSigner(identity)))
            }
            _ => RpcClient::new(transport.clone(), args.callerid.as_deref().unwrap_or("choria=cli"), collective),
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
                    let password = std::env::var("CHORUS_AAA_PASSWORD")
                        .context("--user needs the password in CHORUS_AAA_PASSWORD")?;
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
                rpc = RpcClient::new(transport.clone(), callerid, collective);
            }
            rpc = rpc.with_request_signer(Arc::new(AaaSigner::new(aaa, token, key)));
        }
        if !args.issuers.is_empty() {
            rpc = rpc.with_trust(Arc::new(Issuers::from_paths(&args.issuers).context("--issuer")?));
        }
        Ok(rpc)
    }
}

/// Makes an RPC request, showing replies as they arrive and a summary at the end.
pub async fn run(mut args: RpcArgs) -> anyhow::Result<()> {
    args.target.inventory_from(&args.client);
    let rpc = args.client.connect(&args.target.collective).await?;
    let pairs = args
        .inputs
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').with_context(|| format!("input {kv:?} is not key=value"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Everything that can be refused is checked before anything is sent: inputs, filters,
    // the reply filter and the limit.
    let ddl = agent_ddl(&args)?;
    let data = inputs(&args, ddl.as_ref(), &pairs)?;
    let filter = args.target.filter()?;
    let reply_filter =
        args.filter_replies.as_deref().map(ReplyFilter::compile).transpose().map_err(anyhow::Error::msg)?;
    let limit = args.limit.as_deref().map(Limit::parse).transpose()?;
    anyhow::ensure!(args.batch != Some(0), "--batch 0 sends nothing");
    let action = ddl.as_ref().and_then(|d| d.action(&args.action));

    // Discovery, when there is a step: the nodes, each then addressed directly.
    let mut targets: Option<Vec<String>> = match args.target.method() {
        Some(method) => {
            let discovery_filter = chorus_rpc::discovery_filter(&filter, &args.agent);
            let started = std::time::Instant::now();
            let found = args.target.discover(method, &rpc, &discovery_filter).await?;
            for note in &found.notes {
                eprintln!("{note}");
            }
            anyhow::ensure!(!found.nodes.is_empty(), "did not discover any nodes; nothing was sent");
            eprintln!("discovered {} nodes in {:.2?}", found.nodes.len(), started.elapsed());
            Some(found.nodes)
        }
        None => Some(args.target.exact_identities()).filter(|nodes| !nodes.is_empty()),
    };
    if let Some(limit) = limit {
        let nodes =
            targets.as_mut().context("--limit chooses among discovered nodes: give a discovery method (--dm)")?;
        limit.apply(nodes, args.limit_seed);
    }
    let batches: Vec<Option<Vec<String>>> = match (&targets, args.batch) {
        (Some(nodes), Some(size)) => nodes.chunks(size).map(|c| Some(c.to_vec())).collect(),
        (Some(nodes), None) => vec![Some(nodes.clone())],
        (None, Some(_)) => anyhow::bail!("--batch sends to discovered nodes: give a discovery method (--dm)"),
        (None, None) => vec![None],
    };

    let expected = targets.as_ref().map(Vec::len).or(args.expect);
    let bar = match expected {
        Some(n) => ProgressBar::new(n as u64),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} replies {wide_bar} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let display = args.display.unwrap_or_else(|| Display::of_action(ddl.as_ref(), &args.action));
    let mut summaries = action.map(Summaries::of).unwrap_or_default();
    let mut table = Vec::new();
    let mut shown = Vec::new();
    let mut tally = Tally::default();
    let mut responders = std::collections::HashSet::new();
    let mut rejected = Vec::new();
    let started = std::time::Instant::now();
    let last = batches.len() - 1;
    for (i, batch) in batches.into_iter().enumerate() {
        let mut options = RequestOptions { filter: filter.clone(), timeout: args.timeout, ..Default::default() };
        options.ttl = args.ttl.as_secs().max(1);
        match batch {
            Some(nodes) if nodes.len() == 1 => options.target = Target::Node(nodes[0].clone()),
            Some(nodes) => options.target = Target::Nodes(nodes),
            None => {
                options.target = Target::Broadcast;
                options.expected = args.expect;
            }
        }
        let mut stream = rpc.request(&args.agent, &args.action, data.clone(), options).await?;
        while let Some(reply) = stream.next().await {
            bar.inc(1);
            responders.insert(reply.identity.clone());
            if reply_filter.as_ref().is_some_and(|f| !f.matches(&reply)) {
                continue;
            }
            let ok = reply.statuscode as u8 == 0 && reply.authorized;
            summaries.add(&reply.data);
            if args.json {
                bar.suspend(|| println!("{}", serde_json::to_string(&reply).unwrap_or_default()));
            } else if args.table {
                table.push(reply);
            } else if display.shows(ok) {
                shown.push(if ok {
                    format!("{:<40} {}", reply.identity, serde_json::Value::Object(reply.data.clone()))
                } else {
                    format!("{:<40} {}", reply.identity, reply.statusmsg)
                });
            }
        }
        tally.add(&stream.summary());
        rejected.extend(stream.rejected().iter().map(|r| format!("{:<40} UNVERIFIED: {}", r.identity, r.reason)));
        if i < last && !args.batch_sleep.is_zero() {
            tokio::time::sleep(args.batch_sleep).await;
        }
    }
    bar.finish_and_clear();
    for line in &shown {
        println!("{line}");
    }
    if args.table {
        print_table(&table, action);
    }
    for line in &rejected {
        println!("{line}");
    }
    let silent: Vec<&String> = match &targets {
        Some(nodes) => nodes.iter().filter(|n| !responders.contains(*n)).collect(),
        None => Vec::new(),
    };
    // With --json, stdout holds only replies (the next request's nodes file); the rest
    // goes to stderr.
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    if !silent.is_empty() {
        say("\nNo response from:\n".into());
        for node in &silent {
            say(format!("   {node}"));
        }
    }
    if !summaries.is_empty() && !args.json {
        println!("\n{}", summaries.render().trim_end());
    }
    let no_response = match &targets {
        Some(_) => Some(silent.len()),
        None => args.expect.map(|n| n.saturating_sub(responders.len())),
    };
    say(format!(
        "\n{} replies: {} ok, {} denied, {} failed{}{} in {:.2?}",
        tally.replies,
        tally.ok,
        tally.denied,
        tally.failed,
        if tally.unverified > 0 { format!(", {} unverified", tally.unverified) } else { String::new() },
        no_response.filter(|n| *n > 0).map(|n| format!(", {n} did not respond")).unwrap_or_default(),
        started.elapsed(),
    ));
    if tally.ok < tally.replies || tally.unverified > 0 || no_response.unwrap_or(0) > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Reply counts over every batch.
#[derive(Default)]
struct Tally {
    replies: usize,
    ok: usize,
    denied: usize,
    failed: usize,
    unverified: usize,
}

impl Tally {
    fn add(&mut self, s: &chorus_rpc::RpcSummary) {
        self.replies += s.replies;
        self.ok += s.ok;
        self.denied += s.denied;
        self.failed += s.failed;
        self.unverified += s.unverified;
    }
}

/// `--limit`: a number of nodes or a share of them.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Limit {
    Count(usize),
    Percent(f64),
}

impl Limit {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let bad = || anyhow::anyhow!("--limit {text:?}: expected a number of nodes (5) or a share (10%) above 0");
        let limit = match text.strip_suffix('%') {
            Some(p) => Limit::Percent(p.trim().parse::<f64>().map_err(|_| bad())?),
            None => Limit::Count(text.trim().parse::<usize>().map_err(|_| bad())?),
        };
        match limit {
            Limit::Count(0) => Err(bad()),
            Limit::Percent(p) if !(p > 0.0 && p <= 100.0) => Err(bad()),
            _ => Ok(limit),
        }
    }

    /// Keeps a random choice of `nodes` (the same one for the same seed), in their order.
    fn apply(self, nodes: &mut Vec<String>, seed: Option<u64>) {
        let keep = match self {
            Limit::Count(n) => n.min(nodes.len()),
            Limit::Percent(p) => ((nodes.len() as f64 * p / 100.0).ceil() as usize).clamp(1, nodes.len()),
        };
        let mut rng = match seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let mut chosen: Vec<usize> = (0..nodes.len()).collect();
        rng.shuffle(&mut chosen);
        chosen.truncate(keep);
        chosen.sort_unstable();
        *nodes = chosen.into_iter().map(|i| nodes[i].clone()).collect();
    }
}

/// The kept replies as a table: identity, status, then the action's outputs (or every data
/// key when there is no description).
fn print_table(replies: &[chorus_schemas::RpcReply], action: Option<&chorus_rpc::ddl::Action>) {
    let columns: Vec<String> = match action {
        Some(a) => a.output.keys().cloned().collect(),
        None => {
            let mut keys: Vec<String> = replies.iter().flat_map(|r| r.data.keys().cloned()).collect();
            keys.sort();
            keys.dedup();
            keys
        }
    };
    let cell = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let mut rows = vec![std::iter::once("IDENTITY".to_string())
        .chain(std::iter::once("STATUS".to_string()))
        .chain(columns.iter().map(|c| c.to_uppercase()))
        .collect::<Vec<_>>()];
    for r in replies {
        let status = if r.statuscode as u8 == 0 && r.authorized { "ok".to_string() } else { r.statusmsg.clone() };
        rows.push(
            std::iter::once(r.identity.clone())
                .chain(std::iter::once(status))
                .chain(columns.iter().map(|c| cell(r.data.get(c))))
                .collect(),
        );
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
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
