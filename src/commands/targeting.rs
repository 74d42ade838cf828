//! Which nodes a command concerns: the filter options and the discovery methods that
//! `chorus rpc`, `chorus discover` and `chorus facts` share (docs/TARGETING.md).

use std::time::Duration;

use anyhow::Context as _;
use chorus_rpc::{parse_fact_filter, RequestOptions, RpcClient};
use chorus_schemas::rpc::Filter;

/// How the nodes are found before a request is sent to each of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Ask the fleet: nodes matching the filter answer an `rpcutil ping`.
    Broadcast,
    /// Read the inventory's registrations (`--inventory URL`): no traffic to the nodes.
    Inventory,
    /// The nodes named in `--nodes FILE`.
    File,
    /// Run `--discovery-command`, Choria's external discovery protocol.
    External,
}

/// Filters and discovery options.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// The collective (sub-network) to address.
    #[arg(long, default_value = "choria")]
    pub collective: String,
    /// Discovery filter on facts, e.g. `-F country=uk` (repeatable).
    #[arg(short = 'F', long = "wf")]
    pub facts: Vec<String>,
    /// Fact and class filters in one (Choria's `-W`): space-separated parts, each a fact
    /// filter when it reads as one (`os.family=debian`), else a class (`apache`).
    #[arg(short = 'W', long = "with")]
    pub with: Vec<String>,
    /// A compound filter in Choria's expression language (repeatable: all must hold), e.g.
    /// `-S 'with("customer=acme") and (with("/^web/") or fact("cpus") >= 8)'`; checked before
    /// anything is sent.
    #[arg(short = 'S', long = "select")]
    pub select: Vec<String>,
    /// Only nodes with this configuration-management class, exact or `/regex/`
    /// (repeatable: all must match).
    #[arg(short = 'C', long = "wc")]
    pub classes: Vec<String>,
    /// Only nodes with this agent, exact or `/regex/` (repeatable: all must match).
    #[arg(short = 'A', long = "wa")]
    pub agents: Vec<String>,
    /// Only these nodes (repeatable). Exact identities are addressed directly; a `/regex/`
    /// is a discovery filter.
    #[arg(short = 'I', long = "identity")]
    pub identities: Vec<String>,
    /// The nodes named in this file: one identity per line (`#` comments, YAML `- `
    /// items), a JSON list, or the JSON lines of an earlier `chorus rpc --json` (chaining:
    /// the nodes that answered one request receive the next).
    #[arg(long, conflicts_with = "identities")]
    pub nodes: Option<std::path::PathBuf>,
    /// Discovery method (default: none for exact `-I` identities alone, which are addressed
    /// directly; file with --nodes; inventory with --inventory; else no discovery step: the
    /// request itself is broadcast).
    #[arg(long = "dm", value_enum)]
    pub method: Option<Method>,
    /// The inventory API (`chorus inventory serve`, `chorus up`), e.g.
    /// http://127.0.0.1:8080: inventory discovery reads its registrations.
    #[arg(long, env = "CHORUS_INVENTORY_URL")]
    pub inventory: Option<String>,
    /// The program of external discovery, with its arguments (Choria's protocol: it is
    /// given a request file, a reply file and the protocol name).
    #[arg(long)]
    pub discovery_command: Option<String>,
    /// How long broadcast and external discovery wait.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub discovery_timeout: Duration,
}

/// The nodes discovery found, and how.
pub struct Discovered {
    /// Their identities, each once, in the order found.
    pub nodes: Vec<String>,
    /// What the operator should know about how they were found (the inventory's staleness,
    /// nodes left out), for stderr.
    pub notes: Vec<String>,
}

impl TargetArgs {
    /// The filter every option above amounts to; a malformed one is an error here, before
    /// anything is sent. `agent` (the agent to be called) is added as an agent filter when
    /// a discovery step selects the nodes, as Choria does.
    pub fn filter(&self) -> anyhow::Result<Filter> {
        let (mut facts, mut classes) = (self.facts.clone(), self.classes.clone());
        for combined in &self.with {
            split_combined(combined, &mut facts, &mut classes)?;
        }
        // Any identity may match, exact or `/regex/`; exact ones alone are also addressed
        // directly when there is no discovery step.
        Ok(chorus_rpc::filter_from_parts(&facts, &classes, &self.agents, &self.identities, &self.select)?)
    }

    /// With `--url` (a platform's relay) and no `--inventory`, that platform's inventory.
    pub fn inventory_from(&mut self, client: &super::rpc::ClientArgs) {
        if self.inventory.is_none() {
            self.inventory.clone_from(&client.url);
        }
    }

