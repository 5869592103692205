//! The library API the market uses for payloads and results:
//! `encrypt_to` / `decrypt`, and the order of checks on untrusted input.

mod common;
#[path = "common/crypto.rs"]
mod crypto;

use claude_max_market::crypto::envelope::{decrypt, encrypt_to, CryptoError};
use claude_max_market::crypto::keys::{Identity, PublicIdentity};
use claude_max_market::Paths;
use crypto::{data, file_key_of, reseal_chunk, Layout, CHUNK};

fn identity() -> (tempfile::TempDir, Identity) {
    let home = tempfile::tempdir().unwrap();
    let paths = Paths::in_one_dir(home.path().to_path_buf());
    let id = Identity::load_or_generate(&paths).unwrap();
    // A second call loads the same keys instead of generating new ones.
    assert_eq!(Identity::load_or_generate(&paths).unwrap().node_id(), id.node_id());
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

#[test]
fn a_co_recipient_cannot_forge_a_signed_payload_in_memory() {
    // alice signs a payload to bob and carol; carol unwraps the file key with
    // her own private key and re-seals chunk 0 with her text.
    let (_h1, alice) = identity();
    let (_h2, bob) = identity();
    let (h3, carol) = identity();
    let payload = data(3 * CHUNK, 3);
    let forged_text = vec![b'c'; CHUNK];
    let forge = |env: &[u8]| {
        let layout = Layout::of(env);
        let key = file_key_of(&h3.path().join("keys"), env, &layout);
        let mut forged = env.to_vec();
        reseal_chunk(&mut forged, &layout, &key, 0, &forged_text);
        forged
    };

    let signed = encrypt_to(&[bob.public(), carol.public()], Some(&alice), &payload).unwrap();
    let forged = forge(&signed);
    for pin in [Some(alice.public()), None] {
        assert!(matches!(
            decrypt(&bob, &forged, pin.as_ref()),
            Err(CryptoError::BadSignature)
        ));
    }
    assert_eq!(
        decrypt(&bob, &signed, Some(&alice.public())).unwrap().plaintext,
        payload
    );

    // Unsigned, the same forgery opens: a co-recipient can say anything in
    // an unsigned envelope, which is why the market always signs and pins.
    let unsigned = encrypt_to(&[bob.public(), carol.public()], None, &payload).unwrap();
    let opened = decrypt(&bob, &forge(&unsigned), None).unwrap();
    assert_eq!(&opened.plaintext[..CHUNK], &forged_text[..]);
    assert_eq!(opened.signer, None);
}
