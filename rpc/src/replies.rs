//! Reading replies as an operator does: `--filter-replies` expressions and the summaries an
//! action's description asks for (its DDL `aggregate` entries).
//!
//! Both follow Choria's client (`client/reply.go`, `aggregate/*.go`). Where Choria only logs a
//! reply filter that does not compile (and then hides every reply), Chorus refuses it before
//! anything is sent.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chorus_schemas::{RpcReply, StatusCode};
use expr::{Context, Environment, Program, Value};
use serde_json::{Map, Value as Json};

use super::compound::{from_json, include, lookup};

/// Status tests `--filter-replies` may call, with the status each is true for.
const STATUS_FUNCTIONS: [(&str, StatusCode); 6] = [
    ("ok", StatusCode::Ok),
    ("aborted", StatusCode::Aborted),
    ("unknown_action", StatusCode::UnknownAction),
    ("missing_data", StatusCode::MissingData),
    ("invalid_data", StatusCode::InvalidData),
    ("unknown_error", StatusCode::UnknownError),
];

static ENVIRONMENT: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, status) in STATUS_FUNCTIONS {
        env.add_function(name, move |call| {
            Ok(Value::Bool(call.ctx.get("code") == Some(&Value::Integer(status as i64))))
        });
    }
    env.add_function("data", |call| {
        let [Value::String(path)] = call.args.as_slice() else {
            expr::bail!("data() takes one string");
        };
        Ok(call.ctx.get("reply_data").and_then(|d| lookup(d, path)).cloned().unwrap_or(Value::Nil))
    });
    env.add_function("sender", |call| Ok(call.ctx.get("sender").cloned().unwrap_or(Value::Nil)));
    env.add_function("include", |call| match include(&call.args) {
        Some(found) => Ok(Value::Bool(found)),
        None => expr::bail!("include() takes a list and a value"),
    });
    env
});

/// A compiled `--filter-replies` expression: which replies are shown, summarised and
/// written as JSON (all are counted). It sees `msg`, `code`, and the functions `ok()`,
/// `aborted()`, `unknown_action()`, `missing_data()`, `invalid_data()`, `unknown_error()`,
/// `data(path)` (a dotted path into the reply's data), `sender()` and `include(list, v)`.
#[derive(Debug, Clone)]
pub struct ReplyFilter {
    text: String,
    program: Program,
}

impl ReplyFilter {
    /// Compiles `text`, and refuses a syntax error, an unknown function or an expression
    /// that does not give a boolean for an OK reply with no data (tried once).
    pub fn compile(text: &str) -> Result<Self, String> {
        let program = expr::compile(text).map_err(|e| format!("--filter-replies {text:?}: {e}"))?;
        let filter = ReplyFilter { text: text.to_string(), program };
        let probe = RpcReply {
            protocol: String::new(),
            requestid: String::new(),
            identity: String::new(),
            callerid: String::new(),
            collective: String::new(),
            agent: String::new(),
            action: String::new(),
            statuscode: StatusCode::Ok,
            statusmsg: String::new(),
            data: Map::new(),
            authorized: true,
            policy: None,
            time: 0,
        };
        match filter.evaluate(&probe) {
            Ok(_) => Ok(filter),
            Err(e) if e.to_lowercase().contains("unknown function") || e.contains("not a boolean") => {
                Err(format!("--filter-replies {text:?}: {e}"))
            }
            // Other failures depend on the data (a comparison with a missing output).
            Err(_) => Ok(filter),
        }
    }

    /// Whether `reply` is kept; an expression that fails on it does not keep it.
    pub fn matches(&self, reply: &RpcReply) -> bool {
        self.evaluate(reply).unwrap_or_else(|e| {
            tracing::debug!(identity = %reply.identity, filter = %self.text, "reply filter failed: {e}");
            false
        })
    }

    fn evaluate(&self, reply: &RpcReply) -> Result<bool, String> {
        let mut ctx = Context::default();
        ctx.insert("msg", Value::String(reply.statusmsg.clone()));
        ctx.insert("code", Value::Integer(reply.statuscode as i64));
        ctx.insert("sender", Value::String(reply.identity.clone()));
        ctx.insert("reply_data", from_json(&Json::Object(reply.data.clone())));
        match ENVIRONMENT.run(&self.program, &ctx).map_err(|e| e.to_string())? {
            Value::Bool(kept) => Ok(kept),
            other => Err(format!("gave {other:?}, not a boolean")),
        }
    }
}

/// One DDL aggregate being computed.
#[derive(Debug, Clone)]
enum Aggregate {
    /// Counts per distinct value (arrays count each element; null is skipped).
    Summary(BTreeMap<String, u64>),
    /// Mean of numeric values (numeric strings included).
    Average { sum: f64, count: u64 },
}

/// The summaries an action's DDL asks for, fed every kept reply.
#[derive(Debug, Clone, Default)]
pub struct Summaries {
    /// Output name → its label and aggregate, in DDL order (a later entry for the same
    /// output replaces an earlier one, as in Choria).
    entries: Vec<(String, String, Aggregate)>,
}

impl Summaries {
    /// The summaries of `action` in its DDL; entries Chorus cannot compute (Choria's `chart`,
    /// malformed ones) are skipped, as Choria skips them.
    pub fn of(action: &crate::ddl::Action) -> Self {
        let mut entries: Vec<(String, String, Aggregate)> = Vec::new();
        for entry in &action.aggregate {
            let Some(function) = entry.get("function").and_then(Json::as_str) else { continue };
            let Some(output) = entry.get("args").and_then(|a| a.get(0)).and_then(Json::as_str) else { continue };
            let aggregate = match function {
                "summary" | "boolean_summary" => Aggregate::Summary(BTreeMap::new()),
                "average" => Aggregate::Average { sum: 0.0, count: 0 },
                _ => continue,
            };
            let label = action.output.get(output).map(|o| o.display_as.clone()).unwrap_or_else(|| output.to_string());
            entries.retain(|(o, _, _)| o != output);
            entries.push((output.to_string(), label, aggregate));
        }
        Summaries { entries }
    }

