//! The hickory-server front of [`super::Zone`]: UDP and TCP on one address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio_util::sync::CancellationToken;

use super::{Answer, Zone};

/// A TCP client silent this long is dropped.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("dns: bind {proto} {addr}: {source}")]
    Bind {
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Answers queries from the zone.
struct Handler {
    zone: Arc<Zone>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let answer = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                let name = info.query.original().name();
                self.zone.resolve(name, info.query.query_type())
            }
            Ok(_) => {
                metadata.response_code = ResponseCode::NotImp;
                Answer::Records(Vec::new())
            }
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                Answer::Records(Vec::new())
            }
        };
        let (records, negative): (Vec<Record>, bool) = match answer {
            Answer::Records(r) => {
                let ok = metadata.response_code == ResponseCode::NoError;
                metadata.authoritative = ok;
                // NODATA: the name exists, the type does not.
                let nodata = ok && r.is_empty();
                (r, nodata)
            }
            Answer::NxDomain => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                (Vec::new(), true)
            }
            Answer::Refused => {
                metadata.response_code = ResponseCode::Refused;
                (Vec::new(), false)
            }
        };
        // RFC 2308: a negative answer carries the SOA, so it can be cached.
        let soa = negative.then(|| self.zone.soa()).flatten();
        let response = builder.build(
            metadata,
            records.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns: cannot send a response");
                let mut h = hickory_server::proto::op::Header {
                    metadata,
                    counts: hickory_server::proto::op::HeaderCounts::default(),
                };
                h.metadata.response_code = ResponseCode::ServFail;
                h.into()
            }
        }
    }
}

/// Binds `addr` (UDP and TCP) and answers from `zone` until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    zone: Arc<Zone>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let udp = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            proto: "tcp",
            addr,
            source,
        })?;
    let mut server = Server::new(Handler { zone });
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT, 64);
    tracing::info!(%addr, "cluster DNS serving");
    tokio::select! {
        () = cancel.cancelled() => {
            if let Err(e) = server.shutdown_gracefully().await {
                tracing::debug!(error = %e, "dns: shutdown");
            }
        }
        r = server.block_until_done() => {
            if let Err(e) = r {
                tracing::error!(error = %e, "dns: server stopped");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use hickory_server::proto::op::Message;
    use hickory_server::proto::rr::rdata::SOA;
    use hickory_server::proto::rr::{Name, RData};

    use super::*;
    use crate::dns::ServiceRecord;

    /// A raw A query for `name` with id 0x1234.
    fn query(name: &str, tcp: bool) -> Vec<u8> {
        query_type(name, 1, tcp)
    }

    /// A raw query of type `qtype` for `name` with id 0x1234.
    fn query_type(name: &str, qtype: u8, tcp: bool) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(u8::try_from(l.len()).unwrap());
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, qtype, 0, 1]);
        if tcp {
            let mut framed = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
            framed.extend(q);
            framed
        } else {
            q
        }
    }

    /// A server on a free loopback port whose zone has `web.default`
    /// (cluster IP 10.96.0.20).
    async fn serve_web() -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ) {
        let zone = Arc::new(Zone::new("cluster.local"));
        zone.set(BTreeMap::from([(
            ("default".to_owned(), "web".to_owned()),
            ServiceRecord {
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 20)),
                endpoints: Vec::new(),
                ports: Vec::new(),
            },
        )]));
        // Find a free port on loopback, then serve there.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(addr, zone, cancel.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        (addr, cancel, task)
    }

    #[tokio::test]
    async fn answers_over_udp_and_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, cancel, task) = serve_web().await;

        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&query("web.default.svc.cluster.local", false), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..2], &[0x12, 0x34]);
        assert_eq!(buf[3] & 0x0f, 0, "NOERROR");
        assert_eq!(
            &buf[n - 4..n],
            &[10, 96, 0, 20],
            "the A record ends the answer"
        );

        c.send_to(&query("example.com", false), addr).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[3] & 0x0f, 5, "REFUSED");

        let mut t = tokio::net::TcpStream::connect(addr).await.unwrap();
        t.write_all(&query("nope.default.svc.cluster.local", true))
            .await
            .unwrap();
        let len = tokio::time::timeout(Duration::from_secs(2), t.read_u16())
            .await
            .unwrap()
            .unwrap();
        let mut msg = vec![0u8; usize::from(len)];
        t.read_exact(&mut msg).await.unwrap();
        assert_eq!(msg[3] & 0x0f, 3, "NXDOMAIN");

        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    /// The SOA records in the authority section of a response.
    fn authority_soas(m: &Message) -> Vec<(Name, u32, SOA)> {
        m.authorities
            .iter()
            .filter_map(|r| match &r.data {
                RData::SOA(s) => Some((r.name.clone(), r.ttl, s.clone())),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn negative_answers_carry_the_zones_soa() {
        let (addr, cancel, task) = serve_web().await;
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ask = async |name: &str, qtype: u8| {
            c.send_to(&query_type(name, qtype, false), addr)
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            Message::from_vec(&buf[..n]).expect("a DNS message")
        };
        let apex = Name::from_ascii("cluster.local.").unwrap();
        // NXDOMAIN and NODATA (an AAAA question for a service): the SOA.
        for (name, qtype, code) in [
            ("nope.default.svc.cluster.local", 1, ResponseCode::NXDomain),
            ("web.default.svc.cluster.local", 28, ResponseCode::NoError),
            ("svc.cluster.local", 1, ResponseCode::NoError),
        ] {
            let m = ask(name, qtype).await;
            assert_eq!(m.metadata.response_code, code, "{name}");
            assert!(m.metadata.authoritative, "{name}");
            assert!(m.answers.is_empty(), "{name}: {:?}", m.answers);
            let soas = authority_soas(&m);
            assert_eq!(soas.len(), 1, "{name}: {:?}", m.authorities);
            let (owner, ttl, soa) = &soas[0];
            assert_eq!(owner, &apex);
            assert_eq!((*ttl, soa.minimum), (crate::dns::TTL, crate::dns::TTL));
            assert_eq!(
                soa.mname,
                Name::from_ascii("ns.dns.cluster.local.").unwrap()
            );
            assert_eq!(
                soa.rname,
                Name::from_ascii("hostmaster.cluster.local.").unwrap()
            );
        }
        // A positive answer and a refusal: no SOA.
        let m = ask("web.default.svc.cluster.local", 1).await;
        assert_eq!(m.answers.len(), 1);
        assert!(authority_soas(&m).is_empty(), "{:?}", m.authorities);
        let m = ask("example.com", 1).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(m.authorities.is_empty(), "{:?}", m.authorities);
        // The apex answers its SOA (type 6) in the answer section.
        let m = ask("cluster.local", 6).await;
        assert!(matches!(
            m.answers.first().map(|r| &r.data),
            Some(RData::SOA(_))
        ));

        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
