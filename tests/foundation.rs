//! The foundation commands through the real binary: terms, consent, limits,
//! status, config, logs, audit, compliance-check, health, completions, and
//! every bad-input case with its exit code and no change on disk.

mod common;
use common::*;

use serde_json::Value;

fn events(t: &Cmm) -> Vec<String> {
    t.read("audit.jsonl")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn snapshot(t: &Cmm) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn terms_have_a_version_and_hash() {
    let t = Cmm::new();
    let v = t.run(&["terms", "--json"]).code(0).json();
    assert_eq!(v["schema_version"], 1);
    let text = v["text"].as_str().unwrap();
    use sha2::Digest;
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    );
    for must in [
        "own login",
        "proxies, pools, shares or resells",
        "completed contribution",
        "voluntary",
        "does not certify",
    ] {
        assert!(text.contains(must), "terms lack {must:?}");
    }
    t.run(&["--terms"]).code(0).stdout_has("Terms version");
    // Reading the terms writes nothing.
    assert!(snapshot(&t).is_empty());
}

#[test]
fn opt_in_without_tty_or_flag_is_refused_and_changes_nothing() {
    let t = Cmm::new();
    t.run(&["opt-in"]).code(3).stderr_has("--accept-terms");
    assert!(snapshot(&t).is_empty());
    let v = t.run(&["opt-in", "--json"]).code(3).json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "refused");
}

#[test]
fn opt_in_records_terms_hash_job_types_and_caps() {
    let t = Cmm::new();
    t.run(&[
        "opt-in",
        "--accept-terms",
        "--claude-jobs",
        "--max-daily",
        "7",
        "--max-tokens",
        "800",
    ])
    .code(0);
    let cfg: Value = serde_json::from_str(&t.read("config.json")).unwrap();
    let terms = t.run(&["terms", "--json"]).json();
    assert_eq!(cfg["consent"]["accepted"], true);
    assert_eq!(cfg["consent"]["termsSha256"], terms["sha256"]);
    assert_eq!(cfg["consent"]["termsVersion"], terms["version"]);
    assert_eq!(
        cfg["consent"]["jobTypes"],
        serde_json::json!(["local", "claude-market"])
    );
    assert_eq!(cfg["limits"]["dailyTasks"], 7);
    assert_eq!(cfg["limits"]["maxTokensPerTask"], 800);
    let s = t.run(&["status", "--json"]).code(0).json();
    assert_eq!(s["consent"]["accepted"], true);
    assert_eq!(s["consent"]["terms_current"], true);
    assert_eq!(s["caps"]["daily_tasks"], 7);
    assert_eq!(events(&t), ["log.genesis", "consent.granted"]);
    let line = t.read("audit.jsonl");
    assert!(line.contains(terms["sha256"].as_str().unwrap()));
}

#[test]
fn opt_in_bad_cap_is_a_usage_error_and_changes_nothing() {
    let t = Cmm::new();
    t.run(&["opt-in", "--accept-terms", "--max-daily", "lots"])
        .code(2)
        .stderr_has("limits.dailyTasks");
    t.run(&["opt-in", "--accept-terms", "--max-tokens", "0"])
        .code(2)
        .stderr_has("out of range");
    assert!(snapshot(&t).is_empty());
}

#[test]
fn interactive_opt_in_on_a_terminal() {
    let t = Cmm::new();
    let out = t.on_terminal(
        &[
            "accept these terms?=y",
            "market jobs=n",
            "Jobs per day=4",
            "Token cap per job=",
        ],
        &["opt-in"],
    );
    let text = &out.stdout;
    assert!(text.contains("EXIT 0"), "{text}");
    assert!(text.contains("USAGE POLICY") || text.contains("Usage policy"), "{text}");
    let s = t.run(&["status", "--json"]).code(0).json();
    assert_eq!(s["consent"]["accepted"], true);
    assert_eq!(s["consent"]["job_types"], serde_json::json!(["local"]));
    assert_eq!(s["caps"]["daily_tasks"], 4);
    assert_eq!(s["caps"]["max_tokens_per_task"], 500_000);
    let line = t.read("audit.jsonl");
    assert!(line.contains("\"interactive\":true"));

    // Declining records nothing.
    let t2 = Cmm::new();
    let out = t2.on_terminal(&["accept these terms?=n"], &["opt-in"]);
    assert!(out.stdout.contains("EXIT 3"), "{}", out.stdout);
    assert!(snapshot(&t2).is_empty());
}

