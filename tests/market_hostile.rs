//! Hostile input: every bad frame is refused with its reason code, changes
//! nothing, is counted in /metrics, and the coordinator keeps serving.

mod common;
mod market_support;

use base64::Engine as _;
use claude_max_market::market::protocol::{auth_message, encode_request, Event, Reason, Request};
use futures_util::{SinkExt, StreamExt};
use market_support::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

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

async fn next(ws: &mut Raw) -> Option<Event> {
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
                    data: "eA==".into()
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
