//! `execute` against the real Docker engine, one scenario of the fake
//! `claude` per test: exit code, output, job record, audit events, usage,
//! and no container left behind.

mod common;
#[path = "common/docker.rs"]
mod docker;

use common::{docker_available, secs, wait_until, Cmm, Output, Spawned};
use docker::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn execute(t: &Cmm, prompt: &str, extra: &[&str]) -> Output {
    fake_execute(t, prompt, extra).run()
}

/// Common checks for a job that started: record on disk (0600) equal to the
/// printed one, one terminal event, no container left, prompt never logged.
#[track_caller]
fn check_started_job(t: &Cmm, out: &Output, prompt: &str) -> (Value, Value) {
    let printed = out.json();
    let id = printed["job_id"].as_str().expect("job_id").to_string();
    let record = job_record(t, &id);
    assert_eq!(record["status"], printed["status"]);
    let mode = std::fs::metadata(t.file(&format!("jobs/{id}.json"))).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        record["prompt_sha256"],
        hex::encode(Sha256::digest(prompt.as_bytes())),
        "record holds the prompt's hash"
    );
    assert!(
        !t.read(&format!("jobs/{id}.json")).contains(prompt),
        "record never holds the prompt"
    );
    let audit = t.read("audit.jsonl");
    assert!(!audit.contains(prompt), "audit never holds the prompt");
    if let Some(r) = record["result"].as_str() {
        assert!(!audit.contains(r), "audit never holds the result text");
    }
    let events = audit_events(t);
    let started = events_named(&events, "job.started");
    assert_eq!(started.len(), 1);
    let s = started[0];
    assert_eq!(s["job_id"], id.as_str());
    assert_eq!(s["model"], "sonnet");
    assert_eq!(s["image"], FAKE_IMAGE);
    assert_eq!(s["source"], "local");
    assert_eq!(s["prompt_sha256"], record["prompt_sha256"]);
    assert!(s["max_tokens"].is_u64() && s["timeout_s"].is_u64());
    let approved = events_named(&events, "job.approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["how"], "approve-all");
    let terminal = terminal_event(t, &id);
    for k in [
        "job_id",
        "model",
        "duration_ms",
        "usage",
        "cost_usd",
        "num_turns",
        "exit_code",
    ] {
        assert!(terminal.get(k).is_some(), "terminal event lacks {k}: {terminal}");
    }
    let u = &terminal["usage"];
    let sum = [
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|k| u[*k].as_u64().unwrap())
    .sum::<u64>();
    assert_eq!(u["total_tokens"].as_u64().unwrap(), sum);
    assert!(containers_of_job(&id).is_empty(), "container of {id} left behind");
    t.run(&["audit", "verify"]).code(0);
    let (_, _, reservations) = usage_today(t);
    assert_eq!(reservations, 0, "reservation settled");
    (record, terminal)
}

