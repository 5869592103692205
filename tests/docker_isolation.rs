//! What the engine really holds while and after jobs run: the canary
//! credential appears nowhere, every hardening item is in `docker inspect`,
//! caps hold under 20 parallel processes, opt-out and clean remove exactly
//! our containers. Tests here take turns: they count containers globally.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::sync::Mutex;

use common::{docker_available, secs, wait_some, wait_until, Cmm, Spawned};
use docker::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_execute(t: &Cmm, prompt: &str) -> Spawned {
    fake_execute(t, prompt, &[]).spawn()
}

/// Wait for the job's container; returns (job id, container id).
fn wait_for_container(t: &Cmm) -> (String, String) {
    wait_for_job_container(t, 0, 30)
}

fn all_files(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap_or_default()));
        }
    }
}

#[test]
fn the_canary_token_appears_nowhere_and_the_container_is_hardened() {
    if !docker_available("the_canary_token_appears_nowhere_and_the_container_is_hardened") {
        return;
    }
    let _turn = turn();
    fake_image();
    let canary = format!("sk-ant-oat01-CANARY-{}", hex::encode(rand_bytes()));
    let t = Cmm::opted_in().env("CLAUDE_CODE_OAUTH_TOKEN", &canary);
    let child = spawn_execute(&t, "scenario:canary");
    // The job holds its container for a few seconds; a busy engine can list a
    // container a moment before it answers `inspect` for it, so retry briefly.
    let mut err = String::new();
    let (job_id, inspect) = wait_some(secs(30), || {
        let (job_id, cid) = wait_for_container(&t);
        let (ok, inspect, e) = docker(&["inspect", &cid]);
        err = e;
        ok.then_some((job_id, inspect))
    })
    .unwrap_or_else(|| panic!("docker inspect: {err}"));
    let out = child.wait();
    let (stdout, stderr) = (out.stdout, out.stderr);
    assert_eq!(out.status, 0, "{stdout}\n{stderr}");

    // The fake claude proves it got the token, by hash, in the right variable.
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let sha = hex::encode(Sha256::digest(canary.as_bytes()));
    assert_eq!(
        v["result"],
        format!("credential-sha256={sha} var=CLAUDE_CODE_OAUTH_TOKEN both=no")
    );

    // Nowhere else.
    let (_, history, _) = docker(&["history", "--no-trunc", FAKE_IMAGE]);
    let (_, image_inspect, _) = docker(&["image", "inspect", FAKE_IMAGE]);
    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("docker inspect".into(), inspect.clone().into_bytes()),
        ("docker history".into(), history.into_bytes()),
        ("docker image inspect".into(), image_inspect.into_bytes()),
        ("stdout".into(), stdout.into_bytes()),
        ("stderr".into(), stderr.into_bytes()),
    ];
    all_files(t.path(), &mut haystacks);
    assert!(haystacks.iter().any(|(n, _)| n.ends_with(&format!("{job_id}.json"))));
    assert!(haystacks.iter().any(|(n, _)| n.ends_with("audit.jsonl")));
    assert!(haystacks.iter().any(|(n, _)| n.ends_with("config.json")));
    for (name, bytes) in &haystacks {
        assert!(
            memchr::memmem::find(bytes, canary.as_bytes()).is_none(),
            "the canary token leaked into {name}"
        );
        // Not even the distinctive part on its own.
        assert!(
            memchr::memmem::find(bytes, &canary.as_bytes()[12..]).is_none(),
            "partial leak into {name}"
        );
    }

    // compliance-check agrees, with the token still in the environment.
    let v = t.run(&["compliance-check", "--json"]).json();
    let at_rest = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "no-credentials-at-rest")
        .unwrap()
        .clone();
    assert_eq!(at_rest["level"], "OK", "{at_rest}");

    // Every hardening item, as the engine holds it.
    let c: Value = serde_json::from_str::<Value>(&inspect).unwrap()[0].clone();
    let h = &c["HostConfig"];
    assert_eq!(c["Config"]["User"], "10001:10001", "non-root user");
    assert_eq!(h["ReadonlyRootfs"], true);
    for (mount, size) in [("/tmp", "size=64m"), ("/home/claude", "size=128m")] {
        let opts = h["Tmpfs"][mount]
            .as_str()
            .unwrap_or_else(|| panic!("no tmpfs at {mount}: {h}"));
        for want in ["noexec", "nosuid", size] {
            assert!(opts.split(',').any(|o| o == want), "{mount} tmpfs lacks {want}: {opts}");
        }
    }
    assert_eq!(h["Memory"], 1024 * 1024 * 1024);
    assert_eq!(h["MemorySwap"], h["Memory"], "memory = memory-swap");
    assert_eq!(h["CpuShares"], 512);
    assert_eq!(h["NanoCpus"], 2_000_000_000i64, "CPU cap");
    assert_eq!(h["PidsLimit"], 256);
    assert_eq!(h["CapDrop"], serde_json::json!(["ALL"]));
    assert!(h["CapAdd"].is_null() || h["CapAdd"].as_array().unwrap().is_empty());
    assert!(h["SecurityOpt"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s.as_str().unwrap().starts_with("no-new-privileges")));
    assert_eq!(h["Privileged"], false);
    // No host mounts but the egress relay's two, both read-only: its
    // files and the job's proxy socket.
    let binds: Vec<&str> = h["Binds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert_eq!(binds.len(), 2, "{binds:?}");
    assert!(
        binds[0].ends_with(":/.cmm:ro") && binds[0].contains("/relay-"),
        "{binds:?}"
    );
    assert!(
        binds[1].ends_with(&format!("egress-{job_id}.sock:/.cmm-egress.sock:ro")),
        "{binds:?}"
    );
    let mounts = c["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert!(mounts.iter().all(|m| m["RW"] == false), "{mounts:?}");
    // Restricted egress (the default): no network at all, the relay to the
    // proxy as the only way out, no IPv6.
    assert_eq!(h["NetworkMode"], "none");
    assert_eq!(h["Sysctls"]["net.ipv6.conf.all.disable_ipv6"], "1");
    assert!(c["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap() == "HTTPS_PROXY=http://127.0.0.1:3128"));
    let entrypoint: Vec<&str> = c["Config"]["Entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(entrypoint.contains(&"__egress-relay"), "{entrypoint:?}");
    assert_eq!(
        entrypoint.last(),
        Some(&"/usr/local/bin/entrypoint.sh"),
        "then the image's own entrypoint: {entrypoint:?}"
    );
    assert_eq!(c["Config"]["Labels"][LABEL], "true");
    assert_eq!(c["Config"]["Labels"][JOB_LABEL], job_id.as_str());
    assert_eq!(c["Config"]["Labels"][INSTALL_LABEL], install_id(&t).as_str());
    // The model, then the job's own limits for Claude Code: nothing secret.
    assert_eq!(
        c["Config"]["Cmd"],
        serde_json::json!([
            "sonnet",
            "--include-partial-messages",
            "--max-turns",
            "100",
            "--permission-mode",
            "default",
            "--max-budget-usd",
            "5"
        ])
    );
    assert_eq!(c["Config"]["Tty"], false);
    assert_eq!(c["Config"]["StdinOnce"], true);
    assert!(containers_of_job(&job_id).is_empty());
}

/// Remove every relay copy in this user's relay directory (read-only
/// files: made writable first).
fn remove_relay_copies() {
    let base = relay_base();
    let Ok(entries) = std::fs::read_dir(&base) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("relay-") {
            let ok = std::process::Command::new("chmod")
                .args(["-R", "u+w"])
                .arg(e.path())
                .status()
                .unwrap()
                .success();
            assert!(ok);
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    use std::io::Read;
    (&f).read_exact(&mut b).unwrap();
    b
}

#[test]
fn twenty_parallel_jobs_with_a_daily_cap_of_five_run_exactly_five() {
    if !docker_available("twenty_parallel_jobs_with_a_daily_cap_of_five_run_exactly_five") {
        return;
    }
    let _turn = turn();
    fake_image();
    let t = job_env();
    t.run(&["limits", "--daily", "5", "--concurrent", "20", "--tokens", "10000000"])
        .code(0);
    // Start with no copy of the egress relay, so the jobs that get through
    // race to make it (the losers must use the winner's, never a half-made
    // one). The isolation tests take turns, so no job of ours uses it now.
    remove_relay_copies();
    let children: Vec<Spawned> = (0..20)
        .map(|i| spawn_execute(&t, &format!("scenario:ok job {i}")))
        .collect();
    let mut codes: Vec<i32> = Vec::new();
    for c in children {
        let out = c.wait();
        let code = out.status;
        if code != 0 && code != 3 {
            panic!("unexpected exit {code}: {}", out.stderr);
        }
        codes.push(code);
    }
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 3).count(), 15, "{codes:?}");
    assert_eq!(usage_today(&t), (5, 5 * 12064, 0));
    let events = audit_events(&t);
    assert_eq!(events_named(&events, "job.started").len(), 5);
    assert_eq!(events_named(&events, "job.completed").len(), 5);
    t.run(&["audit", "verify"]).code(0);
    let status = t.run(&["status", "--json"]).code(0).json();
    let day = &status["usage"]["windows"][0];
    assert_eq!(day["window"], "day");
    assert_eq!(day["tasks"], 5, "status shows 5 jobs: {status}");
    assert_eq!(day["tokens"], 5 * 12064);
    assert_eq!(status["usage"]["reservations"], serde_json::json!([]));
    // No container left by any of this test's jobs (other tests may be
    // running jobs of their own on the same engine).
    let jobs: Vec<String> = events_named(&events, "job.started")
        .iter()
        .map(|e| e["job_id"].as_str().unwrap().to_string())
        .collect();
    let left = |jobs: &[String]| jobs.iter().flat_map(|j| containers_of_job(j)).collect::<Vec<_>>();
    wait_until(secs(10), || left(&jobs).is_empty());
    assert!(left(&jobs).is_empty(), "no container left: {:?}", left(&jobs));
}

#[test]
fn opt_out_stops_running_job_containers() {
    if !docker_available("opt_out_stops_running_job_containers") {
        return;
    }
    let _turn = turn();
    fake_image();
    let t = job_env();
    let child = spawn_execute(&t, "scenario:hang");
    let (job_id, _) = wait_for_container(&t);
    let v = t.run(&["opt-out", "--yes", "--json"]).code(0).json();
    assert_eq!(v["containers_stopped"], 1);
    assert!(containers_of_job(&job_id).is_empty());
    let out = child.wait();
    assert_eq!(out.status, 1, "{}{}", out.stdout, out.stderr);
    let terminal = terminal_event(&t, &job_id);
    assert_eq!(terminal["event"], "job.failed");
    assert!(job_record(&t, &job_id)["error"]
        .as_str()
        .unwrap()
        .contains("stopped from outside"));
    // And nothing runs now.
    t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--prompt",
        "scenario:ok",
    ])
    .code(3);
    // Refused before any container: no second job started, none left.
    assert_eq!(events_named(&audit_events(&t), "job.started").len(), 1);
    assert!(containers_of_job(&job_id).is_empty());
}

#[test]
fn a_job_of_one_install_outlives_another_install_s_opt_out_and_clean() {
    if !docker_available("a_job_of_one_install_outlives_another_install_s_opt_out_and_clean") {
        return;
    }
    let _turn = turn();
    fake_image();
    let a = job_env();
    let b = job_env();
    let child = spawn_execute(&a, "scenario:hang");
    let (job_id, _) = wait_for_container(&a);
    // Home B opts out and cleans by force: A's job is not B's.
    let v = b.run(&["opt-out", "--yes", "--json"]).code(0).json();
    assert_eq!(v["containers_stopped"], 0);
    let v = b.run(&["clean", "--force", "--json"]).code(0).json();
    assert_eq!(v["containers_removed"], 0);
    assert!(!containers_of_job(&job_id).is_empty(), "A's job still runs");
    // `health` and `status` of B see no job of theirs; A's health sees one.
    b.run(&["health"]).stdout_has("'running_jobs'=0");
    a.run(&["health"]).stdout_has("'running_jobs'=1");
    // A's own opt-out stops it.
    let v = a.run(&["opt-out", "--yes", "--json"]).code(0).json();
    assert_eq!(v["containers_stopped"], 1);
    let out = child.wait();
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(containers_of_job(&job_id).is_empty());
    // The container carried A's install id.
    assert_eq!(job_record(&a, &job_id)["status"], "failed");
}

#[test]
fn clean_removes_only_what_carries_our_label() {
    if !docker_available("clean_removes_only_what_carries_our_label") {
        return;
    }
    let _turn = turn();
    fake_image();
    let ours = "cmm-clean-test:1";
    build_fixture_image(ours);
    let suffix = hex::encode(rand_bytes());
    // A foreign image and containers whose names say "claude".
    let foreign_image = format!("foreign-claude-lookalike:{suffix}");
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::env::var("CMM_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into()),
        ctx.path().join("busybox"),
    )
    .unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\", \"sleep\", \"300\"]\n",
    )
    .unwrap();
    let (ok, _, err) = docker(&["build", "-q", "-t", &foreign_image, ctx.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    let foreign_stopped = format!("claude-foreign-stopped-{suffix}");
    let foreign_running = format!("claude-foreign-running-{suffix}");
    assert!(docker(&["create", "--name", &foreign_stopped, &foreign_image]).0);
    assert!(docker(&["run", "-d", "--name", &foreign_running, &foreign_image]).0);
    // Leftovers of this install: one stopped, one running; and a running
    // one of another install (another home or user on the same engine).
    let t = Cmm::opted_in();
    let install = format!("{INSTALL_LABEL}={}", install_id(&t));
    let label = format!("{LABEL}=true");
    // A job that crashed long ago: exited, not running.
    assert!(
        docker(&[
            "run",
            "--label",
            &label,
            "--label",
            &install,
            "--entrypoint",
            "/bin/true",
            ours
        ])
        .0
    );
    assert!(
        docker(&[
            "run",
            "-d",
            "--label",
            &label,
            "--label",
            &install,
            "--entrypoint",
            "/bin/sleep",
            ours,
            "300"
        ])
        .0
    );
    let other = format!("cmm-other-install-{suffix}");
    assert!(
        docker(&[
            "run",
            "-d",
            "--name",
            &other,
            "--label",
            &label,
            "--label",
            &format!("{INSTALL_LABEL}=0123456789abcdef0123456789abcdef"),
            "--entrypoint",
            "/bin/sleep",
            ours,
            "300"
        ])
        .0
    );

    let v = t.run(&["clean", "--json"]).code(0).json();
    assert_eq!(v["containers_removed"], 1);
    assert_eq!(v["containers_running_kept"], 1);
    let v = t.run(&["clean", "--force", "--json"]).code(0).json();
    assert_eq!(v["containers_removed"], 1);
    assert!(
        docker(&["inspect", &other]).0,
        "another install's job is not ours to clean"
    );
    // The explicit way to touch every install's.
    let v = t.run(&["clean", "--force", "--all-installs", "--json"]).code(0).json();
    assert!(v["containers_removed"].as_u64().unwrap() >= 1, "{v}");
    assert!(!docker(&["inspect", &other]).0);
    let out = t.run(&["clean", "--images", "--force"]);
    out.code(0).stdout_has("image(s)");
    assert!(!image_exists(ours), "our image removed");
    // Foreign things untouched.
    for name in [&foreign_stopped, &foreign_running] {
        assert!(docker(&["inspect", name]).0, "foreign container {name} was touched");
    }
    assert!(image_exists(&foreign_image));
    let (_, state, _) = docker(&["inspect", "-f", "{{.State.Running}}", &foreign_running]);
    assert_eq!(state.trim(), "true");
    docker(&["rm", "-f", &foreign_stopped, &foreign_running]);
    docker(&["rmi", "-f", &foreign_image]);
    // Later tests get the test image back.
    fake_image();
}
