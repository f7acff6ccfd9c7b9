//! The client stream layer end to end (RFC 6120 §4–§7): STARTTLS, direct TLS, the
//! features offered at each step, the order of negotiation, resource binding, stream
//! errors on bad headers, timeouts, clean and forced closes.

use anyhow::{bail, Context, Result};
use confab_protocol::sasl::{encode_payload, ScramHash};
use confab_protocol::{ns, Element, StreamEvent};
use confab_tests::*;
use tokio::net::TcpStream;

const SASL_CB: &str = "urn:xsf:sasl-cb:0";

/// A server with the users the tests of this file use.
async fn start() -> Result<TestServer> {
    start_with(|_| {}).await
}

async fn start_with(adjust: impl FnOnce(&mut confab::Config)) -> Result<TestServer> {
    let server = TestServer::start_with(adjust).await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("probe", "probing").await?;
    Ok(server)
}

fn header(attrs: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns:stream='{}' {attrs}>",
        ns::STREAM
    )
}

fn names(e: &Element) -> Vec<(String, String)> {
    e.children()
        .map(|c| (c.name().to_string(), c.ns().to_string()))
        .collect()
}

// ---- features and TLS ------------------------------------------------------------------

#[tokio::test]
async fn starttls_required_before_mechanisms_then_full_set_after_tls() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect(server.addr()).await?;
    let f = c.features.clone().context("features")?;
    let starttls = f.get_child("starttls", ns::TLS).context("no <starttls/>")?;
    assert!(starttls.get_child("required", ns::TLS).is_some(), "{f}");
    assert!(
        f.get_child("mechanisms", ns::SASL).is_none(),
        "mechanisms before TLS: {f}"
    );
    assert!(c.mechanisms().is_empty());

    c.starttls(&server.pki).await?;
    let f = c.features.clone().context("features")?;
    assert!(
        f.get_child("starttls", ns::TLS).is_none(),
        "starttls offered again: {f}"
    );
    let mechs = c.mechanisms();
    for m in [
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "SCRAM-SHA-512",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-512-PLUS",
        "PLAIN",
    ] {
        assert!(mechs.iter().any(|x| x == m), "{m} missing from {mechs:?}");
    }
    // XEP-0440: the channel-binding types we can serve.
    let cb = f
        .get_child("sasl-channel-binding", SASL_CB)
        .context("no sasl-channel-binding")?;
    let types: Vec<_> = cb
        .children()
        .filter(|c| c.name() == "channel-binding")
        .filter_map(|c| c.attr("type").map(str::to_string))
        .collect();
    assert!(types.iter().any(|t| t == "tls-exporter"), "{types:?}");
    assert!(
        types.iter().any(|t| t == "tls-server-end-point"),
        "{types:?}"
    );

    c.authenticate(ScramHash::Sha256, true, "alice", "wonderland")
        .await?;
    c.bind(Some("laptop")).await?;
    c.ping().await?;
    assert_eq!(c.close().await?, Closed::Clean);
    Ok(())
}

#[tokio::test]
async fn direct_tls_port_offers_mechanisms_without_starttls() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect_tls(server.tls_addr(), &server.pki).await?;
    let f = c.features.clone().context("features")?;
    assert!(f.get_child("starttls", ns::TLS).is_none(), "{f}");
    let mechs = c.mechanisms();
    assert!(mechs.iter().any(|m| m == "SCRAM-SHA-512-PLUS"), "{mechs:?}");
    assert!(mechs.iter().any(|m| m == "PLAIN"), "{mechs:?}");
    c.authenticate(ScramHash::Sha512, true, "alice", "wonderland")
        .await?;
    let jid = c.bind(Some("direct")).await?;
    assert_eq!(jid, format!("alice@{DOMAIN}/direct"));
    c.ping().await?;
    assert_eq!(c.close().await?, Closed::Clean);
    Ok(())
}

