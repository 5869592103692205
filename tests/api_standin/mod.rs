//! A local stand-in for `api.anthropic.com` that the real Claude Code talks
//! to: HTTPS with a throwaway CA, the Messages API with streaming SSE, and
//! an HTTP `CONNECT` proxy in front of it.
//!
//! ```ignore
//! let api = StandIn::start();
//! // claude -p ... with ANTHROPIC_BASE_URL=api.base_url(),
//! //                    NODE_EXTRA_CA_CERTS=api.ca_pem_path()
//! let seen = api.requests();
//! ```
//!
//! # What the conversation decides
//!
//! The server keeps no conversation state (only the try counts `fail=N`
//! needs): every reply is decided from the request body alone, so a
//! multi-turn job works across connections and retries. The scenario is the first `scenario:NAME` marker in any text
//! block of a user message (Claude Code prepends its own blocks, such as a
//! `<system-reminder>`, so every block is searched), followed on the same
//! line by optional `key=value` words (`key="two words"` for spaces). No
//! marker means `text`; an unknown name gets a 400 `invalid_request_error`
//! that names it. The step within a scenario is the number of
//! `tool_result` blocks the request carries.
//!
//! | scenario | replies |
//! |---|---|
//! | `text` | `turns=N` (default 1): N-1 `Bash` tool uses of `true`, then a text answer (`say=WORD`) |
//! | `write path=P content=C` | a `Write` tool use, then a text quoting the tool result |
//! | `edit path=P old=A new=B` | `Read`, then `Edit`, then a text quoting the last tool result |
//! | `bash cmd=C` | a `Bash` tool use, then a text quoting the tool result |
//! | `expensive` | like `text` with `turns=5` and 2,000,000 input tokens a request |
//! | `stall` | `message_start` (with usage), one text delta, then nothing, ever |
//! | `auth` | HTTP 401 `authentication_error` |
//! | `overloaded` | HTTP 529 `overloaded_error`; with `fail=N` only the first N tries, then `text` |
//! | `fail500` | HTTP 500 `api_error`; `fail=N` as above |
//! | `ratelimit` | HTTP 429 `rate_limit_error` with the subscription's `anthropic-ratelimit-unified-*` headers |
//!
//! Every request reports `usage=IN,CC,CR,OUT` (input, cache creation, cache
//! read, output tokens), by default `4,12000,9000,60`: a real Claude Code
//! request re-reads about 21,000 tokens of system prompt and tools, mostly
//! from the cache. A relative `path` is resolved against the working
//! directory the system prompt names (`Primary working directory: ...`).
//!
//! # Wire shapes (Messages API streaming)
//!
//! ```text
//! event: message_start
//! data: {"type":"message_start","message":{"id":"msg_..","type":"message","role":"assistant",
//!        "model":"..","content":[],"stop_reason":null,"stop_sequence":null,
//!        "usage":{"input_tokens":4,"cache_creation_input_tokens":12000,"cache_read_input_tokens":9000,
//!                 "cache_creation":{"ephemeral_5m_input_tokens":12000,"ephemeral_1h_input_tokens":0},
//!                 "output_tokens":1,"service_tier":"standard"}}}
//! event: ping                 data: {"type":"ping"}
//! event: content_block_start  data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}
//! event: content_block_delta  data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":".."}}
//!   (tool use: "content_block":{"type":"tool_use","id":"toolu_..","name":"Write","input":{}},
//!              "delta":{"type":"input_json_delta","partial_json":".."})
//! event: content_block_stop   data: {"type":"content_block_stop","index":0}
//! event: message_delta        data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},
//!                                    "usage":{"input_tokens":4,..,"output_tokens":60}}
//! event: message_stop         data: {"type":"message_stop"}
//! ```
//! `message_delta`'s usage is cumulative, so it repeats the input counts.
//! A request with `"stream": false` gets the same message as one JSON object.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// The names the leaf certificate is good for. `platform.claude.com` is
/// where a subscription's OAuth calls go.
pub const CERT_NAMES: &[&str] = &["api.anthropic.com", "platform.claude.com", "localhost", "127.0.0.1"];

