//! Compound (`-S`) filters: Choria's expressions over a node's facts, classes and agents,
//! in expr, the language Choria evaluates them in (through the `expr-lang` crate), so a
//! Choria user's `-S` strings work unchanged.
//!
//! The environment, as Choria's: the variables `agents`, `classes` and `facts`, and the
//! functions `with(filter)` (a fact filter when it reads as one, else a class or an agent,
//! exact or `/regex/`), `fact(path)` (the value at a dotted path, `nil` when missing) and
//! `include(list, value)`. An expression must give a boolean; one that fails on a node (a
//! comparison with a missing fact, say) does not match it, as in Choria.

use std::sync::LazyLock;

use expr::{Context, Environment, Program, Value};
use serde_json::Value as Json;

use super::facts::{class_matches, FactMatcher};
use super::filter::Pattern;
use super::NodeContext;

/// The functions compound filters may call besides expr's own, with their arity.
const FUNCTIONS: [(&str, usize); 4] = [("with", 1), ("fact", 1), ("get_fact", 1), ("include", 2)];

static ENVIRONMENT: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.add_function("with", |call| {
        let [Value::String(needle)] = call.args.as_slice() else {
            expr::bail!("with() takes one string");
        };
        let lookup = |name: &str| call.ctx.get(name).cloned().unwrap_or(Value::Nil);
        Ok(Value::Bool(with(needle, &lookup("facts"), &strings(&lookup("classes")), &strings(&lookup("agents")))))
    });
    env.add_function("fact", |call| {
        let [Value::String(path)] = call.args.as_slice() else {
            expr::bail!("fact() takes one string");
        };
        Ok(call.ctx.get("facts").and_then(|facts| lookup(facts, path)).cloned().unwrap_or(Value::Nil))
    });
    // Choria's expression watcher calls it `get_fact`.
    env.add_function("get_fact", |call| {
        let [Value::String(path)] = call.args.as_slice() else {
            expr::bail!("get_fact() takes one string");
        };
        Ok(call.ctx.get("facts").and_then(|facts| lookup(facts, path)).cloned().unwrap_or(Value::Nil))
    });
    env.add_function("include", |call| match include(&call.args) {
        Some(found) => Ok(Value::Bool(found)),
        None => expr::bail!("include() takes a list and a value"),
    });
    env
});

/// `include(list, value)`: whether the list holds the value (numbers compared by value;
/// false when the first argument is not a list), as Choria's compound filters and reply
/// filters both offer it. `None` for the wrong number of arguments.
pub(crate) fn include(args: &[Value]) -> Option<bool> {
    let [haystack, needle] = args else { return None };
    let Value::Array(items) = haystack else { return Some(false) };
    Some(items.iter().any(|item| same(item, needle)))
}

/// One compiled compound expression.
#[derive(Debug, Clone)]
pub(crate) struct Compound {
    text: String,
    program: Program,
}

impl Compound {
    /// Compiles `text`, and refuses what can only be a mistake: a syntax error, or a call of
    /// a function that does not exist or with the wrong number of arguments (found by
    /// running it once on a node with nothing).
    pub(crate) fn compile(text: &str) -> Result<Self, String> {
        let program = expr::compile(text).map_err(|e| format!("compound filter {text:?}: {e}"))?;
        let compound = Compound { text: text.to_string(), program };
        let empty = NodeContext::new("", "");
        if let Err(e) = compound.evaluate(&empty, &[]) {
            let lower = e.to_lowercase();
            if lower.contains("unknown function") || FUNCTIONS.iter().any(|(f, _)| lower.contains(&format!("{f}()"))) {
                return Err(format!("compound filter {text:?}: {e}"));
            }
        }
        Ok(compound)
    }

    /// Whether the node matches; an expression that fails or does not give a boolean does
    /// not match (logged at debug level, once per node and request).
    pub(crate) fn matches(&self, node: &NodeContext, agents: &[String]) -> bool {
        match self.evaluate(node, agents) {
            Ok(matched) => matched,
            Err(e) => {
                tracing::debug!(identity = %node.identity, filter = %self.text, "compound filter failed: {e}");
                false
            }
        }
    }

    fn evaluate(&self, node: &NodeContext, agents: &[String]) -> Result<bool, String> {
        let mut ctx = Context::default();
        ctx.insert("agents", Value::Array(agents.iter().map(|a| Value::String(a.clone())).collect()));
        ctx.insert("classes", Value::Array(node.classes.iter().map(|c| Value::String(c.clone())).collect()));
        ctx.insert("facts", from_json(&Json::Object(node.facts.clone())));
        match ENVIRONMENT.run(&self.program, &ctx).map_err(|e| e.to_string())? {
            Value::Bool(matched) => Ok(matched),
            other => Err(format!("gave {other:?}, not a boolean")),
        }
    }
}