#[tokio::test]
async fn without_required_encryption_scram_works_in_plaintext_but_never_plain_or_plus() -> Result<()>
{
    let server = start_with(|c| c.c2s.require_encryption = false).await?;
    let mut c = Client::connect(server.addr()).await?;
    let f = c.features.clone().context("features")?;
    let starttls = f
        .get_child("starttls", ns::TLS)
        .context("starttls still offered")?;
    assert!(starttls.get_child("required", ns::TLS).is_none(), "{f}");
    let mechs = c.mechanisms();
    assert!(mechs.iter().any(|m| m == "SCRAM-SHA-256"), "{mechs:?}");
    assert!(
        !mechs.iter().any(|m| m == "PLAIN"),
        "PLAIN in plaintext: {mechs:?}"
    );
    assert!(
        !mechs.iter().any(|m| m.ends_with("-PLUS")),
        "PLUS without TLS: {mechs:?}"
    );
    assert!(
        f.get_child("sasl-channel-binding", SASL_CB).is_none(),
        "{f}"
    );

    // PLAIN and PLUS are refused even when asked for.
    let err = c
        .authenticate_plain("alice", "wonderland")
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<SaslFailure>().map(|f| f.0.as_str()),
        Some("invalid-mechanism")
    );
    c.send(
        &Element::new("auth", ns::SASL)
            .with_attr("mechanism", "SCRAM-SHA-256-PLUS")
            .with_text(encode_payload(b"p=tls-exporter,,n=alice,r=abcdefgh")),
    )
    .await?;
    let fail = c.next().await?;
    assert!(fail.is("failure", ns::SASL), "{fail}");
    assert!(
        fail.get_child("invalid-mechanism", ns::SASL).is_some(),
        "{fail}"
    );

    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.bind(Some("plain-tcp")).await?;
    c.ping().await?;
    assert_eq!(c.close().await?, Closed::Clean);
    Ok(())
}

#[tokio::test]
async fn auth_before_required_tls_fails_with_encryption_required() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect(server.addr()).await?;
    let err = c
        .authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<SaslFailure>().map(|f| f.0.as_str()),
        Some("encryption-required"),
        "{err}"
    );
    // The stream goes on: TLS, then a login, works.
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.bind(None).await?;
    c.ping().await?;
    Ok(())
}

// ---- order of negotiation ------------------------------------------------------------

#[tokio::test]
async fn stanza_before_auth_is_not_authorized() -> Result<()> {
    let server = start().await?;
    // Before TLS.
    let mut c = Client::connect(server.addr()).await?;
    c.send(&chat(&format!("bob@{DOMAIN}"), "too early")).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("not-authorized".into())
    );
    // After TLS, before SASL.
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    c.send(
        &Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "early")
            .with_child(Element::new("query", ns::ROSTER)),
    )
    .await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("not-authorized".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn stanza_after_auth_before_bind_is_not_authorized() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.send(&chat(&format!("bob@{DOMAIN}"), "unbound")).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("not-authorized".into())
    );
    bob.expect_none(|e| e.name() == "message").await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn features_after_auth_offer_bind_session_rosterver_preapproval() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    let f = c.features.clone().context("features")?;
    let got = names(&f);
    assert!(f.get_child("bind", ns::BIND).is_some(), "{got:?}");
    let session = f
        .get_child("session", ns::SESSION)
        .context("no session feature")?;
    assert!(session.get_child("optional", ns::SESSION).is_some(), "{f}");
    assert!(f.get_child("ver", ns::ROSTERVER).is_some(), "{got:?}");
    assert!(f.get_child("sub", ns::PRE_APPROVAL).is_some(), "{got:?}");
    // Nothing of the earlier steps is offered again.
    assert!(f.get_child("mechanisms", ns::SASL).is_none(), "{f}");
    assert!(f.get_child("starttls", ns::TLS).is_none(), "{f}");
    Ok(())
}

// ---- resource binding ------------------------------------------------------------------

#[tokio::test]
async fn bind_with_client_resource_and_server_chosen_resource() -> Result<()> {
    let server = start().await?;
    let mut a = server.login("alice", "wonderland", "balcony").await?;
    assert_eq!(a.jid, format!("alice@{DOMAIN}/balcony"));

    let mut b = Client::connect(server.addr()).await?;
    b.starttls(&server.pki).await?;
    b.authenticate(ScramHash::Sha1, false, "alice", "wonderland")
        .await?;
    let jid = b.bind(None).await?;
    let resource = jid
        .strip_prefix(&format!("alice@{DOMAIN}/"))
        .with_context(|| format!("bound {jid}"))?;
    assert!(!resource.is_empty());
    assert_ne!(resource, "balcony");

    // Both sessions are usable and addressable: a message to one full JID reaches it.
    a.chat(&jid, "to the other resource").await?;
    let m = b.expect_body("to the other resource").await?;
    assert_eq!(m.attr("from"), Some(a.jid.as_str()));
    a.ping().await?;
    Ok(())
}

