//! The real Claude Code binary, run directly on the host, against the local
//! API stand-in: proof that the stand-in is what Claude Code expects, and a
//! record of what Claude Code does with each answer (the stream-json events
//! the job pipeline has to understand).
//!
//! The binary comes from `CMM_CLAUDE_BINARY`, else
//! `target/claude-code/2.1.332/claude` (`.ci/run` fetches it). Without it the
//! tests that need it print a SKIP line, or fail when
//! `CMM_REQUIRE_REAL_CLAUDE=1`.

mod api_standin;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_standin::{Recorded, Scenario, StandIn};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const API_KEY: &str = "sk-ant-api03-standin-test-key-0000000000000000000000000000000000000000000000000000-AAAAAA";
const OAUTH_TOKEN: &str = "sk-ant-oat01-standin-test-token-000000000000000000000000000000000000000000000000-AAAAAA";
/// No job of these tests takes this long; reaching it is a failure.
const DEADLINE: Duration = Duration::from_secs(90);

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

macro_rules! claude_or_skip {
    ($api:expr) => {
        match api_standin::real_claude_binary() {
            Some(bin) => Claude::new(bin, &$api),
            None => return,
        }
    };
}

/// One `claude -p --output-format stream-json --verbose` run: its own HOME,
/// TMPDIR and working directory, and nothing of the caller's environment.
struct Claude {
    bin: PathBuf,
    home: tempfile::TempDir,
    work: tempfile::TempDir,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Claude {
    fn new(bin: PathBuf, api: &StandIn) -> Claude {
        let home = tempfile::Builder::new()
            .prefix("claude-home-")
            .tempdir()
            .expect("temp HOME");
        let work = tempfile::Builder::new()
            .prefix("claude-work-")
            .tempdir()
            .expect("temp cwd");
        std::fs::create_dir(home.path().join("tmp")).expect("temp TMPDIR");
        let mut c = Claude {
            bin,
            home,
            work,
            env: Vec::new(),
            args: Vec::new(),
        };
        c = c.env("ANTHROPIC_BASE_URL", &api.base_url());
        c = c.env("NODE_EXTRA_CA_CERTS", &api.ca_pem_path().to_string_lossy());
        // Even with a base URL, Claude Code sends its side traffic (feature
        // flags, telemetry) to api.anthropic.com: through the stand-in's
        // proxy it stays on this machine and is recorded.
        c = c.env("HTTPS_PROXY", &api.proxy_url()).env("NO_PROXY", "127.0.0.1");
        c.env("ANTHROPIC_API_KEY", API_KEY)
    }

    fn env(mut self, k: &str, v: &str) -> Claude {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.into(), v.into()));
        self
    }

    fn env_remove(mut self, k: &str) -> Claude {
        self.env.retain(|(key, _)| key != k);
        self
    }

    /// A subscription user: the OAuth token instead of the API key.
    fn subscription(self) -> Claude {
        self.env_remove("ANTHROPIC_API_KEY")
            .env("CLAUDE_CODE_OAUTH_TOKEN", OAUTH_TOKEN)
    }

    fn args(mut self, args: &[&str]) -> Claude {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    fn work(&self) -> &Path {
        self.work.path()
    }

    fn spawn(&self, prompt: &str) -> Running {
        let home = self.home.path();
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("HOME", home)
            .env("TMPDIR", home.join("tmp"))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.work.path())
            .args(["-p", "--output-format", "stream-json", "--verbose"])
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn claude");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(prompt.as_bytes()).expect("write the prompt");
        drop(stdin);
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            events: Vec::new(),
            stderr: Some(stderr),
            started,
        }
    }

    fn run(&self, prompt: &str) -> Job {
        self.spawn(prompt).finish()
    }
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    events: Vec<Value>,
    stderr: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl Running {
    /// Read events until one satisfies `pred`; fails at the deadline or EOF.
    fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let left = DEADLINE.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    self.events.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no {what} event; stream so far: {:#?}", self.events)
                }
            }
        }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Read to EOF (within the deadline) and reap.
    fn finish(mut self) -> Job {
        loop {
            let left = DEADLINE.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => match serde_json::from_str(&line) {
                    Ok(v) => self.events.push(v),
                    Err(e) => panic!("claude printed a line that is not JSON ({e}): {line}"),
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "claude still running after {DEADLINE:?}; stream so far: {:#?}",
                        self.events
                    )
                }
            }
        }
        let status = self.child.wait().expect("wait for claude");
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Job {
            events: self.events,
            stderr,
            status,
            elapsed: self.started.elapsed(),
        }
    }
}

