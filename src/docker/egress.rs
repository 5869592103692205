//! The job container's only way out: an HTTPS `CONNECT` proxy of ours,
//! reached through a Unix socket.
//!
//! Why this shape: a firewall script inside the container needs NET_ADMIN,
//! resolves names once and usually forgets IPv6 and UDP; an internal Docker
//! network still leaves the host's own addresses (its bridge gateway)
//! reachable, so a host service listening on all interfaces would be too.
//! Here the job container has no network at all (`NetworkMode: none`: no
//! route, no DNS, no IPv6, no host address) and no capability. Its one way
//! out is a Unix socket, mounted read-only, on which this proxy listens in
//! the `execute` process; the relay ([`super::relay`]) turns the container's
//! `HTTPS_PROXY=http://127.0.0.1:3128` into connections on that socket. The
//! proxy runs as a tokio task of `execute`, so its counters belong to exactly
//! one job and it ends when the job does; its socket is removed with it, and
//! `clean` removes any a killed `execute` left.
//!
//! The policy is the `egress` section of the security profile
//! ([`super::profile`]). This module owns the proxy, its counts and the
//! clean-up of old networks; it must not parse the profile, build the
//! container request (that is `hardening`'s) or import it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::query_parameters::ListNetworksOptions;
use bollard::Docker;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};

use super::profile::split_target;
use super::DockerError;

// The `egress` section, under the names the rest of the crate knows it by
// here.
pub use super::profile::{egress as profile, EgressProfile};

/// Test-only name mapping: `host:port=ip:port[,…]`. The proxy still checks
/// the allowlist against the requested name; this only changes where an
/// allowed name connects, so tests can stand a local endpoint in for the
/// Claude API without DNS or internet.
pub const RESOLVE_ENV: &str = "CMM_EGRESS_RESOLVE";

/// Is egress restricted for this config (`docker.egress`)?
pub fn restricted(cfg: &crate::config::Config) -> bool {
    cfg.settings().docker.egress_restricted
}

// ---------------------------------------------------------------------------
// Networks of earlier versions

/// Earlier versions put job containers on a shared, labelled internal
/// network; `clean` removes such networks (ours by label) that no container
/// uses.
/// Returns how many were removed.
pub async fn remove_idle_networks(docker: &Docker, label: &str) -> Result<usize, DockerError> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{label}=true")])]);
    let list = docker
        .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
        .await?;
    let mut removed = 0;
    for n in list {
        let ours = n
            .labels
            .as_ref()
            .is_some_and(|l| l.get(label).map(String::as_str) == Some("true"));
        let Some(id) = n.id.filter(|_| ours) else { continue };
        // The list does not say who is attached; inspect does.
        let attached = docker
            .inspect_network(&id, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await
            .map(|i| i.containers.is_some_and(|c| !c.is_empty()))
            .unwrap_or(true);
        // The engine refuses to remove a network in use, so a job that
        // attaches between the look and the removal keeps its network.
        if !attached && docker.remove_network(&id).await.is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------
// The proxy

/// Per-target counts, for the job record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TargetCount {
    pub host: String,
    /// Tunnels established.
    pub allowed: u64,
    /// Allowed by the list, but the upstream connect (or its DNS lookup)
    /// failed.
    pub failed: u64,
    pub refused: u64,
    /// Why the last failed connect failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What the proxy let through, failed to reach, and refused during one job.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EgressReport {
    /// `restricted` (through the proxy) or `open` (`docker.egress=open`).
    pub mode: &'static str,
    pub allowed: u64,
    pub failed: u64,
    pub refused: u64,
    pub targets: Vec<TargetCount>,
}

impl EgressReport {
    pub fn open() -> EgressReport {
        EgressReport {
            mode: "open",
            ..Default::default()
        }
    }
}

/// What became of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate<'a> {
    /// The tunnel was established.
    Allowed,
    /// Allowed, but the upstream could not be reached (the reason).
    Failed(&'a str),
    Refused,
}

#[derive(Debug, Default)]
struct Counters {
    by_target: BTreeMap<String, TargetCount>,
}

impl Counters {
    fn count(&mut self, target: &str, fate: Fate<'_>) {
        // Refused targets are chosen by whatever runs in the container; cap
        // how many distinct ones we keep so a scan cannot grow the record.
        const MAX_TARGETS: usize = 256;
        let key = if self.by_target.contains_key(target) || self.by_target.len() < MAX_TARGETS {
            target
        } else {
            "(other)"
        };
        let e = self.by_target.entry(key.to_string()).or_insert_with(|| TargetCount {
            host: key.to_string(),
            ..TargetCount::default()
        });
        match fate {
            Fate::Allowed => e.allowed += 1,
            Fate::Failed(why) => {
                e.failed += 1;
                e.last_error = Some(why.chars().take(200).collect());
            }
            Fate::Refused => e.refused += 1,
        }
    }
}

/// What the proxy enforces.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lower-case `host:port`.
    pub allow: Vec<String>,
    /// Test-only overrides of where a name connects ([`RESOLVE_ENV`]).
    pub resolve: HashMap<String, SocketAddr>,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_connections: usize,
}

