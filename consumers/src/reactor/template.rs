//! Expressions and templates over an event, in expr: the language Choria's `-S` filters and
//! machine expressions use, so a rule reads like the filters an operator already writes.
//!
//! An expression sees `event` (the whole CloudEvent: `event.type`, `event.subject`,
//! `event.data.status`, ...), `data` (the event's data), `stream`, `sequence` and
//! `nats_subject`. A template is text with `{{ expression }}` parts.

use expr::{Context, ContextProvider, Environment, Program, Value};
use serde_json::Value as Json;

/// One compiled expression.
#[derive(Clone, Debug)]
pub struct Expression {
    text: String,
    program: Program,
}

fn environment() -> &'static Environment<'static> {
    static ENV: std::sync::LazyLock<Environment<'static>> = std::sync::LazyLock::new(Environment::new);
    &ENV
}

impl Expression {
    /// Compiles `text`; a syntax error names the expression.
    pub fn compile(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("an empty expression".into());
        }
        let program = expr::compile(text).map_err(|e| format!("expression {text:?}: {e}"))?;
        Ok(Expression { text: text.to_owned(), program })
    }

    /// Compiles `text` to run over an [`EventContext`]: `event.NAME` and `data.NAME` are read
    /// straight from the event rather than through a copy of `event` or `data` (expr copies a
    /// variable's whole value to read one field of it, per evaluation), with the same
    /// results, missing fields included. Only over an [`EventContext`].
    pub fn compile_over_events(text: &str) -> Result<Self, String> {
        let mut e = Self::compile(text)?;
        if let Some(direct) = direct_fields(text) {
            e.program = expr::compile(&direct).map_err(|err| format!("expression {text:?}: {err}"))?;
        }
        Ok(e)
    }

    /// Its text, as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Its value over `ctx`.
    pub fn eval(&self, ctx: &dyn ContextProvider) -> Result<Value, String> {
        environment().run(&self.program, ctx).map_err(|e| format!("{}: {e}", self.text))
    }

    /// Whether it is true over `ctx`; an error or a value that is not `true` is false, as a
    /// failing `-S` filter does not match.
    pub fn holds(&self, ctx: &dyn ContextProvider) -> bool {
        matches!(self.eval(ctx), Ok(Value::Bool(true)))
    }
}

/// Names `event.NAME` and `data.NAME` take in an expression compiled by
/// [`Expression::compile_over_events`].
const EVENT_FIELD: &str = "$event__";
const DATA_FIELD: &str = "$data__";

/// `text` with `event.NAME` and `data.NAME` (outside string literals, not a method call, not
/// a member of something else) written as single names; `None` when nothing changes or the
/// text binds names of its own (`let`), which could shadow `event` or `data`.
fn direct_fields(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ident_end = |mut i: usize| {
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        i
    };
    let (mut out, mut changed, mut i) = (String::with_capacity(text.len()), false, 0);
    // Inside `{ }` (a predicate, where a missing name falls back to `#`, or a map) nothing
    // is rewritten.
    let mut depth = 0usize;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && matches!(b.get(i + 1), Some(b'/' | b'*')) {
            // A comment, copied as it is.
            let end = if b[i + 1] == b'/' {
                text[i..].find('\n').map_or(b.len(), |n| i + n)
            } else {
                text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2)
            };
            out.push_str(&text[i..end]);
            i = end;
            continue;
        }
        match c {
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if matches!(c, b'"' | b'\'' | b'`') {
            // A string literal, copied as it is (escapes included).
            let mut j = i + 1;
            while j < b.len() && b[j] != c {
                j += if b[j] == b'\\' && c != b'`' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            out.push_str(&text[i..end]);
            i = end;
            continue;
        }
        // A member (`x.data`, `x . data`, `x?.data`) is not a name of its own.
        let before = text[..i].trim_end().as_bytes().last().copied();
        let starts_name = (c.is_ascii_alphabetic() || c == b'_')
            && (i == 0 || !(is_ident(b[i - 1]) || matches!(b[i - 1], b'$' | b'#')))
            && before != Some(b'.');
        if !starts_name {
            let ch = text[i..].chars().next().unwrap_or_default();
            out.push(ch);
            i += ch.len_utf8().max(1);
            continue;
        }
        let end = ident_end(i);
        let word = &text[i..end];
        if word == "let" {
            return None;
        }
        let prefix = match word {
            "event" => Some(EVENT_FIELD),
            "data" => Some(DATA_FIELD),
            _ => None,
        };
        if let (Some(prefix), 0) = (prefix, depth) {
            if end + 1 < b.len() && b[end] == b'.' && (b[end + 1].is_ascii_alphabetic() || b[end + 1] == b'_') {
                let name_end = ident_end(end + 1);
                if b.get(name_end) != Some(&b'(') {
                    out.push_str(prefix);
                    out.push_str(&text[end + 1..name_end]);
                    changed = true;
                    i = name_end;
                    continue;
                }
            }
        }
        out.push_str(word);
        i = end;
    }
    changed.then_some(out)
}

