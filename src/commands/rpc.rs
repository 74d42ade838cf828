//! `chorus rpc`: a request to the fleet, its replies as they arrive, and a summary.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_aaa::{AaaClient, AaaSigner};
use chorus_backbone::jetstream::NatsConfig;
use chorus_rpc::{parse_fact_filter, NatsTransport, RequestOptions, RpcClient, Target};
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
    /// Caller id the request is made as.
    #[arg(long, env = "CHORUS_CALLERID", default_value = "choria=cli")]
    callerid: String,
    /// Discovery filter on facts, e.g. `-F country=uk` (repeatable).
    #[arg(short = 'F', long = "wf")]
    facts: Vec<String>,
    /// Only these nodes (repeatable); requests are sent directly to each.
    #[arg(short = 'I', long = "identity")]
    identities: Vec<String>,
    /// Nodes expected to reply (stop waiting once they have; report those that did not).
    #[arg(long)]
    expect: Option<usize>,
    /// How long to wait for replies.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print every reply as JSON.
    #[arg(long)]
    json: bool,
    /// Have requests signed by a Chorus AAA service (`chorus aaa`) instead of holding a key:
    /// its URL, e.g. https://aaa.example.net:8443. Needs a token (`--token` or
    /// CHORUS_AAA_TOKEN), or a login with --user and CHORUS_AAA_PASSWORD.
    #[arg(long, env = "CHORUS_AAA_URL")]
    aaa: Option<String>,
    /// JWT from the AAA service's /login.
    #[arg(long, env = "CHORUS_AAA_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    let mut rpc = RpcClient::new(Arc::new(NatsTransport::new(client)), &args.callerid, &args.collective);
    if let Some(url) = &args.aaa {
        let aaa = AaaClient::new(url, args.aaa_ca.as_deref())?;
        let token = match (&args.token, &args.user) {
            (Some(token), _) => token.clone(),
            (None, Some(user)) => {
                let password =
                    std::env::var("CHORUS_AAA_PASSWORD").context("--user needs the password in CHORUS_AAA_PASSWORD")?;
                aaa.login(user, &password).await?.token
            }
            (None, None) => anyhow::bail!("--aaa needs --token (or CHORUS_AAA_TOKEN) or --user"),
        };
        rpc = rpc.with_request_signer(Arc::new(AaaSigner::new(aaa, token)));
    }
    let mut data = serde_json::Map::new();
    for kv in &args.inputs {
        let (k, v) = kv.split_once('=').with_context(|| format!("input {kv:?} is not key=value"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        data.insert(k.to_string(), value);
    }
    let mut options = RequestOptions::default();
    for f in &args.facts {
        options.filter.fact.push(parse_fact_filter(f)?);
    }
    options.target = match args.identities.len() {
        0 => Target::Broadcast,
        1 => Target::Node(args.identities[0].clone()),
        _ => Target::Nodes(args.identities.clone()),
    };
    options.expected = args.expect.or(if args.identities.is_empty() { None } else { Some(args.identities.len()) });
    options.timeout = args.timeout;
    let bar = match options.expected {
        Some(n) => ProgressBar::new(n as u64),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} replies {wide_bar} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut stream = rpc.request(&args.agent, &args.action, data, options).await?;
    let mut failures = Vec::new();
    while let Some(reply) = stream.next().await {
        bar.inc(1);
        if args.json {
            bar.suspend(|| println!("{}", serde_json::to_string(&reply).unwrap_or_default()));
        } else if reply.statuscode as u8 != 0 || !reply.authorized {
            failures.push(format!("{:<40} {}", reply.identity, reply.statusmsg));
        }
    }
    bar.finish_and_clear();
    for f in &failures {
        println!("{f}");
    }
    let s = stream.summary();
    println!(
        "\n{} replies: {} ok, {} denied, {} failed{} in {:.2?} (request {})",
        s.replies,
        s.ok,
        s.denied,
        s.failed,
        s.no_response.map(|n| format!(", {n} did not respond")).unwrap_or_default(),
        s.elapsed,
        s.requestid
    );
    if s.ok < s.replies || s.no_response.unwrap_or(0) > 0 {
        std::process::exit(1);
    }
    Ok(())
}
