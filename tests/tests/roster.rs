//! RFC 6121 §2: roster get, set, update, remove, pushes, versioning (§2.6) and the
//! error cases of §2.3.3, end to end over real client connections.

use confab_protocol::{ns, Element};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn item(jid: &str, name: Option<&str>, groups: &[&str]) -> Element {
    let mut i = Element::new("item", ns::ROSTER).with_attr("jid", jid);
    if let Some(n) = name {
        i.set_attr("name", n);
    }
    for g in groups {
        i.append_child(Element::new("group", ns::ROSTER).with_text(*g));
    }
    i
}

fn roster_iq(ty: &str, query: Element) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", ty)
        .with_child(query)
}

fn set_query(items: Vec<Element>) -> Element {
    let mut q = Element::new("query", ns::ROSTER);
    for i in items {
        q.append_child(i);
    }
    q
}

async fn roster_set(c: &mut Client, it: Element) -> anyhow::Result<Element> {
    c.iq(roster_iq("set", set_query(vec![it]))).await
}

async fn roster_get_ver(c: &mut Client, ver: &str) -> anyhow::Result<Element> {
    c.iq(roster_iq(
        "get",
        Element::new("query", ns::ROSTER).with_attr("ver", ver),
    ))
    .await
}

fn items(query: &Element) -> Vec<&Element> {
    query
        .children()
        .filter(|c| c.is("item", ns::ROSTER))
        .collect()
}

fn find<'a>(query: &'a Element, jid: &str) -> Option<&'a Element> {
    items(query)
        .into_iter()
        .find(|i| i.attr("jid") == Some(jid))
}

fn groups(item: &Element) -> Vec<String> {
    item.children()
        .filter(|c| c.is("group", ns::ROSTER))
        .map(|g| g.text())
        .collect()
}

fn is_push(e: &Element, jid: &str) -> bool {
    e.name() == "iq"
        && e.attr("type") == Some("set")
        && e.get_child("query", ns::ROSTER)
            .is_some_and(|q| find(q, jid).is_some())
}

/// Waits for a roster push about `jid`; checks it is a well-formed push (§2.1.6) and
/// acknowledges it as a client must. Returns the query (with its `ver`).
async fn expect_push(c: &mut Client, jid: &str) -> anyhow::Result<Element> {
    expect_push_where(c, jid, |_| true).await
}

/// [`expect_push`] for a push whose item satisfies `pred` (earlier pushes stay queued).
async fn expect_push_where(
    c: &mut Client,
    jid: &str,
    pred: impl Fn(&Element) -> bool,
) -> anyhow::Result<Element> {
    let push = c
        .expect(|e| {
            is_push(e, jid)
                && e.get_child("query", ns::ROSTER)
                    .and_then(|q| find(q, jid))
                    .is_some_and(&pred)
        })
        .await?;
    let own = c.bare();
    // §2.1.6: a push comes from the account itself (no from, or the bare JID).
    assert!(
        push.attr("from").is_none() || push.attr("from") == Some(own.as_str()),
        "push from a foreign entity: {push}"
    );
    assert!(push.attr("id").is_some(), "push without id: {push}");
    let q = push.get_child("query", ns::ROSTER).cloned().expect("query");
    assert_eq!(
        items(&q).len(),
        1,
        "a push carries exactly one item: {push}"
    );
    let ack = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("id", push.attr("id").unwrap_or_default());
    c.send(&ack).await?;
    Ok(q)
}

fn ver_of(q: &Element) -> u64 {
    q.attr("ver")
        .expect("roster with ver")
        .parse()
        .expect("numeric ver")
}

async fn setup() -> anyhow::Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("carol", "singer").await?;
    Ok(server)
}

/// A fresh account has an empty roster, and the answer carries a version (§2.6).
#[tokio::test]
async fn empty_roster_get_has_version() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.login("alice", "wonderland", "laptop").await?;
    // Roster versioning and pre-approval are stream features (§2.6.1, §3.4).
    let f = alice.features.clone().expect("features");
    assert!(f.has_child("ver", ns::ROSTERVER), "{f}");
    assert!(f.has_child("sub", ns::PRE_APPROVAL), "{f}");
    let q = alice.roster_get().await?;
    assert!(items(&q).is_empty(), "{q}");
    assert!(q.attr("ver").is_some(), "{q}");
    Ok(())
}

