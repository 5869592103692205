//! Egress on the real engine, with no internet: a job reaches the allowed
//! host through our proxy and nothing else, not even the host it runs on.
//!
//! The "HTTPS endpoint" standing in for `api.anthropic.com:443` is a plain
//! TCP echo server (busybox `nc -e cat`) in a container on a separate,
//! ordinary test network: the CONNECT tunnel is opaque bytes, so TLS adds
//! nothing to what is tested. `CMM_EGRESS_RESOLVE` (test only) tells the
//! proxy where that name connects. The host reaches the stand-in directly;
//! the job container must not.

mod common;
#[path = "common/docker.rs"]
mod docker;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use common::{docker_available, wait_some, Cmm};
use docker::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Tests here share the one egress network (and `clean` removes it).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const TEST_LABEL: &str = "dev.claude-max-market.test";

/// The fake-claude image for this fixture's contents: a tag of its own, so
/// a changed fixture is rebuilt and other tests' image is left alone.
fn egress_image() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-claude");
    let mut h = Sha256::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        h.update(std::fs::read(p).unwrap());
    }
    let tag = format!("cmm-fake-claude:egress-{}", &hex::encode(h.finalize())[..12]);
    build_fixture_image(&tag);
    tag
}

/// A test network and the stand-in endpoint on it, removed on drop.
struct StandIn {
    network: String,
    container: String,
    ip: String,
}

