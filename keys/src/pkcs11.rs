//! A key held by a PKCS#11 token (an HSM, a smart card, SoftHSM2): Ed25519 or ECDSA P-256.
//!
//! The private key never leaves the token: [`Pkcs11Signer::sign`] hands the message to the
//! token, which signs it with `CKM_EDDSA` (pure Ed25519) or, for a P-256 key, signs its
//! SHA-256 digest with `CKM_ECDSA` (the mechanism every EC token has; the digest is made
//! here). The public key is read from the token's public key object with the same label
//! (`CKA_EC_POINT`), and checked against the private key once at start by signing and
//! verifying a probe message.
//!
//! ```yaml
//! # e.g. the `signer:` section of a service configuration
//! pkcs11:
//!   module: /usr/lib/softhsm/libsofthsm2.so   # the default
//!   token_label: chorus                        # or slot: 1234567
//!   pin_file: /etc/chorus/token.pin            # or pin: "1234", or pin_env: CHORUS_PKCS11_PIN
//!   key_label: chorus-signer
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Algorithm, PublicKey, SignError, Signer};

/// Where Debian installs SoftHSM2's PKCS#11 module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// DER of the Ed25519 curve OID (1.3.101.112), the `CKA_EC_PARAMS` of an Ed25519 key.
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER of the P-256 curve OID (1.2.840.10045.3.1.7, prime256v1), the `CKA_EC_PARAMS` of a
/// P-256 key.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How to reach a key on a PKCS#11 token.
#[derive(schemars::JsonSchema, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library) of the token.
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// The slot id of the token. Either this or `token_label`; with neither, the only
    /// initialized token is used.
    #[serde(default)]
    pub slot: Option<u64>,
    /// The label of the token (SoftHSM2 assigns slot ids at random, labels stay).
    #[serde(default)]
    pub token_label: Option<String>,
    /// The user PIN. Prefer `pin_file` or `pin_env` to keep it out of configuration files.
    #[serde(default)]
    pub pin: Option<String>,
    /// A file holding the user PIN (surrounding whitespace ignored).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// `CKA_LABEL` of the key pair (private and public key objects).
    pub key_label: String,
}

fn default_module() -> PathBuf {
    PathBuf::from(DEFAULT_MODULE)
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("slot", &self.slot)
            .field("token_label", &self.token_label)
            .field("pin", &self.pin.as_ref().map(|_| "<redacted>"))
            .field("pin_file", &self.pin_file)
            .field("pin_env", &self.pin_env)
            .field("key_label", &self.key_label)
            .finish()
    }
}

impl Pkcs11Config {
    /// The key labelled `key_label` on the token labelled `token_label`, with `pin`, through
    /// the default module.
    pub fn new(token_label: impl Into<String>, pin: impl Into<String>, key_label: impl Into<String>) -> Self {
        Pkcs11Config {
            module: default_module(),
            slot: None,
            token_label: Some(token_label.into()),
            pin: Some(pin.into()),
            pin_file: None,
            pin_env: None,
            key_label: key_label.into(),
        }
    }

    /// The user PIN, from `pin`, `pin_file` or `pin_env` (the first one set).
    fn resolve_pin(&self) -> Result<AuthPin, SignError> {
        if let Some(pin) = &self.pin {
            return Ok(AuthPin::from(pin.as_str()));
        }
        if let Some(path) = &self.pin_file {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| SignError::Key(format!("pkcs11 pin_file {}: {e}", path.display())))?,
            );
            return Ok(AuthPin::from(text.trim()));
        }
        if let Some(var) = &self.pin_env {
            let pin = zeroize::Zeroizing::new(
                std::env::var(var).map_err(|e| SignError::Key(format!("pkcs11 pin_env {var}: {e}")))?,
            );
            return Ok(AuthPin::from(pin.trim()));
        }
        Err(SignError::Key("pkcs11: no PIN configured (pin, pin_file or pin_env)".into()))
    }
}

/// One initialized context per module per process: `C_Initialize` may be called only once.
fn context(module: &Path) -> Result<Pkcs11, SignError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let ctx =
        Pkcs11::new(module).map_err(|e| SignError::Key(format!("loading PKCS#11 module {}: {e}", module.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(SignError::Key(format!("initializing PKCS#11 module {}: {}", module.display(), short(&e))))
        }
    }
    contexts.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

fn key_err(what: &str) -> impl FnOnce(CkError) -> SignError + '_ {
    move |e| SignError::Key(format!("pkcs11 {what}: {}", short(&e)))
}

