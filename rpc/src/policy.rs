//! MCollective/Choria Action Policy: who may call which action of an agent on which nodes.
//!
//! A policy file `<policy_dir>/<agent>.policy` (or `<policy_dir>/default.policy` for agents
//! without one) holds an optional `policy default allow|deny` line and rule lines
//!
//! ```text
//! # effect  callers                  actions        facts                   classes
//! allow     choria=rip.mcollective   *              *                       *
//! deny      *                        restart stop   env=production          *
//! allow     *                        status         os=/^(debian|ubuntu)$/  webserver
//! ```
//!
//! Columns are separated by tabs (a run of tabs counts as one separator), so that a column
//! may hold several space-separated values; a line without tabs is split on whitespace
//! instead and must then have exactly five columns. Each column is `*` (anything) or a list:
//! callers match the request's `callerid` exactly, actions the action name, `fact=value`
//! pairs must all hold on the node (`value` may be a `/regex/`), and classes must all be
//! present. The first matching rule decides; if none matches, `policy default` does, and a
//! file without one denies.
//!
//! Everything fails closed, because an RPC agent such as `shell` runs arbitrary commands:
//! no policy directory, no policy file, or a policy file that does not parse all deny, with
//! a reason saying which.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chorus_schemas::RpcRequest;
use regex::Regex;
use thiserror::Error;

use super::{fact_text, NodeContext};

/// How long a loaded policy file is trusted before its modification time is checked again.
/// A server hosting 50,000 nodes authorizes 50,000 times per broadcast; it must not read or
/// even stat the file each time, yet an edited policy should apply within moments.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(1);

/// The outcome of an authorization, with a reason fit for an audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request may run.
    pub allowed: bool,
    /// Which file and rule (or absence of either) decided.
    pub reason: String,
}

impl PolicyDecision {
    fn deny(reason: impl Into<String>) -> Self {
        PolicyDecision { allowed: false, reason: reason.into() }
    }
}

/// A policy file that cannot be used.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// A line is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        /// The policy file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The file exists but cannot be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

impl Effect {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "allow" => Some(Effect::Allow),
            "deny" => Some(Effect::Deny),
            _ => None,
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        })
    }
}

/// A fact column entry: `fact=value` or `fact=/regex/`.
#[derive(Debug, Clone)]
enum FactMatch {
    Equals(String, String),
    Regex(String, Regex),
}

impl FactMatch {
    fn matches(&self, node: &NodeContext) -> bool {
        match self {
            FactMatch::Equals(name, value) => node.fact(name).is_some_and(|v| fact_text(v) == value.as_str()),
            FactMatch::Regex(name, re) => node.fact(name).is_some_and(|v| re.is_match(&fact_text(v))),
        }
    }
}

/// One rule line. `None` in a column means `*`.
#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    effect: Effect,
    callers: Option<Vec<String>>,
    actions: Option<Vec<String>>,
    facts: Option<Vec<FactMatch>>,
    classes: Option<Vec<String>>,
}

impl Rule {
    fn matches(&self, callerid: &str, action: &str, node: &NodeContext) -> bool {
        column(&self.callers, |c| c.iter().any(|c| c == callerid))
            && column(&self.actions, |a| a.iter().any(|a| a == action))
            && column(&self.facts, |f| f.iter().all(|f| f.matches(node)))
            && column(&self.classes, |cls| cls.iter().all(|c| node.classes.iter().any(|n| n == c)))
    }
}

/// A column matches when it is `*` (`None`) or when `test` holds for its values.
fn column<T>(values: &Option<Vec<T>>, test: impl FnOnce(&[T]) -> bool) -> bool {
    match values {
        None => true,
        Some(values) => test(values),
    }
}

/// One parsed policy file.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    path: PathBuf,
    /// `policy default` and its line; `None` means the implicit deny.
    default: Option<(Effect, usize)>,
    rules: Vec<Rule>,
}