/// `CONNECT` targets the proxy carries to the stand-in; anything else gets 403.
pub const PROXY_ALLOW: &[&str] = &["api.anthropic.com:443", "platform.claude.com:443"];

/// The scenario names a marker may carry (see the module documentation).
pub const SCENARIOS: &[&str] = &[
    "text",
    "write",
    "edit",
    "bash",
    "expensive",
    "stall",
    "auth",
    "overloaded",
    "fail500",
    "ratelimit",
];

/// Request bodies above this are refused (413), like the real API's 32 MB.
const MAX_BODY: usize = 32 << 20;

/// Usage of every request unless the scenario says otherwise.
pub const DEFAULT_USAGE: Usage = Usage {
    input: 4,
    cache_creation: 12_000,
    cache_read: 9_000,
    output: 60,
};

/// Token counts one request reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
    pub output: u64,
}

/// How the stand-in is started: `StandIn::start()` is `Options::default()`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the HTTPS server listens; port 0 picks one.
    pub listen: SocketAddr,
    /// Append every recorded request (`"kind":"request"`) and proxy request
    /// (`"kind":"connect"`) to this file, one JSON line each.
    pub log: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: None,
        }
    }
}

/// One request as the stand-in saw it. Credentials appear only as SHA-256.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    /// Milliseconds since the stand-in started.
    pub at_ms: u64,
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub http_version: String,
    pub tls: TlsInfo,
    pub user_agent: Option<String>,
    pub anthropic_version: Option<String>,
    pub anthropic_beta: Option<String>,
    /// `x-stainless-retry-count`: the client's own count of this try.
    pub retry_count: Option<String>,
    /// SHA-256 (hex) of the `x-api-key` value, when that header came.
    pub api_key_sha256: Option<String>,
    /// SHA-256 (hex) of the token after `Authorization: Bearer `, when that came.
    pub bearer_sha256: Option<String>,
    pub body_bytes: usize,
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub messages: usize,
    pub tools: usize,
    pub tool_results: usize,
    pub stream: Option<bool>,
    /// The scenario's name (`text` when the request carries no marker);
    /// `None` for requests that are not Messages API calls.
    pub scenario: Option<String>,
    /// What was sent back: `text`, `tool_use:Write`, `stall`, `error:529`, ...
    pub reply: String,
    pub status: u16,
}

impl Recorded {
    /// Which credential header came: `x-api-key`, `bearer`, `both` or `none`.
    pub fn credential(&self) -> &'static str {
        match (&self.api_key_sha256, &self.bearer_sha256) {
            (Some(_), Some(_)) => "both",
            (Some(_), None) => "x-api-key",
            (None, Some(_)) => "bearer",
            (None, None) => "none",
        }
    }

    /// A Messages API call (streaming or not), not `count_tokens` or others.
    pub fn is_messages(&self) -> bool {
        self.method == "POST" && (self.path == "/v1/messages" || self.path.starts_with("/v1/messages?"))
    }
}

/// The TLS session a request came over.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsInfo {
    /// The SNI name the client sent (none for an IP address).
    pub sni: Option<String>,
    /// The ALPN protocols the client offered, in its order.
    pub alpn_offered: Vec<String>,
    /// The protocol agreed on, if any.
    pub alpn: Option<String>,
}

/// One request to the proxy.
#[derive(Debug, Clone, Serialize)]
pub struct Connect {
    pub at_ms: u64,
    pub method: String,
    /// `host:port` of a `CONNECT`, or the URI of anything else.
    pub target: String,
    /// Whether it was carried to the stand-in (else refused with 403).
    pub tunnelled: bool,
}

struct State {
    started: Instant,
    requests: Mutex<Vec<Recorded>>,
    connects: Mutex<Vec<Connect>>,
    /// Tries seen per conversation point, for `fail=N`.
    attempts: Mutex<HashMap<String, u32>>,
    log: Option<Mutex<std::fs::File>>,
    ids: AtomicU64,
    tls_addr: SocketAddr,
}

