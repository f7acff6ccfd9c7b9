//! Hostile and broken input on client streams: every case ends with the right stream
//! error and the connection closing, and the server goes on serving everyone else
//! (RFC 6120 §4.9, §11; DESIGN security checklist).

use anyhow::Result;
use confab_protocol::{ns, Element};
use confab_tests::*;

async fn start() -> Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("mallory", "evil").await?;
    server.add_user("probe", "probing").await?;
    Ok(server)
}

/// A bound session of mallory, the sender of bad input.
async fn mallory(server: &TestServer) -> Result<Client> {
    server.login("mallory", "evil", "lab").await
}

/// Sends `bytes` on a bound session and expects the stream to end with `condition`.
async fn bound_input_fails(server: &TestServer, bytes: &[u8], condition: &str) -> Result<()> {
    let mut c = mallory(server).await?;
    c.send_raw(bytes).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError(condition.into()),
        "input {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
    );
    Ok(())
}

/// Sends a header made of `prolog` + the usual stream header and expects `condition`.
async fn prolog_fails(server: &TestServer, prolog: &[u8], condition: &str) -> Result<()> {
    let mut c = Client::connect_raw(server.addr()).await?;
    let mut data = prolog.to_vec();
    data.extend_from_slice(
        format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='{}' to='{DOMAIN}' version='1.0'>",
            ns::STREAM
        )
        .as_bytes(),
    );
    c.send_raw(&data).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError(condition.into()),
        "prolog {:?}",
        String::from_utf8_lossy(prolog)
    );
    Ok(())
}

fn msg(body_xml: &str) -> String {
    format!("<message to='bob@{DOMAIN}' type='chat'><body>{body_xml}</body></message>")
}

#[tokio::test]
async fn mismatched_tag_is_not_well_formed() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bound_input_fails(
        &server,
        format!("<message to='bob@{DOMAIN}'><body>x</bdy></message>").as_bytes(),
        "not-well-formed",
    )
    .await?;
    bound_input_fails(
        &server,
        b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'></iq></ping>",
        "not-well-formed",
    )
    .await?;
    bob.expect_none(|e| e.name() == "message").await?;
    // Before authentication too.
    let mut c = Client::connect(server.addr()).await?;
    c.send_str("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'></proceed>")
        .await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("not-well-formed".into())
    );
    assert_serving(&server).await
}