#[test]
fn opt_in_again_keeps_usage_history_and_opt_out_revokes() {
    let t = Cmm::opted_in();
    // Usage recorded by a job lives in usage.json; fake one day of it.
    std::fs::write(
        t.file("usage.json"),
        format!(
            r#"{{"days":{{"{}":{{"tasks":2,"tokens":300}}}},"reservations":[]}}"#,
            chrono::Local::now().date_naive()
        ),
    )
    .unwrap();
    t.run(&["opt-in", "--accept-terms"]).code(0);
    let s = t.run(&["status", "--json"]).json();
    assert_eq!(s["usage"]["windows"][0]["tasks"], 2);
    assert_eq!(s["usage"]["windows"][0]["tokens"], 300);

    t.run(&["opt-out"]).code(2).stderr_has("--yes");
    t.run(&["opt-out", "--yes"]).code(0);
    let s = t.run(&["status", "--json"]).json();
    assert_eq!(s["consent"]["accepted"], false);
    assert!(s["consent"]["revoked_at"].is_string());
    assert_eq!(s["usage"]["windows"][0]["tasks"], 2);
    assert_eq!(
        events(&t),
        ["log.genesis", "consent.granted", "consent.granted", "consent.revoked"]
    );
    // Idempotent.
    t.run(&["opt-out", "--yes"]).code(0).stdout_has("nothing to revoke");
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn limits_set_validate_and_show() {
    let t = Cmm::new();
    let v = t.run(&["limits", "--json"]).code(0).json();
    assert_eq!(v["caps"]["daily_tasks"], 25);
    assert_eq!(v["timeout_seconds"], 300);
    t.run(&[
        "limits",
        "--daily",
        "9",
        "--weekly",
        "30",
        "--monthly-tokens",
        "90000",
        "--timeout",
        "600",
        "--concurrent",
        "3",
    ])
    .code(0);
    let v = t.run(&["limits", "--json"]).code(0).json();
    assert_eq!(v["caps"]["daily_tasks"], 9);
    assert_eq!(v["caps"]["weekly_tasks"], 30);
    assert_eq!(v["caps"]["monthly_tokens"], 90000);
    assert_eq!(v["caps"]["concurrent_jobs"], 3);
    assert_eq!(v["timeout_seconds"], 600);
    assert_eq!(
        t.run(&["config", "--get", "docker.timeout"]).code(0).stdout.trim(),
        "600000"
    );
    // Each window shows when it resets.
    for w in v["usage"].as_array().unwrap() {
        assert!(w["resets_at"].is_string());
    }
    let human = t.run(&["limits"]);
    human
        .code(0)
        .stdout_has("resets")
        .stdout_has("week")
        .stdout_has("month");

    let before = snapshot(&t);
    t.run(&["limits", "--daily", "-3"]).code(2);
    t.run(&["limits", "--concurrent", "1000"])
        .code(2)
        .stderr_has("out of range");
    t.run(&["limits", "--timeout", "soon"]).code(2).stderr_has("seconds");
    assert_eq!(snapshot(&t), before);
    t.run(&["limits", "--weekly", "none"]).code(0);
    assert_eq!(t.run(&["limits", "--json"]).json()["caps"]["weekly_tasks"], Value::Null);
}

#[test]
fn config_is_typed_audited_and_shows_origins() {
    let t = Cmm::new();
    let v = t.run(&["config", "--list", "--json"]).code(0).json();
    let keys = v["keys"].as_array().unwrap();
    let get = |k: &str| keys.iter().find(|e| e["key"] == k).unwrap().clone();
    // Seed-compatible keys; the caps' defaults fit a real Claude Code job
    // (one request carries ~12,000 tokens of system prompt and tools).
    for (k, want) in [
        ("docker.image", serde_json::json!("synaptic-mesh/claude-max:latest")),
        ("docker.memory", serde_json::json!("1g")),
        ("docker.cpuShares", serde_json::json!(512)),
        ("docker.timeout", serde_json::json!(300000)),
        ("limits.dailyTasks", serde_json::json!(25)),
        ("limits.dailyTokens", serde_json::json!(5_000_000)),
        ("limits.maxTokensPerTask", serde_json::json!(500_000)),
        ("limits.maxTurnsPerTask", serde_json::json!(100)),
        ("limits.maxCostPerTask", serde_json::json!(5.0)),
        ("limits.dailyCostUsd", serde_json::json!(25.0)),
        ("limits.weeklyCostUsd", serde_json::Value::Null),
        ("limits.concurrentJobs", serde_json::json!(1)),
        ("security.enableEncryption", serde_json::json!(true)),
        ("security.keyRotationDays", serde_json::json!(30)),
        ("security.maxSessionAge", serde_json::json!(3600000)),
        ("market.defaultPrice", serde_json::json!(5)),
        ("market.maxBidPrice", serde_json::json!(100)),
        ("market.bidTimeout", serde_json::json!(300000)),
        ("market.autoAcceptBids", serde_json::json!(false)),
        ("compliance.requireApproval", serde_json::json!(true)),
        ("compliance.logAllActivity", serde_json::json!(true)),
        ("compliance.enableAuditTrail", serde_json::json!(true)),
        ("compliance.checkInterval", serde_json::json!(3600000)),
    ] {
        assert_eq!(get(k)["value"], want, "{k}");
        assert_eq!(get(k)["origin"], "default", "{k}");
    }
    t.run(&["config", "--set", "limits.dailyTasks=12", "--set", "docker.memory=2g"])
        .code(0)
        .stdout_has("5 -> 12");
    let v = t.run(&["config", "--list", "--json"]).json();
    let k = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "limits.dailyTasks")
        .unwrap()
        .clone();
    assert_eq!(k["value"], 12);
    assert_eq!(k["origin"], "file");
    // Env overrides the file, and --list says so.
    let v = t
        .cmd(&["config", "--list", "--json"])
        .env("CMM_LIMITS_DAILYTASKS", "2")
        .run()
        .code(0)
        .json();
    let k = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "limits.dailyTasks")
        .unwrap()
        .clone();
    assert_eq!(k["value"], 2);
    assert_eq!(k["origin"], "env CMM_LIMITS_DAILYTASKS");
    t.cmd(&["status"])
        .env("CMM_LIMITS_DAILYTASKS", "many")
        .run()
        .code(2)
        .stderr_has("CMM_LIMITS_DAILYTASKS");
    // Audited old -> new.
    let log = t.read("audit.jsonl");
    assert!(
        log.contains(r#""event":"config.changed","key":"limits.dailyTasks","new":12,"old":25"#),
        "{log}"
    );
    t.run(&["config", "--unset", "limits.dailyTasks"]).code(0);
    assert_eq!(t.run(&["config", "--get", "limits.dailyTasks"]).stdout.trim(), "25");
    assert_eq!(t.run(&["config", "--get", "docker.memory"]).stdout.trim(), "2g");
}

