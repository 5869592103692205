//! Hostile command-line input through the real binary: arguments that are
//! not UTF-8 or carry control characters, ages and sizes and numbers that do
//! not fit, and file-reading flags pointed at endless inputs (`/dev/zero`,
//! a pipe that never stops). Every case must exit 2 with a message saying
//! what was wrong, never panic (101), finish in bounded time and memory, and
//! change nothing on disk. Also: `config --export` and symlinks, stale
//! `.tmp-*` files, and the output-directory hint of `encrypt`.

mod common;
use common::*;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// Longest any hostile case may take (a debug build on a loaded machine;
/// the reads are capped near 1 MiB, so each takes milliseconds).
const TIME_BOUND: Duration = Duration::from_secs(20);
/// Most memory any hostile case may use: the binary idles near 20 MiB, and
/// the caps add about 1 MiB. An uncapped read of `/dev/zero` passes this in
/// well under a second.
const RSS_BOUND_KIB: i64 = 128 * 1024;

enum Stdin {
    Null,
    /// This many bytes of `a`, written until the binary stops reading.
    Endless,
}

/// Run the binary with raw OS-string arguments, failing at the time bound.
fn run_raw(t: &Cmm, args: &[OsString], env: &[(&str, &str)], stdin: Stdin) -> Bounded {
    let mut run = t.cmd_os(args);
    for (k, v) in env {
        run = run.env(k, v);
    }
    run.run_bounded(TIME_BOUND, matches!(stdin, Stdin::Endless))
}

/// Every file under `dir` with its bytes (lock files are empty; they may be
/// created, and count as a change only if they gain content).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                if p.extension() == Some(OsStr::new("lock")) && bytes.is_empty() {
                    continue;
                }
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), bytes));
            }
        }
    }
    out.sort();
    out
}

fn os(parts: &[&[u8]]) -> Vec<OsString> {
    parts.iter().map(|p| OsStr::from_bytes(p).to_os_string()).collect()
}

struct Case {
    what: &'static str,
    args: Vec<OsString>,
    env: Vec<(&'static str, &'static str)>,
    stdin: Stdin,
    /// Text the error must contain.
    says: &'static str,
}

fn case(what: &'static str, args: &[&[u8]], says: &'static str) -> Case {
    Case {
        what,
        args: os(args),
        env: Vec::new(),
        stdin: Stdin::Null,
        says,
    }
}

