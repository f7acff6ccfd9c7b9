//! Federation when things go wrong (RFC 6120 §8.3.3, §13; XEP-0178; XEP-0220): peers
//! that do not exist, do not listen, do not answer or do not offer TLS, full queues, idle
//! links, a peer that restarts on another port, and policy overrides. The rule checked
//! throughout: nothing is silently lost — each stanza is delivered or its sender gets an
//! error (presence other than subscription requests excepted, RFC 6121 §4.x).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use confab_protocol::{ns, Element, ParserLimits, StreamEvent, StreamParser};
use confab_tests::dns::TestDns;
use confab_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const A: &str = "a.test";
const B: &str = "b.test";
/// A domain whose "server" is scripted by the test (or absent).
const C: &str = "c.test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Pair {
    dns: TestDns,
    a: TestServer,
    b: TestServer,
}

fn publish_port(dns: &TestDns, domain: &str, port: u16) {
    let host = format!("xmpp.{domain}");
    dns.remove(&format!("_xmpp-server._tcp.{domain}"));
    dns.add_srv(&format!("_xmpp-server._tcp.{domain}"), 0, 5, port, &host);
    dns.remove(&host);
    dns.add_a(&host, LOOPBACK);
}

fn publish(dns: &TestDns, domain: &str, server: &TestServer) {
    publish_port(dns, domain, server.running().s2s_addrs[0].port());
}

async fn pair_with(pki: Arc<TestPki>, adjust: impl Fn(&mut confab::Config) + Copy) -> Result<Pair> {
    let dns = TestDns::start().await?;
    let ns_addr = dns.addr.to_string();
    let set = |c: &mut confab::Config| {
        c.s2s.nameservers = vec![ns_addr.clone()];
        c.s2s.connect_timeout_secs = 5;
        adjust(c);
    };
    let a = TestServer::start_with_pki(pki.clone(), &[A], set).await?;
    let b = TestServer::start_with_pki(pki, &[B], set).await?;
    publish(&dns, A, &a);
    publish(&dns, B, &b);
    a.add_account(&format!("alice@{A}"), "pw-alice").await?;
    b.add_account(&format!("bob@{B}"), "pw-bob").await?;
    Ok(Pair { dns, a, b })
}

async fn pair(adjust: impl Fn(&mut confab::Config) + Copy) -> Result<Pair> {
    pair_with(TestPki::create_temp(&[A, B])?, adjust).await
}

fn has_outgoing_link(server: &TestServer, remote: &str) -> bool {
    server
        .running()
        .server
        .federation
        .get()
        .is_some_and(|f| f.links().iter().any(|l| l.outgoing && l.remote == remote))
}

/// Waits (bounded) for a condition only observable by looking: the link table.
async fn wait_until(what: &str, cond: impl Fn() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn chat_with_id(to: &str, body: &str, id: &str) -> Element {
    let mut m = chat(to, body);
    m.set_attr("id", id);
    m
}

fn is_error_with_id(e: &Element, id: &str) -> bool {
    e.attr("type") == Some("error") && e.attr("id") == Some(id)
}

/// Waits for the error reply to the stanza with `id`; returns its condition.
async fn expect_bounce(client: &mut Client, id: &str) -> Result<String> {
    let err = client.expect(|e| is_error_with_id(e, id)).await?;
    error_condition(&err).ok_or_else(|| anyhow!("no condition in {err}"))
}

/// A TCP listener that accepts connections and never says anything.
struct BlackHole {
    port: u16,
    task: JoinHandle<()>,
}

impl BlackHole {
    async fn start() -> Result<BlackHole> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        Ok(BlackHole { port, task })
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    Ok(listener.local_addr()?.port())
}

/// A scripted server for `domain` that answers the stream header with features offering
/// dialback but no STARTTLS; reports every element it then receives, until the
/// connection ends.
async fn plaintext_peer(domain: &'static str) -> Result<(u16, oneshot::Receiver<Vec<Element>>)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut got = Vec::new();
        let run = async {
            let (mut tcp, _) = listener.accept().await?;
            let mut parser = StreamParser::new(ParserLimits::default());
            let mut buf = vec![0u8; 16384];
            let mut opened = false;
            loop {
                let n = tcp.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
                parser.feed(&buf[..n]);
                while let Some(ev) = parser.next_event()? {
                    match ev {
                        StreamEvent::Open(_) if !opened => {
                            opened = true;
                            let answer = format!(
                                "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' xmlns:db='{}' from='{domain}' id='plain1' version='1.0'><stream:features><dialback xmlns='{}'/></stream:features>",
                                ns::SERVER,
                                ns::STREAM,
                                ns::DIALBACK,
                                ns::DIALBACK_FEATURE
                            );
                            tcp.write_all(answer.as_bytes()).await?;
                        }
                        StreamEvent::Element(e) => got.push(e),
                        StreamEvent::Open(_) | StreamEvent::Close => return Ok(()),
                    }
                }
            }
        };
        let _ = tokio::time::timeout(TIMEOUT, run).await;
        let _ = tx.send(got);
    });
    Ok((port, rx))
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_remote_domain_bounces_remote_server_not_found() -> Result<()> {
    let p = pair(|_| {}).await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    alice
        .send(&chat_with_id("someone@nxdomain.test", "hello?", "nx1"))
        .await?;
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", "nx2")
        .with_attr("to", "nxdomain.test")
        .with_child(Element::new("ping", ns::PING));
    alice.send(&iq).await?;
    for id in ["nx1", "nx2"] {
        assert_eq!(
            expect_bounce(&mut alice, id).await?,
            "remote-server-not-found"
        );
    }
    Ok(())
}

