//! RFC 6121 §4: presence broadcast, probes, unavailable on logout and on a dropped
//! connection, directed presence (§4.6), no leaks to non-subscribers, and §8.5.2
//! priority rules for messages to the bare JID.

use confab_protocol::{ns, Element};
use confab_storage::{RosterItem, Subscription};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

/// Puts `a` and `b` in each other's roster with a mutual subscription (fixture data; the
/// subscription handshake itself is covered by subscription.rs).
async fn befriend(server: &TestServer, a: &str, b: &str) -> anyhow::Result<()> {
    for (owner, contact) in [(bare(a), bare(b)), (bare(b), bare(a))] {
        let mut item = RosterItem::new(&contact);
        item.subscription = Subscription::Both;
        server.storage().put_roster_item(&owner, item).await?;
    }
    Ok(())
}

/// `owner` has `contact` with this one-way state (`contact` gets the opposite).
async fn one_way(
    server: &TestServer,
    owner: &str,
    contact: &str,
    sub: Subscription,
) -> anyhow::Result<()> {
    let opposite = match sub {
        Subscription::To => Subscription::From,
        Subscription::From => Subscription::To,
        other => other,
    };
    for (o, c, s) in [
        (bare(owner), bare(contact), sub),
        (bare(contact), bare(owner), opposite),
    ] {
        let mut item = RosterItem::new(&c);
        item.subscription = s;
        server.storage().put_roster_item(&o, item).await?;
    }
    Ok(())
}

fn is_presence(e: &Element, ty: Option<&str>, from: &str) -> bool {
    e.name() == "presence" && e.attr("type") == ty && e.attr("from") == Some(from)
}

/// Any presence (not an error) from the account `account` or one of its resources.
fn is_presence_from_account(e: &Element, account: &str) -> bool {
    e.name() == "presence"
        && e.attr("type") != Some("error")
        && e.attr("from")
            .is_some_and(|f| f == account || f.starts_with(&format!("{account}/")))
}

fn child_text(e: &Element, name: &str) -> Option<String> {
    e.get_child(name, ns::CLIENT).map(|c| c.text())
}

/// Logs in, gets the roster and sends initial presence with a priority.
async fn online_with_priority(
    server: &TestServer,
    user: &str,
    pw: &str,
    resource: &str,
    priority: i8,
) -> anyhow::Result<Client> {
    let mut c = server.login(user, pw, resource).await?;
    c.roster_get().await?;
    c.send(
        &presence(None, None)
            .with_child(Element::new("priority", ns::CLIENT).with_text(priority.to_string())),
    )
    .await?;
    let full = c.jid.clone();
    c.expect(|e| is_presence(e, None, &full)).await?;
    Ok(c)
}

async fn setup() -> anyhow::Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("carol", "singer").await?;
    Ok(server)
}

/// §4.2.2: initial presence goes to subscribed contacts, to the account's other
/// resources and back to the sender; the new resource learns the presence of the other
/// resources (implicit self-subscription) and of its contacts (probes, §4.3).
#[tokio::test]
async fn initial_presence_reaches_contacts_and_own_resources() -> anyhow::Result<()> {
    let server = setup().await?;
    befriend(&server, "alice", "bob").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut laptop = server.online("alice", "wonderland", "laptop").await?;
    let laptop_jid = laptop.jid.clone();
    bob.expect(|e| is_presence(e, None, &laptop_jid)).await?;

    // `online` already checked that the new resource gets its own presence back.
    let mut tablet = server.online("alice", "wonderland", "tablet").await?;
    let tablet_jid = tablet.jid.clone();
    let p = laptop.expect(|e| is_presence(e, None, &tablet_jid)).await?;
    assert_eq!(p.attr("to"), Some(laptop_jid.as_str()), "{p}");
    bob.expect(|e| is_presence(e, None, &tablet_jid)).await?;
    tablet.expect(|e| is_presence(e, None, &laptop_jid)).await?;
    let bob_jid = bob.jid.clone();
    tablet.expect(|e| is_presence(e, None, &bob_jid)).await?;
    Ok(())
}

