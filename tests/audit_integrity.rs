//! The audit log under edits: a broken chain blocks further changes (and
//! `health` says so), a log rewritten with recomputed hashes and head fails
//! against the last signed checkpoint, and a deleted log does not silently
//! start afresh.

mod common;
use common::*;

use serde_json::Value;
use sha2::{Digest, Sha256};

fn lines(t: &Cmm) -> Vec<String> {
    t.read("audit.jsonl").lines().map(str::to_string).collect()
}

/// Change one character of line `n` in place, keeping its length (a digit
/// of its timestamp's milliseconds), as a careful editor would.
fn same_length_edit(t: &Cmm, n: usize) {
    let mut ls = lines(t);
    let line = &ls[n];
    let at = line.find("\"ts\":\"").unwrap() + 6 + 21; // ...T12:34:56.7[8]9Z
    let mut bytes = line.clone().into_bytes();
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    ls[n] = String::from_utf8(bytes).unwrap();
    let before = std::fs::metadata(t.file("audit.jsonl")).unwrap().len();
    std::fs::write(t.file("audit.jsonl"), ls.join("\n") + "\n").unwrap();
    assert_eq!(before, std::fs::metadata(t.file("audit.jsonl")).unwrap().len());
}

fn some_changes(t: &Cmm, n: u32) {
    for i in 0..n {
        t.run(&["config", "--set", &format!("limits.dailyTokens={}", 1000 + i)])
            .code(0);
    }
}

#[test]
fn a_mid_log_edit_blocks_changes_and_health_reports_it() {
    let t = Cmm::opted_in();
    some_changes(&t, 6);
    t.run(&["audit", "verify"]).code(0);
    same_length_edit(&t, 2);
    t.run(&["audit", "verify"]).code(5);
    let config_before = t.read("config.json");
    t.run(&["limits", "--daily", "3"]).code(5).stderr_has("integrity");
    t.run(&["config", "--set", "limits.dailyTokens=777"]).code(5);
    assert_eq!(
        t.read("config.json"),
        config_before,
        "a refused change must not touch config.json"
    );
    let h = t.run(&["health", "--json"]);
    assert_eq!(h.status, 2, "health must be CRITICAL: {}", h.stdout);
    let v = h.json();
    let audit = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "audit")
        .unwrap();
    assert_eq!(audit["level"], "CRITICAL", "{audit}");
    // Opting out still takes effect, and says it could not be recorded.
    t.run(&["opt-out", "--yes"]).code(5).stderr_has("could not record");
    let cfg: Value = serde_json::from_str(&t.read("config.json")).unwrap();
    assert_eq!(cfg["consent"]["accepted"], false);
}

/// Re-chain every line after an edit and rewrite the head (with the file's
/// real stamp), as an attacker who knows the format would.
fn rewrite_with_recomputed_hashes(t: &Cmm, edit_line: usize) {
    let mut out: Vec<String> = Vec::new();
    let mut prev = [0u8; 32];
    let mut offsets = Vec::new();
    let mut len = 0u64;
    for (i, l) in lines(t).iter().enumerate() {
        let body = &l[..l.rfind(",\"prev\":\"").unwrap()];
        let body = if i == edit_line {
            let old = serde_json::from_str::<Value>(l).unwrap()["new"].clone();
            body.replace(&format!("\"new\":{old}"), "\"new\":424242")
        } else {
            body.to_string()
        };
        let line = format!("{body},\"prev\":\"{}\"}}", hex::encode(prev));
        prev = Sha256::digest(line.as_bytes()).into();
        offsets.push(len);
        len += line.len() as u64 + 1;
        out.push(line);
    }
    std::fs::write(t.file("audit.jsonl"), out.join("\n") + "\n").unwrap();
    let mut head: Value = serde_json::from_str(&t.read("audit.head")).unwrap();
    head["hash"] = Value::String(hex::encode(prev));
    head["last_start"] = Value::from(*offsets.last().unwrap());
    head["len"] = Value::from(len);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(t.file("audit.jsonl")).unwrap();
        head["file"] = serde_json::json!({
            "dev": m.dev(), "ino": m.ino(), "ctime": m.ctime(), "ctime_nsec": m.ctime_nsec(), "len": m.len()
        });
    }
    std::fs::write(t.file("audit.head"), serde_json::to_vec(&head).unwrap()).unwrap();
}

