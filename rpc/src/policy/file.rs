//! One Action Policy file: its lines as Choria reads them, and its decision for a request.
//!
//! Lines, after Choria (`authz_actionpolicy.go`):
//!
//! * `#…` at column 0 or a blank line: a comment;
//! * `policy default <word>`: the decision when no rule matches is allow when the word is
//!   exactly `allow`, else deny; the last such line wins, wherever it stands;
//! * `allow|deny<TAB>callers<TAB>actions<TAB>facts[<TAB>classes]`, runs of tabs being one
//!   separator: a rule; the first rule that matches decides;
//! * anything else, and rules with compound facts or classes (`and`, `or`, `not`, `!…`,
//!   `(…)`), cannot be used: Choria skips them.
//!
//! One rule of ours on top: **a line that cannot be used never widens access.** Skipping an
//! unusable `allow` line only narrows, as in Choria; an unusable line that says `deny`
//! denies every request that reaches it (and whose callers and actions it names, when
//! those can be read). Every unusable line is reported with its file and line number.
//!
//! A matching rule whose facts cannot be parsed, or that has no classes column, or a fact
//! where a class should be, denies the request outright, as in Choria.

use std::path::Path;

use regex::Regex;

use super::groups::Groups;
use super::PolicyDecision;
use crate::facts::{classes_match, FactMatcher};
use crate::NodeContext;

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

/// One token of a callers column.
#[derive(Debug, Clone)]
enum CallerToken {
    Exact(String),
    Regex(Regex),
    /// A `/regex/` token that is malformed or does not compile: in Choria the caller check
    /// stops there, false.
    Broken,
}

/// A callers column.
#[derive(Debug, Clone)]
struct Callers {
    any: bool,
    /// The raw tokens (single-space separated), for group lookups.
    names: Vec<String>,
    tokens: Vec<CallerToken>,
}

impl Callers {
    fn new(column: &str) -> Self {
        let names: Vec<String> = column.split(' ').map(str::to_string).collect();
        let tokens = names
            .iter()
            .map(|c| {
                if !c.starts_with('/') {
                    return CallerToken::Exact(c.clone());
                }
                match c.strip_prefix('/').and_then(|c| c.strip_suffix('/')).filter(|inner| !inner.is_empty()) {
                    Some(inner) => Regex::new(inner).map(CallerToken::Regex).unwrap_or(CallerToken::Broken),
                    None => CallerToken::Broken,
                }
            })
            .collect();
        Callers { any: column == "*", names, tokens }
    }

    /// Whether any caller is named (anything but `*`).
    fn names_callers(&self) -> bool {
        !self.any
    }

    fn matches(&self, callerid: &str, groups: &Groups) -> bool {
        if self.any {
            return true;
        }
        if self.names.iter().any(|name| groups.has_member(name, callerid)) {
            return true;
        }
        for token in &self.tokens {
            match token {
                CallerToken::Exact(c) if c == callerid => return true,
                CallerToken::Regex(re) if re.is_match(callerid) => return true,
                CallerToken::Broken => return false,
                _ => {}
            }
        }
        false
    }
}

/// An actions column.
#[derive(Debug, Clone)]
struct Actions(Option<Vec<String>>);

impl Actions {
    fn new(column: &str) -> Self {
        Actions((column != "*").then(|| column.split(' ').map(str::to_string).collect()))
    }

    fn matches(&self, action: &str) -> bool {
        self.0.as_ref().is_none_or(|actions| actions.iter().any(|a| a == action))
    }
}

/// A facts column.
#[derive(Debug, Clone)]
enum Facts {
    Any,
    Tests(Vec<FactMatcher>),
    /// A token that does not parse: the request is denied when the rule is reached.
    Invalid(String),
}

impl Facts {
    fn new(column: &str) -> Self {
        if column == "*" {
            return Facts::Any;
        }
        match column.split(' ').map(FactMatcher::parse).collect::<Result<Vec<_>, _>>() {
            Ok(tests) => Facts::Tests(tests),
            Err(e) => Facts::Invalid(format!("invalid fact matcher: {e}")),
        }
    }