/// §4.3: with a mutual subscription, whoever logs in second gets the first one's
/// presence through the probe of its initial presence, and the first sees the second.
#[tokio::test]
async fn second_to_log_in_gets_presence_via_probe() -> anyhow::Result<()> {
    let server = setup().await?;
    befriend(&server, "alice", "bob").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    alice
        .send(
            &presence(None, None)
                .with_child(Element::new("status", ns::CLIENT).with_text("reading")),
        )
        .await?;
    alice
        .expect(|e| is_presence(e, None, &alice_jid) && child_text(e, "status").is_some())
        .await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    // The probe answer is Alice's last presence, with its status.
    let p = bob.expect(|e| is_presence(e, None, &alice_jid)).await?;
    assert_eq!(child_text(&p, "status").as_deref(), Some("reading"), "{p}");
    let bob_jid = bob.jid.clone();
    alice.expect(|e| is_presence(e, None, &bob_jid)).await?;
    Ok(())
}

/// §4.7: show, status, priority and extension payloads reach the contact intact.
#[tokio::test]
async fn presence_payload_is_forwarded_intact() -> anyhow::Result<()> {
    let server = setup().await?;
    befriend(&server, "alice", "bob").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    let caps = "http://jabber.org/protocol/caps";
    let p = presence(None, None)
        .with_child(Element::new("show", ns::CLIENT).with_text("xa"))
        .with_child(Element::new("status", ns::CLIENT).with_text("Gone <fishing> & back"))
        .with_child(Element::new("priority", ns::CLIENT).with_text("7"))
        .with_child(
            Element::new("c", caps)
                .with_attr("hash", "sha-1")
                .with_attr("node", "https://example.org")
                .with_attr("ver", "abc="),
        );
    alice.send(&p).await?;
    let got = bob
        .expect(|e| is_presence(e, None, &alice_jid) && child_text(e, "show").is_some())
        .await?;
    assert_eq!(child_text(&got, "show").as_deref(), Some("xa"));
    assert_eq!(
        child_text(&got, "status").as_deref(),
        Some("Gone <fishing> & back")
    );
    assert_eq!(child_text(&got, "priority").as_deref(), Some("7"));
    let c = got.get_child("c", caps).expect("caps forwarded");
    assert_eq!(c.attr("ver"), Some("abc="));
    assert_eq!(c.attr("node"), Some("https://example.org"));
    Ok(())
}

/// §4.5: logging out with unavailable presence (and then closing the stream) sends that
/// unavailable presence, with its status, to contacts and other resources, once.
#[tokio::test]
async fn explicit_logout_broadcasts_unavailable() -> anyhow::Result<()> {
    let server = setup().await?;
    befriend(&server, "alice", "bob").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut other = server.online("alice", "wonderland", "desktop").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    bob.expect(|e| is_presence(e, None, &alice_jid)).await?;
    alice
        .send(
            &presence(Some("unavailable"), None)
                .with_child(Element::new("status", ns::CLIENT).with_text("bye for now")),
        )
        .await?;
    // The sender gets its own unavailable too (§4.5.2).
    alice
        .expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    assert_eq!(alice.close().await?, Closed::Clean);
    for c in [&mut bob, &mut other] {
        let p = c
            .expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
            .await?;
        assert_eq!(
            child_text(&p, "status").as_deref(),
            Some("bye for now"),
            "{p}"
        );
        // The stream close after unavailable does not send a second one.
        c.expect_none(|e| is_presence(e, Some("unavailable"), &alice_jid))
            .await?;
    }
    Ok(())
}

