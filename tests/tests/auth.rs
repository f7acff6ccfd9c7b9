//! SASL on client streams end to end (RFC 6120 §6): SCRAM with and without channel
//! binding, PLAIN over TLS, and every way an authentication can fail.

use anyhow::{bail, Context, Result};
use confab_protocol::sasl::{
    decode_payload, encode_payload, ClientBinding, ScramClient, ScramHash,
};
use confab_protocol::{ns, Element, StreamEvent};
use confab_tests::*;
use tokio::net::TcpStream;

async fn start() -> Result<TestServer> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    server.add_user("probe", "probing").await?;
    Ok(server)
}

/// A client on the STARTTLS port with TLS in place, not authenticated.
async fn tls_client(server: &TestServer) -> Result<Client> {
    let mut c = Client::connect(server.addr()).await?;
    c.starttls(&server.pki).await?;
    Ok(c)
}

fn failure_of(err: &anyhow::Error) -> Option<&str> {
    err.downcast_ref::<SaslFailure>().map(|f| f.0.as_str())
}

/// The condition of a SASL `<failure/>`, or an error for anything else.
fn condition(e: &Element) -> Result<String> {
    if !e.is("failure", ns::SASL) {
        bail!("expected a SASL failure, got {e}");
    }
    e.children()
        .find(|c| c.ns() == ns::SASL && c.name() != "text")
        .map(|c| c.name().to_string())
        .with_context(|| format!("no condition in {e}"))
}

fn auth(mechanism: &str, payload: &[u8]) -> Element {
    Element::new("auth", ns::SASL)
        .with_attr("mechanism", mechanism)
        .with_text(encode_payload(payload))
}

fn response(payload: &[u8]) -> Element {
    Element::new("response", ns::SASL).with_text(encode_payload(payload))
}

/// Sends a SCRAM client-first and returns the decoded server-first.
async fn scram_first(c: &mut Client, mechanism: &str, client_first: &[u8]) -> Result<Vec<u8>> {
    c.send(&auth(mechanism, client_first)).await?;
    let challenge = c.next().await?;
    if !challenge.is("challenge", ns::SASL) {
        bail!("expected a challenge, got {challenge}");
    }
    Ok(decode_payload(challenge.text().trim())?)
}

/// Attributes of a server-first-message: (salt, iterations).
fn salt_and_iterations(server_first: &[u8]) -> Result<(String, String)> {
    let text = std::str::from_utf8(server_first)?;
    let get = |k: &str| {
        text.split(',')
            .find_map(|p| p.strip_prefix(k))
            .map(str::to_string)
            .with_context(|| format!("no {k} in {text}"))
    };
    Ok((get("s=")?, get("i=")?))
}

// ---- success ---------------------------------------------------------------------------

#[tokio::test]
async fn scram_sha_1_256_512_succeed() -> Result<()> {
    let server = start().await?;
    for (i, hash) in ScramHash::ALL.into_iter().enumerate() {
        let mut c = tls_client(&server).await?;
        // The helper verifies the server signature (v=) of the server-final-message.
        c.authenticate(hash, false, "alice", "wonderland").await?;
        let jid = c.bind(Some(&format!("r{i}"))).await?;
        assert_eq!(jid, format!("alice@{DOMAIN}/r{i}"));
        c.ping().await?;
    }
    Ok(())
}

#[tokio::test]
async fn scram_plus_with_tls_exporter_succeeds_on_both_ports() -> Result<()> {
    let server = start().await?;
    for (i, hash) in ScramHash::ALL.into_iter().enumerate() {
        let mut c = tls_client(&server).await?;
        c.authenticate(hash, true, "alice", "wonderland").await?;
        c.bind(Some(&format!("starttls{i}"))).await?;
        c.ping().await?;
        let mut c = Client::connect_tls(server.tls_addr(), &server.pki).await?;
        c.authenticate(hash, true, "alice", "wonderland").await?;
        c.bind(Some(&format!("direct{i}"))).await?;
        c.ping().await?;
    }
    Ok(())
}

