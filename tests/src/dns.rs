//! A DNS server for tests: UDP and TCP on one loopback port, answering from a map of
//! records that tests change while it runs (servers learn their ports only after start).
//!
//! Records are served with TTL 0 and no SOA, so a resolver caches neither answers nor
//! NXDOMAIN: a record added or removed is seen by the next query.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

/// Records by lower-case name without the trailing dot.
type Zone = Arc<Mutex<HashMap<String, Vec<Record>>>>;

/// A running test DNS server on 127.0.0.1; stops when dropped.
pub struct TestDns {
    /// UDP and TCP, same port.
    pub addr: SocketAddr,
    zone: Zone,
    server: Server<ZoneHandler>,
}

impl TestDns {
    /// Binds UDP on a free port, then TCP on the same port (retrying with another UDP port
    /// if that TCP port is taken), and starts serving.
    pub async fn start() -> Result<TestDns> {
        let mut last_error = None;
        for _ in 0..20 {
            let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .context("binding the test DNS UDP socket")?;
            let addr = udp.local_addr()?;
            let tcp = match TcpListener::bind(addr).await {
                Ok(tcp) => tcp,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            let zone = Zone::default();
            let mut server = Server::new(ZoneHandler { zone: zone.clone() });
            server.register_socket(udp);
            server.register_listener(tcp, Duration::from_secs(10), 64);
            return Ok(TestDns { addr, zone, server });
        }
        Err(anyhow!("no port free for both UDP and TCP: {last_error:?}"))
    }

    /// Adds an A record (IPv4) or AAAA record (IPv6) for `name`.
    pub fn add_a(&self, name: &str, ip: IpAddr) {
        self.add(name, RData::from(ip));
    }

    /// Adds an SRV record, e.g. `_xmpp-server._tcp.a.test`; `target` "." means the service
    /// is not offered (RFC 2782).
    pub fn add_srv(&self, name: &str, priority: u16, weight: u16, port: u16, target: &str) {
        let target = fqdn(target);
        self.add(name, RData::SRV(SRV::new(priority, weight, port, target)));
    }

    /// Removes every record of `name`: it answers NXDOMAIN again.
    pub fn remove(&self, name: &str) {
        self.zone.lock().unwrap().remove(&key(name));
    }

    fn add(&self, name: &str, data: RData) {
        let record = Record::from_rdata(fqdn(name), 0, data);
        self.zone
            .lock()
            .unwrap()
            .entry(key(name))
            .or_default()
            .push(record);
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Dropping `server` aborts its tasks; cancelling first lets them end cleanly.
        self.server.shutdown_token().cancel();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let trimmed = name.trim_end_matches('.');
    let mut parsed = if trimmed.is_empty() {
        Name::root()
    } else {
        Name::from_ascii(trimmed).unwrap_or_else(|e| panic!("bad test DNS name {name:?}: {e}"))
    };
    parsed.set_fqdn(true);
    parsed
}

struct ZoneHandler {
    zone: Zone,
}

#[async_trait::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;

        let answers: Option<Vec<Record>> = match request.request_info() {
            Ok(info) => {
                let name = key(&info.query.name().to_string());
                let wanted = info.query.query_type();
                self.zone.lock().unwrap().get(&name).map(|records| {
                    records
                        .iter()
                        .filter(|r| wanted == RecordType::ANY || r.record_type() == wanted)
                        .cloned()
                        .collect()
                })
            }
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                Some(Vec::new())
            }
        };
        let answers = answers.unwrap_or_else(|| {
            metadata.response_code = ResponseCode::NXDomain;
            Vec::new()
        });
        let response = builder.build(metadata, answers.iter(), [], [], []);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "test DNS could not answer");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_proto::op::Header {
                    metadata,
                    counts: Default::default(),
                })
            }
        }
    }
}