    /// The discovery method in effect, `None` when the request is simply broadcast.
    pub fn method(&self) -> Option<Method> {
        // Choria's shortcut: only exact identities name the nodes already (and a node that
        // never registered is still reached); absent ones show as not responding.
        let only_exact = !self.exact_identities().is_empty()
            && self.facts.is_empty()
            && self.classes.is_empty()
            && self.agents.is_empty()
            && self.with.is_empty()
            && self.select.is_empty();
        if self.method.is_none() && only_exact {
            return None;
        }
        self.method.or(if self.nodes.is_some() {
            Some(Method::File)
        } else if self.inventory.is_some() {
            Some(Method::Inventory)
        } else {
            None
        })
    }

    /// Exact identities given with `-I` (none when any is a `/regex/`, which is a filter).
    pub fn exact_identities(&self) -> Vec<String> {
        if self.identities.iter().any(|i| is_regex(i)) {
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::new();
        for i in &self.identities {
            if !out.contains(i) {
                out.push(i.clone());
            }
        }
        out
    }

    /// Finds the nodes `filter` selects by `method`.
    pub async fn discover(&self, method: Method, rpc: &RpcClient, filter: &Filter) -> anyhow::Result<Discovered> {
        let mut notes = Vec::new();
        let nodes = match method {
            Method::File => {
                let path = self.nodes.as_ref().context("--dm file needs --nodes FILE")?;
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                read_nodes(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            Method::Inventory => {
                let url = self.inventory.as_deref().context("--dm inventory needs --inventory URL")?;
                let found = inventory_discovery(url, filter, &self.collective).await?;
                notes.push(format!(
                    "inventory: {} of {} registered nodes selected{}{}",
                    found.nodes.len(),
                    found.registered,
                    found
                        .oldest
                        .map(|o| format!(", oldest registration {}s old", (found.at - o).num_seconds().max(0)))
                        .unwrap_or_default(),
                    if found.down.is_empty() {
                        String::new()
                    } else {
                        format!(", {} left out as shut down or expired", found.down.len())
                    }
                ));
                found.nodes
            }
            Method::Broadcast => {
                let options =
                    RequestOptions { filter: filter.clone(), timeout: self.discovery_timeout, ..Default::default() };
                let results = rpc.call("rpcutil", "ping", serde_json::Map::new(), options).await?;
                let mut nodes: Vec<String> = results.replies.into_iter().map(|r| r.identity).collect();
                nodes.sort();
                nodes.dedup();
                nodes
            }
            Method::External => {
                let command = self.discovery_command.as_deref().context("--dm external needs --discovery-command")?;
                external_discovery(command, filter, &self.collective, self.discovery_timeout).await?
            }
        };
        Ok(Discovered { nodes, notes })
    }
}

fn is_regex(i: &str) -> bool {
    i.len() >= 2 && i.starts_with('/') && i.ends_with('/')
}

/// Asks the inventory API which registered nodes `filter` selects.
pub async fn inventory_discovery(
    url: &str,
    filter: &Filter,
    collective: &str,
) -> anyhow::Result<chorus_consumers::inventory::Discovered> {
    let endpoint = format!("{}/api/discover", url.trim_end_matches('/'));
    let body = chorus_consumers::inventory::DiscoverRequest { filter: filter.clone(), collective: collective.into() };
    let response = reqwest::Client::new()
        .post(&endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body)?)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .with_context(|| format!("inventory discovery at {endpoint}"))?;
    let status = response.status();
    let text = response.text().await.with_context(|| format!("inventory discovery at {endpoint}"))?;
    anyhow::ensure!(status.is_success(), "inventory discovery at {endpoint}: {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("inventory discovery at {endpoint}: unreadable answer"))
}

/// Protocol names of Choria's external discovery.
const EXTERNAL_REQUEST: &str = "io.choria.choria.discovery.v1.external_request";
const EXTERNAL_REPLY: &str = "io.choria.choria.discovery.v1.external_reply";

/// Choria's external discovery: the program gets a request file (the filter, collective and
/// timeout), a reply file and the protocol name, with an environment of only the
/// `CHORIA_EXTERNAL_*` names and `PATH`, and writes `{"protocol", "nodes"}` or
/// `{"error"}` to the reply file.
async fn external_discovery(
    command: &str,
    filter: &Filter,
    collective: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut words = command.split_whitespace();
    let program = words.next().context("--discovery-command is empty")?;
    let dir = tempfile::tempdir()?;
    let (request_file, reply_file) = (dir.path().join("request.json"), dir.path().join("reply.json"));
    let request = serde_json::json!({
        "$schema": "https://choria.io/schemas/choria/discovery/v1/external_request.json",
        "protocol": EXTERNAL_REQUEST,
        "filter": filter,
        "collective": collective,
        "federations": [],
        "options": {},
        "timeout": timeout.as_secs_f64(),
    });
    std::fs::write(&request_file, serde_json::to_vec(&request)?)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(words)
        .arg(&request_file)
        .arg(&reply_file)
        .arg(EXTERNAL_REQUEST)
        .current_dir(dir.path())
        .env_clear()
        .env("CHORIA_EXTERNAL_REQUEST", &request_file)
        .env("CHORIA_EXTERNAL_REPLY", &reply_file)
        .env("CHORIA_EXTERNAL_PROTOCOL", EXTERNAL_REQUEST)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    let finished = chorus_rpc::agents::process::run(cmd, timeout.max(Duration::from_secs(1)))
        .await
        .with_context(|| format!("external discovery {program}: cannot start"))?;
    anyhow::ensure!(!finished.timed_out, "external discovery {program}: still running after {timeout:?}");
    anyhow::ensure!(
        finished.exit_code() == 0,
        "external discovery {program}: exit code {}: {}",
        finished.exit_code(),
        String::from_utf8_lossy(&finished.stderr.bytes).trim()
    );
    let text =
        std::fs::read_to_string(&reply_file).with_context(|| format!("external discovery {program}: no reply file"))?;
    let reply: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("external discovery {program}: reply is not JSON"))?;
    if let Some(error) = reply.get("error").and_then(|e| e.as_str()).filter(|e| !e.is_empty()) {
        anyhow::bail!("external discovery {program}: {error}");
    }
    anyhow::ensure!(
        reply.get("protocol").and_then(|p| p.as_str()) == Some(EXTERNAL_REPLY),
        "external discovery {program}: reply protocol is not {EXTERNAL_REPLY}"
    );
    let nodes = reply.get("nodes").and_then(|n| n.as_array()).cloned().unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for node in nodes {
        let node = node.as_str().context("external discovery: nodes holds identity strings")?.to_string();
        if !out.contains(&node) {
            out.push(node);
        }
    }
    Ok(out)
}

/// The node identities in a nodes file (see `--nodes`), in order, each once.
pub fn read_nodes(text: &str) -> anyhow::Result<Vec<String>> {
    let mut nodes: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut add = |identity: &str| -> anyhow::Result<()> {
        anyhow::ensure!(
            !identity.is_empty() && !identity.contains(char::is_whitespace),
            "{identity:?} is not a node identity"
        );
        if seen.insert(identity.to_string()) {
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

/// Splits a combined filter (`-W`) into `facts` and `classes`: space-separated parts, each
/// a fact filter when it reads as one, else a class, as Choria splits them. A part that
/// starts or ends with an operator is a fact filter written with spaces (`os.family =
/// debian`), which Choria would take as three classes matching nothing: refused.
fn split_combined(combined: &str, facts: &mut Vec<String>, classes: &mut Vec<String>) -> anyhow::Result<()> {
    let operator = |c: char| matches!(c, '=' | '<' | '>' | '!' | '~');
    for part in combined.split(' ').filter(|p| !p.is_empty()) {
        anyhow::ensure!(
            !part.starts_with(operator) && !part.ends_with(operator),
            "-W {combined:?}: {part:?} belongs to a fact filter written with spaces; write it without them"
        );
        match parse_fact_filter(part) {
            Ok(_) => facts.push(part.to_string()),
            Err(_) => classes.push(part.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_combined;

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
        let (mut facts, mut classes) = (Vec::new(), Vec::new());
        split_combined("apache  os.family=debian /^web/ cpus>=4", &mut facts, &mut classes).unwrap();
        assert_eq!(classes, ["apache", "/^web/"]);
        let filter = chorus_rpc::filter_from_parts(&facts, &classes, &[], &[], &[]).unwrap();
        let facts: Vec<(&str, &str, &str)> =
            filter.fact.iter().map(|f| (f.fact.as_str(), f.operator.as_str(), f.value.as_str())).collect();
        assert_eq!(facts, [("os.family", "==", "debian"), ("cpus", ">=", "4")]);
        let error = split_combined("os.family = debian", &mut Vec::new(), &mut Vec::new()).unwrap_err().to_string();
        assert!(error.contains("written with spaces"), "{error}");
    }
}
