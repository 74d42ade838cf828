//! Every configuration example in the documentation is parsed as the configuration it shows,
//! so the docs cannot drift from the code: a renamed or removed field fails here, because
//! every configuration refuses unknown fields.
//!
//! An example is also validated; the only failures allowed are about files the example names
//! that do not exist on this machine (`/etc/chorus/...`).

use std::path::{Path, PathBuf};

use chorus_runtime::{Config, ConfigError};
use serde::de::DeserializeOwned;

/// A `yaml` code block of a Markdown file.
struct Example {
    file: String,
    line: usize,
    text: String,
}

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

fn examples() -> Vec<Example> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.push(repo().join("README.md"));
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines().enumerate();
        while let Some((i, line)) = lines.next() {
            let fence = line.trim_start();
            if fence == "```yaml" || fence == "```yml" {
                let indent = line.len() - fence.len();
                let mut body = String::new();
                for (_, l) in lines.by_ref() {
                    if l.trim_start().starts_with("```") {
                        break;
                    }
                    body.push_str(l.get(indent..).unwrap_or(l.trim_start()));
                    body.push('\n');
                }
                let file = path.strip_prefix(repo()).unwrap().display().to_string();
                out.push(Example { file, line: i + 1, text: body });
            }
        }
    }
    out
}

/// Parses `example` as `T` and validates it; a validation error must name a missing file
/// that the example mentions.
fn check<T: Config>(example: &Example) -> Result<(), String> {
    let config: T = chorus_runtime::config::parse(&example.text).map_err(|e| e.to_string())?;
    validate_or_missing_file(example, config.validate())
}

/// As [`check`] for a section that is not a whole configuration file.
fn check_section<T: DeserializeOwned>(
    example: &Example,
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<(), String> {
    let section: T = chorus_runtime::config::parse(&example.text).map_err(|e| e.to_string())?;
    validate_or_missing_file(example, validate(&section))
}

fn validate_or_missing_file(example: &Example, result: Result<(), ConfigError>) -> Result<(), String> {
    let Err(e) = result else { return Ok(()) };
    let text = e.to_string();
    let missing = example
        .text
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '{' | '}' | '[' | ']' | '"'))
        .filter(|w| w.starts_with('/') && !Path::new(w).exists())
        .any(|path| text.contains(path));
    if missing {
        Ok(())
    } else {
        Err(format!("does not validate: {text}"))
    }
}

#[test]
fn every_yaml_example_in_the_docs_is_a_configuration_that_parses() {
    let examples = examples();
    assert!(examples.len() >= 10, "found only {} examples", examples.len());
    let mut failures = Vec::new();
    for example in &examples {
        let first_key = example
            .text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .and_then(|l| l.split(':').next())
            .unwrap_or("")
            .trim()
            .to_string();
        let result = match (example.file.as_str(), first_key.as_str()) {
            ("docs/AGENT.md" | "docs/TARGETING.md", "identity") => {
                check::<chorus_producers::agent::AgentConfig>(example)
            }
            ("docs/CONSUMERS.md", "steps" | "enrol") => {
                check::<chorus_consumers::provisioner::ProvisionerConfig>(example)
            }
            ("docs/REACTOR.md", "name") => check::<chorus_consumers::reactor::ReactorConfig>(example),
            ("docs/CONSUMERS.md", "consumer" | "sink") => {
                check::<chorus_consumers::audit_export::ExportConfig>(example)
            }
            ("docs/OPERATIONS.md", "servers") => {
                check_section::<chorus_backbone::jetstream::NatsConfig>(example, |n| n.validate())
            }
            ("docs/REPLICATOR.md", "state_dir") => check::<chorus_replicator::ReplicatorConfig>(example),
            ("docs/SECURITY.md", "pkcs11") => check_section::<chorus_keys::KeyConfig>(example, |_| Ok(())),
            ("docs/SECURITY.md", "identity") => check::<chorus_aaa::AaaConfig>(example),
            ("docs/SECURITY.md", "users") => check::<chorus_aaa::UsersFile>(example).and_then(|()| {
                let file = chorus_runtime::config::parse(&example.text).map_err(|e| e.to_string())?;
                chorus_aaa::Users::new(file).map(|_| ()).map_err(|e| e.to_string())
            }),
            ("docs/SECURITY.md", "server_name") => check::<chorus_broker::BrokerConfig>(example),
            _ => Err(format!(
                "an example whose configuration this test does not know (first key {first_key:?}): \
                 add it to the table in tests/system/docs.rs"
            )),
        };
        if let Err(e) = result {
            failures.push(format!("{}:{}: {e}", example.file, example.line));
        }
    }
    assert!(failures.is_empty(), "documentation examples that do not parse:\n{}", failures.join("\n"));
}

