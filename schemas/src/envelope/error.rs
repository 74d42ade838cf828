//! Why bytes are not an event.

/// Why bytes could not be decoded into an [`EventRecord`]. Every variant names the offending
/// part so a dead-letter entry or log line is actionable; quoted input is clipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input larger than [`MAX_EVENT_BYTES`].
    #[error("event is {size} bytes, over the {max} byte limit")]
    Oversize {
        /// Size of the input, bytes.
        size: usize,
        /// The limit, bytes.
        max: usize,
    },
    /// Not valid JSON (including nesting deeper than the parser's limit of 128).
    #[error("event is not JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object.
    #[error("event is not a JSON object")]
    NotAnObject,
    /// A required CloudEvents attribute is absent or null.
    #[error("missing CloudEvents attribute `{0}`")]
    MissingAttribute(&'static str),
    /// A CloudEvents attribute has the wrong type or value.
    #[error("invalid CloudEvents attribute `{attribute}`: {reason}")]
    InvalidAttribute {
        /// Attribute name.
        attribute: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The CloudEvents `type` (or legacy `protocol`) is not one Chorus knows.
    #[error("unknown event type \"{0}\"")]
    UnknownType(String),
    /// `data` does not deserialize as the document of the type (or breaks one of its rules).
    #[error("data does not match type {ty}: {path}: {message}")]
    InvalidData {
        /// The event type the data was decoded as.
        ty: &'static str,
        /// JSON path of the offending field inside `data` (`.` for the document itself).
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The document's `protocol` is not the CloudEvents `type`.
    #[error("CloudEvents type \"{ty}\" does not match data protocol \"{protocol}\"")]
    TypeMismatch {
        /// The CloudEvents type.
        ty: &'static str,
        /// The data's protocol.
        protocol: String,
    },
    /// A lifecycle event whose inner `id` is not the CloudEvents `id` (Choria keeps them equal).
    #[error("CloudEvents id \"{id}\" does not match lifecycle data id \"{data_id}\"")]
    IdMismatch {
        /// The CloudEvents id.
        id: String,
        /// The lifecycle document's id.
        data_id: String,
    },
    /// The CloudEvents `subject` is not the node identity in the data.
    #[error("CloudEvents subject \"{subject}\" does not match the event's node identity \"{identity}\"")]
    SubjectMismatch {
        /// The CloudEvents subject.
        subject: String,
        /// The identity in the data ([`Event::identity`]).
        identity: String,
    },
    /// The `seq` extension is not an unsigned 64-bit integer.
    #[error("invalid seq extension: {0}")]
    BadSeq(String),
}

impl DecodeError {
    /// Stable snake_case name of the variant, for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Oversize { .. } => "oversize",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingAttribute(_) => "missing_attribute",
            DecodeError::InvalidAttribute { .. } => "invalid_attribute",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::InvalidData { .. } => "invalid_data",
            DecodeError::TypeMismatch { .. } => "type_mismatch",
            DecodeError::IdMismatch { .. } => "id_mismatch",
            DecodeError::SubjectMismatch { .. } => "subject_mismatch",
            DecodeError::BadSeq(_) => "bad_seq",
        }
    }
}