#[test]
fn a_job_succeeds_with_real_usage_recorded() {
    if !docker_available("a_job_succeeds_with_real_usage_recorded") {
        return;
    }
    fake_image();
    let t = job_env();
    let prompt = "scenario:ok please say hello";
    let out = execute(&t, prompt, &[]);
    out.code(0);
    let (record, terminal) = check_started_job(&t, &out, prompt);
    assert_eq!(record["status"], "completed");
    assert_eq!(record["result"], "Hello from the fake claude");
    assert_eq!(record["model"], "sonnet");
    assert_eq!(record["model_resolved"], "claude-sonnet-4-5-20250929");
    // The shape of one real `claude -p` request: ~12,000 tokens of system
    // prompt and tools written to the cache, ~9,000 read from it.
    assert_eq!(record["usage"]["input_tokens"], 4);
    assert_eq!(record["usage"]["output_tokens"], 60);
    assert_eq!(record["usage"]["cache_creation_input_tokens"], 12000);
    assert_eq!(record["usage"]["cache_read_input_tokens"], 9000);
    assert_eq!(record["total_tokens"], 21064);
    assert_eq!(record["fresh_tokens"], 12064);
    assert_eq!(record["cost_usd"], 0.048612);
    assert_eq!(record["cost_estimated"], false);
    assert_eq!(record["num_turns"], 1);
    // Ended at its result: the answer is in, its process is not waited for.
    assert_eq!(record["exit_code"], Value::Null);
    assert_eq!(record["exit"], 0);
    assert!(record["duration_ms"].as_u64().unwrap() > 0);
    assert_eq!(record["claude_duration_ms"], 1834);
    assert_eq!(terminal["event"], "job.completed");
    assert_eq!(terminal["usage"]["total_tokens"], 21064);
    assert_eq!(terminal["usage"]["fresh_tokens"], 12064);
    assert_eq!(terminal["cost_usd"], 0.048612);
    assert_eq!(
        usage_today(&t),
        (1, 12064, 0),
        "the ledger counts fresh tokens; cache reads apart"
    );

    // Human output: the result on stdout, the summary on stderr.
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:ok again",
    ]);
    out.code(0)
        .stderr_has("12064 fresh tokens")
        .stderr_has("9000 cache reads")
        .stderr_has("$0.0486");
    assert_eq!(out.stdout.trim(), "Hello from the fake claude");
    assert_eq!(usage_today(&t), (2, 2 * 12064, 0));
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert_eq!(day["cache_read_tokens"], 18000);
    assert_eq!(day["cost_usd"], 2.0 * 0.048612);

    // `logs --job` shows the record.
    let id = record["job_id"].as_str().unwrap();
    t.run(&["logs", "--job", id])
        .code(0)
        .stdout_has("completed")
        .stdout_has("21064");
    let shown = t.run(&["logs", "--json", "--job", id]).code(0).json();
    assert_eq!(shown["job_id"], id);
    t.run(&["logs", "--job", "../config"]).code(2);
}

#[test]
fn a_failed_login_fails_the_job() {
    if !docker_available("a_failed_login_fails_the_job") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:auth", &[]);
    out.code(1);
    let (record, terminal) = check_started_job(&t, &out, "scenario:auth");
    assert_eq!(record["status"], "failed");
    assert_eq!(record["is_error"], true);
    assert_eq!(
        record["subtype"], "success",
        "the real CLI says success; is_error decides"
    );
    assert_eq!(record["error"], "authentication_failed");
    assert_eq!(record["exit_code"], Value::Null, "ended at its result");
    assert_eq!(terminal["event"], "job.failed");
    assert_eq!(terminal["error"], "authentication_failed");
    assert_eq!(usage_today(&t), (1, 0, 0));
    let human = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:auth",
    ]);
    human.code(1).stderr_has("could not log in");
    assert!(human.stdout.is_empty(), "no result on stdout for a failed job");
}

#[test]
fn api_retries_are_shown_then_the_job_succeeds() {
    if !docker_available("api_retries_are_shown_then_the_job_succeeds") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:retry", &[]);
    out.code(0)
        .stderr_has("retry: attempt 1/10 in 500 ms (overloaded_error)")
        .stderr_has("attempt 2/10");
    let (record, terminal) = check_started_job(&t, &out, "scenario:retry");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["retries"].as_array().unwrap().len(), 2);
    assert_eq!(record["retries"][1]["max_retries"], 10);
    assert_eq!(terminal["event"], "job.completed");
}

#[test]
fn a_hanging_job_is_killed_at_the_timeout() {
    if !docker_available("a_hanging_job_is_killed_at_the_timeout") {
        return;
    }
    fake_image();
    let t = job_env();
    let t0 = std::time::Instant::now();
    let out = execute(&t, "scenario:hang", &["--timeout", "2"]);
    out.code(1).stderr_has("timeout");
    assert!(t0.elapsed().as_secs() < 30, "killed promptly");
    let (record, terminal) = check_started_job(&t, &out, "scenario:hang");
    assert_eq!(record["status"], "killed");
    assert_eq!(record["kill_reason"], "timeout");
    assert_eq!(terminal["event"], "job.killed");
    assert_eq!(terminal["reason"], "timeout");
    assert!(terminal["duration_ms"].as_u64().unwrap() >= 2000);
}