#[tokio::test]
async fn srv_to_a_closed_port_bounces_remote_server_not_found() -> Result<()> {
    let p = pair(|_| {}).await?;
    publish_port(&p.dns, C, closed_port().await?);
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    alice
        .send(&chat_with_id(&format!("carol@{C}"), "knock knock", "cp1"))
        .await?;
    assert_eq!(
        expect_bounce(&mut alice, "cp1").await?,
        "remote-server-not-found"
    );
    // b is unaffected.
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice.chat(&format!("bob@{B}"), "still here").await?;
    bob.expect_body("still here").await?;
    Ok(())
}

#[tokio::test]
async fn silent_peer_times_out_and_every_queued_stanza_bounces() -> Result<()> {
    let p = pair(|c| c.s2s.connect_timeout_secs = 1).await?;
    let hole = BlackHole::start().await?;
    publish_port(&p.dns, C, hole.port);
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let started = tokio::time::Instant::now();
    let ids = ["q1", "q2", "q3"];
    for id in ids {
        alice
            .send(&chat_with_id(&format!("carol@{C}"), id, id))
            .await?;
    }
    let iq = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", "q4")
        .with_attr("to", format!("carol@{C}/x"))
        .with_child(Element::new("ping", ns::PING));
    alice.send(&iq).await?;
    for id in ids.into_iter().chain(["q4"]) {
        assert_eq!(
            expect_bounce(&mut alice, id).await?,
            "remote-server-timeout",
            "{id}"
        );
    }
    // Not before the connect timeout (1 s) ran out.
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Each error went back exactly once.
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    drop(hole);
    Ok(())
}

#[tokio::test]
async fn full_queue_bounces_extra_stanzas_at_once() -> Result<()> {
    let p = pair(|c| {
        c.s2s.connect_timeout_secs = 2;
        c.s2s.queue = 2;
    })
    .await?;
    let hole = BlackHole::start().await?;
    publish_port(&p.dns, C, hole.port);
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    for i in 1..=5 {
        let id = format!("f{i}");
        alice
            .send(&chat_with_id(&format!("carol@{C}"), &id, &id))
            .await?;
    }
    // The queue holds two; the other three bounce right away, long before the two
    // queued ones time out with the connection attempt.
    let mut order = Vec::new();
    for _ in 0..5 {
        let e = alice
            .expect(|e| e.name() == "message" && e.attr("type") == Some("error"))
            .await?;
        order.push((
            e.attr("id").unwrap_or_default().to_string(),
            error_condition(&e).unwrap_or_default(),
        ));
    }
    let ids: Vec<&str> = order.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["f3", "f4", "f5", "f1", "f2"], "{order:?}");
    // Beyond the queue the server lacks room (RFC 6120 §8.3.3.18); the queued ones
    // waited for a connection that never answered (§8.3.3.16).
    for (id, cond) in &order {
        let expected = if ["f3", "f4", "f5"].contains(&id.as_str()) {
            "resource-constraint"
        } else {
            "remote-server-timeout"
        };
        assert_eq!(cond, expected, "{id}");
    }
    drop(hole);
    Ok(())
}

#[tokio::test]
async fn idle_link_is_closed_and_the_next_stanza_opens_a_new_one() -> Result<()> {
    let p = pair(|c| c.s2s.idle_timeout_secs = 1).await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice.chat(&format!("bob@{B}"), "first").await?;
    bob.expect_body("first").await?;
    assert!(has_outgoing_link(&p.a, B));
    wait_until("a's idle link to b is closed", || {
        !has_outgoing_link(&p.a, B)
    })
    .await?;
    alice.chat(&format!("bob@{B}"), "after idle").await?;
    bob.expect_body("after idle").await?;
    bob.chat(&alice.jid.clone(), "and back").await?;
    alice.expect_body("and back").await?;
    Ok(())
}