#[test]
fn config_bad_input_names_the_problem_and_changes_nothing() {
    let t = Cmm::new();
    t.run(&["config", "--set", "limits.dailyTasks=3"]).code(0);
    let before = snapshot(&t);
    t.run(&["config", "--set", "limits.dailyTasks=abc"])
        .code(2)
        .stderr_has("not a whole number");
    t.run(&["config", "--set", "limits.dailytask=4"])
        .code(2)
        .stderr_has("did you mean `limits.dailyTasks`");
    t.run(&["config", "--get", "docker.imag"])
        .code(2)
        .stderr_has("docker.image");
    t.run(&["config", "--set", "limits.concurrentJobs=0"])
        .code(2)
        .stderr_has("out of range");
    t.run(&["config", "--set", "docker.memory=1k"]).code(2);
    t.run(&["config", "--set", "consent.accepted=true"])
        .code(2)
        .stderr_has("opt-in");
    t.run(&["config", "--set", "nonsense"]).code(2).stderr_has("KEY=VALUE");
    // All or nothing: one bad assignment aborts the good one.
    t.run(&[
        "config",
        "--set",
        "limits.dailyTasks=4",
        "--set",
        "limits.dailyTokens=x",
    ])
    .code(2);
    let v = t
        .run(&["config", "--set", "limits.dailyTasks=abc", "--json"])
        .code(2)
        .json();
    assert_eq!(v["error"]["exit"], 2);
    assert!(v["error"]["hint"].as_str().unwrap().contains("whole number"));
    assert_eq!(snapshot(&t), before);
}