#[tokio::test]
async fn bind_with_invalid_resource_is_bad_request_and_can_retry() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    // RFC 7622 §3.4: a resourcepart is at most 1023 bytes.
    let long = "r".repeat(2000);
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_child(
                Element::new("bind", ns::BIND)
                    .with_child(Element::new("resource", ns::BIND).with_text(long)),
            ))
        .await?;
    assert_eq!(reply.attr("type"), Some("error"), "{reply}");
    assert_eq!(
        error_condition(&reply).as_deref(),
        Some("bad-request"),
        "{reply}"
    );
    // A bind iq of type get is a bad request too.
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_child(Element::new("bind", ns::BIND)))
        .await?;
    assert_eq!(
        error_condition(&reply).as_deref(),
        Some("bad-request"),
        "{reply}"
    );
    // The stream stays in the bind step: a valid bind works.
    let jid = c.bind(Some("second-try")).await?;
    assert_eq!(jid, format!("alice@{DOMAIN}/second-try"));
    c.ping().await?;
    Ok(())
}

#[tokio::test]
async fn resource_conflict_closes_older_session_and_new_one_works() -> Result<()> {
    let server = start().await?;
    let mut old = server.online("alice", "wonderland", "desk").await?;
    let mut new = server.login("alice", "wonderland", "desk").await?;
    assert_eq!(new.jid, format!("alice@{DOMAIN}/desk"));
    assert_eq!(
        old.expect_closed().await?,
        Closed::StreamError("conflict".into())
    );
    new.ping().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    bob.chat(&format!("alice@{DOMAIN}/desk"), "reaches the new one")
        .await?;
    new.expect_body("reaches the new one").await?;
    Ok(())
}

/// The replaced session still owes its unavailable presence (RFC 6121 §4.6): a contact
/// that got directed presence from it is told it went away.
#[tokio::test]
async fn replaced_session_sends_its_unavailable_presence() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let mut old = server.online("alice", "wonderland", "desk").await?;
    let bob_jid = bob.jid.clone();
    old.send(&presence(None, Some(&bob_jid))).await?;
    let desk = format!("alice@{DOMAIN}/desk");
    bob.expect(|e| {
        e.name() == "presence" && e.attr("from") == Some(desk.as_str()) && e.attr("type").is_none()
    })
    .await?;
    let _new = server.login("alice", "wonderland", "desk").await?;
    assert_eq!(
        old.expect_closed().await?,
        Closed::StreamError("conflict".into())
    );
    bob.expect(|e| {
        e.name() == "presence"
            && e.attr("from") == Some(desk.as_str())
            && e.attr("type") == Some("unavailable")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn legacy_session_iq_returns_result() -> Result<()> {
    let server = start().await?;
    let mut c = server.login("alice", "wonderland", "old-client").await?;
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_child(Element::new("session", ns::SESSION)))
        .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    c.ping().await?;
    Ok(())
}

/// RFC 3921 §3 clients address the session request to the server's domain.
#[tokio::test]
async fn legacy_session_iq_to_the_domain_returns_result() -> Result<()> {
    let server = start().await?;
    let mut c = server.login("alice", "wonderland", "old-client").await?;
    let reply = c
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("to", DOMAIN)
            .with_child(Element::new("session", ns::SESSION)))
        .await?;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    c.ping().await?;
    Ok(())
}

// ---- keepalives and closing ------------------------------------------------------------

#[tokio::test]
async fn whitespace_keepalives_are_accepted_everywhere() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect(server.addr()).await?;
    c.send_str(" \n ").await?;
    c.starttls(&server.pki).await?;
    c.send_str("\n").await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.send_str(" ").await?;
    c.bind(Some("ws")).await?;
    for _ in 0..3 {
        c.send_str(" \r\n\t ").await?;
        c.ping().await?;
    }
    // Whitespace glued to a stanza in one write.
    c.send_str(&format!(
        "   <iq type='get' id='glued' to='{DOMAIN}'><ping xmlns='{}'/></iq>   ",
        ns::PING
    ))
    .await?;
    let r = c.expect(|e| e.attr("id") == Some("glued")).await?;
    assert_eq!(r.attr("type"), Some("result"));
    assert_eq!(c.close().await?, Closed::Clean);
    Ok(())
}