/// §2.3 / §2.1.6: a set adds the item with name and groups, is answered with a result,
/// and pushed to every interested resource of the account, including the one that set it.
#[tokio::test]
async fn set_adds_item_and_pushes_to_every_interested_resource() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut laptop = server.online("alice", "wonderland", "laptop").await?;
    let mut phone = server.online("alice", "wonderland", "phone").await?;
    // A resource that never asked for the roster is not interested (§2.1.6).
    let mut quiet = server.login("alice", "wonderland", "quiet").await?;
    let bob = bare("bob");
    let reply = roster_set(
        &mut laptop,
        item(&bob, Some("Bob the Builder"), &["Friends", "Work"]),
    )
    .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    for c in [&mut laptop, &mut phone] {
        let q = expect_push(c, &bob).await?;
        let i = find(&q, &bob).expect("item");
        assert_eq!(i.attr("name"), Some("Bob the Builder"));
        assert_eq!(i.attr("subscription"), Some("none"));
        assert_eq!(i.attr("ask"), None);
        assert_eq!(groups(i), vec!["Friends", "Work"]);
    }
    quiet.expect_none(|e| is_push(e, &bob)).await?;
    let q = laptop.roster_get().await?;
    let i = find(&q, &bob).expect("item in roster");
    assert_eq!(i.attr("name"), Some("Bob the Builder"));
    assert_eq!(groups(i), vec!["Friends", "Work"]);
    Ok(())
}

/// §2.4: an update replaces name and groups, and leaves the subscription state alone.
#[tokio::test]
async fn update_replaces_name_and_groups_but_keeps_subscription() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    // Alice subscribes to Bob and Bob approves: Alice's item becomes 'to'.
    alice.send(&presence(Some("subscribe"), Some(&b))).await?;
    bob.expect(|e| e.name() == "presence" && e.attr("type") == Some("subscribe"))
        .await?;
    bob.send(&presence(Some("subscribed"), Some(&a))).await?;
    alice
        .expect(|e| {
            is_push(e, &b)
                && e.get_child("query", ns::ROSTER)
                    .and_then(|q| find(q, &b))
                    .and_then(|i| i.attr("subscription"))
                    == Some("to")
        })
        .await?;
    roster_set(&mut alice, item(&b, Some("Old"), &["A", "B"])).await?;
    expect_push_where(&mut alice, &b, |i| i.attr("name") == Some("Old")).await?;
    let reply = roster_set(&mut alice, item(&b, Some("New"), &["C"])).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    let q = expect_push_where(&mut alice, &b, |i| i.attr("name") == Some("New")).await?;
    let i = find(&q, &b).expect("item");
    assert_eq!(i.attr("name"), Some("New"));
    assert_eq!(groups(i), vec!["C"]);
    assert_eq!(i.attr("subscription"), Some("to"));
    // An update without name and groups clears them, still keeping the subscription.
    roster_set(&mut alice, item(&b, None, &[])).await?;
    let q = expect_push_where(&mut alice, &b, |i| {
        i.attr("name").is_none() && i.attr("ask").is_none()
    })
    .await?;
    let i = find(&q, &b).expect("item");
    assert_eq!(i.attr("name"), None);
    assert!(groups(i).is_empty());
    assert_eq!(i.attr("subscription"), Some("to"));
    // Bob's side did not change either: he still sees Alice as 'from'.
    let q = bob.roster_get().await?;
    assert_eq!(
        find(&q, &a).and_then(|i| i.attr("subscription")),
        Some("from")
    );
    Ok(())
}

/// §2.5: remove is pushed with subscription='remove' and the item is gone afterwards.
#[tokio::test]
async fn remove_pushes_remove_and_item_is_gone() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut laptop = server.online("alice", "wonderland", "laptop").await?;
    let mut phone = server.online("alice", "wonderland", "phone").await?;
    let bob = bare("bob");
    roster_set(&mut laptop, item(&bob, Some("Bob"), &["Friends"])).await?;
    expect_push(&mut laptop, &bob).await?;
    expect_push(&mut phone, &bob).await?;
    let reply = roster_set(
        &mut laptop,
        item(&bob, None, &[]).with_attr("subscription", "remove"),
    )
    .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    for c in [&mut laptop, &mut phone] {
        let q = expect_push(c, &bob).await?;
        assert_eq!(
            find(&q, &bob).and_then(|i| i.attr("subscription")),
            Some("remove")
        );
    }
    let q = phone.roster_get().await?;
    assert!(find(&q, &bob).is_none(), "{q}");
    Ok(())
}

