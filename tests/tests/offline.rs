//! Offline storage (RFC 6121 §8.5.2.2.1, XEP-0160) with XEP-0203 delay stamps.

use confab_protocol::{ns, Element};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn body_of(e: &Element) -> Option<String> {
    if e.name() != "message" {
        return None;
    }
    e.get_child("body", ns::CLIENT).map(|b| b.text())
}

fn is_xep0082_utc(stamp: &str) -> bool {
    // YYYY-MM-DDThh:mm:ss[.sss]Z
    let b = stamp.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    stamp.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && stamp.ends_with('Z')
        && (b[19] == b'Z' || (b[19] == b'.' && digits(20..stamp.len() - 1) && stamp.len() > 21))
}

async fn two_users_with(adjust: impl FnOnce(&mut confab::Config)) -> anyhow::Result<TestServer> {
    let server = TestServer::start_with(adjust).await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    Ok(server)
}

/// Waits until `n` messages are in bob's offline store (the store is written
/// asynchronously to the sender; the sender's ping round trip orders it).
async fn stored_count(server: &TestServer, sender: &mut Client) -> anyhow::Result<usize> {
    sender.expect_none(|_| false).await?;
    Ok(server.storage().offline_count(&bare("bob")).await?)
}

#[tokio::test]
async fn messages_to_offline_user_are_stored_stamped_and_delivered_in_order_once(
) -> anyhow::Result<()> {
    let server = two_users_with(|_| {}).await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    alice.chat(&bare("bob"), "first").await?;
    let normal = Element::new("message", ns::CLIENT)
        .with_attr("to", bare("bob"))
        .with_child(Element::new("body", ns::CLIENT).with_text("second"));
    alice.send(&normal).await?;
    // To a full JID of an account with no session: also stored (§8.5.3.2.1).
    alice
        .chat(&format!("{}/phone", bare("bob")), "third")
        .await?;
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    assert_eq!(stored_count(&server, &mut alice).await?, 3);

    // Logged in and roster fetched, but no presence yet: nothing is delivered.
    let mut bob = server.login("bob", "builder", "phone").await?;
    bob.roster_get().await?;
    bob.expect_none(|e| e.name() == "message").await?;

    bob.send(&presence(None, None)).await?;
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = bob.expect(|e| e.name() == "message").await?;
        got.push(m);
    }
    let bodies: Vec<_> = got.iter().filter_map(body_of).collect();
    assert_eq!(bodies, ["first", "second", "third"]);
    for m in &got {
        assert_eq!(m.attr("from"), Some(alice.jid.as_str()), "{m}");
        let delay = m
            .get_child("delay", ns::DELAY)
            .unwrap_or_else(|| panic!("no delay in {m}"));
        assert_eq!(delay.attr("from"), Some(DOMAIN), "{m}");
        let stamp = delay.attr("stamp").unwrap_or_default();
        assert!(is_xep0082_utc(stamp), "bad stamp {stamp:?} in {m}");
    }
    assert_eq!(
        got[1].attr("type"),
        None,
        "a normal message stays normal: {}",
        got[1]
    );
    bob.expect_none(|e| e.name() == "message").await?;
    bob.close().await?;

    // Delivered once: the next login finds nothing.
    let mut bob = server.online("bob", "builder", "desk").await?;
    bob.expect_none(|e| e.name() == "message").await?;
    assert_eq!(server.storage().offline_count(&bare("bob")).await?, 0);
    Ok(())
}

