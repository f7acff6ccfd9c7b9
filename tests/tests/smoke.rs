//! The first path every user takes: log in, chat, log out.

use confab_tests::*;

#[tokio::test]
async fn two_users_log_in_and_chat() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    server.add_user("alice", "wonderland").await?;
    server.add_user("bob", "builder").await?;
    let mut alice = server.online("alice", "wonderland", "laptop").await?;
    let mut bob = server.online("bob", "builder", "phone").await?;
    alice.chat(&format!("bob@{DOMAIN}"), "hello bob").await?;
    let m = bob.expect_body("hello bob").await?;
    assert_eq!(m.attr("from"), Some(alice.jid.as_str()));
    assert_eq!(m.attr("to"), Some(format!("bob@{DOMAIN}").as_str()));
    assert_eq!(alice.close().await?, Closed::Clean);
    Ok(())
}