#[tokio::test]
async fn client_close_is_answered_with_close_at_every_step() -> Result<()> {
    let server = start().await?;
    // Before TLS.
    let c = Client::connect(server.addr()).await?;
    assert_eq!(c.close().await?, Closed::Clean);
    // After auth, before bind.
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    assert_eq!(c.close().await?, Closed::Clean);
    // A bound session; it is gone from the server afterwards.
    let c = server.online("alice", "wonderland", "closing").await?;
    assert_eq!(c.close().await?, Closed::Clean);
    let mut bob = server.online("bob", "builder", "phone").await?;
    let reply = bob
        .iq(Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("to", format!("alice@{DOMAIN}/closing"))
            .with_child(Element::new("ping", ns::PING)))
        .await?;
    assert_eq!(
        reply.attr("type"),
        Some("error"),
        "closed session still routed: {reply}"
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn graceful_shutdown_sends_system_shutdown_to_every_stream() -> Result<()> {
    let mut server = start().await?;
    let mut bound = server.online("alice", "wonderland", "laptop").await?;
    // A connection still negotiating is told too.
    let mut negotiating = Client::connect(server.addr()).await?;
    negotiating.starttls(&server.pki).await?;
    let mut fresh = Client::connect(server.addr()).await?;
    server.restart().await?;
    assert_eq!(
        bound.expect_closed().await?,
        Closed::StreamError("system-shutdown".into())
    );
    assert_eq!(
        negotiating.expect_closed().await?,
        Closed::StreamError("system-shutdown".into())
    );
    assert_eq!(
        fresh.expect_closed().await?,
        Closed::StreamError("system-shutdown".into())
    );
    // The restarted server serves again (on new ports).
    assert_serving(&server).await
}

// ---- bad stream headers ----------------------------------------------------------------

#[tokio::test]
async fn header_to_unknown_host_is_host_unknown_after_our_header() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str(&header(
        "xmlns='jabber:client' to='elsewhere.example' version='1.0'",
    ))
    .await?;
    let h = c.read_header().await?;
    assert_eq!(h.default_ns, ns::CLIENT);
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("host-unknown".into())
    );
    // A header without any `to` too.
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str(&header("xmlns='jabber:client' version='1.0'"))
        .await?;
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("host-unknown".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn header_without_version_is_unsupported_version() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str(&header(&format!("xmlns='jabber:client' to='{DOMAIN}'")))
        .await?;
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("unsupported-version".into())
    );
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str(&header(&format!(
        "xmlns='jabber:client' to='{DOMAIN}' version='2.0'"
    )))
    .await?;
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("unsupported-version".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn header_with_wrong_default_namespace_is_invalid_namespace() -> Result<()> {
    let server = start().await?;
    for default_ns in ["jabber:server", "urn:example:wrong"] {
        let mut c = Client::connect_raw(server.addr()).await?;
        c.send_str(&header(&format!(
            "xmlns='{default_ns}' to='{DOMAIN}' version='1.0'"
        )))
        .await?;
        c.read_header().await?;
        assert_eq!(
            c.expect_closed().await?,
            Closed::StreamError("invalid-namespace".into()),
            "{default_ns}"
        );
    }
    assert_serving(&server).await
}

#[tokio::test]
async fn header_with_wrong_stream_namespace_is_invalid_namespace() -> Result<()> {
    let server = start().await?;
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str(&format!(
        "<?xml version='1.0'?><stream:stream xmlns:stream='http://example.com/streams' xmlns='jabber:client' to='{DOMAIN}' version='1.0'>"
    ))
    .await?;
    // Our header still comes first (RFC 6120 §4.9.1.2), then the error.
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("invalid-namespace".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn idle_connection_hits_login_timeout() -> Result<()> {
    let server = start_with(|c| c.limits.login_timeout_secs = 2).await?;
    // Idle after the features.
    let mut c = Client::connect(server.addr()).await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("connection-timeout".into())
    );
    // Idle without even a header: the header comes first, then the error.
    let mut c = Client::connect_raw(server.addr()).await?;
    c.read_header().await?;
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("connection-timeout".into())
    );
    // A login that is quick enough is not affected, and the session outlives the timeout.
    let mut a = server.login("alice", "wonderland", "quick").await?;
    let mut b = server.login("bob", "builder", "quick").await?;
    // Wait for an event that happens after the login timeout has passed: an idle
    // third connection being timed out.
    let mut idle = Client::connect(server.addr()).await?;
    assert_eq!(
        idle.expect_closed().await?,
        Closed::StreamError("connection-timeout".into())
    );
    a.ping().await?;
    a.chat(&b.jid.clone(), "still here").await?;
    b.expect_body("still here").await?;
    Ok(())
}

// ---- STARTTLS command injection (CVE-2011-0411 class) ------------------------------------

#[tokio::test]
async fn bytes_pipelined_after_starttls_are_discarded() -> Result<()> {
    let server = start().await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(server.addr())).await??;
    let mut raw = RawStream::new(tcp);
    let open = header(&format!(
        "xmlns='jabber:client' to='{DOMAIN}' version='1.0'"
    ));
    raw.send_str(&open).await?;
    assert!(matches!(raw.event().await?, StreamEvent::Open(_)));
    raw.element().await?; // features
                          // In the same write as <starttls/>: a whole new stream with a PLAIN login (valid
                          // credentials) and a message. Processed after the handshake, they would log the
                          // stream in on the attacker's behalf.
    let injected = format!(
        "<starttls xmlns='{}'/>{open}<auth xmlns='{}' mechanism='PLAIN'>{}</auth><message to='bob@{DOMAIN}'><body>injected</body></message>",
        ns::TLS,
        ns::SASL,
        encode_payload(b"\0alice\0wonderland"),
    );
    raw.send_str(&injected).await?;
    let proceed = raw.element().await?;
    assert!(proceed.is("proceed", ns::TLS), "{proceed}");
    let connector = tokio_rustls::TlsConnector::from(server.pki.client_config());
    let name = rustls_pki_types::ServerName::try_from(DOMAIN.to_string())?;
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, raw.io)).await??;
    let mut raw = RawStream::new(tls);
    raw.send_str(&open).await?;
    assert!(matches!(raw.event().await?, StreamEvent::Open(_)));
    let features = raw.element().await?;
    assert!(features.is("features", ns::STREAM), "{features}");
    // Still unauthenticated: the injected <auth/> was never processed.
    assert!(
        features.get_child("mechanisms", ns::SASL).is_some(),
        "injected auth was processed: {features}"
    );
    raw.send_str("</stream:stream>").await?;
    match raw.event().await? {
        StreamEvent::Close => {}
        other => bail!("expected the server's close, got {other:?}"),
    }
    bob.expect_none(|e| e.name() == "message").await?;
    assert_serving(&server).await
}