impl PolicyFile {
    /// Parses policy text; `path` only names the file in errors and decisions.
    pub fn parse(path: impl Into<PathBuf>, text: &str) -> Result<Self, PolicyError> {
        let path = path.into();
        let mut file = PolicyFile { path: path.clone(), default: None, rules: Vec::new() };
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |message: String| PolicyError::Parse { path: path.clone(), line, message };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let first = content.split_whitespace().next().unwrap_or_default();
            if first == "policy" {
                let words: Vec<&str> = content.split_whitespace().collect();
                let effect = match words.as_slice() {
                    ["policy", "default", effect] => Effect::parse(effect)
                        .ok_or_else(|| err(format!("policy default must be allow or deny, not {effect:?}")))?,
                    _ => return Err(err(format!("expected 'policy default allow|deny', found {content:?}"))),
                };
                if let Some((_, previous)) = file.default {
                    return Err(err(format!("second 'policy default' (first on line {previous})")));
                }
                file.default = Some((effect, line));
                continue;
            }
            file.rules.push(parse_rule(content, line).map_err(err)?);
        }
        Ok(file)
    }

    /// Reads and parses a policy file.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let path = path.into();
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io { path: path.clone(), source })?;
        Self::parse(path, &text)
    }

    /// Decides whether `callerid` may call `action` on `node`.
    pub fn evaluate(&self, callerid: &str, action: &str, node: &NodeContext) -> PolicyDecision {
        let path = self.path.display();
        if let Some(rule) = self.rules.iter().find(|r| r.matches(callerid, action, node)) {
            return PolicyDecision {
                allowed: rule.effect == Effect::Allow,
                reason: format!("{} by {path}:{}", rule.effect, rule.line),
            };
        }
        match self.default {
            Some((effect, line)) => PolicyDecision {
                allowed: effect == Effect::Allow,
                reason: format!("{effect} by policy default at {path}:{line} (no rule matched)"),
            },
            None => PolicyDecision::deny(format!("deny by {path}: no rule matched and no 'policy default' line")),
        }
    }
}

/// Parses a rule line into its five columns.
fn parse_rule(content: &str, line: usize) -> Result<Rule, String> {
    let columns: Vec<&str> = if content.contains('\t') {
        content.split('\t').map(str::trim).filter(|c| !c.is_empty()).collect()
    } else {
        content.split_whitespace().collect()
    };
    let effect = Effect::parse(columns[0])
        .ok_or_else(|| format!("expected 'allow', 'deny' or 'policy default', found {:?}", columns[0]))?;
    if columns.len() != 5 {
        return Err(format!(
            "expected 5 columns (allow|deny, callers, actions, facts, classes) separated by \
             tabs, found {}",
            columns.len()
        ));
    }
    let facts = match list(columns[3], "facts")? {
        None => None,
        Some(items) => Some(items.into_iter().map(parse_fact).collect::<Result<Vec<_>, _>>()?),
    };
    Ok(Rule {
        line,
        effect,
        callers: list(columns[1], "callers")?,
        actions: list(columns[2], "actions")?,
        facts,
        classes: list(columns[4], "classes")?,
    })
}

/// A column: `*` alone means anything (`None`), else its space-separated values.
fn list(column: &str, name: &str) -> Result<Option<Vec<String>>, String> {
    let items: Vec<String> = column.split_whitespace().map(str::to_string).collect();
    if items.len() == 1 && items[0] == "*" {
        return Ok(None);
    }
    if items.iter().any(|i| i == "*") {
        return Err(format!("'*' must stand alone in the {name} column"));
    }
    Ok(Some(items))
}

fn parse_fact(item: String) -> Result<FactMatch, String> {
    let Some((name, value)) = item.split_once('=') else {
        return Err(format!("fact match {item:?} is not fact=value"));
    };
    if name.is_empty() {
        return Err(format!("fact match {item:?} has no fact name"));
    }
    if value.len() >= 2 && value.starts_with('/') && value.ends_with('/') {
        let re = Regex::new(&value[1..value.len() - 1]).map_err(|e| format!("fact match {item:?}: bad regex: {e}"))?;
        return Ok(FactMatch::Regex(name.to_string(), re));
    }
    Ok(FactMatch::Equals(name.to_string(), value.to_string()))
}

/// A loaded file as cached: `None` when the file does not exist.
type Loaded = Option<Arc<Result<PolicyFile, PolicyError>>>;

struct CacheEntry {
    checked: Instant,
    /// Modification time and length the cached value was read at (`None`: file missing).
    fingerprint: Option<(SystemTime, u64)>,
    value: Loaded,
}

/// The Action Policy of a server: a policy directory (or none), with parsed files cached.
///
/// Shared by every node a server hosts; each decision is per node, since rules may depend
/// on the node's facts and classes.
pub struct ActionPolicy {
    dir: Option<PathBuf>,
    recheck: Duration,
    cache: Mutex<HashMap<PathBuf, CacheEntry>>,
}