/// A SCRAM-PLUS client-final with exporter data from another connection is refused.
#[tokio::test]
async fn scram_plus_with_foreign_tls_exporter_fails() -> Result<()> {
    let server = start().await?;
    let other = tls_client(&server).await?;
    let foreign = other.tls_exporter().context("exporter")?;
    let mut c = tls_client(&server).await?;
    assert_ne!(Some(&foreign), c.tls_exporter().as_ref());
    let mut scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::TlsExporter(foreign),
    );
    let first = scram.client_first();
    let server_first = scram_first(&mut c, "SCRAM-SHA-256-PLUS", &first).await?;
    let last = scram.server_first(&server_first)?;
    c.send(&response(&last)).await?;
    assert_eq!(condition(&c.next().await?)?, "not-authorized");
    assert_serving(&server).await
}

// ---- tls-server-end-point (RFC 5929) -----------------------------------------------------

/// SHA-256, from the TLS library's own provider (the test CA signs with ECDSA P-256 /
/// SHA-256, so RFC 5929 §4.1 hashes the certificate with SHA-256).
fn sha256(data: &[u8]) -> Result<Vec<u8>> {
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        bail!("not a TLS 1.3 suite");
    };
    Ok(suite.common.hash_provider.hash(data).as_ref().to_vec())
}

async fn direct_tls(
    server: &TestServer,
) -> Result<(
    RawStream<tokio_rustls::client::TlsStream<TcpStream>>,
    Vec<u8>,
)> {
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(server.tls_addr())).await??;
    let connector = tokio_rustls::TlsConnector::from(server.pki.client_config());
    let name = rustls_pki_types::ServerName::try_from(DOMAIN.to_string())?;
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp)).await??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?
        .as_ref()
        .to_vec();
    Ok((RawStream::new(tls), sha256(&leaf)?))
}

async fn raw_scram(
    raw: &mut RawStream<tokio_rustls::client::TlsStream<TcpStream>>,
    mut scram: ScramClient,
    mechanism: &str,
) -> Result<Element> {
    raw.send(&auth(mechanism, &scram.client_first())).await?;
    let challenge = raw.element().await?;
    if !challenge.is("challenge", ns::SASL) {
        return Ok(challenge);
    }
    let last = scram.server_first(&decode_payload(challenge.text().trim())?)?;
    raw.send(&response(&last)).await?;
    let outcome = raw.element().await?;
    if outcome.is("success", ns::SASL) {
        scram.server_final(&decode_payload(outcome.text().trim())?)?;
    }
    Ok(outcome)
}

#[tokio::test]
async fn scram_plus_with_tls_server_end_point_succeeds() -> Result<()> {
    let server = start().await?;
    for hash in ScramHash::ALL {
        let (mut raw, end_point) = direct_tls(&server).await?;
        let features = raw.open().await?;
        let cb = features
            .get_child("sasl-channel-binding", "urn:xsf:sasl-cb:0")
            .context("no XEP-0440 element")?;
        assert!(
            cb.children()
                .any(|c| c.attr("type") == Some("tls-server-end-point")),
            "{cb}"
        );
        let scram = ScramClient::new(
            hash,
            "alice",
            "wonderland",
            ClientBinding::TlsServerEndPoint(end_point),
        );
        let outcome = raw_scram(&mut raw, scram, hash.mechanism(true)).await?;
        assert!(outcome.is("success", ns::SASL), "{outcome}");
        let features = raw.open().await?;
        assert!(features.get_child("bind", ns::BIND).is_some(), "{features}");
        raw.send_str("</stream:stream>").await?;
        assert!(matches!(raw.event().await?, StreamEvent::Close));
    }
    Ok(())
}

#[tokio::test]
async fn scram_plus_with_wrong_server_end_point_fails() -> Result<()> {
    let server = start().await?;
    let (mut raw, mut end_point) = direct_tls(&server).await?;
    raw.open().await?;
    end_point[0] ^= 1;
    let scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::TlsServerEndPoint(end_point),
    );
    let outcome = raw_scram(&mut raw, scram, "SCRAM-SHA-256-PLUS").await?;
    assert_eq!(condition(&outcome)?, "not-authorized");
    assert_serving(&server).await
}

