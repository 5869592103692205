//! `keys`, `encrypt` and `decrypt` through the real binary: identities,
//! round trips, streaming, recipients, signers, rotation, and every kind of
//! bad input (exit code, message, and no output or temporary file left).

mod common;
#[path = "common/crypto.rs"]
mod crypto;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use crypto::*;
use proptest::prelude::*;
use serde_json::Value;

#[test]
fn generate_writes_private_keys_and_refuses_to_overwrite() {
    let t = Cmm::new();
    let first = t.run(&["keys", "generate", "--json"]).code(0).json();
    let id = first["identity"]["node_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    let keys = t.file("keys");
    assert_eq!(mode(&keys), 0o700);
    for name in names_in(&keys) {
        let p = keys.join(&name);
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{name}");
        }
    }
    assert!(t.read("audit.jsonl").contains("\"key.created\""));
    assert!(!t.read("audit.jsonl").contains("PRIVATE KEY"));

    t.run(&["keys", "generate"])
        .code(2)
        .stderr_has("already exist")
        .stderr_has("--force");
    assert_eq!(node_id(&t), id, "a refused generate changes nothing");
    t.run(&["keys", "generate", "--force"]).code(0);
    assert_ne!(node_id(&t), id);
}

#[test]
fn keys_are_generated_on_first_need() {
    let t = Cmm::new();
    let v = t.run(&["keys", "show", "--json"]).code(0).json();
    assert!(v["rsa_public_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    assert!(t.read("audit.jsonl").contains("\"key.created\""));
}

#[test]
fn show_export_import_list() {
    let a = node(0);
    let b = node(1);
    let shown = a.run(&["keys", "show", "--json"]).code(0).json();
    for k in ["node_id", "ed25519", "rsa_public_pem", "created"] {
        assert!(shown[k].is_string(), "{k}");
    }
    a.run(&["keys", "show"])
        .code(0)
        .stdout_has(shown["node_id"].as_str().unwrap())
        .stdout_has("BEGIN PUBLIC KEY");

    let f = a.file("a.json");
    a.run(&["keys", "export", "--public", s(&f)]).code(0);
    a.run(&["keys", "export", "--public", s(&f)])
        .code(2)
        .stderr_has("already exists");
    let exported: Value = serde_json::from_str(&fs::read_to_string(&f).unwrap()).unwrap();
    assert_eq!(exported["node_id"], shown["node_id"]);

    b.run(&["keys", "import", "alice", s(&f)]).code(0);
    b.run(&["keys", "import", "alice", s(&f)])
        .code(2)
        .stderr_has("already in the keyring");
    b.run(&["keys", "import", "../evil", s(&f)])
        .code(2)
        .stderr_has("invalid peer name");
    let list = b.run(&["keys", "list", "--json"]).code(0).json();
    assert_eq!(list["peers"][0]["name"], "alice");
    assert_eq!(list["peers"][0]["node_id"], shown["node_id"]);
    assert_eq!(list["keys"][0]["current"], true);
    b.run(&["keys", "list"]).code(0).stdout_has("alice");

    // A forged identity (node id not matching the key) is refused.
    let mut forged = exported.clone();
    forged["node_id"] = Value::from("00".repeat(32));
    let g = b.file("forged.json");
    fs::write(&g, forged.to_string()).unwrap();
    b.run(&["keys", "import", "mallory", s(&g)])
        .code(2)
        .stderr_has("node_id");
    // `keys show --json` output is importable too.
    let h = b.file("shown.json");
    fs::write(&h, a.run(&["keys", "show", "--json"]).stdout.clone()).unwrap();
    b.run(&["keys", "import", "alice2", s(&h)]).code(0);
}

#[test]
fn file_round_trip_with_default_names_and_no_overwrite() {
    let t = node(0);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("report.txt");
    let body = data(3 * CHUNK + 123, 1);
    fs::write(&f, &body).unwrap();

    t.run(&["encrypt", "--input", s(&f)]).code(0);
    let env = dir.path().join("report.txt.cmm");
    assert!(env.exists());
    assert_eq!(mode(&env), 0o600);
    assert_ne!(fs::read(&env).unwrap()[..], body[..]);
    t.run(&["encrypt", "--input", s(&f)])
        .code(2)
        .stderr_has("already exists");
    t.run(&["encrypt", "--input", s(&f), "--force"]).code(0);
    t.run(&["encrypt", "--input", s(&f), "--output", s(&f), "--force"])
        .code(2)
        .stderr_has("is the input file");
    assert_eq!(fs::read(&f).unwrap(), body, "the input is never overwritten");

    t.run(&["decrypt", "--input", s(&env)])
        .code(2)
        .stderr_has("already exists");
    fs::remove_file(&f).unwrap();
    t.run(&["decrypt", "--input", s(&env)]).code(0).stderr_has("not signed");
    assert_eq!(fs::read(&f).unwrap(), body);
    assert_eq!(mode(&f), 0o600);
    assert_eq!(names_in(dir.path()), vec!["report.txt", "report.txt.cmm"]);

    let odd = dir.path().join("noext");
    fs::copy(&env, &odd).unwrap();
    t.run(&["decrypt", "--input", s(&odd)]).code(2).stderr_has("--output");
    t.run(&["decrypt", "--input", s(&dir.path().join("missing.cmm"))])
        .code(2)
        .stderr_has("cannot read");
}

