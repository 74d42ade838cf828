//! Reading configuration files: one rule for every Chorus configuration, so every error
//! reads the same way: the file, then the path of the field at fault, then what is wrong.
//!
//! ```text
//! /etc/chorus/provisioner.yaml: steps[1].agent: missing field `agent` at line 4 column 5
//! /etc/chorus/replicate.yaml: links[0].batch: must be > 0
//! ```
//!
//! Every configuration struct refuses unknown fields (`#[serde(deny_unknown_fields)]`), so
//! a misspelt key is an error, not a silently ignored setting. What types cannot say (a
//! range, two fields that go together) goes in [`Config::validate`], whose errors name their
//! field the same way ([`ConfigError::invalid`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that could not be used: which file, which field, what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    file: Option<PathBuf>,
    field: Option<String>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    /// `field` (a path such as `links[0].batch`) holds a value that cannot work.
    pub fn invalid(field: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError { file: None, field: Some(field.into()), message: message.to_string(), source: None }
    }

    /// The configuration as a whole cannot work (no single field is at fault).
    pub fn message(message: impl fmt::Display) -> Self {
        ConfigError { file: None, field: None, message: message.to_string(), source: None }
    }

    /// Keeps `source` as the cause (an I/O error, a parser error, a key that would not load).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Names the file the configuration came from (kept if one is already named).
    pub fn in_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file.get_or_insert_with(|| path.into());
        self
    }

    /// Places the field under `prefix`: an error in a nested section (`servers`) as the
    /// enclosing file names it (`audit.nats.servers`).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = Some(match self.field.take() {
            Some(f) if f.starts_with('[') => format!("{prefix}{f}"),
            Some(f) => format!("{prefix}.{f}"),
            None => prefix.to_string(),
        });
        self
    }

    /// The file, when known.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The path of the field at fault, when one is.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// What is wrong, without file and field.
    pub fn reason(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A configuration read from YAML (or JSON, which YAML includes).
pub trait Config: DeserializeOwned {
    /// Checks what the types cannot (ranges, fields that go together); errors name the
    /// field. The default accepts everything that parsed.
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Reads, parses and validates the configuration in `path`; errors name the file, then the
/// field.
pub fn load<T: Config>(path: impl AsRef<Path>) -> Result<T, ConfigError> {
    let path = path.as_ref();
    from_text(&read(path)?).map_err(|e| e.in_file(path))
}

/// Parses and validates `text`; errors name the field.
pub fn from_text<T: Config>(text: &str) -> Result<T, ConfigError> {
    let config: T = parse(text)?;
    config.validate()?;
    Ok(config)
}

/// Parses `text` without validating, naming the field at fault
/// (`steps[1].agent: missing field`).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(path_error)
}

/// Deserializes a section already parsed into a value (a sink chosen by its `type`, a
/// watcher's properties), naming the field below the section.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(path_error)
}

fn path_error<E: std::error::Error + Send + Sync + 'static>(e: serde_path_to_error::Error<E>) -> ConfigError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let text = inner.to_string();
    // serde_yaml starts its message with the path of the map it was in (`steps[1]: unknown
    // field ...`); the field path here is the precise one, so that prefix goes.
    let reason = match text.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && (path == prefix || path.starts_with(prefix)) => rest,
        _ => text.as_str(),
    };
    let error = if path == "." { ConfigError::message(reason) } else { ConfigError::invalid(path, reason) };
    error.with_source(inner)
}

/// The text of `path`; the error names the file.
pub fn read(path: impl AsRef<Path>) -> Result<String, ConfigError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| ConfigError::message(&e).with_source(e).in_file(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        name: String,
        #[serde(default)]
        steps: Vec<Step>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Step {
        #[allow(dead_code)]
        agent: String,
        #[serde(default)]
        batch: u32,
    }

    impl Config for Outer {
        fn validate(&self) -> Result<(), ConfigError> {
            for (i, s) in self.steps.iter().enumerate() {
                if s.batch == 0 {
                    return Err(ConfigError::invalid(format!("steps[{i}].batch"), "must be > 0"));
                }
            }
            Ok(())
        }
    }

    #[test]
    fn errors_name_file_then_field_then_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "name: x\nsteps:\n  - {agent: a, batch: 1}\n  - {agnt: b}\n").unwrap();
        let e = load::<Outer>(&path).unwrap_err();
        assert_eq!(e.file(), Some(path.as_path()));
        assert_eq!(e.field(), Some("steps[1].agnt"));
        assert!(e.to_string().starts_with(&format!("{}: steps[1].agnt: unknown field `agnt`", path.display())), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "the parser's error is kept as the source");

        std::fs::write(&path, "name: x\nsteps: [{agent: a}]\n").unwrap();
        let e = load::<Outer>(&path).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: steps[0].batch: must be > 0", path.display()));

        let e = load::<Outer>(dir.path().join("absent.yaml")).unwrap_err();
        assert!(e.to_string().contains("absent.yaml: "), "{e}");
        assert!(e.field().is_none());
    }

    #[test]
    fn a_nested_section_is_named_from_the_enclosing_file() {
        let e = ConfigError::invalid("servers", "empty").within("nats").within("audit");
        assert_eq!(e.to_string(), "audit.nats.servers: empty");
        assert_eq!(ConfigError::invalid("[2].x", "bad").within("sinks").to_string(), "sinks[2].x: bad");
        assert_eq!(ConfigError::message("bad").within("tls").to_string(), "tls: bad");
        let root = parse::<Outer>("[1, 2]").unwrap_err();
        assert!(root.field().is_none(), "{root}");
    }
}
