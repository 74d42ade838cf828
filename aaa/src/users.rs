//! The users file: who may log in, as which caller, in which tenant, calling what.
//!
//! ```yaml
//! users:
//!   - username: alice
//!     password_hash: "$argon2id$v=19$m=19456,t=2,p=1$..."   # chorus aaa hash-password
//!     callerid: up=alice
//!     tenant: acme
//!     collectives: [acme]          # optional: every collective of the tenant when absent
//!     agents: ["rpcutil.*", "puppet.status"]
//!     properties: {team: web}      # optional, copied into the token
//!     disabled: false              # optional; a disabled user can neither log in nor sign
//! ```
//!
//! The service reads the file again whenever it changes: a user deleted or disabled there is
//! refused at the next signing call, even with a token that has not expired.
//!
//! Password hashes are argon2id PHC strings (what [`hash_password`] writes); bcrypt hashes
//! (`$2a$`/`$2b$`/`$2y$`) are accepted too, so existing credentials can be carried over.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};

use crate::AaaError;

/// The users file.
#[derive(schemars::JsonSchema, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    /// Every user who may log in.
    pub users: Vec<User>,
}

impl chorus_runtime::Config for UsersFile {}

/// One user.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub username: String,
    /// argon2id (or bcrypt) hash of the password.
    pub password_hash: String,
    /// Caller id requests are made as, `kind=name` (e.g. `up=alice`).
    pub callerid: String,
    /// Tenant the user belongs to; requests may only go to this tenant's collectives.
    pub tenant: String,
    /// Collectives of the tenant the user may address; empty = all of the tenant's.
    #[serde(default)]
    pub collectives: Vec<String>,
    /// What the user may call: `agent.action`, `agent.*` or `*`.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Free-form properties, copied into the token's `user_properties`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// A disabled user can neither log in nor have requests signed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// Users by name.
#[derive(Clone, Debug, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
}

impl Users {
    /// Checks and indexes `file`: unique names, a `kind=name` caller id, a hash we can read,
    /// well-formed agent patterns.
    pub fn new(file: UsersFile) -> Result<Self, AaaError> {
        let mut by_name = HashMap::new();
        for (i, u) in file.users.into_iter().enumerate() {
            let at = format!("users[{i}] ({})", u.username);
            if u.username.is_empty() {
                return Err(AaaError::config(format!("users[{i}]: username is empty")));
            }
            match u.callerid.split_once('=') {
                Some((kind, name)) if !kind.is_empty() && !name.is_empty() => {}
                _ => return Err(AaaError::config(format!("{at}: callerid {:?} is not kind=name", u.callerid))),
            }
            if u.tenant.is_empty() {
                return Err(AaaError::config(format!("{at}: tenant is empty")));
            }
            if !is_supported_hash(&u.password_hash) {
                return Err(AaaError::config(format!(
                    "{at}: password_hash is neither an argon2 PHC string nor a bcrypt hash"
                )));
            }
            for pattern in &u.agents {
                chorus_identity::check_agent_pattern(pattern)
                    .map_err(|e| AaaError::config(format!("{at}: agents: {e}")))?;
            }
            if by_name.insert(u.username.clone(), u).is_some() {
                return Err(AaaError::config(format!("{at}: username defined twice")));
            }
        }
        Ok(Users { by_name })
    }

    /// Reads a users file (YAML).
    pub fn load(path: &Path) -> Result<Self, AaaError> {
        let file: UsersFile = chorus_runtime::config::load(path)?;
        Self::new(file).map_err(|e| match e {
            AaaError::Config(c) => AaaError::Config(c.in_file(path)),
            other => other,
        })
    }

    /// The user called `username`.
    pub fn get(&self, username: &str) -> Option<&User> {
        self.by_name.get(username)
    }

    /// Every user.
    pub fn iter(&self) -> impl Iterator<Item = &User> {
        self.by_name.values()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// An argon2id hash (PHC string, random salt, the crate's default cost) of `password`.
pub fn hash_password(password: &str) -> Result<String, AaaError> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AaaError::config(format!("hashing password: {e}")))
}

/// Whether `password` matches `hash` (argon2 PHC string or bcrypt). Unreadable hashes never
/// match. Takes tens of milliseconds on purpose: run it off the async executor.
pub fn verify_password(password: &str, hash: &str) -> bool {
    if is_bcrypt(hash) {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A hash checked against when the user does not exist, so that a login for an unknown
/// user costs as much as one for a known user with a wrong password.
pub(crate) fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("chorus-aaa-no-such-user").expect("argon2 with defaults hashes"))
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$", "$2x$"].iter().any(|p| hash.starts_with(p))
}

fn is_supported_hash(hash: &str) -> bool {
    is_bcrypt(hash) || PasswordHash::new(hash).is_ok_and(|h| h.algorithm.as_str().starts_with("argon2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt_hashes_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("S3cret", &h));
        let b = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify_password("s3cret", &b));
        assert!(!verify_password("nope", &b));
        assert!(!verify_password("s3cret", "garbage"));
    }

    #[test]
    fn users_file_is_checked() {
        let ok = hash_password("x").unwrap();
        let user = |name: &str, caller: &str, hash: &str| User {
            username: name.into(),
            password_hash: hash.into(),
            callerid: caller.into(),
            tenant: "acme".into(),
            collectives: vec![],
            agents: vec!["rpcutil.*".into()],
            properties: Default::default(),
            disabled: false,
        };
        assert!(Users::new(UsersFile { users: vec![user("a", "up=a", &ok)] }).is_ok());
        let e = Users::new(UsersFile { users: vec![user("a", "alice", &ok)] }).unwrap_err();
        assert!(e.to_string().contains("kind=name"), "{e}");
        let e = Users::new(UsersFile { users: vec![user("a", "up=a", "plain")] }).unwrap_err();
        assert!(e.to_string().contains("password_hash"), "{e}");
        let e = Users::new(UsersFile { users: vec![user("a", "up=a", &ok), user("a", "up=b", &ok)] }).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
