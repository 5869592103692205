//! `docker build --claude-binary`: the runner image from a native Claude
//! Code, FROM scratch, with no registry and no network; and `execute` /
//! `docker pull` building it on their own when the default image is missing.
//!
//! The real tier builds from the real Claude Code (`CMM_CLAUDE_BINARY`, or
//! `target/claude-code/2.1.332/claude`; skipped loudly without it unless
//! `CMM_REQUIRE_REAL_CLAUDE=1`). The rest builds from a tiny native program
//! compiled here that answers `--version` like Claude Code, so the
//! mechanics are exercised in seconds.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::{docker_available, Cmm, Output};
use docker::{docker, image_exists, job_env};
use serde_json::Value;

const IMAGE_LABEL: &str = "dev.claude-max-market.image";
const VERSION_LABEL: &str = "dev.claude-max-market.claude-code-version";
const TINY_VERSION: &str = "9.8.7";

/// The production hardening, as `docker run` flags (security-config.json).
const HARDENED: &[&str] = &[
    "--rm",
    "--read-only",
    "--user",
    "10001:10001",
    "--network",
    "none",
    "--tmpfs",
    "/tmp:rw,noexec,nosuid,nodev,size=64m",
    "--tmpfs",
    "/home/claude:rw,noexec,nosuid,nodev,size=128m,uid=10001,gid=10001,mode=0700",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges:true",
];

/// The real Claude Code, or `None` (said loudly) when it is not here.
fn real_claude(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("CMM_CLAUDE_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/claude-code/2.1.332/claude"));
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CMM_REQUIRE_REAL_CLAUDE").as_deref() == Ok("1") {
        panic!(
            "{test}: no real Claude Code at {} and CMM_REQUIRE_REAL_CLAUDE=1",
            p.display()
        );
    }
    eprintln!(
        "\n*** SKIPPED {test}: no real Claude Code at {} (set CMM_CLAUDE_BINARY, or CMM_REQUIRE_REAL_CLAUDE=1 to fail instead) ***\n",
        p.display()
    );
    None
}

/// A tiny native program that answers `--version` as Claude Code does
/// (and fails anything else): built once per test process with the C
/// compiler, dynamically linked, so its libraries must be collected.
fn tiny_claude() -> &'static Path {
    static TINY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &TINY
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let src = dir.path().join("claude.c");
            std::fs::write(
                &src,
                format!(
                    "#include <stdio.h>\n#include <string.h>\n\
                     int main(int argc, char **argv) {{\n\
                       if (argc > 1 && strcmp(argv[1], \"--version\") == 0) {{ puts(\"{TINY_VERSION} (Claude Code)\"); return 0; }}\n\
                       fprintf(stderr, \"tiny claude: there is no API here\\n\");\n\
                       return 3;\n\
                     }}\n"
                ),
            )
            .unwrap();
            let bin = dir.path().join("claude");
            let out = std::process::Command::new("cc")
                .arg("-O2")
                .arg("-o")
                .arg(&bin)
                .arg(&src)
                .output()
                .expect("a C compiler (`cc`) to build the tiny claude");
            assert!(out.status.success(), "cc failed: {}", String::from_utf8_lossy(&out.stderr));
            (dir, bin)
        })
        .1
}

/// Builds of the same inputs share their intermediate images, and removing
/// one image removes the intermediates no other tag holds: a build racing
/// that removal loses its parent. So this process builds and removes one
/// at a time.
static ENGINE: Mutex<()> = Mutex::new(());

