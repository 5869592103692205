//! The port: plain HTTP (`GET /healthz`, `GET /metrics`) and the
//! WebSocket upgrade, all through hyper.
//!
//! A connection arrives here holding its [`Slot`] (see [`super::admission`]).
//! hyper reads a request head of at most `--max-header-bytes`; a plain
//! HTTP connection lives at most `--http-timeout-ms` and serves one request.
//! An upgraded connection is handed to its session task ([`session::run`]).
//!
//! It must not parse WebSocket frames or touch market state: that is the
//! session's and the writer's.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::admission::Slot;
use super::metrics::{self, Closed};
use super::options::Limits;
use super::session;
use super::shared::Shared;
use super::wire::Cmd;

/// The HTTP/1 settings every connection is served with.
pub fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.http_timeout)
        .max_header_size(limits.max_header_bytes)
        // hyper's floor for its read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(64);
    b
}

/// Serve one accepted connection: HTTP until it upgrades or ends.
pub async fn connection(stream: TcpStream, sh: Arc<Shared>, slot: Arc<Slot>) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let sh2 = sh.clone();
    let service = hyper::service::service_fn(move |req| {
        let (sh, slot) = (sh2.clone(), slot.clone());
        async move {
            if req.method() == Method::GET && req.uri().path() == "/metrics" {
                refresh_book(&sh).await;
            }
            Ok::<_, Infallible>(respond(req, &sh, &slot, accepted))
        }
    });
    let conn = sh.http.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let until = accepted + sh.opts.limits.http_timeout;
    match tokio::time::timeout_at(until.into(), conn).await {
        Err(_) => sh.metrics.closed(Closed::HttpTimeout),
        Ok(Err(e)) if e.is_timeout() => sh.metrics.closed(Closed::HttpTimeout),
        Ok(Err(e)) if e.is_parse() || e.is_parse_too_large() => sh.metrics.closed(Closed::BadRequest),
        Ok(_) => {}
    }
}

type Reply = Response<Full<Bytes>>;

/// How long a scrape waits for the writer to read the book's gauges
/// before it shows the last values.
const GAUGES_WAIT: Duration = Duration::from_secs(2);

/// Have the writer read the order book's gauges again, after the batch it
/// is applying: they count every task, so they are read when asked for.
async fn refresh_book(sh: &Shared) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if sh.engine.send(Cmd::Gauges(tx)).is_ok() {
        let _ = tokio::time::timeout(GAUGES_WAIT, rx).await;
    }
}

fn plain(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    // One request per connection: hyper closes it once this is sent. (Not
    // `keep_alive(false)`, which would also rewrite an upgrade's
    // `Connection: Upgrade`.)
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn respond(mut req: Request<Incoming>, sh: &Arc<Shared>, slot: &Arc<Slot>, accepted: Instant) -> Reply {
    if req.headers().contains_key(header::UPGRADE) {
        return upgrade(&mut req, sh, slot, accepted);
    }
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => healthz(sh),
        (&Method::GET, "/metrics") => plain(StatusCode::OK, metrics::CONTENT_TYPE, sh.metrics.render()),
        (_, "/healthz" | "/metrics") => plain(StatusCode::METHOD_NOT_ALLOWED, text, "use GET\n"),
        _ => plain(
            StatusCode::NOT_FOUND,
            text,
            "a market coordinator: nodes connect over WebSocket; GET /healthz or /metrics\n",
        ),
    }
}

/// `GET /healthz`: 200 and `"ok":true` while the database answers; 503
/// and `"database":"unreachable"` while it does not (the replica refuses
/// every write then). Names the replica and the witness key.
fn healthz(sh: &Shared) -> Reply {
    let up = sh.metrics.db_up();
    let body = serde_json::json!({
        "ok": up,
        "database": if up { "up" } else { "unreachable" },
        "engine": if sh.opts.db.is_postgres() { "postgres" } else { "sqlite" },
        "replica": sh.opts.replica,
        "witness": sh.witness.public_hex(),
    });
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    plain(status, "application/json", format!("{body}\n"))
}

/// Does the comma-separated header `name` hold `token` (any case)?
fn has_token(h: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Answer a WebSocket upgrade (RFC 6455 section 4.2) and hand the upgraded
/// connection to a session task.
fn upgrade(req: &mut Request<Incoming>, sh: &Arc<Shared>, slot: &Arc<Slot>, accepted: Instant) -> Reply {
    let text = "text/plain; charset=utf-8";
    let h = req.headers();
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let websocket = req.method() == Method::GET
        && has_token(h, header::CONNECTION, "upgrade")
        && has_token(h, header::UPGRADE, "websocket");
    let (Some(accept), true) = (key, websocket) else {
        sh.metrics.closed(Closed::BadRequest);
        return plain(StatusCode::BAD_REQUEST, text, "not a WebSocket upgrade\n");
    };
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        sh.metrics.closed(Closed::BadRequest);
        let mut r = plain(StatusCode::UPGRADE_REQUIRED, text, "WebSocket version 13 only\n");
        r.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let on_upgrade = hyper::upgrade::on(req);
    let (sh, slot) = (sh.clone(), slot.clone());
    let deadline = accepted + sh.opts.limits.auth_timeout;
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            session::run(upgraded, sh, slot, deadline).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}
