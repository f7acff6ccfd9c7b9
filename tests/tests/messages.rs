//! Message and iq routing between local accounts (RFC 6121 §8, RFC 6120 §10).

use confab_protocol::{ns, Element};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn message(ty: Option<&str>, to: &str, body: &str) -> Element {
    let mut m = Element::new("message", ns::CLIENT).with_attr("to", to);
    if let Some(t) = ty {
        m.set_attr("type", t);
    }
    m.with_child(Element::new("body", ns::CLIENT).with_text(body))
}

fn with_id(mut e: Element, id: &str) -> Element {
    e.set_attr("id", id);
    e
}

fn body_is(e: &Element, body: &str) -> bool {
    e.name() == "message"
        && e.get_child("body", ns::CLIENT).map(|b| b.text()).as_deref() == Some(body)
}

fn is_error_with_id(e: &Element, name: &str, id: &str) -> bool {
    e.name() == name && e.attr("type") == Some("error") && e.attr("id") == Some(id)
}

/// Logs in with a presence of this priority; returns the client after its own presence came back.
async fn online_with_priority(
    server: &TestServer,
    user: &str,
    pw: &str,
    res: &str,
    prio: i8,
) -> anyhow::Result<Client> {
    let mut c = server.login(user, pw, res).await?;
    c.roster_get().await?;
    let p = Element::new("presence", ns::CLIENT)
        .with_child(Element::new("priority", ns::CLIENT).with_text(prio.to_string()));
    c.send(&p).await?;
    let full = c.jid.clone();
    c.expect(|e| e.name() == "presence" && e.attr("from") == Some(full.as_str()))
        .await?;
    Ok(c)
}

async fn two_users() -> anyhow::Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    Ok(server)
}

#[tokio::test]
async fn message_to_full_jid_reaches_only_that_resource() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut phone = server.online("bob", "builder", "phone").await?;
    let mut desk = server.online("bob", "builder", "desk").await?;
    alice
        .send(&message(
            Some("chat"),
            &format!("{}/phone", bare("bob")),
            "for the phone",
        ))
        .await?;
    let m = phone.expect_body("for the phone").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    assert_eq!(m.attr("to"), Some(phone.jid.as_str()));
    desk.expect_none(|e| body_is(e, "for the phone")).await?;
    Ok(())
}

#[tokio::test]
async fn message_to_bare_jid_reaches_highest_priority_resources() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut low = online_with_priority(&server, "bob", "builder", "low", 1).await?;
    let mut high1 = online_with_priority(&server, "bob", "builder", "high1", 5).await?;
    let mut high2 = online_with_priority(&server, "bob", "builder", "high2", 5).await?;
    let mut neg = online_with_priority(&server, "bob", "builder", "neg", -1).await?;
    alice
        .send(&message(Some("chat"), &bare("bob"), "to bob"))
        .await?;
    // §8.5.2.1.1: every resource with the top priority gets it (a tie delivers to all).
    high1.expect_body("to bob").await?;
    high2.expect_body("to bob").await?;
    low.expect_none(|e| body_is(e, "to bob")).await?;
    neg.expect_none(|e| body_is(e, "to bob")).await?;

    // Normal messages follow the same rule.
    alice
        .send(&message(None, &bare("bob"), "normal to bob"))
        .await?;
    high1.expect_body("normal to bob").await?;
    high2.expect_body("normal to bob").await?;
    low.expect_none(|e| body_is(e, "normal to bob")).await?;
    Ok(())
}

