//! RFC 6121 §3: the presence subscription state machine between two local users,
//! observed through roster pushes and the subscription stanzas each side receives.

use confab_protocol::{ns, Element};
use confab_storage::{RosterItem, Subscription};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn item_in<'a>(e: &'a Element, jid: &str) -> Option<&'a Element> {
    e.get_child("query", ns::ROSTER)?
        .children()
        .find(|i| i.is("item", ns::ROSTER) && i.attr("jid") == Some(jid))
}

fn is_push(e: &Element) -> bool {
    e.name() == "iq" && e.attr("type") == Some("set") && e.get_child("query", ns::ROSTER).is_some()
}

/// Waits for a roster push about `jid` with this subscription and pending-out flag.
async fn expect_state(c: &mut Client, jid: &str, sub: &str, ask: bool) -> anyhow::Result<Element> {
    let push = c
        .expect(|e| {
            is_push(e)
                && item_in(e, jid).is_some_and(|i| {
                    i.attr("subscription") == Some(sub)
                        && (i.attr("ask") == Some("subscribe")) == ask
                })
        })
        .await?;
    Ok(item_in(&push, jid).cloned().expect("item"))
}

/// The current roster item for `jid` (from a roster get).
async fn roster_item(c: &mut Client, jid: &str) -> anyhow::Result<Option<Element>> {
    let q = c.roster_get().await?;
    let found = q
        .children()
        .find(|i| i.is("item", ns::ROSTER) && i.attr("jid") == Some(jid))
        .cloned();
    Ok(found)
}

fn is_presence(e: &Element, ty: Option<&str>, from: &str) -> bool {
    e.name() == "presence" && e.attr("type") == ty && e.attr("from") == Some(from)
}

/// A presence of `ty` from `from` (bare) or one of its resources.
fn is_presence_from_account(e: &Element, ty: Option<&str>, account: &str) -> bool {
    e.name() == "presence"
        && e.attr("type") == ty
        && e.attr("from")
            .is_some_and(|f| f == account || f.starts_with(&format!("{account}/")))
}

async fn expect_presence(c: &mut Client, ty: Option<&str>, from: &str) -> anyhow::Result<Element> {
    c.expect(|e| is_presence(e, ty, from)).await
}

async fn setup() -> anyhow::Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    Ok(server)
}

/// Alice subscribes to Bob and Bob approves: the state changes of §3.1 on both sides.
async fn alice_subscribes_and_bob_approves(
    alice: &mut Client,
    bob: &mut Client,
) -> anyhow::Result<()> {
    let (a, b) = (bare("alice"), bare("bob"));
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    // §3.1.2: the subscriber's item shows the pending request.
    expect_state(alice, &b, "none", true).await?;
    // §3.1.3: the contact gets the request from the subscriber's bare JID.
    let req = expect_presence(bob, Some("subscribe"), &a).await?;
    assert_eq!(req.attr("to"), Some(b.as_str()), "{req}");
    bob.send(&presence(Some("subscribed"), Some(&a))).await?;
    // §3.1.5: the contact's item becomes 'from'.
    expect_state(bob, &a, "from", false).await?;
    // §3.1.6: the subscriber's item becomes 'to', it gets the approval and the
    // contact's current presence.
    expect_state(alice, &b, "to", false).await?;
    expect_presence(alice, Some("subscribed"), &b).await?;
    let bob_jid = bob.jid.clone();
    expect_presence(alice, None, &bob_jid).await?;
    Ok(())
}

/// §3.1: request, approval, then the reverse direction: both ends at 'both', and presence
/// now flows both ways.
#[tokio::test]
async fn subscribe_approve_then_mutual_gives_both() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice_subscribes_and_bob_approves(&mut alice, &mut bob).await?;
    // Only one direction so far: Bob does not see Alice's presence.
    let alice_jid = alice.jid.clone();
    bob.expect_none(|e| is_presence(e, None, &alice_jid))
        .await?;

    bob.send(&presence(Some("subscribe"), Some(&a))).await?;
    expect_state(&mut bob, &a, "from", true).await?;
    expect_presence(&mut alice, Some("subscribe"), &b).await?;
    alice.send(&presence(Some("subscribed"), Some(&b))).await?;
    expect_state(&mut alice, &b, "both", false).await?;
    expect_state(&mut bob, &a, "both", false).await?;
    expect_presence(&mut bob, Some("subscribed"), &a).await?;
    expect_presence(&mut bob, None, &alice_jid).await?;

    // Presence updates now reach the other side in both directions.
    alice
        .send(&presence(None, None).with_child(Element::new("show", ns::CLIENT).with_text("away")))
        .await?;
    let p = expect_presence(&mut bob, None, &alice_jid).await?;
    assert_eq!(
        p.get_child("show", ns::CLIENT).map(|s| s.text()).as_deref(),
        Some("away")
    );
    let bob_jid = bob.jid.clone();
    bob.send(&presence(None, None).with_child(Element::new("show", ns::CLIENT).with_text("dnd")))
        .await?;
    let p = alice
        .expect(|e| {
            is_presence(e, None, &bob_jid)
                && e.get_child("show", ns::CLIENT).map(|s| s.text()).as_deref() == Some("dnd")
        })
        .await?;
    assert_eq!(p.attr("to").map(|t| t.starts_with(a.as_str())), Some(true));
    assert_eq!(
        roster_item(&mut alice, &b)
            .await?
            .and_then(|i| i.attr("subscription").map(String::from)),
        Some("both".into())
    );
    Ok(())
}