    /// Whether there is anything to summarise.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds one reply's data.
    pub fn add(&mut self, data: &Map<String, Json>) {
        for (output, _, aggregate) in &mut self.entries {
            let Some(value) = data.get(output.as_str()) else { continue };
            match aggregate {
                Aggregate::Summary(counts) => {
                    let values: Vec<&Json> = match value {
                        Json::Array(items) => items.iter().collect(),
                        other => vec![other],
                    };
                    for v in values {
                        let key = match v {
                            Json::Null => continue,
                            Json::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        *counts.entry(key).or_default() += 1;
                    }
                }
                Aggregate::Average { sum, count } => {
                    let number = match value {
                        Json::Number(n) => n.as_f64(),
                        Json::String(s) => s.trim().parse().ok(),
                        _ => None,
                    };
                    if let Some(n) = number {
                        *sum += n;
                        *count += 1;
                    }
                }
            }
        }
    }

    /// `{output: {value: count}}` or `{output: {"average": mean}}`, as Choria's `--json`
    /// writes `summaries`.
    pub fn to_json(&self) -> Map<String, Json> {
        self.entries
            .iter()
            .map(|(output, _, aggregate)| {
                let value = match aggregate {
                    Aggregate::Summary(counts) => {
                        Json::Object(counts.iter().map(|(k, n)| (k.clone(), Json::from(*n))).collect())
                    }
                    Aggregate::Average { sum, count } => {
                        let mean = if *count == 0 { Json::Null } else { Json::from(*sum / *count as f64) };
                        serde_json::json!({ "average": mean })
                    }
                };
                (output.clone(), value)
            })
            .collect()
    }

    /// The text Choria prints: `Summary of <label>:` then the values by count, most first.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (_, label, aggregate) in &self.entries {
            out.push_str(&format!("Summary of {label}:\n\n"));
            match aggregate {
                Aggregate::Summary(counts) if counts.is_empty() => out.push_str("   No summary received\n"),
                Aggregate::Summary(counts) => {
                    let mut rows: Vec<(&String, &u64)> = counts.iter().collect();
                    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
                    for (value, n) in rows {
                        out.push_str(&format!("   {value:>width$}: {n}\n"));
                    }
                }
                Aggregate::Average { count: 0, .. } => out.push_str("   No summary received\n"),
                Aggregate::Average { sum, count } => out.push_str(&format!("   Average: {:.3}\n", sum / *count as f64)),
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(identity: &str, code: StatusCode, data: Json) -> RpcReply {
        let mut probe = RpcReply {
            protocol: String::new(),
            requestid: String::new(),
            identity: identity.into(),
            callerid: String::new(),
            collective: String::new(),
            agent: String::new(),
            action: String::new(),
            statuscode: code,
            statusmsg: "msg".into(),
            data: Map::new(),
            authorized: true,
            policy: None,
            time: 0,
        };
        probe.data = data.as_object().unwrap().clone();
        probe
    }

    #[test]
    fn reply_filters_select_as_choria_does() {
        let a = reply("a", StatusCode::Ok, json!({"ensure": "5.3.3", "size": 10, "tags": ["x"]}));
        let b = reply("b", StatusCode::Aborted, json!({"ensure": "absent"}));
        let keep = |text: &str| {
            let f = ReplyFilter::compile(text).unwrap();
            [&a, &b].into_iter().filter(|r| f.matches(r)).map(|r| r.identity.clone()).collect::<Vec<_>>()
        };
        assert_eq!(keep(r#"ok() && data("ensure") == "5.3.3""#), ["a"]);
        assert_eq!(keep("aborted()"), ["b"]);
        assert_eq!(keep(r#"code == 1 || data("size") > 5"#), ["a", "b"]);
        assert_eq!(keep(r#"sender() == "b" and msg == "msg""#), ["b"]);
        assert_eq!(keep(r#"include(data("tags"), "x")"#), ["a"]);
        for bad in ["ok(", "okay()", r#"data("x")"#, ""] {
            assert!(ReplyFilter::compile(bad).is_err(), "{bad:?} compiled");
        }
    }

    #[test]
    fn summaries_count_values_and_average_numbers() {
        let ddl = crate::agents::builtin_ddl("rpcutil").unwrap();
        let mut s = Summaries::of(ddl.action("collective_info").unwrap());
        s.add(&json!({"collectives": ["a", "b"]}).as_object().unwrap().clone());
        s.add(&json!({"collectives": ["a"]}).as_object().unwrap().clone());
        assert_eq!(Json::Object(s.to_json()), json!({"collectives": {"a": 2, "b": 1}}));
        let text = s.render();
        assert!(text.contains("a: 2") && text.find("a: 2") < text.find("b: 1"), "{text}");

        let action: crate::ddl::Action = serde_json::from_value(json!({
            "action": "x", "description": "", "input": {}, "display": "always",
            "output": {"load": {"description": "", "display_as": "Load", "type": "float"}},
            "aggregate": [{"function": "average", "args": ["load"]}, {"function": "chart", "args": ["load"]}]
        }))
        .unwrap();
        let mut s = Summaries::of(&action);
        for load in [json!(1.0), json!("2.0"), json!(null)] {
            s.add(&json!({ "load": load }).as_object().unwrap().clone());
        }
        assert_eq!(Json::Object(s.to_json()), json!({"load": {"average": 1.5}}));
        assert!(s.render().contains("Summary of Load:") && s.render().contains("Average: 1.500"));
    }
}
