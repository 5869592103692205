//! `execute --workspace DIR` against the real Docker engine: DIR is copied
//! in (never mounted), the fake `claude` edits it, and its changes come back
//! as a patch made on the host; `--apply` writes them into DIR only if DIR
//! is unchanged. Refusals happen before anything runs.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{docker_available, secs, wait_some, wait_until, Cmm, Output, Run};
use docker::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `execute` of `prompt` on the fake image with `dir` as its workspace.
fn ws_execute(t: &Cmm, dir: &Path, prompt: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--workspace", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    fake_execute(t, prompt, &args)
}

fn execute(t: &Cmm, dir: &Path, prompt: &str, extra: &[&str]) -> Output {
    ws_execute(t, dir, prompt, extra).run()
}

/// A small project: tracked files, an ignored build directory, a `.git`.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(p.join("README.md"), "# A project\n").unwrap();
    std::fs::write(p.join("delete-me.txt"), "old\n").unwrap();
    std::fs::write(p.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::write(p.join(".gitignore"), "target/\n").unwrap();
    std::fs::create_dir_all(p.join("target")).unwrap();
    std::fs::write(p.join("target/built.o"), "object code").unwrap();
    std::fs::create_dir_all(p.join(".git")).unwrap();
    std::fs::write(p.join(".git/config"), "[core]\n").unwrap();
    d
}

/// Every file under `dir` with its content hash and mode, for "unchanged".
fn tree(dir: &Path) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                out.push((
                    e.path().strip_prefix(dir).unwrap().display().to_string(),
                    hex::encode(Sha256::digest(&bytes)),
                    m.permissions().mode() & 0o777,
                ));
            }
        }
    }
    out.sort();
    out
}