/// §3.3: the subscriber unsubscribes. Both items lose that direction, the contact gets
/// the unsubscribe, and the subscriber gets unavailable from the contact's resources.
#[tokio::test]
async fn unsubscribe_by_subscriber() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice_subscribes_and_bob_approves(&mut alice, &mut bob).await?;
    alice.send(&presence(Some("unsubscribe"), Some(&b))).await?;
    expect_state(&mut alice, &b, "none", false).await?;
    expect_state(&mut bob, &a, "none", false).await?;
    expect_presence(&mut bob, Some("unsubscribe"), &a).await?;
    let bob_jid = bob.jid.clone();
    expect_presence(&mut alice, Some("unavailable"), &bob_jid).await?;
    // No presence flows any more.
    bob.send(&presence(None, None).with_child(Element::new("status", ns::CLIENT).with_text("x")))
        .await?;
    expect_presence(&mut bob, None, &bob_jid).await?;
    alice
        .expect_none(|e| is_presence(e, None, &bob_jid))
        .await?;
    Ok(())
}

/// §3.2: the contact cancels the subscriber's subscription with unsubscribed; the
/// subscriber loses the contact's presence (gets unavailable).
#[tokio::test]
async fn contact_cancels_with_unsubscribed() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice_subscribes_and_bob_approves(&mut alice, &mut bob).await?;
    bob.send(&presence(Some("unsubscribed"), Some(&a))).await?;
    expect_state(&mut bob, &a, "none", false).await?;
    expect_state(&mut alice, &b, "none", false).await?;
    expect_presence(&mut alice, Some("unsubscribed"), &b).await?;
    let bob_jid = bob.jid.clone();
    expect_presence(&mut alice, Some("unavailable"), &bob_jid).await?;
    bob.send(&presence(None, None).with_child(Element::new("status", ns::CLIENT).with_text("x")))
        .await?;
    expect_presence(&mut bob, None, &bob_jid).await?;
    alice
        .expect_none(|e| is_presence(e, None, &bob_jid))
        .await?;
    Ok(())
}

/// §3.2.1 / §3.1.5: the contact denies the request; the subscriber's pending flag is
/// cleared and it never sees the contact's presence.
#[tokio::test]
async fn denied_request() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    expect_state(&mut alice, &b, "none", true).await?;
    expect_presence(&mut bob, Some("subscribe"), &a).await?;
    bob.send(&presence(Some("unsubscribed"), Some(&a))).await?;
    expect_presence(&mut alice, Some("unsubscribed"), &b).await?;
    expect_state(&mut alice, &b, "none", false).await?;
    alice
        .expect_none(|e| is_presence_from_account(e, None, &b))
        .await?;
    // Bob never had Alice in his roster; denying does not add her.
    bob.expect_none(is_push).await?;
    assert!(roster_item(&mut bob, &a).await?.is_none());
    // The denied request is not offered again at Bob's next login.
    bob.close().await?;
    let mut bob = server.online("bob", "builder", "tablet").await?;
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    Ok(())
}

/// §3.4: Bob pre-approves Alice; her later request is approved by the server without
/// Bob ever seeing it.
#[tokio::test]
async fn pre_approval_auto_approves() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    bob.send(&presence(Some("subscribed"), Some(&a))).await?;
    let i = expect_state(&mut bob, &a, "none", false).await?;
    assert_eq!(i.attr("approved"), Some("true"), "{i}");
    // A pre-approval is not sent to the contact.
    alice
        .expect_none(|e| is_presence(e, Some("subscribed"), &b))
        .await?;

    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    expect_state(&mut alice, &b, "to", false).await?;
    expect_presence(&mut alice, Some("subscribed"), &b).await?;
    let bob_jid = bob.jid.clone();
    expect_presence(&mut alice, None, &bob_jid).await?;
    let i = expect_state(&mut bob, &a, "from", false).await?;
    assert_eq!(i.attr("approved"), None, "approval is used up: {i}");
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    Ok(())
}