struct Job {
    events: Vec<Value>,
    stderr: String,
    status: ExitStatus,
    elapsed: Duration,
}

impl Job {
    fn of(&self, ty: &str, subtype: Option<&str>) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["type"] == ty && subtype.is_none_or(|s| e["subtype"] == s))
            .collect()
    }

    fn result(&self) -> &Value {
        let r = self.of("result", None);
        assert_eq!(
            r.len(),
            1,
            "one result event expected; stderr: {}\nstream: {:#?}",
            self.stderr,
            self.events
        );
        r[0]
    }

    fn init(&self) -> &Value {
        self.of("system", Some("init"))
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no init: {:#?}", self.events))
    }

    /// `content` blocks of every `user` event that are tool results.
    fn tool_results(&self) -> Vec<&Value> {
        self.of("user", None)
            .into_iter()
            .flat_map(|e| e["message"]["content"].as_array().into_iter().flatten())
            .filter(|b| b["type"] == "tool_result")
            .collect()
    }

    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

fn usage4(v: &Value) -> [u64; 4] {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("usage.{k} missing in {v}"));
    [
        n("input_tokens"),
        n("cache_creation_input_tokens"),
        n("cache_read_input_tokens"),
        n("output_tokens"),
    ]
}

fn messages(api: &StandIn) -> Vec<Recorded> {
    api.requests().into_iter().filter(Recorded::is_messages).collect()
}

fn summary(label: &str, api: &StandIn, job: &Job) {
    let reqs: Vec<String> = api
        .requests()
        .iter()
        .map(|r| format!("{} {} {}B -> {} {}", r.method, r.path, r.body_bytes, r.status, r.reply))
        .collect();
    eprintln!("{label}: {:?}, exit {:?}, requests: {reqs:#?}", job.elapsed, job.status);
}

