//! Discovery filters on the node side: does a request concern this node?
//!
//! A request is compiled once ([`CompiledFilter::new`]) and then tested against every node a
//! server hosts, so regular expressions are built once per request, not once per node.
//!
//! Semantics after Choria (`protocol/filter.go`): facts, classes and agents are ANDed,
//! identities ORed; a value written `/regex/` matches by regular expression. Facts and
//! classes match exactly as in Choria and as Action Policy does ([`crate::facts`]);
//! compound expressions as in [`crate::compound`]. The same matcher serves nodes (does this
//! request concern me?) and inventory discovery (which registered nodes does it concern?),
//! so the two can never disagree.

use chorus_schemas::rpc::{FactFilter, Filter};
use regex::Regex;

use super::compound::Compound;
use super::facts::{class_matches, FactMatcher, FactOp};
use super::{NodeContext, RpcError};

/// A name or a `/regex/`.
#[derive(Debug)]
pub(crate) enum Pattern {
    Exact(String),
    Regex(Regex),
}

impl Pattern {
    pub(crate) fn new(text: &str) -> Result<Self, regex::Error> {
        match regex_body(text) {
            Some(body) => Regex::new(body).map(Pattern::Regex),
            None => Ok(Pattern::Exact(text.to_string())),
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(s) => s == value,
            Pattern::Regex(re) => re.is_match(value),
        }
    }

    pub(crate) fn any(&self, values: &[String]) -> bool {
        values.iter().any(|v| self.matches(v))
    }
}

/// The body of `/body/`, if `text` is so delimited.
fn regex_body(text: &str) -> Option<&str> {
    (text.len() >= 2 && text.starts_with('/') && text.ends_with('/')).then(|| &text[1..text.len() - 1])
}

/// A discovery filter ready to test many nodes.
#[derive(Debug)]
pub struct CompiledFilter {
    all: bool,
    compounds: Vec<Compound>,
    facts: Vec<FactMatcher>,
    classes: Vec<String>,
    agents: Vec<Pattern>,
    identities: Vec<Pattern>,
}