/// §4.5.2: a connection that drops without closing its stream is unavailable: the server
/// tells contacts and the account's other resources on the user's behalf.
#[tokio::test]
async fn dropped_connection_broadcasts_unavailable() -> anyhow::Result<()> {
    let server = setup().await?;
    befriend(&server, "alice", "bob").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut other = server.online("alice", "wonderland", "desktop").await?;
    let alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    bob.expect(|e| is_presence(e, None, &alice_jid)).await?;
    other.expect(|e| is_presence(e, None, &alice_jid)).await?;
    // Drop the TCP connection: no unavailable, no </stream:stream>.
    drop(alice);
    bob.expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    other
        .expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    Ok(())
}

/// §4.6: directed presence reaches a non-contact; when the sender goes unavailable, the
/// target is told too, whether by an unavailable broadcast or by a dropped connection.
#[tokio::test]
async fn directed_presence_and_its_unavailable() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut carol = server.online("carol", "singer", "home").await?;
    let carol_jid = carol.jid.clone();

    // To the bare JID, then unavailable broadcast.
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    alice
        .send(
            &presence(None, Some(&bare("carol")))
                .with_child(Element::new("status", ns::CLIENT).with_text("hi carol")),
        )
        .await?;
    let p = carol.expect(|e| is_presence(e, None, &alice_jid)).await?;
    assert_eq!(child_text(&p, "status").as_deref(), Some("hi carol"));
    alice.send(&presence(Some("unavailable"), None)).await?;
    carol
        .expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    // Once told, not told again when the connection ends.
    alice.close().await?;
    carol
        .expect_none(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;

    // To the full JID, then the connection drops.
    let mut bob = server.online("bob", "builder", "phone").await?;
    let bob_jid = bob.jid.clone();
    bob.send(&presence(None, Some(&carol_jid))).await?;
    carol.expect(|e| is_presence(e, None, &bob_jid)).await?;
    drop(bob);
    carol
        .expect(|e| is_presence(e, Some("unavailable"), &bob_jid))
        .await?;
    Ok(())
}

/// §4.6.3: directed unavailable ends the directed presence: a later disconnect does not
/// send a second unavailable to that target.
#[tokio::test]
async fn directed_unavailable_forgets_the_target() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut carol = server.online("carol", "singer", "home").await?;
    let alice = server.online("alice", "wonderland", "laptop").await?;
    let mut alice = alice;
    let alice_jid = alice.jid.clone();
    alice.send(&presence(None, Some(&bare("carol")))).await?;
    carol.expect(|e| is_presence(e, None, &alice_jid)).await?;
    alice
        .send(&presence(Some("unavailable"), Some(&bare("carol"))))
        .await?;
    carol
        .expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    drop(alice);
    carol
        .expect_none(|e| is_presence_from_account(e, &bare("alice")))
        .await?;
    Ok(())
}

/// No presence reaches users who are not subscribed: strangers, a contact with a pending
/// request, and the subscriber side of a one-way subscription (who sees but is not seen).
#[tokio::test]
async fn no_presence_leaks_to_non_subscribers() -> anyhow::Result<()> {
    let server = setup().await?;
    // Bob is subscribed to Alice (Alice: from, Bob: to); Carol is a stranger.
    one_way(&server, "alice", "bob", Subscription::From).await?;
    let mut carol = server.online("carol", "singer", "home").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let alice_jid = alice.jid.clone();
    bob.expect(|e| is_presence(e, None, &alice_jid)).await?;
    // Carol asks for Alice's presence: pending, not granted.
    carol
        .send(&presence(Some("subscribe"), Some(&bare("alice"))))
        .await?;
    alice
        .expect(|e| is_presence(e, Some("subscribe"), &bare("carol")))
        .await?;
    alice
        .send(
            &presence(None, None)
                .with_child(Element::new("status", ns::CLIENT).with_text("secret")),
        )
        .await?;
    bob.expect(|e| is_presence(e, None, &alice_jid) && child_text(e, "status").is_some())
        .await?;
    carol
        .expect_none(|e| is_presence_from_account(e, &bare("alice")))
        .await?;
    // Bob's presence does not reach Alice: she is not subscribed to him.
    let bob_jid = bob.jid.clone();
    bob.send(
        &presence(None, None).with_child(Element::new("status", ns::CLIENT).with_text("mine")),
    )
    .await?;
    bob.expect(|e| is_presence(e, None, &bob_jid) && child_text(e, "status").is_some())
        .await?;
    alice
        .expect_none(|e| is_presence_from_account(e, &bare("bob")))
        .await?;
    alice.send(&presence(Some("unavailable"), None)).await?;
    bob.expect(|e| is_presence(e, Some("unavailable"), &alice_jid))
        .await?;
    carol
        .expect_none(|e| is_presence_from_account(e, &bare("alice")))
        .await?;
    Ok(())
}