/// A condition in expr over named values, with the functions compound filters have
/// (`fact`/`get_fact`, `include`, `with`): what Choria's machine `expression` watcher
/// evaluates over a machine's `data`, `facts` and `identity`.
#[derive(Clone, Debug)]
pub struct Condition {
    text: String,
    program: Program,
}

impl Condition {
    /// Compiles `text`; a syntax error names it.
    pub fn compile(text: &str) -> Result<Self, String> {
        let program = expr::compile(text).map_err(|e| format!("expression {text:?}: {e}"))?;
        Ok(Condition { text: text.to_string(), program })
    }

    /// Whether it holds over `values` (JSON, by name); an error, or a value that is not a
    /// boolean, is an error naming the expression.
    pub fn holds(&self, values: &[(&str, &Json)]) -> Result<bool, String> {
        let mut ctx = Context::default();
        for (name, value) in values {
            ctx.insert(*name, from_json(value));
        }
        match ENVIRONMENT.run(&self.program, &ctx).map_err(|e| format!("{}: {e}", self.text))? {
            Value::Bool(b) => Ok(b),
            other => Err(format!("{}: gave {other:?}, not a boolean", self.text)),
        }
    }
}

/// `with(needle)`: a fact filter when `needle` reads as one, else a class or an agent.
fn with(needle: &str, facts: &Value, classes: &[String], agents: &[String]) -> bool {
    if let Ok(matcher) = FactMatcher::parse(needle) {
        return matcher.matches(lookup(facts, matcher.fact()).map(to_json).as_ref());
    }
    class_matches(needle, classes) || Pattern::new(needle).is_ok_and(|agent| agent.any(agents))
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().filter_map(|i| i.as_string().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

/// The value at a dotted path (`os.family`, `disks.0.size`).
pub(crate) fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| match v {
        Value::Map(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Equal as Choria's `include` compares: numbers by value whatever their type.
fn same(a: &Value, b: &Value) -> bool {
    match (number(a), number(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// A JSON value as an expr value.
pub fn from_json(json: &Json) -> Value {
    match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => n.as_i64().map(Value::Integer).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(from_json).collect()),
        Json::Object(map) => Value::Map(map.iter().map(|(k, v)| (k.clone(), from_json(v))).collect()),
    }
}

/// An expr value as JSON (functions and other non-data values become null).
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Integer(i) => Json::from(*i),
        Value::Float(f) => Json::from(*f),
        Value::Bool(b) => Json::Bool(*b),
        Value::String(s) => Json::String(s.clone()),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(map) => Json::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        _ => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeContext {
        let mut node = NodeContext::new("web1.example.net", "choria");
        node.facts = json!({
            "customer": "acme", "environment": "staging", "cpus": 8, "load": 1.5,
            "os": {"family": "debian"}, "ips": ["10.0.2.15", "10.0.3.1"], "ports": [22, 443]
        })
        .as_object()
        .unwrap()
        .clone();
        node.classes = vec!["apache".into(), "prometheus::node".into()];
        node
    }

    fn matches(text: &str) -> bool {
        Compound::compile(text).unwrap().matches(&node(), &["rpcutil".to_string(), "shell".to_string()])
    }

    /// Choria's documented examples and the environment's pieces, matching and not.
    #[test]
    fn choria_expressions_match_as_in_choria() {
        assert!(matches(r#"(with("customer=acme") && with("environment=staging")) || with("/prometheus/")"#));
        assert!(matches(r#"with("customer=acme") and with("os.family=debian") and with("apache")"#));
        assert!(!matches(r#"with("customer=globex") or with("nginx")"#));
        assert!(matches(r#"with("shell") and not with("puppet")"#), "agents by name");
        assert!(matches(r#"with("cpus>=4") && fact("load") < 2"#));
        assert!(matches(r#"include(fact("ips"), "10.0.2.15") && include(fact("ports"), 443)"#));
        assert!(matches(r#"fact("os.family") == "debian" && "apache" in classes && "rpcutil" in agents"#));
        assert!(matches(r#"fact("os.family") matches "^deb""#));
        assert!(!matches(r#"fact("missing") == "x""#), "a missing fact is nil");
        assert!(!matches(r#"fact("missing") > 3"#), "an error on the node does not match");
        assert!(!matches(r#"fact("cpus")"#), "not a boolean: no match");
    }

    /// What can only be a mistake is an error on the client.
    #[test]
    fn malformed_expressions_are_refused() {
        for text in [r#"with("apache" and"#, r#"wiht("apache")"#, r#"with("a", "b")"#, "((", ""] {
            assert!(Compound::compile(text).is_err(), "{text:?} compiled");
        }
    }
}
