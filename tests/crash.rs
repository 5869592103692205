//! Crash safety: `kill -9` processes in the middle of config writes and
//! audit appends, hundreds of times; afterwards the config parses and the
//! audit chain verifies (a recovered torn tail is allowed and is itself a
//! chained event).
//!
//! Two kinds of victims: our real binary running state-changing commands,
//! and a writer that loops over the same library calls without pause (this
//! test binary re-executed), which is killed mid-write far more often.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use claude_max_market::{audit::AuditLog, config, Paths};
use rand::Rng;

const CHILD_ENV: &str = "CMM_CRASH_WRITER";

/// Child mode: write forever until killed.
#[test]
#[ignore = "run only as a child of kill_9_during_writes"]
fn crash_writer_child() {
    let Ok(home) = std::env::var(CHILD_ENV) else { return };
    let paths = Paths::in_one_dir(home.into());
    let log = AuditLog::new(&paths);
    let d = config::def("limits.dailyTasks").unwrap();
    for i in 0u64.. {
        let v = serde_json::Value::from(i % 1000);
        config::edit(&paths, |f| {
            config::set_in(f, d.key, Some(v.clone()));
            Ok(())
        })
        .unwrap();
        log.append(
            claude_max_market::audit::Event::ConfigChanged,
            serde_json::json!({ "key": d.key, "new": v, "via": "crash-test" }),
        )
        .unwrap();
    }
}

#[test]
fn kill_9_during_writes() {
    let t = Cmm::opted_in();
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    let mut landed = 0;

    // The library writer: killed at random points of its endless loop. The
    // kill waits until the writer is visibly appending (the log grew), so
    // every kill lands mid-stream, however slow the machine is today.
    let exe = std::env::current_exe().unwrap();
    let log_len = || std::fs::metadata(t.file("audit.jsonl")).map(|m| m.len()).unwrap_or(0);
    for i in 0..160 {
        let before = log_len();
        let child = Command::new(&exe)
            .args(["--exact", "crash_writer_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, t.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until_every(Duration::from_secs(10), Duration::from_micros(200), || {
            log_len() > before
        });
        if kill_after(child, Duration::from_micros(rng.gen_range(0..4_000))) {
            landed += 1;
        }
        if i % 40 == 0 {
            t.run(&["config", "--get", "limits.dailyTasks"]).code(0);
        }
    }

    // The real binary: state-changing commands killed at random moments.
    for i in 0..140 {
        let args: Vec<String> = match i % 3 {
            0 => vec![
                "config".into(),
                "--set".into(),
                format!("limits.dailyTokens={}", 5000 + i),
            ],
            1 => vec![
                "opt-in".into(),
                "--accept-terms".into(),
                "--max-daily".into(),
                format!("{}", 1 + i % 9),
            ],
            _ => vec!["limits".into(), "--weekly".into(), format!("{}", 10 + i)],
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = t.cmd(&argv).spawn_silent();
        if kill_after(child, Duration::from_micros(rng.gen_range(500..6_000))) {
            landed += 1;
        }
    }
    eprintln!("{landed} kills landed on running writers in {:?}", started.elapsed());
    assert!(landed >= 200, "only {landed} kills landed on a running process");

    // The config parses, the chain verifies (after recovering a torn tail if
    // the last kill left one), and the tool still works.
    t.run(&["config", "--list", "--json"]).code(0);
    t.run(&["audit", "verify"]).code(0);
    t.run(&["config", "--set", "limits.dailyTasks=3"]).code(0);
    t.run(&["audit", "verify"]).code(0);
    let h = t.run(&["health", "--json"]).json();
    for c in h["checks"].as_array().unwrap() {
        if ["config", "data_dir", "audit", "permissions", "usage"].contains(&c["name"].as_str().unwrap()) {
            assert_eq!(c["level"], "OK", "{c}");
        }
    }
    let v = t.run(&["status", "--json"]).code(0).json();
    assert!(v["audit"]["events"].as_u64().unwrap() >= 160);
}