impl State {
    fn ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}_01StandIn{n:015}")
    }

    fn record(&self, r: Recorded) {
        self.log("request", &r);
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }

    fn record_connect(&self, c: Connect) {
        self.log("connect", &c);
        self.connects.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }

    /// One JSON line: `{"kind":"request",...}` or `{"kind":"connect",...}`.
    fn log(&self, kind: &str, item: &impl Serialize) {
        #[derive(Serialize)]
        struct Line<'a, T> {
            kind: &'a str,
            #[serde(flatten)]
            item: &'a T,
        }
        let Some(log) = &self.log else { return };
        if let (Ok(mut f), Ok(line)) = (log.lock(), serde_json::to_string(&Line { kind, item })) {
            // A log that cannot be written must not break the API the
            // client is talking to; the in-memory record stays complete.
            let _ = writeln!(f, "{line}").and_then(|()| f.flush());
        }
    }
}

/// A running stand-in; dropping it stops the server and removes its files.
pub struct StandIn {
    addr: SocketAddr,
    proxy_addr: SocketAddr,
    dir: tempfile::TempDir,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    /// Listen on a free loopback port. Panics on failure: this is test setup.
    pub fn start() -> StandIn {
        StandIn::try_start(Options::default()).expect("start the API stand-in")
    }

    /// Generate the CA and certificate, bind, and serve on a thread of its
    /// own. Returns once both listeners accept connections.
    pub fn try_start(opts: Options) -> std::io::Result<StandIn> {
        let dir = tempfile::Builder::new().prefix("api-standin-").tempdir()?;
        let pki = Pki::generate().map_err(std::io::Error::other)?;
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem)?;
        let tls = Arc::new(pki.server_config().map_err(std::io::Error::other)?);

