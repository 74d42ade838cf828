//! Agent descriptions (DDL) in Choria's JSON DDL format
//! (`https://choria.io/schemas/mcorpc/ddl/v1/agent.json`): an agent's actions, their inputs
//! with types and validation, and their outputs.
//!
//! Inputs are checked twice, with the same rules: on the client, which turns `key=value`
//! text into typed values, fills in defaults and refuses before anything is sent
//! ([`Action::inputs_from_text`]); and on the node before the agent runs
//! ([`Action::validate`]), for requests from clients that did not check.
//!
//! Choria's rules, with two of its silent passes made errors: a validator name Chorus does
//! not know is refused when the DDL is read (Choria warns on every request and lets the
//! value through), and inputs are checked in name order (Choria's order is random).

use std::collections::BTreeMap;
use std::net::IpAddr;

use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `$schema` of agent DDLs.
pub const DDL_SCHEMA: &str = "https://choria.io/schemas/mcorpc/ddl/v1/agent.json";

/// Validators known by name; any other `validation` is an unanchored regex.
const NAMED: [&str; 6] = ["shellsafe", "ipv4address", "ipv6address", "ipaddress", "service_name", "package_name"];

/// An agent's description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ddl {
    /// Always [`DDL_SCHEMA`].
    #[serde(rename = "$schema", default)]
    pub schema: String,
    /// Name, version and the like.
    pub metadata: Metadata,
    /// The actions, in the file's order.
    pub actions: Vec<Action>,
}

/// What `rpcutil agent_inventory` reports of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Agent name.
    pub name: String,
    /// One line on what it does.
    pub description: String,
    /// Who wrote it.
    pub author: String,
    /// Its licence.
    pub license: String,
    /// Its version.
    pub version: String,
    /// Where it is documented.
    pub url: String,
    /// Seconds a client waits for its replies.
    pub timeout: u64,
    /// `external` for agents run as executables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// One action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// Its name.
    pub action: String,
    /// What it does.
    pub description: String,
    /// Which replies a client shows by default: `ok`, `failed` (the default) or `always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// Inputs by name.
    #[serde(default)]
    pub input: BTreeMap<String, Input>,
    /// Outputs by name.
    #[serde(default)]
    pub output: BTreeMap<String, Output>,
    /// Summaries a client computes over the replies (Choria's `{function, args}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregate: Vec<Value>,
}

/// One input of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// Label for forms.
    pub prompt: String,
    /// What it means.
    pub description: String,
    /// `string`, `integer`, `float`, `number`, `boolean`, `list`, `hash` or `array`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it may be left out.
    #[serde(default)]
    pub optional: bool,
    /// Filled in by clients when it is left out (`null`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Strings: a named validator or an unanchored regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    /// Strings: longest value in bytes; 0 is unlimited and, as in Choria, skips `validation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxlength: Option<usize>,
    /// Lists: the values allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<Vec<String>>,
}

/// One output of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// What it means.
    pub description: String,
    /// Its label in replies shown to people.
    pub display_as: String,
    /// Its type, for documentation.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Shown when a reply lacks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

impl Ddl {
    /// Reads a DDL and checks what Choria only finds at request time: known types, list
    /// inputs with their values, validators that exist or regexes that compile.
    pub fn parse(json: &str) -> Result<Ddl, String> {
        let ddl: Ddl = serde_json::from_str(json).map_err(|e| format!("not an agent DDL: {e}"))?;
        for action in &ddl.actions {
            for (name, input) in &action.input {
                let at = format!("{}#{} input {name:?}", ddl.metadata.name, action.action);
                match input.kind.to_lowercase().as_str() {
                    "string" | "integer" | "int" | "float" | "number" | "boolean" | "hash" | "array" => {}
                    "list" if input.list.as_ref().is_some_and(|l| !l.is_empty()) => {}
                    "list" => return Err(format!("{at}: a list input without its list of values")),
                    other => return Err(format!("{at}: unsupported type {other:?}")),
                }
                if let Some(rule) = input.validation.as_deref() {
                    if rule.starts_with(|c: char| c.is_ascii_lowercase())
                        && !rule.contains(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    {
                        if !NAMED.contains(&rule) {
                            return Err(format!("{at}: unknown validator {rule:?} (known: {})", NAMED.join(", ")));
                        }
                    } else {
                        regex::Regex::new(rule).map_err(|e| format!("{at}: invalid regex {rule:?}: {e}"))?;
                    }
                }
            }
        }
        Ok(ddl)
    }

    /// The action named `name`.
    pub fn action(&self, name: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.action == name)
    }
}