#[test]
fn a_rewritten_log_fails_against_the_signed_checkpoint() {
    let t = Cmm::opted_in();
    t.run(&["keys", "generate"]).code(0);
    some_changes(&t, 3);
    let v = t.run(&["audit", "verify", "--json"]).code(0).json();
    let cp = &v["new_checkpoint"];
    assert!(cp["sig"].is_string(), "audit verify signs a checkpoint: {v}");
    let node_id = t.run(&["keys", "show", "--json"]).code(0).json()["node_id"].clone();
    assert_eq!(cp["node_id"], node_id);
    let signed_seq = cp["seq"].as_u64().unwrap();
    some_changes(&t, 2);

    // Edit an event before the checkpoint and re-chain everything.
    let target = lines(&t).iter().position(|l| l.contains("\"config.changed\"")).unwrap();
    assert!((target as u64) < signed_seq);
    rewrite_with_recomputed_hashes(&t, target);
    assert!(t.read("audit.jsonl").contains("424242"));

    t.run(&["audit", "verify"]).code(5).stderr_has("rewritten");
    let v = t.run(&["audit", "verify", "--json"]).code(5).json();
    assert_eq!(v["report"]["checkpoint"]["seq"], signed_seq);
    assert_eq!(v["report"]["checkpoint"]["signed"], true);
    let c = t.run(&["compliance-check", "--json"]);
    assert_ne!(c.status, 0, "compliance-check must fail: {}", c.stdout);
    assert!(c.stdout.contains("rewritten"), "{}", c.stdout);
}

#[test]
fn a_forged_checkpoint_signature_is_refused() {
    let t = Cmm::opted_in();
    t.run(&["keys", "generate"]).code(0);
    t.run(&["audit", "verify"]).code(0);
    let mut cp: Value = serde_json::from_str(&t.read("audit.checkpoint")).unwrap();
    let mut sig = hex::decode(cp["sig"].as_str().unwrap()).unwrap();
    sig[5] ^= 1;
    cp["sig"] = Value::String(hex::encode(sig));
    std::fs::write(t.file("audit.checkpoint"), serde_json::to_vec(&cp).unwrap()).unwrap();
    t.run(&["audit", "verify"]).code(5).stderr_has("invalid signature");
}

#[test]
fn without_keys_checkpoints_are_unsigned_and_keys_sign_the_next() {
    let t = Cmm::opted_in();
    let v = t.run(&["audit", "verify", "--json"]).code(0).json();
    assert!(v["new_checkpoint"]["sig"].is_null(), "{v}");
    t.run(&["audit", "verify"]).code(0).stdout_has("unsigned");
    t.run(&["keys", "generate"]).code(0);
    let v = t.run(&["audit", "verify", "--json"]).code(0).json();
    assert!(v["new_checkpoint"]["sig"].is_string(), "{v}");
    // Replacing the keys re-signs the checkpoint with the new ones.
    t.run(&["keys", "generate", "--force"]).code(0);
    t.run(&["audit", "verify"]).code(0).stdout_has("signed by this node");
}

#[test]
fn deleting_log_and_head_does_not_start_a_fresh_log() {
    let t = Cmm::opted_in();
    t.run(&["keys", "generate"]).code(0);
    some_changes(&t, 2);
    t.run(&["audit", "verify"]).code(0);
    std::fs::remove_file(t.file("audit.jsonl")).unwrap();
    std::fs::remove_file(t.file("audit.head")).unwrap();
    t.run(&["config", "--set", "limits.dailyTokens=5"])
        .code(5)
        .stderr_has("audit restart");
    assert!(!t.file("audit.jsonl").exists() || t.read("audit.jsonl").is_empty());
    t.run(&["audit", "verify"]).code(5);
    assert_eq!(t.run(&["health"]).status, 2);

    // The checkpoint gone too: the keys still show there was a log.
    std::fs::remove_file(t.file("audit.checkpoint")).unwrap();
    t.run(&["config", "--set", "limits.dailyTokens=5"])
        .code(5)
        .stderr_has("keys");

    // Starting over is a deliberate, recorded step.
    t.run(&["audit", "restart"]).code(2);
    t.run(&["audit", "restart", "--yes"]).code(0);
    t.run(&["config", "--set", "limits.dailyTokens=5"]).code(0);
    t.run(&["audit", "verify"]).code(0);
    let genesis: Value = serde_json::from_str(&lines(&t)[0]).unwrap();
    assert_eq!(genesis["event"], "log.genesis");
    assert!(genesis["restart"].is_object(), "{genesis}");
}

#[test]
fn restart_keeps_the_old_checkpoint_in_the_new_genesis() {
    let t = Cmm::opted_in();
    some_changes(&t, 1);
    let v = t.run(&["audit", "verify", "--json"]).code(0).json();
    let old = v["new_checkpoint"].clone();
    std::fs::remove_file(t.file("audit.jsonl")).unwrap();
    std::fs::remove_file(t.file("audit.head")).unwrap();
    t.run(&["opt-in", "--accept-terms"]).code(5);
    t.run(&["audit", "restart", "--yes"]).code(0);
    let genesis: Value = serde_json::from_str(&lines(&t)[0]).unwrap();
    assert_eq!(genesis["restart"]["previous_seq"], old["seq"]);
    assert_eq!(genesis["restart"]["previous_hash"], old["hash"]);
    assert!(t
        .file(&format!("audit.checkpoint.{}", old["log_id"].as_str().unwrap()))
        .exists());
}