impl CompiledFilter {
    /// Compiles `filter`; an invalid regex or operator is an error (the request then
    /// concerns no node).
    pub fn new(filter: &Filter) -> Result<Self, String> {
        let patterns = |values: &[String], what: &str| {
            values
                .iter()
                .map(|v| Pattern::new(v).map_err(|e| format!("{what} {v:?}: bad regex: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        for class in &filter.cf_class {
            if let Some(body) = regex_body(class) {
                Regex::new(body).map_err(|e| format!("class {class:?}: bad regex: {e}"))?;
            }
        }
        Ok(CompiledFilter {
            all: filter.is_empty(),
            compounds: filter.compound.iter().map(|entry| compound(entry)).collect::<Result<_, _>>()?,
            facts: filter
                .fact
                .iter()
                .map(|f| FactMatcher::new(&f.fact, &f.operator, &f.value))
                .collect::<Result<_, _>>()?,
            classes: filter.cf_class.clone(),
            agents: patterns(&filter.agent, "agent")?,
            identities: patterns(&filter.identity, "identity")?,
        })
    }

    /// Whether the node with `agents` matches.
    pub fn matches(&self, node: &NodeContext, agents: &[String]) -> bool {
        if self.all {
            return true;
        }
        (self.identities.is_empty() || self.identities.iter().any(|p| p.matches(&node.identity)))
            && self.facts.iter().all(|f| f.matches(node.fact(f.fact())))
            && self.classes.iter().all(|c| class_matches(c, &node.classes))
            && self.agents.iter().all(|p| p.any(agents))
            && self.compounds.iter().all(|c| c.matches(node, agents))
    }
}

/// One compound entry as Choria encodes it: a list holding one `{"expr": "..."}`.
fn compound(entry: &[chorus_schemas::rpc::JsonObject]) -> Result<Compound, String> {
    match entry {
        [object] => match object.get("expr") {
            Some(serde_json::Value::String(text)) => Compound::compile(text),
            _ => Err("a compound filter entry without an \"expr\" string".into()),
        },
        _ => Err(format!("a compound filter entry of {} statements (expected one expression)", entry.len())),
    }
}

/// Checks `filter` as a client must before sending it: every regex, fact operator and
/// compound expression compiles. A request with a filter nodes cannot use would reach no
/// node and look like an empty fleet.
pub fn check_filter(filter: &Filter) -> Result<(), RpcError> {
    CompiledFilter::checked(filter).map(drop)
}

impl CompiledFilter {
    /// Compiles `filter` as a client must check it ([`check_filter`]), for a client that
    /// also selects nodes with it (inventory discovery), so it is compiled once.
    pub fn checked(filter: &Filter) -> Result<Self, RpcError> {
        let invalid = |e: String| RpcError::Invalid(format!("filter: {e}; nothing was sent"));
        let compiled = CompiledFilter::new(filter).map_err(invalid)?;
        // A node takes a fact regex that does not compile as matching nothing (as Choria
        // does); a client must not send one.
        if let Some(bad) = compiled.facts.iter().find(|f| f.op() == FactOp::Re && !f.has_regex()) {
            return Err(invalid(format!("fact filter {:?}: the regex does not compile", bad.value())));
        }
        Ok(compiled)
    }
}

/// A filter from its command-line parts (Choria's `-F`, `-C`, `-A`, `-I`, `-S`), checked
/// as [`check_filter`] checks it: the one way the command line and the dashboard build one.
pub fn filter_from_parts(
    facts: &[String],
    classes: &[String],
    agents: &[String],
    identities: &[String],
    compound: &[String],
) -> Result<Filter, RpcError> {
    let filter = Filter {
        fact: facts.iter().map(|f| parse_fact_filter(f)).collect::<Result<_, _>>()?,
        cf_class: classes.to_vec(),
        agent: agents.to_vec(),
        identity: identities.to_vec(),
        compound: compound
            .iter()
            .map(|expr| {
                let mut entry = chorus_schemas::rpc::JsonObject::new();
                entry.insert("expr".into(), expr.clone().into());
                vec![entry]
            })
            .collect(),
    };
    check_filter(&filter)?;
    Ok(filter)
}

/// The filter a discovery step selects with: the request's, with the called agent as an
/// agent filter (as Choria adds it), so only nodes that have the agent are found.
pub fn discovery_filter(filter: &Filter, agent: &str) -> Filter {
    let mut discovery = filter.clone();
    if !discovery.agent.iter().any(|a| a == agent) {
        discovery.agent.push(agent.to_string());
    }
    discovery
}

/// Parses a command-line fact filter such as `country=uk`, `os.release>=12` or
/// `env=~/^prod/` (also `env=/^prod/`) into a [`FactFilter`], as Choria parses `-F`.
pub fn parse_fact_filter(text: &str) -> Result<FactFilter, RpcError> {
    let matcher = FactMatcher::parse(text).map_err(RpcError::Invalid)?;
    if matcher.op() == FactOp::Re {
        // Choria lets a bad regex match nothing; on the command line it is a typo to report.
        regex::Regex::new(matcher.value().trim_matches('/'))
            .map_err(|e| RpcError::Invalid(format!("fact filter {text:?}: bad regex: {e}")))?;
    }
    Ok(FactFilter {
        fact: matcher.fact().to_string(),
        operator: matcher.op().as_str().to_string(),
        value: matcher.value().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeContext {
        let mut n = NodeContext::new("web1.example.net", "choria");
        n.facts.insert("country".into(), json!("uk"));
        n.facts.insert("cpus".into(), json!(8));
        n.facts.insert("os".into(), json!({"family": "debian"}));
        n.classes = vec!["webserver".into()];
        n
    }

    fn matches(filter: Filter) -> bool {
        CompiledFilter::new(&filter).unwrap().matches(&node(), &["rpcutil".to_string()])
    }

    fn fact(text: &str) -> Filter {
        Filter { fact: vec![parse_fact_filter(text).unwrap()], ..Default::default() }
    }

    #[test]
    fn fact_filters() {
        assert!(matches(Filter::default()));
        assert!(matches(fact("country=uk")));
        assert!(!matches(fact("country=de")));
        assert!(matches(fact("country=/^u/")));
        assert!(matches(fact("os.family=~debian")));
        assert!(matches(fact("cpus>=8")));
        assert!(matches(fact("cpus>4")));
        assert!(!matches(fact("cpus<8")));
        assert!(matches(fact("cpus!=10")));
        assert!(!matches(fact("missing=1")));
        assert_eq!(parse_fact_filter("a>=1").unwrap().operator, ">=");
        assert_eq!(parse_fact_filter("a=/x/").unwrap().operator, "=~");
        assert!(parse_fact_filter("nothing").is_err());
        assert!(parse_fact_filter("a=/(/").is_err());
    }

    #[test]
    fn identity_class_agent_filters() {
        let f = |identity: &[&str], class: &[&str], agent: &[&str]| Filter {
            identity: identity.iter().map(|s| s.to_string()).collect(),
            cf_class: class.iter().map(|s| s.to_string()).collect(),
            agent: agent.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(matches(f(&["other", "web1.example.net"], &[], &[])));
        assert!(matches(f(&["/^web/"], &[], &[])));
        assert!(!matches(f(&["web1"], &[], &[])));
        assert!(matches(f(&[], &["webserver"], &["rpcutil"])));
        assert!(!matches(f(&[], &["webserver", "db"], &[])));
        assert!(!matches(f(&[], &[], &["shell"])));
        // Compound entries as Choria encodes them: one {"expr": ...} each; all must hold.
        let compound = |exprs: &[&str]| Filter {
            compound: exprs.iter().map(|e| vec![json!({"expr": e}).as_object().unwrap().clone()]).collect(),
            ..Default::default()
        };
        assert!(matches(compound(&[r#"with("country=uk") and with("webserver")"#, r#"with("rpcutil")"#])));
        assert!(!matches(compound(&[r#"with("country=uk")"#, r#"with("db")"#])));
        let shapeless = Filter { compound: vec![vec![Default::default()]], ..Default::default() };
        assert!(CompiledFilter::new(&shapeless).is_err(), "an entry without an expression is refused");
    }
}