#[test]
fn the_example_machine_manifests_load() {
    let dir = repo().join("docs/examples/machines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let manifest = entry.unwrap().path().join("machine.yaml");
        if manifest.exists() {
            chorus_producers::machine::Manifest::load(&manifest)
                .unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1, "no machine manifest under {}", dir.display());
}

/// The settings of a systemd `EnvironmentFile` (`KEY=value` lines; blank lines and `#`
/// comments skipped), or the first line that is neither.
pub(crate) fn environment_file(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or(format!("{l:?} is not KEY=value"))
        })
        .collect()
}

/// Every configuration file the packages install under /etc/chorus parses as the
/// configuration of the service whose unit reads it (and validates, but for files it names
/// that exist only on a configured host).
#[test]
fn every_packaged_configuration_file_parses() {
    let dir = repo().join("packaging/etc");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let example =
            Example { file: format!("packaging/etc/{name}"), line: 1, text: std::fs::read_to_string(path).unwrap() };
        let result = match name.as_str() {
            "agent.yaml" => check::<chorus_producers::agent::AgentConfig>(&example),
            "aaa.yaml" => check::<chorus_aaa::AaaConfig>(&example),
            "aaa-users.yaml" => check::<chorus_aaa::UsersFile>(&example),
            "replicator.yaml" => check::<chorus_replicator::ReplicatorConfig>(&example),
            "provisioner.yaml" => check::<chorus_consumers::provisioner::ProvisionerConfig>(&example),
            "reactor.yaml" => check::<chorus_consumers::reactor::ReactorConfig>(&example),
            "audit-export.yaml" => check::<chorus_consumers::audit_export::ExportConfig>(&example),
            // KEY=value lines for systemd's EnvironmentFile: every key one the CLI reads.
            "chorus.env" => environment_file(&example.text).and_then(|settings| {
                settings.iter().try_for_each(|(key, _)| match key.as_str() {
                    "CHORUS_NATS" | "CHORUS_LOG" => Ok(()),
                    _ => Err(format!("{key} is not a setting chorus reads")),
                })
            }),
            _ => Err("a packaged file this test does not know: add it here".into()),
        };
        if let Err(e) = result {
            failures.push(format!("{}: {e}", example.file));
        }
    }
    assert!(files.len() >= 8, "found only {} packaged files", files.len());
    assert!(failures.is_empty(), "packaged configuration files that do not parse:\n{}", failures.join("\n"));
}

/// docs/CONFIGURATION.md is what `chorus config reference` generates from the configuration
/// types: a field added, renamed or re-documented in the code and not in the reference fails
/// here.
#[test]
fn the_configuration_reference_is_generated_from_the_types() {
    let chorus = chorus_testkit::workspace_bin("chorus").unwrap();
    let out = std::process::Command::new(&chorus).args(["config", "reference"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = std::fs::read_to_string(repo().join("docs/CONFIGURATION.md")).unwrap();
    assert!(
        generated == committed,
        "docs/CONFIGURATION.md differs from the code; regenerate it with \
         `target/debug/chorus config reference > docs/CONFIGURATION.md`"
    );
    for section in ["## `agent`", "## `aaa`", "## `replicator`", "### NatsConfig", "#### SinkConfig: `kind: hec`"] {
        assert!(generated.contains(section), "{section} missing from the reference");
    }

    // `chorus config check` reads a file as its service would, naming file and field.
    let dir = tempfile::tempdir().unwrap();
    let good = repo().join("packaging/etc/provisioner.yaml");
    let out = std::process::Command::new(&chorus).args(["config", "check", "provisioner"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = dir.path().join("provisioner.yaml");
    std::fs::write(&bad, "steps: []\nconcurency: 5\n").unwrap();
    let out = std::process::Command::new(&chorus).args(["config", "check", "provisioner"]).arg(&bad).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("provisioner.yaml") && said.contains("concurency"), "{said}");
}