impl StandIn {
    fn start(image: &str) -> StandIn {
        let suffix = hex::encode(rand::random::<[u8; 4]>());
        let network = format!("cmm-egress-test-{suffix}");
        let (ok, _, err) = docker(&[
            "network",
            "create",
            "--label",
            &format!("{TEST_LABEL}=egress"),
            &network,
        ]);
        assert!(ok, "create test network: {err}");
        let mut s = StandIn {
            network: network.clone(),
            container: String::new(),
            ip: String::new(),
        };
        let (ok, out, err) = docker(&[
            "run",
            "-d",
            "--name",
            &format!("cmm-egress-standin-{suffix}"),
            "--label",
            &format!("{TEST_LABEL}=egress"),
            "--network",
            &network,
            "--entrypoint",
            "/bin/busybox",
            image,
            "nc",
            "-ll",
            "-p",
            "8443",
            "-e",
            "/bin/cat",
        ]);
        assert!(ok, "start the stand-in endpoint: {err}");
        s.container = out.trim().to_string();
        let (_, ip, _) = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &s.container,
        ]);
        s.ip = ip.trim().to_string();
        assert!(!s.ip.is_empty(), "the stand-in has no address");
        s
    }

    fn addr(&self) -> String {
        format!("{}:8443", self.ip)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if !self.container.is_empty() {
            docker(&["rm", "-f", &self.container]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

/// The host reaches the stand-in directly, so "blocked" from the job means
/// the job's network blocks it, not that the endpoint is down.
fn echo_from_host(addr: &str) -> String {
    // Until the stand-in answers: it may still be starting.
    wait_some(Duration::from_secs(10), || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"ping-host\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (!out.is_empty()).then_some(out)
    })
    .unwrap_or_default()
}

/// A service on the host listening on all interfaces, counting who connects.
struct HostService {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostService {
    fn start() -> HostService {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(c);
            }
        });
        HostService { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Every IPv4 address of this host but loopback, and the default bridge's
/// gateway: the addresses a container could try to reach the host by.
fn host_addresses() -> Vec<String> {
    let mut out = Vec::new();
    let (ok, gw, _) = docker(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        "bridge",
    ]);
    if ok {
        out.extend(gw.split_whitespace().map(str::to_string));
    }
    let ip = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output();
    if let Ok(o) = ip {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let mut w = line.split_whitespace();
            while let Some(x) = w.next() {
                if x == "inet" {
                    if let Some(a) = w.next().and_then(|a| a.split('/').next()) {
                        if !a.starts_with("127.") && !out.iter().any(|o| o == a) {
                            out.push(a.to_string());
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn a_job_reaches_the_allowed_host_through_the_proxy_and_nothing_else() {
    if !docker_available("a_job_reaches_the_allowed_host_through_the_proxy_and_nothing_else") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let image = egress_image();
    let stand_in = StandIn::start(&image);
    assert_eq!(echo_from_host(&stand_in.addr()), "ping-host\n");
    // A host service on all interfaces. An ordinary container reaches it
    // (so "blocked" below means the job's network blocks it).
    let service = HostService::start();
    let hosts: Vec<String> = host_addresses()
        .iter()
        .map(|a| format!("{a}:{}", service.port))
        .collect();
    assert!(!hosts.is_empty(), "no host address found");
    let gateway = &hosts[0];
    let (ok, _, err) = docker(&[
        "run",
        "--rm",
        "--label",
        &format!("{TEST_LABEL}=egress"),
        "--entrypoint",
        "/bin/busybox",
        &image,
        "sh",
        "-c",
        &format!(
            "echo hi | nc -w 3 {} {}",
            gateway.rsplit_once(':').unwrap().0,
            service.port
        ),
    ]);
    assert!(ok, "control: {err}");
    let control = service.accepted();
    assert!(
        control >= 1,
        "an ordinary container reaches the host service at {gateway}"
    );

    let t = job_env().env(
        "CMM_EGRESS_RESOLVE",
        &format!(
            "api.anthropic.com:443={a},other.example.com:443={a}",
            a = stand_in.addr()
        ),
    );
    let out = t.run(&[
        "execute",
        "--json",
        "--approve-all",
        "--image",
        &image,
        "--prompt",
        &format!("scenario:egress direct={} hosts={}", stand_in.addr(), hosts.join(",")),
    ]);
    out.code(0);
    let v = out.json();
    // What the job itself could reach, in its own words.
    assert_eq!(
        v["result"],
        "egress allowed=reached other=403 plain=403 direct=blocked host=blocked udp=blocked dns=blocked ipv6=blocked ipv6_disabled=1",
        "{v:#}"
    );
    assert_eq!(service.accepted(), control, "the host service saw nothing from the job");

    // The proxy's counts, per target, in the record.
    let job_id = v["job_id"].as_str().unwrap();
    let rec = job_record(&t, job_id);
    let e = &rec["egress"];
    assert_eq!(e["mode"], "restricted");
    assert_eq!(
        (e["allowed"].as_u64(), e["refused"].as_u64()),
        (Some(1), Some(2)),
        "{e:#}"
    );
    let target = |h: &str| -> Value {
        e["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["host"] == h)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(target("api.anthropic.com:443")["allowed"], 1);
    assert_eq!(target("other.example.com:443")["refused"], 1);
    // The plain GET, refused by method.
    assert_eq!(target("api.anthropic.com")["refused"], 1);

    // The audit log carries numbers only.
    let term = terminal_event(&t, job_id);
    assert_eq!(term["event"], "job.completed");
    assert_eq!(term["egress"], "restricted");
    assert_eq!(term["egress_allowed"], 1);
    assert_eq!(term["egress_refused"], 2);
    assert!(!t.read("audit.jsonl").contains("other.example.com"));

    // The job left no container and no socket.
    assert!(containers_of_job(job_id).is_empty());
    let base = relay_base();
    let sock = base.join(format!("egress-{job_id}.sock"));
    assert!(!sock.exists(), "{} is left behind", sock.display());

    // An allowed name whose upstream is down is a failed tunnel, with the
    // reason, not an allowed one.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t = job_env().env("CMM_EGRESS_RESOLVE", &format!("api.anthropic.com:443={dead}"));
    let out = t.run(&[
        "execute",
        "--json",
        "--approve-all",
        "--image",
        &image,
        "--prompt",
        "scenario:egress",
    ]);
    out.code(0);
    let v = out.json();
    assert!(v["result"].as_str().unwrap().contains("allowed=failed"), "{v:#}");
    let e = &v["egress"];
    assert_eq!(
        (e["allowed"].as_u64(), e["failed"].as_u64()),
        (Some(0), Some(1)),
        "{e:#}"
    );
    let api = e["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["host"] == "api.anthropic.com:443")
        .cloned()
        .unwrap();
    assert!(
        api["last_error"].as_str().unwrap().contains("refused"),
        "the reason is kept: {api:#}"
    );
    let term = terminal_event(&t, v["job_id"].as_str().unwrap());
    assert_eq!(
        (term["egress_allowed"].as_u64(), term["egress_failed"].as_u64()),
        (Some(0), Some(1))
    );
}

#[test]
fn a_killed_jobs_socket_is_swept_by_clean() {
    if !docker_available("a_killed_jobs_socket_is_swept_by_clean") {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let base = relay_base();
    std::fs::create_dir_all(&base).unwrap();
    // A socket whose listener is gone, as a `kill -9`ed execute leaves it.
    let stale = base.join("egress-test-stale.sock");
    let _ = std::fs::remove_file(&stale);
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    // And a live one that must stay.
    let live = base.join("egress-test-live.sock");
    let _ = std::fs::remove_file(&live);
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let t = job_env();
    let c = t.run(&["clean", "--json"]).code(0).json();
    assert!(c["relay_files_removed"].as_u64().unwrap() >= 1, "{c:#}");
    assert!(!stale.exists());
    assert!(live.exists());
    std::fs::remove_file(&live).unwrap();
}

#[test]
fn a_relay_directory_that_is_not_ours_stops_the_job_before_it_starts() {
    if !docker_available("a_relay_directory_that_is_not_ours_stops_the_job_before_it_starts") {
        return;
    }
    let image = egress_image();
    let runtime = tempfile::tempdir().unwrap();
    // Something else holds the relay directory's name.
    std::fs::write(runtime.path().join("claude-max-market"), b"not a directory").unwrap();
    let t = job_env().env("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap());
    let out = t.run(&["execute", "--approve-all", "--image", &image, "--prompt", "hi"]);
    out.code(4)
        .stderr_has("egress relay")
        .stderr_has("must be a directory owned by you");
    let events = audit_events(&t);
    assert!(events_named(&events, "job.started").is_empty(), "the job never started");
    assert_eq!(usage_today(&t), (0, 0, 0), "nothing counted or left reserved");
}

#[test]
fn open_egress_is_a_warning_in_health_and_compliance() {
    let t = Cmm::opted_in();
    let v = t.run(&["compliance-check", "--json"]).json();
    let check = |v: &Value, id: &str| -> Value {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(check(&v, "egress-restricted")["level"], "OK", "{v:#}");

    t.run(&["config", "--set", "docker.egress=open"]).code(0);
    let v = t.run(&["compliance-check", "--json"]).json();
    let c = check(&v, "egress-restricted");
    assert_eq!(c["level"], "WARNING", "{v:#}");
    assert!(c["message"].as_str().unwrap().contains("docker.egress"));

    let h = t.run(&["health", "--json"]).json();
    let egress = h["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "egress")
        .cloned()
        .unwrap_or(Value::Null);
    // Health's Docker-side checks need an engine; without one there is no line.
    if !docker_available("open_egress_is_a_warning_in_health_and_compliance (engine part)") {
        return;
    }
    assert_eq!(egress["level"], "WARNING", "{h:#}");

    // An open job runs on `docker.network` without a proxy, and says so
    // (not while another test here runs `clean`).
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let image = egress_image();
    let t = t.env("CLAUDE_CODE_OAUTH_TOKEN", TOKEN);
    let v = t
        .run(&[
            "execute",
            "--json",
            "--approve-all",
            "--image",
            &image,
            "--prompt",
            "hi",
        ])
        .code(0)
        .json();
    let job_id = v["job_id"].as_str().unwrap();
    assert_eq!(job_record(&t, job_id)["egress"]["mode"], "open");
    let term = terminal_event(&t, job_id);
    assert_eq!(
        (term["egress"].as_str(), term["egress_allowed"].as_u64()),
        (Some("open"), Some(0))
    );
}