#[test]
fn hostile_arguments_and_inputs_exit_2_bounded_and_change_nothing() {
    let t = Cmm::opted_in();
    t.run(&["config", "--set", "limits.dailyTasks=7"]).code(0);
    std::fs::write(
        t.file("import-huge.json"),
        br#"{"docker":{"memory":18446744073709551615}}"#,
    )
    .unwrap();
    let huge_import = t.file("import-huge.json");
    let huge_import = huge_import.as_os_str().as_bytes();
    let mut cases = vec![
        // Not UTF-8: std's `args()` panicked (101) on every one of these.
        case("invalid UTF-8 value", &[b"logs", b"--since", b"\xff"], "invalid UTF-8"),
        case(
            "invalid UTF-8 after status",
            &[b"status", b"--since", b"\xff"],
            "error:",
        ),
        case("invalid UTF-8 subcommand", &[b"\xff\xfe"], "error:"),
        case(
            "invalid UTF-8 assignment",
            &[b"config", b"--set", b"limits.dailyTasks=\xff"],
            "invalid UTF-8",
        ),
        case(
            "invalid UTF-8 prompt",
            &[b"execute", b"--prompt", b"\xc3\x28"],
            "invalid UTF-8",
        ),
        // Ages that do not fit: `Duration::weeks` panicked.
        case(
            "huge age in weeks",
            &[b"logs", b"--since", b"100000000w"],
            "an age goes up to 36500 days",
        ),
        case(
            "i64::MAX weeks",
            &[b"usage", b"--since", b"9223372036854775807w"],
            "an age goes up to 36500 days",
        ),
        case(
            "age past 64 bits",
            &[b"audit", b"--since", b"99999999999999999999s"],
            "an age goes up to 36500 days",
        ),
        // Endless inputs: these read until memory ran out.
        case(
            "config --import /dev/zero",
            &[b"config", b"--import", b"/dev/zero"],
            "larger than the limit of 1 MiB",
        ),
        case(
            "execute --file /dev/zero",
            &[b"execute", b"--file", b"/dev/zero"],
            "larger than the limit of 1 MiB",
        ),
        case(
            "bid --file /dev/zero",
            &[b"bid", b"--file", b"/dev/zero", b"--max-price", b"1"],
            "larger than the limit of 1 MiB",
        ),
        case(
            "keys import /dev/zero",
            &[b"keys", b"import", b"peer", b"/dev/zero"],
            "larger than the limit of 64 KiB",
        ),
        case(
            "compliance-check --checklist /dev/zero",
            &[b"compliance-check", b"--checklist", b"/dev/zero"],
            "larger than the limit of 1 MiB",
        ),
        Case {
            what: "execute --file - with endless stdin",
            args: os(&[b"execute", b"--file", b"-"]),
            env: Vec::new(),
            stdin: Stdin::Endless,
            says: "the prompt on stdin is larger than the limit of 1 MiB",
        },
        // Sizes and numbers that do not fit: accepted and wrapped before.
        case(
            "docker.memory = u64::MAX",
            &[b"config", b"--set", b"docker.memory=18446744073709551615"],
            "the range is 6m to 1024g",
        ),
        case(
            "docker.memory past 64 bits",
            &[b"config", b"--set", b"docker.memory=99999999999999g"],
            "the range is 6m to 1024g",
        ),
        case(
            "workspaceLimit too large",
            &[b"config", b"--set", b"docker.workspaceLimit=1025g"],
            "the range is 6m to 1024g",
        ),
        case(
            "docker.memory as a JSON number in an import",
            &[b"config", b"--import", huge_import],
            "out of range (6m to 1024g",
        ),
        Case {
            what: "docker.memory from the environment",
            args: os(&[b"status"]),
            env: vec![("CMM_DOCKER_MEMORY", "18446744073709551615")],
            stdin: Stdin::Null,
            says: "the range is 6m to 1024g",
        },
        case(
            "limits.dailyTokens past 64 bits",
            &[b"config", b"--set", b"limits.dailyTokens=99999999999999999999"],
            "out of range (0 to 1000000000000)",
        ),
        case(
            "limits --daily u64::MAX",
            &[b"limits", b"--daily", b"18446744073709551615"],
            "out of range (0 to 1000000)",
        ),
        case(
            "limits --timeout past 64 bits",
            &[b"limits", b"--timeout", b"99999999999999999999"],
            "from 1 to 86400 seconds",
        ),
        case(
            "bid --deadline u64::MAX",
            &[
                b"bid",
                b"--prompt",
                b"x",
                b"--max-price",
                b"1",
                b"--deadline",
                b"18446744073709551615",
            ],
            "1..=604800",
        ),
        case(
            "bid --min-reputation NaN",
            &[
                b"bid",
                b"--prompt",
                b"x",
                b"--max-price",
                b"1",
                b"--min-reputation",
                b"NaN",
            ],
            "from 0 to 1",
        ),
        case(
            "advertise --ttl too long",
            &[b"advertise", b"--slots", b"1", b"--ttl", b"99999999999"],
            "1..=2592000",
        ),
        case(
            "advertise --for u64::MAX",
            &[b"advertise", b"--slots", b"1", b"--for", b"18446744073709551615"],
            "1..=31536000",
        ),
        case(
            "market result --timeout u64::MAX",
            &[b"market", b"result", b"t", b"--timeout", b"18446744073709551615"],
            "1..=2592000",
        ),
        // Control characters are escaped in what the error echoes.
        case(
            "ESC in an age",
            &[b"logs", b"--since", b"\x1b[31mred"],
            "`\\x1b[31mred` is not a time",
        ),
        case(
            "ESC in a config key",
            &[b"config", b"--set", b"\x1b]0;owned\x07=1"],
            "\\x1b]0;owned\\x07",
        ),
        case(
            "ESC in a clap value",
            &[b"usage", b"--period", b"\x1b[2J"],
            "'\\x1b[2J'",
        ),
    ];
    let before = snapshot(t.path());
    let mut worst_rss = 0;
    for c in cases.drain(..) {
        let env: Vec<(&str, &str)> = c.env.clone();
        let out = run_raw(&t, &c.args, &env, c.stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.code, 101, "{}: panicked\n{stderr}", c.what);
        assert_eq!(out.code, 2, "{}: exit {} (want 2)\n{stderr}", c.what, out.code);
        assert!(
            stderr.contains(c.says),
            "{}: stderr lacks {:?}\n{stderr}",
            c.what,
            c.says
        );
        assert!(!stderr.contains("panicked"), "{}: {stderr}", c.what);
        assert!(
            !out.stderr.contains(&0x1b),
            "{}: a raw ESC reached stderr\n{stderr}",
            c.what
        );
        assert!(
            out.peak_rss_kib < RSS_BOUND_KIB,
            "{}: peak RSS {} KiB (bound {RSS_BOUND_KIB})",
            c.what,
            out.peak_rss_kib
        );
        assert!(out.elapsed < TIME_BOUND, "{}: took {:?}", c.what, out.elapsed);
        worst_rss = worst_rss.max(out.peak_rss_kib);
        assert_eq!(snapshot(t.path()), before, "{}: changed files in CMM_HOME", c.what);
    }
    eprintln!("worst peak RSS over the hostile cases: {worst_rss} KiB");
    // The install still works and holds what it held.
    t.run(&["config", "--get", "limits.dailyTasks"]).code(0).stdout_has("7");
    t.run(&["audit", "verify"]).code(0);
}