#[test]
fn corrupt_config_is_reported_with_line_and_column_and_left_alone() {
    let t = Cmm::new();
    let bad = "{\n  \"limits\": {\n    \"dailyTasks\": 5,\n  }\n}\n";
    std::fs::write(t.file("config.json"), bad).unwrap();
    for args in [
        &["status"][..],
        &["config", "--set", "limits.dailyTasks=3"],
        &["opt-in", "--accept-terms"],
    ] {
        let out = t.run(args);
        out.code(2).stderr_has("config.json:4:");
        out.stderr_has("left untouched");
    }
    assert_eq!(t.read("config.json"), bad);
    // A wrong type in the file names the key and file.
    std::fs::write(t.file("config.json"), r#"{"limits":{"dailyTasks":"five"}}"#).unwrap();
    t.run(&["status"])
        .code(2)
        .stderr_has("limits.dailyTasks")
        .stderr_has("config.json");
    // health reports it as CRITICAL, not a crash.
    t.run(&["health"]).code(2).stdout_has("CMM CRITICAL");
}

#[test]
fn import_and_export_round_trip_seed_configs() {
    let t = Cmm::new();
    let seed = t.file("seed.json");
    std::fs::write(
        &seed,
        r#"{"docker":{"image":"synaptic-mesh/claude-max:latest","memory":"768m","cpuShares":256,"timeout":600000},
            "limits":{"dailyTasks":8,"dailyTokens":9000,"maxTokensPerTask":1500,"concurrentJobs":2,"someOldKey":1},
            "market":{"defaultPrice":7}}"#,
    )
    .unwrap();
    t.run(&["config", "--import", seed.to_str().unwrap()])
        .code(0)
        .stderr_has("limits.someOldKey");
    assert_eq!(t.run(&["config", "--get", "limits.dailyTokens"]).stdout.trim(), "9000");
    assert_eq!(t.run(&["config", "--get", "docker.memory"]).stdout.trim(), "768m");
    let out = t.file("out.json");
    t.run(&["config", "--export", out.to_str().unwrap()]).code(0);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["limits"]["maxTokensPerTask"], 1500);
    assert_eq!(v["market"]["defaultPrice"], 7);
    t.run(&["config", "--export", out.to_str().unwrap()])
        .code(2)
        .stderr_has("already exists");
    // A bad import changes nothing.
    std::fs::write(&seed, r#"{"limits":{"dailyTasks":-1}}"#).unwrap();
    let before = t.read("config.json");
    t.run(&["config", "--import", seed.to_str().unwrap()]).code(2);
    assert_eq!(t.read("config.json"), before);
}

