//! Feed arbitrary bytes to the envelope parser and both decryptors (in
//! memory and streaming), as the documented test identity. Any panic, hang
//! or unbounded allocation is a bug, and so is one reader accepting what the
//! other refuses; errors are the expected outcome.
//!
//! Seed the corpus with the FORMAT.md vector (see fuzz/README.md) so the
//! mutations reach the RSA unwrap and the chunk loop.
#![no_main]

use std::sync::OnceLock;

use claude_max_market::crypto::envelope::{decrypt, decrypt_stream, read_prefix};
use claude_max_market::crypto::keys::{Identity, KeyPair};
use libfuzzer_sys::fuzz_target;

const FORMAT_MD: &str = include_str!("../../docs/FORMAT.md");

fn identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| {
        let begin = FORMAT_MD.find("-----BEGIN PRIVATE KEY-----").expect("vector key");
        let end = FORMAT_MD.find("-----END PRIVATE KEY-----").expect("vector key end") + 25;
        let rsa = <rsa::RsaPrivateKey as rsa::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&FORMAT_MD[begin..end])
            .expect("vector RSA key parses");
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = i as u8;
        }
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        let pair = KeyPair::from_parts(signing, rsa, chrono::Utc::now()).expect("vector pair");
        Identity::from_pairs(pair, Vec::new())
    })
}

fuzz_target!(|data: &[u8]| {
    let me = identity();
    let _ = read_prefix(&mut &data[..]);
    let in_memory = decrypt(me, data, None);
    let _ = decrypt(me, data, Some(&me.public()));
    let mut streamed = Vec::new();
    let stream = decrypt_stream(me, data, &mut streamed, None);
    // Both readers accept exactly the same envelopes, with the same
    // plaintext: `decrypt --output` trusts the stream reader's verdict.
    match (&in_memory, &stream) {
        (Ok(opened), Ok(report)) => {
            assert_eq!(opened.plaintext, streamed);
            assert_eq!(opened.signer, report.signer);
        }
        (Err(_), Err(_)) => {}
        _ => panic!("readers disagree: in memory {in_memory:?}, streaming {stream:?}"),
    }
});
