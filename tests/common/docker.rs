//! The Docker part of the harness: the fake-claude test image (built with
//! our own `docker build --context`, from scratch), small `docker` CLI
//! helpers to look at what the engine really holds, and readers of what a
//! job left in its install (audit events, job records, usage).
//!
//! It only looks and builds the fixture image; it never runs a job itself.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::common::{wait_some, Cmm, Run};

pub const FAKE_IMAGE: &str = "cmm-fake-claude:test";
pub const LABEL: &str = "dev.claude-max-market.managed";
pub const JOB_LABEL: &str = "dev.claude-max-market.job";
pub const INSTALL_LABEL: &str = "dev.claude-max-market.install";
pub const TOKEN: &str = "sk-ant-oat01-test-token-not-a-secret";

static BUILD: Mutex<()> = Mutex::new(());

/// Where the static busybox comes from (`apt-get install busybox-static`).
fn busybox() -> PathBuf {
    let p = std::env::var_os("CMM_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    assert!(
        p.is_file(),
        "{} is missing: install a static busybox (`apt-get install -y busybox-static`) or set CMM_BUSYBOX",
        p.display()
    );
    p
}

/// Label on the fixture image naming the fixture's content, so an image
/// built from an older fixture (a changed fake `claude` or entrypoint) is
/// rebuilt instead of reused.
const FIXTURE_LABEL: &str = "dev.claude-max-market.test-fixture";

/// The fixture directory plus busybox, in a temp dir (symlinks followed),
/// and the hash of its files.
pub fn fixture_context() -> (tempfile::TempDir, String) {
    use sha2::{Digest, Sha256};
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-claude");
    let dir = tempfile::tempdir().expect("temp context");
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .expect("fixture dir")
        .map(|e| e.expect("fixture entry").file_name())
        .collect();
    names.sort();
    let mut h = Sha256::new();
    // `fs::copy` keeps the executable bits the image needs.
    for n in &names {
        h.update(n.as_encoded_bytes());
        h.update(std::fs::read(src.join(n)).expect("read fixture file"));
        std::fs::copy(src.join(n), dir.path().join(n)).expect("copy fixture file");
    }
    h.update(std::fs::read(busybox()).expect("read busybox"));
    std::fs::copy(busybox(), dir.path().join("busybox")).expect("copy busybox");
    let hash = hex::encode(&h.finalize()[..8]);
    let dockerfile = dir.path().join("Dockerfile");
    let mut text = std::fs::read_to_string(&dockerfile).expect("fixture Dockerfile");
    text.push_str(&format!("LABEL {FIXTURE_LABEL}={hash}\n"));
    std::fs::write(&dockerfile, text).expect("write Dockerfile");
    (dir, hash)
}

/// Make sure the test image exists, building it with `docker build --context`.
pub fn fake_image() -> &'static str {
    build_fixture_image(FAKE_IMAGE);
    FAKE_IMAGE
}

/// The fake-claude image the market tests' providers run, tagged by the
/// fixture's content so a changed fixture is rebuilt rather than a stale
/// image reused.
pub fn market_image() -> String {
    use sha2::{Digest, Sha256};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-claude");
    let mut h = Sha256::new();
    for f in ["Dockerfile", "claude", "entrypoint.sh"] {
        h.update(std::fs::read(dir.join(f)).expect("fixture file"));
    }
    let tag = format!("cmm-fake-claude:fed-{}", &hex::encode(h.finalize())[..12]);
    build_fixture_image(&tag);
    tag
}

pub fn build_fixture_image(tag: &str) {
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let (ctx, hash) = fixture_context();
    let (_, label, _) = docker(&[
        "image",
        "inspect",
        "--format",
        &format!("{{{{index .Config.Labels \"{FIXTURE_LABEL}\"}}}}"),
        tag,
    ]);
    if label.trim() == hash {
        return;
    }
    let t = Cmm::new();
    t.run(&[
        "docker",
        "build",
        "--context",
        ctx.path().to_str().unwrap(),
        "--tag",
        tag,
    ])
    .code(0)
    .stdout_has("Built");
}