#[test]
fn one_turn_text_answer_reports_the_exact_usage() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api);
    let job = claude.run("Say the word. scenario:text say=standin-ok");
    summary("text", &api, &job);
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);

    let init = job.init();
    assert_eq!(init["claude_code_version"], "2.1.332");
    assert_eq!(init["apiKeySource"], "ANTHROPIC_API_KEY");
    assert_eq!(init["permissionMode"], "default");

    let r = job.result();
    assert_eq!(r["subtype"], "success");
    assert_eq!(r["is_error"], false);
    assert_eq!(r["terminal_reason"], "completed");
    assert_eq!(r["num_turns"], 1);
    assert_eq!(r["result"], "standin-ok");
    assert_eq!(usage4(&r["usage"]), [4, 12_000, 9_000, 60]);
    assert!(r["total_cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    assert_eq!(r["permission_denials"], json!([]));
    // The assistant event carries `message_start`'s usage (output 1), not
    // the final count: only the result has the real output tokens.
    let assistant = job.of("assistant", None);
    assert_eq!(assistant.len(), 1);
    assert_eq!(usage4(&assistant[0]["message"]["usage"]), [4, 12_000, 9_000, 1]);

    let all = api.requests();
    let m = messages(&api);
    assert_eq!(m.len(), 1, "one Messages call for a one-turn job: {all:#?}");
    let m = &m[0];
    assert_eq!(m.path, "/v1/messages?beta=true");
    assert_eq!(m.credential(), "x-api-key");
    assert_eq!(m.api_key_sha256.as_deref(), Some(sha(API_KEY).as_str()));
    assert_eq!(m.anthropic_version.as_deref(), Some("2023-06-01"));
    assert!(
        m.anthropic_beta
            .as_deref()
            .unwrap_or("")
            .split(',')
            .any(|b| b == "claude-code-20250219"),
        "{m:?}"
    );
    assert!(
        m.user_agent.as_deref().unwrap_or("").starts_with("claude-cli/2.1.332 "),
        "{m:?}"
    );
    assert_eq!(m.stream, Some(true));
    assert!(m.tools >= 5, "{m:?}");
    assert!(
        m.body_bytes > 20_000,
        "Claude Code sends its whole system prompt and tools: {m:?}"
    );
    assert_eq!(
        (m.scenario.as_deref(), m.reply.as_str(), m.status),
        (Some("text"), "text", 200)
    );
    // The Messages call goes to the base URL, the rest to api.anthropic.com.
    assert_eq!(m.tls.sni, None);
    for r in all.iter().filter(|r| !r.is_messages()) {
        assert_eq!(r.tls.sni.as_deref(), Some("api.anthropic.com"), "{r:?}");
    }
    // HTTP/1.1 only: the runtime offers no h2.
    for r in &all {
        assert_eq!(r.http_version, "HTTP/1.1", "{r:?}");
        assert!(r.tls.alpn_offered.iter().all(|p| p == "http/1.1"), "{r:?}");
    }
}

#[test]
fn subscription_token_goes_as_a_bearer_token() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).subscription();
    let job = claude.run("hello scenario:text");
    summary("subscription", &api, &job);
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert_eq!(job.init()["apiKeySource"], "none");
    let r = job.result();
    assert_eq!(
        (r["subtype"].as_str(), r["is_error"].as_bool()),
        (Some("success"), Some(false))
    );
    assert_eq!(usage4(&r["usage"]), [4, 12_000, 9_000, 60]);
    // Subscriptions get a rate-limit status even when the API sent none.
    let rl = job.of("rate_limit_event", None);
    assert_eq!(rl.len(), 1, "{:#?}", job.events);
    assert_eq!(rl[0]["rate_limit_info"]["status"], "allowed");

    let m = messages(&api);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].credential(), "bearer");
    assert_eq!(m[0].bearer_sha256.as_deref(), Some(sha(OAUTH_TOKEN).as_str()));
    assert!(
        m[0].anthropic_beta
            .as_deref()
            .unwrap_or("")
            .split(',')
            .any(|b| b == "oauth-2025-04-20"),
        "{:?}",
        m[0]
    );
}

#[test]
fn ten_turn_job_runs_every_turn() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api);
    let job = claude.run("Work in steps. scenario:text turns=10 say=all-done");
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    let r = job.result();
    assert_eq!(
        (r["subtype"].as_str(), r["num_turns"].as_u64()),
        (Some("success"), Some(10))
    );
    assert_eq!(r["result"], "all-done");
    // Every request re-reads the cached prompt: ten times the one-turn usage.
    assert_eq!(usage4(&r["usage"]), [40, 120_000, 90_000, 600]);
    let results = job.tool_results();
    assert_eq!(results.len(), 9);
    assert!(results.iter().all(|b| b["is_error"] == false), "{results:#?}");

    let m = messages(&api);
    assert_eq!(
        m.iter().map(|r| r.tool_results).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let replies: Vec<&str> = m.iter().map(|r| r.reply.as_str()).collect();
    assert_eq!(replies[..9], ["tool_use:Bash"; 9]);
    assert_eq!(replies[9], "text");
}

#[test]
fn write_with_accept_edits_creates_the_file() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--permission-mode", "acceptEdits"]);
    let path = claude.work().join("made.txt");
    let job = claude.run(&format!(
        "scenario:write path={} content=\"written by the stand-in\"",
        path.display()
    ));
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert_eq!(
        std::fs::read_to_string(&path).expect("the file Claude Code wrote"),
        "written by the stand-in"
    );
    let r = job.result();
    assert_eq!(r["permission_denials"], json!([]));
    assert!(
        r["result"].as_str().unwrap_or("").starts_with(&format!(
            "tool result: File created successfully at: {}",
            path.display()
        )),
        "{r}"
    );
    assert_eq!(job.init()["permissionMode"], "acceptEdits");
}