#[test]
fn the_per_task_token_cap_kills_the_job() {
    if !docker_available("the_per_task_token_cap_kills_the_job") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:overspend", &["--max-tokens", "700"]);
    out.code(1).stderr_has("token-cap");
    let (record, terminal) = check_started_job(&t, &out, "scenario:overspend");
    assert_eq!(record["status"], "killed");
    assert_eq!(record["kill_reason"], "token-cap");
    assert_eq!(record["max_tokens"], 700);
    let used = record["fresh_tokens"].as_u64().unwrap();
    assert!(used > 700 && used < 2000, "stopped just past the cap: {used}");
    assert_eq!(terminal["event"], "job.killed");
    assert_eq!(terminal["reason"], "token-cap");
    assert_eq!(terminal["usage"]["fresh_tokens"].as_u64().unwrap(), used);
    assert_eq!(usage_today(&t), (1, used, 0), "tokens spent before the kill count");
    // Killed before its result: the cost is estimated from the usage, and counted.
    assert_eq!(record["cost_estimated"], true);
    assert!(record["cost_usd"].as_f64().unwrap() > 0.0);
    // More than limits.maxTokensPerTask cannot be asked for.
    execute(&t, "scenario:ok", &["--max-tokens", "500001"])
        .code(2)
        .stdout_has("limits.maxTokensPerTask");
}

#[test]
fn exiting_without_a_result_is_a_failure() {
    if !docker_available("exiting_without_a_result_is_a_failure") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:crash", &[]);
    out.code(1);
    let (record, terminal) = check_started_job(&t, &out, "scenario:crash");
    assert_eq!(record["status"], "failed");
    assert_eq!(record["exit_code"], 3);
    assert!(record["error"].as_str().unwrap().contains("without a result"));
    assert!(record["stderr_tail"].as_str().unwrap().contains("segmentation fault"));
    assert_eq!(terminal["event"], "job.failed");
    assert_eq!(terminal["exit_code"], 3);
}

#[test]
fn garbage_lines_are_kept_and_warned_about() {
    if !docker_available("garbage_lines_are_kept_and_warned_about") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:garbage", &[]);
    out.code(0)
        .stderr_has("warning: ignored a line that is not a stream-json event: this is not json");
    let (record, terminal) = check_started_job(&t, &out, "scenario:garbage");
    assert_eq!(record["status"], "completed");
    assert_eq!(record["result"], "fine despite noise");
    assert_eq!(record["invalid_line_count"], 2);
    assert_eq!(record["invalid_lines"][0], "this is not json");
    assert_eq!(terminal["invalid_lines"], 2);
}

#[test]
fn a_rejected_rate_limit_says_when_it_resets() {
    if !docker_available("a_rejected_rate_limit_says_when_it_resets") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = execute(&t, "scenario:ratelimit", &[]);
    out.code(1);
    let (record, terminal) = check_started_job(&t, &out, "scenario:ratelimit");
    assert_eq!(record["status"], "failed");
    assert_eq!(record["rate_limit"]["status"], "rejected");
    assert_eq!(record["rate_limit"]["resets_at"], 4102444800i64);
    assert_eq!(terminal["error"], "rate limit rejected");
    t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:ratelimit",
    ])
    .code(1)
    .stderr_has("rate limit (five_hour) was reached; it resets 2100-01-01");
}

