//! Hostile input: every bad frame is refused with its reason code, changes
//! nothing, is counted in /metrics, and the coordinator keeps serving.
//!
//! The attacks on the coordinator itself (connections that say too little,
//! partial frames before `hello`, nodes that stop reading, too many
//! connections) each run against a fresh `market serve`, bounded in count
//! and time, and check the same four things: its peak RSS stays at most
//! 256 MiB, `/healthz` answers within 2 s throughout, an honest
//! post -> accept -> deliver -> settle cycle completes during the attack,
//! and the coordinator's sockets are released within 15 s of its end.
//! Attackers connect from other loopback addresses (127.0.0.2 and up) than
//! the honest nodes, as they would from other hosts.

mod common;
// The coordinator harness links the library: only market tests include it.
#[path = "common/market.rs"]
mod market;

use base64::Engine as _;
use claude_max_market::market::protocol::{auth_message, encode_request, Event, Reason, Request};
use futures_util::{SinkExt, StreamExt};
use market::*;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Raw = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn raw(server: &Server) -> (Raw, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(&server.endpoint)
        .await
        .expect("connect");
    let nonce = match next(&mut ws).await {
        Some(Event::Challenge { nonce, .. }) => nonce,
        other => panic!("expected a challenge, got {other:?}"),
    };
    (ws, nonce)
}

async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<Event> {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("server speaks JSON")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn ask(c: &claude_max_market::market::client::Client, id: &str, text: String) -> Event {
    c.exchange(id, &text).await.expect("an answer")
}

#[track_caller]
fn reason(ev: Option<Event>) -> Reason {
    match ev {
        Some(Event::Error { reason, .. }) => reason,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn hello(node: &Node, nonce: &str, signed_nonce: &str) -> String {
    let identity = node.id.public();
    let sig = node.id.sign(&auth_message(signed_nonce, &identity));
    encode_request(
        None,
        &Request::Hello {
            identity,
            nonce: nonce.into(),
            sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        },
    )
}

#[test]
fn bad_sessions_are_refused_before_anything_else() {
    let server = Server::start(&[]);
    rt().block_on(async {
        let node = Node::new();
        // Anything before hello: refused, connection stays for a proper hello.
        let (mut ws, nonce) = raw(&server).await;
        let status = encode_request(Some("s1"), &Request::Status {});
        ws.send(Message::text(status)).await.unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::NotAuthenticated);
        ws.send(Message::text("not json")).await.unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::Malformed);
        ws.send(Message::text(hello(&node, &nonce, &nonce))).await.unwrap();
        assert!(matches!(next(&mut ws).await, Some(Event::Welcome { .. })));

        // A hello signed over another challenge.
        let (mut ws, nonce) = raw(&server).await;
        ws.send(Message::text(hello(&node, "00", "00"))).await.unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::BadChallenge);
        assert!(next(&mut ws).await.is_none(), "closed after a failed login");
        let _ = nonce;

        // A signature by another key.
        let (mut ws, nonce) = raw(&server).await;
        let other = Node::new();
        let identity = node.id.public();
        let sig = other.id.sign(&auth_message(&nonce, &identity));
        let frame = encode_request(
            None,
            &Request::Hello {
                identity,
                nonce: nonce.clone(),
                sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
            },
        );
        ws.send(Message::text(frame)).await.unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::BadSignature);

        // A node id that is not the hash of its key.
        let (mut ws, nonce) = raw(&server).await;
        let mut identity = node.id.public();
        identity.node_id = "0".repeat(64);
        let sig = node.id.sign(&auth_message(&nonce, &identity));
        let frame = encode_request(
            None,
            &Request::Hello {
                identity,
                nonce,
                sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
            },
        );
        ws.send(Message::text(frame)).await.unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::BadIdentity);
    });
    assert!(server.metric("cmm_market_rejects_total{reason=\"bad_signature\"}") >= 1);
    assert!(server.metric("cmm_market_rejects_total{reason=\"bad_challenge\"}") >= 1);
    assert!(server.metric("cmm_market_rejects_total{reason=\"bad_identity\"}") >= 1);
    assert!(server.metric("cmm_market_rejects_total{reason=\"not_authenticated\"}") >= 1);
    let v = server.verify();
    assert_eq!(v["report"]["nodes"], 1, "only the good login registered a node");
}