/// §3.1.3: a request to an offline contact is kept and delivered when the contact sends
/// initial presence, again at each login until answered, and not after the answer.
#[tokio::test]
async fn request_to_offline_contact_is_kept_until_answered() -> anyhow::Result<()> {
    let mut server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    expect_state(&mut alice, &b, "none", true).await?;

    // A session that has not sent initial presence does not get it yet.
    let mut bob = server.login("bob", "builder", "phone").await?;
    bob.roster_get().await?;
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    bob.send(&presence(None, None)).await?;
    expect_presence(&mut bob, Some("subscribe"), &a).await?;
    bob.close().await?;

    // Not answered: offered again at the next login, also after a restart.
    drop(alice);
    server.restart().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    expect_presence(&mut bob, Some("subscribe"), &a).await?;
    bob.send(&presence(Some("subscribed"), Some(&a))).await?;
    expect_state(&mut bob, &a, "from", false).await?;
    bob.close().await?;

    // Answered: gone; and Alice, offline meanwhile, has her subscription.
    let mut bob = server.online("bob", "builder", "tablet").await?;
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let i = roster_item(&mut alice, &b).await?.expect("item");
    assert_eq!(i.attr("subscription"), Some("to"), "{i}");
    assert_eq!(i.attr("ask"), None, "{i}");
    // Her initial presence probed Bob, who is online.
    let bob_jid = bob.jid.clone();
    expect_presence(&mut alice, None, &bob_jid).await?;
    Ok(())
}

/// §3.1.3: a request to a local account that does not exist is answered with unsubscribed.
#[tokio::test]
async fn subscribe_to_nonexistent_user_is_unsubscribed() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let ghost = bare("ghost");
    alice
        .send(&presence(Some("subscribe"), Some(&ghost)))
        .await?;
    expect_state(&mut alice, &ghost, "none", true).await?;
    expect_presence(&mut alice, Some("unsubscribed"), &ghost).await?;
    expect_state(&mut alice, &ghost, "none", false).await?;
    Ok(())
}

/// §3.1.3: a subscribe from someone already subscribed is answered by the server with
/// subscribed, without bothering the contact. When the subscriber's side lost the state
/// (here: its roster item reset behind the server's back), that answer repairs it.
#[tokio::test]
async fn duplicate_subscribe_is_auto_approved() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice_subscribes_and_bob_approves(&mut alice, &mut bob).await?;

    // In sync: nothing reaches Bob, nothing changes.
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    bob.expect_none(is_push).await?;
    let i = roster_item(&mut alice, &b).await?.expect("item");
    assert_eq!(i.attr("subscription"), Some("to"));
    assert_eq!(i.attr("ask"), None);

    // Out of sync: Alice's item says 'none' while Bob's says 'from'.
    let mut reset = RosterItem::new(&b);
    reset.subscription = Subscription::None;
    server.storage().put_roster_item(&a, reset).await?;
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    expect_state(&mut alice, &b, "none", true).await?;
    expect_presence(&mut alice, Some("subscribed"), &b).await?;
    expect_state(&mut alice, &b, "to", false).await?;
    bob.expect_none(|e| is_presence(e, Some("subscribe"), &a))
        .await?;
    Ok(())
}

/// §2.5.2: removing a contact with a mutual subscription cancels both directions: the
/// contact gets unsubscribe and unsubscribed, its roster is pushed down to 'none', and
/// presence stops in both directions.
#[tokio::test]
async fn roster_remove_cancels_both_ways() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    alice_subscribes_and_bob_approves(&mut alice, &mut bob).await?;
    bob.send(&presence(Some("subscribe"), Some(&a))).await?;
    expect_presence(&mut alice, Some("subscribe"), &b).await?;
    alice.send(&presence(Some("subscribed"), Some(&b))).await?;
    expect_state(&mut alice, &b, "both", false).await?;
    expect_state(&mut bob, &a, "both", false).await?;
    let alice_jid = alice.jid.clone();
    expect_presence(&mut bob, None, &alice_jid).await?;

    let remove = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_child(
            Element::new("query", ns::ROSTER).with_child(
                Element::new("item", ns::ROSTER)
                    .with_attr("jid", b.clone())
                    .with_attr("subscription", "remove"),
            ),
        );
    let reply = alice.iq(remove).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    alice
        .expect(|e| {
            is_push(e) && item_in(e, &b).and_then(|i| i.attr("subscription")) == Some("remove")
        })
        .await?;
    expect_presence(&mut bob, Some("unsubscribe"), &a).await?;
    expect_presence(&mut bob, Some("unsubscribed"), &a).await?;
    expect_state(&mut bob, &a, "none", false).await?;
    // Bob no longer sees Alice (§3.2.2: unavailable from her resources) ...
    expect_presence(&mut bob, Some("unavailable"), &alice_jid).await?;
    // ... and Alice no longer sees Bob (§3.3.3).
    let bob_jid = bob.jid.clone();
    expect_presence(&mut alice, Some("unavailable"), &bob_jid).await?;
    let i = roster_item(&mut bob, &a)
        .await?
        .expect("Bob keeps the item");
    assert_eq!(i.attr("subscription"), Some("none"));
    assert!(roster_item(&mut alice, &b).await?.is_none());
    alice
        .send(
            &presence(None, None).with_child(Element::new("status", ns::CLIENT).with_text("later")),
        )
        .await?;
    expect_presence(&mut alice, None, &alice_jid).await?;
    bob.expect_none(|e| is_presence(e, None, &alice_jid))
        .await?;
    Ok(())
}