#[test]
fn ctrl_c_removes_the_container_and_releases_the_reservation() {
    if !docker_available("ctrl_c_removes_the_container_and_releases_the_reservation") {
        return;
    }
    fake_image();
    let t = job_env();
    let child = fake_execute(&t, "scenario:hang", &[]).spawn();
    let (id, container) = wait_for_job_container(&t, 0, 30);
    // Interrupted once its container runs (not while it is being created).
    assert!(
        wait_until(secs(30), || docker(&[
            "inspect",
            "--format",
            "{{.State.Running}}",
            &container
        ])
        .1
        .trim()
            == "true"),
        "the job's container never ran"
    );
    child.signal(libc::SIGINT);
    let out = child.wait();
    assert_eq!(out.status, 130, "{}", out.stderr);
    let terminal = terminal_event(&t, &id);
    assert_eq!(terminal["event"], "job.cancelled");
    assert!(containers_of_job(&id).is_empty(), "container removed");
    assert_eq!(usage_today(&t), (0, 0, 0), "reservation released, nothing counted");
    assert_eq!(job_record(&t, &id)["status"], "cancelled");
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn credentials_reach_the_container_only_as_chosen() {
    if !docker_available("credentials_reach_the_container_only_as_chosen") {
        return;
    }
    fake_image();
    // Both set: the subscription token wins, the API key is not passed, and
    // a note says so.
    let t = job_env().env("ANTHROPIC_API_KEY", "sk-ant-api03-shell-key");
    let out = execute(&t, "scenario:env", &[]);
    out.code(0).stderr_has("ANTHROPIC_API_KEY is set but was ignored");
    assert_eq!(out.json()["result"], "var=CLAUDE_CODE_OAUTH_TOKEN both=no model=sonnet");

    // Explicit API-key users get the key.
    t.run(&["config", "--set", "credentials.source=api-key-env"]).code(0);
    let out = execute(&t, "scenario:env", &["--model", "opus"]);
    out.code(0);
    assert_eq!(out.json()["result"], "var=ANTHROPIC_API_KEY both=no model=opus");

    // A token file must be private.
    let t = Cmm::opted_in();
    let file = t.file("token");
    std::fs::write(&file, "sk-ant-oat01-from-file\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    t.run(&["config", "--set", &format!("credentials.tokenFile={}", file.display())])
        .code(0);
    execute(&t, "scenario:env", &[]).code(2).stdout_has("chmod 600");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = execute(&t, "scenario:env", &[]);
    out.code(0);
    assert_eq!(out.json()["result"], "var=CLAUDE_CODE_OAUTH_TOKEN both=no model=sonnet");

    // A token command.
    let t = Cmm::opted_in();
    t.run(&[
        "config",
        "--set",
        "credentials.tokenCommand=printf sk-ant-api03-from-command",
    ])
    .code(0);
    let out = execute(&t, "scenario:env", &[]);
    out.code(0);
    assert_eq!(out.json()["result"], "var=ANTHROPIC_API_KEY both=no model=sonnet");
}

#[test]
fn health_reports_engine_image_credentials_and_jobs() {
    if !docker_available("health_reports_engine_image_credentials_and_jobs") {
        return;
    }
    fake_image();
    let t = job_env();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    t.run(&["config", "--set", &format!("docker.image={FAKE_IMAGE}")])
        .code(0);
    let v = t.run(&["health", "--json"]).code(0).json();
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check in {v}"))
    };
    assert_eq!(check("docker")["level"], "OK");
    assert!(check("docker")["message"].as_str().unwrap().contains("API 1."));
    assert_eq!(check("image")["level"], "OK");
    assert_eq!(check("credentials")["level"], "OK");
    assert!(!v.to_string().contains(TOKEN), "health never prints the credential");
    assert!(v["line"].as_str().unwrap().contains("'running_jobs'="));

    t.run(&["config", "--set", "docker.image=cmm-no-such-image:never"])
        .code(0);
    let out = t.run(&["health"]);
    out.code(1).stdout_has("WARNING").stdout_has("not present");

    let out = t
        .cmd(&["health"])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .run();
    out.code(2)
        .stdout_has("CRITICAL")
        .stdout_has("Docker engine not reachable");

    // A tokenCommand is reported, never run.
    let t = Cmm::new();
    t.run(&["config", "--set", "credentials.tokenCommand=touch ran-it"])
        .code(0);
    let v = t.run(&["health", "--json"]).json();
    assert!(v.to_string().contains("tokenCommand configured"));
    assert!(!t.file("ran-it").exists());
}

#[test]
fn pull_without_a_registry_falls_back_to_a_build_or_says_why_not() {
    if !docker_available("pull_without_a_registry_falls_back_to_a_build_or_says_why_not") {
        return;
    }
    let t = Cmm::new();
    let out = t.run(&[
        "docker:pull",
        "--tag",
        "cmm-test/no-such-image:1",
        "--no-build-fallback",
    ]);
    out.code(4).stderr_has("cannot pull `cmm-test/no-such-image:1`");
    // The fallback builds the embedded context; here its base image cannot be
    // pulled either, so the failing step and its output are shown.
    let out = t.run(&["docker", "pull", "--tag", "cmm-test/no-such-image:1"]);
    out.code(1)
        .stderr_has("building `cmm-test/no-such-image:1` locally")
        .stderr_has("failed step: Step 1/")
        .stderr_has(": FROM ");
}

#[test]
fn a_missing_default_image_is_pulled_then_built_from_the_embedded_context() {
    if !docker_available("a_missing_default_image_is_pulled_then_built_from_the_embedded_context") {
        return;
    }
    let t = job_env();
    t.run(&["config", "--set", "docker.image=cmm-test/auto-managed:1"])
        .code(0);
    // No registry here: the pull fails, the build from the embedded context
    // starts (and fails at its base image), and the job never starts.
    let out = t.run(&["execute", "--approve-all", "--prompt", "scenario:ok"]);
    out.code(1)
        .stderr_has("image `cmm-test/auto-managed:1` is not present; pulling it")
        .stderr_has("building it from the embedded context")
        .stderr_has("image build failed at `Step 1/");
    let ev = audit_events(&t);
    assert!(events_named(&ev, "job.started").is_empty());
    assert_eq!(usage_today(&t), (0, 0, 0), "nothing counted, reservation released");
    // A non-default image is never pulled or built behind the user's back.
    t.run(&[
        "execute",
        "--approve-all",
        "--image",
        "cmm-test/other:1",
        "--prompt",
        "scenario:ok",
    ])
    .code(4)
    .stderr_has("image `cmm-test/other:1` is not present")
    .stderr_has("docker build --tag cmm-test/other:1");
}

#[test]
fn docker_build_labels_the_image_and_shows_the_failing_step() {
    if !docker_available("docker_build_labels_the_image_and_shows_the_failing_step") {
        return;
    }
    let t = Cmm::new();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::env::var("CMM_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()),
        ctx.path().join("busybox"),
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nARG GREETING=none\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo greeting=$GREETING; exit 0\"]\n",
    )
    .unwrap();
    let dir = ctx.path().to_str().unwrap();
    let tag = "cmm-test/build-ok:1";
    let v = t
        .run(&[
            "docker:build",
            "--json",
            "--context",
            dir,
            "--tag",
            tag,
            "--build-arg",
            "GREETING=hi",
            "--no-cache",
        ])
        .code(0)
        .json();
    assert_eq!(v["image"], tag);
    let (_, labels, _) = docker(&["image", "inspect", "-f", "{{json .Config.Labels}}", tag]);
    assert!(labels.contains("\"dev.claude-max-market.image\":\"true\""), "{labels}");
    docker(&["rmi", "-f", tag]);

    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo about to fail; exit 3\"]\n",
    )
    .unwrap();
    t.run(&["docker", "build", "--context", dir, "--tag", "cmm-test/build-fail:1"])
        .code(1)
        .stderr_has("failed step: Step 3/")
        .stderr_has(": RUN [\"/bin/busybox\"")
        .stderr_has("about to fail")
        .stderr_has("returned a non-zero code: 3");
    t.run(&["docker", "build", "--context", "/nonexistent/ctx"]).code(2);
}