impl Policy {
    pub fn new(p: &EgressProfile, credential_kind: &str) -> Policy {
        Policy {
            allow: p.allowlist(credential_kind),
            resolve: resolve_overrides(std::env::var(RESOLVE_ENV).ok().as_deref()),
            max_header_bytes: p.max_header_bytes,
            header_timeout: Duration::from_millis(p.header_timeout_ms),
            connect_timeout: Duration::from_millis(p.connect_timeout_ms),
            max_connections: p.max_connections,
        }
    }
}

fn resolve_overrides(text: Option<&str>) -> HashMap<String, SocketAddr> {
    text.unwrap_or_default()
        .split(',')
        .filter_map(|pair| {
            let (name, addr) = pair.trim().split_once('=')?;
            Some((name.trim().to_ascii_lowercase(), addr.trim().parse().ok()?))
        })
        .collect()
}

/// A running proxy. Dropping it stops accepting, ends open tunnels and
/// removes its socket.
pub struct Proxy {
    /// The socket it listens on.
    pub socket: std::path::PathBuf,
    counters: Arc<Mutex<Counters>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on the Unix socket `path` (which must not exist; its
    /// directory should be private) and serve until dropped. The socket is
    /// made connectable by any uid: the container's user differs from
    /// ours, and the directory, not the socket, keeps other users out.
    pub async fn start_unix(path: &std::path::Path, policy: Policy) -> std::io::Result<Proxy> {
        use std::os::unix::fs::PermissionsExt;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let counters = Arc::new(Mutex::new(Counters::default()));
        let task = tokio::spawn(serve_unix(listener, Arc::new(policy), counters.clone()));
        Ok(Proxy {
            socket: path.to_path_buf(),
            counters,
            task,
        })
    }

    /// Counts so far.
    pub fn report(&self) -> EgressReport {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<TargetCount> = c.by_target.values().cloned().collect();
        EgressReport {
            mode: "restricted",
            allowed: targets.iter().map(|t| t.allowed).sum(),
            failed: targets.iter().map(|t| t.failed).sum(),
            refused: targets.iter().map(|t| t.refused).sum(),
            targets,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve_unix(listener: UnixListener, policy: Arc<Policy>, counters: Arc<Mutex<Counters>>) {
    serve(|| async { listener.accept().await.map(|(c, _)| c) }, policy, counters).await
}

async fn serve<C, F, Fut>(accept: F, policy: Arc<Policy>, counters: Arc<Mutex<Counters>>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<C>>,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(policy.max_connections));
    // Tunnels live in this set, so aborting `serve` (dropping the Proxy)
    // ends them too.
    let mut tunnels = tokio::task::JoinSet::new();
    loop {
        let conn = tokio::select! {
            a = accept() => match a {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = tunnels.join_next(), if !tunnels.is_empty() => continue,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let mut conn = conn;
            let _ = conn.write_all(&response(503, "Too Many Connections")).await;
            count(&counters, "(over connection limit)", Fate::Refused);
            continue;
        };
        let (policy, counters) = (policy.clone(), counters.clone());
        tunnels.spawn(async move {
            handle(conn, &policy, &counters).await;
            drop(permit);
        });
    }
}

fn count(counters: &Mutex<Counters>, target: &str, fate: Fate<'_>) {
    counters.lock().unwrap_or_else(|e| e.into_inner()).count(target, fate);
}

fn response(code: u16, reason: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
}

/// What a request head asks for.
#[derive(Debug, PartialEq)]
enum Request {
    /// `CONNECT host:port`, lower-cased.
    Connect(String),
    /// Anything else (plain HTTP, a malformed line); the target for the record.
    Other(String),
}

fn parse_head(head: &[u8]) -> Request {
    let line_end = memchr::memmem::find(head, b"\r\n").unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut words = line.split(' ');
    let (method, target, version) = (words.next(), words.next(), words.next());
    let well_formed = words.next().is_none() && version.is_some_and(|v| v.starts_with("HTTP/1."));
    match (method, target) {
        (Some("CONNECT"), Some(t)) if well_formed && split_target(t).is_some() => {
            Request::Connect(t.to_ascii_lowercase())
        }
        (Some(_), Some(t)) if well_formed => Request::Other(record_target(t)),
        _ => Request::Other("(malformed request)".into()),
    }
}

/// A short, printable target name for the record.
fn record_target(t: &str) -> String {
    let t = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .unwrap_or(t);
    let host = t.split('/').next().unwrap_or_default();
    if !host.is_empty() && host.len() <= 260 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        host.to_ascii_lowercase()
    } else {
        "(unparsable target)".into()
    }
}

async fn handle<C: AsyncRead + AsyncWrite + Unpin>(mut conn: C, policy: &Policy, counters: &Mutex<Counters>) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(policy.header_timeout, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = memchr::memmem::find(&head, b"\r\n\r\n") {
                return Some(end + 4);
            }
            if head.len() >= policy.max_header_bytes {
                return None;
            }
            let n = conn.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let end = match read {
        Ok(Some(end)) if end <= policy.max_header_bytes => end,
        // Closed without a byte: no request at all (`clean` checking that
        // the socket is alive), nothing to count.
        Ok(None) if head.is_empty() => return,
        // Too slow, too big, or closed before a full head.
        _ => {
            let _ = conn.write_all(&response(400, "Bad Request")).await;
            count(counters, "(incomplete request)", Fate::Refused);
            return;
        }
    };
    let target = match parse_head(&head[..end]) {
        Request::Connect(t) => t,
        Request::Other(t) => {
            let _ = conn.write_all(&response(403, "Forbidden")).await;
            count(counters, &t, Fate::Refused);
            return;
        }
    };
    // Exact host:port match. An IP literal passes only if it is listed
    // itself, so no name can be side-stepped by its address.
    if !policy.allow.contains(&target) {
        let _ = conn.write_all(&response(403, "Forbidden")).await;
        count(counters, &target, Fate::Refused);
        return;
    }
    let upstream = tokio::time::timeout(policy.connect_timeout, connect(&target, policy)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no connection within {} ms", policy.connect_timeout.as_millis()),
            };
            count(counters, &target, Fate::Failed(&why));
            let _ = conn.write_all(&response(502, "Bad Gateway")).await;
            return;
        }
    };
    count(counters, &target, Fate::Allowed);
    let _ = upstream.set_nodelay(true);
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // Bytes the client sent right after the head (TLS ClientHello) go first.
    if end < head.len() && upstream.write_all(&head[end..]).await.is_err() {
        return;
    }
    // 64 KiB each way instead of the default 8 KiB: an eighth of the
    // syscalls on bulk transfers (benches/egress.sh).
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut upstream, 64 << 10, 64 << 10).await;
}