#[tokio::test]
async fn negative_priority_does_not_get_offline_messages() -> anyhow::Result<()> {
    let server = two_users_with(|_| {}).await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    alice.chat(&bare("bob"), "kept").await?;
    assert_eq!(stored_count(&server, &mut alice).await?, 1);

    let mut bob = server.login("bob", "builder", "bot").await?;
    bob.roster_get().await?;
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .with_child(Element::new("priority", ns::CLIENT).with_text("-1")),
    )
    .await?;
    let full = bob.jid.clone();
    bob.expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
        .await?;
    bob.expect_none(|e| e.name() == "message").await?;
    // A message sent now is not given to a negative-priority resource either: stored.
    alice.chat(&bare("bob"), "also kept").await?;
    assert_eq!(stored_count(&server, &mut alice).await?, 2);
    bob.expect_none(|e| e.name() == "message").await?;

    // Raising the priority delivers both.
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .with_child(Element::new("priority", ns::CLIENT).with_text("1")),
    )
    .await?;
    let a = bob.expect(|e| e.name() == "message").await?;
    let b = bob.expect(|e| e.name() == "message").await?;
    assert_eq!(body_of(&a).as_deref(), Some("kept"));
    assert_eq!(body_of(&b).as_deref(), Some("also kept"));
    Ok(())
}

#[tokio::test]
async fn chat_state_only_messages_are_not_stored() -> anyhow::Result<()> {
    let server = two_users_with(|_| {}).await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let composing = Element::new("message", ns::CLIENT)
        .with_attr("to", bare("bob"))
        .with_attr("type", "chat")
        .with_attr("id", "cs1")
        .with_child(Element::new(
            "composing",
            "http://jabber.org/protocol/chatstates",
        ));
    alice.send(&composing).await?;
    let with_thread = Element::new("message", ns::CLIENT)
        .with_attr("to", bare("bob"))
        .with_attr("type", "chat")
        .with_child(Element::new("thread", ns::CLIENT).with_text("t1"))
        .with_child(Element::new(
            "active",
            "http://jabber.org/protocol/chatstates",
        ));
    alice.send(&with_thread).await?;
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    assert_eq!(stored_count(&server, &mut alice).await?, 0);
    // A chat state together with a body is stored.
    alice
        .send(&chat(&bare("bob"), "with body").with_child(Element::new(
            "active",
            "http://jabber.org/protocol/chatstates",
        )))
        .await?;
    assert_eq!(stored_count(&server, &mut alice).await?, 1);
    let mut bob = server.online("bob", "builder", "phone").await?;
    let m = bob.expect(|e| e.name() == "message").await?;
    assert_eq!(body_of(&m).as_deref(), Some("with body"));
    bob.expect_none(|e| e.name() == "message").await?;
    Ok(())
}

#[tokio::test]
async fn offline_store_cap_answers_the_sender_with_an_error() -> anyhow::Result<()> {
    let server = two_users_with(|c| c.limits.max_offline_messages = 3).await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    for i in 1..=3 {
        alice
            .send(&chat(&bare("bob"), &format!("m{i}")).with_attr("id", format!("m{i}")))
            .await?;
    }
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    alice
        .send(&chat(&bare("bob"), "m4").with_attr("id", "m4"))
        .await?;
    let err = alice
        .expect(|e| e.name() == "message" && e.attr("id") == Some("m4"))
        .await?;
    assert_eq!(err.attr("type"), Some("error"), "{err}");
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("service-unavailable"),
        "{err}"
    );
    assert_eq!(err.attr("to"), Some(alice.jid.as_str()));
    assert_eq!(err.attr("from"), Some(bare("bob").as_str()));
    // The error reply must not leak our internal delay stamp back to the sender.
    assert!(!err.has_child("delay", ns::DELAY), "{err}");

    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(body_of(&bob.expect(|e| e.name() == "message").await?).unwrap_or_default());
    }
    assert_eq!(bodies, ["m1", "m2", "m3"]);
    bob.expect_none(|e| e.name() == "message").await?;
    Ok(())
}

#[tokio::test]
async fn messages_to_an_online_user_are_not_stored() -> anyhow::Result<()> {
    let server = two_users_with(|_| {}).await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    alice.chat(&bare("bob"), "live").await?;
    let m = bob.expect_body("live").await?;
    assert!(!m.has_child("delay", ns::DELAY), "{m}");
    assert_eq!(stored_count(&server, &mut alice).await?, 0);
    Ok(())
}