/// `execute` in the background, for tests that act on what it prints as
/// the job runs.
fn spawn_execute(t: &Cmm, prompt: &str, extra: &[&str]) -> Spawned {
    let mut args = vec!["execute", "--approve-all", "--image", FAKE_IMAGE, "--prompt", prompt];
    args.extend_from_slice(extra);
    t.cmd(&args).spawn()
}

#[test]
fn default_caps_fit_real_jobs() {
    if !docker_available("default_caps_fit_real_jobs") {
        return;
    }
    fake_image();
    // A fresh opt-in and nothing else: five one-turn jobs shaped like real
    // Claude Code requests, then a ten-turn job of the same shape.
    let t = job_env();
    for i in 0..5 {
        let out = execute(&t, &format!("scenario:ok job {i}"), &[]);
        out.code(0);
        assert_eq!(out.json()["fresh_tokens"], 12064);
    }
    let out = execute(&t, "scenario:turns turns=10", &[]);
    out.code(0);
    let r = out.json();
    assert_eq!(r["status"], "completed", "{r:#}");
    assert_eq!(r["num_turns"], 10);
    assert_eq!(r["fresh_tokens"], 10 * 12064);
    assert_eq!(r["usage"]["cache_read_input_tokens"], 90000);
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert_eq!(day["tasks"], 6);
    assert_eq!(day["tokens"], 15 * 12064);
    assert_eq!(day["cache_read_tokens"], 15 * 9000);
    // `limits` says what the token caps count.
    t.run(&["limits"])
        .code(0)
        .stdout_has("fresh tokens (input + cache creation + output)")
        .stdout_has("cache reads");
}