#[test]
fn a_since_before_any_record_does_not_print_every_empty_day() {
    let t = Cmm::opted_in();
    for since in ["0001-01-01", "36500d", "1970-01-01T00:00:00Z"] {
        let v = t
            .run(&["usage", "--period", "day", "--since", since, "--json"])
            .code(0)
            .json();
        let rows = v["rows"].as_array().unwrap().len();
        assert!(rows <= 2, "--since {since}: {rows} rows for an install with no history");
    }
}

#[test]
fn the_prompt_limit_is_exactly_one_mebibyte() {
    let t = Cmm::opted_in();
    // One byte over: refused before anything else happens.
    let over = vec![b'a'; (1 << 20) + 1];
    std::fs::write(t.file("over.txt"), &over).unwrap();
    t.run(&["execute", "--file", t.file("over.txt").to_str().unwrap()])
        .code(2)
        .stderr_has("larger than the limit of 1 MiB (1048576 bytes)");
    t.cmd(&["execute", "--file", "-"])
        .stdin(over)
        .run()
        .code(2)
        .stderr_has("on stdin is larger than the limit of 1 MiB");
    // At the limit: the prompt is taken, and the job goes on to its next
    // step (here: no approval without a terminal), so the cap let it through.
    let at = vec![b'a'; 1 << 20];
    let out = t.cmd(&["execute", "--file", "-"]).stdin(at).run();
    assert!(
        !out.stderr.contains("larger than the limit"),
        "a 1 MiB prompt was refused:\n{}",
        out.stderr
    );
    assert_ne!(out.status, 101, "{}", out.stderr);
}

#[test]
fn config_export_never_follows_a_symlink_and_writes_0600() {
    use std::os::unix::fs::PermissionsExt;
    let t = Cmm::new();
    let target = t.file("elsewhere.json");
    let link = t.file("export.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    t.run(&["config", "--export", link.to_str().unwrap()])
        .code(2)
        .stderr_has("already exists; not overwriting it");
    assert!(!target.exists(), "the dangling symlink was followed");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());

    let fresh = t.file("fresh.json");
    t.run(&["config", "--export", fresh.to_str().unwrap()]).code(0);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "export written {mode:o}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&fresh).unwrap()).unwrap();
    assert!(v["docker"]["memory"].is_string());
    // What it wrote imports back.
    t.run(&["config", "--import", fresh.to_str().unwrap()]).code(0);
}