impl ActionPolicy {
    /// Policies from `dir`; `None` denies every request.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self::with_recheck(dir, DEFAULT_RECHECK)
    }

    /// Like [`ActionPolicy::new`], re-checking files for changes every `recheck`.
    pub fn with_recheck(dir: Option<PathBuf>, recheck: Duration) -> Self {
        ActionPolicy { dir, recheck, cache: Mutex::new(HashMap::new()) }
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Decides whether `request` may run on `node`. Never fails: every problem denies.
    pub fn authorize(&self, request: &RpcRequest, node: &NodeContext) -> PolicyDecision {
        let agent = &request.agent;
        let Some(dir) = &self.dir else {
            return PolicyDecision::deny(format!(
                "no policy file for agent {agent}: no policy directory configured (default deny)"
            ));
        };
        // The agent name becomes a file name: never let it leave the directory.
        if agent.is_empty() || agent.starts_with('.') || agent.contains(['/', '\\', '\0']) {
            return PolicyDecision::deny(format!("invalid agent name {agent:?}"));
        }
        let agent_path = dir.join(format!("{agent}.policy"));
        let default_path = dir.join("default.policy");
        let loaded = match self.load(&agent_path) {
            Some(file) => file,
            None => match self.load(&default_path) {
                Some(file) => file,
                None => {
                    return PolicyDecision::deny(format!(
                        "no policy file for agent {agent} (neither {} nor {}; default deny)",
                        agent_path.display(),
                        default_path.display()
                    ))
                }
            },
        };
        match loaded.as_ref() {
            Ok(file) => file.evaluate(&request.callerid, &request.action, node),
            Err(e) => PolicyDecision::deny(format!("unusable policy: {e}")),
        }
    }

    /// The parsed file at `path` (`None` if missing), from the cache when recently checked
    /// or unchanged.
    fn load(&self, path: &Path) -> Loaded {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = cache.get(path) {
            if entry.checked.elapsed() < self.recheck {
                return entry.value.clone();
            }
        }
        let fingerprint = match std::fs::metadata(path) {
            Ok(meta) => Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                // Exists but cannot be examined: deny through an error, do not fall back.
                let value = Some(Arc::new(Err(PolicyError::Io { path: path.into(), source })));
                cache.insert(
                    path.into(),
                    CacheEntry { checked: Instant::now(), fingerprint: None, value: value.clone() },
                );
                return value;
            }
        };
        if let Some(entry) = cache.get_mut(path) {
            if entry.fingerprint == fingerprint && fingerprint.is_some() == entry.value.is_some() {
                entry.checked = Instant::now();
                return entry.value.clone();
            }
        }
        let value = fingerprint.map(|_| {
            let file = PolicyFile::load(path);
            if let Err(e) = &file {
                tracing::warn!(error = %e, "action policy file is unusable; denying");
            }
            Arc::new(file)
        });
        cache.insert(path.into(), CacheEntry { checked: Instant::now(), fingerprint, value: value.clone() });
        value
    }
}

