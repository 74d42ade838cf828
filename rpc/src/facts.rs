//! Fact and class matching, as Choria does it, for discovery filters and Action Policy alike.
//!
//! Choria uses one fact matcher (`filter/facts`) for `-F` discovery filters and for the facts
//! column of Action Policy files, and one class matcher (`filter/classes`) for `-C` filters
//! and the classes column. Chorus does the same, so a policy or filter written for a Choria
//! fleet decides the same way here:
//!
//! * a fact test is `fact<op>value` with `==` (or `=`), `!=`, `<`, `<=` (`=<`), `>`, `>=`
//!   (`=>`), `=~`; a value written `/regex/` makes it a regex test whatever the operator;
//!   the right-most operator in the text is the operator;
//! * strings compare case-insensitively (`==`, `!=`), order by their lower-case bytes, and
//!   regexes match case-insensitively, unanchored;
//! * numbers compare as integers when the value has no `.` (the fact truncated, compared as
//!   text for `==`/`!=`), as floats when it has one;
//! * booleans are true for `1`, `t`, `T`, `true`, `TRUE`, `True`, and — Choria's quirks,
//!   kept so decisions agree — any other text "equals" a false fact, `!=` on a false fact is
//!   the same test as `==` on the lower-cased value, and `>` on floats is `>=`;
//! * null, objects and arrays match nothing;
//! * a class needle `/regex/` matches any class case-insensitively; any other needle matches
//!   a class equal to the needle in lower case.
//!
//! Facts are looked up by dotted path (`os.distro.release`), array elements by index.

use regex::Regex;
use serde_json::Value;