#[test]
fn bad_frames_after_login_get_reason_codes_and_change_nothing() {
    let server = Server::start(&["--payload-cap", "65536", "--control-cap", "4096"]);
    rt().block_on(async {
        let (r, p, mallory) = (Node::new(), Node::new(), Node::new());
        let rc = r.connect(&server).await;
        let pc = p.connect(&server).await;
        let mc = mallory.connect(&server).await;
        let err = |ev: Event| match ev {
            Event::Error { reason, .. } => reason,
            other => panic!("expected an error, got {other:?}"),
        };
        assert_eq!(
            err(ask(&mc, "u1", json!({"v":1,"type":"launch","id":"u1"}).to_string()).await),
            Reason::UnknownType
        );
        assert_eq!(
            err(ask(&mc, "u2", json!({"v":9,"type":"status","id":"u2"}).to_string()).await),
            Reason::BadVersion
        );
        assert_eq!(
            err(ask(
                &mc,
                "u3",
                json!({"v":1,"type":"accept","id":"u3","task_id":7}).to_string()
            )
            .await),
            Reason::Malformed
        );
        assert_eq!(
            err(ask(
                &mc,
                "u4",
                json!({"v":1,"type":"hello","id":"u4","identity":r.id.public(),"nonce":"","sig":""}).to_string()
            )
            .await),
            Reason::AlreadyAuthenticated
        );
        let pad = "x".repeat(5000);
        assert_eq!(
            err(ask(
                &mc,
                "u5",
                json!({"v":1,"type":"status","id":"u5","pad":pad}).to_string()
            )
            .await),
            Reason::Oversized,
            "control frames have the small cap"
        );
        // A frame over a cap also ends the session.
        let mut mc = mc;
        assert!(
            mc.next_event(std::time::Duration::from_secs(10)).await.is_none(),
            "closed after an oversized frame"
        );
        let mc = mallory.connect(&server).await;
        assert_eq!(
            err(ask(
                &mc,
                "u6",
                json!({"v":1,"type":"post","id":"u6","model":"m","max_tokens":1,"max_price":1,
                "payload_hash":"zz","deadline_secs":1})
                .to_string()
            )
            .await),
            Reason::InvalidField
        );
        // Garbage without an id still gets an error frame (as an event).
        let mut mc = mc;
        mc.send_raw("{{{{").unwrap();
        let ev = expect_event(&mut mc, 5, "error", |e| matches!(e, Event::Error { .. })).await;
        assert_eq!(err(ev), Reason::Malformed);

        // Replayed message id: refused with the original result, applied once.
        pc.request(&offer(5)).await.unwrap();
        let first = rc.request_with_id("post-1", &post(40)).await.unwrap();
        let again = rc
            .exchange("post-1", &encode_request(Some("post-1"), &post(40)))
            .await
            .unwrap();
        match again {
            Event::Error {
                reason: Reason::DuplicateId,
                original: Some(o),
                ..
            } => assert_eq!(o, first),
            other => panic!("expected duplicate_id, got {other:?}"),
        }
        let tid = first["task"]["task_id"].as_str().unwrap().to_string();
        assert_eq!(
            rc.request(&Request::Status {}).await.unwrap()["balance"],
            960,
            "escrow locked once"
        );

        // Acting on another node's task.
        assert_eq!(
            reason_of(
                rc.request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::NotOwner
        );
        assert_eq!(
            reason_of(
                mc.request(&Request::Raise {
                    task_id: tid.clone(),
                    max_price: 99
                })
                .await
            ),
            Reason::NotOwner
        );
        assert_eq!(
            reason_of(
                mc.request(&Request::Accept {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::NoMatchingOffer
        );
        pc.request(&Request::Accept {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        let deliver = Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: "eA==".into(),
        };
        assert_eq!(reason_of(mc.request(&deliver).await), Reason::NotOwner);
        assert_eq!(
            reason_of(
                mc.request(&Request::Renew {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::NotOwner
        );
        assert_eq!(
            reason_of(
                mc.request(&Request::Payload {
                    task_id: tid.clone(),
                    attempt: 1,
                    data: "eA==".into(),
                    part: None,
                    parts: None,
                })
                .await
            ),
            Reason::NotOwner
        );
        // Out of order: settle before delivery, accept of an unknown task.
        assert_eq!(
            reason_of(
                rc.request(&Request::Settle {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::WrongState
        );
        assert_eq!(
            reason_of(
                pc.request(&Request::Accept {
                    task_id: "t-nope".into(),
                    attempt: 1
                })
                .await
            ),
            Reason::NotFound
        );
        // Deliveries may use the larger payload cap, but not more.
        let big = "A".repeat(30_000);
        pc.request(&Request::Deliver {
            task_id: tid.clone(),
            attempt: 1,
            data: big,
        })
        .await
        .unwrap();
        assert_eq!(
            reason_of(
                mc.request(&Request::Settle {
                    task_id: tid.clone(),
                    attempt: 1
                })
                .await
            ),
            Reason::NotOwner
        );
        let st = mc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["balance"], 1000, "mallory's refused frames moved no money");

        let huge = "A".repeat(200_000);
        let text = encode_request(
            Some("h1"),
            &Request::Deliver {
                task_id: tid.clone(),
                attempt: 1,
                data: huge,
            },
        );
        let ev = pc.exchange("h1", &text).await;
        assert!(
            ev.is_err()
                || matches!(
                    ev,
                    Ok(Event::Error {
                        reason: Reason::Oversized,
                        ..
                    })
                ),
            "a frame over the payload cap is refused: {ev:?}"
        );
        rc.request(&Request::Settle {
            task_id: tid.clone(),
            attempt: 1,
        })
        .await
        .unwrap();
        // Again, or under another attempt: refused, and nothing moves
        // (delivered once, paid once). The oversized frame ended the
        // provider's session.
        let pc = p.connect(&server).await;
        let paid = pc.request(&Request::Status {}).await.unwrap()["balance"].clone();
        assert_eq!(reason_of(pc.request(&deliver).await), Reason::WrongState);
        let again = |attempt| Request::Settle {
            task_id: tid.clone(),
            attempt,
        };
        assert_eq!(reason_of(rc.request(&again(1)).await), Reason::WrongState);
        assert_eq!(reason_of(rc.request(&again(2)).await), Reason::StaleAttempt);
        assert_eq!(pc.request(&Request::Status {}).await.unwrap()["balance"], paid);
        let st = rc.request(&Request::Status {}).await.unwrap();
        assert_eq!(st["tasks"][0]["state"], "settled");
    });
    for r in [
        "unknown_type",
        "bad_version",
        "malformed",
        "oversized",
        "duplicate_id",
        "not_owner",
        "wrong_state",
    ] {
        assert!(
            server.metric(&format!("cmm_market_rejects_total{{reason=\"{r}\"}}")) >= 1,
            "rejects of {r} are counted"
        );
    }
    // The replayed post wrote its escrow before its id was found taken:
    // its batch was applied again request by request (and the escrow was
    // locked once, checked above).
    assert!(
        server.metric("cmm_market_batches_replayed_total") >= 1,
        "a request that failed after writing has its batch applied again"
    );
    // Still serving.
    assert!(server.http_get("/healthz").contains("ok"));
    rt().block_on(async {
        let n = Node::new();
        n.connect(&server).await.request(&Request::Status {}).await.unwrap();
    });
    server.verify();
}

#[test]
fn floods_are_rate_limited_per_node() {
    let server = Server::start(&["--rate", "5", "--burst", "5"]);
    rt().block_on(async {
        let n = Node::new();
        let mut c = n.connect(&server).await;
        // Thirty frames at once: the burst of five passes, most of the rest is refused.
        for i in 0..30 {
            let id = format!("f{i}");
            c.send_raw(&encode_request(Some(&id), &Request::Status {})).unwrap();
        }
        let mut limited = 0;
        let mut answered = 0;
        while answered < 30 {
            match c.next_event(std::time::Duration::from_secs(10)).await {
                Some(Event::Error {
                    reason: Reason::RateLimited,
                    ..
                }) => {
                    limited += 1;
                    answered += 1;
                }
                Some(Event::Ok { .. }) => answered += 1,
                Some(_) => {}
                None => break,
            }
        }
        assert_eq!(answered, 30, "every frame is answered");
        assert!(limited >= 10, "a flood is limited ({limited} refused)");
    });
    assert!(server.metric("cmm_market_rejects_total{reason=\"rate_limited\"}") >= 10);
    server.verify();
}

/// The attack scenarios measure the coordinator's memory and latency: one
/// at a time, so that they do not measure each other.
static ATTACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_attack_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ATTACK.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: u64 = 1024;
const RSS_CEILING_KIB: u64 = 256 * MIB;

/// A TCP connection to the coordinator from the loopback address `from`,
/// optionally with a small receive buffer (a node that reads slowly).
async fn tcp_from(server: &Server, from: &str, rcvbuf: Option<u32>) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    sock.bind(format!("{from}:0").parse().unwrap())
        .expect("bind a loopback address");
    sock.connect(server.addr.parse().unwrap()).await.expect("connect")
}

/// Read until the peer closes (true) or `wait` passes (false).
async fn closed_within(s: &mut TcpStream, wait: std::time::Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// How many of `conns` the coordinator closes at once (within 2 s, apart
/// from the login time an admitted connection may wait: 4 s or more in
/// these tests).
async fn refused_at_once(conns: &mut [TcpStream]) -> usize {
    let wait = std::time::Duration::from_secs(2);
    futures_util::future::join_all(conns.iter_mut().map(|c| closed_within(c, wait)))
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

/// A WebSocket session up to (and including) the challenge, from `from`.
async fn ws_from(server: &Server, from: &str, rcvbuf: Option<u32>) -> (WebSocketStream<TcpStream>, String) {
    let s = tcp_from(server, from, rcvbuf).await;
    let (mut ws, _) = tokio_tungstenite::client_async(server.endpoint.as_str(), s)
        .await
        .expect("WebSocket handshake");
    match next(&mut ws).await {
        Some(Event::Challenge { nonce, .. }) => (ws, nonce),
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// The close frame's code, reading past anything else.
async fn close_code<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// The header of a masked text frame of `len` payload bytes.
fn text_frame_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// Send `text` on a raw session and read until the answer to `id`.
async fn call(ws: &mut WebSocketStream<TcpStream>, id: &str, text: String) -> Event {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match next(ws).await {
            Some(e @ Event::Ok { .. }) | Some(e @ Event::Error { .. })
                if matches!(&e, Event::Ok { re, .. } if re == id)
                    || matches!(&e, Event::Error { re: Some(re), .. } if re == id) =>
            {
                return e
            }
            Some(_) => continue,
            None => panic!("the session closed before answering {id}"),
        }
    }
}

/// Checks common to every attack, once it is over and its connections
/// are closed.
#[track_caller]
fn after_attack(server: &Server, baseline_sockets: usize, health: Health) {
    let ended = std::time::Instant::now();
    assert!(
        server.wait_for(15, |s| s.sockets() <= baseline_sockets),
        "the coordinator still holds {} sockets (it held {baseline_sockets} before the attack) 15 s after it ended",
        server.sockets()
    );
    let peak = server.status_kib("VmHWM");
    eprintln!(
        "sockets released {:?} after the attack; peak RSS {} MiB; /healthz asked {} times, slowest {:?}, {} failed",
        ended.elapsed(),
        peak / MIB,
        health.asked,
        health.worst,
        health.failed
    );
    assert!(peak <= RSS_CEILING_KIB, "peak RSS {} MiB is over 256 MiB", peak / MIB);
    assert!(
        health.asked > 0 && health.failed == 0,
        "/healthz failed during the attack: {health:?}"
    );
    assert!(
        health.worst < std::time::Duration::from_secs(2),
        "/healthz took {:?} during the attack",
        health.worst
    );
    server.verify();
}

#[test]
fn connections_that_send_a_few_bytes_are_closed_and_their_sockets_released() {
    let _one = one_attack_at_a_time();
    // A request head must be complete within 3 s here (10 s by default),
    // so the test waits 3 s for the coordinator to close them, not 10.
    let server = Server::start(&["--http-timeout-ms", "3000"]);
    let baseline = server.sockets();
    let health = server.probe_health();
    let cpu0 = server.cpu_secs();
    rt().block_on(async {
        // 300 connections send `GE` and wait; 100 more send it and hang up.
        let started = std::time::Instant::now();
        let mut held = Vec::new();
        for i in 0..400 {
            let from = format!("127.0.0.{}", 2 + i / 100);
            let mut s = tcp_from(&server, &from, None).await;
            s.write_all(b"GE").await.unwrap();
            if i < 300 {
                held.push(s);
            }
        }
        full_cycle(&server).await;
        for s in &mut held {
            let left = std::time::Duration::from_secs(15).saturating_sub(started.elapsed());
            assert!(
                closed_within(s, left).await,
                "a connection that sent 2 bytes is still open {:?} after it connected",
                started.elapsed()
            );
        }
    });
    let cpu = server.cpu_secs() - cpu0;
    eprintln!("coordinator CPU during the attack: {cpu:.2} s");
    assert!(server.metric("cmm_market_connections_closed_total{why=\"http_timeout\"}") >= 300);
    after_attack(&server, baseline, health.stop());
}

#[test]
fn a_partial_frame_before_hello_is_refused_on_its_header_and_closes_the_connection() {
    let _one = one_attack_at_a_time();
    let server = Server::start(&[]);
    let baseline = server.sockets();
    let health = server.probe_health();
    rt().block_on(async {
        // 100 connections each stream most of such a frame.
        let mut tasks = Vec::new();
        for i in 0..100 {
            let from = format!("127.0.0.{}", 3 + i / 25);
            let (ws, _) = ws_from(&server, &from, None).await;
            tasks.push(tokio::spawn(async move {
                let mut ws = ws;
                let len = 4 * 1024 * 1024 - 1;
                let chunk = vec![b'x'; 64 * 1024];
                let s = ws.get_mut();
                let mut sent = 0;
                if s.write_all(&text_frame_header(len)).await.is_ok() {
                    while sent + chunk.len() < len as usize {
                        let w = tokio::time::timeout(std::time::Duration::from_secs(5), s.write_all(&chunk)).await;
                        if !matches!(w, Ok(Ok(()))) {
                            break;
                        }
                        sent += chunk.len();
                    }
                }
                (ws, sent)
            }));
        }
        let mut held = Vec::new();
        let mut cut = 0;
        for t in tasks {
            let (ws, sent) = t.await.unwrap();
            if sent < 4 * 1024 * 1024 - 64 * 1024 {
                cut += 1;
            }
            held.push(ws);
        }
        full_cycle(&server).await;
        eprintln!(
            "{cut} of 100 partial frames were cut short by the coordinator; peak RSS {} MiB",
            server.status_kib("VmHWM") / MIB
        );
        assert!(cut >= 95, "only {cut} of 100 partial frames were cut short");
        drop(held);

        // One frame header announcing 4 MiB - 1 bytes: refused before any
        // of its payload is read, with an error frame and close code 1009.
        let (mut ws, _) = ws_from(&server, "127.0.0.2", None).await;
        ws.get_mut()
            .write_all(&text_frame_header(4 * 1024 * 1024 - 1))
            .await
            .unwrap();
        assert_eq!(reason(next(&mut ws).await), Reason::Oversized);
        assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));
    });
    assert!(server.metric("cmm_market_connections_closed_total{why=\"oversized\"}") >= 95);
    after_attack(&server, baseline, health.stop());
}

#[test]
fn a_node_that_stops_reading_is_disconnected_and_a_payload_goes_once_per_attempt() {
    let _one = one_attack_at_a_time();
    let server = Server::start(&["--lease-ms", "120000", "--grace-ms", "1000"]);
    let baseline = server.sockets();
    let health = server.probe_health();
    rt().block_on(async {
        let r = Node::new();
        let rc = r.connect(&server).await;
        let mut tids = Vec::new();
        for _ in 0..13 {
            let v = rc.request(&post(20)).await.unwrap();
            tids.push(v["task"]["task_id"].as_str().unwrap().to_string());
        }
        // A provider with a small receive buffer takes tasks, then stops reading.
        let provider = |n: usize| {
            let server = &server;
            let tids = tids.clone();
            async move {
                let node = Node::new();
                let (mut ws, nonce) = ws_from(server, "127.0.0.2", Some(4096)).await;
                ws.send(Message::text(hello(&node, &nonce, &nonce))).await.unwrap();
                assert!(matches!(next(&mut ws).await, Some(Event::Welcome { .. })));
                let offer = json!({"v":1,"type":"offer","id":"o","slots":16,"price":5,
                                   "models":["sonnet"],"ttl_secs":3600});
                assert!(matches!(call(&mut ws, "o", offer.to_string()).await, Event::Ok { .. }));
                for (i, tid) in tids.iter().enumerate().skip(n).take(if n == 0 { 12 } else { 1 }) {
                    let id = format!("a{i}");
                    let accept = json!({"v":1,"type":"accept","id":id,"task_id":tid,"attempt":1});
                    let ev = call(&mut ws, &id, accept.to_string()).await;
                    assert!(matches!(ev, Event::Ok { .. }), "accept: {ev:?}");
                }
                ws
            }
        };
        let data = "A".repeat(3 * 1024 * 1024);
        let payload = |id: &str, tid: &str| {
            format!(r#"{{"v":1,"type":"payload","id":"{id}","task_id":"{tid}","attempt":1,"data":"{data}"}}"#)
        };
        // One lease, its payload sent 50 times: relayed once, refused after.
        let stuck = provider(12).await;
        let mut relayed = 0;
        let mut first_refusal = None;
        let flood = std::time::Instant::now();
        for i in 0..50 {
            let id = format!("q{i}");
            match rc.exchange(&id, &payload(&id, &tids[12])).await.unwrap() {
                Event::Ok { .. } => relayed += 1,
                Event::Error { reason, .. } => {
                    first_refusal.get_or_insert(reason);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
        eprintln!(
            "50 payloads of 3 MiB for one attempt: {relayed} relayed in {:?}; peak RSS {} MiB",
            flood.elapsed(),
            server.status_kib("VmHWM") / MIB
        );
        assert_eq!(relayed, 1, "a payload is relayed once per attempt");
        assert_eq!(first_refusal, Some(Reason::WrongState));
        // Twelve leases, a 3 MiB payload for each: the queue of the
        // provider that does not read overflows and it is disconnected.
        let slow = provider(0).await;
        for (i, tid) in tids.iter().take(12).enumerate() {
            let id = format!("p{i}");
            let ev = rc.exchange(&id, &payload(&id, tid)).await.unwrap();
            assert!(matches!(ev, Event::Ok { .. }), "payload {i}: {ev:?}");
        }
        assert!(
            server.wait_for(15, |s| s.try_metric("cmm_market_sessions") == Some(2)),
            "the provider that stopped reading still has a session ({} sessions)",
            server.metric("cmm_market_sessions")
        );
        // It is gone as for any lost connection: its offer is withdrawn
        // after the grace period (its leases lapse by the clock).
        assert!(
            server.wait_for(15, |s| s.try_metric("cmm_market_offers_active") == Some(1)),
            "the offer of the provider that was cut off is still active"
        );
        full_cycle(&server).await;
        drop((slow, stuck));
        rc.close();
    });
    assert!(server.metric("cmm_market_connections_closed_total{why=\"send_queue_full\"}") >= 1);
    after_attack(&server, baseline, health.stop());
}

#[test]
fn connections_are_limited_per_address_and_in_total_and_in_time() {
    let _one = one_attack_at_a_time();
    // Login and request-head time of 4 s here (10 s by default): still well
    // apart from the 2 s in which a refused connection must be closed.
    let server = Server::start(&["--auth-timeout-ms", "4000", "--http-timeout-ms", "4000"]);
    let baseline = server.sockets();
    let health = server.probe_health();
    rt().block_on(async {
        let started = std::time::Instant::now();
        // 400 silent connections from one address: past the 256 that may
        // wait to authenticate, each is closed at once.
        let mut conns = Vec::new();
        for _ in 0..400 {
            conns.push(tcp_from(&server, "127.0.0.2", None).await);
        }
        let refused = refused_at_once(&mut conns).await;
        assert!(
            refused >= 144,
            "only {refused} of 400 connections from one address were refused"
        );
        // WebSocket sessions that never say `hello` are closed, with a
        // close code, within the login time.
        let mut silent = Vec::new();
        for _ in 0..20 {
            silent.push(ws_from(&server, "127.0.0.3", None).await.0);
        }
        // A request head that trickles in, and one that is too large.
        let slow_started = std::time::Instant::now();
        let mut slow = tcp_from(&server, "127.0.0.4", None).await;
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let mut big = tcp_from(&server, "127.0.0.4", None).await;
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        big.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), big.read_to_string(&mut answer)).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "a 20 KB request head: {answer:?}");

        full_cycle(&server).await;
        let trickled = async {
            let mut buf = [0u8; 256];
            loop {
                tokio::select! {
                    r = slow.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return true },
                    // A sleep by design: a slow client trickles its head.
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                        if slow.write_all(b"X-More: y\r\n").await.is_err() {
                            return true;
                        }
                    }
                }
            }
        };
        let left = std::time::Duration::from_secs(15).saturating_sub(slow_started.elapsed());
        assert!(
            tokio::time::timeout(left, trickled).await.unwrap_or(false),
            "a request head sent a line every 500 ms is still open after 15 s"
        );
        for ws in &mut silent {
            assert_eq!(
                close_code(ws).await,
                Some(CloseCode::Policy),
                "closed for not logging in"
            );
        }
        for c in &mut conns {
            let left = std::time::Duration::from_secs(15).saturating_sub(started.elapsed());
            assert!(
                closed_within(c, left).await,
                "a silent connection outlived the login time"
            );
        }
    });
    assert!(server.metric("cmm_market_connections_refused_total{why=\"per_address\"}") >= 144);
    assert!(server.metric("cmm_market_connections_closed_total{why=\"auth_timeout\"}") >= 20);
    after_attack(&server, baseline, health.stop());

    // The global limit: past it, every connection is refused at once, and
    // the coordinator serves again once the attack ends.
    let server = Server::start(&["--max-connections", "50"]);
    rt().block_on(async {
        let mut conns = Vec::new();
        for i in 0..80 {
            conns.push(tcp_from(&server, &format!("127.0.0.{}", 10 + i % 8), None).await);
        }
        let refused = refused_at_once(&mut conns).await;
        assert_eq!(refused, 30, "50 connections are let in, the rest refused");
        drop(conns);
    });
    assert!(server.wait_for(15, |s| s.try_metric("cmm_market_connections").is_some_and(|n| n <= 1)));
    rt().block_on(full_cycle(&server));
    assert!(server.metric("cmm_market_connections_refused_total{why=\"connections\"}") >= 30);
}
