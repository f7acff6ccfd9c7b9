//! Finding XMPP servers through DNS (RFC 6120 §3.2, XEP-0368), against the test DNS server.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use confab_federation::dns::{DnsError, Endpoint, Resolver, Target};
use confab_tests::dns::TestDns;
use confab_tests::TIMEOUT;

async fn setup() -> (TestDns, Resolver) {
    let dns = TestDns::start().await.expect("test DNS starts");
    let resolver = Resolver::with_nameservers(&[dns.addr]).expect("resolver");
    (dns, resolver)
}

fn target(host: &str, port: u16, direct_tls: bool) -> Target {
    Target {
        host: host.into(),
        port,
        direct_tls,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn targets(resolver: &Resolver, domain: &str) -> Result<Vec<Target>, DnsError> {
    tokio::time::timeout(TIMEOUT, resolver.targets(domain, 5269))
        .await
        .expect("DNS answers in time")
}

async fn resolve(resolver: &Resolver, domain: &str, port: u16) -> Result<Vec<Endpoint>, DnsError> {
    tokio::time::timeout(TIMEOUT, resolver.resolve(domain, port))
        .await
        .expect("DNS answers in time")
}

#[tokio::test]
async fn both_services_are_merged_and_ordered() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpp-server._tcp.b.test", 10, 0, 5269, "plain.b.test");
    dns.add_srv("_xmpps-server._tcp.b.test", 10, 0, 5270, "tls.b.test");
    dns.add_srv("_xmpp-server._tcp.b.test", 5, 0, 15269, "best.b.test");
    dns.add_srv("_xmpps-server._tcp.b.test", 20, 0, 5270, "last.b.test.");
    // Repeated: the order depends only on priorities and the direct-TLS preference.
    for _ in 0..5 {
        assert_eq!(
            targets(&resolver, "b.test").await.unwrap(),
            vec![
                target("best.b.test", 15269, false),
                target("tls.b.test", 5270, true),
                target("plain.b.test", 5269, false),
                target("last.b.test", 5270, true),
            ]
        );
    }
}

#[tokio::test]
async fn only_starttls_service() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpp-server._tcp.b.test", 0, 0, 5999, "xmpp.b.test");
    assert_eq!(
        targets(&resolver, "b.test").await.unwrap(),
        vec![target("xmpp.b.test", 5999, false)]
    );
}

#[tokio::test]
async fn only_direct_tls_service() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpps-server._tcp.b.test", 0, 0, 5223, "xmpp.b.test");
    assert_eq!(
        targets(&resolver, "b.test").await.unwrap(),
        vec![target("xmpp.b.test", 5223, true)]
    );
}

#[tokio::test]
async fn dot_target_means_no_service() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpp-server._tcp.b.test", 0, 0, 0, ".");
    dns.add_srv("_xmpps-server._tcp.b.test", 0, 0, 0, ".");
    // An address for the domain must not be used once SRV said "no" (RFC 6120 §3.2.1).
    dns.add_a("b.test", ip("127.0.0.1"));
    let err = targets(&resolver, "b.test").await.unwrap_err();
    assert!(matches!(err, DnsError::NoService { .. }), "{err:?}");
    let err = resolve(&resolver, "b.test", 5269).await.unwrap_err();
    assert!(matches!(err, DnsError::NoService { .. }), "{err:?}");

    // Only `_xmpp-server` with ".", nothing for `_xmpps-server`: still not offered.
    dns.remove("_xmpps-server._tcp.b.test");
    let err = targets(&resolver, "b.test").await.unwrap_err();
    assert!(matches!(err, DnsError::NoService { .. }), "{err:?}");

    // "." for STARTTLS only: direct TLS is used.
    dns.add_srv("_xmpps-server._tcp.b.test", 0, 0, 5270, "tls.b.test");
    assert_eq!(
        targets(&resolver, "b.test").await.unwrap(),
        vec![target("tls.b.test", 5270, true)]
    );
}

#[tokio::test]
async fn no_srv_falls_back_to_the_domain_on_the_default_port() {
    let (dns, resolver) = setup().await;
    dns.add_a("b.test", ip("127.0.0.2"));
    assert_eq!(
        targets(&resolver, "b.test").await.unwrap(),
        vec![target("b.test", 5269, false)]
    );
    assert_eq!(
        resolve(&resolver, "b.test", 5269).await.unwrap(),
        vec![Endpoint {
            addr: "127.0.0.2:5269".parse().unwrap(),
            host: "b.test".into(),
            direct_tls: false,
        }]
    );
    // The default port is the caller's (tests run servers on free ports).
    let endpoints = resolve(&resolver, "b.test", 40000).await.unwrap();
    assert_eq!(endpoints[0].addr, "127.0.0.2:40000".parse().unwrap());
}