#[tokio::test]
async fn message_to_offline_full_jid_of_online_user_goes_to_bare() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    alice
        .send(&message(
            Some("chat"),
            &format!("{}/gone", bare("bob")),
            "to a gone resource",
        ))
        .await?;
    // §8.5.3.2.1: treated as if addressed to the bare JID.
    let m = bob.expect_body("to a gone resource").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    alice
        .expect_none(|e| e.attr("type") == Some("error"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn headline_goes_to_all_non_negative_resources_and_is_never_stored() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut a = online_with_priority(&server, "bob", "builder", "a", 1).await?;
    let mut b = online_with_priority(&server, "bob", "builder", "b", 7).await?;
    alice
        .send(&message(Some("headline"), &bare("bob"), "news"))
        .await?;
    // §8.5.2.1.2 (headline): every available resource with non-negative priority.
    a.expect_body("news").await?;
    b.expect_body("news").await?;
    a.close().await?;
    b.close().await?;

    // No available resource: a headline is dropped silently, not stored.
    alice
        .send(&with_id(
            message(Some("headline"), &bare("bob"), "old news"),
            "h1",
        ))
        .await?;
    alice.expect_none(|e| e.attr("id") == Some("h1")).await?;
    let mut bob = server.online("bob", "builder", "later").await?;
    bob.expect_none(|e| body_is(e, "old news")).await?;
    assert!(server
        .storage()
        .offline_messages(&bare("bob"))
        .await?
        .is_empty());
    Ok(())
}

#[tokio::test]
async fn groupchat_to_a_user_is_an_error_unless_to_a_connected_resource() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    // §8.5.2.1.1 (bare JID) and §8.5.3.2.1 (no such resource): service-unavailable.
    for (i, to) in [bare("bob"), format!("{}/nope", bare("bob"))]
        .into_iter()
        .enumerate()
    {
        let id = format!("gc{i}");
        alice
            .send(&with_id(message(Some("groupchat"), &to, "room talk"), &id))
            .await?;
        let err = alice
            .expect(|e| is_error_with_id(e, "message", &id))
            .await?;
        assert_eq!(
            error_condition(&err).as_deref(),
            Some("service-unavailable"),
            "groupchat to {to}: {err}"
        );
        assert_eq!(err.attr("from"), Some(to.as_str()));
    }
    bob.expect_none(|e| body_is(e, "room talk")).await?;
    // §8.5.3.1: a full JID with a connected resource gets any type (this is how a
    // room delivers to its occupants).
    alice
        .send(&with_id(
            message(Some("groupchat"), &bob.jid.clone(), "to the occupant"),
            "gc9",
        ))
        .await?;
    let m = bob.expect_body("to the occupant").await?;
    assert_eq!(m.attr("type"), Some("groupchat"));
    alice.expect_none(|e| e.attr("id") == Some("gc9")).await?;
    Ok(())
}

#[tokio::test]
async fn error_messages_are_delivered_but_never_answered() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let err = Element::new("message", ns::CLIENT)
        .with_attr("to", bob.jid.clone())
        .with_attr("type", "error")
        .with_attr("id", "e1")
        .with_child(
            Element::new("error", ns::CLIENT)
                .with_attr("type", "cancel")
                .with_child(Element::new("item-not-found", ns::STANZAS)),
        );
    alice.send(&err).await?;
    let got = bob.expect(|e| e.attr("id") == Some("e1")).await?;
    assert_eq!(got.attr("type"), Some("error"));
    // To nobody: no error about an error (RFC 6120 §8.3.1).
    let mut to_nobody = err.clone();
    to_nobody.set_attr("to", bare("nobody"));
    to_nobody.set_attr("id", "e2");
    alice.send(&to_nobody).await?;
    let mut to_gone = err;
    to_gone.set_attr("to", format!("{}/gone", bare("bob")));
    to_gone.set_attr("id", "e3");
    alice.send(&to_gone).await?;
    alice
        .expect_none(|e| matches!(e.attr("id"), Some("e2") | Some("e3")))
        .await?;
    Ok(())
}

#[tokio::test]
async fn message_to_unknown_local_user_is_service_unavailable() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    for ty in ["chat", "normal", "headline"] {
        let id = format!("nouser-{ty}");
        alice
            .send(&with_id(message(Some(ty), &bare("nobody"), "anyone?"), &id))
            .await?;
        let err = alice
            .expect(|e| is_error_with_id(e, "message", &id))
            .await?;
        assert_eq!(
            error_condition(&err).as_deref(),
            Some("service-unavailable"),
            "{ty}: {err}"
        );
        assert_eq!(err.attr("from"), Some(bare("nobody").as_str()));
        assert_eq!(err.attr("to"), Some(alice.jid.as_str()));
    }
    Ok(())
}

#[tokio::test]
async fn message_to_remote_domain_is_remote_server_not_found() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    alice
        .send(&with_id(
            message(Some("chat"), "someone@elsewhere.example", "hi"),
            "r1",
        ))
        .await?;
    let err = alice
        .expect(|e| is_error_with_id(e, "message", "r1"))
        .await?;
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("remote-server-not-found"),
        "{err}"
    );
    assert_eq!(err.attr("to"), Some(alice.jid.as_str()));
    Ok(())
}

