//! `mcp`: driven by a client no one here wrote — the official MCP Python SDK
//! (`mcp` from PyPI) — plus raw JSON-RPC checks that stdout carries only the
//! protocol and that closing stdin ends the server cleanly.
//!
//! The SDK lives in a virtual environment under `target/mcp-venv`, created
//! on first use with `python3 -m venv` and `pip install mcp`. If that fails
//! the test fails: CI must provide python3 with venv and pip, and reach PyPI
//! (or point `CMM_MCP_PYTHON` at an interpreter that has `mcp` installed).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use claude_max_market::legal;
use common::{wait_until, Cmm, BIN};
use serde_json::{json, Value};

/// A Python interpreter that can `import mcp`.
fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CMM_MCP_PYTHON") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let venv = target.join("mcp-venv");
    let python = venv.join("bin").join("python");
    let has_sdk = |py: &Path| {
        Command::new(py)
            .args(["-c", "import mcp.client.stdio"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_sdk(&python) {
        return python;
    }
    // Serialise set-up between test binaries running at once.
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join(".mcp-venv.lock")).unwrap();
    lock.lock().unwrap();
    if has_sdk(&python) {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
        assert!(
            out.status.success(),
            "{what} failed (CI needs python3 with the venv module and pip, and access to PyPI):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "mcp"]),
        "pip install mcp",
    );
    assert!(
        has_sdk(&python),
        "`import mcp.client.stdio` fails in {}",
        venv.display()
    );
    python
}

fn by_key<'a>(list: &'a Value, key: &str, want: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[key] == want)
        .unwrap_or_else(|| panic!("no {key}={want} in {list:#}"))
}

