//! Two confab servers for two domains federate over loopback: peers are found through a
//! test DNS server, links are TLS with certificates from a shared test CA, and
//! authenticated by SASL EXTERNAL or, where a certificate does not fit, by dialback.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::Result;
use confab_federation::AuthMethod;
use confab_protocol::{ns, Element};
use confab_tests::dns::TestDns;
use confab_tests::*;

const A: &str = "a.test";
const B: &str = "b.test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Pair {
    dns: TestDns,
    a: TestServer,
    b: TestServer,
}

/// Publishes a server's s2s port for `domain`: SRV to a host name, and its A record.
fn publish(dns: &TestDns, domain: &str, server: &TestServer) {
    let host = format!("xmpp.{domain}");
    dns.add_srv(
        &format!("_xmpp-server._tcp.{domain}"),
        0,
        5,
        server.running().s2s_addrs[0].port(),
        &host,
    );
    dns.add_a(&host, LOOPBACK);
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

async fn pair() -> Result<Pair> {
    pair_with(TestPki::create_temp(&[A, B])?, |_| {}).await
}

fn outgoing_method(server: &TestServer, remote: &str) -> Option<AuthMethod> {
    let fed = server.running().server.federation.get()?;
    fed.links()
        .into_iter()
        .find(|l| l.remote == remote && l.outgoing)
        .and_then(|l| l.method)
}

fn is_presence_from(e: &Element, from_bare: &str, ty: Option<&str>) -> bool {
    e.name() == "presence"
        && e.attr("from")
            .is_some_and(|f| f.split('/').next() == Some(from_bare))
        && e.attr("type") == ty
}

#[tokio::test]
async fn messages_flow_both_ways_over_certificate_authenticated_links() -> Result<()> {
    let p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;

    alice.chat(&format!("bob@{B}"), "hello from a").await?;
    let m = bob.expect_body("hello from a").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    bob.chat(&alice.jid.clone(), "hello from b").await?;
    let m = alice.expect_body("hello from b").await?;
    assert_eq!(m.attr("from"), Some(bob.jid.as_str()));

    // Both certificates are valid for their domains: SASL EXTERNAL both ways.
    assert_eq!(outgoing_method(&p.a, B), Some(AuthMethod::External));
    assert_eq!(outgoing_method(&p.b, A), Some(AuthMethod::External));
    Ok(())
}

#[tokio::test]
async fn subscription_and_presence_across_domains() -> Result<()> {
    let p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    let (alice_bare, bob_bare) = (format!("alice@{A}"), format!("bob@{B}"));

    alice
        .send(&presence(Some("subscribe"), Some(&bob_bare)))
        .await?;
    let req = bob
        .expect(|e| e.name() == "presence" && e.attr("type") == Some("subscribe"))
        .await?;
    assert_eq!(req.attr("from"), Some(alice_bare.as_str()));
    bob.send(&presence(Some("subscribed"), Some(&alice_bare)))
        .await?;
    // Alice's roster now says "to", and she sees bob online.
    alice
        .expect(|e| {
            e.name() == "iq"
                && e.get_child("query", ns::ROSTER)
                    .and_then(|q| q.first_child())
                    .is_some_and(|i| i.attr("subscription") == Some("to"))
        })
        .await?;
    alice
        .expect(|e| is_presence_from(e, &bob_bare, None))
        .await?;
    // Bob goes away: alice is told.
    bob.send(&presence(Some("unavailable"), None)).await?;
    alice
        .expect(|e| is_presence_from(e, &bob_bare, Some("unavailable")))
        .await?;
    Ok(())
}

#[tokio::test]
async fn offline_delivery_for_a_remote_sender() -> Result<()> {
    let p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    alice
        .chat(&format!("bob@{B}"), "while you were away")
        .await?;
    // b handles what arrives on a link in order: once it answered a ping sent after the
    // message, the message is stored.
    let ping = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", format!("bob@{B}"))
        .with_child(Element::new("ping", ns::PING));
    let pong = alice.iq(ping).await?;
    assert_eq!(pong.attr("type"), Some("result"));
    assert_eq!(p.b.storage().offline_count(&format!("bob@{B}")).await?, 1);
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    let m = bob.expect_body("while you were away").await?;
    assert!(m.get_child("delay", ns::DELAY).is_some());
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    Ok(())
}

#[tokio::test]
async fn unknown_remote_user_gets_an_error_back() -> Result<()> {
    let p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut m = chat(&format!("nobody@{B}"), "anyone?");
    m.set_attr("id", "m1");
    alice.send(&m).await?;
    let err = alice
        .expect(|e| e.name() == "message" && e.attr("type") == Some("error"))
        .await?;
    assert_eq!(err.attr("id"), Some("m1"));
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("service-unavailable")
    );
    Ok(())
}

