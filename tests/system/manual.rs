//! What an operator's shell and `man` get from the `chorus` binary: completions that load
//! in bash, man pages that render, and a version that names its commit.

use crate::cli::chorus;

#[test]
fn completions_load_in_bash_and_man_pages_render() {
    let (ok, script) = chorus(&["completions", "bash"]);
    assert!(ok, "{script}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chorus.bash");
    std::fs::write(&file, &script).unwrap();
    // Loading it defines the completion, and asking it to complete `chorus r` offers `rpc`.
    let check = format!(
        "set -e; source {f}; complete -p chorus; COMP_WORDS=(chorus r); COMP_CWORD=1; COMP_LINE='chorus r'; COMP_POINT=8; _chorus chorus r chorus; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        f = file.display()
    );
    let out = std::process::Command::new("bash").arg("-c").arg(&check).output().expect("bash runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(said.lines().any(|l| l == "rpc"), "{said}");

    let pages = dir.path().join("man1");
    let (ok, said) = chorus(&["man", "--out", pages.to_str().unwrap()]);
    assert!(ok, "{said}");
    for page in ["chorus.1", "chorus-rpc.1", "chorus-replicate.1", "chorus-streams-create.1"] {
        assert!(pages.join(page).is_file(), "{page} missing");
    }
    let out = std::process::Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(pages.join("chorus-rpc.1"))
        .env("MANWIDTH", "100")
        .output()
        .expect("man runs");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{page}{}", String::from_utf8_lossy(&out.stderr));
    assert!(page.contains("chorus-rpc - Make an RPC request to the fleet"), "{page}");
    assert!(page.contains("--callerid"), "{page}");
}

#[test]
fn the_version_names_the_commit() {
    let (ok, said) = chorus(&["--version"]);
    assert!(ok, "{said}");
    assert!(said.starts_with("chorus ") && said.contains("(commit "), "{said}");
}