#[test]
fn the_python_sdk_reads_the_policy_and_calls_each_tool() {
    let t = Cmm::opted_in();
    t.run(&["limits", "--daily", "7", "--tokens", "12345"]).code(0);
    let log_before = t.read("audit.jsonl");
    let head: Value = serde_json::from_str(&t.read("audit.head")).unwrap();

    let stderr_file = t.file("mcp-stderr.txt");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mcp_client.py");
    let out = Command::new(sdk_python())
        .arg(&script)
        .arg(BIN)
        .arg(t.path())
        .arg(&stderr_file)
        .output()
        .expect("run the Python MCP client");
    assert!(
        out.status.success(),
        "client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");

    assert_eq!(s["server_info"]["name"], "claude-max-market");
    assert_eq!(s["stray_stdout"], json!([]), "stdout carried something that is not MCP");

    // Resources: exactly the four, and the policy text verbatim.
    let mut uris: Vec<&str> = s["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    uris.sort();
    assert_eq!(
        uris,
        ["cmm://compliance", "cmm://status", "cmm://terms", "cmm://usage_policy"]
    );
    let policy = &s["read"]["cmm://usage_policy"][0];
    assert_eq!(policy["text"], legal::USAGE_POLICY);
    assert_eq!(policy["mimeType"], "text/plain");

    let doc = |uri: &str| -> Value { serde_json::from_str(s["read"][uri][0]["text"].as_str().unwrap()).unwrap() };
    let terms = doc("cmm://terms");
    assert_eq!(terms["version"], legal::TERMS_VERSION);
    assert_eq!(terms["sha256"], legal::terms_sha256());
    assert_eq!(terms["text"], legal::TERMS);
    let status = doc("cmm://status");
    assert_eq!(status["consent"]["accepted"], true);
    assert_eq!(status["consent"]["terms_version"], legal::TERMS_VERSION);
    assert_eq!(status["caps"]["daily_tasks"], 7);
    assert_eq!(status["caps"]["daily_tokens"], 12345);
    let compliance = doc("cmm://compliance");
    assert!(!compliance["results"].as_array().unwrap().is_empty());
    assert!(compliance["disclaimer"].as_str().unwrap().contains("not legal advice"));

    // Tools: exactly the three, all marked read-only; none starts a job.
    let mut names: Vec<&str> = s["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["audit_verify", "compliance_check", "usage_status"]);
    for n in names {
        assert_eq!(
            by_key(&s["tools"], "name", n)["annotations"]["readOnlyHint"],
            true,
            "{n}"
        );
    }

    let call = |name: &str| -> &Value {
        let c = &s["calls"][name];
        assert_eq!(c["isError"], false, "{name}: {c:#}");
        &c["structuredContent"]
    };
    let us = call("usage_status");
    assert_eq!(us["consent"]["accepted"], true);
    assert_eq!(us["caps"]["daily_tasks"], 7);
    assert_eq!(us["caps"]["daily_tokens"], 12345);
    assert_eq!(by_key(&us["usage"]["windows"], "window", "day")["task_cap"], 7);
    assert_eq!(us["audit"]["head"]["log_id"], head["log_id"]);
    let cc = call("compliance_check");
    assert_eq!(cc["results"], compliance["results"]);
    assert_eq!(by_key(&cc["results"], "id", "consent-current")["level"], "OK");
    let av = call("audit_verify");
    assert_eq!(av["ok"], true);
    assert_eq!(av["log_id"], head["log_id"]);
    assert_eq!(av["events"], head["seq"].as_u64().unwrap() + 1);

    assert!(
        s["unknown_resource_error"]
            .as_str()
            .is_some_and(|e| e.contains("cmm://nope")),
        "{}",
        s["unknown_resource_error"]
    );
    // Read-only: the session wrote nothing to the audit log.
    assert_eq!(t.read("audit.jsonl"), log_before);
}

/// Send raw JSON-RPC lines, close stdin, and return (exit code, stdout, stderr).
fn raw_session(t: &Cmm, extra: &[&str], lines: &[Value]) -> (Option<i32>, String, String) {
    let mut args = vec!["mcp"];
    args.extend_from_slice(extra);
    let mut child = t.cmd(&args).spawn_with_stdin();
    for l in lines {
        writeln!(child.stdin(), "{l}").unwrap();
    }
    // Close the pipe once the server has answered every request, as a
    // client hanging up after its last reply would.
    let requests = lines.iter().filter(|l| l.get("id").is_some()).count();
    let answered = || child.stdout_text().lines().count() >= requests;
    assert!(
        wait_until(Duration::from_secs(10), answered),
        "`mcp` did not answer {requests} requests within 10 s:\n{}",
        child.stdout_text()
    );
    child.close_stdin();
    let out = child.wait_within(Duration::from_secs(10), "`mcp` after stdin closed");
    (Some(out.status), out.stdout, out.stderr)
}

#[test]
fn stdout_is_protocol_only_and_closing_stdin_ends_the_server() {
    let t = Cmm::opted_in();
    let lines = [
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}),
        json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}),
        json!({"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"cmm://usage_policy"}}),
        json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"execute","arguments":{}}}),
    ];
    // Quiet by default, and with debug logs on (-vv) they go to stderr only.
    for extra in [&[][..], &["-vv"][..]] {
        let (code, out, err) = raw_session(&t, extra, &lines);
        assert_eq!(code, Some(0), "exit code; stderr:\n{err}");
        let msgs: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON on stdout ({e}): {l:?}")))
            .collect();
        assert!(msgs.iter().all(|m| m["jsonrpc"] == "2.0"), "{out}");
        let ids: Vec<&Value> = msgs.iter().map(|m| &m["id"]).collect();
        assert_eq!(ids, [&json!(1), &json!(2), &json!(3), &json!(4)], "{out}");
        assert_eq!(msgs[0]["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(msgs[2]["result"]["contents"][0]["text"], legal::USAGE_POLICY);
        // There is no tool that runs a job.
        assert!(msgs[3]["error"].is_object(), "{}", msgs[3]);
        if extra.is_empty() {
            assert_eq!(err, "", "nothing on stderr without -v");
        } else {
            assert!(!err.is_empty(), "-vv logs to stderr");
        }
    }
}
