//! The port: connection limits on arrival, plain HTTP (`GET /healthz`,
//! `GET /metrics`) and the WebSocket upgrade, all through hyper.
//!
//! Every connection takes a [`Slot`] under `--max-connections` before hyper
//! reads a byte of it; until its node authenticates it also counts under
//! `--max-unauth` and `--max-unauth-per-addr`. A connection over a limit is
//! closed at once and counted in `cmm_market_connections_refused_total`.
//! hyper reads a request head of at most `--max-header-bytes`; a plain
//! HTTP connection lives at most `--http-timeout-ms` and serves one request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::metrics::{self, Closed, Metrics, Refused};
use super::{session, Limits, Shared};

/// The connection limits, shared by every connection.
pub struct Admission {
    limits: Limits,
    metrics: Arc<Metrics>,
    open: AtomicUsize,
    unauth: Mutex<Unauth>,
}

#[derive(Default)]
struct Unauth {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// One connection's place under the limits, given back on drop.
pub struct Slot {
    adm: Arc<Admission>,
    addr: IpAddr,
    authenticated: AtomicBool,
}

/// The address a peer is counted under: IPv6 peers by their /64, since one
/// host commonly holds a whole /64.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl Admission {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            metrics,
            open: AtomicUsize::new(0),
            unauth: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, or the limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<Slot>, Refused> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Connections);
        }
        let addr = peer_key(ip);
        let admitted = match self.unauth.lock() {
            Ok(mut u) => {
                let here = u.by_addr.get(&addr).copied().unwrap_or(0);
                if u.total >= self.limits.max_unauth {
                    Err(Refused::Unauthenticated)
                } else if here >= self.limits.max_unauth_per_addr {
                    Err(Refused::PerAddress)
                } else {
                    u.total += 1;
                    u.by_addr.insert(addr, here + 1);
                    Ok(())
                }
            }
            Err(_) => Err(Refused::Unauthenticated),
        };
        if let Err(r) = admitted {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(r);
        }
        self.metrics.connections.inc();
        Ok(Arc::new(Slot {
            adm: self.clone(),
            addr,
            authenticated: AtomicBool::new(false),
        }))
    }

    fn release_unauth(&self, addr: IpAddr) {
        if let Ok(mut u) = self.unauth.lock() {
            u.total = u.total.saturating_sub(1);
            if let Some(n) = u.by_addr.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    u.by_addr.remove(&addr);
                }
            }
        }
    }
}

impl Slot {
    /// The node logged in: the connection no longer counts as unauthenticated.
    pub fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::Relaxed) {
            self.adm.release_unauth(self.addr);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.authenticated.load(Ordering::Relaxed) {
            self.adm.release_unauth(self.addr);
        }
        self.adm.open.fetch_sub(1, Ordering::Relaxed);
        self.adm.metrics.connections.dec();
    }
}

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
        let r = respond(req, &sh2, &slot, accepted);
        async move { Ok::<_, Infallible>(r) }
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
        (&Method::GET, "/healthz") => plain(
            StatusCode::OK,
            "application/json",
            format!("{{\"ok\":true,\"witness\":\"{}\"}}\n", sh.witness.public_hex()),
        ),
        (&Method::GET, "/metrics") => plain(StatusCode::OK, metrics::CONTENT_TYPE, sh.metrics.render()),
        (_, "/healthz" | "/metrics") => plain(StatusCode::METHOD_NOT_ALLOWED, text, "use GET\n"),
        _ => plain(
            StatusCode::NOT_FOUND,
            text,
            "a market coordinator: nodes connect over WebSocket; GET /healthz or /metrics\n",
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_unauth: usize, per_addr: usize) -> Limits {
        Limits {
            max_connections,
            max_unauth,
            max_unauth_per_addr: per_addr,
            ..Limits::default()
        }
    }

    #[test]
    fn slots_count_under_every_limit_and_are_given_back() {
        let adm = Admission::new(limits(3, 2, 1), Arc::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let s1 = adm.admit(a).unwrap();
        assert_eq!(adm.admit(a).err(), Some(Refused::PerAddress));
        let s2 = adm.admit(b).unwrap();
        assert_eq!(adm.admit(c).err(), Some(Refused::Unauthenticated));
        // Authenticated connections count only under the global limit.
        s1.authenticated();
        s2.authenticated();
        let s3 = adm.admit(a).unwrap();
        assert_eq!(adm.admit(c).err(), Some(Refused::Connections));
        drop((s1, s3));
        let _s4 = adm.admit(c).unwrap();
        let _s5 = adm.admit(a).unwrap();
        drop(s2);
        assert_eq!(adm.open.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        let adm = Admission::new(limits(10, 10, 1), Arc::default());
        let _s = adm.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            adm.admit("2001:db8::2".parse().unwrap()).err(),
            Some(Refused::PerAddress)
        );
        assert!(adm.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
        let _m = adm.admit("::ffff:10.0.0.9".parse().unwrap()).unwrap();
        assert_eq!(adm.admit("10.0.0.9".parse().unwrap()).err(), Some(Refused::PerAddress));
    }
}