#[test]
fn the_job_budget_reaches_claude_code_and_its_own_limits_end_the_job() {
    if !docker_available("the_job_budget_reaches_claude_code_and_its_own_limits_end_the_job") {
        return;
    }
    fake_image();
    let t = job_env();
    // Defaults from the caps, passed to Claude Code's own flags.
    let out = execute(&t, "scenario:args", &[]);
    out.code(0);
    assert_eq!(
        out.json()["result"],
        "mode=default turns=100 budget=5 partial=yes allowed= disallowed="
    );
    // Per job, within the caps.
    let out = execute(
        &t,
        "scenario:args",
        &[
            "--max-turns",
            "3",
            "--max-budget-usd",
            "0.5",
            "--permission-mode",
            "plan",
            "--allowed-tools",
            "Read,Edit",
            "--disallowed-tools",
            "WebFetch",
        ],
    );
    out.code(0);
    let r = out.json();
    assert_eq!(
        r["result"],
        "mode=plan turns=3 budget=0.5 partial=yes allowed=Read,Edit disallowed=WebFetch"
    );
    assert_eq!(r["permission_mode"], "plan");
    // The mode is audited with the job.
    let approved = events_named(&audit_events(&t), "job.approved")
        .last()
        .cloned()
        .cloned()
        .unwrap();
    assert_eq!(approved["permission_mode"], "plan");
    // Claude Code ends a job at its turn limit, with a result that says so.
    let out = execute(&t, "scenario:turns turns=5", &["--max-turns", "2"]);
    out.code(1);
    let r = out.json();
    assert_eq!(
        (r["status"].as_str(), r["subtype"].as_str()),
        (Some("failed"), Some("error_max_turns"))
    );
    assert_eq!(r["error"], "max_turns");
    assert_eq!(r["terminal_reason"], "max_turns");
    assert_eq!(r["claude_error"], "Reached maximum number of turns (2)");
    assert_eq!(r["fresh_tokens"], 2 * 12064);
    let human = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--max-turns",
        "2",
        "--prompt",
        "scenario:turns turns=5",
    ]);
    human
        .code(1)
        .stderr_has("stopped at the job's turn limit (2 turns)")
        .stderr_has("--max-turns N");
    // Beyond the caps is refused before anything runs.
    execute(&t, "scenario:ok", &["--max-turns", "101"]).code(2);
    execute(&t, "scenario:ok", &["--max-budget-usd", "6"])
        .code(2)
        .stdout_has("limits.maxCostPerTask");
    execute(&t, "scenario:ok", &["--permission-mode", "yolo"]).code(2);
}

#[test]
fn cost_caps_refuse_the_next_job_once_spent() {
    if !docker_available("cost_caps_refuse_the_next_job_once_spent") {
        return;
    }
    fake_image();
    let t = job_env();
    t.run(&["limits", "--daily-cost", "0.05", "--max-cost-per-task", "0.01"])
        .code(0);
    // The first job fits its reservation; it really costs $0.0486.
    execute(&t, "scenario:ok", &[]).code(0);
    let out = execute(&t, "scenario:ok", &[]);
    out.code(3).stdout_has("daily cost cap");
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert_eq!(day["cost_usd"], 0.048612);
    assert_eq!(day["tasks"], 1);
    t.run(&["limits"]).code(0).stdout_has("$0.05");
}

