//! Action Policy and Rego decisions, case by case as go-choria decides them (its
//! `authz_actionpolicy_test.go`, `authz_rego_test.go` and the behaviours its code implies),
//! plus Chorus's one rule on top: a line that cannot be used never widens access.

use std::path::Path;

use serde_json::json;

use super::*;

const AGENT: &str = "ginkgo";
const CALLER: &str = "choria=ginkgo.mcollective";

/// The node of Choria's tests: facts.json and classes.txt.
fn node() -> NodeContext {
    let mut n = NodeContext::new("n1.example.net", "choria");
    let facts = json!({"one": "one", "two": "two two", "three": "three three three", "digit": 1,
        "boolean": false, "nested": {"facts": "value"}});
    n.facts = facts.as_object().unwrap().clone();
    n.classes = vec!["one".into(), "two".into(), "three".into()];
    n
}

fn with_facts(facts: serde_json::Value) -> NodeContext {
    let mut n = node();
    n.facts = facts.as_object().unwrap().clone();
    n
}

fn foo(value: &str) -> NodeContext {
    with_facts(json!({ "foo": value }))
}

fn classes2() -> NodeContext {
    let mut n = node();
    n.classes = vec!["other".into(), "klasses".into()];
    n
}

/// Decides `text` for `caller` calling `action` on `n`.
fn decide_in(text: &str, groups: &Groups, caller: &str, action: &str, n: &NodeContext) -> PolicyDecision {
    PolicyFile::parse("t.policy", text).evaluate(caller, action, n, groups, false)
}

fn allows(text: &str, caller: &str, action: &str, n: &NodeContext) -> bool {
    decide_in(text, &Groups::default(), caller, action, n).allowed
}

/// Choria's fixtures, example1 to example17 (tabs as in the originals).
fn example(n: u32) -> &'static str {
    match n {
        1 => "policy default deny\nallow\t\t*\t\t*\t\t*\t\t*\n",
        2 => "policy default deny\nallow\t\tchoria=ginkgo.mcollective\t\t*\t\t*\t\t*\nallow\t\tchoria=ginkgo.mcollective /^up=.+/\t\t*\t\t*\t\t*",
        3 => "policy default deny\nallow\t*\ttest\t*\t*\n",
        4 => "policy default deny\nallow\t*\t*\tfoo=bar\t*\n",
        5 => "policy default deny\nallow\t*\t*\t*\tthree\n",
        6 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\t*\t*\n",
        7 => "policy default deny\nallow\tchoria=ginkgo.mcollective\t*\tfoo=bar\t*\n",
        8 => "policy default deny\nallow\tchoria=ginkgo.mcollective\t*\t*\tone\n",
        9 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\tfoo=bar\t*\n",
        10 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\t*\tone\n",
        11 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\tfoo=bar\tone\n",
        12 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\tfoo=bar and bar=foo\tone\n",
        13 => "policy default deny\nallow\tchoria=ginkgo.mcollective\ttest\tfoo=bar\tone and two or three\n",
        14 => "policy default deny\nallow\t\tchoria=ginkgo.mcollective\t\ttest\t\tfoo=bar and one or (two and one)\n",
        15 => "policy default deny\n\
               allow\t\tchoria=ginkgo.mcollective\t\t\t*\t\t\t\t\t\t\t\t\t\t\t\t*\t\t\t\t\t\t\t\t*\n\
               allow\t\tchoria=two.mcollective\t\t\t*\t\t\t\t\t\t\t\t\t\t\t\tfoo=bar\t\t\t\t\t\t\t\tone\n\
               allow\t\tchoria=three.mcollective\t\t\tenable disable status\t\tfoo=bar\t\t*\n\
               allow\t\tchoria=four.mcollective\t\t\trestart\t\t\t\t\t\t\t\t\t(puppet().enabled=false and environment=production) or environment=development\n",
        16 => "policy default deny\nallow\tuid=500 uid=600 uid=700\t*\t*\t\t*\n\n",
        17 => "policy default deny\nallow\tsysadmin app_admin\t*\t*\t*",
        _ => unreachable!(),
    }
}

