//! The services every client asks for: disco, ping, version, time, vCard, private
//! storage, and the iq rules of RFC 6120 §8.2.3.

use confab_protocol::{ns, Element};
use confab_tests::*;

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn iq(ty: &str, to: Option<&str>, payload: Element) -> Element {
    let mut e = Element::new("iq", ns::CLIENT)
        .with_attr("type", ty)
        .with_child(payload);
    if let Some(t) = to {
        e.set_attr("to", t);
    }
    e
}

fn assert_error(reply: &Element, condition: &str) {
    assert_eq!(
        reply.attr("type"),
        Some("error"),
        "expected an error: {reply}"
    );
    assert_eq!(
        error_condition(reply).as_deref(),
        Some(condition),
        "{reply}"
    );
}

fn assert_result(reply: &Element) {
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "expected a result: {reply}"
    );
}

async fn setup() -> anyhow::Result<(TestServer, Client)> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    let alice = server.online("alice", "wonderland", "laptop").await?;
    Ok((server, alice))
}

fn features(query: &Element) -> Vec<String> {
    query
        .children()
        .filter(|c| c.is("feature", ns::DISCO_INFO))
        .filter_map(|c| c.attr("var").map(str::to_string))
        .collect()
}

#[tokio::test]
async fn disco_info_on_the_server() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    let reply = alice
        .iq(iq(
            "get",
            Some(DOMAIN),
            Element::new("query", ns::DISCO_INFO),
        ))
        .await?;
    assert_result(&reply);
    assert_eq!(reply.attr("from"), Some(DOMAIN));
    assert_eq!(reply.attr("to"), Some(alice.jid.as_str()));
    let q = reply.get_child("query", ns::DISCO_INFO).expect("query");
    let ids: Vec<_> = q
        .children()
        .filter(|c| c.is("identity", ns::DISCO_INFO))
        .collect();
    assert!(
        ids.iter()
            .any(|i| i.attr("category") == Some("server") && i.attr("type") == Some("im")),
        "{reply}"
    );
    let f = features(q);
    for want in [
        ns::DISCO_INFO,
        ns::DISCO_ITEMS,
        ns::PING,
        ns::VERSION,
        ns::TIME,
        ns::VCARD,
        "msgoffline",
    ] {
        assert!(
            f.iter().any(|x| x == want),
            "missing feature {want} in {reply}"
        );
    }
    let mut sorted = f.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), f.len(), "duplicate features: {reply}");
    Ok(())
}

#[tokio::test]
async fn disco_info_on_an_account() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    for to in [bare("bob"), bare("alice")] {
        let reply = alice
            .iq(iq("get", Some(&to), Element::new("query", ns::DISCO_INFO)))
            .await?;
        assert_result(&reply);
        assert_eq!(reply.attr("from"), Some(to.as_str()));
        let q = reply.get_child("query", ns::DISCO_INFO).expect("query");
        assert!(
            q.children().any(|i| i.is("identity", ns::DISCO_INFO)
                && i.attr("category") == Some("account")
                && i.attr("type") == Some("registered")),
            "{reply}"
        );
        assert!(features(q).iter().any(|f| f == ns::DISCO_INFO), "{reply}");
    }
    Ok(())
}

#[tokio::test]
async fn disco_items_and_unknown_node() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    let reply = alice
        .iq(iq(
            "get",
            Some(DOMAIN),
            Element::new("query", ns::DISCO_ITEMS),
        ))
        .await?;
    assert_result(&reply);
    assert!(reply.has_child("query", ns::DISCO_ITEMS), "{reply}");
    for q in [ns::DISCO_INFO, ns::DISCO_ITEMS] {
        let reply = alice
            .iq(iq(
                "get",
                Some(DOMAIN),
                Element::new("query", q).with_attr("node", "no-such-node"),
            ))
            .await?;
        assert_error(&reply, "item-not-found");
    }
    Ok(())
}

#[tokio::test]
async fn ping_server_and_own_account() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    let reply = alice
        .iq(iq("get", Some(DOMAIN), Element::new("ping", ns::PING)))
        .await?;
    assert_result(&reply);
    assert_eq!(reply.attr("from"), Some(DOMAIN));
    assert_eq!(reply.children().count(), 0, "{reply}");
    let me = alice.bare();
    let reply = alice
        .iq(iq("get", Some(&me), Element::new("ping", ns::PING)))
        .await?;
    assert_result(&reply);
    assert_eq!(reply.attr("from"), Some(me.as_str()));
    // Without `to`: the account itself.
    let reply = alice
        .iq(iq("get", None, Element::new("ping", ns::PING)))
        .await?;
    assert_result(&reply);
    Ok(())
}