        let listener = std::net::TcpListener::bind(opts.listen)?;
        let proxy = std::net::TcpListener::bind(SocketAddr::new(opts.listen.ip(), 0))?;
        listener.set_nonblocking(true)?;
        proxy.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let proxy_addr = proxy.local_addr()?;
        let log = match &opts.log {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            )),
            None => None,
        };
        let state = Arc::new(State {
            started: Instant::now(),
            requests: Mutex::new(Vec::new()),
            connects: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
            log,
            ids: AtomicU64::new(1),
            tls_addr: addr,
        });

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api-standin")
            .enable_all()
            .build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = std::thread::Builder::new().name("api-standin".into()).spawn(move || {
            rt.block_on(async move {
                let (Ok(listener), Ok(proxy)) = (TcpListener::from_std(listener), TcpListener::from_std(proxy)) else {
                    return;
                };
                tokio::select! {
                    _ = rx => {}
                    () = serve_tls(listener, tls, st.clone()) => {}
                    () = serve_proxy(proxy, st) => {}
                }
            });
            // Stalled answers never end on their own; do not wait for them.
            rt.shutdown_timeout(Duration::from_millis(200));
        })?;
        Ok(StandIn {
            addr,
            proxy_addr,
            dir,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`: Claude Code's `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The throwaway CA's certificate (PEM): Claude Code's `NODE_EXTRA_CA_CERTS`.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `api.anthropic.com:443=127.0.0.1:PORT`, for `CMM_EGRESS_RESOLVE`.
    pub fn resolve_env(&self) -> String {
        format!("api.anthropic.com:443={}", self.addr)
    }

    /// `http://127.0.0.1:PORT` of the `CONNECT` proxy that carries
    /// [`PROXY_ALLOW`] to the stand-in: a client's `HTTPS_PROXY`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// A scratch directory the stand-in owns (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every request the proxy saw so far.
    pub fn connects(&self) -> Vec<Connect> {
        self.state.connects.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait until a recorded request satisfies `pred`, up to `timeout`.
    /// For tests that must act at a point of the conversation (a stall).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Recorded) -> bool) -> Option<Recorded> {
        // This module stands alone (examples/api_standin.rs builds it too),
        // so it polls here rather than through the test harness.
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The throwaway CA and the leaf it signed for [`CERT_NAMES`].
struct Pki {
    ca_pem: String,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Pki {
    fn generate() -> Result<Pki, rcgen::Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "claude-max-market test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

        let names: Vec<String> = CERT_NAMES.iter().map(|s| s.to_string()).collect();
        let mut leaf = CertificateParams::new(names)?;
        leaf.distinguished_name.push(DnType::CommonName, "api.anthropic.com");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.use_authority_key_identifier_extension = true;
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf.signed_by(&leaf_key, &ca)?;

        Ok(Pki {
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone(), ca.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        })
    }

    fn server_config(&self) -> Result<rustls::ServerConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        // HTTP/1.1 only: what Claude Code's runtime (Bun) speaks.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

async fn serve_tls(listener: TcpListener, tls: Arc<rustls::ServerConfig>, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let connections close (a
            // server's back-off, not a test waiting for an event).
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
            let Ok(start) = acceptor.await else { return };
            let hello = start.client_hello();
            let mut info = TlsInfo {
                sni: hello.server_name().map(str::to_owned),
                alpn_offered: hello
                    .alpn()
                    .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
                    .unwrap_or_default(),
                alpn: None,
            };
            let Ok(stream) = start.into_stream(tls).await else {
                return;
            };
            info.alpn = stream
                .get_ref()
                .1
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let info = Arc::new(info);
            let svc = hyper::service::service_fn(move |req| {
                let (state, info) = (state.clone(), info.clone());
                async move { Ok::<_, Infallible>(handle(req, &state, &info).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn serve_proxy(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let connections close (a
            // server's back-off, not a test waiting for an event).
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(proxy(req, &state)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn proxy(req: Request<Incoming>, state: &Arc<State>) -> Response<Body> {
    let connect = req.method() == Method::CONNECT;
    let target = match req.uri().authority() {
        Some(a) if connect => a.as_str().to_ascii_lowercase(),
        _ => req.uri().to_string(),
    };
    let tunnelled = connect && PROXY_ALLOW.contains(&target.as_str());
    state.record_connect(Connect {
        at_ms: state.ms(),
        method: req.method().to_string(),
        target,
        tunnelled,
    });
    if !tunnelled {
        return status_only(StatusCode::FORBIDDEN);
    }
    let to = state.tls_addr;
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let Ok(mut upstream) = TcpStream::connect(to).await else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut upstream).await;
    });
    status_only(StatusCode::OK)
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

async fn handle(req: Request<Incoming>, state: &Arc<State>, tls: &TlsInfo) -> Response<Body> {
    let auth = header(&req, "authorization");
    let mut rec = Recorded {
        at_ms: state.ms(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        http_version: format!("{:?}", req.version()),
        tls: tls.clone(),
        user_agent: header(&req, "user-agent"),
        anthropic_version: header(&req, "anthropic-version"),
        anthropic_beta: header(&req, "anthropic-beta"),
        retry_count: header(&req, "x-stainless-retry-count"),
        api_key_sha256: header(&req, "x-api-key").map(|k| sha256_hex(&k)),
        bearer_sha256: auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")).map(sha256_hex),
        body_bytes: 0,
        model: None,
        max_tokens: None,
        messages: 0,
        tools: 0,
        tool_results: 0,
        stream: None,
        scenario: None,
        reply: String::new(),
        status: 0,
    };
    let session = header(&req, "x-claude-code-session-id").unwrap_or_default();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            rec.reply = "error:413".into();
            return finish(
                state,
                rec,
                api_error(state, 413, "request_too_large", "Request exceeds the maximum size"),
            );
        }
    };
    rec.body_bytes = body.len();

    let reply = match (method, path.as_str()) {
        (Method::POST, "/v1/messages") => match serde_json::from_slice::<Value>(&body) {
            Ok(v) => {
                rec.model = v["model"].as_str().map(str::to_owned);
                rec.max_tokens = v["max_tokens"].as_u64();
                rec.messages = v["messages"].as_array().map_or(0, Vec::len);
                rec.tools = v["tools"].as_array().map_or(0, Vec::len);
                rec.stream = v["stream"].as_bool();
                let conv = Conversation::read(&v);
                rec.tool_results = conv.tool_results.len();
                rec.scenario = Some(conv.scenario.name.clone());
                messages(state, &conv, &v, &session, &mut rec)
            }
            Err(e) => {
                rec.reply = "error:400".into();
                api_error(
                    state,
                    400,
                    "invalid_request_error",
                    &format!("The request body is not valid JSON: {e}"),
                )
            }
        },
        (Method::POST, "/v1/messages/count_tokens") => {
            rec.reply = "count_tokens".into();
            // Roughly four bytes a token, as the real tokenizer averages.
            json_response(
                state,
                StatusCode::OK,
                &json!({ "input_tokens": (body.len() / 4).max(1) }),
            )
        }
        // Claude Code's connectivity check before the first call.
        (Method::HEAD | Method::GET, "/api/hello") => {
            rec.reply = "hello".into();
            json_response(state, StatusCode::OK, &json!({ "message": "hello" }))
        }
        _ => {
            rec.reply = "error:404".into();
            api_error(state, 404, "not_found_error", "Not found")
        }
    };
    finish(state, rec, reply)
}

fn finish(state: &Arc<State>, mut rec: Recorded, reply: Response<Body>) -> Response<Body> {
    rec.status = reply.status().as_u16();
    state.record(rec);
    reply
}

fn with_request_id(state: &State, mut r: Response<Body>) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&state.next_id("req")) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

fn json_response(state: &State, status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    with_request_id(state, r)
}

fn api_error(state: &State, status: u16, kind: &str, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "type": "error",
        "error": { "type": kind, "message": message },
        "request_id": state.next_id("req"),
    });
    json_response(state, status, &body)
}

/// A scenario marker: `scenario:NAME key=value ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub args: BTreeMap<String, String>,
}

impl Scenario {
    /// The first marker in `text`, if any.
    pub fn find(text: &str) -> Option<Scenario> {
        let at = text.find("scenario:")? + "scenario:".len();
        let rest = &text[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(rest.len());
        let name = rest[..end].to_owned();
        let line = rest[end..].lines().next().unwrap_or("");
        Some(Scenario {
            name,
            args: parse_args(line),
        })
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args.get(key).map(String::as_str)
    }

    fn num(&self, key: &str, default: u32) -> u32 {
        self.arg(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    fn usage(&self, default: Usage) -> Usage {
        let Some(v) = self.arg("usage") else { return default };
        let n: Vec<u64> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        match n[..] {
            [input, cache_creation, cache_read, output] => Usage {
                input,
                cache_creation,
                cache_read,
                output,
            },
            _ => default,
        }
    }
}

/// `key=value` words up to the first word that is not one; `key="a b"`
/// carries spaces (with `\"`, `\\` and `\n` escapes).
fn parse_args(line: &str) -> BTreeMap<String, String> {
    let mut args = BTreeMap::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = &rest[..eq];
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            break;
        }
        let after = &rest[eq + 1..];
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => {}
                    },
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        args.insert(key.to_owned(), value);
        rest = tail.trim_start();
    }
    args
}

/// What a request's conversation says, as far as the stand-in cares.
struct Conversation {
    scenario: Scenario,
    tool_results: Vec<ToolResult>,
    /// The working directory the system prompt (or first message) names.
    cwd: Option<String>,
}

struct ToolResult {
    content: String,
    is_error: bool,
}

impl Conversation {
    fn read(body: &Value) -> Conversation {
        let mut scenario = None;
        let mut tool_results = Vec::new();
        let mut cwd = texts(&body["system"]).into_iter().find_map(working_directory);
        for m in body["messages"].as_array().into_iter().flatten() {
            // Claude Code sends the environment (working directory
            // included) as a `system`-role message of the conversation.
            if m["role"] == "system" && cwd.is_none() {
                cwd = texts(&m["content"]).into_iter().find_map(working_directory);
            }
            if m["role"] != "user" {
                continue;
            }
            for t in texts(&m["content"]) {
                if scenario.is_none() {
                    scenario = Scenario::find(t);
                }
                if cwd.is_none() {
                    cwd = working_directory(t);
                }
            }
            for b in m["content"].as_array().into_iter().flatten() {
                if b["type"] == "tool_result" {
                    tool_results.push(ToolResult {
                        content: texts(&b["content"]).join("\n"),
                        is_error: b["is_error"].as_bool().unwrap_or(false),
                    });
                }
            }
        }
        let scenario = scenario.unwrap_or_else(|| Scenario {
            name: "text".into(),
            args: BTreeMap::new(),
        });
        Conversation {
            scenario,
            tool_results,
            cwd,
        }
    }

    fn path(&self, p: &str) -> String {
        match &self.cwd {
            Some(cwd) if !p.starts_with('/') => format!("{}/{p}", cwd.trim_end_matches('/')),
            _ => p.to_owned(),
        }
    }

    /// The last tool result, quoted for a final answer.
    fn quote_last(&self) -> String {
        match self.tool_results.last() {
            Some(r) if r.is_error => format!("tool error: {}", r.content),
            Some(r) => format!("tool result: {}", r.content),
            None => "no tool result".into(),
        }
    }
}

/// Text of a `content`/`system` value: a string, or the `text` of each block.
fn texts(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => Vec::new(),
    }
}

fn working_directory(text: &str) -> Option<String> {
    let at = text.find("Primary working directory: ")? + "Primary working directory: ".len();
    let line = text[at..].lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// One content block of an answer.
enum Block {
    Text(String),
    ToolUse { name: &'static str, input: Value },
}

/// Decide and build the answer to one Messages API call.
fn messages(state: &State, conv: &Conversation, body: &Value, session: &str, rec: &mut Recorded) -> Response<Body> {
    let sc = &conv.scenario;
    let step = conv.tool_results.len() as u32;
    let model = body["model"].as_str().unwrap_or("claude-sonnet-4-5");
    let stream = body["stream"].as_bool().unwrap_or(false);
    let usage = sc.usage(DEFAULT_USAGE);

    // Errors first: `fail=N` lets the N+1st try of this point through.
    let failing = |status: u16| -> bool {
        let Some(n) = sc.arg("fail").and_then(|v| v.parse::<u32>().ok()) else {
            return true;
        };
        let key = format!("{session}/{}/{step}/{status}", rec.messages);
        let mut seen = state.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let tries = seen.entry(key).or_insert(0);
        *tries += 1;
        *tries <= n
    };
    let error = |rec: &mut Recorded, status: u16, kind: &str, message: &str| {
        rec.reply = format!("error:{status}");
        api_error(state, status, kind, message)
    };
    match sc.name.as_str() {
        // A misspelt marker must not pass for a plain answer.
        name if !SCENARIOS.contains(&name) => {
            let known = SCENARIOS.join(", ");
            let message = format!("unknown stand-in scenario `{name}`; known: {known}");
            return error(rec, 400, "invalid_request_error", &message);
        }
        "auth" => return error(rec, 401, "authentication_error", "invalid x-api-key"),
        "overloaded" if failing(529) => return error(rec, 529, "overloaded_error", "Overloaded"),
        "fail500" if failing(500) => return error(rec, 500, "api_error", "Internal server error"),
        "ratelimit" => {
            rec.reply = "error:429".into();
            let mut r = api_error(
                state,
                429,
                "rate_limit_error",
                "This request would exceed your account's rate limit. Please try again later.",
            );
            let reset = (chrono::Utc::now() + chrono::Duration::hours(3))
                .timestamp()
                .to_string();
            for (k, v) in [
                ("anthropic-ratelimit-unified-status", "rejected"),
                ("anthropic-ratelimit-unified-representative-claim", "five_hour"),
                ("anthropic-ratelimit-unified-reset", reset.as_str()),
                ("anthropic-ratelimit-unified-5h-reset", reset.as_str()),
                ("anthropic-ratelimit-unified-overage-status", "rejected"),
                ("retry-after", "10800"),
            ] {
                if let Ok(v) = HeaderValue::from_str(v) {
                    r.headers_mut().insert(k, v);
                }
            }
            return r;
        }
        _ => {}
    }

    let say = sc.arg("say").unwrap_or("Hello from the API stand-in.").to_owned();
    let read = |path: String| Block::ToolUse {
        name: "Read",
        input: json!({ "file_path": path }),
    };
    // A turn that changes nothing: Claude Code runs `true` without asking
    // in every permission mode.
    let idle = |turn: u32| Block::ToolUse {
        name: "Bash",
        input: json!({ "command": "true", "description": format!("Turn {turn}") }),
    };
    let block = match sc.name.as_str() {
        "write" => match step {
            0 => Block::ToolUse {
                name: "Write",
                input: json!({
                    "file_path": conv.path(sc.arg("path").unwrap_or("standin.txt")),
                    // `wrong_for=PREFIX wrong=TEXT`: the account whose API
                    // key hashes to PREFIX... is answered TEXT instead (one
                    // provider of a market task gets it wrong).
                    "content": match (sc.arg("wrong_for"), &rec.api_key_sha256) {
                        (Some(p), Some(k)) if !p.is_empty() && k.starts_with(p) => sc.arg("wrong").unwrap_or(""),
                        _ => sc.arg("content").unwrap_or(""),
                    },
                }),
            },
            _ => Block::Text(conv.quote_last()),
        },
        "edit" => {
            let path = conv.path(sc.arg("path").unwrap_or("standin.txt"));
            match step {
                0 => read(path),
                1 => Block::ToolUse {
                    name: "Edit",
                    input: json!({
                        "file_path": path,
                        "old_string": sc.arg("old").unwrap_or(""),
                        "new_string": sc.arg("new").unwrap_or(""),
                    }),
                },
                _ => Block::Text(conv.quote_last()),
            }
        }
        "bash" => match step {
            0 => Block::ToolUse {
                name: "Bash",
                input: json!({ "command": sc.arg("cmd").unwrap_or("true"), "description": "Run the requested command" }),
            },
            _ => Block::Text(conv.quote_last()),
        },
        "stall" => {
            rec.reply = "stall".into();
            return stall(state, model, usage);
        }
        "expensive" => {
            let usage = sc.usage(Usage {
                input: 2_000_000,
                cache_creation: 0,
                cache_read: 0,
                output: 1_000,
            });
            let block = if step + 1 < sc.num("turns", 5) {
                idle(step + 1)
            } else {
                Block::Text(say)
            };
            return answer(state, rec, model, stream, block, usage);
        }
        // `text`: the plain answer, after `turns - 1` idle turns.
        _ if step + 1 < sc.num("turns", 1) => idle(step + 1),
        _ => Block::Text(say),
    };
    answer(state, rec, model, stream, block, usage)
}

fn answer(state: &State, rec: &mut Recorded, model: &str, stream: bool, block: Block, usage: Usage) -> Response<Body> {
    rec.reply = match &block {
        Block::Text(_) => "text".into(),
        Block::ToolUse { name, .. } => format!("tool_use:{name}"),
    };
    let id = state.next_id("msg");
    let (content, stop_reason) = match &block {
        Block::Text(t) => (json!({ "type": "text", "text": t }), "end_turn"),
        Block::ToolUse { name, input } => (
            json!({ "type": "tool_use", "id": state.next_id("toolu"), "name": name, "input": input }),
            "tool_use",
        ),
    };
    if !stream {
        let mut msg = message_shell(&id, model, usage_json(usage, usage.output, true));
        msg["content"] = json!([content]);
        msg["stop_reason"] = json!(stop_reason);
        return json_response(state, StatusCode::OK, &msg);
    }
    let mut ev = Sse::default();
    ev.push(
        "message_start",
        json!({ "type": "message_start", "message": message_shell(&id, model, usage_json(usage, 1, true)) }),
    );
    ev.push("ping", json!({ "type": "ping" }));
    match (&block, &content) {
        (Block::Text(t), _) => {
            ev.push(
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
            );
            for piece in chunks(t, 24) {
                ev.push("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": piece } }));
            }
        }
        (Block::ToolUse { name, input }, content) => {
            ev.push(
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0,
                "content_block": { "type": "tool_use", "id": content["id"], "name": name, "input": {} } }),
            );
            ev.push("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "input_json_delta", "partial_json": "" } }));
            let input = input.to_string();
            for piece in chunks(&input, 32) {
                ev.push("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "input_json_delta", "partial_json": piece } }));
            }
        }
    }
    ev.push(
        "content_block_stop",
        json!({ "type": "content_block_stop", "index": 0 }),
    );
    ev.push("message_delta", json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason, "stop_sequence": null }, "usage": usage_json(usage, usage.output, false) }));
    ev.push("message_stop", json!({ "type": "message_stop" }));
    sse_response(state, ev.frames, false)
}

/// `message_start` and one text delta, then the stream stays open with nothing more.
fn stall(state: &State, model: &str, usage: Usage) -> Response<Body> {
    let mut ev = Sse::default();
    let id = state.next_id("msg");
    ev.push(
        "message_start",
        json!({ "type": "message_start", "message": message_shell(&id, model, usage_json(usage, 1, true)) }),
    );
    ev.push("ping", json!({ "type": "ping" }));
    ev.push(
        "content_block_start",
        json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
    );
    ev.push("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Thinking about it" } }));
    sse_response(state, ev.frames, true)
}

