//! bcrypt password hashes as nats-server reads them.

use chorus_runtime::ConfigError;

use crate::Result;

/// A bcrypt hash of `password` in the `$2a$` form nats-server reads.
pub fn hash_password(password: &str, cost: u32) -> Result<String> {
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| ConfigError::message(format!("bcrypt: {e}")))
}

/// Whether `s` looks like a bcrypt hash nats-server recognises (`$2a$NN$…`, `$2b$`, `$2x$`, `$2y$`).
pub fn is_bcrypt(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 60
        && b[0] == b'$'
        && b[1] == b'2'
        && matches!(b[2], b'a' | b'b' | b'x' | b'y')
        && b[3] == b'$'
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
}