// ---- failures ----------------------------------------------------------------------------

#[tokio::test]
async fn wrong_password_is_not_authorized() -> Result<()> {
    let server = start().await?;
    for hash in ScramHash::ALL {
        let mut c = tls_client(&server).await?;
        let err = c
            .authenticate(hash, false, "alice", "wrong")
            .await
            .unwrap_err();
        assert_eq!(failure_of(&err), Some("not-authorized"), "{err}");
        // The stream stays usable: the right password works next.
        c.authenticate(hash, false, "alice", "wonderland").await?;
        c.bind(None).await?;
        c.ping().await?;
    }
    assert_serving(&server).await
}

#[tokio::test]
async fn unknown_user_is_indistinguishable_from_wrong_password() -> Result<()> {
    let server = start().await?;
    let hash = ScramHash::Sha256;
    // The server-first-message and the final failure look the same for both.
    let probe = |user: &'static str| {
        let server = &server;
        async move {
            let mut c = tls_client(server).await?;
            let mut scram = ScramClient::new(hash, user, "wrong", ClientBinding::None);
            let sf = scram_first(&mut c, hash.mechanism(false), &scram.client_first()).await?;
            let last = scram.server_first(&sf)?;
            c.send(&response(&last)).await?;
            let outcome = c.next().await?;
            anyhow::Ok((salt_and_iterations(&sf)?, outcome))
        }
    };
    let ((salt_k, iter_k), fail_k) = probe("alice").await?;
    let ((salt_u, iter_u), fail_u) = probe("nobody").await?;
    let ((salt_u2, _), _) = probe("nobody").await?;
    assert_eq!(iter_k, iter_u, "iteration counts differ");
    assert_eq!(
        decode_payload(&salt_k)?.len(),
        decode_payload(&salt_u)?.len(),
        "salt lengths differ"
    );
    // A made-up salt that changed on every attempt would give the unknown user away.
    assert_eq!(salt_u, salt_u2, "the salt of an unknown user is not stable");
    assert_eq!(condition(&fail_k)?, "not-authorized");
    assert_eq!(fail_k, fail_u, "failures differ");

    // PLAIN too.
    let mut c = tls_client(&server).await?;
    let e1 = c.authenticate_plain("alice", "wrong").await.unwrap_err();
    let e2 = c.authenticate_plain("nobody", "wrong").await.unwrap_err();
    assert_eq!(failure_of(&e1), Some("not-authorized"));
    assert_eq!(failure_of(&e2), Some("not-authorized"));
    assert_serving(&server).await
}

#[tokio::test]
async fn plain_over_tls_succeeds_and_fails() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    let err = c.authenticate_plain("alice", "wrong").await.unwrap_err();
    assert_eq!(failure_of(&err), Some("not-authorized"), "{err}");
    c.authenticate_plain("alice", "wonderland").await?;
    c.bind(Some("plain")).await?;
    c.ping().await?;
    // On the direct TLS port too, and with the own JID as authzid.
    let mut c = Client::connect_tls(server.tls_addr(), &server.pki).await?;
    c.send(&auth(
        "PLAIN",
        format!("alice@{DOMAIN}\0alice\0wonderland").as_bytes(),
    ))
    .await?;
    let outcome = c.next().await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    assert_serving(&server).await
}

