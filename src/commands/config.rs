//! `chorus config`: the configuration files Chorus reads, described from their types so the
//! reference cannot drift from the code: `schema` prints a file's JSON Schema (for editors and
//! linters), `reference` the Markdown reference kept as docs/CONFIGURATION.md, and `check`
//! reads a file as the service would and reports the first problem, naming file and field.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::Schema;
use serde_json::Value;

/// `chorus config` subcommands.
#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Print the JSON Schema of a configuration file.
    Schema {
        /// Which file.
        kind: Kind,
    },
    /// Print the Markdown reference of every configuration file (docs/CONFIGURATION.md).
    Reference,
    /// Read a configuration file as its service would, and report the first problem.
    Check {
        /// Which file.
        kind: Kind,
        /// The file (YAML or JSON).
        file: PathBuf,
    },
}

/// The configuration files Chorus reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `chorus agent --config` (/etc/chorus/agent.yaml).
    Agent,
    /// `chorus aaa --config` (/etc/chorus/aaa.yaml).
    Aaa,
    /// The AAA service's `users_file` (/etc/chorus/aaa-users.yaml).
    AaaUsers,
    /// `chorus replicate --config` (/etc/chorus/replicator.yaml).
    Replicator,
    /// `chorus provision --config` (/etc/chorus/provisioner.yaml).
    Provisioner,
    /// `chorus react --config` (/etc/chorus/reactor.yaml).
    Reactor,
    /// `chorus audit-export --config` (/etc/chorus/audit-export.yaml).
    AuditExport,
    /// `chorus broker config --config`: the broker's own description.
    Broker,
}

impl Kind {
    /// The name on the command line (`audit-export`).
    fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }

    /// Who reads the file, and where packages install it.
    fn read_by(self) -> &'static str {
        match self {
            Kind::Agent => "`chorus agent --config`; packaged as `/etc/chorus/agent.yaml`",
            Kind::Aaa => "`chorus aaa --config`; packaged as `/etc/chorus/aaa.yaml`",
            Kind::AaaUsers => {
                "the AAA service's `users_file`, read again when it changes; packaged as `/etc/chorus/aaa-users.yaml`"
            }
            Kind::Replicator => "`chorus replicate --config`; packaged as `/etc/chorus/replicator.yaml`",
            Kind::Provisioner => "`chorus provision --config`; packaged as `/etc/chorus/provisioner.yaml`",
            Kind::Reactor => "`chorus react --config`; packaged as `/etc/chorus/reactor.yaml`",
            Kind::AuditExport => "`chorus audit-export --config`; packaged as `/etc/chorus/audit-export.yaml`",
            Kind::Broker => "`chorus broker` (generates the nats-server configuration of a tenant-aware broker)",
        }
    }

    fn schema(self) -> Schema {
        match self {
            Kind::Agent => schemars::schema_for!(chorus_producers::agent::AgentConfig),
            Kind::Aaa => schemars::schema_for!(chorus_aaa::AaaConfig),
            Kind::AaaUsers => schemars::schema_for!(chorus_aaa::UsersFile),
            Kind::Replicator => schemars::schema_for!(chorus_replicator::ReplicatorConfig),
            Kind::Provisioner => schemars::schema_for!(chorus_consumers::provisioner::ProvisionerConfig),
            Kind::Reactor => schemars::schema_for!(chorus_consumers::reactor::ReactorConfig),
            Kind::AuditExport => schemars::schema_for!(chorus_consumers::audit_export::ExportConfig),
            Kind::Broker => schemars::schema_for!(chorus_broker::BrokerConfig),
        }
    }

    /// Reads `file` as the service would: parsed, unknown fields refused, validated.
    fn check(self, file: &std::path::Path) -> anyhow::Result<()> {
        match self {
            Kind::Agent => drop(chorus_producers::agent::AgentConfig::load(file)?),
            Kind::Aaa => drop(chorus_aaa::AaaConfig::load(file)?),
            Kind::AaaUsers => {
                let users: chorus_aaa::UsersFile = chorus_runtime::config::load(file)?;
                chorus_aaa::Users::new(users)?;
            }
            Kind::Replicator => drop(chorus_replicator::ReplicatorConfig::load(file)?),
            Kind::Provisioner => drop(chorus_consumers::provisioner::ProvisionerConfig::load(file)?),
            Kind::Reactor => drop(chorus_consumers::reactor::ReactorConfig::load(file)?),
            Kind::AuditExport => drop(chorus_consumers::audit_export::ExportConfig::load(file)?),
            Kind::Broker => drop(chorus_broker::BrokerConfig::load(file)?),
        }
        Ok(())
    }
}