#[test]
fn write_in_default_mode_is_denied_and_the_job_still_succeeds() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--permission-mode", "default"]);
    let path = claude.work().join("denied.txt");
    let job = claude.run("scenario:write path=denied.txt content=nope");
    summary("write denied", &api, &job);
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert!(!path.exists(), "a denied Write must not create the file");
    let want = format!(
        "Claude requested permissions to write to {}, but you haven't granted it yet.",
        path.display()
    );

    let denied = job.of("system", Some("permission_denied"));
    assert_eq!(denied.len(), 1, "{:#?}", job.events);
    assert_eq!(denied[0]["tool_name"], "Write");
    assert_eq!(denied[0]["message"], want.as_str());
    let results = job.tool_results();
    assert_eq!(
        (results[0]["is_error"].as_bool(), results[0]["content"].as_str()),
        (Some(true), Some(want.as_str()))
    );

    let r = job.result();
    assert_eq!(
        (r["subtype"].as_str(), r["is_error"].as_bool()),
        (Some("success"), Some(false))
    );
    assert_eq!(r["terminal_reason"], "completed");
    let d = &r["permission_denials"];
    assert_eq!(d.as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(d[0]["tool_name"], "Write");
    assert_eq!(d[0]["tool_input"]["file_path"], path.to_string_lossy().as_ref());
    assert_eq!(r["result"], format!("tool error: {want}").as_str());
}

#[test]
fn edit_reads_first_then_edits() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--permission-mode", "acceptEdits"]);
    let path = claude.work().join("notes.txt");
    std::fs::write(&path, "alpha beta\n").expect("seed file");
    let job = claude.run(&format!("scenario:edit path={} old=beta new=gamma", path.display()));
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert_eq!(std::fs::read_to_string(&path).expect("edited file"), "alpha gamma\n");
    let replies: Vec<String> = messages(&api).into_iter().map(|r| r.reply).collect();
    assert_eq!(replies, ["tool_use:Read", "tool_use:Edit", "text"]);
    assert!(
        job.tool_results().iter().all(|b| b["is_error"] != true),
        "{:#?}",
        job.events
    );
    assert_eq!(job.result()["permission_denials"], json!([]));
}

#[test]
fn bash_answer_quotes_what_ran_and_what_was_refused() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api);
    // A read-only command runs without asking, even in the default mode.
    let job = claude.run("scenario:bash cmd=\"echo standin-bash\"");
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert_eq!(job.result()["result"], "tool result: standin-bash");
    assert_eq!(job.result()["permission_denials"], json!([]));

    // One that changes files is refused.
    let job = claude.run("scenario:bash cmd=\"touch made-by-bash\"");
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert!(!claude.work().join("made-by-bash").exists());
    let denied = job.of("system", Some("permission_denied"));
    assert_eq!(denied.len(), 1, "{:#?}", job.events);
    assert_eq!(denied[0]["tool_name"], "Bash");
    let r = job.result();
    assert!(
        r["result"].as_str().unwrap_or("").starts_with("tool error: touch in "),
        "{r}"
    );
    assert_eq!(
        r["permission_denials"][0]["tool_input"]["command"],
        "touch made-by-bash"
    );
}

#[test]
fn max_turns_ends_the_job_as_an_error() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--max-turns", "2"]);
    let job = claude.run("scenario:text turns=10");
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let r = job.result();
    assert_eq!(r["subtype"], "error_max_turns");
    assert_eq!(r["is_error"], true);
    assert_eq!(r["terminal_reason"], "max_turns");
    assert_eq!(r["errors"], json!(["Reached maximum number of turns (2)"]));
    assert_eq!(r.get("result"), None, "{r}");
    // It counts the turn it refused to start.
    assert_eq!(r["num_turns"], 3);
    assert_eq!(usage4(&r["usage"]), [8, 24_000, 18_000, 120]);
    assert_eq!(messages(&api).len(), 2);
}