#[tokio::test]
async fn no_records_at_all_is_not_found() {
    let (_dns, resolver) = setup().await;
    let err = resolve(&resolver, "nowhere.test", 5269).await.unwrap_err();
    assert!(matches!(err, DnsError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn ip_literals_are_not_server_names() {
    let (_dns, resolver) = setup().await;
    for domain in ["127.0.0.1", "::1", "[::1]"] {
        let err = resolve(&resolver, domain, 5269).await.unwrap_err();
        assert!(
            matches!(err, DnsError::NotFound { .. }),
            "{domain}: {err:?}"
        );
    }
}

#[tokio::test]
async fn ipv6_and_ipv4_addresses() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpp-server._tcp.b.test", 0, 0, 5269, "xmpp.b.test");
    dns.add_a("xmpp.b.test", ip("127.0.0.3"));
    dns.add_a("xmpp.b.test", ip("::1"));
    let endpoints = resolve(&resolver, "b.test", 5269).await.unwrap();
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
    // IPv6 first: the resolver's default order.
    assert_eq!(
        addrs,
        vec![
            "[::1]:5269".parse().unwrap(),
            "127.0.0.3:5269".parse().unwrap()
        ]
    );
    assert!(endpoints
        .iter()
        .all(|e| e.host == "xmpp.b.test" && !e.direct_tls));
}

#[tokio::test]
async fn endpoints_follow_the_targets_in_priority_order() {
    let (dns, resolver) = setup().await;
    dns.add_srv("_xmpp-server._tcp.b.test", 30, 0, 5003, "three.b.test");
    dns.add_srv("_xmpps-server._tcp.b.test", 10, 0, 5001, "one.b.test");
    dns.add_srv("_xmpp-server._tcp.b.test", 20, 0, 5002, "two.b.test");
    dns.add_srv("_xmpp-server._tcp.b.test", 25, 0, 5009, "gone.b.test");
    dns.add_a("one.b.test", ip("127.0.0.1"));
    dns.add_a("two.b.test", ip("127.0.0.2"));
    dns.add_a("two.b.test", ip("127.0.0.22"));
    dns.add_a("three.b.test", ip("127.0.0.3"));

    let targets = targets(&resolver, "b.test").await.unwrap();
    assert_eq!(
        targets,
        vec![
            target("one.b.test", 5001, true),
            target("two.b.test", 5002, false),
            target("gone.b.test", 5009, false),
            target("three.b.test", 5003, false),
        ]
    );
    let one = resolver.endpoints(&targets[0]).await.unwrap();
    assert_eq!(
        one,
        vec![Endpoint {
            addr: "127.0.0.1:5001".parse().unwrap(),
            host: "one.b.test".into(),
            direct_tls: true,
        }]
    );
    let two: HashSet<SocketAddr> = resolver
        .endpoints(&targets[1])
        .await
        .unwrap()
        .iter()
        .map(|e| e.addr)
        .collect();
    assert_eq!(
        two,
        HashSet::from([
            "127.0.0.2:5002".parse().unwrap(),
            "127.0.0.22:5002".parse().unwrap()
        ])
    );
    let err = resolver.endpoints(&targets[2]).await.unwrap_err();
    assert!(matches!(err, DnsError::NoAddress { .. }), "{err:?}");

    // resolve() skips the target without addresses and keeps the order.
    let all: Vec<(u16, bool)> = resolve(&resolver, "b.test", 5269)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.addr.port(), e.direct_tls))
        .collect();
    assert_eq!(
        all,
        vec![(5001, true), (5002, false), (5002, false), (5003, false)]
    );
}

#[tokio::test]
async fn records_changed_at_runtime_are_seen() {
    let (dns, resolver) = setup().await;
    let err = resolve(&resolver, "b.test", 5269).await.unwrap_err();
    assert!(matches!(err, DnsError::NotFound { .. }), "{err:?}");
    dns.add_srv("_xmpp-server._tcp.b.test", 0, 0, 6000, "xmpp.b.test");
    dns.add_a("xmpp.b.test", ip("127.0.0.9"));
    let endpoints = resolve(&resolver, "b.test", 5269).await.unwrap();
    assert_eq!(endpoints[0].addr, "127.0.0.9:6000".parse().unwrap());
    dns.remove("_xmpp-server._tcp.b.test");
    let err = resolve(&resolver, "b.test", 5269).await.unwrap_err();
    assert!(matches!(err, DnsError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn answers_over_tcp_too() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dns = TestDns::start().await.unwrap();
    dns.add_a("b.test", ip("127.0.0.5"));
    let mut query = Message::query();
    query.metadata.id = 7;
    query.add_query(Query::query(
        Name::from_ascii("b.test.").unwrap(),
        RecordType::A,
    ));
    let bytes = query.to_vec().unwrap();

    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(dns.addr).await?;
        // DNS over TCP: each message preceded by its length (RFC 1035 §4.2.2).
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await?;
        stream.write_all(&bytes).await?;
        let len = stream.read_u16().await?;
        let mut answer = vec![0; usize::from(len)];
        stream.read_exact(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("answer in time")
        .expect("TCP exchange");
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(answer.metadata.id, 7);
    let ips: Vec<_> = answer.answers.iter().map(|r| r.data.clone()).collect();
    assert_eq!(ips, vec![RData::from(ip("127.0.0.5"))]);
}

#[tokio::test]
async fn dead_nameserver_is_a_lookup_error_in_bounded_time() {
    // A port that was just free; nothing listens there now.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let resolver = Resolver::with_nameservers(&[addr]).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(8), resolver.resolve("b.test", 5269))
        .await
        .expect("the resolver gives up by itself");
    let err = result.unwrap_err();
    assert!(matches!(err, DnsError::Lookup { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
}
