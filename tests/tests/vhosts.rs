//! Several domains on one server: each with its own certificate (chosen by SNI, loaded
//! from a Let's Encrypt style full chain), its own accounts, and local routing between them.

use confab_protocol::sasl::ScramHash;
use confab_tests::*;

const OTHER: &str = "other.test";

async fn login_at(
    server: &TestServer,
    domain: &str,
    user: &str,
    pw: &str,
) -> anyhow::Result<Client> {
    let mut c = Client::connect_to(server.addr(), domain).await?;
    c.starttls(&server.pki).await?;
    c.authenticate(ScramHash::Sha256, false, user, pw).await?;
    c.bind(Some("desk")).await?;
    c.roster_get().await?;
    c.send(&presence(None, None)).await?;
    let me = c.jid.clone();
    c.expect(|e| e.name() == "presence" && e.attr("from") == Some(me.as_str()))
        .await?;
    Ok(c)
}

#[tokio::test]
async fn users_of_two_domains_chat_on_one_server() -> anyhow::Result<()> {
    let server = TestServer::start_domains(&[DOMAIN, OTHER], |_| {}).await?;
    server
        .add_account(&format!("alice@{DOMAIN}"), "pw-a")
        .await?;
    server.add_account(&format!("bob@{OTHER}"), "pw-b").await?;
    let mut alice = login_at(&server, DOMAIN, "alice", "pw-a").await?;
    let mut bob = login_at(&server, OTHER, "bob", "pw-b").await?;
    assert_eq!(bob.jid, format!("bob@{OTHER}/desk"));

    // Each stream got the certificate of the domain it asked for (SNI), and the full
    // chain (leaf + CA) was loaded.
    let alice_chain = alice.peer_certificates();
    let bob_chain = bob.peer_certificates();
    assert_eq!(alice_chain.len(), 2);
    assert_eq!(bob_chain.len(), 2);
    assert_ne!(alice_chain[0], bob_chain[0]);

    alice
        .chat(&format!("bob@{OTHER}"), "across domains")
        .await?;
    let m = bob.expect_body("across domains").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    Ok(())
}

#[tokio::test]
async fn an_account_belongs_to_its_domain() -> anyhow::Result<()> {
    let server = TestServer::start_domains(&[DOMAIN, OTHER], |_| {}).await?;
    server
        .add_account(&format!("carol@{DOMAIN}"), "pw-c")
        .await?;
    // carol@confab.test cannot log in on other.test with the same name and password.
    let mut c = Client::connect_to(server.addr(), OTHER).await?;
    c.starttls(&server.pki).await?;
    let err = c
        .authenticate(ScramHash::Sha256, false, "carol", "pw-c")
        .await
        .expect_err("login on the wrong domain must fail");
    let failure = err.downcast_ref::<SaslFailure>().map(|f| f.0.clone());
    assert_eq!(failure.as_deref(), Some("not-authorized"));
    Ok(())
}

#[tokio::test]
async fn a_domain_not_served_is_refused() -> anyhow::Result<()> {
    let server = TestServer::start_domains(&[DOMAIN, OTHER], |_| {}).await?;
    let mut c = Client::connect_raw(server.addr()).await?;
    c.send_str("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='elsewhere.test' version='1.0'>").await?;
    let header = c.read_header().await?;
    // RFC 6120 §4.9.1.2: the server answers with its own header, then the error.
    assert_eq!(header.default_ns, "jabber:client");
    assert_eq!(
        c.expect_closed().await?,
        Closed::StreamError("host-unknown".into())
    );
    Ok(())
}