#[test]
fn stdin_and_stdout_streaming() {
    let t = node(0);
    let body = data(2 * CHUNK + 7, 2);
    let (code, env, err) = raw(&t, &["encrypt", "--input", "-", "--sign"], &body);
    assert_eq!(code, 0, "{err}");
    assert!(env.starts_with(b"CMM-ENC\x01"));
    let (code, out, err) = raw(&t, &["decrypt", "--input", "-"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, body);
    assert!(err.contains("signed by self"), "{err}");
    // Explicit `-` works for file input too.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("e.cmm");
    fs::write(&f, &env).unwrap();
    let (code, out, _) = raw(&t, &["decrypt", "--input", s(&f), "--output", "-"], b"");
    assert_eq!(code, 0);
    assert_eq!(out, body);
}

#[test]
fn stdout_output_is_held_in_tmpdir_until_it_verifies() {
    let t = node(0);
    let body = data(3 * CHUNK + 1, 5);
    let (code, env, err) = raw(&t, &["encrypt", "-i", "-", "--sign"], &body);
    assert_eq!(code, 0, "{err}");
    // The spool is unnamed: a successful run leaves `$TMPDIR` as it was.
    let tmp = tempfile::tempdir().unwrap();
    let (code, out, err) = raw_run(t.cmd(&["decrypt", "-i", "-"]).env("TMPDIR", s(tmp.path())), &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, body);
    assert!(names_in(tmp.path()).is_empty());
    // Where the spool cannot be made, nothing is decrypted, and the error
    // says where it was to be and what to do.
    let gone = tmp.path().join("missing");
    let (code, out, err) = raw_run(t.cmd(&["decrypt", "-i", "-"]).env("TMPDIR", s(&gone)), &env);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("cannot hold the decrypted output in") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("TMPDIR") && err.contains("--output FILE"), "{err}");
    // A file output does not use the spool at all.
    let f = tmp.path().join("out.bin");
    let (code, _, err) = raw_run(
        t.cmd(&["decrypt", "-i", "-", "-o", s(&f)]).env("TMPDIR", s(&gone)),
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read(&f).unwrap(), body);
}

/// Wait until process `pid` holds an open file inside `dir`, and return
/// what `/proc` says it is (an anonymous file reads `DIR/#INODE (deleted)`).
fn wait_for_open_file_in(pid: u32, dir: &Path) -> String {
    let dir = fs::canonicalize(dir).unwrap();
    wait_some(std::time::Duration::from_secs(30), || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .find(|target| target.starts_with(&dir))
            .map(|target| target.to_string_lossy().into_owned())
    })
    .unwrap_or_else(|| panic!("no file opened in {}", dir.display()))
}