fn message_shell(id: &str, model: &str, usage: Value) -> Value {
    json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null, "usage": usage,
    })
}

/// The usage object: `message_start` (and a whole message) carry the
/// cache split and service tier; `message_delta` carries the counts only.
fn usage_json(u: Usage, output: u64, full: bool) -> Value {
    let mut v = json!({
        "input_tokens": u.input,
        "cache_creation_input_tokens": u.cache_creation,
        "cache_read_input_tokens": u.cache_read,
        "output_tokens": output,
    });
    if full {
        v["cache_creation"] = json!({ "ephemeral_5m_input_tokens": u.cache_creation, "ephemeral_1h_input_tokens": 0 });
        v["service_tier"] = json!("standard");
    }
    v
}

/// Split at char boundaries into pieces of about `n` bytes.
fn chunks(s: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + n).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        out.push(&s[start..end]);
        start = end;
    }
    out
}

#[derive(Default)]
struct Sse {
    frames: Vec<Bytes>,
}

impl Sse {
    fn push(&mut self, event: &str, data: Value) {
        self.frames
            .push(Bytes::from(format!("event: {event}\ndata: {data}\n\n")));
    }
}

fn sse_response(state: &State, frames: Vec<Bytes>, stall: bool) -> Response<Body> {
    use futures_util::StreamExt as _;
    let events = futures_util::stream::iter(frames).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let body = if stall {
        BodyExt::boxed(StreamBody::new(events.chain(futures_util::stream::pending())))
    } else {
        BodyExt::boxed(StreamBody::new(events))
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    with_request_id(state, r)
}

/// The real Claude Code for the real test tier (`CMM_CLAUDE_BINARY`, else
/// where `.ci/run fetch-claude` puts it), or `None` after a loud SKIP line;
/// with `CMM_REQUIRE_REAL_CLAUDE=1` its absence is a failure instead.
pub fn real_claude_binary() -> Option<PathBuf> {
    let path = std::env::var_os("CMM_CLAUDE_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/claude-code/2.1.332/claude"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CMM_REQUIRE_REAL_CLAUDE").as_deref() != Ok("1"),
        "CMM_REQUIRE_REAL_CLAUDE=1 but the real Claude Code is not at `{}`: run `.ci/run` to fetch it, or set CMM_CLAUDE_BINARY",
        path.display()
    );
    eprintln!(
        "SKIP: real Claude Code not found at `{}`; set CMM_CLAUDE_BINARY or run `.ci/run` to fetch it \
         (CMM_REQUIRE_REAL_CLAUDE=1 turns this skip into a failure)",
        path.display()
    );
    None
}
