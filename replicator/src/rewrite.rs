//! Subject rewriting, with NATS subject-mapping syntax so operators read it as they read
//! their server config: `from` is a subject filter, `to` a template where
//! `{{wildcard(N)}}` is the token matched by the N-th `*` of `from` and a final `>` is the
//! rest matched by `>`.
//!
//! ```text
//! from: choria.lifecycle.>          to: sites.east.choria.lifecycle.>
//! from: chorus.audit.*.*            to: chorus.audit.{{wildcard(1)}}.hub
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{ReplicatorError, Result};

/// One rewrite rule as configured.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    /// Subject filter to match, e.g. `choria.lifecycle.>`.
    pub from: String,
    /// Template of the new subject, e.g. `sites.east.choria.lifecycle.>`.
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Wildcard(usize),
    Rest,
}

/// A compiled rule.
#[derive(Clone, Debug)]
pub struct Rewrite {
    from: Vec<String>,
    to: Vec<Part>,
}

impl Rewrite {
    /// Compiles and validates a rule; the error names what is wrong.
    pub fn new(rule: &RewriteRule) -> Result<Self> {
        let bad = |why: String| {
            ReplicatorError::Config(chorus_runtime::ConfigError::message(format!(
                "{:?} -> {:?}: {why}",
                rule.from, rule.to
            )))
        };
        chorus_backbone::subject::validate_filter(&rule.from).map_err(|e| bad(e.to_string()))?;
        let from: Vec<String> = rule.from.split('.').map(str::to_owned).collect();
        let stars = from.iter().filter(|t| *t == "*").count();
        let from_rest = from.last().is_some_and(|t| t == ">");
        let tokens: Vec<&str> = rule.to.split('.').collect();
        let mut to = Vec::with_capacity(tokens.len());
        for (i, token) in tokens.iter().enumerate() {
            let part = if *token == ">" {
                if !from_rest || i + 1 != tokens.len() {
                    return Err(bad("`>` in `to` must be its last token and needs a final `>` in `from`".into()));
                }
                Part::Rest
            } else if let Some(n) = token.strip_prefix("{{wildcard(").and_then(|t| t.strip_suffix(")}}")) {
                let n: usize = n.trim().parse().map_err(|_| bad(format!("bad wildcard index in {token:?}")))?;
                if n == 0 || n > stars {
                    return Err(bad(format!("{token} refers to `*` number {n}, `from` has {stars}")));
                }
                Part::Wildcard(n - 1)
            } else if token.is_empty() || token.contains(['*', '>', ' ', '\t', '{', '}']) {
                return Err(bad(format!("bad token {token:?} in `to`")));
            } else {
                Part::Literal((*token).to_owned())
            };
            to.push(part);
        }
        Ok(Rewrite { from, to })
    }

    /// The rewritten subject, or `None` when `subject` does not match `from`. One pass over
    /// the subject, allocating only the result: the copier rewrites every event it copies.
    pub fn apply(&self, subject: &str) -> Option<String> {
        let mut captured: Vec<&str> = Vec::new();
        let mut rest = None;
        let mut tokens = subject.split('.');
        // The byte offset of the next token: what `>` matches is the subject from there.
        let mut offset = 0;
        for f in &self.from {
            if f == ">" {
                tokens.next()?;
                rest = Some(&subject[offset..]);
                break;
            }
            let token = tokens.next()?;
            offset += token.len() + 1;
            if f == "*" {
                captured.push(token);
            } else if token != f {
                return None;
            }
        }
        if rest.is_none() && tokens.next().is_some() {
            return None;
        }
        let mut out = String::with_capacity(subject.len() + 16);
        for part in &self.to {
            if !out.is_empty() {
                out.push('.');
            }
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Wildcard(n) => out.push_str(captured[*n]),
                Part::Rest => out.push_str(rest.unwrap_or_default()),
            }
        }
        Some(out)
    }
}

/// Applies the first matching rule; a subject no rule matches is kept.
pub fn rewrite_subject<'a>(rules: &[Rewrite], subject: &'a str) -> std::borrow::Cow<'a, str> {
    rules
        .iter()
        .find_map(|r| r.apply(subject))
        .map(std::borrow::Cow::Owned)
        .unwrap_or(std::borrow::Cow::Borrowed(subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &str, to: &str) -> Result<Rewrite> {
        Rewrite::new(&RewriteRule { from: from.into(), to: to.into() })
    }

    #[test]
    fn prefixes_and_wildcards() {
        let r = rule("choria.lifecycle.>", "sites.east.choria.lifecycle.>").unwrap();
        assert_eq!(
            r.apply("choria.lifecycle.event.alive.server").as_deref(),
            Some("sites.east.choria.lifecycle.event.alive.server")
        );
        assert_eq!(r.apply("choria.machine.transition"), None);
        assert_eq!(r.apply("choria.lifecycle"), None);
        let r = rule("chorus.audit.*.*", "chorus.audit.{{wildcard(1)}}.hub").unwrap();
        assert_eq!(r.apply("chorus.audit.deny.east").as_deref(), Some("chorus.audit.deny.hub"));
        assert_eq!(r.apply("chorus.audit.deny.east.extra"), None);
        assert_eq!(r.apply("chorus.audit.deny"), None);
        let r = rule("a.*.>", "b.{{wildcard(1)}}.>").unwrap();
        assert_eq!(r.apply("a.x.y.z").as_deref(), Some("b.x.y.z"));
        assert_eq!(r.apply("a.x.y").as_deref(), Some("b.x.y"));
        assert_eq!(r.apply("a.x"), None);
        assert_eq!(r.apply("a.x."), Some("b.x.".to_string()));
        assert_eq!(r.apply("c.x.y"), None);
        let rules = vec![r];
        assert_eq!(rewrite_subject(&rules, "other.subject"), "other.subject");
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        assert!(rule("a.*", "b.{{wildcard(2)}}").unwrap_err().to_string().contains("number 2"));
        assert!(rule("a.*", "b.>").unwrap_err().to_string().contains("`>`"));
        assert!(rule("a.>.b", "b").is_err());
        assert!(rule("a.>", "b.c d").is_err());
    }
}