#[test]
fn budget_ends_the_job_as_an_error_with_the_usage_only_in_model_usage() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--max-budget-usd", "1"]);
    let job = claude.run("scenario:expensive");
    summary("budget", &api, &job);
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let r = job.result();
    assert_eq!(r["subtype"], "error_max_budget_usd");
    assert_eq!(r["is_error"], true);
    assert_eq!(r["terminal_reason"], "budget_exhausted");
    assert_eq!(r["errors"], json!(["Reached maximum budget ($1)"]));
    assert!(r["total_cost_usd"].as_f64().is_some_and(|c| c > 1.0), "{r}");
    assert_eq!(r["num_turns"], 1);
    // The result's `usage` is all zeros here; what was spent is in
    // `modelUsage` (and in the assistant events).
    assert_eq!(usage4(&r["usage"]), [0, 0, 0, 0]);
    let by_model = r["modelUsage"].as_object().expect("modelUsage");
    assert_eq!(by_model.len(), 1);
    let (_, mu) = by_model.iter().next().expect("one model");
    assert_eq!(
        (mu["inputTokens"].as_u64(), mu["outputTokens"].as_u64()),
        (Some(2_000_000), Some(1_000))
    );
    assert_eq!(
        messages(&api).len(),
        1,
        "the budget stops the job after the first answer"
    );
}

#[test]
fn invalid_api_key_is_retried_and_then_reported() {
    let api = StandIn::start();
    // Bounded: the default is 10 retries with backoff up to ~32 s each.
    let claude = claude_or_skip!(api).env("CLAUDE_CODE_MAX_RETRIES", "2");
    let job = claude.run("scenario:auth");
    summary("auth", &api, &job);
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let retries = job.of("system", Some("api_retry"));
    assert_eq!(retries.len(), 2, "{:#?}", job.events);
    for (i, e) in retries.iter().enumerate() {
        assert_eq!(e["attempt"], i + 1);
        assert_eq!(e["max_retries"], 2);
        assert_eq!(e["error_status"], 401);
        assert_eq!(e["error"], "authentication_failed");
        assert!(e["retry_delay_ms"].as_u64().is_some_and(|d| d > 0), "{e}");
    }
    let a = job.of("assistant", None);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["error"], "authentication_failed");
    assert_eq!(a[0]["message"]["model"], "<synthetic>");
    let r = job.result();
    assert_eq!(
        (r["subtype"].as_str(), r["is_error"].as_bool()),
        (Some("success"), Some(true))
    );
    assert_eq!(r["terminal_reason"], "api_error");
    assert_eq!(r["api_error_status"], 401);
    assert_eq!(r["api_error_type"], "authentication_error");
    assert_eq!(r["result"], "Invalid API key · Fix external API key");
    let m = messages(&api);
    assert_eq!(m.len(), 3);
    assert!(
        m.iter()
            .all(|r| r.status == 401 && r.retry_count.as_deref() == Some("0")),
        "{m:#?}"
    );
}

#[test]
fn invalid_api_key_announces_ten_retries_by_default() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api);
    let mut run = claude.spawn("scenario:auth");
    let first = run.wait_event("api_retry", |e| e["subtype"] == "api_retry");
    // This is where a job must stop: waiting out the retries takes minutes.
    run.signal(libc::SIGKILL);
    let _ = run.finish();
    assert_eq!(
        (first["attempt"].as_u64(), first["max_retries"].as_u64()),
        (Some(1), Some(10)),
        "{first}"
    );
    assert_eq!(first["error_status"], 401);
}

#[test]
fn rejected_subscription_token_says_not_logged_in() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).subscription().env("CLAUDE_CODE_MAX_RETRIES", "2");
    let job = claude.run("scenario:auth");
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let r = job.result();
    assert_eq!(
        (r["is_error"].as_bool(), r["api_error_status"].as_u64()),
        (Some(true), Some(401))
    );
    assert_eq!(r["result"], "Not logged in · Please run /login");
    assert!(job
        .of("system", Some("api_retry"))
        .iter()
        .all(|e| e["error"] == "authentication_failed"));
}

#[test]
fn overloaded_is_retried_until_it_clears() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api);
    let job = claude.run("scenario:overloaded fail=2");
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    let retries = job.of("system", Some("api_retry"));
    assert_eq!(retries.len(), 2, "{:#?}", job.events);
    assert!(retries
        .iter()
        .all(|e| e["error_status"] == 529 && e["error"] == "overloaded" && e["max_retries"] == 10));
    let r = job.result();
    assert_eq!(
        (r["subtype"].as_str(), r["is_error"].as_bool()),
        (Some("success"), Some(false))
    );
    assert_eq!(usage4(&r["usage"]), [4, 12_000, 9_000, 60]);
    let statuses: Vec<u16> = messages(&api).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [529, 529, 200]);
}