/// Choria's groups fixture.
const GROUPS: &str =
    "# line to ignore\nsysadmin cert=sa1 cert=sa2 rspec_caller\napp_admin cert=aa1 cert=aa2\nsingle_group rspec_caller\ninvalid_group\n";

#[test]
fn choria_upstream_cases_decide_the_same() {
    let t = "test";
    // (id, fixture, caller, action, node, allowed)
    let cases: Vec<(&str, u32, &str, &str, NodeContext, bool)> = vec![
        ("AP-03", 1, CALLER, t, node(), true),
        ("AP-04", 2, CALLER, t, node(), true),
        ("AP-05", 2, "other", t, node(), false),
        ("AP-06", 2, "up=bob", t, node(), true),
        ("AP-07", 3, CALLER, t, node(), true),
        ("AP-08", 3, CALLER, "other", node(), false),
        ("AP-09", 4, CALLER, t, foo("bar"), true),
        ("AP-10", 4, CALLER, t, foo("baz"), false),
        ("AP-11", 5, CALLER, t, node(), true),
        ("AP-12", 5, CALLER, t, classes2(), false),
        ("AP-13", 6, CALLER, t, node(), true),
        ("AP-14", 6, CALLER, "other", node(), false),
        ("AP-15", 6, "other", "other", node(), false),
        ("AP-16", 7, CALLER, t, foo("bar"), true),
        ("AP-17", 7, CALLER, t, foo("baz"), false),
        ("AP-18", 7, "other", t, foo("bar"), false),
        ("AP-19", 8, CALLER, t, node(), true),
        ("AP-20", 8, CALLER, t, classes2(), false),
        ("AP-22", 8, "other", t, node(), false),
        ("AP-23", 9, CALLER, t, foo("bar"), true),
        ("AP-24", 9, "other", t, foo("bar"), false),
        ("AP-25", 9, CALLER, t, foo("baz"), false),
        ("AP-26", 9, CALLER, "other", foo("bar"), false),
        ("AP-27", 10, CALLER, t, node(), true),
        ("AP-28", 10, "other", t, node(), false),
        ("AP-29", 10, CALLER, "other", node(), false),
        ("AP-30", 10, CALLER, t, classes2(), false),
        ("AP-31", 11, CALLER, t, foo("bar"), true),
        ("AP-32", 11, "other", t, node(), false),
        ("AP-33", 11, CALLER, "other", node(), false),
        ("AP-34", 11, CALLER, t, foo("baz"), false),
        (
            "AP-35",
            11,
            CALLER,
            t,
            {
                let mut n = foo("bar");
                n.classes = classes2().classes;
                n
            },
            false,
        ),
        ("AP-36", 12, CALLER, t, node(), false),
        ("AP-37", 13, CALLER, t, node(), false),
        ("AP-38", 14, CALLER, t, node(), false),
        ("AP-39", 15, CALLER, t, node(), true),
        ("AP-40", 15, "other", t, node(), false),
        ("AP-41", 15, "choria=two.mcollective", t, foo("bar"), true),
        ("AP-42", 15, "choria=two.mcollective", t, foo("baz"), false),
        ("AP-43a", 15, "choria=three.mcollective", "enable", foo("bar"), true),
        ("AP-43b", 15, "choria=three.mcollective", "disable", foo("bar"), true),
        ("AP-43c", 15, "choria=three.mcollective", "status", foo("bar"), true),
        ("AP-44", 15, "choria=three.mcollective", "other", foo("bar"), false),
        ("AP-45", 15, "choria=three.mcollective", "status", foo("baz"), false),
        ("AP-46", 15, "choria=four.mcollective", "restart", node(), false),
        ("AP-47a", 16, "uid=500", t, node(), true),
        ("AP-47b", 16, "uid=600", t, node(), true),
        ("AP-47c", 16, "uid=700", t, node(), true),
        ("AP-48", 16, CALLER, t, node(), false),
    ];
    for (id, fixture, caller, action, n, want) in cases {
        let d = decide_in(example(fixture), &Groups::default(), caller, action, &n);
        assert_eq!(d.allowed, want, "{id}: {d:?}");
    }
    assert!(allows("policy default allow\n", CALLER, t, &node()), "AP-01");
    let d = decide_in("policy default deny\n", &Groups::default(), CALLER, t, &node());
    assert!(!d.allowed && d.reason.contains("policy default"), "AP-02: {d:?}");
    // A node without the classes (Choria: a missing classes file) does not match: AP-21.
    let mut bare = node();
    bare.classes.clear();
    assert!(!allows(example(8), CALLER, t, &bare), "AP-21");

    // Groups (AP-49 to AP-51, U-24).
    let groups = Groups::parse("groups", GROUPS);
    for caller in ["cert=sa1", "cert=aa1"] {
        assert!(decide_in(example(17), &groups, caller, t, &node()).allowed, "AP-49 {caller}");
    }
    assert!(!decide_in(example(17), &groups, CALLER, t, &node()).allowed, "AP-50");
    assert_eq!(groups.members("sysadmin").unwrap(), ["cert=sa1", "cert=sa2", "rspec_caller"], "AP-51");
    assert_eq!(groups.members("app_admin").unwrap(), ["cert=aa1", "cert=aa2"]);
    assert_eq!(groups.members("single_group").unwrap(), ["rspec_caller"]);
    assert!(groups.members("invalid_group").is_none());
    assert_eq!(groups.problems().len(), 1, "{:?}", groups.problems());
}