#[tokio::test]
async fn invalid_mechanism_is_refused() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    for mechanism in ["DIGEST-MD5", "scram-sha-256", "EXTERNAL", ""] {
        c.send(&auth(mechanism, b"n,,n=alice,r=abcdefgh")).await?;
        assert_eq!(
            condition(&c.next().await?)?,
            "invalid-mechanism",
            "{mechanism:?}"
        );
        // Two failures at most, so the stream stays open: start a fresh one.
        if mechanism == "scram-sha-256" || mechanism.is_empty() {
            c = tls_client(&server).await?;
        }
    }
    // No mechanism attribute at all.
    c.send(&Element::new("auth", ns::SASL).with_text("="))
        .await?;
    assert_eq!(condition(&c.next().await?)?, "invalid-mechanism");
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn authzid_for_another_user_is_invalid_authzid() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    let first = format!("n,a=bob@{DOMAIN},n=alice,r=abcdefghijkl");
    c.send(&auth("SCRAM-SHA-256", first.as_bytes())).await?;
    assert_eq!(condition(&c.next().await?)?, "invalid-authzid");
    c.send(&auth(
        "PLAIN",
        format!("bob@{DOMAIN}\0alice\0wonderland").as_bytes(),
    ))
    .await?;
    assert_eq!(condition(&c.next().await?)?, "invalid-authzid");
    let mut c = tls_client(&server).await?;
    // With bob's own password, still not as bob: an authzid is never a way in.
    c.send(&auth(
        "PLAIN",
        format!("alice@{DOMAIN}\0bob\0builder").as_bytes(),
    ))
    .await?;
    assert_eq!(condition(&c.next().await?)?, "invalid-authzid");
    assert_serving(&server).await
}

#[tokio::test]
async fn abort_is_answered_with_aborted_and_login_can_follow() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    // More aborts than the failure limit: an abort is not a failed attempt.
    for _ in 0..4 {
        let mut scram = ScramClient::new(
            ScramHash::Sha256,
            "alice",
            "wonderland",
            ClientBinding::None,
        );
        scram_first(&mut c, "SCRAM-SHA-256", &scram.client_first()).await?;
        c.send(&Element::new("abort", ns::SASL)).await?;
        assert_eq!(condition(&c.next().await?)?, "aborted");
    }
    // An abort instead of the initial response (empty <auth/>, RFC 6120 §6.4.2).
    c.send(&Element::new("auth", ns::SASL).with_attr("mechanism", "PLAIN"))
        .await?;
    let challenge = c.next().await?;
    assert!(challenge.is("challenge", ns::SASL), "{challenge}");
    c.send(&Element::new("abort", ns::SASL)).await?;
    assert_eq!(condition(&c.next().await?)?, "aborted");
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    c.bind(None).await?;
    c.ping().await?;
    Ok(())
}

#[tokio::test]
async fn malformed_base64_is_incorrect_encoding() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    c.send(
        &Element::new("auth", ns::SASL)
            .with_attr("mechanism", "SCRAM-SHA-256")
            .with_text("bi!ws=="),
    )
    .await?;
    assert_eq!(condition(&c.next().await?)?, "incorrect-encoding");
    // In the response, too.
    let mut c = tls_client(&server).await?;
    let mut scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::None,
    );
    scram_first(&mut c, "SCRAM-SHA-256", &scram.client_first()).await?;
    c.send(&Element::new("response", ns::SASL).with_text("not base64 at all"))
        .await?;
    assert_eq!(condition(&c.next().await?)?, "incorrect-encoding");
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    assert_serving(&server).await
}

#[tokio::test]
async fn three_failures_close_the_stream_with_policy_violation() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    for attempt in 1..=3 {
        let err = c
            .authenticate(ScramHash::Sha256, false, "alice", "wrong")
            .await
            .unwrap_err();
        assert_eq!(
            failure_of(&err),
            Some("not-authorized"),
            "attempt {attempt}: {err}"
        );
    }
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    // Wrong credentials of any mechanism count; refusals that tested no credential
    // (an unknown mechanism, bad base64) do not.
    let mut c = tls_client(&server).await?;
    c.send(&auth("NOPE", b"x")).await?;
    assert_eq!(condition(&c.next().await?)?, "invalid-mechanism");
    c.send(
        &Element::new("auth", ns::SASL)
            .with_attr("mechanism", "PLAIN")
            .with_text("%%%"),
    )
    .await?;
    assert_eq!(condition(&c.next().await?)?, "incorrect-encoding");
    for _ in 0..2 {
        let err = c.authenticate_plain("bob", "wrong").await.unwrap_err();
        assert_eq!(failure_of(&err), Some("not-authorized"));
    }
    let err = c
        .authenticate(ScramHash::Sha1, false, "bob", "wrong")
        .await
        .unwrap_err();
    assert_eq!(failure_of(&err), Some("not-authorized"));
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    assert_serving(&server).await
}

