//! Feeds arbitrary text to `PolicyFile::parse`, Choria's Action Policy format, which nodes read
//! from disk for every request, and evaluates a fixed request against what parses: caller
//! `choria=alice` calling `rpcutil ping` on a node with facts of every JSON type and classes.
//!
//! The input is the policy file; a NUL byte, if any, ends it and starts the `groups` file.
//!
//! Properties checked:
//! * parsing and evaluating never panic (libFuzzer reports any panic as a crash), whatever
//!   the regexes, fact tests and class needles the file holds;
//! * every decision and every reported problem names the file, as audit records need;
//! * a file that names no caller (`PolicyFile::first_named_caller` is `None`, which lets an
//!   agent that cannot authenticate callers rely on it) decides the same for every caller.
//!
//! Run: `cargo fuzz run policy_file fuzz/seeds/policy_file`.

#![no_main]

use std::sync::OnceLock;

use chorus_rpc::policy::{Groups, PolicyFile};
use chorus_rpc::NodeContext;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const PATH: &str = "rpcutil.policy";

fn node() -> &'static NodeContext {
    static NODE: OnceLock<NodeContext> = OnceLock::new();
    NODE.get_or_init(|| {
        let mut node = NodeContext::new("node1.example.net", "choria");
        let facts = json!({
            "country": "uk",
            "customer": "acme",
            "environment": "production",
            "cpus": 4,
            "load": 0.75,
            "uptime": 18_446_744_073_709_551_615u64,
            "virtual": true,
            "os": {"family": "RedHat", "release": {"major": 9, "full": "9.4"}},
            "ips": ["192.0.2.10", "2001:db8::10"],
            "nothing": null,
        });
        node.facts = facts.as_object().expect("an object").clone();
        node.classes = vec!["roles::web".into(), "apache".into(), "profile::base".into()];
        node
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policy, groups) = text.split_once('\0').unwrap_or((text, ""));
    let file = PolicyFile::parse(PATH, policy);
    let groups = Groups::parse("groups", groups);
    for problem in file.problems() {
        assert!(problem.at.starts_with(&format!("{PATH}:")), "problem without the file's place: {problem}");
    }
    let node = node();
    for allow_unconfigured in [false, true] {
        let decision = file.evaluate("choria=alice", "ping", node, &groups, allow_unconfigured);
        assert!(decision.reason.contains(PATH), "decision without the file's name: {decision:?}");
        if file.first_named_caller().is_none() {
            for caller in ["choria=mallory", "", "choria=alice.ops"] {
                let other = file.evaluate(caller, "ping", node, &groups, allow_unconfigured);
                assert_eq!(
                    other, decision,
                    "a policy naming no caller decides differently for {caller:?} and choria=alice"
                );
            }
        }
    }
});