/// A PKCS#11 error in a line: the function and the return value's name (cryptoki's own
/// text is a paragraph from the specification).
fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// The slot the configuration names.
fn find_slot(ctx: &Pkcs11, config: &Pkcs11Config) -> Result<Slot, SignError> {
    let slots = ctx.get_slots_with_token().map_err(key_err("listing slots"))?;
    if let Some(id) = config.slot {
        return slots
            .into_iter()
            .find(|s| s.id() == id)
            .ok_or_else(|| SignError::Key(format!("pkcs11: no token in slot {id}")));
    }
    let mut labelled = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else { continue };
        if !info.token_initialized() {
            continue;
        }
        labelled.push((slot, info.label().trim_end().to_owned()));
    }
    match &config.token_label {
        Some(label) => labelled
            .into_iter()
            .find(|(_, l)| l == label)
            .map(|(slot, _)| slot)
            .ok_or_else(|| SignError::Key(format!("pkcs11: no token labelled {label:?}"))),
        None if labelled.len() == 1 => Ok(labelled[0].0),
        None => Err(SignError::Key(format!("pkcs11: {} initialized tokens; set slot or token_label", labelled.len()))),
    }
}

/// Opens a session on the token and logs the user in.
fn open_session(ctx: &Pkcs11, slot: Slot, pin: &AuthPin, rw: bool) -> Result<Session, SignError> {
    let session =
        if rw { ctx.open_rw_session(slot) } else { ctx.open_ro_session(slot) }.map_err(key_err("opening a session"))?;
    match session.login(UserType::User, Some(pin)) {
        // Login state is per application and token: another session of ours logged in.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            Err(SignError::Key("pkcs11 login: wrong PIN (CKR_PIN_INCORRECT)".into()))
        }
        Err(e) => Err(SignError::Key(format!("pkcs11 login: {}", short(&e)))),
    }
}

fn key_template(class: ObjectClass, label: &str) -> Vec<Attribute> {
    vec![Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())]
}

/// The single object matching `template`.
fn find_one(session: &Session, template: &[Attribute], what: &str) -> Result<ObjectHandle, SignError> {
    let found = session.find_objects(template).map_err(key_err("finding objects"))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(SignError::Key(format!("pkcs11: no {what}"))),
        many => Err(SignError::Key(format!("pkcs11: {} objects match {what}", many.len()))),
    }
}

/// The public key from a `CKA_EC_POINT`: a DER OCTET STRING around the raw key (PKCS#11
/// 3.0), or the raw bytes (some older tokens). Ed25519 keys are 32 bytes, P-256 points 65.
fn parse_ec_point(algorithm: Algorithm, point: &[u8]) -> Option<PublicKey> {
    let len = match algorithm {
        Algorithm::Ed25519 => 32,
        Algorithm::EcdsaP256 => 65,
    };
    let raw = match point {
        [0x04, l, rest @ ..] if usize::from(*l) == len && rest.len() == len => rest,
        raw if raw.len() == len => raw,
        _ => return None,
    };
    match algorithm {
        Algorithm::Ed25519 => PublicKey::ed25519(raw.try_into().ok()?).ok(),
        Algorithm::EcdsaP256 => PublicKey::p256(raw).ok(),
    }
}

/// The algorithm of a key from its `CKA_KEY_TYPE` and `CKA_EC_PARAMS`.
fn algorithm_of(key_type: KeyType, params: &[u8]) -> Option<Algorithm> {
    if key_type == KeyType::EC_EDWARDS && (params == ED25519_OID || is_edwards25519_name(params)) {
        Some(Algorithm::Ed25519)
    } else if key_type == KeyType::EC && params == P256_OID {
        Some(Algorithm::EcdsaP256)
    } else {
        None
    }
}

/// The private key handle and the session it is valid in.
struct Open {
    session: Session,
    key: ObjectHandle,
}