pub fn docker(args: &[&str]) -> (bool, String, String) {
    let o = Command::new("docker").args(args).output().expect("run docker CLI");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn image_exists(tag: &str) -> bool {
    docker(&["image", "inspect", tag]).0
}

/// Containers (any state) carrying our job label for `job_id`.
pub fn containers_of_job(job_id: &str) -> Vec<String> {
    let (_, out, _) = docker(&["ps", "-aq", "--filter", &format!("label={JOB_LABEL}={job_id}")]);
    out.split_whitespace().map(str::to_string).collect()
}

/// Every container (any state) with our label.
pub fn our_containers() -> Vec<String> {
    let (_, out, _) = docker(&["ps", "-aq", "--filter", &format!("label={LABEL}=true")]);
    out.split_whitespace().map(str::to_string).collect()
}

/// This install's id: its audit log's id, which its job containers carry.
pub fn install_id(t: &Cmm) -> String {
    let head: Value = serde_json::from_str(&t.read("audit.head")).expect("audit.head is JSON");
    head["log_id"].as_str().expect("log_id").to_string()
}

/// `execute --json --approve-all` of `prompt` on the fake image, plus `extra`.
pub fn fake_execute(t: &Cmm, prompt: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "execute",
        "--json",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        prompt,
    ];
    args.extend_from_slice(extra);
    t.cmd(&args)
}

/// An opted-in install whose commands see a subscription token.
pub fn job_env() -> Cmm {
    Cmm::opted_in().env("CLAUDE_CODE_OAUTH_TOKEN", TOKEN)
}

/// Audit events, parsed.
pub fn audit_events(t: &Cmm) -> Vec<Value> {
    t.read("audit.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

pub fn events_named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

pub fn job_record(t: &Cmm, job_id: &str) -> Value {
    serde_json::from_str(&t.read(&format!("jobs/{job_id}.json"))).expect("job record is JSON")
}

/// The one terminal event for `job_id`, asserting there is exactly one.
#[track_caller]
pub fn terminal_event(t: &Cmm, job_id: &str) -> Value {
    let events = audit_events(t);
    let terminal: Vec<&Value> = events
        .iter()
        .filter(|e| e["job_id"] == job_id)
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("job.completed" | "job.failed" | "job.killed" | "job.cancelled")
            )
        })
        .collect();
    assert_eq!(
        terminal.len(),
        1,
        "exactly one terminal event for {job_id}: {terminal:?}"
    );
    terminal[0].clone()
}

/// Usage state: (tasks today, tokens today, open reservations).
pub fn usage_today(t: &Cmm) -> (u64, u64, usize) {
    let v: Value = serde_json::from_str(&t.read("usage.json")).unwrap_or(Value::Null);
    let (mut tasks, mut tokens) = (0, 0);
    if let Some(days) = v["days"].as_object() {
        for d in days.values() {
            tasks += d["tasks"].as_u64().unwrap_or(0);
            tokens += d["tokens"].as_u64().unwrap_or(0);
        }
    }
    (
        tasks,
        tokens,
        v["reservations"].as_array().map(|a| a.len()).unwrap_or(0),
    )
}

/// Where `execute` keeps this user's relay copies and proxy sockets.
pub fn relay_base() -> PathBuf {
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("claude-max-market"),
        _ => std::env::temp_dir().join(format!("claude-max-market-{}", uid.trim())),
    }
}

/// The ids of this install's started jobs, in order.
pub fn started_jobs(t: &Cmm) -> Vec<String> {
    events_named(&audit_events(t), "job.started")
        .iter()
        .map(|e| e["job_id"].as_str().expect("job_id").to_string())
        .collect()
}

/// Wait until job number `nth` (from 0) of this install has started and
/// its container exists; returns (job id, container id).
#[track_caller]
pub fn wait_for_job_container(t: &Cmm, nth: usize, secs: u64) -> (String, String) {
    wait_some(Duration::from_secs(secs), || {
        let id = started_jobs(t).into_iter().nth(nth)?;
        let c = containers_of_job(&id).into_iter().next()?;
        Some((id, c))
    })
    .unwrap_or_else(|| panic!("the container of job {nth} never appeared within {secs}s"))
}