#[tokio::test]
async fn unknown_remote_domain_bounces() -> Result<()> {
    let p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut m = chat("someone@nowhere.test", "hello?");
    m.set_attr("id", "m2");
    alice.send(&m).await?;
    let err = alice
        .expect(|e| e.name() == "message" && e.attr("type") == Some("error"))
        .await?;
    assert_eq!(err.attr("id"), Some("m2"));
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("remote-server-not-found")
    );
    drop(p.dns);
    Ok(())
}

#[tokio::test]
async fn dialback_when_a_certificate_does_not_fit() -> Result<()> {
    // b's certificate is valid for another name: a cannot accept b by certificate, so
    // b authenticates by dialback; a's certificate is fine, so a uses EXTERNAL.
    let tmp = tempfile::tempdir()?;
    let pki = Arc::new(
        TestPki::create_named(tmp.path(), &[(A, A), (B, "elsewhere.test")])?.with_lenient_names(),
    );
    let p = pair_with(pki, |_| {}).await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    bob.chat(&format!("alice@{A}"), "via dialback").await?;
    alice.expect_body("via dialback").await?;
    alice.chat(&format!("bob@{B}"), "and back").await?;
    bob.expect_body("and back").await?;
    assert_eq!(outgoing_method(&p.b, A), Some(AuthMethod::Dialback));
    assert_eq!(outgoing_method(&p.a, B), Some(AuthMethod::External));
    drop(tmp);
    Ok(())
}

#[tokio::test]
async fn direct_tls_srv_record_is_used() -> Result<()> {
    // Direct TLS (XEP-0368): only an _xmpps-server SRV record for b.
    let p = pair().await?;
    p.dns.remove(&format!("_xmpp-server._tcp.{B}"));
    p.dns.add_srv(
        &format!("_xmpps-server._tcp.{B}"),
        0,
        5,
        p.b.running().s2s_tls_addrs[0].port(),
        &format!("xmpp.{B}"),
    );
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice.chat(&format!("bob@{B}"), "over direct TLS").await?;
    bob.expect_body("over direct TLS").await?;
    Ok(())
}

#[tokio::test]
async fn without_srv_records_the_domain_a_record_and_port_5269_are_used() -> Result<()> {
    // b listens on the default port 5269 of a loopback address of its own, and DNS
    // has only an A record for b.test itself.
    let ip = Ipv4Addr::new(127, 53, rand_octet(), rand_octet().max(2));
    let pki = TestPki::create_temp(&[A, B])?;
    let dns = TestDns::start().await?;
    let ns_addr = dns.addr.to_string();
    let a = TestServer::start_with_pki(pki.clone(), &[A], |c| {
        c.s2s.nameservers = vec![ns_addr.clone()];
    })
    .await?;
    let b = TestServer::start_with_pki(pki, &[B], |c| {
        c.s2s.nameservers = vec![ns_addr.clone()];
        c.s2s.listen = vec![format!("{ip}:5269")];
    })
    .await?;
    publish(&dns, A, &a);
    dns.add_a(B, IpAddr::V4(ip));
    a.add_account(&format!("alice@{A}"), "pw-alice").await?;
    b.add_account(&format!("bob@{B}"), "pw-bob").await?;
    let mut alice = a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = b.online_at(B, "bob", "pw-bob", "phone").await?;
    alice.chat(&format!("bob@{B}"), "found by A record").await?;
    bob.expect_body("found by A record").await?;
    Ok(())
}

fn rand_octet() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    (h.finish() % 250) as u8 + 1
}

#[tokio::test]
async fn contacts_on_a_server_that_goes_away_are_shown_unavailable() -> Result<()> {
    let mut p = pair().await?;
    let mut alice = p.a.online_at(A, "alice", "pw-alice", "desk").await?;
    let mut bob = p.b.online_at(B, "bob", "pw-bob", "phone").await?;
    let (alice_bare, bob_bare) = (format!("alice@{A}"), format!("bob@{B}"));
    alice
        .send(&presence(Some("subscribe"), Some(&bob_bare)))
        .await?;
    bob.expect(|e| e.name() == "presence" && e.attr("type") == Some("subscribe"))
        .await?;
    bob.send(&presence(Some("subscribed"), Some(&alice_bare)))
        .await?;
    alice
        .expect(|e| is_presence_from(e, &bob_bare, None))
        .await?;
    // b goes down: however it ends (its users' unavailable presence, or the link
    // closing under it), alice must not keep seeing bob online.
    if let Some(running) = p.b.running.take() {
        running.shutdown().await;
    }
    alice
        .expect(|e| is_presence_from(e, &bob_bare, Some("unavailable")))
        .await?;
    Ok(())
}