/// Runs a `chorus config` subcommand.
pub fn run(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Schema { kind } => println!("{}", serde_json::to_string_pretty(&kind.schema())?),
        ConfigCommand::Reference => print!("{}", reference()),
        ConfigCommand::Check { kind, file } => {
            kind.check(&file)?;
            println!("{}: a valid {} configuration", file.display(), kind.name());
        }
    }
    Ok(())
}

/// The Markdown reference of every configuration file: one table per file, then one per
/// section type (shared by several files, documented once).
pub fn reference() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the configuration types by `chorus config reference`; do not edit by hand \
         (`tests/system/docs.rs` fails when this file and the code differ). Every file is YAML \
         (or JSON); unknown fields are refused, and errors name the file and the field. \
         `chorus config check <kind> FILE` reads a file as its service would; \
         `chorus config schema <kind>` prints its JSON Schema for editors.\n\n\
         Durations are written `30s`, `5m`, `1h30m`, `2d`. A field without a default must be given.\n",
    );
    let mut sections: BTreeMap<String, Value> = BTreeMap::new();
    for &kind in <Kind as clap::ValueEnum>::value_variants() {
        let schema = kind.schema();
        let root = schema.as_value();
        out.push_str(&format!("\n## `{}`\n\nRead by {}.\n\n", kind.name(), kind.read_by()));
        if let Some(description) = root.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{}\n\n", paragraph(description)));
        }
        out.push_str(&fields(root));
        if let Some(Value::Object(defs)) = root.get("$defs") {
            for (name, def) in defs {
                // One name, one type: two types of one name would share a section.
                let known = sections.entry(name.clone()).or_insert_with(|| def.clone());
                assert!(known == def, "two configuration types are named {name}: rename one");
            }
        }
    }
    out.push_str("\n## Sections\n\nTypes used by the files above, each documented once.\n");
    for (name, def) in &sections {
        out.push_str(&format!("\n### {name}\n\n"));
        if let Some(description) = def.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{}\n\n", paragraph(description)));
        }
        if def.get("properties").is_some() {
            out.push_str(&fields(def));
        } else {
            out.push_str(&format!("One of: {}.\n", type_of(def)));
            out.push_str(&variants(def));
            // Variants chosen by a tag field carry fields of their own: a table each.
            let options = def.get("oneOf").or_else(|| def.get("anyOf")).and_then(Value::as_array);
            for option in options.into_iter().flatten() {
                if option.get("properties").and_then(Value::as_object).is_some_and(|p| p.len() > 1) {
                    let variant = type_of_variant(option).replace(" and the fields below", "");
                    out.push_str(&format!("\n#### {name}: {variant}\n\n"));
                    out.push_str(&fields(option));
                }
            }
        }
    }
    out
}

/// The field table of an object schema.
fn fields(schema: &Value) -> String {
    let Some(Value::Object(properties)) = schema.get("properties") else {
        return format!("Written as: {}.\n", type_of(schema));
    };
    let required: Vec<&str> =
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let mut out = String::from("| Field | Type | Default | What |\n|---|---|---|---|\n");
    for (name, field) in properties {
        let default = match field.get("default") {
            _ if required.contains(&name.as_str()) => "required".to_string(),
            Some(Value::Null) | None => "—".to_string(),
            Some(v) => format!("`{}`", cell(&compact(v))),
        };
        let description = field.get("description").and_then(Value::as_str).map(paragraph).unwrap_or_default();
        out.push_str(&format!("| `{name}` | {} | {default} | {} |\n", type_of(field), cell(&description)));
    }
    out
}