/// A client that stops reading while others send to it is disconnected once its queue
/// is full (limits.session_queue), instead of the server buffering without end; the
/// senders keep being served.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected() -> Result<()> {
    let server = start_with(|c| c.limits.session_queue = 4).await?;
    let mut slow = server.online("alice", "wonderland", "slow").await?;
    let mut fast = server.online("bob", "builder", "fast").await?;
    let big = "x".repeat(100 * 1024);
    // 64 messages of 100 KiB: far more than the socket buffers and the queue hold.
    for i in 0..64 {
        fast.send(&chat(&slow.jid.clone(), &format!("{i}{big}")))
            .await?;
    }
    // The sender is still served (its own stanzas were all handled in order).
    fast.ping().await?;
    // The slow client finds its stream cut off.
    let closed = slow.expect_closed().await?;
    assert!(
        matches!(closed, Closed::Eof | Closed::StreamError(_)),
        "{closed:?}"
    );
    assert_serving(&server).await
}

/// limits.max_connections holds: the connection over the limit is closed at once, and a
/// place freed is a place to connect again.
#[tokio::test]
async fn connections_over_the_limit_are_refused() -> Result<()> {
    let server = start_with(|c| c.limits.max_connections = 2).await?;
    let first = Client::connect(server.addr()).await?;
    let _second = Client::connect(server.addr()).await?;
    let mut third = Client::connect_raw(server.addr()).await?;
    assert_eq!(third.expect_closed().await?, Closed::Eof);
    drop(first);
    // The freed place is taken by the next connection (the server notices the close
    // asynchronously, so try until it has).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match Client::connect(server.addr()).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
