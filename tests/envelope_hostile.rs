//! Hostile envelopes through the real binary. Every mutation of a real
//! envelope (a flipped, inserted or deleted byte, or a cut, at the fields
//! of docs/FORMAT.md and at seeded random offsets) must fail with the
//! documented exit code (2 when the input no longer starts with the magic,
//! 5 otherwise), print **nothing** on stdout and leave no file behind. And
//! a co-recipient who knows the file key cannot make a signed envelope say
//! something its sender did not sign.
//!
//! Bounded: about 300 decryptions of envelopes up to ~600 KiB, split over
//! tests that run in parallel.

mod common;
#[path = "common/crypto.rs"]
mod crypto;

use std::fs;

use common::Cmm;
use crypto::*;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

const MAGIC_LEN: usize = 7;

/// alice writes, bob and carol receive; bob knows alice (`--require-signer
/// alice`) and alice knows both.
struct Nodes {
    alice: Cmm,
    bob: Cmm,
    carol: Cmm,
}

fn nodes() -> Nodes {
    let (alice, bob, carol) = (node(0), node(1), node(2));
    introduce(&alice, &bob, "alice");
    introduce(&bob, &alice, "bob");
    introduce(&carol, &alice, "carol");
    Nodes { alice, bob, carol }
}

/// alice encrypts `body` to bob (and carol), signed or not.
fn seal(n: &Nodes, body: &[u8], signed: bool, with_carol: bool) -> Vec<u8> {
    let mut args = vec!["encrypt", "-i", "-", "-o", "-", "-r", "bob"];
    if with_carol {
        args.extend(["-r", "carol"]);
    }
    if signed {
        args.push("--sign");
    }
    let (code, env, err) = raw(&n.alice, &args, body);
    assert_eq!(code, 0, "{err}");
    env
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

impl Mutation {
    fn apply(self, env: &[u8]) -> Vec<u8> {
        let mut e = env.to_vec();
        match self {
            Mutation::Flip(at, mask) => e[at] ^= mask,
            Mutation::Insert(at, b) => e.insert(at, b),
            Mutation::Delete(at) => {
                e.remove(at);
            }
            Mutation::Truncate(len) => e.truncate(len),
        }
        e
    }

    /// The documented line: an input that no longer starts with the full
    /// magic is "not an envelope" (2); one that does is ours, damaged (5).
    fn expected_exit(self) -> i32 {
        let at = match self {
            Mutation::Flip(at, _) | Mutation::Insert(at, _) | Mutation::Delete(at) | Mutation::Truncate(at) => at,
        };
        if at < MAGIC_LEN {
            2
        } else {
            5
        }
    }
}

/// Every way the binary is pointed at the bad bytes: from a file to stdout,
/// from stdin to stdout, from a file to a file.
#[derive(Debug, Clone, Copy)]
enum Route {
    FileToStdout,
    StdinToStdout,
    FileToFile,
}

/// Decrypt `bad` as bob along `route`: assert the exit code, that stdout
/// stayed empty and that nothing but the input is left in its directory.
fn assert_refused(bob: &Cmm, bad: &[u8], require: Option<&str>, route: Route, want: i32, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.cmm");
    fs::write(&input, bad).unwrap();
    let out = dir.path().join("out.bin");
    let mut args = vec!["decrypt"];
    match route {
        Route::FileToStdout => args.extend(["-i", s(&input), "-o", "-"]),
        Route::StdinToStdout => args.extend(["-i", "-"]),
        Route::FileToFile => args.extend(["-i", s(&input), "-o", s(&out)]),
    }
    if let Some(r) = require {
        args.extend(["--require-signer", r]);
    }
    let stdin = if matches!(route, Route::StdinToStdout) {
        bad
    } else {
        b""
    };
    let (code, stdout, err) = raw(bob, &args, stdin);
    assert_eq!(code, want, "{what} via {route:?}: exit {code}, want {want}\n{err}");
    assert!(
        stdout.is_empty(),
        "{what} via {route:?}: {} bytes on stdout\n{err}",
        stdout.len()
    );
    assert_eq!(
        names_in(dir.path()),
        ["bad.cmm"],
        "{what} via {route:?}: a file was left"
    );
    if want == 2 {
        assert!(err.contains("not an envelope"), "{what}: {err}");
    } else {
        assert!(err.contains("error:"), "{what}: {err}");
    }
}

/// Mutate one envelope of `size` bytes many ways; every mutation must be
/// refused with nothing released.
fn hostile(size: usize, signed: bool, with_carol: bool) {
    let n = nodes();
    let body = data(size, size as u8 ^ 0x5c);
    let env = seal(&n, &body, signed, with_carol);
    let require = signed.then_some("alice");
    let layout = Layout::of(&env);

    // The untouched envelope opens along every route: the refusals below
    // are the mutations' doing.
    let mut args = vec!["decrypt", "-i", "-"];
    if let Some(r) = require {
        args.extend(["--require-signer", r]);
    }
    let (code, out, err) = raw(&n.bob, &args, &env);
    assert_eq!((code, out == body), (0, true), "{err}");

    let len = env.len();
    let mut muts: Vec<Mutation> = layout
        .interesting(len)
        .into_iter()
        .map(|at| Mutation::Flip(at, 0x01))
        .collect();
    let ct = layout.chunk_size + TAG;
    let p = layout.prefix_len;
    for cut in [0, 5, 7, 12, p - 1, p, p + TAG - 1, p + ct, len - SIG, len - 1] {
        if cut < len {
            muts.push(Mutation::Truncate(cut));
        }
    }
    muts.extend([
        Mutation::Insert(2, 0),
        Mutation::Insert(7, 0),
        Mutation::Insert(p, 0),
        Mutation::Insert(len, 0),
        Mutation::Delete(0),
        Mutation::Delete(8),
        Mutation::Delete(p + 1),
        Mutation::Delete(len - 1),
    ]);
    // A few seeded random ones (the seed is in the failure message).
    let seed = (size as u64) << 2 | (signed as u64) << 1 | with_carol as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..4 {
        let at = rng.gen_range(0..len);
        muts.push(match rng.gen_range(0..4) {
            0 => Mutation::Flip(at, 1 << rng.gen_range(0..8)),
            1 => Mutation::Insert(at, rng.gen()),
            2 => Mutation::Delete(at),
            _ => Mutation::Truncate(at),
        });
    }

    let routes = [Route::FileToStdout, Route::StdinToStdout, Route::FileToFile];
    for (i, m) in muts.iter().enumerate() {
        let bad = m.apply(&env);
        let what =
            format!("{m:?} of a {len}-byte envelope ({size} bytes, signed {signed}, carol {with_carol}, seed {seed})");
        assert_refused(
            &n.bob,
            &bad,
            require,
            routes[i % routes.len()],
            m.expected_exit(),
            &what,
        );
    }
    eprintln!(
        "{} mutations of a {len}-byte envelope refused, nothing released",
        muts.len()
    );
}

#[test]
fn empty_payload_unsigned() {
    hostile(0, false, false);
}

#[test]
fn empty_payload_signed_two_recipients() {
    hostile(0, true, true);
}

#[test]
fn one_byte_signed() {
    hostile(1, true, false);
}

#[test]
fn one_byte_unsigned_two_recipients() {
    hostile(1, false, true);
}

#[test]
fn exactly_one_chunk_unsigned_two_recipients() {
    hostile(CHUNK, false, true);
}

#[test]
fn one_past_a_chunk_boundary_signed_two_recipients() {
    hostile(CHUNK + 1, true, true);
}

#[test]
fn several_chunks_signed() {
    // More than one batch of chunks (docs/FORMAT.md): a streaming reader
    // would have released the first batch before reaching the damage.
    hostile(9 * CHUNK + 5, true, false);
}

#[test]
fn several_chunks_unsigned_two_recipients() {
    hostile(9 * CHUNK + 5, false, true);
}

#[test]
fn a_flip_near_the_end_releases_nothing_on_stdout() {
    // The reported case, scaled down: many batches verify and only the
    // last chunk is damaged. A reader that writes as it goes prints
    // almost all of the plaintext before it fails.
    let n = nodes();
    let body = data(40 * CHUNK + 100, 9);
    for signed in [false, true] {
        let mut env = seal(&n, &body, signed, false);
        let at = env.len() - if signed { SIG } else { 0 } - 50;
        env[at] ^= 0x10;
        let require = signed.then_some("alice");
        for route in [Route::FileToStdout, Route::StdinToStdout, Route::FileToFile] {
            assert_refused(
                &n.bob,
                &env,
                require,
                route,
                5,
                &format!("flip at {at}, signed {signed}"),
            );
        }
    }
}

#[test]
fn a_co_recipient_cannot_forge_what_alice_signed() {
    // alice signs a 20-chunk file to bob and carol. carol unwraps the file
    // key with her own private key and re-seals chunk 0 with her text.
    let n = nodes();
    let body = data(20 * CHUNK, 1);
    let forged_text: Vec<u8> = b"carol was here. ".iter().copied().cycle().take(CHUNK).collect();

    let signed = seal(&n, &body, true, true);
    let layout = Layout::of(&signed);
    assert!(layout.signed);
    let key = file_key_of(&n.carol.file("keys"), &signed, &layout);
    let mut forged = signed.clone();
    reseal_chunk(&mut forged, &layout, &key, 0, &forged_text);
    for route in [Route::FileToStdout, Route::StdinToStdout, Route::FileToFile] {
        assert_refused(&n.bob, &forged, Some("alice"), route, 5, "carol's re-sealed chunk 0");
        assert_refused(
            &n.bob,
            &forged,
            None,
            route,
            5,
            "carol's re-sealed chunk 0 (no signer pinned)",
        );
    }
    let (_, _, err) = raw(&n.bob, &["decrypt", "-i", "-", "--require-signer", "alice"], &forged);
    assert!(err.contains("signature does not verify"), "{err}");

    // The same forgery is real: on an envelope alice did not sign, carol's
    // chunk opens and bob reads her text as what the file says. That is
    // what "unsigned" means (SECURITY.md); only the signature stops it.
    let unsigned = seal(&n, &body, false, true);
    let layout = Layout::of(&unsigned);
    let key = file_key_of(&n.carol.file("keys"), &unsigned, &layout);
    let mut forged = unsigned.clone();
    reseal_chunk(&mut forged, &layout, &key, 0, &forged_text);
    let (code, out, err) = raw(&n.bob, &["decrypt", "-i", "-"], &forged);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not signed"), "{err}");
    assert_eq!(&out[..CHUNK], &forged_text[..]);
    assert_eq!(&out[CHUNK..], &body[CHUNK..]);
    // ... and a pinned signer refuses it before anything is decrypted.
    assert_refused(
        &n.bob,
        &forged,
        Some("alice"),
        Route::FileToStdout,
        5,
        "unsigned forgery, alice pinned",
    );
}

#[test]
fn a_co_recipient_cannot_pass_off_a_stripped_envelope_as_signed() {
    // carol removes alice's signatures and re-seals every chunk under the
    // new (unsigned) header: bob's pinned signer refuses it, and without
    // a pin bob is told it is not signed.
    let n = nodes();
    let body = data(3 * CHUNK, 2);
    let signed = seal(&n, &body, true, true);
    let layout = Layout::of(&signed);
    let key = file_key_of(&n.carol.file("keys"), &signed, &layout);
    let header_end = layout.flag_at;
    let mut stripped = signed[..header_end].to_vec();
    stripped.push(0);
    let header_len = (stripped.len() - 12) as u32;
    stripped[8..12].copy_from_slice(&header_len.to_be_bytes());
    let prefix_len = stripped.len();
    let header_hash: [u8; 32] = Sha256::digest(&stripped).into();
    let chunks: Vec<&[u8]> = body.chunks(CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i == chunks.len() - 1;
        stripped.extend(seal_chunk(&key, &layout.nonce_prefix, i, last, &header_hash, chunk));
    }
    assert_eq!(Layout::of(&stripped).prefix_len, prefix_len);
    for route in [Route::FileToStdout, Route::StdinToStdout, Route::FileToFile] {
        assert_refused(&n.bob, &stripped, Some("alice"), route, 5, "stripped signatures");
    }
    let (code, out, err) = raw(&n.bob, &["decrypt", "-i", "-"], &stripped);
    assert_eq!((code, out == body), (0, true), "{err}");
    assert!(err.contains("not signed"), "{err}");
}