impl Action {
    /// The request data for command-line `key=value` inputs: each converted to its declared
    /// type and checked, defaults filled in for inputs not given. Errors name the input.
    pub fn inputs_from_text(&self, given: &[(String, String)]) -> Result<JsonObject, String> {
        let mut data = JsonObject::new();
        for (key, text) in given {
            let key = key.to_lowercase();
            let input = self.input.get(&key).ok_or_else(|| {
                format!("input {key:?} has not been declared (inputs of {}: {})", self.action, self.names())
            })?;
            let value = input.convert(text).map_err(|e| format!("invalid value for {key:?}: {e}"))?;
            input.check(&value).map_err(|e| format!("invalid value for {key:?}: {e}"))?;
            data.insert(key, value);
        }
        for (name, input) in &self.input {
            if data.contains_key(name) {
                continue;
            }
            match input.default.as_ref().filter(|d| !d.is_null()) {
                Some(default) => {
                    data.insert(name.clone(), default.clone());
                }
                None if !input.optional => return Err(format!("input {name:?} is required")),
                None => {}
            }
        }
        Ok(data)
    }

    /// Checks a request's data as the node receives it: every declared input that is
    /// required is there, every value given is valid, nothing undeclared. `MissingData` or
    /// `InvalidData` with `Validation failed: …` otherwise.
    pub fn validate(&self, data: &JsonObject) -> Result<(), (StatusCode, String)> {
        let failed = |code, message: String| Err((code, format!("Validation failed: {message}")));
        for (name, input) in &self.input {
            match data.get(name) {
                None if !input.optional => {
                    return failed(StatusCode::MissingData, format!("input {name:?} is required"))
                }
                None => {}
                Some(value) => {
                    if let Err(e) = input.check(value) {
                        return failed(StatusCode::InvalidData, format!("validation failed for input {name:?}: {e}"));
                    }
                }
            }
        }
        if let Some(key) = data.keys().find(|k| !self.input.contains_key(*k) && k.as_str() != "process_results") {
            return failed(
                StatusCode::InvalidData,
                format!("request contains an input {key:?} that is not declared in the DDL (inputs: {})", self.names()),
            );
        }
        Ok(())
    }

    fn names(&self) -> String {
        if self.input.is_empty() {
            "none".into()
        } else {
            self.input.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

impl Input {
    /// Command-line text as this input's type (Choria's `ValToDDLType`).
    fn convert(&self, text: &str) -> Result<Value, String> {
        Ok(match self.kind.to_lowercase().as_str() {
            "integer" | "int" => text.parse::<i64>().map_err(|_| format!("{text:?} is not a valid integer"))?.into(),
            "float" | "number" => {
                let f = text.parse::<f64>().map_err(|_| format!("{text:?} is not a valid float"))?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("{text:?} is not a finite number"))?
            }
            "boolean" => match text {
                "1" | "t" | "T" | "TRUE" | "true" | "True" => Value::Bool(true),
                "0" | "f" | "F" | "FALSE" | "false" | "False" => Value::Bool(false),
                _ => return Err(format!("{text:?} is not a valid boolean")),
            },
            "hash" => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => Value::Object(map),
                _ => return Err(format!("{text:?} is not a valid JSON string with a hash inside")),
            },
            "array" => match serde_json::from_str(text) {
                Ok(Value::Array(items)) => Value::Array(items),
                _ => return Err(format!("{text:?} is not a valid JSON string with an array inside")),
            },
            _ => Value::String(text.to_string()),
        })
    }

    /// Whether `value` is valid for this input (Choria's `ValidateValue`).
    fn check(&self, value: &Value) -> Result<(), String> {
        match (self.kind.to_lowercase().as_str(), value) {
            ("string", Value::String(s)) => self.check_string(s),
            ("string", _) => Err("is not a string".into()),
            ("integer" | "int", Value::Number(n))
                if n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) =>
            {
                Ok(())
            }
            ("integer" | "int", _) => Err("is not an integer".into()),
            ("float", Value::Number(_)) | ("number", Value::Number(_)) => Ok(()),
            ("float", _) => Err("is not a float".into()),
            ("number", _) => Err("is not a number".into()),
            ("boolean", Value::Bool(_)) => Ok(()),
            ("boolean", _) => Err("is not a boolean".into()),
            ("hash", Value::Object(_)) | ("array", Value::Array(_)) => Ok(()),
            ("hash", _) => Err("is not a hash map".into()),
            ("array", _) => Err("is not an array".into()),
            ("list", Value::String(s)) => {
                let allowed = self.list.as_deref().unwrap_or_default();
                if allowed.iter().any(|a| a == s) {
                    Ok(())
                } else {
                    Err(format!("should be one of {}", allowed.join(", ")))
                }
            }
            ("list", _) => Err("should be a string".into()),
            (other, _) => Err(format!("unsupported input type {other:?}")),
        }
    }

