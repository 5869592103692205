//! The library API the market uses for payloads and results:
//! `encrypt_to` / `decrypt`, and the order of checks on untrusted input.

use claude_max_market::crypto::envelope::{decrypt, encrypt_to, CryptoError};
use claude_max_market::crypto::keys::{Identity, PublicIdentity};
use claude_max_market::{AuditLog, Paths};

fn identity() -> (tempfile::TempDir, Identity) {
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::in_one_dir(home.path().to_path_buf());
    let id = Identity::load_or_generate(&paths, &AuditLog::new(&paths)).unwrap();
    // A second call loads the same keys instead of generating new ones.
    assert_eq!(
        Identity::load_or_generate(&paths, &AuditLog::new(&paths))
            .unwrap()
            .node_id(),
        id.node_id()
    );
    assert_eq!(Identity::load(&paths).unwrap().node_id(), id.node_id());
    (home, id)
}

#[test]
fn payload_round_trip_signed_and_pinned() {
    let (_h1, alice) = identity();
    let (_h2, bob) = identity();
    let (_h3, carol) = identity();
    let payload = b"{\"prompt\":\"summarise\"}";
    let env = encrypt_to(&[bob.public()], Some(&alice), payload).unwrap();

    let opened = decrypt(&bob, &env, Some(&alice.public())).unwrap();
    assert_eq!(opened.plaintext, payload);
    assert_eq!(opened.signer.as_deref(), Some(alice.node_id()));

    assert!(matches!(
        decrypt(&bob, &env, Some(&carol.public())),
        Err(CryptoError::WrongSigner { .. })
    ));
    assert!(matches!(decrypt(&carol, &env, None), Err(CryptoError::NotForMe(_))));

    let unsigned = encrypt_to(&[bob.public()], None, payload).unwrap();
    assert!(matches!(
        decrypt(&bob, &unsigned, Some(&alice.public())),
        Err(CryptoError::Unsigned(_))
    ));
    assert_eq!(decrypt(&bob, &unsigned, None).unwrap().signer, None);
    assert_eq!(
        decrypt(&bob, &encrypt_to(&[bob.public()], None, b"").unwrap(), None)
            .unwrap()
            .plaintext,
        b""
    );
}

#[test]
fn signatures_are_checked_before_the_private_key_is_used() {
    let (_h1, alice) = identity();
    let (_h2, bob) = identity();
    let env = encrypt_to(&[bob.public()], Some(&alice), &[7u8; 1000]).unwrap();
    let header_len = u32::from_be_bytes(env[8..12].try_into().unwrap()) as usize;
    // Damage the RSA-wrapped file key (the last bytes before the sender
    // flag and key): unwrapping it would surface as a chunk failure; the
    // header signature must reject it first.
    let mut bad = env.clone();
    bad[12 + header_len - 40] ^= 1;
    assert!(matches!(decrypt(&bob, &bad, None), Err(CryptoError::BadSignature)));
    // Damage a chunk: in memory the content signature is checked before
    // the unwrap too, so this is a signature failure, not a chunk failure.
    let mut bad = env.clone();
    bad[12 + header_len + 64 + 10] ^= 1;
    assert!(matches!(decrypt(&bob, &bad, None), Err(CryptoError::BadSignature)));
}

#[test]
fn public_identity_validation() {
    let (_h, alice) = identity();
    let p = alice.public();
    p.validate().unwrap();
    let sig = alice.sign(b"hello");
    assert!(p.verify(b"hello", &sig));
    assert!(!p.verify(b"hullo", &sig));
    let json = serde_json::to_string(&p).unwrap();
    let back: PublicIdentity = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);

    let mut wrong_id = p.clone();
    wrong_id.node_id = "ab".repeat(32);
    assert!(wrong_id.validate().is_err());
    let mut bad_rsa = p.clone();
    bad_rsa.rsa_public_pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into();
    assert!(bad_rsa.validate().is_err());
    // A 2048-bit key is below the floor.
    let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let mut weak = p.clone();
    weak.rsa_public_pem =
        rsa::pkcs8::EncodePublicKey::to_public_key_pem(&small.to_public_key(), Default::default()).unwrap();
    assert!(weak.validate().unwrap_err().to_string().contains("3072"));
    assert!(encrypt_to(&[weak], None, b"x").is_err());
}
