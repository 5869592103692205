//! `clean` also removes rotated keys whose decryption window has passed.

mod common;
use common::*;

use serde_json::Value;

#[test]
fn clean_removes_expired_rotated_keys() {
    if !docker_available("clean_removes_expired_rotated_keys") {
        return;
    }
    let t = Cmm::new();
    t.run(&["keys", "generate"]).code(0);
    let old = t.run(&["keys", "show", "--json"]).code(0).json()["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    t.run(&["keys", "rotate"]).code(0);
    // Not expired yet: clean keeps it.
    let v = t.run(&["clean", "--json"]).code(0).json();
    assert_eq!(v["keys_removed"], 0);
    // Age the retired key past keyRotationDays.
    let path = t.file("keys/keys.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for k in index["keys"].as_array_mut().unwrap() {
        if k["node_id"] == old.as_str() {
            k["retired"] = Value::from("2020-01-01T00:00:00Z");
        }
    }
    std::fs::write(&path, index.to_string()).unwrap();
    let v = t.run(&["clean", "--json"]).code(0).json();
    assert_eq!(v["keys_removed"], 1);
    assert_eq!(
        t.run(&["keys", "list", "--json"]).json()["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(t.read("audit.jsonl").contains("\"key.removed\""));
    t.run(&["audit", "verify"]).code(0);
}