/// Resolve on the proxy side (the container has no DNS to the outside).
async fn connect(target: &str, policy: &Policy) -> std::io::Result<TcpStream> {
    if let Some(addr) = policy.resolve.get(target) {
        return TcpStream::connect(addr).await;
    }
    let (host, port) = split_target(target).ok_or_else(|| std::io::Error::other("bad target"))?;
    let mut last = std::io::Error::other(format!("DNS: `{host}` has no address"));
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("DNS lookup of `{host}` failed: {e}")))?;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_parsed_strictly() {
        let c = |s: &str| parse_head(s.as_bytes());
        assert_eq!(
            c("CONNECT Api.Anthropic.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Connect("api.anthropic.com:443".into())
        );
        assert_eq!(
            c("GET http://example.com/x HTTP/1.1\r\n\r\n"),
            Request::Other("example.com".into())
        );
        assert_eq!(
            c("CONNECT api.anthropic.com HTTP/1.1\r\n\r\n"),
            Request::Other("api.anthropic.com".into())
        );
        assert_eq!(
            c("CONNECT a:443 HTTP/1.1 extra\r\n\r\n"),
            Request::Other("(malformed request)".into())
        );
        assert_eq!(c("\u{1}\u{2}\r\n\r\n"), Request::Other("(malformed request)".into()));
    }

    #[test]
    fn resolve_overrides_parse() {
        let m = resolve_overrides(Some("API.anthropic.com:443=127.0.0.1:9, bad, x:1=nope"));
        assert_eq!(m.len(), 1);
        assert_eq!(m["api.anthropic.com:443"], "127.0.0.1:9".parse().unwrap());
    }

    #[tokio::test]
    async fn the_proxy_tunnels_allowed_targets_and_refuses_the_rest() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let _ = s.write_all(&b[..n]).await;
                });
            }
        });
        let p = profile().unwrap();
        let mut policy = Policy::new(p, "api-key");
        // A port nothing listens on: allowed, but the connect fails.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        policy.allow.push("down.example:443".into());
        policy.resolve = HashMap::from([
            ("api.anthropic.com:443".to_string(), up),
            ("evil.example:443".to_string(), up),
            ("down.example:443".to_string(), dead),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("e.sock");
        let proxy = Proxy::start_unix(&sock, policy).await.unwrap();
        let ask = |req: &'static str| {
            let sock = sock.clone();
            async move {
                let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
                String::from_utf8_lossy(&out).into_owned()
            }
        };
        let ok = ask("CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n\r\nping").await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("ping"), "{ok}");
        let no = ask("CONNECT evil.example:443 HTTP/1.1\r\n\r\n").await;
        assert!(no.starts_with("HTTP/1.1 403"), "{no}");
        let plain = ask("GET http://api.anthropic.com/ HTTP/1.1\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 403"), "{plain}");
        let platform = ask("CONNECT platform.claude.com:443 HTTP/1.1\r\n\r\n").await;
        assert!(
            platform.starts_with("HTTP/1.1 403"),
            "api keys do not get the platform host: {platform}"
        );
        let down = ask("CONNECT down.example:443 HTTP/1.1\r\n\r\n").await;
        assert!(down.starts_with("HTTP/1.1 502"), "{down}");
        // A connection that closes without a byte is no request.
        drop(tokio::net::UnixStream::connect(&sock).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = proxy.report();
        assert_eq!((r.allowed, r.failed, r.refused), (1, 1, 3));
        let failed = r.targets.iter().find(|t| t.host == "down.example:443").unwrap();
        assert!(
            failed.last_error.as_deref().is_some_and(|e| e.contains("refused")),
            "{failed:?}"
        );
        let t = |h: &str| r.targets.iter().find(|t| t.host == h).cloned().unwrap_or_default();
        assert_eq!(t("api.anthropic.com:443").allowed, 1);
        assert_eq!(t("evil.example:443").refused, 1);
        assert_eq!(t("api.anthropic.com").refused, 1);
        drop(proxy);
        assert!(!sock.exists(), "the socket goes with the proxy");
    }
}
