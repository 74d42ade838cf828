//! Reading a consumer's YAML (or JSON) configuration: one rule for every consumer, so errors
//! read the same everywhere: the file, then the path of the field at fault.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Parses `text` and runs `check` on the result; errors name the field at fault.
pub(crate) fn from_text<T: DeserializeOwned>(
    text: &str,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, String> {
    let config = parse(text)?;
    check(&config)?;
    Ok(config)
}

/// [`from_text`] on the file at `path`; errors name the file, then the field.
pub(crate) fn load<T: DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, String> {
    from_text(&read(path)?, check).map_err(|m| format!("{}: {m}", path.display()))
}

/// Parses `text`, naming the field at fault (`steps[1].agent: missing field`).
pub(crate) fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// The text of `path`; the error names the file.
pub(crate) fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