fn change<'a>(changes: &'a Value, path: &str) -> &'a Value {
    changes["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("no change for {path}: {changes:#}"))
}

#[test]
fn a_workspace_job_edits_a_copy_and_its_changes_come_back_as_a_patch() {
    if !docker_available("a_workspace_job_edits_a_copy_and_its_changes_come_back_as_a_patch") {
        return;
    }
    fake_image();
    let t = job_env();
    let dir = project();
    let before = tree(dir.path());
    let out = execute(&t, dir.path(), "scenario:workspace", &[]);
    out.code(0);
    let r = out.json();
    // The job saw the selection (no ignored build output, no .git), in
    // /workspace, and ran in acceptEdits.
    let said = r["result"].as_str().unwrap();
    assert!(said.contains("cwd=/workspace"), "{said}");
    for seen in ["README.md", "delete-me.txt", "run.sh", ".gitignore"] {
        assert!(said.contains(seen), "{seen} missing: {said}");
    }
    assert!(!said.contains("target") && !said.contains(".git "), "{said}");
    assert_eq!(r["permission_mode"], "acceptEdits");
    // DIR itself is untouched.
    assert_eq!(tree(dir.path()), before, "DIR is never touched without --apply");
    // The change set, made on the host.
    let c = &r["changes"];
    assert_eq!(change(c, "added.txt")["change"], "added");
    assert_eq!(change(c, "src/new.rs")["change"], "added");
    assert_eq!(change(c, "README.md")["change"], "modified");
    assert_eq!(change(c, "delete-me.txt")["change"], "deleted");
    assert_eq!(change(c, "blob.bin")["binary"], true);
    assert!(c["summary"].as_str().unwrap().contains("added"), "{c:#}");
    // The patch: 0600, shown by `logs --job ID --patch`, audited by hash,
    // and accepted by `git apply` on a copy of DIR.
    let id = r["job_id"].as_str().unwrap();
    let patch_file = t.file(&format!("jobs/{id}.patch"));
    let patch = std::fs::read(&patch_file).unwrap();
    assert_eq!(
        std::fs::metadata(&patch_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let shown = t.run(&["logs", "--job", id, "--patch"]);
    shown.code(0);
    assert_eq!(shown.stdout.as_bytes(), &patch[..]);
    let sha = hex::encode(Sha256::digest(&patch));
    assert_eq!(c["patch"]["sha256"], sha.as_str());
    let terminal = terminal_event(&t, id);
    assert_eq!(terminal["patch_sha256"], sha.as_str());
    assert!(terminal["files_changed"].as_u64().unwrap() >= 5);
    assert!(
        !t.read("audit.jsonl").contains("a line from the job"),
        "no content in the log"
    );
    let copy = tempfile::tempdir().unwrap();
    for (rel, _, _) in &before {
        let to = copy.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(dir.path().join(rel), &to).unwrap();
    }
    let patch_path = patch_file.to_str().unwrap().to_string();
    let git = Command::new("git")
        .args(["apply", "--check", &patch_path])
        .current_dir(copy.path())
        .output()
        .unwrap();
    assert!(
        git.status.success(),
        "git apply --check: {}",
        String::from_utf8_lossy(&git.stderr)
    );
    // Human output: the summary and where the patch is, on stderr.
    let out = t.run(&[
        "execute",
        "--approve-all",
        "--image",
        FAKE_IMAGE,
        "--workspace",
        dir.path().to_str().unwrap(),
        "--prompt",
        "scenario:workspace",
    ]);
    out.code(0).stderr_has("workspace:").stderr_has("patch saved to");
    assert!(out.stdout.starts_with("edited"), "{}", out.stdout);
    assert!(containers_of_job(id).is_empty());
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn apply_writes_the_changes_into_an_unchanged_dir_and_refuses_a_changed_one() {
    if !docker_available("apply_writes_the_changes_into_an_unchanged_dir_and_refuses_a_changed_one") {
        return;
    }
    fake_image();
    let t = job_env();
    let dir = project();
    let out = execute(&t, dir.path(), "scenario:workspace", &["--apply"]);
    out.code(0);
    let r = out.json();
    let p = dir.path();
    assert_eq!(
        std::fs::read_to_string(p.join("added.txt")).unwrap(),
        "added by the job\n"
    );
    assert!(std::fs::read_to_string(p.join("README.md"))
        .unwrap()
        .ends_with("a line from the job\n"));
    assert!(!p.join("delete-me.txt").exists());
    assert_eq!(std::fs::read(p.join("blob.bin")).unwrap(), b"\x00\x01\x02binary");
    assert_eq!(
        std::fs::read_to_string(p.join("target/built.o")).unwrap(),
        "object code",
        "ignored files stay"
    );
    assert!(r["workspace"]["applied"]["written"].as_array().unwrap().len() >= 4);
    let events = audit_events(&t);
    let applied = events_named(&events, "workspace.applied");
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0]["patch_sha256"], r["changes"]["patch"]["sha256"]);

    // DIR changes while the job runs: nothing is applied, the patch is kept.
    let dir = project();
    let run = ws_execute(&t, dir.path(), "scenario:workspace pause=3", &["--apply"]);
    let child = run.spawn();
    assert!(
        wait_until(secs(30), || started_jobs(&t).len() >= 2),
        "job never started"
    );
    std::fs::write(dir.path().join("README.md"), "# edited by the user meanwhile\n").unwrap();
    let out = child.wait();
    assert_eq!(out.status, 3, "{}", out.stderr);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["status"], "completed");
    assert!(
        r["workspace"]["apply_error"]
            .as_str()
            .unwrap()
            .contains("changed since"),
        "{r:#}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
        "# edited by the user meanwhile\n"
    );
    assert!(!dir.path().join("added.txt").exists(), "nothing applied");
    assert!(
        t.file(&format!("jobs/{}.patch", r["job_id"].as_str().unwrap()))
            .exists(),
        "the patch is kept"
    );
    assert_eq!(events_named(&audit_events(&t), "workspace.applied").len(), 1);
}

#[test]
fn a_workspace_that_cannot_be_copied_is_refused_before_anything_runs() {
    if !docker_available("a_workspace_that_cannot_be_copied_is_refused_before_anything_runs") {
        return;
    }
    fake_image();
    let t = job_env();
    let nothing_ran = |t: &Cmm| {
        assert!(events_named(&audit_events(t), "job.started").is_empty());
        assert_eq!(usage_today(t), (0, 0, 0));
    };
    // A link that leads outside.
    let d = project();
    std::os::unix::fs::symlink("/etc/passwd", d.path().join("passwd")).unwrap();
    execute(&t, d.path(), "scenario:workspace", &[])
        .code(2)
        .stdout_has("outside the workspace");
    nothing_ran(&t);
    // A link inside is fine (copied as a link).
    std::fs::remove_file(d.path().join("passwd")).unwrap();
    std::os::unix::fs::symlink("README.md", d.path().join("readme-link")).unwrap();
    // A special file.
    let fifo = d.path().join("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    execute(&t, d.path(), "scenario:workspace", &[])
        .code(2)
        .stdout_has("pipe");
    nothing_ran(&t);
    std::fs::remove_file(&fifo).unwrap();
    // Over the limit (after excludes: the ignored target/ does not count).
    t.run(&["config", "--set", "docker.workspaceLimit=6m"]).code(0);
    std::fs::write(d.path().join("target/huge.o"), vec![0u8; 8 << 20]).unwrap();
    std::fs::write(d.path().join("data.bin"), vec![1u8; 7 << 20]).unwrap();
    let out = execute(&t, d.path(), "scenario:workspace", &[]);
    out.code(2).stdout_has("over the limit").stdout_has("data.bin");
    nothing_ran(&t);
    // Not a directory.
    execute(&t, &d.path().join("README.md"), "scenario:workspace", &[]).code(2);
    // --apply and --include-git need --workspace.
    t.run(&["execute", "--approve-all", "--apply", "--prompt", "x"]).code(2);
    nothing_ran(&t);
}

#[test]
fn the_workspace_is_size_limited_inside_and_comes_back_from_a_cancelled_job() {
    if !docker_available("the_workspace_is_size_limited_inside_and_comes_back_from_a_cancelled_job") {
        return;
    }
    fake_image();
    let t = job_env();
    t.run(&["config", "--set", "docker.workspaceLimit=16m"]).code(0);
    let dir = project();
    let out = execute(&t, dir.path(), "scenario:fill", &[]);
    out.code(0);
    let said = out.json()["result"].as_str().unwrap().to_string();
    assert!(
        said.starts_with("fill=stopped"),
        "the tmpfs stops the job at its size: {said}"
    );

    // Ctrl-C mid-job: the workspace still comes back, with what it held.
    let run = ws_execute(&t, dir.path(), "scenario:wshang", &["--output-format", "stream-json"]);
    let child = run.spawn();
    let id = wait_some(secs(30), || started_jobs(&t).into_iter().nth(1)).expect("job never started");
    // Stopped once the job has written (it says so in its log).
    assert!(
        wait_until(secs(30), || docker(&["logs", &format!("cmm-job-{id}")])
            .1
            .contains("streaming")),
        "job never streamed"
    );
    child.signal(libc::SIGINT);
    let out = child.wait();
    assert_eq!(out.status, 130, "{}", out.stderr);
    let rec = job_record(&t, &id);
    assert_eq!(rec["status"], "cancelled");
    assert_eq!(change(&rec["changes"], "partial.txt")["change"], "added");
    assert!(t.file(&format!("jobs/{id}.patch")).exists());
    assert!(containers_of_job(&id).is_empty());
}

#[test]
fn a_workspace_job_works_with_open_egress_too() {
    if !docker_available("a_workspace_job_works_with_open_egress_too") {
        return;
    }
    fake_image();
    let t = job_env();
    t.run(&["config", "--set", "docker.egress=open"]).code(0);
    let dir = project();
    let out = execute(&t, dir.path(), "scenario:workspace", &[]);
    out.code(0);
    let r = out.json();
    assert_eq!(r["egress"]["mode"], "open");
    assert_eq!(change(&r["changes"], "added.txt")["change"], "added");
}