#[test]
fn overloaded_that_persists_ends_as_an_api_error() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).env("CLAUDE_CODE_MAX_RETRIES", "1");
    let job = claude.run("scenario:overloaded");
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let r = job.result();
    assert_eq!(
        (r["is_error"].as_bool(), r["terminal_reason"].as_str()),
        (Some(true), Some("api_error"))
    );
    assert_eq!(
        (r["api_error_status"].as_u64(), r["api_error_type"].as_str()),
        (Some(529), Some("overloaded_error"))
    );
    assert!(
        r["result"]
            .as_str()
            .unwrap_or("")
            .starts_with("API Error: 529 Overloaded."),
        "{r}"
    );
    assert_eq!(job.of("assistant", None)[0]["error"], "server_error");
}

#[test]
fn internal_server_error_is_retried_as_a_server_error() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).env("CLAUDE_CODE_MAX_RETRIES", "1");
    let job = claude.run("scenario:fail500");
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let retries = job.of("system", Some("api_retry"));
    assert_eq!(retries.len(), 1);
    assert_eq!(
        (retries[0]["error_status"].as_u64(), retries[0]["error"].as_str()),
        (Some(500), Some("server_error"))
    );
    let r = job.result();
    assert_eq!(
        (r["api_error_status"].as_u64(), r["api_error_type"].as_str()),
        (Some(500), Some("api_error"))
    );
    assert!(r["result"].as_str().unwrap_or("").starts_with("API Error: 500 "), "{r}");
}

#[test]
fn subscription_limit_is_a_rate_limit_event_and_no_retry() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).subscription();
    let job = claude.run("scenario:ratelimit");
    assert_eq!(job.code(), Some(1), "stderr: {}", job.stderr);
    let rl = job.of("rate_limit_event", None);
    assert_eq!(rl.len(), 1, "{:#?}", job.events);
    let info = &rl[0]["rate_limit_info"];
    assert_eq!(
        (info["status"].as_str(), info["rateLimitType"].as_str()),
        (Some("rejected"), Some("five_hour"))
    );
    assert!(info["resetsAt"].as_u64().is_some_and(|t| t > 1_700_000_000), "{info}");
    let r = job.result();
    assert_eq!(
        (r["is_error"].as_bool(), r["api_error_status"].as_u64()),
        (Some(true), Some(429))
    );
    assert_eq!(r["api_error"], "usage_limit_reached");
    assert!(
        r["result"].as_str().unwrap_or("").starts_with("You've hit your limit"),
        "{r}"
    );
    assert_eq!(messages(&api).len(), 1, "a subscription limit is not retried");
}

/// Start a `stall` job and wait until Claude Code has the partial answer.
fn stalled(claude: &Claude) -> Running {
    let mut run = claude.spawn("scenario:stall");
    let start = run.wait_event("message_start", |e| {
        e["type"] == "stream_event" && e["event"]["type"] == "message_start"
    });
    assert_eq!(usage4(&start["event"]["message"]["usage"]), [4, 12_000, 9_000, 1]);
    run.wait_event("text delta", |e| {
        e["type"] == "stream_event" && e["event"]["type"] == "content_block_delta"
    });
    run
}

#[test]
fn stall_then_sigint_reports_what_was_spent() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--include-partial-messages"]);
    let run = stalled(&claude);
    run.signal(libc::SIGINT);
    let job = run.finish();
    // SIGINT is a user interrupt: exit 0, and a result with the cost so far.
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    let a = job.of("assistant", None);
    assert_eq!(a.len(), 1);
    assert_eq!(usage4(&a[0]["message"]["usage"]), [4, 12_000, 9_000, 1]);
    let r = job.result();
    assert_eq!(r["subtype"], "error_during_execution");
    assert_eq!(r["is_error"], true);
    assert_eq!(r["terminal_reason"], "aborted_streaming");
    assert!(r["total_cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    assert_eq!(
        usage4(&r["usage"]),
        [0, 0, 0, 0],
        "the result's usage is zero; modelUsage has it"
    );
    let (_, mu) = r["modelUsage"]
        .as_object()
        .and_then(|m| m.iter().next())
        .expect("modelUsage");
    assert_eq!(
        (
            mu["inputTokens"].as_u64(),
            mu["cacheCreationInputTokens"].as_u64(),
            mu["cacheReadInputTokens"].as_u64()
        ),
        (Some(4), Some(12_000), Some(9_000))
    );
}

