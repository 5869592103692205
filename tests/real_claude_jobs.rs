//! The real tier: the **real** Claude Code (2.1.332, the native binary the
//! PyPI wheel of `claude-agent-sdk` carries) in a runner image built by our
//! own `docker build --claude-binary --extra-ca`, run by `execute` as a user
//! would, against the local stand-in for `api.anthropic.com` (HTTPS with a
//! throwaway CA, reached through the job's egress proxy by
//! `CMM_EGRESS_RESOLVE`). What depends on Claude Code itself is tested here:
//! its usage figures, errors, permissions, tools, proxy and TLS.
//!
//! The binary comes from `CMM_CLAUDE_BINARY`, else
//! `target/claude-code/2.1.332/claude` (`.ci/run` fetches it). Without it
//! these tests print a SKIP line, or fail when `CMM_REQUIRE_REAL_CLAUDE=1`.

mod api_standin;
mod common;
#[path = "common/docker.rs"]
mod docker;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use api_standin::StandIn;
use common::{docker_available, Cmm, Output};
use docker::*;
use sha2::{Digest, Sha256};

const API_KEY: &str = "sk-ant-api03-real-tier-key-not-a-secret-000000000000000000000000000000000000-AAAA";
const REAL_IMAGE: &str = "cmm-real-claude";

struct Real {
    api: StandIn,
    image: String,
}

/// One stand-in for the whole test binary, and the runner image built for
/// it by our own `docker build --claude-binary --extra-ca` (the CA is new
/// each run, so is the image's small CA layer; the binary's layer is cached).
fn real(name: &str) -> Option<&'static Real> {
    static REAL: OnceLock<Option<Real>> = OnceLock::new();
    if !docker_available(name) {
        return None;
    }
    REAL.get_or_init(|| {
        let bin = api_standin::real_claude_binary()?;
        let api = StandIn::start();
        let ca = std::fs::read(api.ca_pem_path()).expect("stand-in CA");
        let tag = format!("{REAL_IMAGE}:{}", &hex::encode(Sha256::digest(&ca))[..12]);
        // Images of earlier runs (other CAs) go; the binary's layer stays cached.
        let (_, tags, _) = docker(&["images", REAL_IMAGE, "--format", "{{.Repository}}:{{.Tag}}"]);
        for old in tags.lines().filter(|t| *t != tag) {
            docker(&["rmi", old]);
        }
        let out = Cmm::new().run(&[
            "docker",
            "build",
            "--claude-binary",
            bin.to_str().unwrap(),
            "--extra-ca",
            api.ca_pem_path().to_str().unwrap(),
            "--tag",
            &tag,
        ]);
        out.code(0);
        Some(Real { api, image: tag })
    })
    .as_ref()
}

/// An opted-in install whose jobs reach the stand-in, with an API key.
fn install(r: &Real) -> Cmm {
    let t = Cmm::opted_in()
        .env("ANTHROPIC_API_KEY", API_KEY)
        .env("CMM_EGRESS_RESOLVE", &r.api.resolve_env());
    t.run(&["config", "--set", &format!("docker.image={}", r.image)])
        .code(0);
    t
}