    fn matches(&self, node: &NodeContext) -> Result<bool, String> {
        match self {
            Facts::Any => Ok(true),
            Facts::Invalid(e) => Err(e.clone()),
            // A node without facts matches no fact test (Choria: no facts were found).
            Facts::Tests(_) if node.facts.is_empty() => Ok(false),
            Facts::Tests(tests) => Ok(tests.iter().all(|t| t.matches(node.fact(t.fact())))),
        }
    }
}

/// A classes column.
#[derive(Debug, Clone)]
enum Classes {
    Any,
    Needles(Vec<String>),
    Invalid(String),
}

impl Classes {
    fn new(column: &str) -> Self {
        static FACT_LIKE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        let fact_like = FACT_LIKE.get_or_init(|| Regex::new(r"(.+)(<|>|=|<=|>=)(.+)").expect("compiles"));
        match column {
            "*" => Classes::Any,
            "" => Classes::Invalid("empty classes policy found (the line has no classes column)".into()),
            _ => {
                let needles: Vec<String> = column.split(' ').map(str::to_string).collect();
                match needles.iter().find(|n| fact_like.is_match(n)) {
                    Some(n) => Classes::Invalid(format!("fact found where class was expected: {n}")),
                    None => Classes::Needles(needles),
                }
            }
        }
    }

    fn matches(&self, node: &NodeContext) -> Result<bool, String> {
        match self {
            Classes::Any => Ok(true),
            Classes::Invalid(e) => Err(e.clone()),
            Classes::Needles(needles) => {
                let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
                Ok(classes_match(&needles, &node.classes))
            }
        }
    }
}

/// A rule line.
#[derive(Debug, Clone)]
struct Rule {
    line: usize,
    effect: Effect,
    callers: Callers,
    actions: Actions,
    facts: Facts,
    classes: Classes,
}

/// A line that says `deny` but cannot be used: it denies what reaches it.
#[derive(Debug, Clone)]
struct Guard {
    line: usize,
    /// Its callers and actions, when they can be read; else it applies to everyone.
    scope: Option<(Callers, Actions)>,
}

#[derive(Debug, Clone)]
enum Line {
    Rule(Rule),
    Guard(Guard),
}

/// A line of a policy file that cannot be used, reported with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `path:line`.
    pub at: String,
    /// What is wrong, and what Chorus does about it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// One parsed policy file.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    path: String,
    /// The last `policy default`: allow?, and its line.
    default: Option<(bool, usize)>,
    lines: Vec<Line>,
    problems: Vec<Problem>,
}

struct Patterns {
    comment: Regex,
    default: Regex,
    rule: Regex,
    compound: Regex,
}

fn patterns() -> &'static Patterns {
    static PATTERNS: std::sync::OnceLock<Patterns> = std::sync::OnceLock::new();
    // Go's \s and \w are ASCII; so are these.
    PATTERNS.get_or_init(|| Patterns {
        comment: Regex::new(r"^(#.*|(?-u:\s)*)$").expect("compiles"),
        default: Regex::new(r"^policy(?-u:\s)+default(?-u:\s)+((?-u:\w)+)").expect("compiles"),
        rule: Regex::new(r"^(allow|deny)\t+(.+?)\t+(.+?)\t+(.+?)(\t+(.+?))*$").expect("compiles"),
        compound: Regex::new(r"^!|^not$|^or$|^and$|\(.+\)").expect("compiles"),
    })
}