#[test]
fn state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = Cmm::opted_in();
    t.run(&["config", "--set", "limits.dailyTasks=3"]).code(0);
    for f in ["config.json", "audit.jsonl", "audit.head"] {
        let mode = std::fs::metadata(t.file(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let home = tempfile::tempdir().unwrap();
    let nested = home.path().join("a/b");
    let t2 = Cmm::new().env("CMM_HOME", nested.to_str().unwrap());
    t2.run(&["opt-in", "--accept-terms"]).code(0);
    assert_eq!(std::fs::metadata(&nested).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn logs_tail_since_json_and_follow() {
    let t = Cmm::opted_in();
    for i in 0..5 {
        t.run(&["config", "--set", &format!("limits.dailyTasks={}", i + 1)])
            .code(0);
    }
    let out = t.run(&["logs", "--tail", "2", "--json"]);
    out.code(0);
    let lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["new"], 5);
    // Raw lines are exactly the log's bytes.
    assert!(t
        .read("audit.jsonl")
        .ends_with(&format!("{}\n", out.stdout.lines().last().unwrap())));
    t.run(&["logs"])
        .code(0)
        .stdout_has("consent.granted")
        .stdout_has("config.changed");
    assert_eq!(
        t.run(&["logs", "--since", "1h", "--json"])
            .code(0)
            .stdout
            .lines()
            .count(),
        7
    );
    assert_eq!(
        t.run(&["logs", "--since", "2999-01-01", "--json"])
            .code(0)
            .stdout
            .lines()
            .count(),
        0
    );
    t.run(&["logs", "--since", "yesterday"]).code(2).stderr_has("RFC 3339");

    // --follow prints lines that another process appends. It prints
    // nothing until then, so the test cannot see when it is watching:
    // append (a new value each time) until a line comes.
    let mut child = t.cmd(&["logs", "--follow", "--tail", "0", "--json"]).spawn();
    let mut set = 41;
    let line = wait_some(secs(20), || {
        set += 1;
        t.run(&["config", "--set", &format!("limits.dailyTasks={set}")]).code(0);
        child.stdout_line(std::time::Duration::from_millis(500), |_| true)
    })
    .expect("follow printed the new line");
    child.kill9();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "config.changed");
    assert!((42..=set).contains(&v["new"].as_i64().unwrap()), "{v}");
    // Exactly the bytes of a line in the log.
    assert!(t.read("audit.jsonl").lines().any(|l| l == line), "{line}");
}

fn edit_log(t: &Cmm, f: impl FnOnce(Vec<String>) -> Vec<String>) {
    let lines: Vec<String> = t.read("audit.jsonl").lines().map(str::to_string).collect();
    let mut out = f(lines).join("\n");
    out.push('\n');
    std::fs::write(t.file("audit.jsonl"), out).unwrap();
}

fn log_with_events() -> Cmm {
    let t = Cmm::opted_in();
    for i in 0..6 {
        t.run(&["config", "--set", &format!("limits.dailyTasks={}", i + 1)])
            .code(0);
    }
    t.run(&["audit", "verify"])
        .code(0)
        .stdout_has("audit chain OK: 8 events");
    t
}

#[test]
fn audit_verify_detects_edit_delete_reorder_truncate() {
    // Edit a middle line.
    let t = log_with_events();
    edit_log(&t, |mut l| {
        l[3] = l[3].replace("\"new\":2", "\"new\":9");
        l
    });
    t.run(&["audit", "verify"]).code(5).stderr_has("chain");
    let v = t.run(&["audit", "verify", "--json"]).code(5).json();
    assert_eq!(v["ok"], false);

    // Delete a line.
    let t = log_with_events();
    edit_log(&t, |mut l| {
        l.remove(4);
        l
    });
    t.run(&["audit", "verify"]).code(5).stderr_has("deleted");

    // Swap two lines.
    let t = log_with_events();
    edit_log(&t, |mut l| {
        l.swap(3, 4);
        l
    });
    t.run(&["audit", "verify"]).code(5);

    // Truncate the last lines (checked against audit.head).
    let t = log_with_events();
    edit_log(&t, |mut l| {
        l.truncate(6);
        l
    });
    t.run(&["audit", "verify"]).code(5).stderr_has("truncated");

    // Edit the last line (only the head can tell).
    let t = log_with_events();
    edit_log(&t, |mut l| {
        let n = l.len() - 1;
        l[n] = l[n].replace("\"new\":6", "\"new\":60");
        l
    });
    t.run(&["audit", "verify"]).code(5);
    // Appending onto a tail that no longer chains is refused (exit 5), and
    // neither the log nor the config changes.
    let (log, cfg) = (t.read("audit.jsonl"), t.read("config.json"));
    t.run(&["config", "--set", "limits.dailyTasks=2"]).code(5);
    t.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(5);
    assert_eq!(t.read("audit.jsonl"), log);
    assert_eq!(t.read("config.json"), cfg);
    // Opt-out still takes effect at once, and says it could not be recorded.
    t.run(&["opt-out", "--yes"]).code(5).stderr_has("consent was revoked");
    assert_eq!(t.read("audit.jsonl"), log);
    assert_eq!(t.run(&["status", "--json"]).json()["consent"]["accepted"], false);

    // Remove the log entirely.
    let t = log_with_events();
    std::fs::remove_file(t.file("audit.jsonl")).unwrap();
    t.run(&["audit", "verify"]).code(5).stderr_has("missing");
}

#[test]
fn torn_tail_is_recovered_by_the_next_append() {
    let t = log_with_events();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(t.file("audit.jsonl"))
        .unwrap();
    f.write_all(br#"{"v":1,"seq":8,"ts":"2026-"#).unwrap();
    drop(f);
    t.run(&["audit", "verify"]).code(0).stdout_has("1 crash recoveries");
    let ev = events(&t);
    assert_eq!(ev.last().unwrap(), "log.recovered");
    assert!(std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("audit.torn-")));
}

#[test]
fn audit_report_in_every_format() {
    let t = log_with_events();
    t.run(&["opt-out", "--yes"]).code(0);
    let text = t.run(&["audit"]);
    text.code(0)
        .stdout_has("Consent history (2)")
        .stdout_has("Config changes (6)")
        .stdout_has("Chain: OK")
        .stdout_has("Compliance checks");
    let v = t.run(&["audit", "--format", "json"]).code(0).json();
    assert_eq!(v["summary"]["consent_granted"], 1);
    assert_eq!(v["summary"]["consent_revoked"], 1);
    assert_eq!(v["summary"]["config_changes"], 6);
    assert_eq!(v["chain"]["ok"], true);
    assert!(v["compliance"]["results"].as_array().unwrap().len() >= 9);
    let csv = t.run(&["audit", "--format", "csv"]);
    csv.code(0);
    assert!(csv.stdout.starts_with("section,seq,ts,event,details\n"));
    assert_eq!(csv.stdout.lines().filter(|l| l.starts_with("config,")).count(), 6);
    let out = t.file("report.json");
    t.run(&["audit", "--format", "json", "--output", out.to_str().unwrap()])
        .code(0);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(
        t.run(&["audit", "--since", "2999-01-01", "--format", "json"]).json()["summary"]["events"],
        0
    );
    t.run(&["audit", "--format", "xml"]).code(2);
}

#[test]
fn compliance_check_exit_codes() {
    let t = Cmm::opted_in();
    let v = t.run(&["compliance-check", "--json"]).code(0).json();
    assert_eq!(v["critical"], 0);
    assert!(v["disclaimer"].as_str().unwrap().contains("not legal advice"));
    // A warning: approval turned off.
    t.run(&["config", "--set", "compliance.requireApproval=false"]).code(0);
    t.run(&["compliance-check"]).code(1).stdout_has("WARN");
    // Market jobs on a subscription token: WARNING with the reason.
    let t2 = Cmm::new();
    t2.run(&["opt-in", "--accept-terms", "--claude-jobs"]).code(0);
    let v = t2
        .cmd(&["compliance-check", "--json"])
        .env("CLAUDE_CODE_OAUTH_TOKEN", "x-test-oauth")
        .run()
        .code(1)
        .json();
    let r = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "credential-kind-market")
        .unwrap()
        .clone();
    assert_eq!(r["level"], "WARNING");
    assert!(r["message"].as_str().unwrap().contains("consumer"));
    // Critical: a credential at rest.
    let t3 = Cmm::opted_in();
    t3.run(&["config", "--set", "credentials.tokenCommand=echo sk-ant-oat01-leaked"])
        .code(0);
    t3.run(&["compliance-check"]).code(2).stdout_has("FAIL");
    // Critical: a broken chain.
    let t4 = log_with_events();
    edit_log(&t4, |mut l| {
        l.remove(2);
        l
    });
    t4.run(&["compliance-check"]).code(2);
    // An id without an implementation is an error, not a pass.
    let list = t.file("list.json");
    std::fs::write(
        &list,
        r#"{"version":1,"checks":[{"id":"made-up","name":"x","description":"x","critical":false}]}"#,
    )
    .unwrap();
    t.run(&["compliance-check", "--checklist", list.to_str().unwrap()])
        .code(2)
        .stderr_has("made-up");
}

#[test]
fn health_is_nagios_shaped() {
    // The local checks (config, data dir, audit head, permissions) are read
    // from --json; the Docker-side checks (engine, image, credentials) have
    // their own tests, and on a bare install they rightly warn.
    let level = |v: &Value, name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["level"]
            .clone()
    };
    let t = Cmm::opted_in();
    let out = t.run(&["health"]);
    assert!(out.stdout.starts_with("CMM "), "{}", out.stdout);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    assert!(out.stdout.contains(" | 'audit_events'=2;"), "{}", out.stdout);
    let v = t.run(&["health", "--json"]).json();
    assert_eq!(v["exit"].as_i64().unwrap() as i32, out.status);
    for name in ["config", "data_dir", "audit", "permissions"] {
        assert_eq!(level(&v, name), "OK", "{name}: {v}");
    }
    // Wide permissions: WARNING.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.file("config.json"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let v = t.run(&["health", "--json"]).json();
    assert_eq!(level(&v, "permissions"), "WARNING");
    assert!(v["exit"].as_i64().unwrap() >= 1);
    t.run(&["health"]).stdout_has("0644");
    std::fs::set_permissions(t.file("config.json"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // A broken audit head: CRITICAL.
    let log = t.read("audit.jsonl");
    std::fs::write(t.file("audit.jsonl"), log.replace("consent.granted", "consent.grantex")).unwrap();
    t.run(&["health"]).code(2).stdout_has("CMM CRITICAL");
    // Usage errors are UNKNOWN (3), not 2.
    t.run(&["health", "--bogus"]).code(3);
}

#[test]
fn completions_for_every_shell_and_a_clear_error_otherwise() {
    let t = Cmm::new();
    for sh in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = t.run(&["completions", sh]);
        out.code(0);
        assert!(out.stdout.contains("opt-in"), "{sh}");
    }
    t.run(&["completions", "tcsh"]).code(2).stderr_has("possible values");
    assert!(snapshot(&t).is_empty());
}

#[test]
fn usage_errors_exit_2_with_json_when_asked() {
    let t = Cmm::new();
    t.run(&["no-such-command"]).code(2);
    let v = t.run(&["no-such-command", "--json"]).code(2).json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["exit"], 2);
    t.run(&[]).code(2);
    t.run(&["--help"]).code(0).stdout_has("Exit codes:");
    t.run(&["--version"]).code(0);
}

#[test]
fn output_to_a_closed_pipe_is_not_an_error() {
    let t = Cmm::opted_in();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{BIN}' terms | head -c 1 >/dev/null; exit ${{PIPESTATUS:-0}}"))
        .env("CMM_HOME", t.path())
        .status()
        .unwrap();
    assert!(status.success());
}