#[derive(Clone, Debug)]
enum Part {
    Text(String),
    Expr(Expression),
}

/// Text with `{{ expression }}` parts.
#[derive(Clone, Debug)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Compiles `text`; an unclosed `{{` or a bad expression is an error.
    pub fn compile(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| format!("template {text:?}: `{{{{` without `}}}}`"))?;
            parts.push(Part::Expr(Expression::compile(after[..end].trim())?));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The expressions in it.
    pub fn expressions(&self) -> impl Iterator<Item = &Expression> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e),
            Part::Text(_) => None,
        })
    }

    /// Whether the text has no expression in it.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The text with every expression replaced by its value (strings as they are, other
    /// values as JSON, nil as nothing).
    pub fn render(&self, ctx: &dyn ContextProvider) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Expr(e) => match e.eval(ctx)? {
                    Value::String(s) => out.push_str(&s),
                    Value::Nil => {}
                    other => out.push_str(&to_json(&other).to_string()),
                },
            }
        }
        Ok(out)
    }

    /// As [`Template::render`], but a template that is one expression gives its value with
    /// its type (a number stays a number, an object an object).
    pub fn render_json(&self, ctx: &dyn ContextProvider) -> Result<Json, String> {
        match self.parts.as_slice() {
            [Part::Expr(e)] => Ok(to_json(&e.eval(ctx)?)),
            _ => self.render(ctx).map(Json::String),
        }
    }
}

/// A JSON document whose strings (and object keys' values, at any depth) are templates.
#[derive(Clone, Debug)]
pub enum ValueTemplate {
    /// A value without templates.
    Plain(Json),
    /// A string with `{{ }}` parts.
    Text(Template),
    /// An array with templates inside.
    Array(Vec<ValueTemplate>),
    /// An object with templates inside.
    Object(Vec<(String, ValueTemplate)>),
}

impl ValueTemplate {
    /// Compiles every string in `value`.
    pub fn compile(value: &Json) -> Result<Self, String> {
        Ok(match value {
            Json::String(s) => {
                let t = Template::compile(s)?;
                if t.is_literal() {
                    ValueTemplate::Plain(value.clone())
                } else {
                    ValueTemplate::Text(t)
                }
            }
            Json::Array(items) => ValueTemplate::Array(items.iter().map(Self::compile).collect::<Result<_, _>>()?),
            Json::Object(map) => ValueTemplate::Object(
                map.iter().map(|(k, v)| Ok((k.clone(), Self::compile(v)?))).collect::<Result<_, String>>()?,
            ),
            other => ValueTemplate::Plain(other.clone()),
        })
    }