#[tokio::test]
async fn software_version_and_entity_time() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    let reply = alice
        .iq(iq("get", Some(DOMAIN), Element::new("query", ns::VERSION)))
        .await?;
    assert_result(&reply);
    let q = reply.get_child("query", ns::VERSION).expect("query");
    assert_eq!(
        q.get_child("name", ns::VERSION)
            .map(|n| n.text())
            .as_deref(),
        Some("confab")
    );
    assert!(
        q.get_child("version", ns::VERSION)
            .is_some_and(|v| !v.text().is_empty()),
        "{reply}"
    );

    let reply = alice
        .iq(iq("get", Some(DOMAIN), Element::new("time", ns::TIME)))
        .await?;
    assert_result(&reply);
    let t = reply.get_child("time", ns::TIME).expect("time");
    let tzo = t
        .get_child("tzo", ns::TIME)
        .map(|e| e.text())
        .unwrap_or_default();
    assert_eq!(tzo, "+00:00");
    let utc = t
        .get_child("utc", ns::TIME)
        .map(|e| e.text())
        .unwrap_or_default();
    // XEP-0082 DateTime in UTC: CCYY-MM-DDThh:mm:ss[.sss]Z
    let b = utc.as_bytes();
    assert!(
        utc.len() >= 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && utc.ends_with('Z')
            && utc
                .chars()
                .enumerate()
                .all(|(i, c)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19)
                    || c.is_ascii_digit()
                    || c == 'Z'),
        "bad utc {utc:?}"
    );
    let year: u32 = utc[..4].parse()?;
    assert!(year >= 2024, "{utc}");
    let set = alice
        .iq(iq("set", Some(DOMAIN), Element::new("time", ns::TIME)))
        .await?;
    assert_eq!(set.attr("type"), Some("error"), "{set}");
    Ok(())
}

fn vcard(full_name: &str) -> Element {
    Element::new("vCard", ns::VCARD)
        .with_child(Element::new("FN", ns::VCARD).with_text(full_name))
        .with_child(
            Element::new("N", ns::VCARD)
                .with_child(Element::new("GIVEN", ns::VCARD).with_text("Alice"))
                .with_child(Element::new("FAMILY", ns::VCARD).with_text("Liddell & <co>")),
        )
}

fn vcard_fn(reply: &Element) -> Option<String> {
    reply
        .get_child("vCard", ns::VCARD)
        .and_then(|v| v.get_child("FN", ns::VCARD))
        .map(|f| f.text())
}

#[tokio::test]
async fn vcard_set_get_and_access_rules() -> anyhow::Result<()> {
    let (server, mut alice) = setup().await?;
    // Own vCard before any set: empty.
    let reply = alice
        .iq(iq("get", None, Element::new("vCard", ns::VCARD)))
        .await?;
    assert_result(&reply);
    assert!(reply.has_child("vCard", ns::VCARD), "{reply}");
    assert_eq!(vcard_fn(&reply), None);

    let reply = alice.iq(iq("set", None, vcard("Alice Liddell ✓"))).await?;
    assert_result(&reply);
    let reply = alice
        .iq(iq("get", None, Element::new("vCard", ns::VCARD)))
        .await?;
    assert_result(&reply);
    assert_eq!(vcard_fn(&reply).as_deref(), Some("Alice Liddell ✓"));
    let family = reply
        .get_child("vCard", ns::VCARD)
        .and_then(|v| v.get_child("N", ns::VCARD))
        .and_then(|n| n.get_child("FAMILY", ns::VCARD))
        .map(|f| f.text());
    assert_eq!(family.as_deref(), Some("Liddell & <co>"));

    // Someone else reads it (XEP-0054 §3.2), answered by the server for the account.
    let mut bob = server.online("bob", "builder", "phone").await?;
    let reply = bob
        .iq(iq(
            "get",
            Some(&bare("alice")),
            Element::new("vCard", ns::VCARD),
        ))
        .await?;
    assert_result(&reply);
    assert_eq!(reply.attr("from"), Some(bare("alice").as_str()));
    assert_eq!(vcard_fn(&reply).as_deref(), Some("Alice Liddell ✓"));

    // A user without a vCard: an error (item-not-found) or an empty vCard are both allowed.
    let reply = alice
        .iq(iq(
            "get",
            Some(&bare("bob")),
            Element::new("vCard", ns::VCARD),
        ))
        .await?;
    match reply.attr("type") {
        Some("result") => assert_eq!(vcard_fn(&reply), None, "{reply}"),
        _ => assert_error(&reply, "item-not-found"),
    }

    // Setting another user's vCard is forbidden, and changes nothing.
    let reply = bob
        .iq(iq("set", Some(&bare("alice")), vcard("Mallory")))
        .await?;
    assert_error(&reply, "forbidden");
    let reply = alice
        .iq(iq("get", None, Element::new("vCard", ns::VCARD)))
        .await?;
    assert_eq!(vcard_fn(&reply).as_deref(), Some("Alice Liddell ✓"));
    Ok(())
}

fn private(child: Element) -> Element {
    Element::new("query", ns::PRIVATE).with_child(child)
}