#[test]
fn choria_column_semantics() {
    let t = "test";
    let allow =
        |callers: &str| allows(&format!("policy default deny\nallow\t{callers}\t*\t*\t*\n"), CALLER, t, &node());
    // Callers: exact, /regex/ (case-sensitive, unanchored), * only alone, early stop at a
    // broken regex (U-20 to U-23, D-20 to D-24).
    assert!(allow("choria=bob choria=ginkgo.mcollective"));
    assert!(allow("choria=bob /ginkgo/"));
    assert!(!allow("/^CHORIA=/"));
    assert!(!allow("choria=bob // choria=ginkgo.mcollective"), "a broken regex stops the check");
    assert!(allow("choria=ginkgo.mcollective //"), "an exact match before it still counts");
    assert!(!allow("choria=bob /*/"));
    assert!(!allow("other *"), "* inside a list is literal");
    // Actions are exact and case-sensitive (D-25, U-17).
    assert!(!allows("policy default deny\nallow\t*\tTest\t*\t*\n", CALLER, t, &node()));
    assert!(allows("policy default deny\nallow\t*\tone two test\t*\t*\n", CALLER, t, &node()));
    // Facts: the operators and Choria's comparisons (D-28 to D-31).
    let facts = |f: &str| allows(&format!("policy default deny\nallow\t*\t*\t{f}\t*\n"), CALLER, t, &node());
    for (f, want) in [
        ("one=ONE", true),
        ("one=~/^O/", true),
        ("one!=/one/", true),
        ("digit=1", true),
        ("digit=1.0", true),
        ("digit=01", false),
        ("digit>1", false),
        ("digit>0", true),
        ("digit>=1", true),
        ("digit>1.0", true),
        ("digit<abc", false),
        ("boolean=false", true),
        ("boolean=bob", true),
        ("boolean!=true", false),
        ("boolean!=false", true),
        ("nested=x", false),
        ("missing=x", false),
        ("nested.facts=VALUE", true),
        ("nested.facts=~/^val/", true),
        ("nested.facts=~/^al/", false),
        ("one=one two=~/two/", true),
        ("one=one two=three", false),
    ] {
        assert_eq!(facts(f), want, "{f}");
    }
    // A node without facts matches no fact test (D-32), but * (D-33).
    let mut bare = node();
    bare.facts.clear();
    assert!(!allows("policy default deny\nallow\t*\t*\tone=one\t*\n", CALLER, t, &bare));
    assert!(allows("policy default deny\nallow\t*\t*\t*\t*\n", CALLER, t, &bare));
    // Classes: all needles, regex case-insensitive, needles lower-cased (D-34, U-13, U-14).
    let classes = |c: &str| allows(&format!("policy default deny\nallow\t*\t*\t*\t{c}\n"), CALLER, t, &node());
    assert!(classes("one two three"));
    assert!(!classes("one two four"));
    assert!(classes("/^T/"));
    assert!(classes("THREE"));
    assert!(classes("/"));
}