/// A mismatched end tag that leaves the nesting count above zero should be refused when
/// it arrives, not when (if ever) the count reaches zero.
#[tokio::test]
async fn mismatched_tag_is_refused_at_once() -> Result<()> {
    let server = start().await?;
    bound_input_fails(
        &server,
        format!("<message to='bob@{DOMAIN}'><body>x</message>").as_bytes(),
        "not-well-formed",
    )
    .await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn doctype_is_restricted_xml() -> Result<()> {
    let server = start().await?;
    prolog_fails(
        &server,
        b"<?xml version='1.0'?><!DOCTYPE stream:stream>",
        "restricted-xml",
    )
    .await?;
    bound_input_fails(&server, b"<!DOCTYPE message>", "restricted-xml").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn entity_declaration_is_restricted_xml() -> Result<()> {
    let server = start().await?;
    // The "billion laughs" shape: never expanded, refused at the declaration.
    prolog_fails(
        &server,
        b"<?xml version='1.0'?><!DOCTYPE s [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;'>]>",
        "restricted-xml",
    )
    .await?;
    bound_input_fails(&server, b"<!ENTITY a 'b'>", "restricted-xml").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn undefined_entity_reference_is_refused() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut c = mallory(&server).await?;
    c.send_str(&msg("hello &xxe; world")).await?;
    let closed = c.expect_closed().await?;
    assert!(
        matches!(&closed, Closed::StreamError(c) if c == "not-well-formed" || c == "restricted-xml"),
        "{closed:?}"
    );
    bob.expect_none(|e| e.name() == "message").await?;
    // The predefined entities and character references are fine.
    let mut alice = server.online("alice", "wonderland", "desk").await?;
    alice
        .send_str(&msg("&lt;&gt;&amp;&apos;&quot;&#x41;&#66;"))
        .await?;
    bob.expect_body("<>&'\"AB").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn processing_instruction_is_restricted_xml() -> Result<()> {
    let server = start().await?;
    bound_input_fails(&server, b"<?php system('id'); ?>", "restricted-xml").await?;
    bound_input_fails(&server, msg("<?pi inside?>").as_bytes(), "restricted-xml").await?;
    // After the header, before anything else.
    let mut c = Client::connect(server.addr()).await?;
    c.send_str("<?xml-stylesheet href='x'?>").await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("restricted-xml".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn comment_is_restricted_xml() -> Result<()> {
    let server = start().await?;
    bound_input_fails(&server, b"<!-- hello -->", "restricted-xml").await?;
    bound_input_fails(
        &server,
        msg("a<!-- inside -->b").as_bytes(),
        "restricted-xml",
    )
    .await?;
    prolog_fails(
        &server,
        b"<?xml version='1.0'?><!-- before the header -->",
        "restricted-xml",
    )
    .await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn invalid_utf8_is_not_well_formed() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut bytes = format!("<message to='bob@{DOMAIN}' type='chat'><body>").into_bytes();
    bytes.extend_from_slice(b"bad \xff\xfe \xc3\x28 bytes");
    bytes.extend_from_slice(b"</body></message>");
    bound_input_fails(&server, &bytes, "not-well-formed").await?;
    // An overlong encoding of '<' and a lone surrogate.
    bound_input_fails(
        &server,
        b"<message><body>\xc0\xbc</body></message>",
        "not-well-formed",
    )
    .await?;
    bound_input_fails(
        &server,
        b"<message><body>\xed\xa0\x80</body></message>",
        "not-well-formed",
    )
    .await?;
    bob.expect_none(|e| e.name() == "message").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn xml_illegal_characters_are_not_well_formed() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bound_input_fails(&server, msg("a\u{1}b").as_bytes(), "not-well-formed").await?;
    bound_input_fails(&server, msg("a&#x1;b").as_bytes(), "not-well-formed").await?;
    bound_input_fails(&server, msg("a&#0;b").as_bytes(), "not-well-formed").await?;
    bound_input_fails(&server, msg("a&#xFFFE;b").as_bytes(), "not-well-formed").await?;
    // In an attribute value.
    bound_input_fails(
        &server,
        format!("<message to='bob@{DOMAIN}' id='a\u{1b}b'/>").as_bytes(),
        "not-well-formed",
    )
    .await?;
    bob.expect_none(|e| e.name() == "message").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn stanza_over_size_limit_is_policy_violation() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    // Default limit 256 KiB; the whole stanza in one write.
    let body = "x".repeat(300 * 1024);
    bound_input_fails(&server, msg(&body).as_bytes(), "policy-violation").await?;
    bob.expect_none(|e| e.name() == "message").await?;
    // Just under the limit is fine.
    let mut alice = server.online("alice", "wonderland", "desk").await?;
    let body = "y".repeat(200 * 1024);
    alice.chat(&format!("bob@{DOMAIN}"), &body).await?;
    bob.expect_body(&body).await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn endless_element_is_cut_off_not_buffered() -> Result<()> {
    let server = start().await?;
    let mut c = mallory(&server).await?;
    c.send_str(&format!("<message to='bob@{DOMAIN}'><body>"))
        .await?;
    let chunk = "z".repeat(32 * 1024);
    let mut sent = 0usize;
    // Up to 4 MiB: far past the 256 KiB limit. The server must close long before.
    while sent < 4 * 1024 * 1024 {
        if c.send_str(&chunk).await.is_err() {
            break; // the server closed the connection: what we wanted
        }
        sent += chunk.len();
    }
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    // And an element that never ends in the negotiation phase (an endless header attribute).
    let mut c = Client::connect_raw(server.addr()).await?;
    let _ = c
        .send_str(&format!(
            "<stream:stream xmlns:stream='{}' to='",
            ns::STREAM
        ))
        .await;
    let mut sent = 0usize;
    while sent < 4 * 1024 * 1024 {
        if c.send_str(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let closed = c.expect_closed().await?;
    assert_eq!(closed, Closed::StreamError("policy-violation".into()));
    assert_serving(&server).await
}

#[tokio::test]
async fn too_deep_nesting_is_policy_violation() -> Result<()> {
    let server = start().await?;
    let depth = 200;
    let mut xml = format!("<message to='bob@{DOMAIN}'>");
    for _ in 0..depth {
        xml.push_str("<x xmlns='urn:deep'>");
    }
    for _ in 0..depth {
        xml.push_str("</x>");
    }
    xml.push_str("</message>");
    bound_input_fails(&server, xml.as_bytes(), "policy-violation").await?;
    // Deep but unfinished: refused as soon as the limit is passed, not at the end.
    let mut c = mallory(&server).await?;
    let mut open = format!("<message to='bob@{DOMAIN}'>");
    for _ in 0..depth {
        open.push_str("<x>");
    }
    c.send_str(&open).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn from_of_another_user_is_invalid_from() -> Result<()> {
    let server = start().await?;
    let mut alice = server.online("alice", "wonderland", "desk").await?;
    let mut m = chat(&format!("alice@{DOMAIN}"), "i am bob");
    m.set_attr("from", format!("bob@{DOMAIN}/phone"));
    bound_input_fails(&server, m.to_xml(ns::CLIENT).as_bytes(), "invalid-from").await?;
    let mut m = chat(&format!("alice@{DOMAIN}"), "i am the server");
    m.set_attr("from", DOMAIN);
    bound_input_fails(&server, m.to_xml(ns::CLIENT).as_bytes(), "invalid-from").await?;
    // Another resource of one's own account is not one's own full JID either.
    let mut m = chat(&format!("alice@{DOMAIN}"), "other resource");
    m.set_attr("from", format!("mallory@{DOMAIN}/elsewhere"));
    bound_input_fails(&server, m.to_xml(ns::CLIENT).as_bytes(), "invalid-from").await?;
    alice.expect_none(|e| e.name() == "message").await?;
    // The own full JID and bare JID are accepted, and `from` is stamped with the full JID.
    let mut c = mallory(&server).await?;
    for from in [c.jid.clone(), c.bare()] {
        let mut m = chat(&format!("alice@{DOMAIN}"), &format!("from {from}"));
        m.set_attr("from", from.clone());
        c.send(&m).await?;
        let got = alice.expect_body(&format!("from {from}")).await?;
        assert_eq!(got.attr("from"), Some(c.jid.as_str()));
    }
    assert_serving(&server).await
}

#[tokio::test]
async fn unknown_top_level_element_is_unsupported_stanza_type() -> Result<()> {
    let server = start().await?;
    bound_input_fails(
        &server,
        b"<foo xmlns='urn:example:foo'/>",
        "unsupported-stanza-type",
    )
    .await?;
    // A stanza name in a namespace other than jabber:client is not a stanza either.
    bound_input_fails(
        &server,
        format!("<message xmlns='urn:example:other' to='bob@{DOMAIN}'/>").as_bytes(),
        "unsupported-stanza-type",
    )
    .await?;
    // A SASL element after the session is bound.
    bound_input_fails(
        &server,
        format!("<auth xmlns='{}' mechanism='PLAIN'>=</auth>", ns::SASL).as_bytes(),
        "unsupported-stanza-type",
    )
    .await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn garbage_before_header_is_refused_after_our_header() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_raw(b"GET / HTTP/1.1\r\nHost: confab.test\r\n\r\n")
        .await?;
    // RFC 6120 §4.9.1.2: our header first, then the error.
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("not-well-formed".into())
    );
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        .await?; // a TLS ClientHello on the STARTTLS port
    let closed = c.expect_closed().await?;
    assert_eq!(closed, Closed::StreamError("not-well-formed".into()));
    prolog_fails(&server, b"junk", "not-well-formed").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn bad_input_in_a_bound_session_leaves_other_sessions_alone() -> Result<()> {
    let server = start().await?;
    let mut alice = server.online("alice", "wonderland", "desk").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut m = server.online("mallory", "evil", "lab").await?;
    let alice_jid = alice.jid.clone();
    // A good stanza and a broken one in the same write: the first is delivered, then
    // the stream ends.
    m.send_str(&format!(
        "<message to='{alice_jid}' type='chat'><body>before</body></message><message><body>\u{1}</body></message>"
    ))
    .await?;
    assert_eq!(
        m.expect_closed().await?,
        Closed::StreamError("not-well-formed".into())
    );
    alice.expect_body("before").await?;
    // Mallory is gone from alice's and bob's view, and they still chat.
    alice.chat(&format!("bob@{DOMAIN}"), "still fine?").await?;
    bob.expect_body("still fine?").await?;
    bob.chat(&alice_jid, "yes").await?;
    alice.expect_body("yes").await?;
    let reply = alice
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", format!("mallory@{DOMAIN}/lab"))
            .with_child(Element::new("ping", ns::PING)))
        .await?;
    assert_eq!(reply.attr("type"), Some("error"), "{reply}");
    assert_serving(&server).await
}