#[tokio::test]
async fn remote_restart_on_a_new_port_bounces_while_down_then_flows_again() -> Result<()> {
    let mut p = pair(|_| {}).await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice.chat(&format!("bob@{B}"), "before").await?;
    bob.expect_body("before").await?;
    bob.chat(&alice.jid.clone(), "before, back").await?;
    alice.expect_body("before, back").await?;
    assert!(has_outgoing_link(&p.a, B));

    // b stops: it closes its links, and a notices.
    let running = p.b.running.take().expect("b is running");
    running.shutdown().await;
    drop(bob);
    wait_until("a sees its link to b closed", || {
        !has_outgoing_link(&p.a, B)
    })
    .await?;

    // While b is down, DNS still names the old port: stanzas bounce.
    alice
        .send(&chat_with_id(&format!("bob@{B}"), "while down", "down1"))
        .await?;
    assert_eq!(
        expect_bounce(&mut alice, "down1").await?,
        "remote-server-not-found"
    );

    // b comes back on a new port, published in DNS.
    p.b.restart().await?;
    publish(&p.dns, B, &p.b);
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice
        .send(&chat_with_id(&format!("bob@{B}"), "after", "up1"))
        .await?;
    bob.expect_body("after").await?;
    bob.chat(&alice.jid.clone(), "after, back").await?;
    alice.expect_body("after, back").await?;
    // The message sent while down is not delivered late as well.
    bob.expect_none(|e| e.name() == "message").await?;
    Ok(())
}

#[tokio::test]
async fn required_encryption_refuses_a_peer_without_tls() -> Result<()> {
    // a requires encryption (the default); c.test's server offers no STARTTLS.
    let p = pair(|_| {}).await?;
    let (port, received) = plaintext_peer(C).await?;
    publish_port(&p.dns, C, port);
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    alice
        .send(&chat_with_id(&format!("carol@{C}"), "secret", "pt1"))
        .await?;
    assert_eq!(
        expect_bounce(&mut alice, "pt1").await?,
        "remote-server-not-found"
    );
    // Nothing was sent in the clear: neither the message nor a dialback key.
    let got = tokio::time::timeout(TIMEOUT, received).await??;
    assert!(
        got.iter()
            .all(|e| e.name() != "message" && e.ns() != ns::DIALBACK),
        "{got:?}"
    );
    Ok(())
}

#[tokio::test]
async fn dialback_refused_by_policy_when_a_certificate_does_not_fit() -> Result<()> {
    // b's certificate is for another name, and a's policy for b.test forbids dialback:
    // neither direction can be authenticated.
    let tmp = tempfile::tempdir()?;
    let pki = Arc::new(
        TestPki::create_named(tmp.path(), &[(A, A), (B, "elsewhere.test")])?.with_lenient_names(),
    );
    let p = pair_with(pki, |c| {
        if c.domains.iter().any(|d| d == A) {
            c.s2s.domains.insert(
                B.to_string(),
                confab::config::S2sDomainPolicy {
                    require_encryption: None,
                    allow_dialback: Some(false),
                },
            );
        }
    })
    .await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    // a -> b: a would authenticate itself by certificate, but cannot authenticate b.
    alice
        .send(&chat_with_id(&format!("bob@{B}"), "to misfit", "pol1"))
        .await?;
    assert_eq!(
        expect_bounce(&mut alice, "pol1").await?,
        "remote-server-not-found"
    );
    // b -> a: a offers b neither EXTERNAL nor dialback.
    bob.send(&chat_with_id(&alice.jid.clone(), "from misfit", "pol2"))
        .await?;
    assert_eq!(
        expect_bounce(&mut bob, "pol2").await?,
        "remote-server-not-found"
    );
    bob.expect_none(|e| e.name() == "message" && e.attr("type") != Some("error"))
        .await?;
    alice
        .expect_none(|e| e.name() == "message" && e.attr("type") != Some("error"))
        .await?;
    drop(tmp);
    Ok(())
}

#[tokio::test]
async fn presence_to_an_unreachable_contact_is_dropped_but_a_subscription_request_bounces(
) -> Result<()> {
    let p = pair(|_| {}).await?;
    publish_port(&p.dns, C, closed_port().await?);
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let carol = format!("carol@{C}");
    let mut directed = presence(None, Some(&carol));
    directed.set_attr("id", "pr1");
    alice.send(&directed).await?;
    let mut probe_like = presence(Some("unavailable"), Some(&carol));
    probe_like.set_attr("id", "pr2");
    alice.send(&probe_like).await?;
    // Wait for the link attempts to fail, by a stanza that does bounce.
    alice
        .send(&chat_with_id(&carol, "are you there", "pr-msg"))
        .await?;
    assert_eq!(
        expect_bounce(&mut alice, "pr-msg").await?,
        "remote-server-not-found"
    );
    alice
        .expect_none(|e| e.name() == "presence" && e.attr("type") == Some("error"))
        .await?;
    let mut subscribe = presence(Some("subscribe"), Some(&carol));
    subscribe.set_attr("id", "pr3");
    alice.send(&subscribe).await?;
    let err = alice
        .expect(|e| e.name() == "presence" && is_error_with_id(e, "pr3"))
        .await?;
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("remote-server-not-found")
    );
    Ok(())
}