#[tokio::test]
async fn message_to_server_domain_is_service_unavailable() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    alice
        .send(&with_id(
            message(Some("chat"), DOMAIN, "hello server"),
            "s1",
        ))
        .await?;
    let err = alice
        .expect(|e| is_error_with_id(e, "message", "s1"))
        .await?;
    assert_eq!(
        error_condition(&err).as_deref(),
        Some("service-unavailable"),
        "{err}"
    );
    assert_eq!(err.attr("from"), Some(DOMAIN));
    Ok(())
}

#[tokio::test]
async fn from_is_stamped_with_the_senders_full_jid() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    // No from at all.
    alice
        .send(&message(Some("chat"), &bare("bob"), "no from"))
        .await?;
    let m = bob.expect_body("no from").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    // A bare from (the sender's own) is replaced by the full JID.
    let mut m = message(Some("chat"), &bare("bob"), "bare from");
    m.set_attr("from", bare("alice"));
    alice.send(&m).await?;
    let m = bob.expect_body("bare from").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    Ok(())
}

#[tokio::test]
async fn special_characters_and_unicode_round_trip() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let body = "<b>&amp; \"quoted\" 'apos' & < > ]]> — żółć 日本語 🦀\u{1F600} \t tab";
    alice
        .send(&message(Some("chat"), &bare("bob"), body))
        .await?;
    let m = bob.expect_body(body).await?;
    assert_eq!(
        m.get_child("body", ns::CLIENT).map(|b| b.text()).as_deref(),
        Some(body)
    );
    // The same text written by hand as escaped XML, with an attribute that needs escaping.
    alice
        .send_str(&format!(
            "<message to='{}' type='chat' id='x&amp;&lt;&quot;'><body>1 &lt; 2 &amp;&amp; 3 &gt; 2 &#x1F980;</body></message>",
            bare("bob")
        ))
        .await?;
    let m = bob.expect_body("1 < 2 && 3 > 2 🦀").await?;
    assert_eq!(m.attr("id"), Some("x&<\""));
    Ok(())
}

#[tokio::test]
async fn iq_to_unconnected_full_jid_is_service_unavailable() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let _bob = server.online("bob", "builder", "phone").await?;
    let reply = alice
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", format!("{}/gone", bare("bob")))
            .with_child(Element::new("query", ns::VERSION)))
        .await?;
    assert_eq!(reply.attr("type"), Some("error"));
    assert_eq!(
        error_condition(&reply).as_deref(),
        Some("service-unavailable"),
        "{reply}"
    );
    // An account with no session at all.
    let reply = alice
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", format!("{}/phone", bare("nobody")))
            .with_child(Element::new("ping", ns::PING)))
        .await?;
    assert_eq!(
        error_condition(&reply).as_deref(),
        Some("service-unavailable"),
        "{reply}"
    );
    Ok(())
}

#[tokio::test]
async fn iq_between_two_clients_is_delivered_and_answered() -> anyhow::Result<()> {
    let server = two_users().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let req = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", "v1")
        .with_attr("to", bob.jid.clone())
        .with_child(Element::new("query", ns::VERSION));
    alice.send(&req).await?;
    let got = bob
        .expect(|e| e.name() == "iq" && e.attr("id") == Some("v1"))
        .await?;
    assert_eq!(got.attr("from"), Some(alice.jid.as_str()));
    assert_eq!(got.attr("type"), Some("get"));
    assert!(got.has_child("query", ns::VERSION));
    let answer = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("id", "v1")
        .with_attr("to", alice.jid.clone())
        .with_child(
            Element::new("query", ns::VERSION)
                .with_child(Element::new("name", ns::VERSION).with_text("bobclient")),
        );
    bob.send(&answer).await?;
    let res = alice
        .expect(|e| e.name() == "iq" && e.attr("id") == Some("v1"))
        .await?;
    assert_eq!(res.attr("type"), Some("result"));
    assert_eq!(res.attr("from"), Some(bob.jid.as_str()));
    let name = res
        .get_child("query", ns::VERSION)
        .and_then(|q| q.get_child("name", ns::VERSION))
        .map(|n| n.text());
    assert_eq!(name.as_deref(), Some("bobclient"));
    Ok(())
}