impl fmt::Debug for ActionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActionPolicy").field("dir", &self.dir).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeContext {
        let mut n = NodeContext::new("n1.example.net", "choria");
        n.facts.insert("env".into(), json!("production"));
        n.facts.insert("os".into(), json!({"family": "debian", "release": 12}));
        n.classes = vec!["webserver".into(), "base".into()];
        n
    }

    fn decide(text: &str, caller: &str, action: &str) -> PolicyDecision {
        PolicyFile::parse("t.policy", text).unwrap().evaluate(caller, action, &node())
    }

    fn request(agent: &str, action: &str, caller: &str) -> RpcRequest {
        RpcRequest::new(caller, "client", "choria", agent, action, Default::default())
    }

    #[test]
    fn allow_and_deny_rules_first_match_wins() {
        let text = "policy default deny\n\
                    deny\tchoria=mallory\t*\t*\t*\n\
                    allow\tchoria=rip.mcollective choria=bob\tping inventory\t*\t*\n";
        let d = decide(text, "choria=bob", "ping");
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.reason, "allow by t.policy:3");
        let d = decide(text, "choria=mallory", "ping");
        assert!(!d.allowed);
        assert_eq!(d.reason, "deny by t.policy:2");
        // Exact caller match, not a prefix.
        assert!(!decide(text, "choria=bobby", "ping").allowed);
        assert!(!decide(text, "choria=bob", "daemon_stats").allowed);
    }

    #[test]
    fn policy_default_applies_when_nothing_matches() {
        let d = decide("# comment\n\npolicy default allow\ndeny\t*\tshutdown\t*\t*\n", "x", "ping");
        assert!(d.allowed);
        assert!(d.reason.contains("policy default at t.policy:3"), "{}", d.reason);
        // No default line at all denies.
        let d = decide("allow\tx\tstatus\t*\t*", "x", "ping");
        assert!(!d.allowed);
        assert!(d.reason.contains("no 'policy default'"), "{}", d.reason);
        assert!(!decide("", "x", "ping").allowed);
    }

    #[test]
    fn whitespace_separated_lines_need_five_columns() {
        assert!(decide("allow choria=bob ping * *", "choria=bob", "ping").allowed);
        let err = PolicyFile::parse("t.policy", "allow choria=bob ping pong * *").unwrap_err();
        assert!(err.to_string().starts_with("t.policy:1: expected 5 columns"), "{err}");
        // Runs of tabs are one separator.
        assert!(decide("allow\t\tchoria=bob\t\t\tping\t*\t*", "choria=bob", "ping").allowed);
    }

    #[test]
    fn facts_must_all_match_with_regex_and_dotted_names() {
        let allow = |facts: &str| decide(&format!("allow\t*\t*\t{facts}\t*"), "c", "ping").allowed;
        assert!(allow("env=production"));
        assert!(!allow("env=staging"));
        assert!(allow("env=/^prod/ os.family=debian"));
        assert!(!allow("env=/^prod/ os.family=redhat"));
        assert!(allow("os.release=12"));
        assert!(allow("os.release=/^1[0-9]$/"));
        assert!(!allow("missing=x"));
    }

    #[test]
    fn classes_must_all_be_present() {
        let allow = |classes: &str| decide(&format!("allow\t*\t*\t*\t{classes}"), "c", "ping").allowed;
        assert!(allow("webserver"));
        assert!(allow("webserver base"));
        assert!(!allow("webserver database"));
    }

    #[test]
    fn bad_lines_are_errors_with_file_and_line() {
        let cases = [
            ("permit\t*\t*\t*\t*", "t.policy:1: expected 'allow', 'deny'"),
            ("\n# c\nallow\t*\t*\t*", "t.policy:3: expected 5 columns"),
            ("policy default maybe", "t.policy:1: policy default must be allow or deny"),
            ("policy deny", "t.policy:1: expected 'policy default allow|deny'"),
            ("policy default deny\npolicy default allow", "t.policy:2: second 'policy default'"),
            ("allow\t*\t*\tenv\t*", "t.policy:1: fact match \"env\" is not fact=value"),
            ("allow\t*\t*\tenv=/(/\t*", "t.policy:1: fact match \"env=/(/\": bad regex"),
            ("allow\t* bob\t*\t*\t*", "t.policy:1: '*' must stand alone in the callers column"),
        ];
        for (text, want) in cases {
            let err = PolicyFile::parse("t.policy", text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn files_fall_back_to_default_policy_and_missing_files_deny() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ActionPolicy::with_recheck(Some(dir.path().into()), Duration::ZERO);
        let d = policy.authorize(&request("rpcutil", "ping", "c"), &node());
        assert!(!d.allowed);
        assert!(d.reason.starts_with("no policy file for agent rpcutil"), "{}", d.reason);

        std::fs::write(dir.path().join("default.policy"), "policy default allow\n").unwrap();
        let d = policy.authorize(&request("rpcutil", "ping", "c"), &node());
        assert!(d.allowed, "{d:?}");
        assert!(d.reason.contains("default.policy"));

        std::fs::write(dir.path().join("rpcutil.policy"), "policy default deny\n").unwrap();
        let d = policy.authorize(&request("rpcutil", "ping", "c"), &node());
        assert!(!d.allowed);
        assert!(d.reason.contains("rpcutil.policy"), "{}", d.reason);
        // Other agents still use default.policy.
        assert!(policy.authorize(&request("shell", "run", "c"), &node()).allowed);

        // A broken file denies (it does not fall back to default.policy).
        std::fs::write(dir.path().join("rpcutil.policy"), "allow everyone\n").unwrap();
        let d = policy.authorize(&request("rpcutil", "ping", "c"), &node());
        assert!(!d.allowed);
        assert!(d.reason.contains("rpcutil.policy:1"), "{}", d.reason);

        assert!(!policy.authorize(&request("../x", "ping", "c"), &node()).allowed);
        let none = ActionPolicy::new(None).authorize(&request("rpcutil", "ping", "c"), &node());
        assert!(!none.allowed && none.reason.contains("no policy directory"));
    }

    #[test]
    fn cached_files_are_trusted_until_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let policy = ActionPolicy::with_recheck(Some(dir.path().into()), Duration::from_secs(3600));
        std::fs::write(dir.path().join("rpcutil.policy"), "policy default allow\n").unwrap();
        assert!(policy.authorize(&request("rpcutil", "ping", "c"), &node()).allowed);
        std::fs::write(dir.path().join("rpcutil.policy"), "policy default deny\n").unwrap();
        assert!(policy.authorize(&request("rpcutil", "ping", "c"), &node()).allowed);
    }
}