/// A key held by a PKCS#11 token; see the module documentation.
///
/// Thread-safe: the logged-in session is behind a mutex (PKCS#11 sessions are not to be
/// used from two threads at once); a session the token dropped is reopened once.
pub struct Pkcs11Signer {
    ctx: Pkcs11,
    slot: Slot,
    pin: AuthPin,
    label: String,
    public_key: PublicKey,
    open: Mutex<Option<Open>>,
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("slot", &self.slot.id())
            .field("key_label", &self.label)
            .field("algorithm", &self.public_key.algorithm())
            .field("key_id", &self.public_key.key_id())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Signer {
    /// Opens the token, logs in, finds the key pair labelled `key_label` (Ed25519 or P-256)
    /// and checks that the private and public key objects belong together.
    pub fn open(config: &Pkcs11Config) -> Result<Self, SignError> {
        let ctx = context(&config.module)?;
        let slot = find_slot(&ctx, config)?;
        let pin = config.resolve_pin()?;
        let session = open_session(&ctx, slot, &pin, false)?;
        let label = config.key_label.as_str();
        let key = find_one(
            &session,
            &key_template(ObjectClass::PRIVATE_KEY, label),
            &format!("private key labelled {label:?}"),
        )?;
        let public = find_one(
            &session,
            &key_template(ObjectClass::PUBLIC_KEY, label),
            &format!("public key labelled {label:?}"),
        )?;
        let attributes = session
            .get_attributes(public, &[AttributeType::KeyType, AttributeType::EcPoint, AttributeType::EcParams])
            .map_err(key_err("reading the public key"))?;
        let (mut key_type, mut point, mut params) = (None, None, None);
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::EcParams(p) => params = Some(p),
                _ => {}
            }
        }
        let algorithm = key_type
            .zip(params.as_deref())
            .and_then(|(t, p)| algorithm_of(t, p))
            .ok_or_else(|| SignError::Key(format!("pkcs11: key {label:?} is neither Ed25519 nor ECDSA P-256")))?;
        let public_key = point
            .as_deref()
            .and_then(|p| parse_ec_point(algorithm, p))
            .ok_or_else(|| SignError::Key(format!("pkcs11: key {label:?} has no usable {algorithm} CKA_EC_POINT")))?;
        let signer = Pkcs11Signer {
            ctx,
            slot,
            pin,
            label: label.to_owned(),
            public_key,
            open: Mutex::new(Some(Open { session, key })),
        };
        // The public key object could be another key's: prove they are a pair.
        let probe = b"chorus pkcs11 key pair check";
        let sig = signer.sign(probe)?;
        if !signer.public_key.verify(probe, &sig) {
            return Err(SignError::Key(format!(
                "pkcs11: the public key labelled {label:?} does not match the private key"
            )));
        }
        Ok(signer)
    }

    /// Generates a key pair of `algorithm` labelled `key_label` on the token (the private
    /// key sensitive and not extractable) and opens it. Refuses when a key with that label
    /// is there already. For `chorus keys new` and tests.
    pub fn generate(config: &Pkcs11Config, algorithm: Algorithm) -> Result<Self, SignError> {
        let ctx = context(&config.module)?;
        let slot = find_slot(&ctx, config)?;
        let pin = config.resolve_pin()?;
        let session = open_session(&ctx, slot, &pin, true)?;
        let label = config.key_label.as_bytes().to_vec();
        let existing = session.find_objects(&[Attribute::Label(label.clone())]).map_err(key_err("finding objects"))?;
        if !existing.is_empty() {
            return Err(SignError::Key(format!(
                "pkcs11: the token already has objects labelled {:?}",
                config.key_label
            )));
        }
        let (mechanism, params) = match algorithm {
            Algorithm::Ed25519 => (Mechanism::EccEdwardsKeyPairGen, ED25519_OID.to_vec()),
            Algorithm::EcdsaP256 => (Mechanism::EccKeyPairGen, P256_OID.to_vec()),
        };
        let id = label.clone();
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
            Attribute::EcParams(params),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| SignError::Failed(format!("pkcs11 generating a {algorithm} key pair: {}", short(&e))))?;
        drop(session);
        Self::open(config)
    }

    /// `CKA_LABEL` of the key.
    pub fn key_label(&self) -> &str {
        &self.label
    }

    /// The slot of the token.
    pub fn slot_id(&self) -> u64 {
        self.slot.id()
    }

    fn reopen(&self) -> Result<Open, SignError> {
        let session = open_session(&self.ctx, self.slot, &self.pin, false)?;
        let key = find_one(
            &session,
            &key_template(ObjectClass::PRIVATE_KEY, &self.label),
            &format!("private key labelled {:?}", self.label),
        )?;
        Ok(Open { session, key })
    }

    fn sign_in(&self, open: &Open, message: &[u8]) -> Result<Vec<u8>, CkError> {
        match self.public_key.algorithm() {
            Algorithm::Ed25519 => {
                let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
                open.session.sign(&mechanism, open.key, message)
            }
            Algorithm::EcdsaP256 => open.session.sign(&Mechanism::Ecdsa, open.key, &Sha256::digest(message)),
        }
    }
}

/// `CKA_EC_PARAMS` as a PrintableString curve name (PKCS#11 3.0 allows it for Edwards curves).
fn is_edwards25519_name(params: &[u8]) -> bool {
    params.len() >= 2 && params[0] == 0x13 && &params[2..] == b"edwards25519"
}

/// Errors after which a fresh session may succeed.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::DeviceError,
            _
        )
    )
}

impl Signer for Pkcs11Signer {
    fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        let mut guard = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut result = match guard.as_ref() {
            Some(open) => self.sign_in(open, message),
            None => Err(CkError::Pkcs11(RvError::SessionHandleInvalid, cryptoki::context::Function::Sign)),
        };
        if matches!(&result, Err(e) if session_lost(e)) {
            *guard = None;
            let open = self.reopen()?;
            result = self.sign_in(&open, message);
            *guard = Some(open);
        }
        let sig = result.map_err(|e| SignError::Failed(format!("pkcs11 signing: {}", short(&e))))?;
        let sig: [u8; 64] = sig.as_slice().try_into().map_err(|_| {
            SignError::Failed(format!("pkcs11: the token returned a {}-byte signature, not 64", sig.len()))
        })?;
        Ok(match self.public_key.algorithm() {
            Algorithm::Ed25519 => sig,
            // Low-S form, so a signature has one encoding (tokens may return either).
            Algorithm::EcdsaP256 => match p256::ecdsa::Signature::from_slice(&sig) {
                Ok(s) => s.normalize_s().unwrap_or(s).to_bytes().into(),
                Err(_) => sig,
            },
        })
    }
}