#[test]
fn stall_then_sigterm_ends_without_a_result() {
    use std::os::unix::process::ExitStatusExt;
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--include-partial-messages"]);
    let run = stalled(&claude);
    run.signal(libc::SIGTERM);
    let job = run.finish();
    // Only the partial-message events carried the usage; nothing more comes.
    assert!(job.of("result", None).is_empty(), "{:#?}", job.events);
    assert!(job.of("assistant", None).is_empty(), "{:#?}", job.events);
    assert_eq!((job.code(), job.status.signal()), (Some(143), None), "{:?}", job.status);
}

#[test]
fn stall_then_sigkill_ends_without_a_result() {
    use std::os::unix::process::ExitStatusExt;
    let api = StandIn::start();
    let claude = claude_or_skip!(api).args(&["--include-partial-messages"]);
    let run = stalled(&claude);
    run.signal(libc::SIGKILL);
    let job = run.finish();
    assert!(job.of("result", None).is_empty());
    assert_eq!(job.status.signal(), Some(libc::SIGKILL));
}

#[test]
fn https_proxy_connect_reaches_the_stand_in_as_api_anthropic_com() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api)
        .env_remove("ANTHROPIC_BASE_URL")
        .env("HTTPS_PROXY", &api.proxy_url());
    let job = claude.run("hello scenario:text");
    summary("proxy", &api, &job);
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    assert_eq!(usage4(&job.result()["usage"]), [4, 12_000, 9_000, 60]);
    let connects = api.connects();
    assert!(!connects.is_empty());
    for c in &connects {
        assert_eq!(
            (c.method.as_str(), c.target.as_str(), c.tunnelled),
            ("CONNECT", "api.anthropic.com:443", true),
            "{c:?}"
        );
    }
    let all = api.requests();
    assert!(
        all.iter().all(|r| r.tls.sni.as_deref() == Some("api.anthropic.com")),
        "{all:#?}"
    );
    assert_eq!(messages(&api).len(), 1);
    // Without a base URL Claude Code also fetches settings and flags and
    // posts telemetry to the same host.
    assert!(all.iter().any(|r| r.path == "/api/claude_code/settings"), "{all:#?}");
}

#[test]
fn without_nonessential_traffic_only_settings_and_messages_are_fetched() {
    let api = StandIn::start();
    let claude = claude_or_skip!(api)
        .env_remove("ANTHROPIC_BASE_URL")
        .env("HTTPS_PROXY", &api.proxy_url())
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
    let job = claude.run("hello scenario:text");
    summary("proxy, no nonessential traffic", &api, &job);
    assert_eq!(job.code(), Some(0), "stderr: {}", job.stderr);
    let mut paths: Vec<String> = api
        .requests()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "GET /api/claude_code/policy_limits",
            "GET /api/claude_code/settings",
            "POST /v1/messages?beta=true"
        ]
    );
}

// The stand-in on its own, without Claude Code: shapes a client that is not
// Claude Code (the product's tests, scripts) relies on.

#[test]
fn markers_carry_words_and_quoted_values() {
    let s = Scenario::find("do it scenario:write path=a.txt content=\"two words\\n\" x=1 trailing words\nnext=no")
        .expect("a marker");
    assert_eq!(s.name, "write");
    assert_eq!(s.args.get("path").map(String::as_str), Some("a.txt"));
    assert_eq!(s.args.get("content").map(String::as_str), Some("two words\n"));
    assert_eq!(s.args.len(), 3, "{s:?}");
    assert_eq!(Scenario::find("no marker here"), None);
}