#[test]
fn choria_line_semantics() {
    let t = "test";
    let allow = |text: &str| allows(text, CALLER, t, &node());
    // Defaults: the last wins, any word but `allow` denies, trailing text ignored (D-09 to
    // D-12); no default denies unless allow_unconfigured (D-06).
    assert!(allow("allow\tnobody\t*\t*\t*\npolicy default allow\n"));
    assert!(!allow("policy default allow\npolicy default deny\n"));
    assert!(!allow("policy default allowed\n"));
    assert!(!allow("policy default Allow\n"));
    assert!(allow("policy default allow # x\n"));
    assert!(!allow(" policy default allow\n"), "an indented default line is not one");
    assert!(!allow(""));
    assert!(PolicyFile::parse("t.policy", "").evaluate(CALLER, t, &node(), &Groups::default(), true).allowed);
    // First match wins (D-07, D-08).
    assert!(allow("allow\t*\t*\t*\t*\n"));
    let d = decide_in(
        "policy default deny\ndeny\t*\ttest\t*\t*\nallow\t*\t*\t*\t*\n",
        &Groups::default(),
        CALLER,
        t,
        &node(),
    );
    assert!(!d.allowed && d.reason.contains("t.policy:2"), "{d:?}");
    // An indented comment is an unusable line, skipped (D-13); CRLF is fine (D-37).
    assert!(allow("policy default deny\n  # note\nallow\t*\t*\t*\t*\n"));
    assert!(allow("policy default deny\r\nallow\t*\t*\t*\t*\r\n"));
    // Hard errors on a matching rule deny outright (D-15, D-17 to D-19), whatever follows.
    for text in [
        "policy default allow\nallow\t*\ttest\t*\n",
        "policy default allow\nallow\t*\t*\tone=one  two=two\t*\n",
        "policy default allow\nallow\t*\t*\t*\tfoo=bar\n",
        "policy default allow\ndeny\t*\t*\tone=x\tone=two\n",
        "policy default allow\nallow\t*\t*\tfoobar\t*\nallow\t*\t*\t*\t*\n",
    ] {
        assert!(!allow(text), "{text:?}");
    }
    // ... but not when the rule is not reached (D-16).
    assert!(allow("policy default allow\nallow\tother\ttest\t*\n"));
    // Six columns: the last is the classes (D-36).
    assert!(allow("policy default deny\nallow\t*\t*\t*\tnot-a-class\tone\n"));
}

#[test]
fn a_line_that_cannot_be_used_never_widens_access() {
    let t = "test";
    let admin = "choria=admin";
    // Choria skips these; so do we, for allow lines: they narrow, and the rest of the file
    // (here the admin line) still works.
    for unusable in [
        "allow\t*\t*\t(puppet().enabled=false and environment=production) or environment=development\t*",
        "allow * * * *",
        "permit\t*\t*\t*\t*",
    ] {
        let text = format!("policy default deny\n{unusable}\nallow\t{admin}\t*\t*\t*\n");
        assert!(allows(&text, admin, t, &node()), "{unusable}: the admin line still works");
        assert!(!allows(&text, CALLER, t, &node()), "{unusable}: never allows");
        let file = PolicyFile::parse("t.policy", &text);
        assert_eq!(file.problems().len(), 1);
        assert_eq!(file.problems()[0].at, "t.policy:2");
    }
    // A deny line we cannot parse denies what it would have denied (Choria would skip it
    // and let the later allow through).
    let compound = format!("policy default deny\ndeny\t{CALLER}\t*\tone=one and two=two\t*\nallow\t*\t*\t*\t*\n");
    assert!(!allows(&compound, CALLER, t, &node()));
    assert!(allows(&compound, admin, t, &node()), "its scope is its callers and actions");
    let spaced = "policy default deny\ndeny * * * *\nallow\t*\t*\t*\t*\n";
    assert!(!allows(spaced, CALLER, t, &node()));
    let garbled = "policy default deny\nDENY\teveryone\nallow\t*\t*\t*\t*\n";
    assert!(!allows(garbled, admin, t, &node()));
    // `digit>0` is a fact test Choria understands: the line is used as written.
    let digits = format!("policy default deny\nallow\t*\t*\tdigit>0\t*\nallow\t{admin}\t*\t*\t*\n");
    assert!(allows(&digits, CALLER, t, &node()));
}