#[tokio::test]
async fn private_xml_storage() -> anyhow::Result<()> {
    let (server, mut alice) = setup().await?;
    let data = Element::new("prefs", "urn:example:prefs")
        .with_attr("theme", "dark")
        .with_child(Element::new("item", "urn:example:prefs").with_text("a < b"));
    let reply = alice.iq(iq("set", None, private(data.clone()))).await?;
    assert_result(&reply);

    let reply = alice
        .iq(iq(
            "get",
            None,
            private(Element::new("prefs", "urn:example:prefs")),
        ))
        .await?;
    assert_result(&reply);
    let got = reply
        .get_child("query", ns::PRIVATE)
        .and_then(|q| q.get_child("prefs", "urn:example:prefs"))
        .expect("stored data");
    assert_eq!(got, &data, "{reply}");

    // Unknown data: the query with the empty element (XEP-0049 §2.3).
    let reply = alice
        .iq(iq(
            "get",
            None,
            private(Element::new("other", "urn:example:none")),
        ))
        .await?;
    assert_result(&reply);
    let got = reply
        .get_child("query", ns::PRIVATE)
        .and_then(|q| q.get_child("other", "urn:example:none"))
        .expect("empty element");
    assert_eq!(got.children().count(), 0);
    assert!(got.text().is_empty());

    // jabber:* namespaces are refused.
    let reply = alice
        .iq(iq("set", None, private(Element::new("query", ns::ROSTER))))
        .await?;
    assert_error(&reply, "not-acceptable");
    let reply = alice
        .iq(iq("get", None, private(Element::new("x", "jabber:x:data"))))
        .await?;
    assert_error(&reply, "not-acceptable");

    // Another user's private storage is off limits.
    let mut bob = server.online("bob", "builder", "phone").await?;
    let reply = bob
        .iq(iq(
            "get",
            Some(&bare("alice")),
            private(Element::new("prefs", "urn:example:prefs")),
        ))
        .await?;
    assert_error(&reply, "forbidden");
    let reply = bob
        .iq(iq(
            "set",
            Some(&bare("alice")),
            private(Element::new("prefs", "urn:example:prefs")),
        ))
        .await?;
    assert_error(&reply, "forbidden");
    // Bob's own storage is separate.
    let reply = bob
        .iq(iq(
            "get",
            None,
            private(Element::new("prefs", "urn:example:prefs")),
        ))
        .await?;
    assert_result(&reply);
    let got = reply
        .get_child("query", ns::PRIVATE)
        .and_then(|q| q.get_child("prefs", "urn:example:prefs"))
        .expect("empty element");
    assert_eq!(got.children().count(), 0, "{reply}");
    Ok(())
}

#[tokio::test]
async fn iq_rules_of_rfc6120() -> anyhow::Result<()> {
    let (_server, mut alice) = setup().await?;
    // Unknown namespace → service-unavailable (RFC 6120 §8.4), to the server and to an account.
    for to in [Some(DOMAIN.to_string()), None, Some(bare("bob"))] {
        let reply = alice
            .iq(iq(
                "get",
                to.as_deref(),
                Element::new("query", "urn:example:unknown"),
            ))
            .await?;
        assert_error(&reply, "service-unavailable");
        assert!(
            reply.get_child("query", "urn:example:unknown").is_none(),
            "iq error must not echo the payload: {reply}"
        );
    }
    // Two payload children → bad-request (§8.2.3).
    let two = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("to", DOMAIN)
        .with_child(Element::new("ping", ns::PING))
        .with_child(Element::new("query", ns::VERSION));
    let reply = alice.iq(two).await?;
    assert_error(&reply, "bad-request");
    // No payload → bad-request.
    let reply = alice
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", DOMAIN))
        .await?;
    assert_error(&reply, "bad-request");
    // An unknown type → bad-request.
    let reply = alice
        .iq(iq("fetch", Some(DOMAIN), Element::new("ping", ns::PING)))
        .await?;
    assert_error(&reply, "bad-request");

    // No id → bad-request (§8.1.3): the reply has no id to match, so look for any iq error.
    alice
        .send_str(&format!(
            "<iq type='get' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await?;
    let reply = alice
        .expect(|e| e.name() == "iq" && e.attr("type") == Some("error"))
        .await?;
    assert_error(&reply, "bad-request");
    assert_eq!(reply.attr("id"), None);

    // A result (or error) addressed to the server is ignored: no reply.
    alice
        .send(
            &Element::new("iq", ns::CLIENT)
                .with_attr("type", "result")
                .with_attr("id", "unsolicited")
                .with_attr("to", DOMAIN),
        )
        .await?;
    alice
        .send(
            &Element::new("iq", ns::CLIENT)
                .with_attr("type", "error")
                .with_attr("id", "unsolicited-err")
                .with_attr("to", DOMAIN)
                .with_child(
                    Element::new("error", ns::CLIENT)
                        .with_attr("type", "cancel")
                        .with_child(Element::new("feature-not-implemented", ns::STANZAS)),
                ),
        )
        .await?;
    alice
        .expect_none(|e| matches!(e.attr("id"), Some("unsolicited") | Some("unsolicited-err")))
        .await?;
    Ok(())
}