impl PolicyFile {
    /// Parses policy text; `path` names the file in decisions and problems.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Self {
        let path = path.as_ref().display().to_string();
        let p = patterns();
        let mut file = PolicyFile { path: path.clone(), default: None, lines: Vec::new(), problems: Vec::new() };
        for (index, raw) in text.split('\n').enumerate() {
            let number = index + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if p.comment.is_match(line) {
                continue;
            }
            if let Some(c) = p.default.captures(line) {
                file.default = Some((&c[1] == "allow", number));
                continue;
            }
            let mut problem = |message: String| file.problems.push(Problem { at: format!("{path}:{number}"), message });
            if let Some(c) = p.rule.captures(line) {
                let effect = if &c[1] == "allow" { Effect::Allow } else { Effect::Deny };
                let (callers, actions, facts) = (&c[2], &c[3], &c[4]);
                let classes = c.get(6).map_or("", |m| m.as_str());
                let compound = |column: &str| column.split(' ').any(|t| p.compound.is_match(t));
                if compound(facts) || compound(classes) {
                    match effect {
                        Effect::Allow => problem("compound policy statements are not supported; line skipped".into()),
                        Effect::Deny => {
                            problem(
                                "compound policy statements are not supported; the line denies every request of \
                                 its callers and actions"
                                    .into(),
                            );
                            let scope = Some((Callers::new(callers), Actions::new(actions)));
                            file.lines.push(Line::Guard(Guard { line: number, scope }));
                        }
                    }
                    continue;
                }
                file.lines.push(Line::Rule(Rule {
                    line: number,
                    effect,
                    callers: Callers::new(callers),
                    actions: Actions::new(actions),
                    facts: Facts::new(facts),
                    classes: Classes::new(classes),
                }));
                continue;
            }
            let says_deny = line.split_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case("deny"));
            if says_deny {
                problem("invalid policy line (columns must be separated by tabs); it denies what reaches it".into());
                file.lines.push(Line::Guard(Guard { line: number, scope: loose_scope(line) }));
            } else {
                problem("invalid policy line; skipped".into());
            }
        }
        file
    }

    /// The file's path as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Lines that cannot be used.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The line of the first rule (or denying line) that names callers, if any.
    pub fn first_named_caller(&self) -> Option<usize> {
        self.lines.iter().find_map(|line| match line {
            Line::Rule(r) if r.callers.names_callers() => Some(r.line),
            Line::Guard(Guard { line, scope: Some((callers, _)) }) if callers.names_callers() => Some(*line),
            _ => None,
        })
    }

    /// Decides whether `callerid` may call `action` on `node`. `allow_unconfigured` is the
    /// decision of a file without `policy default` when no rule matches.
    pub fn evaluate(
        &self,
        callerid: &str,
        action: &str,
        node: &NodeContext,
        groups: &Groups,
        allow_unconfigured: bool,
    ) -> PolicyDecision {
        let path = &self.path;
        for line in &self.lines {
            match line {
                Line::Guard(guard) => {
                    let applies = guard
                        .scope
                        .as_ref()
                        .is_none_or(|(callers, actions)| callers.matches(callerid, groups) && actions.matches(action));
                    if applies {
                        return PolicyDecision::deny(format!(
                            "deny by {path}:{}: a deny line that cannot be parsed",
                            guard.line
                        ));
                    }
                }
                Line::Rule(rule) => {
                    if !rule.callers.matches(callerid, groups) || !rule.actions.matches(action) {
                        continue;
                    }
                    let facts = rule.facts.matches(node);
                    // Classes are looked at even when the facts do not match, as in Choria.
                    let classes = rule.classes.matches(node);
                    let (facts, classes) = match (facts, classes) {
                        (Ok(f), Ok(c)) => (f, c),
                        (Err(e), _) | (_, Err(e)) => {
                            return PolicyDecision::deny(format!("deny: {path}:{}: {e}", rule.line));
                        }
                    };
                    if facts && classes {
                        return match rule.effect {
                            Effect::Allow => PolicyDecision::allow(format!("allow by {path}:{}", rule.line)),
                            Effect::Deny => {
                                PolicyDecision::deny(format!("deny by {path}:{} (explicit deny)", rule.line))
                            }
                        };
                    }
                }
            }
        }
        match self.default {
            Some((true, line)) => {
                PolicyDecision::allow(format!("allow by policy default at {path}:{line} (no rule matched)"))
            }
            Some((false, line)) => {
                PolicyDecision::deny(format!("deny by policy default at {path}:{line} (no rule matched)"))
            }
            None if allow_unconfigured => PolicyDecision::allow(format!(
                "allow by {path}: no rule matched, no 'policy default', allow_unconfigured"
            )),
            None => PolicyDecision::deny(format!("deny by {path}: no rule matched and no 'policy default' line")),
        }
    }
}

/// Callers and actions of a deny line that is not tab-separated, when it still reads as
/// `deny callers actions …` with single-token columns.
fn loose_scope(line: &str) -> Option<(Callers, Actions)> {
    let columns: Vec<&str> = if line.contains('\t') {
        line.split('\t').map(str::trim).filter(|c| !c.is_empty()).collect()
    } else {
        line.split_whitespace().collect()
    };
    (columns.len() >= 3 && columns[0] == "deny").then(|| (Callers::new(columns[1]), Actions::new(columns[2])))
}