#[test]
fn a_killed_decrypt_leaves_nothing_behind() {
    // Half an envelope arrives on stdin, then the process is killed: its
    // output, to a file or held for stdout, had no name and goes with it.
    let t = node(0);
    let (code, env, err) = raw(&t, &["encrypt", "-i", "-"], &data(20 * CHUNK, 6));
    assert_eq!(code, 0, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bin");
    let spool = tempfile::tempdir().unwrap();
    for to_file in [true, false] {
        let args = if to_file {
            vec!["decrypt", "-i", "-", "-o", s(&out)]
        } else {
            vec!["decrypt", "-i", "-"]
        };
        let mut child = t.cmd(&args).env("TMPDIR", s(spool.path())).spawn_with_stdin();
        child.stdin().write_all(&env[..env.len() / 2]).unwrap();
        let held = wait_for_open_file_in(child.id(), if to_file { dir.path() } else { spool.path() });
        assert!(
            held.ends_with("(deleted)"),
            "the output has a name while unverified: {held}"
        );
        child.kill9();
        let done = child.wait();
        assert!(done.stdout.is_empty());
        assert!(names_in(dir.path()).is_empty(), "{:?}", names_in(dir.path()));
        assert!(names_in(spool.path()).is_empty(), "{:?}", names_in(spool.path()));
    }
}

#[test]
fn several_recipients_and_not_for_me() {
    let (a, b, c) = (node(0), node(1), node(2));
    introduce(&b, &a, "bob");
    introduce(&c, &a, "carol");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.txt");
    fs::write(&f, b"for bob and carol").unwrap();
    let env = dir.path().join("m.cmm");
    a.run(&[
        "encrypt",
        "-i",
        s(&f),
        "-o",
        s(&env),
        "-r",
        "bob",
        "--recipient",
        "carol",
    ])
    .code(0);
    for (who, t) in [("b", &b), ("c", &c)] {
        let out = dir.path().join(format!("out-{who}"));
        t.run(&["decrypt", "-i", s(&env), "-o", s(&out)]).code(0);
        assert_eq!(fs::read(&out).unwrap(), b"for bob and carol");
    }
    // The sender did not include itself.
    let out = dir.path().join("out-a");
    a.run(&["decrypt", "-i", s(&env), "-o", s(&out)])
        .code(5)
        .stderr_has("not encrypted to any of your keys")
        .stderr_has("key id(s)");
    assert!(!out.exists());
    // A recipient given as a file works; an unknown name is a usage error.
    let pubf = b.file("public.json");
    a.run(&["encrypt", "-i", s(&f), "-o", "-", "-r", s(&pubf)]).code(0);
    a.run(&["encrypt", "-i", s(&f), "-o", "-", "-r", "nobody"])
        .code(2)
        .stderr_has("no peer named `nobody`");
}

#[test]
fn require_signer() {
    let (a, b, c) = (node(0), node(1), node(2));
    introduce(&a, &b, "alice");
    introduce(&c, &b, "carol");
    introduce(&b, &a, "bob");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.txt");
    fs::write(&f, b"signed by alice").unwrap();
    let signed = dir.path().join("signed.cmm");
    let unsigned = dir.path().join("unsigned.cmm");
    a.run(&["encrypt", "-i", s(&f), "-o", s(&signed), "-r", "bob", "--sign"])
        .code(0);
    a.run(&["encrypt", "-i", s(&f), "-o", s(&unsigned), "-r", "bob"])
        .code(0);
    let out = dir.path().join("out");
    b.run(&["decrypt", "-i", s(&signed), "-o", s(&out), "--require-signer", "alice"])
        .code(0)
        .stderr_has("signed by alice");
    fs::remove_file(&out).unwrap();
    let v = b
        .run(&["decrypt", "-i", s(&signed), "-o", s(&out), "--json"])
        .code(0)
        .json();
    assert_eq!(v["signer"], Value::from(node_id(&a)));
    fs::remove_file(&out).unwrap();

    b.run(&["decrypt", "-i", s(&signed), "-o", s(&out), "--require-signer", "carol"])
        .code(5)
        .stderr_has("not by the required signer");
    assert!(!out.exists());
    b.run(&[
        "decrypt",
        "-i",
        s(&unsigned),
        "-o",
        s(&out),
        "--require-signer",
        "alice",
    ])
    .code(5)
    .stderr_has("not signed");
    assert!(!out.exists());
    b.run(&["decrypt", "-i", s(&signed), "-o", s(&out), "--require-signer", "dave"])
        .code(2)
        .stderr_has("no peer named `dave`");
    assert_eq!(names_in(dir.path()), vec!["m.txt", "signed.cmm", "unsigned.cmm"]);
}

/// Length of everything before the first chunk of an unsigned envelope.
fn prefix_len(env: &[u8]) -> usize {
    12 + u32::from_be_bytes(env[8..12].try_into().unwrap()) as usize
}

/// Decrypt `bad` as the only file in a fresh directory; assert the exit
/// code and message, and that nothing else appeared there.
fn assert_rejected(t: &Cmm, bad: &[u8], code: i32, msg: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.cmm");
    fs::write(&input, bad).unwrap();
    t.run(&["decrypt", "-i", s(&input)]).code(code).stderr_has(msg);
    let out = dir.path().join("out.bin");
    t.run(&["decrypt", "-i", s(&input), "-o", s(&out)])
        .code(code)
        .stderr_has(msg);
    assert_eq!(
        names_in(dir.path()),
        vec!["bad.cmm"],
        "no output or temporary file is left"
    );
    // The same through stdin, and to stdout: not one byte comes out.
    let (c, out, err) = raw(t, &["decrypt", "-i", "-"], bad);
    assert_eq!(c, code, "{err}");
    assert!(err.contains(msg), "{err}");
    assert!(out.is_empty(), "{} bytes on stdout: {err}", out.len());
}

#[test]
fn bad_input_is_rejected_and_leaves_nothing() {
    let t = node(0);
    let body = data(3 * CHUNK + 500, 3);
    let (code, env, _) = raw(&t, &["encrypt", "-i", "-"], &body);
    assert_eq!(code, 0);
    let p = prefix_len(&env);
    let ct = CHUNK + 16;
    assert_eq!(env.len(), p + 3 * ct + 500 + 16);
    let flip = |at: usize| {
        let mut e = env.clone();
        e[at] ^= 0x04;
        e
    };

    assert_rejected(&t, &flip(64), 5, "damaged"); // header: nonce prefix
    assert_rejected(&t, &flip(40), 5, "malformed envelope header"); // header: suite name
    assert_rejected(&t, &flip(75), 5, "not encrypted to any of your keys"); // header: key id
    assert_rejected(&t, &flip(p + 1000), 5, "decryption failed at chunk 0");
    assert_rejected(&t, &flip(p + ct - 1), 5, "decryption failed at chunk 0"); // a tag
    assert_rejected(&t, &flip(p + ct + 5), 5, "decryption failed at chunk 1");
    assert_rejected(&t, &flip(env.len() - 1), 5, "decryption failed at chunk 3"); // final tag
    assert_rejected(&t, &env[..p + 3 * ct], 5, "truncated"); // final chunk dropped
    assert_rejected(&t, &env[..p + ct + 100], 5, "damaged, truncated"); // cut mid-chunk
    assert_rejected(&t, &env[..p - 10], 5, "truncated"); // cut in the header
    assert_rejected(&t, &env[..p], 5, "truncated");
    let mut swapped = env.clone();
    swapped[p..p + ct].copy_from_slice(&env[p + ct..p + 2 * ct]);
    swapped[p + ct..p + 2 * ct].copy_from_slice(&env[p..p + ct]);
    assert_rejected(&t, &swapped, 5, "decryption failed at chunk 0");
    let mut trailing = env.clone();
    trailing.extend_from_slice(b"garbage");
    assert_rejected(&t, &trailing, 5, "decryption failed at chunk 3");
    let mut more = env.clone();
    more.extend_from_slice(&vec![0u8; CHUNK + 100]);
    assert_rejected(&t, &more, 5, "decryption failed at chunk 3");

    // Not an envelope at all (exit 2) versus one of ours, damaged (exit 5):
    // the line is the whole 7-byte magic (docs/FORMAT.md).
    assert_rejected(&t, b"hello, this is plain text\n", 2, "not an envelope of ours");
    assert_rejected(&t, b"", 2, "empty");
    assert_rejected(&t, b"CMM-E", 2, "not an envelope of ours");
    let mut magic = env.clone();
    magic[3] ^= 0x20;
    assert_rejected(&t, &magic, 2, "not an envelope of ours");
    assert_rejected(&t, b"CMM-ENC", 5, "truncated");
    assert_rejected(&t, &env[..10], 5, "truncated");
    let mut v2 = env.clone();
    v2[7] = 2;
    assert_rejected(&t, &v2, 5, "says it is version 2");
    let mut wrapped = env.clone();
    let len = wrapped.len();
    wrapped[len / 2..].fill(0);
    wrapped[p - 100] ^= 1; // inside the RSA-wrapped key: same message as a bad chunk
    assert_rejected(&t, &wrapped, 5, "decryption failed at chunk 0");

    // Not for us: encrypted to another node.
    let other = node(1);
    let (_, env_other, _) = raw(&other, &["encrypt", "-i", "-"], b"secret");
    assert_rejected(&t, &env_other, 5, "not encrypted to any of your keys");
}

#[test]
fn signed_envelope_tampering_is_a_signature_failure() {
    let t = node(0);
    let (code, env, _) = raw(&t, &["encrypt", "-i", "-", "--sign"], &data(CHUNK + 10, 4));
    assert_eq!(code, 0);
    let mut bad = env.clone();
    bad[64] ^= 1; // header: the header signature no longer verifies
    assert_rejected(&t, &bad, 5, "signature does not verify");
    let mut bad = env.clone();
    let n = bad.len();
    bad[n - 1] ^= 1; // trailer signature
    assert_rejected(&t, &bad, 5, "signature does not verify");
}

#[test]
fn rotate_keeps_old_files_decryptable_until_expiry() {
    let t = node(0);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("old.txt");
    fs::write(&f, b"encrypted before rotation").unwrap();
    t.run(&["encrypt", "-i", s(&f)]).code(0);
    let old_id = node_id(&t);

    let r = t.run(&["keys", "rotate", "--json"]).code(0).json();
    assert_eq!(r["rotation"]["old_node_id"], Value::from(old_id.clone()));
    let new_id = node_id(&t);
    assert_ne!(new_id, old_id);
    assert!(t.read("audit.jsonl").contains("\"key.rotated\""));
    let list = t.run(&["keys", "list", "--json"]).code(0).json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 2);

    let out = dir.path().join("out");
    t.run(&["decrypt", "-i", s(&dir.path().join("old.txt.cmm")), "-o", s(&out)])
        .code(0);
    assert_eq!(fs::read(&out).unwrap(), b"encrypted before rotation");
    fs::remove_file(&out).unwrap();

    // Age the retired key past `keyRotationDays`: it stops decrypting at
    // once, and the next rotation removes its files.
    let index_path = t.file("keys/keys.json");
    let mut index: Value = serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    for k in index["keys"].as_array_mut().unwrap() {
        if k["node_id"] == old_id.as_str() {
            k["retired"] = Value::from("2020-01-01T00:00:00Z");
        }
    }
    fs::write(&index_path, index.to_string()).unwrap();
    t.run(&["decrypt", "-i", s(&dir.path().join("old.txt.cmm")), "-o", s(&out)])
        .code(5)
        .stderr_has("not encrypted to any of your keys");
    assert!(!out.exists());
    let r = t.run(&["keys", "rotate", "--json"]).code(0).json();
    assert_eq!(r["rotation"]["removed"], 1);
    assert!(!names_in(&t.file("keys")).iter().any(|n| n.starts_with(&old_id[..16])));
    assert!(t.read("audit.jsonl").contains("\"key.removed\""));
}