/// One HTTP/1.1 request over TLS to the stand-in, trusting only its CA and
/// checking its certificate for `name`; returns status, headers and body.
fn https(api: &StandIn, name: &str, head: &str, body: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, pki_types::ServerName};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(api.ca_pem_path()).expect("CA file");
        roots
            .add(CertificateDer::from_pem_slice(&pem).expect("CA PEM"))
            .expect("CA");
        let cfg = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(api.addr()).await.expect("connect");
        let name = ServerName::try_from(name.to_owned()).expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("TLS");
        let req = format!(
            "{head}\r\nHost: api.anthropic.com\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let out = String::from_utf8(out).expect("UTF-8 answer");
        let (headers, body) = out.split_once("\r\n\r\n").expect("head and body");
        let status = headers.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
        (status, headers.to_ascii_lowercase(), body.to_owned())
    })
}

#[test]
fn stand_in_answers_non_streaming_calls_with_one_message() {
    let api = StandIn::start();
    let body = json!({
        "model": "claude-test", "max_tokens": 10, "stream": false,
        "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi scenario:text say=plain usage=1,2,3,4" }] }],
    });
    let (status, headers, body) = https(
        &api,
        "api.anthropic.com",
        "POST /v1/messages HTTP/1.1",
        &body.to_string(),
    );
    assert_eq!(status, 200, "{headers}{body}");
    assert!(headers.contains("content-type: application/json"), "{headers}");
    assert!(headers.contains("request-id: req_"), "{headers}");
    let m: Value = serde_json::from_str(&body).expect("JSON message");
    assert_eq!(
        (m["type"].as_str(), m["role"].as_str(), m["model"].as_str()),
        (Some("message"), Some("assistant"), Some("claude-test"))
    );
    assert_eq!(m["content"], json!([{ "type": "text", "text": "plain" }]));
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(usage4(&m["usage"]), [1, 2, 3, 4]);
    let r = &api.requests()[0];
    assert_eq!((r.stream, r.messages, r.credential()), (Some(false), 1, "none"));
}

#[test]
fn stand_in_answers_other_endpoints_like_the_api() {
    let api = StandIn::start();
    let (status, _, body) = https(
        &api,
        "localhost",
        "POST /v1/messages/count_tokens HTTP/1.1",
        "{\"messages\":[]}",
    );
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<Value>(&body).expect("JSON")["input_tokens"]
            .as_u64()
            .is_some(),
        "{body}"
    );

    let (status, _, body) = https(&api, "api.anthropic.com", "GET /v1/models HTTP/1.1", "");
    assert_eq!(status, 404);
    let e: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(
        (e["type"].as_str(), e["error"]["type"].as_str()),
        (Some("error"), Some("not_found_error"))
    );

    let auth = json!({ "model": "m", "messages": [{ "role": "user", "content": "scenario:auth" }] });
    let (status, _, body) = https(
        &api,
        "api.anthropic.com",
        "POST /v1/messages HTTP/1.1\r\nx-api-key: k",
        &auth.to_string(),
    );
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["error"]["message"],
        "invalid x-api-key"
    );
    let typo = json!({ "model": "m", "messages": [{ "role": "user", "content": "scenario:wirte path=x" }] });
    let (status, _, body) = https(
        &api,
        "api.anthropic.com",
        "POST /v1/messages HTTP/1.1",
        &typo.to_string(),
    );
    assert_eq!(status, 400);
    let msg = serde_json::from_str::<Value>(&body).expect("JSON")["error"]["message"].to_string();
    assert!(msg.contains("unknown stand-in scenario `wirte`"), "{msg}");
    let seen = api.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        seen[2].api_key_sha256.as_deref(),
        Some(sha("k").as_str()),
        "only the hash is kept"
    );
    assert_eq!(seen[1].reply, "error:404");
}

#[test]
fn stand_in_proxy_refuses_other_targets() {
    use std::net::TcpStream;
    let api = StandIn::start();
    let addr = api.proxy_url().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).expect("proxy");
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .expect("send");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).expect("answer");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let c = api.connects();
    assert_eq!(
        (c.len(), c[0].target.as_str(), c[0].tunnelled),
        (1, "example.com:443", false)
    );
}