/// What slixmpp 1.8 sends over TLS 1.3: a -PLUS mechanism bound to `tls-unique`, which
/// TLS 1.3 does not define. The refusal says which types we support, and it is not a
/// failed login: more of them than the per-stream (3) and per-address (10 a minute)
/// limits allow leave the stream open and the right password still works on it.
#[tokio::test]
async fn an_unsupported_channel_binding_type_is_not_a_failed_login() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    for mechanism in [
        "SCRAM-SHA-512-PLUS",
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-1-PLUS",
    ]
    .iter()
    .cycle()
    .take(12)
    {
        c.send(&auth(
            mechanism,
            b"p=tls-unique,,n=alice,r=fyko+d2lbbFgONRv9qkxdawL",
        ))
        .await?;
        let failure = c.next().await?;
        assert_eq!(condition(&failure)?, "malformed-request", "{failure}");
        let text = failure
            .get_child("text", ns::SASL)
            .map(Element::text)
            .unwrap_or_default();
        assert!(
            text.contains("tls-exporter") && text.contains("tls-server-end-point"),
            "{failure}"
        );
    }
    // The flag "y" while we offer -PLUS is still refused (RFC 5802 §6), and says why.
    let mut scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::SupportedButNotUsed,
    );
    c.send(&auth("SCRAM-SHA-256", &scram.client_first()))
        .await?;
    let failure = c.next().await?;
    assert_eq!(condition(&failure)?, "not-authorized", "{failure}");
    assert!(
        failure
            .to_string()
            .contains("server-does-support-channel-binding"),
        "{failure}"
    );
    c.authenticate(ScramHash::Sha256, false, "alice", "wonderland")
        .await?;
    assert_serving(&server).await
}

/// Refusals that test no credential are bounded too: a client that keeps choosing what we
/// do not offer is closed after a few rounds of our whole list.
#[tokio::test]
async fn endless_refused_attempts_close_the_stream() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    for _ in 0..16 {
        c.send(&auth("NOPE", b"x")).await?;
        assert_eq!(condition(&c.next().await?)?, "invalid-mechanism");
    }
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("policy-violation".into())
    );
    assert_serving(&server).await
}

#[tokio::test]
async fn gs2_y_while_plus_was_offered_is_a_downgrade() -> Result<()> {
    let server = start().await?;
    let mut c = tls_client(&server).await?;
    assert!(c.mechanisms().iter().any(|m| m.ends_with("-PLUS")));
    let mut scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::SupportedButNotUsed,
    );
    let first = scram.client_first();
    assert!(first.starts_with(b"y,,"));
    c.send(&auth("SCRAM-SHA-256", &first)).await?;
    let reply = c.next().await?;
    if reply.is("challenge", ns::SASL) {
        // Refused at the latest with the final message.
        let last = scram.server_first(&decode_payload(reply.text().trim())?)?;
        c.send(&response(&last)).await?;
        assert_eq!(condition(&c.next().await?)?, "not-authorized");
    } else {
        assert_eq!(condition(&reply)?, "not-authorized");
    }
    assert_serving(&server).await
}

#[tokio::test]
async fn gs2_y_without_plus_offered_is_fine() -> Result<()> {
    // Plaintext with encryption not required: no -PLUS offered, so "y" is honest.
    let server = TestServer::start_with(|c| c.c2s.require_encryption = false).await?;
    server.add_user("alice", "wonderland").await?;
    let mut c = Client::connect(server.addr()).await?;
    let mut scram = ScramClient::new(
        ScramHash::Sha256,
        "alice",
        "wonderland",
        ClientBinding::SupportedButNotUsed,
    );
    let sf = scram_first(&mut c, "SCRAM-SHA-256", &scram.client_first()).await?;
    let last = scram.server_first(&sf)?;
    c.send(&response(&last)).await?;
    let outcome = c.next().await?;
    assert!(outcome.is("success", ns::SASL), "{outcome}");
    scram.server_final(&decode_payload(outcome.text().trim())?)?;
    Ok(())
}
