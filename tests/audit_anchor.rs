//! `audit anchor` against a real coordinator over a real socket: the
//! witness countersigns a node's signed checkpoint, and a later rewrite of
//! the log is caught by that cosignature even when the rewriter holds the
//! node's own key (and re-signs the checkpoint with it).

mod common;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use claude_max_market::audit::Checkpoint;
use claude_max_market::crypto::keys::Identity;
use claude_max_market::market::protocol::{Event, Reason};
use claude_max_market::market::server::anchor;
use claude_max_market::Paths;
use common::Cmm;
use market::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn witness_of(server: &Server) -> String {
    let body = server.http_get("/healthz");
    let at = body.find("\"witness\":\"").expect("healthz names the witness key") + 11;
    body[at..at + 64].to_string()
}

/// Re-chain the log after changing one `config.changed` value, rewrite the
/// head with the file's real stamp, and sign a matching checkpoint with the
/// node's own key: everything a holder of the node's files and key can do.
fn rewrite_and_resign(t: &Cmm) {
    let text = t.read("audit.jsonl");
    let (mut out, mut prev, mut len, mut last_start) = (Vec::new(), [0u8; 32], 0u64, 0u64);
    let mut edited = false;
    for l in text.lines() {
        let mut body = l[..l.rfind(",\"prev\":\"").unwrap()].to_string();
        if !edited && l.contains("\"config.changed\"") {
            let old = serde_json::from_str::<Value>(l).unwrap()["new"].clone();
            body = body.replace(&format!("\"new\":{old}"), "\"new\":424242");
            edited = true;
        }
        let line = format!("{body},\"prev\":\"{}\"}}", hex::encode(prev));
        prev = Sha256::digest(line.as_bytes()).into();
        last_start = len;
        len += line.len() as u64 + 1;
        out.push(line);
    }
    assert!(edited);
    std::fs::write(t.file("audit.jsonl"), out.join("\n") + "\n").unwrap();
    let mut head: Value = serde_json::from_str(&t.read("audit.head")).unwrap();
    head["hash"] = Value::String(hex::encode(prev));
    head["last_start"] = Value::from(last_start);
    head["len"] = Value::from(len);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(t.file("audit.jsonl")).unwrap();
        head["file"] = serde_json::json!({
            "dev": m.dev(), "ino": m.ino(), "ctime": m.ctime(), "ctime_nsec": m.ctime_nsec(), "len": m.len()
        });
    }
    std::fs::write(t.file("audit.head"), serde_json::to_vec(&head).unwrap()).unwrap();
    let id = Identity::load(&Paths::in_one_dir(t.path().to_path_buf())).unwrap();
    let mut cp = Checkpoint {
        v: 1,
        log_id: head["log_id"].as_str().unwrap().into(),
        seq: head["seq"].as_u64().unwrap(),
        hash: hex::encode(prev),
        offset: last_start,
        ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        node_id: Some(id.node_id().into()),
        key: Some(hex::encode(id.current().public_key_bytes())),
        sig: None,
    };
    cp.sig = Some(hex::encode(id.sign(cp.signed_text().as_bytes()).to_bytes()));
    std::fs::write(t.file("audit.checkpoint"), serde_json::to_vec(&cp).unwrap()).unwrap();
}

#[test]
fn an_anchored_log_cannot_be_rewritten_even_with_the_node_key() {
    let server = Server::start(&[]);
    let witness = witness_of(&server);
    assert!(
        anchor::key_path(&server.db).exists(),
        "the witness key is kept next to the database"
    );
    assert_eq!(witness_of(&server), witness);

    let t = Cmm::opted_in();
    t.run(&["keys", "generate"]).code(0);
    t.run(&["config", "--set", "limits.dailyTokens=1234"]).code(0);
    let v = t
        .run(&["audit", "anchor", "--endpoint", &server.endpoint, "--json"])
        .code(0)
        .json();
    assert_eq!(v["anchor"]["witness"], witness.as_str());
    let anchored_seq = v["anchor"]["seq"].as_u64().unwrap();
    t.run(&["config", "--set", "limits.dailyTokens=99"]).code(0);
    t.run(&["audit", "verify"])
        .code(0)
        .stdout_has("1 witness anchor(s) hold");
    assert!(t.read("audit.jsonl").contains("\"audit.anchored\""));

    // Without the anchor this rewrite would pass: head, chain and a fresh
    // checkpoint signed by the node's own key all agree.
    rewrite_and_resign(&t);
    let v = t.run(&["audit", "verify", "--json"]).code(5).json();
    let problems = v["report"]["problems"].to_string();
    assert!(problems.contains("cosigned"), "{problems}");
    assert!(problems.contains(&format!("line {anchored_seq} differs")), "{problems}");
    // Removing the anchor file hides it from this node, not from anyone
    // holding the cosignature; here the rewrite then passes, as documented.
    std::fs::remove_file(t.file("audit.anchors")).unwrap();
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn the_witness_refuses_checkpoints_not_signed_by_the_session_node() {
    let server = Server::start(&[]);
    let a = Node::new();
    let b = Node::new();
    let mut cp = Checkpoint {
        v: 1,
        log_id: "00".repeat(16),
        seq: 3,
        hash: "ab".repeat(32),
        offset: 100,
        ts: "2026-12-01T12:00:00.000Z".into(),
        node_id: None,
        key: None,
        sig: None,
    };
    rt().block_on(async {
        let client = a.connect(&server).await;
        let ask = |cp: Checkpoint| {
            let client = &client;
            async move {
                let id = client.next_id();
                client.exchange(&id, &anchor::encode_request(&id, &cp)).await.unwrap()
            }
        };
        // Unsigned.
        match ask(cp.clone()).await {
            Event::Error { reason, .. } => assert_eq!(reason, Reason::Malformed),
            other => panic!("unsigned checkpoint cosigned: {other:?}"),
        }
        // Signed by another node.
        cp.node_id = Some(b.node_id());
        cp.key = Some(hex::encode(b.id.current().public_key_bytes()));
        cp.sig = Some(hex::encode(b.id.sign(cp.signed_text().as_bytes()).to_bytes()));
        match ask(cp.clone()).await {
            Event::Error { reason, .. } => assert_eq!(reason, Reason::BadSignature),
            other => panic!("another node's checkpoint cosigned: {other:?}"),
        }
        // Signed by this node, but the signature does not match.
        cp.node_id = Some(a.node_id());
        cp.key = Some(hex::encode(a.id.current().public_key_bytes()));
        cp.sig = Some(hex::encode(a.id.sign(b"something else").to_bytes()));
        match ask(cp.clone()).await {
            Event::Error { reason, .. } => assert_eq!(reason, Reason::BadSignature),
            other => panic!("a bad signature cosigned: {other:?}"),
        }
        // Properly signed: cosigned, and the cosignature verifies.
        cp.sig = Some(hex::encode(a.id.sign(cp.signed_text().as_bytes()).to_bytes()));
        match ask(cp.clone()).await {
            Event::Ok { result, .. } => {
                let c: anchor::Cosignature = serde_json::from_value(result).unwrap();
                assert!(c.valid());
                assert_eq!(
                    (c.node_id.as_str(), c.seq, c.hash.as_str()),
                    (a.node_id().as_str(), 3, cp.hash.as_str())
                );
            }
            other => panic!("not cosigned: {other:?}"),
        }
        client.close();
    });
}
