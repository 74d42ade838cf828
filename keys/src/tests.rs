//! The key file formats and key ids, with RFC 8032's test vector.

use super::*;

/// RFC 8032 section 7.1, test 1.
const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const PUBLIC_HEX: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
/// The same seed as `openssl genpkey -algorithm ed25519` writes it (PKCS#8 v1, RFC 8410).
const SEED_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
const SEED_B64: &str = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
const PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
const KEY_ID: &str = "21fe31dfa154a261626bf854046fd227";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signer() -> Ed25519FileSigner {
    Ed25519FileSigner::from_text(SEED_HEX).unwrap()
}

#[test]
fn file_signer_reads_pkcs8_pem_hex_and_base64_seeds_alike() {
    for text in [SEED_HEX, SEED_PEM, SEED_B64, &format!("  {SEED_HEX}\n")] {
        let s = Ed25519FileSigner::from_text(text).unwrap();
        assert_eq!(hex(&s.public_key()), PUBLIC_HEX, "{text}");
        assert_eq!(s.key_id(), KEY_ID);
    }
    // RFC 8032 test 1: the signature of the empty message.
    let sig = signer().sign(b"").unwrap();
    assert_eq!(
        hex(&sig),
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    );
}

#[test]
fn file_signer_refuses_what_is_not_an_ed25519_key() {
    for text in
        ["", "hello", &SEED_HEX[2..], "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", PUBLIC_PEM]
    {
        assert!(Ed25519FileSigner::from_text(text).is_err(), "{text:?} was accepted");
    }
    let dir = tempfile::tempdir().unwrap();
    let err = Ed25519FileSigner::load(dir.path().join("absent.pem")).unwrap_err();
    assert!(matches!(err, SignError::Key(ref m) if m.contains("absent.pem")), "{err}");
}

#[test]
fn generate_writes_an_owner_only_pkcs8_pem_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.pem");
    let generated = Ed25519FileSigner::generate(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = Ed25519FileSigner::load(&path).unwrap();
    assert_eq!(loaded.public_key(), generated.public_key());
    assert_eq!(loaded.key_id(), generated.key_id());
    assert_eq!(loaded.path(), Some(path.as_path()));
    // Never overwrites a key.
    assert!(Ed25519FileSigner::generate(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // Two generated keys differ.
    let other = Ed25519FileSigner::generate(dir.path().join("other.pem")).unwrap();
    assert_ne!(other.public_key(), generated.public_key());
    // Debug output does not leak the private key.
    let debug = format!("{:?}", signer());
    assert!(debug.contains(KEY_ID) && !debug.contains(&SEED_HEX[..16]), "{debug}");
}

#[test]
fn public_keys_parse_from_pem_hex_and_base64() {
    let s = signer();
    assert_eq!(s.public_key_pem(), PUBLIC_PEM);
    assert_eq!(hex(&parse_public_key(PUBLIC_PEM).unwrap()), PUBLIC_HEX);
    assert_eq!(hex(&parse_public_key(PUBLIC_HEX).unwrap()), PUBLIC_HEX);
    assert!(parse_public_key(SEED_PEM).is_err());
    assert!(parse_public_key("abc").is_err());
    assert_eq!(key_id(&s.public_key()), KEY_ID);
}

#[test]
fn key_config_reads_a_file_or_a_token_and_refuses_both_or_neither() {
    let file: KeyConfig = serde_json::from_str(r#"{"key_file": "/k.pem"}"#).unwrap();
    assert_eq!(file, KeyConfig::KeyFile("/k.pem".into()));
    let token: KeyConfig =
        serde_json::from_str(r#"{"pkcs11": {"token_label": "t", "key_label": "k", "pin_env": "PIN"}}"#).unwrap();
    assert!(matches!(token, KeyConfig::Pkcs11(ref p) if p.key_label == "k"));
    for bad in [r#"{}"#, r#"{"key_file": "/a", "pkcs11": {"key_label": "k"}}"#, r#"{"keyfile": "/a"}"#] {
        assert!(serde_json::from_str::<KeyConfig>(bad).is_err(), "{bad} was accepted");
    }
    assert_eq!(serde_json::to_string(&file).unwrap(), r#"{"key_file":"/k.pem"}"#);
}