fn write(dir: &Path, name: &str, text: &str) {
    if let Some(parent) = dir.join(name).parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(dir.join(name), text).unwrap();
}

fn request(agent: &str, action: &str, caller: &str) -> RpcRequest {
    RpcRequest::new(caller, "client", "choria", agent, action, Default::default())
}

#[test]
fn files_are_found_as_choria_finds_them_and_read_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let agents = [AGENT.to_string()];
    let plain = ActionPolicy::new(Some(dir.path().into()), PolicySettings::default());
    let d = plain.authorize(&request(AGENT, "test", CALLER), &node(), &agents);
    assert!(!d.allowed && d.reason.starts_with("no policy file for agent ginkgo"), "{d:?}");

    // default.policy is used only with enable_default (D-01 to D-03).
    write(dir.path(), "default.policy", "policy default allow\n");
    assert!(!plain.authorize(&request(AGENT, "test", CALLER), &node(), &agents).allowed);
    let with_default = PolicySettings { enable_default: true, ..Default::default() };
    let fallback = ActionPolicy::new(Some(dir.path().into()), with_default.clone());
    assert!(fallback.authorize(&request(AGENT, "test", CALLER), &node(), &agents).allowed);
    write(dir.path(), "fallback.policy", "policy default allow\n");
    std::fs::remove_file(dir.path().join("default.policy")).unwrap();
    let named = PolicySettings { default_name: "fallback".into(), ..with_default };
    assert!(
        ActionPolicy::new(Some(dir.path().into()), named)
            .authorize(&request(AGENT, "test", CALLER), &node(), &agents)
            .allowed
    );
    // allow_unconfigured never allows an agent without a file (D-01).
    let unconfigured = PolicySettings { allow_unconfigured: true, ..Default::default() };
    let loose = ActionPolicy::new(Some(dir.path().into()), unconfigured);
    assert!(!loose.authorize(&request("other", "test", CALLER), &node(), &agents).allowed);

    // Every request reads the file again: a revoked caller is refused at once.
    write(dir.path(), "ginkgo.policy", &format!("policy default deny\nallow\t{CALLER}\t*\t*\t*\n"));
    assert!(plain.authorize(&request(AGENT, "test", CALLER), &node(), &agents).allowed);
    write(dir.path(), "ginkgo.policy", "policy default deny\n");
    assert!(!plain.authorize(&request(AGENT, "test", CALLER), &node(), &agents).allowed);

    // Groups come from the directory's groups file, read for every request too.
    write(dir.path(), "ginkgo.policy", "policy default deny\nallow\tadmins\t*\t*\t*\n");
    assert!(!plain.authorize(&request(AGENT, "test", "cert=sa1"), &node(), &agents).allowed);
    write(dir.path(), "groups", "admins cert=sa1\n");
    assert!(plain.authorize(&request(AGENT, "test", "cert=sa1"), &node(), &agents).allowed);

    // Problems are reported once per change.
    write(dir.path(), "ginkgo.policy", "policy default deny\nallow * * * *\n");
    assert_eq!(plain.prepare(AGENT).problems().len(), 1);
    assert_eq!(plain.prepare(AGENT).problems().len(), 0);

    // An unreadable policy denies; the agent name cannot leave the directory.
    std::fs::create_dir(dir.path().join("dir.policy")).unwrap();
    assert!(!plain.authorize(&request("dir", "test", CALLER), &node(), &agents).allowed);
    assert!(!plain.authorize(&request("../x", "test", CALLER), &node(), &agents).allowed);
    let none =
        ActionPolicy::new(None, PolicySettings::default()).authorize(&request(AGENT, "t", CALLER), &node(), &agents);
    assert!(!none.allowed && none.reason.contains("no policy directory"));
}