/// §4.3.2: a probe from someone who is not subscribed reveals nothing.
#[tokio::test]
async fn probe_from_non_subscriber_is_not_answered() -> anyhow::Result<()> {
    let server = setup().await?;
    let _alice = server.online("alice", "wonderland", "laptop").await?;
    let mut carol = server.online("carol", "singer", "home").await?;
    carol
        .send(&presence(Some("probe"), Some(&bare("alice"))))
        .await?;
    carol
        .expect_none(|e| {
            is_presence_from_account(e, &bare("alice"))
                && matches!(e.attr("type"), None | Some("unavailable"))
        })
        .await?;
    // A subscriber's probe is answered (the control case).
    one_way(&server, "bob", "alice", Subscription::To).await?;
    // (The answer goes to the prober's bare JID, i.e. its available resources.)
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.send(&presence(Some("probe"), Some(&bare("alice"))))
        .await?;
    bob.expect(|e| is_presence(e, None, &format!("{}/laptop", bare("alice"))))
        .await?;
    Ok(())
}

/// §8.5.2.1.1: a message to the bare JID goes to the available resources with the
/// highest non-negative priority, never to one with a negative priority.
#[tokio::test]
async fn negative_priority_gets_no_bare_jid_messages() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut neg = online_with_priority(&server, "alice", "wonderland", "bot", -1).await?;
    let mut pos = online_with_priority(&server, "alice", "wonderland", "laptop", 1).await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.chat(&bare("alice"), "to the best one").await?;
    pos.expect_body("to the best one").await?;
    neg.expect_none(|e| e.name() == "message").await?;
    // Addressed to its full JID, the negative-priority resource gets it.
    bob.chat(&neg.jid.clone(), "direct").await?;
    neg.expect_body("direct").await?;
    // Even as the only resource left, negative priority gets no bare-JID messages: they
    // are stored offline instead (§8.5.2.2).
    pos.close().await?;
    bob.chat(&bare("alice"), "kept for later").await?;
    neg.expect_none(|e| e.name() == "message").await?;
    let mut later = online_with_priority(&server, "alice", "wonderland", "tablet", 0).await?;
    later.expect_body("kept for later").await?;
    Ok(())
}

/// §8.5.2.1.1: on a priority tie every top resource gets the message; lower ones do not.
#[tokio::test]
async fn priority_tie_delivers_to_all_top_resources() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut a = online_with_priority(&server, "alice", "wonderland", "a", 5).await?;
    let mut b = online_with_priority(&server, "alice", "wonderland", "b", 5).await?;
    let mut low = online_with_priority(&server, "alice", "wonderland", "low", 2).await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.chat(&bare("alice"), "tie").await?;
    a.expect_body("tie").await?;
    b.expect_body("tie").await?;
    low.expect_none(|e| e.name() == "message").await?;
    // A priority change moves the delivery.
    low.send(&presence(None, None).with_child(Element::new("priority", ns::CLIENT).with_text("9")))
        .await?;
    let low_jid = low.jid.clone();
    low.expect(|e| {
        is_presence(e, None, &low_jid) && child_text(e, "priority").as_deref() == Some("9")
    })
    .await?;
    bob.chat(&bare("alice"), "now low").await?;
    low.expect_body("now low").await?;
    a.expect_none(|e| e.name() == "message").await?;
    b.expect_none(|e| e.name() == "message").await?;
    Ok(())
}