/// §2.5.3: removing an item that is not in the roster is item-not-found.
#[tokio::test]
async fn removing_unknown_item_is_item_not_found() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let reply = roster_set(
        &mut alice,
        item(&bare("nobody"), None, &[]).with_attr("subscription", "remove"),
    )
    .await?;
    assert_eq!(reply.attr("type"), Some("error"), "{reply}");
    assert_eq!(error_condition(&reply).as_deref(), Some("item-not-found"));
    alice.expect_none(|e| is_push(e, &bare("nobody"))).await?;
    Ok(())
}

/// §2.6: versioning. A get with the current version is an empty result; with an older
/// version the full roster with the new version; each change increases the version.
#[tokio::test]
async fn roster_versioning() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let (b, c) = (bare("bob"), bare("carol"));
    let v0 = ver_of(&alice.roster_get().await?);

    let reply = roster_get_ver(&mut alice, &v0.to_string()).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    assert!(
        reply.first_child().is_none(),
        "unchanged roster must be an empty result: {reply}"
    );

    roster_set(&mut alice, item(&b, Some("Bob"), &[])).await?;
    let v1 = ver_of(&expect_push(&mut alice, &b).await?);
    assert!(v1 > v0, "{v1} > {v0}");
    roster_set(&mut alice, item(&c, Some("Carol"), &[])).await?;
    let v2 = ver_of(&expect_push(&mut alice, &c).await?);
    assert!(v2 > v1, "{v2} > {v1}");
    // Updates and removals change the version too.
    roster_set(&mut alice, item(&c, Some("Caroline"), &[])).await?;
    let v3 = ver_of(&expect_push(&mut alice, &c).await?);
    assert!(v3 > v2, "{v3} > {v2}");
    roster_set(
        &mut alice,
        item(&c, None, &[]).with_attr("subscription", "remove"),
    )
    .await?;
    let v4 = ver_of(&expect_push(&mut alice, &c).await?);
    assert!(v4 > v3, "{v4} > {v3}");

    // An old version: the whole roster, with the current version.
    let reply = roster_get_ver(&mut alice, &v1.to_string()).await?;
    let q = reply.get_child("query", ns::ROSTER).expect("full roster");
    assert_eq!(ver_of(q), v4);
    assert_eq!(items(q).len(), 1, "{q}");
    assert!(find(q, &b).is_some());
    // The current version: empty result again.
    let reply = roster_get_ver(&mut alice, &v4.to_string()).await?;
    assert_eq!(reply.attr("type"), Some("result"));
    assert!(reply.first_child().is_none(), "{reply}");
    // An empty ver asks for the full roster (§2.6.2).
    let reply = roster_get_ver(&mut alice, "").await?;
    let q = reply.get_child("query", ns::ROSTER).expect("full roster");
    assert_eq!(ver_of(q), v4);
    Ok(())
}

/// §2.3.3: the error cases of a roster set, none of which changes the roster.
#[tokio::test]
async fn roster_set_validation_errors() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let (b, c) = (bare("bob"), bare("carol"));
    let v0 = ver_of(&alice.roster_get().await?);
    let cases: Vec<(&str, Element, &str)> = vec![
        (
            "two items",
            set_query(vec![item(&b, None, &[]), item(&c, None, &[])]),
            "bad-request",
        ),
        ("no item", set_query(vec![]), "bad-request"),
        (
            "missing jid",
            set_query(vec![Element::new("item", ns::ROSTER).with_attr("name", "x")]),
            "bad-request",
        ),
        (
            "malformed jid",
            set_query(vec![item("a@b@c", None, &[])]),
            "jid-malformed",
        ),
        (
            "empty group",
            set_query(vec![item(&b, None, &["Friends", ""])]),
            "not-acceptable",
        ),
        (
            "duplicate group",
            set_query(vec![item(&b, None, &["Friends", "Friends"])]),
            "bad-request",
        ),
        (
            "name too long",
            set_query(vec![item(&b, Some(&"n".repeat(5000)), &[])]),
            "not-acceptable",
        ),
    ];
    for (what, q, cond) in cases {
        let reply = alice.iq(roster_iq("set", q)).await?;
        assert_eq!(reply.attr("type"), Some("error"), "{what}: {reply}");
        assert_eq!(
            error_condition(&reply).as_deref(),
            Some(cond),
            "{what}: {reply}"
        );
    }
    alice
        .expect_none(|e| e.name() == "iq" && e.attr("type") == Some("set"))
        .await?;
    let q = alice.roster_get().await?;
    assert!(items(&q).is_empty(), "{q}");
    assert_eq!(ver_of(&q), v0, "a refused set must not change the version");
    Ok(())
}

