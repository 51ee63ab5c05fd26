//! Reading an Assignment from its YAML or JSON form.

use std::path::Path;

use crate::v1::Assignment;

/// Why an Assignment file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AssignmentFileError {
    /// The file could not be opened.
    #[error("cannot read assignment file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid YAML/JSON, or a field has the wrong type or name.
    #[error("invalid assignment: {path}: {message}")]
    Parse {
        /// Dotted path of the offending field (empty for syntax errors).
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Parses an Assignment from YAML (JSON is YAML too), naming the field on error.
pub fn parse_assignment(text: &str) -> Result<Assignment, AssignmentFileError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        AssignmentFileError::Parse { path, message: err.into_inner().to_string() }
    })
}

/// Reads and parses an Assignment file.
pub fn read_assignment(path: &Path) -> Result<Assignment, AssignmentFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| AssignmentFileError::Io { path: path.display().to_string(), source })?;
    parse_assignment(&text)
}

/// Serializes an Assignment to its YAML form.
pub fn to_yaml(assignment: &Assignment) -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(assignment)
}
