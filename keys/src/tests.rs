//! The key file formats and key ids, with RFC 8032's test vector, and P-256 keys.

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

fn signer() -> FileSigner {
    FileSigner::from_text(SEED_HEX).unwrap()
}

#[test]
fn file_signer_reads_pkcs8_pem_hex_and_base64_seeds_alike() {
    for text in [SEED_HEX, SEED_PEM, SEED_B64, &format!("  {SEED_HEX}\n")] {
        let s = FileSigner::from_text(text).unwrap();
        assert_eq!(hex(s.public_key().as_bytes()), PUBLIC_HEX, "{text}");
        assert_eq!(s.algorithm(), Algorithm::Ed25519);
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
fn file_signer_refuses_what_is_not_a_key() {
    for text in
        ["", "hello", &SEED_HEX[2..], "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", PUBLIC_PEM]
    {
        assert!(FileSigner::from_text(text).is_err(), "{text:?} was accepted");
    }
    let dir = tempfile::tempdir().unwrap();
    let err = FileSigner::load(dir.path().join("absent.pem")).unwrap_err();
    assert!(matches!(err, SignError::Key(ref m) if m.contains("absent.pem")), "{err}");
}

#[test]
fn generate_writes_an_owner_only_pkcs8_pem_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signer.pem");
    let generated = FileSigner::generate(&path, Algorithm::Ed25519).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = FileSigner::load(&path).unwrap();
    assert_eq!(loaded.public_key(), generated.public_key());
    assert_eq!(loaded.key_id(), generated.key_id());
    assert_eq!(loaded.path(), Some(path.as_path()));
    // Never overwrites a key.
    assert!(FileSigner::generate(&path, Algorithm::Ed25519).is_err());
    assert!(FileSigner::generate(&path, Algorithm::EcdsaP256).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // Two generated keys differ.
    let other = FileSigner::generate(dir.path().join("other.pem"), Algorithm::Ed25519).unwrap();
    assert_ne!(other.public_key(), generated.public_key());
    // Debug output does not leak the private key.
    let debug = format!("{:?}", signer());
    assert!(debug.contains(KEY_ID) && !debug.contains(&SEED_HEX[..16]), "{debug}");
}

#[test]
fn public_keys_parse_from_pem_hex_and_base64() {
    let s = signer();
    assert_eq!(s.public_key().to_pem(), PUBLIC_PEM);
    assert_eq!(hex(PublicKey::parse(PUBLIC_PEM).unwrap().as_bytes()), PUBLIC_HEX);
    assert_eq!(hex(PublicKey::parse(PUBLIC_HEX).unwrap().as_bytes()), PUBLIC_HEX);
    assert_eq!(&PublicKey::parse(&s.public_key().to_text()).unwrap(), s.public_key());
    assert!(PublicKey::parse(SEED_PEM).is_err());
    assert!(PublicKey::parse("abc").is_err());
    assert!(PublicKey::parse("rsa:AAAA").is_err());
    assert_eq!(key_id(s.public_key().as_bytes()), KEY_ID);
}

/// A P-256 key as `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes
/// it (PKCS#8), the same key as SEC1 (`openssl ec`), and its SPKI public key.
const P256_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg1Z1IlSeKhGF4A+8F
ek5zZK+5wQJ8jFY+4ysl/9zMDG6hRANCAAS+hkG+IHD+yaqzbgtzTrrmBtsLDTb5
ndm8r3KdZy0to2omHxUSmwu6MsnCLvfpsvu0afqVvVJD+XLwgEnnZcIl
-----END PRIVATE KEY-----
";
const P256_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEINWdSJUnioRheAPvBXpOc2SvucECfIxWPuMrJf/czAxuoAoGCCqGSM49
AwEHoUQDQgAEvoZBviBw/smqs24Lc0665gbbCw02+Z3ZvK9ynWctLaNqJh8VEpsL
ujLJwi736bL7tGn6lb1SQ/ly8IBJ52XCJQ==
-----END EC PRIVATE KEY-----
";

#[test]
fn p256_keys_load_sign_and_verify() {
    let a = FileSigner::from_text(P256_PKCS8).unwrap();
    let b = FileSigner::from_text(P256_SEC1).unwrap();
    assert_eq!(a.algorithm(), Algorithm::EcdsaP256);
    assert_eq!(a.public_key(), b.public_key());
    assert_eq!(a.public_key().as_bytes().len(), 65);
    let sig = a.sign(b"hello").unwrap();
    assert!(a.public_key().verify(b"hello", &sig));
    assert!(!a.public_key().verify(b"hellO", &sig));
    // An Ed25519 key does not verify a P-256 signature, nor the other way round.
    assert!(!signer().public_key().verify(b"hello", &sig));
    assert!(!a.public_key().verify(b"", &signer().sign(b"").unwrap()));
    // The PEM and text forms read back to the same key.
    let pem = a.public_key().to_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    assert_eq!(&PublicKey::parse(&pem).unwrap(), a.public_key());
    assert_eq!(&PublicKey::parse(&a.public_key().to_text()).unwrap(), a.public_key());
    assert!(a.public_key().to_text().starts_with("p256:"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p256.pem");
    let made = FileSigner::generate(&path, Algorithm::EcdsaP256).unwrap();
    let loaded = FileSigner::load(&path).unwrap();
    assert_eq!(made.public_key(), loaded.public_key());
    assert!(loaded.public_key().verify(b"x", &made.sign(b"x").unwrap()));
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

#[test]
fn keys_on_the_command_line_are_files_or_pkcs11_uris() {
    assert_eq!(KeyConfig::parse("/etc/chorus/node.key").unwrap(), KeyConfig::KeyFile("/etc/chorus/node.key".into()));
    let uri = "pkcs11:token=chorus;object=node%20key?pin-source=file:/etc/chorus/pin&module-path=/opt/p11.so";
    let KeyConfig::Pkcs11(p) = KeyConfig::parse(uri).unwrap() else { panic!("not a token key") };
    assert_eq!(p.token_label.as_deref(), Some("chorus"));
    assert_eq!(p.key_label, "node key");
    assert_eq!(p.pin_file.as_deref(), Some(std::path::Path::new("/etc/chorus/pin")));
    assert_eq!(p.module, std::path::PathBuf::from("/opt/p11.so"));
    let KeyConfig::Pkcs11(p) = KeyConfig::parse("pkcs11:slot-id=7;object=k").unwrap() else { panic!() };
    assert_eq!((p.slot, p.pin_env.as_deref()), (Some(7), Some("CHORUS_PKCS11_PIN")));
    for bad in ["pkcs11:token=x", "pkcs11:object=k;colour=red", "pkcs11:object=%zz", "pkcs11:object=k?pin=1"] {
        assert!(KeyConfig::parse(bad).is_err(), "{bad}");
    }
}