/// §2.1.2.5: in a roster set the server ignores every subscription value other than
/// 'remove'; a client cannot grant itself a subscription, and no presence flows.
#[tokio::test]
async fn client_cannot_set_subscription_state() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let (a, b) = (bare("alice"), bare("bob"));
    for value in ["both", "to", "from", "bogus"] {
        let it = item(&b, Some("Bob"), &[])
            .with_attr("subscription", value)
            .with_attr("ask", "subscribe")
            .with_attr("approved", "true");
        let reply = roster_set(&mut alice, it).await?;
        assert_eq!(reply.attr("type"), Some("result"), "{value}: {reply}");
        let q = expect_push(&mut alice, &b).await?;
        let i = find(&q, &b).expect("item");
        assert_eq!(i.attr("subscription"), Some("none"), "{value}: {q}");
        assert_eq!(i.attr("ask"), None, "{value}: {q}");
        assert_eq!(i.attr("approved"), None, "{value}: {q}");
    }
    // Not a state change: Alice's presence does not reach Bob, Bob's does not reach her.
    alice
        .send(
            &presence(None, None)
                .with_child(Element::new("status", ns::CLIENT).with_text("after set")),
        )
        .await?;
    let alice_jid = alice.jid.clone();
    alice
        .expect(|e| e.name() == "presence" && e.attr("from") == Some(alice_jid.as_str()))
        .await?;
    bob.expect_none(|e| {
        e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with(a.as_str()))
    })
    .await?;
    let bob_jid = bob.jid.clone();
    alice
        .expect_none(|e| e.name() == "presence" && e.attr("from") == Some(bob_jid.as_str()))
        .await?;
    let q = bob.roster_get().await?;
    assert!(find(&q, &a).is_none(), "{q}");
    Ok(())
}

/// §2.1.5 / §2.3.3: only the account itself reads or changes its roster.
#[tokio::test]
async fn roster_of_another_account_is_forbidden() -> anyhow::Result<()> {
    let server = setup().await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    roster_set(&mut bob, item(&bare("carol"), Some("Carol"), &[])).await?;
    expect_push(&mut bob, &bare("carol")).await?;
    let get = roster_iq("get", Element::new("query", ns::ROSTER)).with_attr("to", bare("bob"));
    let reply = alice.iq(get).await?;
    assert_eq!(reply.attr("type"), Some("error"), "{reply}");
    assert_eq!(error_condition(&reply).as_deref(), Some("forbidden"));
    assert!(reply
        .get_child("query", ns::ROSTER)
        .and_then(|q| find(q, &bare("carol")))
        .is_none());
    let set = roster_iq("set", set_query(vec![item(&bare("alice"), None, &[])]))
        .with_attr("to", bare("bob"));
    let reply = alice.iq(set).await?;
    assert_eq!(
        error_condition(&reply).as_deref(),
        Some("forbidden"),
        "{reply}"
    );
    bob.expect_none(|e| is_push(e, &bare("alice"))).await?;
    // Addressing one's own bare JID explicitly is the same as no 'to'.
    let own = roster_iq("get", Element::new("query", ns::ROSTER)).with_attr("to", bare("bob"));
    let reply = bob.iq(own).await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    Ok(())
}

/// The roster is stored with the account: a resource logging in later, and the same
/// account after a server restart, see it.
#[tokio::test]
async fn roster_survives_for_a_second_resource_and_a_restart() -> anyhow::Result<()> {
    let mut server = setup().await?;
    let b = bare("bob");
    {
        let mut laptop = server.online("alice", "wonderland", "laptop").await?;
        roster_set(&mut laptop, item(&b, Some("Bob"), &["Friends"])).await?;
        expect_push(&mut laptop, &b).await?;
        let mut phone = server.online("alice", "wonderland", "phone").await?;
        let q = phone.roster_get().await?;
        let i = find(&q, &b).expect("item for the second resource");
        assert_eq!(i.attr("name"), Some("Bob"));
        assert_eq!(groups(i), vec!["Friends"]);
        laptop.close().await?;
        phone.close().await?;
    }
    server.restart().await?;
    let mut again = server.online("alice", "wonderland", "tablet").await?;
    let q = again.roster_get().await?;
    let i = find(&q, &b).expect("item after restart");
    assert_eq!(i.attr("name"), Some("Bob"));
    Ok(())
}
