//! Discovery filters on the node side: does a request concern this node?
//!
//! A request is compiled once ([`CompiledFilter::new`]) and then tested against every node a
//! server hosts, so regular expressions are built once per request, not once per node.
//!
//! Semantics after Choria (`protocol/filter.go`): facts, classes and agents are ANDed,
//! identities ORed; a value written `/regex/` matches by regular expression. Compound
//! filters are not evaluated yet, and a request carrying one matches no node: running an
//! action on nodes the caller did not select is worse than not running it.

use chorus_schemas::rpc::{FactFilter, Filter};
use regex::Regex;

use super::{fact_text, NodeContext, RpcError};

/// A name or a `/regex/`.
#[derive(Debug)]
enum Pattern {
    Exact(String),
    Regex(Regex),
}

impl Pattern {
    fn new(text: &str) -> Result<Self, regex::Error> {
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

    fn any(&self, values: &[String]) -> bool {
        values.iter().any(|v| self.matches(v))
    }
}

/// The body of `/body/`, if `text` is so delimited.
fn regex_body(text: &str) -> Option<&str> {
    (text.len() >= 2 && text.starts_with('/') && text.ends_with('/')).then(|| &text[1..text.len() - 1])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug)]
enum FactTest {
    Compare(Op, String),
    Regex(Regex),
}

#[derive(Debug)]
struct CompiledFact {
    fact: String,
    test: FactTest,
}

impl CompiledFact {
    fn new(f: &FactFilter) -> Result<Self, String> {
        let regex = |body: &str| Regex::new(body).map_err(|e| format!("fact {}: bad regex: {e}", f.fact));
        let test = match f.operator.as_str() {
            "=~" => FactTest::Regex(regex(regex_body(&f.value).unwrap_or(&f.value))?),
            "==" | "=" => match regex_body(&f.value) {
                Some(body) => FactTest::Regex(regex(body)?),
                None => FactTest::Compare(Op::Eq, f.value.clone()),
            },
            "!=" => FactTest::Compare(Op::Ne, f.value.clone()),
            "<" => FactTest::Compare(Op::Lt, f.value.clone()),
            ">" => FactTest::Compare(Op::Gt, f.value.clone()),
            "<=" => FactTest::Compare(Op::Le, f.value.clone()),
            ">=" => FactTest::Compare(Op::Ge, f.value.clone()),
            other => return Err(format!("fact {}: unknown operator {other:?}", f.fact)),
        };
        Ok(CompiledFact { fact: f.fact.clone(), test })
    }

    fn matches(&self, node: &NodeContext) -> bool {
        let Some(value) = node.fact(&self.fact) else {
            return false;
        };
        let value = fact_text(value);
        match &self.test {
            FactTest::Regex(re) => re.is_match(&value),
            FactTest::Compare(op, want) => {
                // Numbers compare as numbers (so 9 < 10), anything else as text.
                let ordering = match (value.parse::<f64>(), want.parse::<f64>()) {
                    (Ok(a), Ok(b)) => a.partial_cmp(&b),
                    _ => Some(value.as_ref().cmp(want.as_str())),
                };
                let Some(ordering) = ordering else {
                    return false;
                };
                match op {
                    Op::Eq => ordering.is_eq(),
                    Op::Ne => ordering.is_ne(),
                    Op::Lt => ordering.is_lt(),
                    Op::Gt => ordering.is_gt(),
                    Op::Le => ordering.is_le(),
                    Op::Ge => ordering.is_ge(),
                }
            }
        }
    }
}

/// A discovery filter ready to test many nodes.
#[derive(Debug)]
pub(crate) struct CompiledFilter {
    all: bool,
    compound: bool,
    facts: Vec<CompiledFact>,
    classes: Vec<Pattern>,
    agents: Vec<Pattern>,
    identities: Vec<Pattern>,
}

impl CompiledFilter {
    /// Compiles `filter`; an invalid regex or operator is an error (the request then
    /// concerns no node).
    pub(crate) fn new(filter: &Filter) -> Result<Self, String> {
        let patterns = |values: &[String], what: &str| {
            values
                .iter()
                .map(|v| Pattern::new(v).map_err(|e| format!("{what} {v:?}: bad regex: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(CompiledFilter {
            all: filter.is_empty(),
            compound: !filter.compound.is_empty(),
            facts: filter.fact.iter().map(CompiledFact::new).collect::<Result<_, _>>()?,
            classes: patterns(&filter.cf_class, "class")?,
            agents: patterns(&filter.agent, "agent")?,
            identities: patterns(&filter.identity, "identity")?,
        })
    }

    /// Whether the node with `agents` matches.
    pub(crate) fn matches(&self, node: &NodeContext, agents: &[String]) -> bool {
        if self.all {
            return true;
        }
        if self.compound {
            return false;
        }
        (self.identities.is_empty() || self.identities.iter().any(|p| p.matches(&node.identity)))
            && self.facts.iter().all(|f| f.matches(node))
            && self.classes.iter().all(|p| p.any(&node.classes))
            && self.agents.iter().all(|p| p.any(agents))
    }
}

/// Parses a command-line fact filter such as `country=uk`, `os.release>=12` or
/// `env=~/^prod/` (also `env=/^prod/`) into a [`FactFilter`].
pub fn parse_fact_filter(text: &str) -> Result<FactFilter, RpcError> {
    // Longest operators first, so `>=` is not read as `>` followed by `=...`.
    const OPERATORS: [&str; 8] = ["=~", "==", "!=", "<=", ">=", "=", "<", ">"];
    let found = OPERATORS
        .iter()
        .filter_map(|op| text.find(op).map(|at| (at, *op)))
        .min_by_key(|(at, op)| (*at, usize::MAX - op.len()));
    let Some((at, op)) = found else {
        return Err(RpcError::Invalid(format!("fact filter {text:?} has no operator")));
    };
    let fact = text[..at].trim();
    let value = text[at + op.len()..].trim();
    if fact.is_empty() {
        return Err(RpcError::Invalid(format!("fact filter {text:?} has no fact name")));
    }
    let operator = match op {
        "=" if regex_body(value).is_some() => "=~",
        "=" => "==",
        other => other,
    };
    let filter = FactFilter { fact: fact.to_string(), operator: operator.to_string(), value: value.to_string() };
    CompiledFact::new(&filter).map_err(RpcError::Invalid)?;
    Ok(filter)
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
        let compound = Filter { compound: vec![vec![Default::default()]], ..Default::default() };
        assert!(!matches(compound));
    }
}