#[test]
fn stale_temporaries_are_swept_under_the_lock_and_live_ones_kept() {
    let t = Cmm::new();
    t.run(&["config", "--set", "limits.dailyTasks=3"]).code(0);
    // Left by writers killed before their rename: one whose pid is gone,
    // and one so old that its pid no longer says anything.
    let gone = dead_pid();
    let dead = t.file(&format!(".tmp-{gone}-AbCdEf"));
    std::fs::write(&dead, b"half a config").unwrap();
    let ancient = t.file(".tmp-Zy12Xw");
    std::fs::write(&ancient, b"old").unwrap();
    let f = std::fs::File::options().write(true).open(&ancient).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    // A live writer's file: this test process's pid, written just now.
    let live = t.file(&format!(".tmp-{}-LiVeOn", std::process::id()));
    std::fs::write(&live, b"being written").unwrap();
    // A recent file without a pid (an older version's name) is left to age.
    let recent = t.file(".tmp-Rc3nT1");
    std::fs::write(&recent, b"recent").unwrap();

    t.run(&["config", "--set", "limits.dailyTasks=4"]).code(0);
    assert!(!dead.exists(), "a dead writer's temporary was kept");
    assert!(!ancient.exists(), "an hour-old temporary was kept");
    assert!(live.exists(), "a live writer's temporary was removed");
    assert!(recent.exists(), "a recent temporary was removed");
    // The write itself left nothing behind.
    let left: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn an_unwritable_output_directory_does_not_suggest_force() {
    use std::os::unix::fs::PermissionsExt;
    let t = Cmm::new();
    let input = t.file("in.txt");
    std::fs::write(&input, b"hello").unwrap();
    let dir = t.file("ro");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    // root ignores directory modes; a directory that does not exist fails
    // the same way for everyone.
    let out_in = |d: &Path| d.join("out.cmm").to_str().unwrap().to_string();
    for d in [dir.clone(), t.file("missing-dir")] {
        let probe = std::fs::File::create(d.join("probe"));
        if probe.is_ok() {
            let _ = std::fs::remove_file(d.join("probe"));
            continue;
        }
        let out = t.run(&["encrypt", "-i", input.to_str().unwrap(), "-o", &out_in(&d)]);
        out.code(2)
            .stderr_has("cannot create a file in")
            .stderr_has("directory you can write");
        assert!(!out.stderr.contains("--force` to replace"), "{}", out.stderr);
    }
    // An existing output still gets the `--force` hint.
    let exists = t.file("there.cmm");
    std::fs::write(&exists, b"x").unwrap();
    t.run(&["encrypt", "-i", input.to_str().unwrap(), "-o", exists.to_str().unwrap()])
        .code(2)
        .stderr_has("already exists")
        .stderr_has("--force");
}

#[test]
fn an_endless_credential_file_or_command_is_refused_at_its_cap() {
    use std::os::unix::fs::PermissionsExt;
    let t = Cmm::opted_in();
    let token = t.file("token");
    std::fs::write(&token, vec![b'a'; 70 * 1024]).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tf = format!("credentials.tokenFile={}", token.display());
    for (source, setting) in [("file", tf.as_str()), ("command", "credentials.tokenCommand=yes")] {
        t.run(&["config", "--set", &format!("credentials.source={source}")])
            .code(0);
        t.run(&["config", "--set", setting]).code(0);
        let started = std::time::Instant::now();
        let out = t.run(&["execute", "--approve-all", "--prompt", "say hi"]);
        out.code(2).stderr_has("is over 65536 bytes");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{source}: took {:?}",
            started.elapsed()
        );
    }
}