#[test]
fn policies_that_name_callers_are_found() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(first_named_caller(dir.path()), None);
    write(dir.path(), "rpcutil.policy", "policy default deny\nallow\t*\tping\t*\t*\n");
    assert_eq!(first_named_caller(dir.path()), None, "everyone is no one in particular");
    write(dir.path(), "shell.policy", "policy default deny\n\nallow\tup=alice\trun\t*\t*\n");
    assert_eq!(first_named_caller(dir.path()).unwrap(), format!("{}:3", dir.path().join("shell.policy").display()));
    let rego = tempfile::tempdir().unwrap();
    write(rego.path(), "rego/shell.rego", "package io.choria.mcorpc.authpolicy\nallow if input.callerid == \"up=a\"\n");
    assert!(first_named_caller(rego.path()).unwrap().ends_with("shell.rego"));
}

const REGO_GINKGO: &str = "package io.choria.mcorpc.authpolicy\n\ndefault allow = false\n\nallow if {\n\tinput.agent = \"ginkgo\"\n\tinput.action = \"boop\"\n\tinput.callerid = \"choria=ginkgo.mcollective\"\n\tinput.facts.stub == true\n}\n";
const REGO_MULTIPLE: &str = "package io.choria.mcorpc.authpolicy\n\ndefault allow = false\n\nallow if {\n   input.agent = \"ginkgo\"\n   input.action = \"boop\"\n}\n\nallow if {\n   input.agent = \"other\"\n   input.action = \"poob\"\n}\n";