    fn check_string(&self, s: &str) -> Result<(), String> {
        let max = self.maxlength.unwrap_or(0);
        if max == 0 {
            return Ok(());
        }
        if s.len() > max {
            return Err(format!("is longer than {max} characters"));
        }
        let Some(rule) = self.validation.as_deref().filter(|r| !r.is_empty()) else { return Ok(()) };
        let ip = s.parse::<IpAddr>().ok();
        match rule {
            "shellsafe" => match ["`", "$", ";", "|", "&&", ">", "<"].into_iter().find(|bad| s.contains(bad)) {
                Some(bad) => Err(format!("may not contain '{bad}'")),
                None => Ok(()),
            },
            "ipv4address" if ip.is_some_and(|ip| ip.is_ipv4()) => Ok(()),
            "ipv4address" => Err(format!("{s} is not an IPv4 address")),
            "ipv6address" if ip.is_some_and(|ip| ip.is_ipv6()) => Ok(()),
            "ipv6address" => Err(format!("{s} is not an IPv6 address")),
            "ipaddress" if ip.is_some() => Ok(()),
            "ipaddress" => Err(format!("{s} is not an IP address")),
            "service_name" | "package_name" => {
                let ok = !s.is_empty()
                    && !s.starts_with('-')
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || "._@:+-".contains(c));
                if ok {
                    Ok(())
                } else {
                    Err(format!("{s:?} is not a valid {}", rule.replace('_', " ")))
                }
            }
            regex => match regex::Regex::new(regex) {
                Ok(re) if re.is_match(s) => Ok(()),
                Ok(_) => Err(format!("input does not match '{regex}'")),
                Err(_) => Err(format!("invalid regex '{regex}'")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parrot() -> Ddl {
        Ddl::parse(
            &json!({
                "$schema": DDL_SCHEMA,
                "metadata": {"name": "parrot", "description": "d", "author": "a", "license": "Apache-2.0",
                             "version": "1.0.0", "url": "u", "timeout": 10},
                "actions": [{"action": "echo", "description": "d", "input": {
                    "message": {"prompt": "M", "description": "d", "type": "string", "optional": false,
                                "validation": "shellsafe", "maxlength": 16},
                    "repeat": {"prompt": "R", "description": "d", "type": "integer", "optional": true, "default": 1},
                    "style": {"prompt": "S", "description": "d", "type": "list", "optional": true, "list": ["plain", "loud"]},
                    "ip": {"prompt": "I", "description": "d", "type": "string", "optional": true,
                           "validation": "ipv4address", "maxlength": 15}
                }, "output": {}}]
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn client_inputs_are_typed_checked_and_defaulted() {
        let ddl = parrot();
        let echo = ddl.action("echo").unwrap();
        let given =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let data = echo.inputs_from_text(&given(&[("message", "123"), ("Style", "loud")])).unwrap();
        assert_eq!(
            Value::Object(data),
            json!({"message": "123", "style": "loud", "repeat": 1}),
            "a string stays a string"
        );
        for (pairs, wanted) in [
            (vec![("repeat", "2")], "\"message\" is required"),
            (vec![("message", "hi"), ("repeat", "two")], "not a valid integer"),
            (vec![("message", "hi; rm -rf /")], "may not contain ';'"),
            (vec![("message", "a much longer message")], "longer than 16"),
            (vec![("message", "hi"), ("style", "quiet")], "should be one of plain, loud"),
            (vec![("message", "hi"), ("ip", "::1")], "not an IPv4 address"),
            (vec![("message", "hi"), ("colour", "red")], "has not been declared"),
        ] {
            let error = echo.inputs_from_text(&given(&pairs)).unwrap_err();
            assert!(error.contains(wanted), "{pairs:?}: {error}");
        }
    }

    #[test]
    fn nodes_check_what_arrives() {
        let ddl = parrot();
        let echo = ddl.action("echo").unwrap();
        let check = |data: Value| echo.validate(data.as_object().unwrap());
        assert!(check(json!({"message": "hi", "repeat": 3})).is_ok());
        assert_eq!(check(json!({"repeat": 3})).unwrap_err().0, StatusCode::MissingData);
        let (code, message) = check(json!({"message": 5})).unwrap_err();
        assert_eq!(code, StatusCode::InvalidData);
        assert!(message.starts_with("Validation failed: ") && message.contains("is not a string"), "{message}");
        assert!(check(json!({"message": "hi", "repeat": 1.5})).is_err());
        assert!(check(json!({"message": "hi", "extra": true})).unwrap_err().1.contains("not declared"));
    }

    #[test]
    fn a_ddl_with_an_unknown_validator_or_bad_regex_is_refused() {
        let with = |validation: &str| {
            json!({"metadata": {"name": "x", "description": "d", "author": "a", "license": "l", "version": "1",
                                "url": "u", "timeout": 2},
                   "actions": [{"action": "a", "description": "d", "output": {}, "input": {
                       "v": {"prompt": "p", "description": "d", "type": "string", "optional": false,
                             "validation": validation, "maxlength": 5}}}]})
            .to_string()
        };
        assert!(Ddl::parse(&with("typo_validator")).unwrap_err().contains("unknown validator"));
        assert!(Ddl::parse(&with("^(")).unwrap_err().contains("invalid regex"));
        assert!(Ddl::parse(&with("^[a-z]+$")).is_ok());
    }
}
