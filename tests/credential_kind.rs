//! The credential kind `compliance-check` and `health` report is the kind
//! `execute` would run on: with `credentials.tokenFile` holding a
//! subscription token and a stray `ANTHROPIC_API_KEY` in the shell, the job
//! takes the file, so the checks must call it a subscription login too.
//! No Docker engine needed: the engine is pointed at nothing.

mod common;

use common::Cmm;
use serde_json::Value;

const FILE_TOKEN: &str = "sk-ant-oat01-from-the-token-file";
const STRAY_KEY: &str = "sk-ant-api03-stray-key-in-the-shell";
const NOWHERE: &str = "unix:///nonexistent/docker.sock";

fn result<'a>(report: &'a Value, list: &str, key: &str, id: &str) -> &'a Value {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[key] == id)
        .unwrap_or_else(|| panic!("no {id} in {report}"))
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap()
}

#[test]
fn checks_report_the_kind_execute_runs_on() {
    use std::os::unix::fs::PermissionsExt;
    let t = Cmm::new()
        .env("ANTHROPIC_API_KEY", STRAY_KEY)
        .env("DOCKER_HOST", NOWHERE);
    t.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let file = t.file("token");
    std::fs::write(&file, format!("{FILE_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    t.run(&["config", "--set", &format!("credentials.tokenFile={}", file.display())])
        .code(0);
    t.run(&["config", "--set", "compliance.requireApproval=false"]).code(0);

    // `execute` takes the file (a subscription login) and says the key was
    // ignored; it stops at the engine, before anything runs.
    let job = t.run(&["execute", "--prompt", "hi"]);
    job.code(4)
        .stderr_has("ANTHROPIC_API_KEY is set but was ignored in favour of your subscription login");

    // compliance-check: the market check and the egress allowlist both
    // follow that subscription login.
    let out = t.run(&["compliance-check", "--json"]);
    let c = out.json();
    let market = result(&c, "results", "id", "credential-kind-market");
    assert!(message(market).contains("consumer subscription"), "{market}");
    let egress = result(&c, "results", "id", "egress-restricted");
    assert!(message(egress).contains("platform.claude.com:443"), "{egress}");

    // health: the egress allowlist is the subscription one.
    let health = t.run(&["health", "--json"]);
    let h = health.json();
    let egress = result(&h, "checks", "name", "egress");
    assert!(message(egress).contains("platform.claude.com:443"), "{egress}");
    let creds = result(&h, "checks", "name", "credentials");
    assert_eq!(creds["level"], "OK", "{creds}");

    // No output carries either secret.
    for text in [
        &job.stdout,
        &job.stderr,
        &out.stdout,
        &out.stderr,
        &health.stdout,
        &health.stderr,
    ] {
        assert!(!text.contains(FILE_TOKEN) && !text.contains(STRAY_KEY));
    }
}

#[test]
fn a_token_command_is_never_run_for_a_check() {
    let t = Cmm::new().env("DOCKER_HOST", NOWHERE);
    t.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let marker = t.file("ran");
    let command = format!(
        "credentials.tokenCommand=touch {} && echo {FILE_TOKEN}",
        marker.display()
    );
    t.run(&["config", "--set", &command]).code(0);
    let c = t.run(&["compliance-check", "--json"]).json();
    let market = result(&c, "results", "id", "credential-kind-market");
    assert!(message(market).contains("credential kind is unknown"), "{market}");
    t.run(&["health", "--json"]);
    assert!(!marker.exists(), "a check ran credentials.tokenCommand");
}