/// The comparison of a fact test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactOp {
    /// `==` (also written `=`).
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=` (also `=<`).
    Le,
    /// `>`.
    Gt,
    /// `>=` (also `=>`).
    Ge,
    /// `=~`, and any test whose value is written `/regex/`.
    Re,
}

impl FactOp {
    /// The operator from its text; `None` for an unknown one.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "==" | "=" => FactOp::Eq,
            "!=" => FactOp::Ne,
            "<" => FactOp::Lt,
            "<=" | "=<" => FactOp::Le,
            ">" => FactOp::Gt,
            ">=" | "=>" => FactOp::Ge,
            "=~" => FactOp::Re,
            _ => return None,
        })
    }

    /// The canonical text: `==`, `!=`, `<`, `<=`, `>`, `>=`, `=~`.
    pub fn as_str(self) -> &'static str {
        match self {
            FactOp::Eq => "==",
            FactOp::Ne => "!=",
            FactOp::Lt => "<",
            FactOp::Le => "<=",
            FactOp::Gt => ">",
            FactOp::Ge => ">=",
            FactOp::Re => "=~",
        }
    }
}

/// One fact test, compiled once and tested against many nodes.
#[derive(Debug, Clone)]
pub struct FactMatcher {
    fact: String,
    op: FactOp,
    value: String,
    /// For `=~`: the case-insensitive regex (`None` when it does not compile, which matches
    /// nothing, as in Choria).
    regex: Option<Regex>,
}

impl FactMatcher {
    /// Parses `fact<op>value` (spaces around the operator allowed), as Choria's
    /// `ParseFactFilterString` does.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("could not parse fact {text} it does not appear to be in a valid format");
        static OPERATORS: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        let operators =
            OPERATORS.get_or_init(|| Regex::new(r"<=|>=|=>|=<|<|>|!=|=~|={1,2}").expect("the operator regex compiles"));
        // The right-most operator: the fact name may itself contain one (gjson queries).
        let found = operators.find_iter(text).last().ok_or_else(bad)?;
        let (left, right) = (text[..found.start()].trim(), text[found.end()..].trim());
        if left.is_empty() || right.is_empty() {
            return Err(bad());
        }
        let is_operator_char = |c: Option<char>| matches!(c, Some('<' | '>' | '='));
        if is_operator_char(left.chars().next()) || is_operator_char(right.chars().last()) {
            return Err(bad());
        }
        Self::new(left, found.as_str(), right)
    }

    /// A test from its three parts (`operator` as written: `=`, `==`, `=<`, ...).
    pub fn new(fact: &str, operator: &str, value: &str) -> Result<Self, String> {
        if fact.is_empty() || value.is_empty() {
            return Err(format!("fact test {fact}{operator}{value}: fact and value must not be empty"));
        }
        let mut op = FactOp::parse(operator).ok_or_else(|| format!("fact {fact}: unknown operator {operator:?}"))?;
        if value.starts_with('/') && value.ends_with('/') {
            op = FactOp::Re;
        }
        let regex = (op == FactOp::Re).then(|| case_insensitive(value.trim_matches('/'))).flatten();
        Ok(FactMatcher { fact: fact.to_string(), op, value: value.to_string(), regex })
    }

    /// Whether a regex test's pattern compiled (always true for other tests).
    pub fn has_regex(&self) -> bool {
        self.op != FactOp::Re || self.regex.is_some()
    }

    /// The fact name (dotted path).
    pub fn fact(&self) -> &str {
        &self.fact
    }

    /// The comparison.
    pub fn op(&self) -> FactOp {
        self.op
    }

    /// The value as written (a regex keeps its slashes).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether `fact` (the node's value of [`FactMatcher::fact`], `None` when absent)
    /// passes the test.
    pub fn matches(&self, fact: Option<&Value>) -> bool {
        match fact {
            Some(Value::String(s)) => self.string(s),
            Some(Value::Number(n)) => self.number(n),
            Some(Value::Bool(b)) => self.boolean(*b),
            _ => false,
        }
    }

    fn regex_matches(&self, text: &str) -> bool {
        self.regex.as_ref().is_some_and(|re| re.is_match(text))
    }

    fn string(&self, fact: &str) -> bool {
        let (fact_l, value_l) = (fact.to_lowercase(), self.value.to_lowercase());
        match self.op {
            FactOp::Eq => fact_l == value_l,
            FactOp::Ne => fact_l != value_l,
            FactOp::Re => self.regex_matches(fact),
            FactOp::Lt => fact_l.as_bytes() < value_l.as_bytes(),
            FactOp::Le => fact_l.as_bytes() <= value_l.as_bytes(),
            FactOp::Gt => fact_l.as_bytes() > value_l.as_bytes(),
            FactOp::Ge => fact_l.as_bytes() >= value_l.as_bytes(),
        }
    }

    fn number(&self, fact: &serde_json::Number) -> bool {
        let float = fact.as_f64().unwrap_or(f64::NAN);
        if self.value.contains('.') {
            if self.op == FactOp::Re {
                return self.regex_matches(&format!("{float:.4}"));
            }
            let Ok(want) = self.value.parse::<f64>() else { return false };
            return match self.op {
                FactOp::Eq => float == want,
                FactOp::Ne => float != want,
                FactOp::Lt => float < want,
                FactOp::Le => float <= want,
                // Choria compares `>` on floats as `>=`; kept so decisions agree.
                FactOp::Gt | FactOp::Ge => float >= want,
                FactOp::Re => unreachable!("handled above"),
            };
        }
        // Integers: the fact truncated toward zero.
        let int = fact.as_i64().unwrap_or_else(|| float.trunc() as i64);
        match self.op {
            FactOp::Eq => int.to_string() == self.value,
            FactOp::Ne => int.to_string() != self.value,
            FactOp::Re => self.regex_matches(&int.to_string()),
            ordering => {
                let Ok(want) = self.value.parse::<i64>() else { return false };
                match ordering {
                    FactOp::Lt => int < want,
                    FactOp::Le => int <= want,
                    FactOp::Gt => int > want,
                    FactOp::Ge => int >= want,
                    _ => unreachable!("equality and regex handled above"),
                }
            }
        }
    }

    fn boolean(&self, fact: bool) -> bool {
        let lower = self.value.to_lowercase();
        match (fact, self.op) {
            (true, FactOp::Eq) => truthy(&self.value),
            (true, FactOp::Ne) => !truthy(&lower),
            (true, FactOp::Re) => truthy(&lower),
            (false, FactOp::Eq) => !truthy(&self.value),
            // Choria's quirk: `!=` on a false fact is `==` on the lower-cased value.
            (false, FactOp::Ne | FactOp::Re) => !truthy(&lower),
            _ => false,
        }
    }
}

impl std::fmt::Display for FactMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{}", self.fact, self.op.as_str(), self.value)
    }
}

/// Go's `strconv.ParseBool` giving true.
fn truthy(text: &str) -> bool {
    matches!(text, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

/// A case-insensitive regex of `pattern`, `None` when it does not compile.
fn case_insensitive(pattern: &str) -> Option<Regex> {
    Regex::new(&format!("(?i){pattern}")).ok()
}

/// Whether the class `needle` is among `classes`: a `/regex/` needle matches any class
/// case-insensitively; any other needle matches a class equal to it in lower case.
pub fn class_matches(needle: &str, classes: &[String]) -> bool {
    if needle.starts_with('/') && needle.ends_with('/') {
        let pattern = needle.strip_prefix('/').and_then(|n| n.strip_suffix('/')).unwrap_or("");
        return case_insensitive(pattern).is_some_and(|re| classes.iter().any(|c| re.is_match(c)));
    }
    let needle = needle.to_lowercase();
    classes.contains(&needle)
}

/// Whether every needle is among `classes` (and there is at least one).
pub fn classes_match(needles: &[&str], classes: &[String]) -> bool {
    !needles.is_empty() && needles.iter().all(|n| class_matches(n, classes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Choria's `filter/facts` test table (fact.yaml) and parser table.
    #[test]
    fn fact_tests_decide_as_choria_does() {
        let facts = json!({"string": "hello world", "inumber": 1, "fnumber": 1.2, "tbool": true, "fbool": false,
            "nested": {"string": "nested hello world", "inumber": 2, "fnumber": 2.2}});
        let check = |fact: &str, op: &str, value: &str| {
            let m = FactMatcher::new(fact, op, value).unwrap();
            let mut v = &facts;
            for part in fact.split('.') {
                v = &v[part];
            }
            m.matches(Some(v))
        };
        let table: &[(&str, &str, &str, bool)] = &[
            ("string", "==", "hello world", true),
            ("string", "==", "HeLlO WoRLD", true),
            ("string", "==", "helloworld", false),
            ("string", "!=", "hello world", false),
            ("string", "!=", "HeLlO WOrLd", false),
            ("string", "!=", "helloworld", true),
            ("string", "=~", "/hello/", true),
            ("string", "=~", "/HeLlO/", true),
            ("string", "=~", "/bye/", false),
            ("string", "<", "h", false),
            ("string", "<", "H", false),
            ("string", "<", "i", true),
            ("string", "<", "I", true),
            ("string", ">", "h", true),
            ("string", ">", "H", true),
            ("string", ">", "i", false),
            ("string", ">", "I", false),
            ("nested.string", "==", "nested hello world", true),
            ("nested.inumber", "==", "2", true),
            ("inumber", "==", "2", false),
            ("inumber", "!=", "1", false),
            ("inumber", ">=", "1", true),
            ("inumber", ">", "1", false),
            ("inumber", "<", "10", true),
            ("nested.fnumber", "==", "2.2", true),
            ("fnumber", "==", "1.2", true),
            ("fnumber", "=~", r"/1\.\d+/", true),
            ("fnumber", "!=", "1.2", false),
            ("fnumber", "<=", "1.01", false),
            ("fnumber", ">=", "1", true),
            ("fnumber", "<", "10", true),
            ("fnumber", "<", "1.0", false),
            ("fnumber", ">", "10", false),
            ("fnumber", ">", "1.0", true),
            ("tbool", "==", "true", true),
            ("tbool", "==", "T", true),
            ("tbool", "==", "1", true),
            ("tbool", "==", "t", true),
            ("tbool", "==", "false", false),
            ("tbool", "!=", "bob", true),
            ("tbool", "!=", "false", true),
            ("tbool", "!=", "T", false),
            ("fbool", "==", "false", true),
            ("fbool", "==", "F", true),
            ("fbool", "==", "0", true),
            ("fbool", "==", "f", true),
            ("fbool", "==", "true", false),
            ("fbool", "!=", "bob", true),
            ("fbool", "!=", "true", false),
            ("fbool", "!=", "false", true),
            ("nested", "==", "x", false),
            ("missing", "==", "x", false),
        ];
        for (fact, op, value, want) in table {
            assert_eq!(check(fact, op, value), *want, "{fact} {op} {value}");
        }
        // Integer text comparison and float quirks (Choria's, kept).
        assert!(!check("inumber", "==", "01"));
        assert!(check("fnumber", ">", "1.2"), "Choria's float > is >=");
        assert!(!check("inumber", "<", "abc"));
        assert!(check("fbool", "==", "bob"), "any non-true text equals a false fact");
    }

    #[test]
    fn fact_tests_parse_as_choria_parses_them() {
        let parse = |t: &str| FactMatcher::parse(t).map(|m| (m.fact().to_string(), m.op(), m.value().to_string()));
        let ok = |t: &str, fact: &str, op: FactOp, value: &str| {
            assert_eq!(parse(t).unwrap(), (fact.to_string(), op, value.to_string()), "{t}");
        };
        ok("foo=/bar/", "foo", FactOp::Re, "/bar/");
        ok("foo = /bar/", "foo", FactOp::Re, "/bar/");
        ok("foo=bar", "foo", FactOp::Eq, "bar");
        ok("foo == bar", "foo", FactOp::Eq, "bar");
        ok("foo=~bar", "foo", FactOp::Re, "bar");
        ok("foo=>bar", "foo", FactOp::Ge, "bar");
        ok("foo=<bar", "foo", FactOp::Le, "bar");
        ok("foo<=bar", "foo", FactOp::Le, "bar");
        ok("foo>=bar", "foo", FactOp::Ge, "bar");
        ok("foo<bar", "foo", FactOp::Lt, "bar");
        ok("foo > bar", "foo", FactOp::Gt, "bar");
        ok("foo!=bar", "foo", FactOp::Ne, "bar");
        ok("foo!=/bar/", "foo", FactOp::Re, "/bar/");
        ok("digit>0", "digit", FactOp::Gt, "0");
        ok(r#"storage.#(name="nvme0n1").size==64"#, r#"storage.#(name="nvme0n1").size"#, FactOp::Eq, "64");
        ok(r#"storage.#(name="foo bar").size=>baz bar"#, r#"storage.#(name="foo bar").size"#, FactOp::Ge, "baz bar");
        ok("a=b=c", "a=b", FactOp::Eq, "c");
        for bad in ["foobarbaz", "=foo(bar=baz)", "foo=", "foo(bar=baz)>", "=><==", ""] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e, format!("could not parse fact {bad} it does not appear to be in a valid format"));
        }
    }

    /// Choria's `filter/classes` table.
    #[test]
    fn classes_match_as_choria_matches_them() {
        let classes: Vec<String> = vec!["role::testing".into(), "testing".into(), "apache".into()];
        for (needle, want) in [
            ("/test/", true),
            ("/TeSt/", true),
            ("/nonxisting/", false),
            ("role::testing", true),
            ("RoLe::TeStInG", true),
            ("nonxisting", false),
            ("/", true),
        ] {
            assert_eq!(class_matches(needle, &classes), want, "{needle}");
        }
        assert!(classes_match(&["testing", "apache"], &classes));
        assert!(!classes_match(&["testing", "nginx"], &classes));
        assert!(!classes_match(&[], &classes));
    }
}
