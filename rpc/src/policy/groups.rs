//! The `groups` file of a policy directory: named lists of caller ids, as Choria reads it.
//!
//! ```text
//! # name member member …   (single spaces)
//! sysadmin cert=sa1 cert=sa2
//! app_admin cert=aa1
//! ```
//!
//! A name is `[A-Za-z0-9_.-]+`; members are caller ids compared exactly. Lines that are not
//! a name with at least one member are reported and skipped; a repeated name replaces the
//! earlier one.

use std::collections::HashMap;

use regex::Regex;

use super::file::Problem;

/// Groups by name.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    members: HashMap<String, Vec<String>>,
    problems: Vec<Problem>,
}

impl Groups {
    /// Parses a groups file; `path` names it in problems.
    pub fn parse(path: &str, text: &str) -> Self {
        static NAME: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        static COMMENT: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        let name_re = NAME.get_or_init(|| Regex::new(r"^([A-Za-z0-9_.\-]+)$").expect("compiles"));
        let comment = COMMENT.get_or_init(|| Regex::new(r"^(#.*|(?-u:\s)*)$").expect("compiles"));
        let mut groups = Groups::default();
        for (index, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if comment.is_match(line) {
                continue;
            }
            let at = format!("{path}:{}", index + 1);
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() < 2 {
                groups.problems.push(Problem { at, message: "invalid group line (name and members); skipped".into() });
                continue;
            }
            if !name_re.is_match(parts[0]) {
                groups.problems.push(Problem { at, message: format!("invalid group name {:?}; skipped", parts[0]) });
                continue;
            }
            groups.members.insert(parts[0].to_string(), parts[1..].iter().map(|m| m.to_string()).collect());
        }
        groups
    }

    /// Whether `callerid` is a member of the group `name`.
    pub fn has_member(&self, name: &str, callerid: &str) -> bool {
        self.members.get(name).is_some_and(|m| m.iter().any(|c| c == callerid))
    }

    /// The members of `name`.
    pub fn members(&self, name: &str) -> Option<&[String]> {
        self.members.get(name).map(Vec::as_slice)
    }

    /// Lines that cannot be used.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}
