//! What a client was told is stored must survive a restart: accounts, rosters with
//! subscriptions, offline messages, vCards.

use confab_protocol::{ns, Element};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn roster_item<'a>(query: &'a Element, jid: &str) -> Option<&'a Element> {
    query
        .children()
        .find(|i| i.is("item", ns::ROSTER) && i.attr("jid") == Some(jid))
}

/// Subscribes `a` to `b`'s presence and has `b` approve.
async fn subscribe(a: &mut Client, b: &mut Client) -> anyhow::Result<()> {
    let b_bare = b.bare();
    let a_bare = a.bare();
    a.send(&presence(Some("subscribe"), Some(&b_bare))).await?;
    b.expect(|e| {
        e.name() == "presence"
            && e.attr("type") == Some("subscribe")
            && e.attr("from") == Some(a_bare.as_str())
    })
    .await?;
    b.send(&presence(Some("subscribed"), Some(&a_bare))).await?;
    a.expect(|e| {
        e.name() == "presence"
            && e.attr("type") == Some("subscribed")
            && e.attr("from") == Some(b_bare.as_str())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn roster_offline_messages_and_vcard_survive_restart() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("carol", "singer").await?;
    {
        let mut alice = server.online("alice", "wonderland", "laptop").await?;
        let mut bob = server.online("bob", "builder", "phone").await?;
        // A named item in a group, then a mutual subscription.
        let set = Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_child(
                Element::new("query", ns::ROSTER).with_child(
                    Element::new("item", ns::ROSTER)
                        .with_attr("jid", bare("bob"))
                        .with_attr("name", "Bob the Builder")
                        .with_child(Element::new("group", ns::ROSTER).with_text("Friends")),
                ),
            );
        let reply = alice.iq(set).await?;
        assert_eq!(reply.attr("type"), Some("result"), "{reply}");
        subscribe(&mut alice, &mut bob).await?;
        subscribe(&mut bob, &mut alice).await?;
        // Alice asks carol, who is offline: the ask is pending.
        alice
            .send(&presence(Some("subscribe"), Some(&bare("carol"))))
            .await?;

        let vcard = Element::new("vCard", ns::VCARD)
            .with_child(Element::new("FN", ns::VCARD).with_text("Alice Liddell"));
        let reply = alice
            .iq(Element::new("iq", ns::CLIENT)
                .with_attr("type", "set")
                .with_child(vcard))
            .await?;
        assert_eq!(reply.attr("type"), Some("result"), "{reply}");
        bob.close().await?;
        alice.chat(&bare("bob"), "while you were away 1").await?;
        alice.chat(&bare("bob"), "while you were away 2").await?;
        alice.chat(&bare("carol"), "hi carol").await?;
        alice
            .expect_none(|e| e.attr("type") == Some("error"))
            .await?;
        alice.close().await?;
    }

    server.restart().await?;

    // Old passwords work; a wrong one does not.
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    let wrong = c
        .authenticate(
            confab_protocol::sasl::ScramHash::Sha256,
            false,
            "alice",
            "wrong",
        )
        .await;
    assert!(
        wrong.is_err(),
        "a wrong password was accepted after restart"
    );

    let mut alice = server.login("alice", "wonderland", "laptop").await?;
    let roster = alice.roster_get().await?;
    let item =
        roster_item(&roster, &bare("bob")).unwrap_or_else(|| panic!("bob missing: {roster}"));
    assert_eq!(item.attr("subscription"), Some("both"), "{roster}");
    assert_eq!(item.attr("name"), Some("Bob the Builder"), "{roster}");
    assert_eq!(
        item.get_child("group", ns::ROSTER)
            .map(|g| g.text())
            .as_deref(),
        Some("Friends"),
        "{roster}"
    );
    let carol =
        roster_item(&roster, &bare("carol")).unwrap_or_else(|| panic!("carol missing: {roster}"));
    assert_eq!(carol.attr("subscription"), Some("none"), "{roster}");
    assert_eq!(carol.attr("ask"), Some("subscribe"), "{roster}");
    alice.send(&presence(None, None)).await?;
    let full = alice.jid.clone();
    alice
        .expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
        .await?;

    // The vCard is still there, for the owner and for others.
    let reply = alice
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_child(Element::new("vCard", ns::VCARD)))
        .await?;
    let fn_ = reply
        .get_child("vCard", ns::VCARD)
        .and_then(|v| v.get_child("FN", ns::VCARD))
        .map(|f| f.text());
    assert_eq!(fn_.as_deref(), Some("Alice Liddell"), "{reply}");

    // Bob's stored messages arrive in order with their delay, and his subscription works:
    // alice (online) gets bob's presence, bob gets alice's.
    let mut bob = server.login("bob", "builder", "phone").await?;
    let roster = bob.roster_get().await?;
    assert_eq!(
        roster_item(&roster, &bare("alice")).and_then(|i| i.attr("subscription")),
        Some("both"),
        "{roster}"
    );
    bob.send(&presence(None, None)).await?;
    let m1 = bob.expect(|e| e.name() == "message").await?;
    let m2 = bob.expect(|e| e.name() == "message").await?;
    let body = |m: &Element| m.get_child("body", ns::CLIENT).map(|b| b.text());
    assert_eq!(body(&m1).as_deref(), Some("while you were away 1"));
    assert_eq!(body(&m2).as_deref(), Some("while you were away 2"));
    assert!(m1.has_child("delay", ns::DELAY), "{m1}");
    let alice_full = alice.jid.clone();
    bob.expect(|e| e.name() == "presence" && e.attr("from") == Some(alice_full.as_str()))
        .await?;
    let bob_full = bob.jid.clone();
    alice
        .expect(|e| e.name() == "presence" && e.attr("from") == Some(bob_full.as_str()))
        .await?;

    // Carol gets her message and alice's pending subscription request.
    let mut carol = server.login("carol", "singer", "home").await?;
    carol.roster_get().await?;
    carol.send(&presence(None, None)).await?;
    carol.expect_body("hi carol").await?;
    carol
        .expect(|e| {
            e.name() == "presence"
                && e.attr("type") == Some("subscribe")
                && e.attr("from") == Some(bare("alice").as_str())
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn delivered_offline_messages_stay_delivered_after_restart() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    alice.chat(&bare("bob"), "once only").await?;
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.expect_body("once only").await?;
    // The session deletes what it wrote; a ping round trip orders that before close.
    bob.expect_none(|_| false).await?;
    bob.close().await?;
    drop(alice);
    server.restart().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.expect_none(|e| e.name() == "message").await?;
    Ok(())
}