#[test]
fn usage_reported_before_a_cancel_or_a_timeout_is_counted() {
    if !docker_available("usage_reported_before_a_cancel_or_a_timeout_is_counted") {
        return;
    }
    fake_image();
    let t = job_env();
    // Ctrl-C while the answer is still streaming: the API already reported
    // the usage of the message, and it counts.
    let child = spawn_execute(&t, "scenario:stall", &["--output-format", "stream-json"]);
    child.expect_stdout(60, "the streaming status", |l| l.contains("\"streaming\""));
    child.signal(libc::SIGINT);
    let out = child.wait();
    assert_eq!(out.status, 130, "{}", out.stderr);
    let id = events_named(&audit_events(&t), "job.started")[0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let record = job_record(&t, &id);
    assert_eq!(record["status"], "cancelled");
    assert_eq!(record["usage"]["cache_creation_input_tokens"], 12000);
    assert_eq!(record["fresh_tokens"], 12005);
    assert_eq!(record["cost_estimated"], true);
    let terminal = terminal_event(&t, &id);
    assert_eq!(terminal["usage"]["fresh_tokens"], 12005);
    assert_eq!(usage_today(&t), (1, 12005, 0), "the cancelled job's usage counts");

    // The same at the timeout.
    let out = execute(&t, "scenario:stall", &["--timeout", "3"]);
    out.code(1);
    let r = out.json();
    assert_eq!(
        (r["status"].as_str(), r["kill_reason"].as_str()),
        (Some("killed"), Some("timeout"))
    );
    assert_eq!(r["fresh_tokens"], 12005);
    assert_eq!(usage_today(&t), (2, 2 * 12005, 0));
    let day = &t.run(&["status", "--json"]).code(0).json()["usage"]["windows"][0];
    assert!(
        day["cost_usd"].as_f64().unwrap() > 0.08,
        "estimated cost counted: {day}"
    );
}

#[test]
fn a_refused_credential_ends_the_job_at_once_with_a_hint_for_its_kind() {
    if !docker_available("a_refused_credential_ends_the_job_at_once_with_a_hint_for_its_kind") {
        return;
    }
    fake_image();
    // Claude Code would retry for minutes; the job ends at the first 401.
    let t = job_env();
    let t0 = std::time::Instant::now();
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:refused-login",
    ]);
    assert!(t0.elapsed().as_secs() < 15, "took {:?}", t0.elapsed());
    out.code(1)
        .stderr_has("could not log in: the subscription token was rejected")
        .stderr_has("Claude Code said: HTTP 401: authentication_failed")
        .stderr_has("claude setup-token");
    // An API key gets the hint for API keys.
    let k = Cmm::opted_in().env("ANTHROPIC_API_KEY", "sk-ant-api03-not-a-real-key");
    let out = execute(&k, "scenario:refused-login", &[]);
    out.code(1);
    let r = out.json();
    assert_eq!(r["status"], "failed");
    assert_eq!(r["error"], "authentication_failed");
    assert_eq!(r["credential_kind"], "api-key");
    assert_eq!(r["claude_error"], "HTTP 401: authentication_failed");
    let human = k.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:refused-login",
    ]);
    human
        .code(1)
        .stderr_has("the API key was rejected")
        .stderr_has("console.anthropic.com");
}

#[test]
fn stream_json_prints_claude_code_s_own_events_unchanged() {
    if !docker_available("stream_json_prints_claude_code_s_own_events_unchanged") {
        return;
    }
    fake_image();
    let t = job_env();
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--output-format",
        "stream-json",
        "--prompt",
        "scenario:ok",
    ]);
    out.code(0);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|v| v["type"].as_str().unwrap()).collect();
    // What `claude -p --output-format stream-json --verbose` prints, and
    // nothing of the raw API events the pipeline asks for its own accounting.
    assert_eq!(kinds, ["system", "assistant", "result"], "{}", out.stdout);
    assert_eq!(lines[2]["result"], "Hello from the fake claude");
    // Progress and the summary stay on stderr.
    out.stderr_has("12064 fresh tokens");
    // `json` is the record, as with --json.
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--output-format",
        "json",
        "--prompt",
        "scenario:ok",
    ]);
    out.code(0);
    assert_eq!(out.json()["status"], "completed");
}
