//! `execute` refusals that happen before any container exists, and the
//! compliance checks about jobs. No Docker engine needed.

mod common;

use common::Cmm;
use serde_json::Value;

fn events(t: &Cmm) -> Vec<Value> {
    t.read("audit.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn nothing_runs_before_opt_in() {
    let t = Cmm::new().env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x");
    t.run(&["execute", "--approve-all", "--prompt", "hi"])
        .code(3)
        .stderr_has("not opted in");
    assert!(!t.read("audit.jsonl").contains("job."));
}

#[test]
fn without_a_terminal_or_standing_approval_the_job_is_denied() {
    let t = Cmm::opted_in().env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x");
    let out = t.run(&["execute", "--prompt", "hi"]);
    out.code(3).stderr_has("no terminal to ask");
    let ev = events(&t);
    let denied: Vec<&Value> = ev.iter().filter(|e| e["event"] == "job.denied").collect();
    assert_eq!(denied.len(), 1);
    assert!(denied[0]["job_id"].is_string());
    assert_eq!(denied[0]["reason"], "no terminal to ask and no standing approval");
    assert!(!ev.iter().any(|e| e["event"] == "job.started"));
    let usage: Value = serde_json::from_str(&t.read("usage.json")).unwrap();
    assert_eq!(usage["reservations"], serde_json::json!([]), "reservation released");
    // --json errors are one document with the exit code.
    let v = t.run(&["execute", "--json", "--prompt", "hi"]).code(3).json();
    assert_eq!(v["error"]["kind"], "refused");
}

#[test]
fn a_missing_credential_names_every_source_tried() {
    let t = Cmm::opted_in();
    let out = t.run(&["execute", "--approve-all", "--prompt", "hi"]);
    out.code(2)
        .stderr_has("no Claude credential found")
        .stderr_has("CLAUDE_CODE_OAUTH_TOKEN (not set)")
        .stderr_has("credentials.tokenFile (not configured)")
        .stderr_has("credentials.tokenCommand (not configured)")
        .stderr_has("ANTHROPIC_API_KEY (not set)");
    let ev = events(&t);
    assert!(!ev.iter().any(|e| e["event"] == "job.started"));
    let usage: Value = serde_json::from_str(&t.read("usage.json")).unwrap();
    assert_eq!(usage["reservations"], serde_json::json!([]));
    // An explicit source that is not set says which.
    t.run(&["config", "--set", "credentials.source=api-key-env"]).code(0);
    t.cmd(&["execute", "--approve-all", "--prompt", "hi"])
        .env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x")
        .run()
        .code(2)
        .stderr_has("ANTHROPIC_API_KEY is not set");
}

#[test]
fn a_reached_cap_refuses_with_the_reset_time() {
    let t = Cmm::opted_in().env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x");
    t.run(&["limits", "--daily", "0"]).code(0);
    t.run(&["execute", "--approve-all", "--prompt", "hi"])
        .code(3)
        .stderr_has("daily task cap")
        .stderr_has("resets");
}

#[test]
fn prompts_come_from_text_file_or_stdin_and_must_not_be_empty() {
    let t = Cmm::new();
    t.run(&["execute"]).code(2);
    t.run(&["execute", "--prompt", "  "]).code(2).stderr_has("empty");
    t.run(&["execute", "--file", "/nonexistent/prompt"]).code(2);
    // Not opted in is checked after the prompt is read: stdin works.
    t.cmd(&["execute", "--file", "-"]).stdin("hello").run().code(3);
    t.run(&["execute", "--prompt", "x", "--timeout", "0"]).code(2);
}

#[test]
fn compliance_checks_container_hardening_and_credential_kind() {
    let t = Cmm::new().env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x");
    t.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let out = t.run(&["compliance-check", "--json"]);
    let v = out.json();
    let result = |id: &str| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {v}"))
    };
    let h = result("container-hardening");
    assert_eq!(h["level"], "OK", "{h}");
    assert!(h["message"].as_str().unwrap().contains("read-only rootfs"));
    let k = result("credential-kind-market");
    assert_eq!(k["level"], "WARNING");
    assert!(k["message"].as_str().unwrap().contains("consumer subscription"));
    assert!(!out.stdout.contains("sk-ant-oat01-x"));

    // A network mode that shares the host's fails the hardening check.
    t.run(&["config", "--set", "docker.network=host"]).code(0);
    let v = t.run(&["compliance-check", "--json"]).json();
    let h = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "container-hardening")
        .unwrap()
        .clone();
    assert_eq!(h["level"], "CRITICAL", "{h}");
    // And execute refuses it before anything runs.
    t.run(&["execute", "--approve-all", "--prompt", "hi"])
        .code(3)
        .stderr_has("docker.network");
}

#[test]
fn a_standing_rule_approves_and_an_unreachable_engine_releases_the_reservation() {
    let t = Cmm::opted_in().env("CLAUDE_CODE_OAUTH_TOKEN", "sk-ant-oat01-x");
    t.run(&["config", "--set", "compliance.requireApproval=false"]).code(0);
    let out = t
        .cmd(&["execute", "--prompt", "hi"])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .run();
    out.code(4)
        .stderr_has("Docker engine is not reachable")
        .stderr_has("start Docker");
    let ev = events(&t);
    let approved: Vec<&Value> = ev.iter().filter(|e| e["event"] == "job.approved").collect();
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["how"], "standing-rule");
    assert!(!ev.iter().any(|e| e["event"] == "job.started"));
    let usage: Value = serde_json::from_str(&t.read("usage.json")).unwrap();
    assert_eq!(usage["reservations"], serde_json::json!([]));
    assert_eq!(usage["days"], serde_json::json!({}), "nothing counted");
    t.run(&["audit", "verify"]).code(0);
}