fn serial<T>(f: impl FnOnce() -> T) -> T {
    let _g = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// A tag of this test process's own, removed (with its dangling parents)
/// when dropped, so no other test's image is ever touched.
struct Tag(String);

impl Tag {
    fn new(name: &str) -> Tag {
        let t = Tag(format!("cmm-test/native-{name}:{}", std::process::id()));
        serial(|| docker(&["rmi", "-f", &t.0]));
        t
    }
}

impl Drop for Tag {
    fn drop(&mut self) {
        serial(|| docker(&["rmi", "-f", &self.0]));
    }
}

fn inspect(tag: &str) -> Value {
    let (ok, out, err) = docker(&["image", "inspect", tag]);
    assert!(ok, "inspect {tag}: {err}");
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

/// `docker run` with the hardening flags; returns (ok, stdout, stderr).
fn run_hardened(tag: &str, entrypoint: &str, args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["run"];
    a.extend_from_slice(HARDENED);
    a.extend_from_slice(&["--entrypoint", entrypoint, tag]);
    a.extend_from_slice(args);
    docker(&a)
}

#[track_caller]
fn sh(tag: &str, script: &str) -> String {
    let (ok, out, err) = run_hardened(tag, "/bin/sh", &["-c", script]);
    assert!(ok, "sh -c {script:?} in {tag} failed: {out}{err}");
    out
}

fn build(t: &Cmm, binary: &Path, tag: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "docker",
        "build",
        "--json",
        "--claude-binary",
        binary.to_str().unwrap(),
        "--tag",
        tag,
    ];
    args.extend_from_slice(extra);
    serial(|| t.run(&args))
}

/// What every image built by `--claude-binary` must be.
#[track_caller]
fn check_runner_image(tag: &str, version: &str) {
    let i = inspect(tag);
    let c = &i["Config"];
    assert_eq!(c["Labels"][IMAGE_LABEL], "true", "{c}");
    assert_eq!(c["Labels"][VERSION_LABEL], version, "{c}");
    assert_eq!(c["User"], "10001:10001");
    assert_eq!(c["WorkingDir"], "/home/claude");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/entrypoint.sh"]));
    assert_eq!(c["Cmd"], serde_json::json!(["sonnet"]));
    let env: Vec<&str> = c["Env"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for want in [
        "DISABLE_AUTOUPDATER=1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
        "DISABLE_TELEMETRY=1",
        "HOME=/home/claude",
    ] {
        assert!(env.contains(&want), "{want} not in {env:?}");
    }
    assert!(
        env.iter()
            .any(|e| e.starts_with("PATH=") && e.contains("/usr/local/bin")),
        "{env:?}"
    );

    // The shells, the user, the CA bundle and the layout, under the
    // production hardening.
    assert_eq!(sh(tag, "echo \"sh: $0\""), "sh: /bin/sh\n");
    let (ok, out, err) = run_hardened(tag, "/bin/bash", &["-c", "echo \"bash $BASH_VERSION uid $UID\""]);
    assert!(
        ok && out.starts_with("bash ") && out.ends_with(" uid 10001\n"),
        "{out}{err}"
    );
    let passwd = sh(tag, "while IFS= read -r l; do echo \"$l\"; done < /etc/passwd");
    assert!(passwd.contains("claude:x:10001:10001:"), "{passwd}");
    assert!(passwd.contains(":/home/claude:"), "{passwd}");
    let bundle = sh(tag, "n=0; while IFS= read -r l; do case \"$l\" in *'BEGIN CERTIFICATE'*) n=$((n+1));; esac; done < /etc/ssl/certs/ca-certificates.crt; echo $n");
    assert!(
        bundle.trim().parse::<u32>().unwrap() > 10,
        "CA bundle holds {bundle} certificates"
    );
    if Path::new("/bin/busybox").is_file() {
        // The applets the tools expect, and the job's directories.
        let out = sh(
            tag,
            "stat -c '%a %u:%g' /workspace /home/claude /tmp; echo a-b | sed s/-/+/ | grep +",
        );
        // The tmpfs mounts start as copies of the image's directories.
        assert_eq!(out, "755 10001:10001\n755 10001:10001\n1777 0:0\na+b\n");
    }
    // The entrypoint runs (and holds to its stdin contract).
    let mut a = vec!["run", "-i"];
    a.extend_from_slice(HARDENED);
    a.push(tag);
    let (ok, _, err) = docker(&a);
    assert!(!ok && err.contains("stdin closed before the credential line"), "{err}");
}

#[test]
fn the_real_claude_code_builds_a_hardened_runner_image_and_a_rebuild_is_cached() {
    let test = "the_real_claude_code_builds_a_hardened_runner_image_and_a_rebuild_is_cached";
    if !docker_available(test) {
        return;
    }
    let Some(claude) = real_claude(test) else { return };
    let t = Cmm::new();
    let tag = Tag::new("real");
    let out = build(&t, &claude, &tag.0, &[]);
    out.code(0)
        .stderr_has("Claude Code 2.1.332")
        .stderr_has("collected: ")
        .stderr_has("to the Docker engine")
        .stderr_has("Step 2/")
        .stderr_has("COPY claude /usr/local/bin/claude");
    let v = out.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["image"], tag.0.as_str());
    assert_eq!(v["source"], "native");
    assert_eq!(v["claude_version"], "2.1.332");
    assert!(v["bytes"].as_u64().unwrap() > 400_000_000, "{v}");
    let libs: Vec<&str> = v["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(libs.iter().any(|l| l.contains("libc.so")), "{libs:?}");
    assert!(libs.iter().any(|l| l.contains("ld-linux")), "{libs:?}");
    assert_eq!(inspect(&tag.0)["Id"], v["id"]);
    check_runner_image(&tag.0, "2.1.332");
    let (ok, out, err) = run_hardened(&tag.0, "claude", &["--version"]);
    assert!(ok, "{err}");
    assert_eq!(out, "2.1.332 (Claude Code)\n");

    // The same inputs again: every step from the engine's cache, same image.
    let again = build(&t, &claude, &tag.0, &[]);
    let w = again.code(0).json();
    assert_eq!(w["id"], v["id"], "a warm rebuild gives the same image");
    assert_eq!(w["cached_steps"], w["steps"], "every step cached: {w}");
}

#[test]
fn an_extra_ca_is_named_by_node_extra_ca_certs() {
    if !docker_available("an_extra_ca_is_named_by_node_extra_ca_certs") {
        return;
    }
    let t = Cmm::new();
    let dir = tempfile::tempdir().unwrap();
    let (ca, key) = (dir.path().join("proxy-ca.pem"), dir.path().join("proxy-ca.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&ca)
        .args(["-subj", "/CN=cmm test proxy CA", "-days", "2"])
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tag = Tag::new("ca");
    let out = build(&t, tiny_claude(), &tag.0, &["--extra-ca", ca.to_str().unwrap()]);
    out.code(0).stderr_has("CN=cmm test proxy CA");
    let v = out.json();
    assert_eq!(v["extra_ca"]["subjects"][0], "CN=cmm test proxy CA");
    check_runner_image(&tag.0, TINY_VERSION);
    let env = inspect(&tag.0)["Config"]["Env"].clone();
    let named = env
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("NODE_EXTRA_CA_CERTS="))
        .expect("NODE_EXTRA_CA_CERTS set")
        .to_string();
    let inside = sh(&tag.0, &format!("while IFS= read -r l; do echo \"$l\"; done < {named}"));
    let want = std::fs::read_to_string(&ca).unwrap();
    assert_eq!(
        inside.trim(),
        want.trim(),
        "the file it names holds that CA, and nothing else"
    );
    let (ok, out, _) = run_hardened(&tag.0, "claude", &["--version"]);
    assert!(ok);
    assert_eq!(out, format!("{TINY_VERSION} (Claude Code)\n"));
}

#[test]
fn bad_inputs_exit_2_before_the_engine_is_asked_and_build_nothing() {
    if !docker_available("bad_inputs_exit_2_before_the_engine_is_asked_and_build_nothing") {
        return;
    }
    let t = Cmm::new();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, body: &[u8], mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let script = file("claude-script", b"#!/bin/sh\necho '2.1.332 (Claude Code)'\n", 0o755);
    let shim = file("cli.js", b"#!/usr/bin/env node\nimport('./cli.mjs')\n", 0o755);
    let junk = file("claude-junk", &[0x4d, 0x5a, 0x90, 0, 3, 0, 0, 0], 0o755);
    let plain = file("claude-noexec", b"\x7fELF", 0o644);
    let missing = dir.path().join("nope/claude");
    let tiny = tiny_claude();
    let other_elf = Path::new("/bin/true");
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (&missing, vec![], "does not exist"),
        (dir.path(), vec![], "is not a file"),
        (&plain, vec![], "is not executable"),
        (&script, vec![], "is a script (`#!/bin/sh`)"),
        (&shim, vec![], "the launcher npm installs"),
        (&junk, vec![], "is not an ELF executable"),
        (other_elf, vec![], "--version` does not name Claude Code"),
    ];
    // The engine is never reached: the inputs are refused first.
    let nowhere = format!("unix://{}/no-engine.sock", dir.path().display());
    let tag = Tag::new("bad");
    for (path, extra, says) in &cases {
        let mut args = vec![
            "docker",
            "build",
            "--claude-binary",
            path.to_str().unwrap(),
            "--tag",
            &tag.0,
        ];
        args.extend_from_slice(extra);
        t.cmd(&args)
            .env("DOCKER_HOST", &nowhere)
            .run()
            .code(2)
            .stderr_has(says)
            .stderr_has("hint:");
    }
    // Bad CA files, with a good binary.
    let garbage = file("ca-garbage.pem", b"hello, I am not a certificate\n", 0o644);
    let empty = file("ca-empty.pem", b"", 0o644);
    let der = file("ca.der", &[0x30, 0x82, 0x01, 0x0a, 0xff, 0xfe], 0o644);
    let key = file(
        "ca-key.pem",
        b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+t\n-----END PRIVATE KEY-----\n",
        0o644,
    );
    let broken = file(
        "ca-broken.pem",
        b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        0o644,
    );
    for (ca, says) in [
        (&garbage, "no PEM certificate"),
        (&empty, "no PEM certificate"),
        (&der, "not PEM text"),
        (&key, "is a private key"),
        (&broken, "does not parse as X.509"),
        (&dir.path().join("none.pem"), "does not exist"),
    ] {
        t.cmd(&[
            "docker",
            "build",
            "--claude-binary",
            tiny.to_str().unwrap(),
            "--extra-ca",
            ca.to_str().unwrap(),
            "--tag",
            &tag.0,
        ])
        .env("DOCKER_HOST", &nowhere)
        .run()
        .code(2)
        .stderr_has("extra CA")
        .stderr_has(says);
    }
    // As one JSON document, too.
    let v = t
        .cmd(&["--json", "docker", "build", "--claude-binary", script.to_str().unwrap()])
        .env("DOCKER_HOST", &nowhere)
        .run()
        .code(2)
        .json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["exit"], 2);
    assert!(v["error"]["message"].as_str().unwrap().contains("is a script"), "{v}");
    // --extra-ca without --claude-binary is a usage error.
    t.run(&["docker", "build", "--extra-ca", garbage.to_str().unwrap()])
        .code(2);
    assert!(!image_exists(&tag.0), "nothing was built");

    // Good inputs and no engine: exit 4.
    t.cmd(&[
        "docker",
        "build",
        "--claude-binary",
        tiny.to_str().unwrap(),
        "--tag",
        &tag.0,
    ])
    .env("DOCKER_HOST", &nowhere)
    .run()
    .code(4)
    .stderr_has("not reachable");
}

#[test]
fn execute_builds_a_missing_default_image_from_docker_claude_binary() {
    if !docker_available("execute_builds_a_missing_default_image_from_docker_claude_binary") {
        return;
    }
    let t = job_env();
    let tag = Tag::new("auto");
    t.run(&["config", "--set", &format!("docker.image={}", tag.0)]).code(0);
    t.run(&[
        "config",
        "--set",
        &format!("docker.claudeBinary={}", tiny_claude().display()),
    ])
    .code(0);
    let out = serial(|| t.run(&["execute", "--approve-all", "--prompt", "hello"]));
    // The job itself fails (the tiny claude has no API): the image is what
    // this test is about.
    assert_ne!(out.status, 0, "{out:?}");
    out.stderr_has(&format!("image `{}` is not present; pulling it", tag.0))
        .stderr_has("building it from the native Claude Code at")
        .stderr_has("(`docker.claudeBinary`)")
        .stderr_has(&format!("Claude Code {TINY_VERSION}"));
    assert!(image_exists(&tag.0), "the image was built: {out:?}");
    let labels = inspect(&tag.0)["Config"]["Labels"].clone();
    assert_eq!(labels[VERSION_LABEL], TINY_VERSION);
    assert_eq!(labels[IMAGE_LABEL], "true");

    // A configured path that is not a native Claude Code is the user's to
    // fix: exit 2 naming the key, nothing built.
    let other = Tag::new("auto-bad");
    t.run(&["config", "--set", &format!("docker.image={}", other.0)])
        .code(0);
    t.run(&["config", "--set", "docker.claudeBinary=/bin/true"]).code(0);
    t.run(&["execute", "--approve-all", "--prompt", "hello"])
        .code(2)
        .stderr_has("`docker.claudeBinary`: `/bin/true --version` does not name Claude Code")
        .stderr_has("config --unset docker.claudeBinary");
    assert!(!image_exists(&other.0));
}

#[test]
fn pull_falls_back_to_a_native_claude_then_to_the_embedded_dockerfile() {
    if !docker_available("pull_falls_back_to_a_native_claude_then_to_the_embedded_dockerfile") {
        return;
    }
    let t = Cmm::new();
    // docker.claudeBinary, here from the environment.
    let tag = Tag::new("pull");
    let out = serial(|| {
        t.cmd(&["docker", "pull", "--json", "--tag", &tag.0])
            .env("CMM_DOCKER_CLAUDEBINARY", tiny_claude().to_str().unwrap())
            .run()
    });
    let v = out.code(0).json();
    assert_eq!(v["pulled"], false);
    assert_eq!(v["built"], true);
    assert_eq!(v["source"], "native");
    assert_eq!(v["claude_version"], TINY_VERSION);
    assert!(image_exists(&tag.0));

    // A native `claude` on PATH.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(tiny_claude(), bin.path().join("claude")).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    let on_path = Tag::new("path");
    serial(|| t.cmd(&["docker", "pull", "--tag", &on_path.0]).env("PATH", &path).run())
        .code(0)
        .stderr_has(&format!(
            "building it from the native Claude Code {TINY_VERSION} on PATH"
        ))
        .stdout_has(&format!(
            "built `{}` locally from Claude Code {TINY_VERSION}",
            on_path.0
        ));
    assert!(image_exists(&on_path.0));

    // npm's script on PATH is not native: the embedded Dockerfile is next
    // (which needs a registry, so here it fails at its first FROM).
    let shim = tempfile::tempdir().unwrap();
    let js = shim.path().join("claude");
    std::fs::write(&js, "#!/usr/bin/env node\nrequire('./cli.js')\n").unwrap();
    std::fs::set_permissions(&js, std::fs::Permissions::from_mode(0o755)).unwrap();
    let embedded = Tag::new("embedded");
    t.cmd(&["docker", "pull", "--tag", &embedded.0])
        .env("PATH", &format!("{}:/usr/bin:/bin", shim.path().display()))
        .run()
        .code(1)
        .stderr_has("`claude` on PATH is not usable")
        .stderr_has("the launcher npm installs")
        .stderr_has("building it from the embedded context")
        .stderr_has("failed step: Step 1/");
    assert!(!image_exists(&embedded.0));
}

#[test]
fn the_engine_parses_the_whole_embedded_dockerfile() {
    if !docker_available("the_engine_parses_the_whole_embedded_dockerfile") {
        return;
    }
    // With no registry the build stops at its first FROM; that it got there
    // means the engine parsed every instruction (it counts them first).
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/Dockerfile")).unwrap();
    let instructions = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.is_empty() && !l.starts_with('#') && l.starts_with(|c: char| c.is_ascii_uppercase())
        })
        .filter(|l| {
            // Continuation lines of a RUN start with `&&` or spaces, never a word.
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.chars().all(|c| c.is_ascii_uppercase()))
        })
        .count();
    let t = Cmm::new();
    let tag = Tag::new("embedded-parse");
    // Our image label is one more step the engine adds.
    let out = t.run(&["docker", "build", "--tag", &tag.0]);
    out.code(1).stderr_has(&format!(
        "failed step: Step 1/{} : FROM python:3.12-slim-bookworm AS fetch",
        instructions + 1
    ));
    assert!(!image_exists(&tag.0));
}