#[test]
fn rego_policies_decide_as_choria_decides() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "rego/ginkgo.rego", REGO_GINKGO);
    write(dir.path(), "rego/default.rego", "package io.choria.mcorpc.authpolicy\n\ndefault allow = false\n");
    write(dir.path(), "rego/facts.rego", "package io.choria.mcorpc.authpolicy\ndefault allow = false\nallow if {\n input.facts.stub == true\n input.facts.buts = \"big\"\n}\n");
    write(dir.path(), "rego/classes.rego", "package io.choria.mcorpc.authpolicy\ndefault allow = false\nallow if {\n sort(input.classes) = [\"alpha\", \"beta\"]\n}\n");
    write(dir.path(), "rego/agent.rego", "package io.choria.mcorpc.authpolicy\ndefault allow = false\nallow if {\n sort(input.agents) = sort([\"ginkgo\", \"buts_agent\", \"stub_agent\"])\n}\n");
    write(
        dir.path(),
        "rego/data.rego",
        "package io.choria.mcorpc.authpolicy\ndefault allow = false\nallow if {\n input.data.foo = \"bar\"\n}\n",
    );
    write(
        dir.path(),
        "rego/undefined.rego",
        "package io.choria.mcorpc.authpolicy\nallow if { input.agent == \"nothing\" }\n",
    );
    write(dir.path(), "rego/broken.rego", "package io.choria.mcorpc.authpolicy\nallow {\n");
    write(dir.path(), "rego/wrongpackage.rego", "package other\ndefault allow = true\n");
    let settings = PolicySettings { provider: Provider::RegoPolicy, ..Default::default() };
    let policy = ActionPolicy::new(Some(dir.path().into()), settings);
    let good = {
        let mut n = with_facts(json!({"stub": true, "buts": "big"}));
        n.classes = vec!["beta".into(), "alpha".into()];
        n
    };
    let fail = {
        let mut n = with_facts(json!({"stub": false, "buts": "stubs"}));
        n.classes = vec!["omega".into(), "psi".into()];
        n
    };
    let good_agents: Vec<String> = vec!["ginkgo".into(), "stub_agent".into(), "buts_agent".into()];
    let fail_agents: Vec<String> = vec!["ginkgo".into()];
    let req = |agent: &str, action: &str, caller: &str, data: serde_json::Value| {
        let mut r = request(agent, action, caller);
        r.data = data.as_object().unwrap().clone();
        r
    };
    let decide = |r: &RpcRequest, n: &NodeContext, agents: &[String]| policy.authorize(r, n, agents).allowed;
    let bar = json!({"foo": "bar"});
    //
    assert!(decide(&req("ginkgo", "boop", CALLER, bar.clone()), &good, &good_agents), "R-01");
    assert!(!decide(&req("boop", "boop", CALLER, bar.clone()), &good, &good_agents), "R-02 (default.rego)");
    assert!(decide(&req("facts", "boop", CALLER, bar.clone()), &good, &good_agents), "R-03");
    assert!(decide(&req("classes", "boop", CALLER, bar.clone()), &good, &good_agents), "R-04");
    assert!(!decide(&req("ginkgo", "boop", "not=it", bar.clone()), &good, &good_agents), "R-05");
    assert!(decide(&req("agent", "boop", CALLER, bar.clone()), &good, &good_agents), "R-07");
    assert!(decide(&req("data", "boop", CALLER, bar.clone()), &good, &good_agents), "R-08");
    let other = json!({"bar": "foo"});
    for agent in ["ginkgo", "boop", "facts", "classes", "agent", "data"] {
        assert!(
            !decide(&req(agent, "boop", "choria=rip.mcollective", other.clone()), &fail, &fail_agents),
            "R-09..14 {agent}"
        );
    }
    // Undefined, not compiling, wrong package: deny.
    for agent in ["undefined", "broken", "wrongpackage"] {
        assert!(!decide(&req(agent, "boop", CALLER, bar.clone()), &good, &good_agents), "{agent}");
    }
    // Without rego/default.rego an agent without a policy is denied.
    std::fs::remove_file(dir.path().join("rego/default.rego")).unwrap();
    let d = policy.authorize(&req("boop", "boop", CALLER, bar.clone()), &good, &good_agents);
    assert!(!d.allowed && d.reason.contains("no Rego policy"), "{d:?}");
    // one file, several allow rules.
    write(dir.path(), "rego/multi.rego", REGO_MULTIPLE);
    let multi = RegoPolicy::parse("multi.rego", REGO_MULTIPLE).unwrap();
    assert!(multi.decide(&req("ginkgo", "boop", CALLER, other.clone()), &fail, &fail_agents).allowed);
    assert!(multi.decide(&req("other", "poob", CALLER, other.clone()), &fail, &fail_agents).allowed);
    assert!(!multi.decide(&req("somethingelse", "poob", CALLER, other), &fail, &fail_agents).allowed);
}

#[test]
fn action_policy_and_rego_constrain_who_and_what() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shell.policy", "policy default deny\nallow\tup=ops\trun\t*\t*\n");
    write(
        dir.path(),
        "rego/shell.rego",
        "package io.choria.mcorpc.authpolicy\ndefault allow = false\nallow if {\n regex.match(`^(uptime|df -h)$`, input.data.command)\n}\n",
    );
    let settings = PolicySettings { provider: Provider::ActionPolicyAndRego, ..Default::default() };
    let policy = ActionPolicy::new(Some(dir.path().into()), settings);
    let run = |caller: &str, command: &str| {
        let mut r = request("shell", "run", caller);
        r.data.insert("command".into(), json!(command));
        policy.authorize(&r, &node(), &["shell".to_string()])
    };
    assert!(run("up=ops", "uptime").allowed);
    let d = run("up=ops", "rm -rf /");
    assert!(!d.allowed && d.reason.contains("shell.rego"), "{d:?}");
    assert!(!run("up=dev", "uptime").allowed, "the Action Policy still decides who");
}