    /// The document with every template rendered.
    pub fn render(&self, ctx: &dyn ContextProvider) -> Result<Json, String> {
        Ok(match self {
            ValueTemplate::Plain(v) => v.clone(),
            ValueTemplate::Text(t) => t.render_json(ctx)?,
            ValueTemplate::Array(items) => Json::Array(items.iter().map(|i| i.render(ctx)).collect::<Result<_, _>>()?),
            ValueTemplate::Object(fields) => Json::Object(
                fields.iter().map(|(k, v)| Ok((k.clone(), v.render(ctx)?))).collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// What rule expressions see of one event, borrowed by every rule: `event` is the event as
/// read, `data` its own `data`, not copies; `stream` and `nats_subject` are made only when
/// an expression names them.
pub struct EventContext<'a> {
    event: &'a Value,
    stream: &'a str,
    sequence: Value,
    nats_subject: &'a str,
    made: [std::cell::OnceCell<Value>; 2],
}

impl<'a> EventContext<'a> {
    /// The context of `event` read at `stream`/`sequence` under `nats_subject`.
    pub fn new(event: &'a Value, stream: &'a str, sequence: u64, nats_subject: &'a str) -> Self {
        EventContext {
            event,
            stream,
            sequence: Value::Integer(i64::try_from(sequence).unwrap_or(i64::MAX)),
            nats_subject,
            made: Default::default(),
        }
    }
}

/// What a missing field reads as.
static NIL: Value = Value::Nil;

impl ContextProvider for EventContext<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        // As `x.name`: nil for a missing field, an error (no value) on a non-map.
        fn field<'v>(of: Option<&'v Value>, name: &str) -> Option<&'v Value> {
            match of {
                Some(Value::Map(map)) => Some(map.get(name).unwrap_or(&NIL)),
                _ => None,
            }
        }
        if let Some(name) = key.strip_prefix(EVENT_FIELD) {
            return field(Some(self.event), name);
        }
        if let Some(name) = key.strip_prefix(DATA_FIELD) {
            return field(self.get("data"), name);
        }
        match key {
            "event" => Some(self.event),
            "data" => match &self.event {
                Value::Map(map) => map.get("data"),
                _ => None,
            },
            "stream" => Some(self.made[0].get_or_init(|| Value::String(self.stream.to_owned()))),
            "sequence" => Some(&self.sequence),
            "nats_subject" => Some(self.made[1].get_or_init(|| Value::String(self.nats_subject.to_owned()))),
            _ => None,
        }
    }

    fn to_context(&self) -> Context {
        let mut ctx = Context::default();
        for key in ["event", "data", "stream", "sequence", "nats_subject"] {
            if let Some(v) = self.get(key) {
                ctx.insert(key, v.clone());
            }
        }
        ctx
    }
}

/// The context expressions see for one event, as an owned [`Context`] (for templates that
/// add names of their own).
pub fn context(event: &Json, stream: &str, sequence: u64, nats_subject: &str) -> Context {
    let mut ctx = Context::default();
    let value = from_json(event);
    if let Value::Map(map) = &value {
        ctx.insert("data", map.get("data").cloned().unwrap_or(Value::Nil));
    }
    ctx.insert("event", value);
    ctx.insert("stream", Value::String(stream.to_owned()));
    ctx.insert("sequence", Value::Integer(i64::try_from(sequence).unwrap_or(i64::MAX)));
    ctx.insert("nats_subject", Value::String(nats_subject.to_owned()));
    ctx
}

pub(crate) use chorus_rpc::expression::{from_json, to_json};

/// An expr value read straight from JSON, without a `serde_json::Value` in between: the
/// reactor reads every event into the form its expressions take, once.
pub struct ExprValue(pub Value);

impl<'de> serde::Deserialize<'de> for ExprValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ExprVisitor)
    }
}

pub(super) struct ExprVisitor;