#[test]
fn prune_expired_is_callable_from_the_library() {
    use claude_max_market::crypto::prune_expired;
    use claude_max_market::Paths;
    let t = node(0);
    t.run(&["keys", "rotate"]).code(0);
    let paths = Paths::in_one_dir(t.path().to_path_buf());
    let now = chrono::Utc::now();
    assert_eq!(prune_expired(&paths, now).unwrap(), 0);
    assert_eq!(prune_expired(&paths, now + chrono::Duration::days(31)).unwrap(), 1);
    assert_eq!(
        t.run(&["keys", "list", "--json"]).code(0).json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn health_warns_when_the_key_is_older_than_the_rotation_period() {
    let fresh = Cmm::new();
    let check = |t: &Cmm| -> Value {
        let v = t.run(&["health", "--json"]).json();
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "keys")
            .unwrap()
            .clone()
    };
    assert_eq!(check(&fresh)["level"], "OK");
    let t = node(0);
    assert_eq!(check(&t)["level"], "OK");
    let index_path = t.file("keys/keys.json");
    let text = fs::read_to_string(&index_path).unwrap();
    let mut index: Value = serde_json::from_str(&text).unwrap();
    index["keys"][0]["created"] = Value::from("2020-01-01T00:00:00Z");
    fs::write(&index_path, index.to_string()).unwrap();
    let c = check(&t);
    assert_eq!(c["level"], "WARNING");
    assert!(c["message"].as_str().unwrap().contains("keys rotate"));
    t.run(&["health"]).code(1).stdout_has("keys: current key is");
}

fn round_trip_through_binary(t: &Cmm, body: &[u8], sign: bool) {
    let mut args = vec!["encrypt", "-i", "-"];
    if sign {
        args.push("--sign");
    }
    let (code, env, err) = raw(t, &args, body);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = raw(t, &["decrypt", "-i", "-"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, body);
}

#[test]
fn chunk_boundary_sizes_round_trip() {
    let t = node(0);
    // 32 chunks are sealed and opened per batch: cross that boundary too.
    for n in [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        32 * CHUNK,
        32 * CHUNK + 1,
        65 * CHUNK + 3,
    ] {
        round_trip_through_binary(&t, &data(n, n as u8), n % 2 == 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn random_sizes_round_trip(n in 0usize..(3 * CHUNK + 2), seed: u8, sign: bool) {
        round_trip_through_binary(&node(0), &data(n, seed), sign);
    }
}

#[test]
fn decrypt_without_keys_says_how_to_get_them() {
    let t = Cmm::new();
    let dir = tempfile::tempdir().unwrap();
    let f: PathBuf = dir.path().join("x.cmm");
    fs::write(&f, b"CMM-ENC\x01").unwrap();
    t.run(&["decrypt", "-i", s(&f)]).code(1).stderr_has("keys generate");
}