/// The variants of an enum schema (`oneOf`), each with its description.
fn variants(schema: &Value) -> String {
    let Some(Value::Array(options)) = schema.get("oneOf").or_else(|| schema.get("anyOf")) else {
        return String::new();
    };
    let mut out = String::from("\n| Variant | What |\n|---|---|\n");
    for option in options {
        let description = option.get("description").and_then(Value::as_str).map(paragraph).unwrap_or_default();
        out.push_str(&format!("| {} | {} |\n", type_of_variant(option), cell(&description)));
    }
    out
}

/// A variant as written: a constant; a map with one key and its type; or, for a variant
/// chosen by a tag field (`type: creds`, `kind: syslog`), the tag and the other fields.
fn type_of_variant(option: &Value) -> String {
    let properties = option.get("properties").and_then(Value::as_object);
    let tag = properties.and_then(|p| p.iter().find(|(_, v)| v.get("const").is_some()));
    if let (Some(properties), Some((key, value))) = (properties, tag) {
        let mut out = format!("`{key}: {}`", compact(&value["const"]));
        if properties.len() > 1 {
            out.push_str(" and the fields below");
        }
        let nested = option
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .chain(option.get("$ref").map(|_| option));
        for inner in nested {
            if let Some(reference) = inner.get("$ref").and_then(Value::as_str) {
                let name = reference.rsplit('/').next().unwrap_or(reference);
                out.push_str(&format!(" and the fields of [{name}](#{})", name.to_lowercase()));
            }
        }
        return out;
    }
    if let Some(properties) = properties {
        if properties.len() == 1 {
            let (key, value) = properties.iter().next().expect("one property");
            return format!("`{key}:` {}", type_of(value));
        }
    }
    type_of(option)
}

/// A schema's type in a few words, with links to sections.
fn type_of(schema: &Value) -> String {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(constant) = schema.get("const") {
        return format!("`{}`", compact(constant));
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        return values.iter().map(|v| format!("`{}`", compact(v))).collect::<Vec<_>>().join(" \\| ");
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(options)) = schema.get(key) {
            let kinds: Vec<String> = options.iter().filter(|o| !is_null(o)).map(type_of_variant).collect();
            return kinds.join(" \\| ");
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    let words: Vec<String> = types
        .iter()
        .map(|t| match *t {
            "array" => format!("list of {}", schema.get("items").map(type_of).unwrap_or_else(|| "values".into())),
            "object" => match schema.get("additionalProperties") {
                Some(Value::Bool(false)) | None => "map".into(),
                Some(v) => format!("map of string to {}", type_of(v)),
            },
            other => other.to_string(),
        })
        .collect();
    if words.is_empty() {
        "any".into()
    } else {
        words.join(" \\| ")
    }
}

fn is_null(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
}

/// One line of JSON.
fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A description as one paragraph: doc comments' wrapped lines joined, code examples left
/// out, rustdoc links (``[`Name`]``) as plain code.
fn paragraph(text: &str) -> String {
    let mut in_code = false;
    let mut lines = Vec::new();
    for line in text.split('\n').map(str::trim) {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && !line.is_empty() {
            lines.push(line);
        }
    }
    let joined = lines.join(" ");
    let mut out = String::with_capacity(joined.len());
    let mut rest = joined.as_str();
    while let Some(start) = rest.find("[`") {
        let Some(len) = rest[start..].find("`]") else { break };
        let after = &rest[start + len + 2..];
        out.push_str(&rest[..start]);
        if after.starts_with('(') {
            out.push_str(&rest[start..start + len + 2]);
        } else {
            out.push_str(&rest[start + 1..start + len + 1]);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Text safe in a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