impl<'de> serde::de::Visitor<'de> for ExprVisitor {
    type Value = ExprValue;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::Integer(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<ExprValue, E> {
        Ok(ExprValue(i64::try_from(v).map(Value::Integer).unwrap_or(Value::Float(v as f64))))
    }
    fn visit_f64<E>(self, v: f64) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::Float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::Nil))
    }
    fn visit_none<E>(self) -> Result<ExprValue, E> {
        Ok(ExprValue(Value::Nil))
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<ExprValue, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ExprValue, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(ExprValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(ExprValue(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ExprValue, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((k, ExprValue(v))) = map.next_entry::<String, ExprValue>()? {
            entries.push((k, v));
        }
        Ok(ExprValue(Value::Map(entries.into_iter().collect())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Context {
        let event = json!({"id": "e1", "type": "t", "subject": "web1", "data": {"status": "CRITICAL", "n": 3}});
        context(&event, "CHORUS_MACHINE", 7, "choria.machine.watcher.nagios.state")
    }

    #[test]
    fn json_reads_straight_into_expr_values() {
        let text = r#"{"a": [1, 2.5, "x", null, true], "b": {"c": 18446744073709551615}}"#;
        let ExprValue(v) = serde_json::from_str(text).unwrap();
        assert_eq!(v, from_json(&serde_json::from_str::<Json>(text).unwrap()));
    }

    #[test]
    fn expressions_see_the_event() {
        assert!(Expression::compile(r#"data.status == "CRITICAL" && event.subject == "web1""#).unwrap().holds(&ctx()));
        assert!(Expression::compile(r#"stream == "CHORUS_MACHINE" && sequence == 7"#).unwrap().holds(&ctx()));
        assert!(!Expression::compile("data.missing > 3").unwrap().holds(&ctx()), "an error does not hold");
        assert!(!Expression::compile("data.n").unwrap().holds(&ctx()), "not a boolean does not hold");
        assert!(Expression::compile("((").is_err());
        assert!(Expression::compile(" ").is_err());
    }

    #[test]
    fn fields_read_directly_give_what_members_give() {
        assert_eq!(
            direct_fields(r#"data.status == "data.x" && event.subject endsWith 'event.y' && event.data.n > 1"#)
                .unwrap(),
            r#"$data__status == "data.x" && $event__subject endsWith 'event.y' && $event__data.n > 1"#
        );
        assert_eq!(direct_fields("x.data.y + mydata.z + event?.a + event.f()"), None);
        assert_eq!(direct_fields("let e = 1; data.x == e"), None);
        assert_eq!(direct_fields("x. data.y + x?. data.z"), None, "members after spaced dots");
        assert_eq!(direct_fields("all(l, {data.x == 1}) && {a: event.b}.a == 1"), None, "not inside braces");
        assert_eq!(
            direct_fields("/* it's */ event.type == 'data.x' // event.y").unwrap(),
            "/* it's */ $event__type == 'data.x' // event.y"
        );
        let whole = serde_json::json!({"id": "e1", "type": "t", "subject": "web1", "data": {"status": "CRITICAL", "n": 3, "l": [1, 2]}});
        let odd = serde_json::json!({"id": "e2", "type": "t", "data": "text"});
        for event in [whole, odd] {
            let value = from_json(&event);
            let ctx = EventContext::new(&value, "S", 1, "x");
            for text in [
                r#"data.status == "CRITICAL" && event.subject == "web1""#,
                "data.missing == nil",
                "event.missing == nil && event.data.n == 3",
                "data.l[1] == 2 && len(data.l) == 2",
                "data.missing.deeper == nil",
                r#"event.subject startsWith "w" || data.n > 2"#,
            ] {
                let plain = Expression::compile(text).unwrap();
                let direct = Expression::compile_over_events(text).unwrap();
                assert_eq!(plain.eval(&ctx).ok(), direct.eval(&ctx).ok(), "{text} over {event}");
            }
        }
    }

    #[test]
    fn templates_render_text_and_typed_values() {
        let t = Template::compile("node {{ event.subject }} is {{ data.status }}").unwrap();
        assert_eq!(t.render(&ctx()).unwrap(), "node web1 is CRITICAL");
        assert_eq!(Template::compile("{{ data.n }}").unwrap().render_json(&ctx()).unwrap(), json!(3));
        assert_eq!(Template::compile("n={{ data.n }}").unwrap().render_json(&ctx()).unwrap(), json!("n=3"));
        assert!(Template::compile("{{ data.n").is_err());
        let v = ValueTemplate::compile(&json!({"who": ["{{ event.subject }}"], "n": "{{ data.n + 1 }}", "k": 1}))
            .unwrap()
            .render(&ctx())
            .unwrap();
        assert_eq!(v, json!({"who": ["web1"], "n": 4, "k": 1}));
    }
}