fn execute(t: &Cmm, prompt: &str, extra: &[&str]) -> Output {
    let mut args = vec!["execute", "--json", "--approve-all", "--prompt", prompt];
    args.extend_from_slice(extra);
    t.run(&args)
}

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[test]
fn the_real_claude_code_completes_real_jobs_on_the_default_caps() {
    let Some(r) = real("the_real_claude_code_completes_real_jobs_on_the_default_caps") else {
        return;
    };
    // A fresh opt-in and nothing else: five one-turn jobs, then ten turns.
    let t = install(r);
    for i in 0..5 {
        let out = execute(&t, &format!("scenario:text say=hello{i}"), &[]);
        out.code(0);
        let v = out.json();
        assert_eq!(v["status"], "completed", "{v:#}");
        assert!(v["result"].as_str().unwrap().contains(&format!("hello{i}")), "{v:#}");
        // What the API reported for the one request, exactly.
        assert_eq!(v["usage"]["input_tokens"], 4, "{v:#}");
        assert_eq!(v["usage"]["cache_creation_input_tokens"], 12000);
        assert_eq!(v["usage"]["cache_read_input_tokens"], 9000);
        assert_eq!(v["usage"]["output_tokens"], 60);
        assert_eq!(v["fresh_tokens"], 12064);
        assert_eq!(v["cost_estimated"], false);
        assert!(v["cost_usd"].as_f64().unwrap() > 0.0, "Claude Code's own cost: {v:#}");
        // Out only through the proxy, to the allowed name.
        assert!(v["egress"]["allowed"].as_u64().unwrap() >= 1, "{v:#}");
        assert_eq!(v["egress"]["failed"], 0);
    }
    let out = execute(&t, "scenario:text turns=10", &[]);
    out.code(0);
    let v = out.json();
    assert_eq!(v["status"], "completed", "{v:#}");
    assert_eq!(v["num_turns"], 10);
    assert_eq!(v["fresh_tokens"], 10 * 12064);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 10 * 9000);
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert_eq!(day["tasks"], 6);
    assert_eq!(day["tokens"], 15 * 12064);
    // The credential reached the API (and only as its hash is it recorded).
    let seen = r.api.requests();
    assert!(
        seen.iter()
            .any(|q| q.is_messages() && q.api_key_sha256.as_deref() == Some(sha(API_KEY).as_str())),
        "the API key reached the stand-in"
    );
    assert!(!t.read("audit.jsonl").contains(API_KEY));
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn a_real_workspace_job_writes_and_edits_and_its_patch_comes_back() {
    let Some(r) = real("a_real_workspace_job_writes_and_edits_and_its_patch_comes_back") else {
        return;
    };
    let t = install(r);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README.md"), "the old text\n").unwrap();
    let ws = dir.path().to_str().unwrap();
    // acceptEdits (the default with a workspace): Claude Code's Write tool
    // creates the file in /workspace; it comes back as an added file.
    let out = execute(
        &t,
        "scenario:write path=hello.txt content=hi-from-claude",
        &["--workspace", ws],
    );
    out.code(0);
    let v = out.json();
    assert_eq!(v["permission_mode"], "acceptEdits");
    let files = v["changes"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{v:#}");
    assert_eq!(
        (files[0]["path"].as_str(), files[0]["change"].as_str()),
        (Some("hello.txt"), Some("added"))
    );
    let patch = t.run(&["logs", "--job", v["job_id"].as_str().unwrap(), "--patch"]);
    patch.code(0).stdout_has("+hi-from-claude");
    assert!(!dir.path().join("hello.txt").exists(), "DIR untouched without --apply");
    // Read then Edit, applied to DIR.
    let out = execute(
        &t,
        "scenario:edit path=README.md old=old new=new",
        &["--workspace", ws, "--apply"],
    );
    out.code(0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
        "the new text\n"
    );
    // In the default mode the same write is denied by Claude Code itself.
    let out = execute(
        &t,
        "scenario:write path=denied.txt content=no",
        &["--workspace", ws, "--permission-mode", "default"],
    );
    out.code(0);
    let v = out.json();
    assert_eq!(v["permission_mode"], "default");
    assert_eq!(v["changes"]["files"].as_array().unwrap().len(), 0, "{v:#}");
    assert!(v["result"].as_str().unwrap().contains("permission"), "{v:#}");
}

#[test]
fn claude_code_s_own_limits_end_real_jobs_with_their_reasons() {
    let Some(r) = real("claude_code_s_own_limits_end_real_jobs_with_their_reasons") else {
        return;
    };
    let t = install(r);
    let out = execute(&t, "scenario:text turns=10", &["--max-turns", "2"]);
    out.code(1);
    let v = out.json();
    assert_eq!(
        (v["status"].as_str(), v["error"].as_str()),
        (Some("failed"), Some("max_turns")),
        "{v:#}"
    );
    assert_eq!(v["claude_error"], "Reached maximum number of turns (2)");
    assert!(v["fresh_tokens"].as_u64().unwrap() >= 2 * 12064, "{v:#}");
    // The budget: Claude Code stops itself; its usage comes from modelUsage.
    // (2,000,000 input tokens a request: the token caps are raised so that
    // the budget, not our kill at the token cap, ends it.)
    t.run(&["limits", "--max-tokens-per-task", "50000000", "--tokens", "100000000"])
        .code(0);
    let out = execute(&t, "scenario:expensive", &["--max-budget-usd", "1"]);
    out.code(1);
    let v = out.json();
    assert_eq!(
        (v["status"].as_str(), v["error"].as_str()),
        (Some("failed"), Some("budget_exhausted")),
        "{v:#}"
    );
    assert!(v["claude_error"].as_str().unwrap().contains("maximum budget"), "{v:#}");
    assert!(v["fresh_tokens"].as_u64().unwrap() >= 2_000_000, "{v:#}");
    let cost = v["cost_usd"].as_f64().unwrap();
    assert!(cost >= 1.0 && v["cost_estimated"] == false, "{v:#}");
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert!(day["cost_usd"].as_f64().unwrap() >= cost, "{day}");
    // In words, on stderr.
    let human = t.run(&[
        "execute",
        "--approve-all",
        "--max-turns",
        "2",
        "--prompt",
        "scenario:text turns=10",
    ]);
    human.code(1).stderr_has("stopped at the job's turn limit (2 turns)");
}

#[test]
fn a_refused_api_key_ends_the_real_job_at_once_with_a_hint_for_api_keys() {
    let Some(r) = real("a_refused_api_key_ends_the_real_job_at_once_with_a_hint_for_api_keys") else {
        return;
    };
    let t = install(r);
    let t0 = Instant::now();
    let out = t.run(&["execute", "--approve-all", "--prompt", "scenario:auth"]);
    // Claude Code alone retries for about three minutes.
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
    out.code(1)
        .stderr_has("the API key was rejected")
        .stderr_has("Claude Code said: HTTP 401")
        .stderr_has("console.anthropic.com");
    assert!(!out.stderr.contains(API_KEY));
}

#[test]
fn a_stalled_real_answer_cancelled_still_counts_its_usage() {
    let Some(r) = real("a_stalled_real_answer_cancelled_still_counts_its_usage") else {
        return;
    };
    let t = install(r);
    let child = t
        .cmd(&["-v", "execute", "--approve-all", "--prompt", "scenario:stall"])
        .spawn();
    // `-v` prints the token progress the API reported as the answer began.
    child.expect_stderr(60, "progress line", |l| l.contains("12005/"));
    child.signal(libc::SIGINT);
    let out = child.wait();
    assert_eq!(out.status, 130, "{}", out.stderr);
    let id = events_named(&audit_events(&t), "job.started")[0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let rec = job_record(&t, &id);
    assert_eq!(rec["status"], "cancelled");
    assert_eq!(rec["fresh_tokens"], 12005, "{rec:#}");
    assert_eq!(usage_today(&t), (1, 12005, 0), "counted against the caps");
    assert!(containers_of_job(&id).is_empty());
}

#[test]
fn an_untrusted_certificate_says_why_in_claude_code_s_words() {
    let Some(r) = real("an_untrusted_certificate_says_why_in_claude_code_s_words") else {
        return;
    };
    // Another stand-in, with a CA the image does not trust: what a user
    // behind a TLS-inspecting proxy meets without `--extra-ca`.
    let other = StandIn::start();
    let t = Cmm::opted_in()
        .env("ANTHROPIC_API_KEY", API_KEY)
        .env("CMM_EGRESS_RESOLVE", &other.resolve_env());
    t.run(&["config", "--set", &format!("docker.image={}", r.image)])
        .code(0);
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--timeout",
        "120",
        "--prompt",
        "scenario:text",
    ]);
    out.code(1).stderr_has("Claude Code said:").stderr_has("certificate");
}

/// A provider on its own API key, serving market tasks with the real
/// Claude Code (`advertise --auto-accept`).
fn real_provider(r: &Real, server: &market::Server, key: &str) -> (Cmm, common::Spawned) {
    let t = Cmm::opted_in()
        .env("ANTHROPIC_API_KEY", key)
        .env("CMM_EGRESS_RESOLVE", &r.api.resolve_env());
    t.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    t.run(&["config", "--set", &format!("docker.image={}", r.image)])
        .code(0);
    let child = t
        .cmd(&[
            "--json",
            "advertise",
            "--slots",
            "1",
            "--price",
            "5",
            "--auto-accept",
            "--endpoint",
            &server.endpoint,
        ])
        .spawn();
    child.expect_json(30, "offer", |v| v["event"] == "offer");
    (t, child)
}

fn market_balance(home: &Cmm, server: &market::Server) -> (i64, i64) {
    let v = home
        .run(&["--json", "market", "status", "--endpoint", &server.endpoint])
        .code(0)
        .json();
    (
        v["status"]["balance"].as_i64().unwrap(),
        v["status"]["escrow"].as_i64().unwrap(),
    )
}

#[test]
fn a_real_market_workspace_task_is_tested_rejected_on_attempt_one_and_paid_and_applied_on_attempt_two() {
    let Some(r) =
        real("a_real_market_workspace_task_is_tested_rejected_on_attempt_one_and_paid_and_applied_on_attempt_two")
    else {
        return;
    };
    const WRONG_KEY: &str = "sk-ant-api03-real-tier-wrong-provider-000000000000000000000000000000000000-BBBB";
    let server = market::Server::start(&["--lease-ms", "20000"]);
    // Attempt 1 goes to the only provider there: the stand-in answers its
    // account with the wrong content.
    let (bad, bad_child) = real_provider(r, &server, WRONG_KEY);
    let requester = Cmm::new();
    requester
        .run(&["config", "--set", &format!("docker.image={}", r.image)])
        .code(0);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README.md"), "the old text\n").unwrap();
    let prompt = format!(
        "scenario:write path=answer.txt content=right wrong_for={} wrong=wrong",
        &sha(WRONG_KEY)[..16]
    );
    let ws = dir.path().to_str().unwrap();
    let bid = requester
        .cmd(&[
            "--json",
            "bid",
            "--prompt",
            &prompt,
            "--max-price",
            "20",
            "--wait",
            "--endpoint",
            &server.endpoint,
            "--workspace",
            ws,
            "--accept-cmd",
            "cat answer.txt; grep -qx right answer.txt",
            "--apply",
        ])
        .spawn();
    bad_child.expect_json(240, "rejected", |v| v["event"] == "rejected");
    let (good, good_child) = real_provider(r, &server, API_KEY);
    let out = bid.wait();
    out.code(0);
    let (v, stderr) = (out.json(), &out.stderr);
    assert_eq!(v["attempt"], 2, "{v:#}");
    let w = &v["workspace"];
    assert_eq!(w["acceptance"]["passed"], true, "{v:#}");
    let files = w["changes"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{v:#}");
    assert_eq!(
        (files[0]["path"].as_str(), files[0]["change"].as_str()),
        (Some("answer.txt"), Some("added"))
    );
    // `--apply`: Claude Code's Write, on the provider, is now in DIR.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("answer.txt"))
            .unwrap()
            .trim_end(),
        "right"
    );
    assert!(stderr.contains("rejected"), "{stderr}");
    good_child.expect_json(20, "settled", |e| e["event"] == "settled");
    // Exact balances: the wrong provider is not paid, the right one is.
    assert_eq!(market_balance(&requester, &server), (995, 0));
    assert_eq!(market_balance(&bad, &server), (1000, 0));
    assert_eq!(market_balance(&good, &server), (1005, 0));
    let got: Vec<_> = audit_events(&bad)
        .into_iter()
        .filter(|e| e["event"] == "market.rejection_received")
        .collect();
    assert_eq!(got.len(), 1);
    assert!(got[0]["reason"].as_str().unwrap().contains("wrong"), "{:#}", got[0]);
    // Both jobs ran the real Claude Code on the workspace, in acceptEdits.
    for h in [&bad, &good] {
        let events = audit_events(h);
        let started: Vec<_> = events.iter().filter(|e| e["event"] == "job.started").collect();
        assert_eq!(started.len(), 1);
        assert_eq!(started[0]["permission_mode"], "acceptEdits");
        h.run(&["audit", "verify"]).code(0);
    }
    requester.run(&["audit", "verify"]).code(0);
    server.verify();
}
