//! TLS on the gRPC and HTTP listeners (optionally mutual), and mutual TLS on the Raft
//! listener. Certificates are made at run time with rcgen; everything on 127.0.0.1 port 0.

#[path = "common/certs.rs"]
mod certs;
mod common;

use std::error::Error as _;
use std::time::Duration;

use certs::{Ca, Leaf, channel, server_tls};
use common::*;
use tally_proto::tally::v1::admin_client::AdminClient;
use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::raft_client::RaftClient;
use tally_proto::tally::v1::{ClusterStatusRequest, GetStatusRequest, RaftPayload};
use tally_server::server::{self, LimitsSource, ServerConfig, ServerError, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const LIMITS: &str = r#"
domains:
  - domain: test
    limits:
      - name: per-user
        match: { kind: req }
        by: [user]
        capacity: 3
        window: 1m
"#;

/// A call refused at the transport (the TLS handshake failed, or the server spoke TLS to a
/// plaintext client; the code varies with when the connection broke): never an answer of a
/// service.
fn assert_refused(e: &tonic::Status, what: &str) {
    let transport = e
        .source()
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(transport, "{what}: {e:?}");
}

async fn get_status(channel: Channel) -> Result<(), tonic::Status> {
    AdminClient::new(channel)
        .get_status(GetStatusRequest {})
        .await
        .map(drop)
}

async fn cluster_status(channel: Channel) -> Result<(), tonic::Status> {
    ClusterClient::new(channel)
        .status(ClusterStatusRequest {})
        .await
        .map(drop)
}

/// `GET /healthz` over TLS (trusting `ca`, presenting `identity`): the response, or the error.
async fn https_get(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A one-node server with TLS on its gRPC and HTTP listeners (the test helpers' `start`
/// connects in plaintext, so it cannot be used here).
async fn start_tls(tls: TlsConfig) -> (server::RunningServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test limits".into(),
            text: LIMITS.into(),
        },
        data_dir: dir.path().join("node-1"),
        timings: fast_timings(),
        tls: Some(tls),
        ..ServerConfig::default()
    };
    let server = server::spawn(config).await.unwrap();
    server.wait_ready(Duration::from_secs(10)).await.unwrap();
    (server, dir)
}

async fn plain_http_get(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_serve_tls_and_refuse_plaintext() {
    let ca = Ca::new("tally test CA");
    let other = Ca::new("someone else");
    let leaf = ca.leaf("tally node");
    let (server, _dir) = start_tls(server_tls(&leaf, None)).await;
    let grpc = server.grpc_addr;

    // A TLS client that trusts the CA: the admin API (loopback, no tokens: the peer address
    // is read through TLS too) and RLS answer.
    get_status(channel(grpc, Some(&ca), None)).await.unwrap();
    let mut rls =
        tally_proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(
            channel(grpc, Some(&ca), None),
        );
    rls.should_rate_limit(req(
        "test",
        vec![desc(&[("kind", "req"), ("user", "u")])],
        1,
    ))
    .await
    .unwrap();
    // Plaintext, or a client that trusts another CA, gets nothing.
    let e = get_status(channel(grpc, None, None)).await.unwrap_err();
    assert_refused(&e, "a plaintext or untrusting client");
    let e = get_status(channel(grpc, Some(&other), None))
        .await
        .unwrap_err();
    assert_refused(&e, "a plaintext or untrusting client");

    // HTTP: the same certificate.
    let health = https_get(server.http_addr, &ca, None).await.unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(https_get(server.http_addr, &other, None).await.is_err());
    let plain = plain_http_get(server.http_addr).await;
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let ca = Ca::new("tally test CA");
    let clients = Ca::new("tally clients");
    let other = Ca::new("someone else");
    let leaf = ca.leaf("tally node");
    let (server, _dir) = start_tls(server_tls(&leaf, Some(&clients))).await;
    let grpc = server.grpc_addr;
    let good = clients.leaf("billing job");
    let bad = other.leaf("intruder");

    get_status(channel(grpc, Some(&ca), Some(&good)))
        .await
        .unwrap();
    for (what, identity) in [("no certificate", None), ("another CA's", Some(&bad))] {
        let e = get_status(channel(grpc, Some(&ca), identity))
            .await
            .unwrap_err();
        assert_refused(&e, what);
    }

    let health = https_get(server.http_addr, &ca, Some(&good)).await.unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    for identity in [None, Some(&bad)] {
        // TLS 1.3: the client may finish its side before the server refuses the
        // certificate; either way no response comes.
        match https_get(server.http_addr, &ca, identity).await {
            Err(_) => {}
            Ok(out) => assert!(!out.starts_with("HTTP/1.1 200"), "{out}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_listener_refuses_peers_without_the_cluster_certificate() {
    let cluster = Ca::new("tally cluster CA");
    let other = Ca::new("someone else");
    let node = cluster.leaf("node 1");
    let peer = cluster.leaf("node 2");
    let intruder = other.leaf("intruder");
    let tls = server_tls(&node, Some(&cluster));
    let t = start_with(LIMITS, |c| c.raft_tls = Some(tls)).await;
    let raft = t.server.raft_addr;

    // A peer with the cluster's certificate reaches Cluster and Raft (a payload that is not
    // an openraft message is refused by the Raft service itself: it got there).
    cluster_status(channel(raft, Some(&cluster), Some(&peer)))
        .await
        .unwrap();
    let mut r = RaftClient::new(channel(raft, Some(&cluster), Some(&peer)));
    let e = r
        .vote(RaftPayload {
            data: vec![0xff; 3],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // The node's own dialling side (node::network) with the cluster's client TLS.
    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cluster.pem))
        .identity(Identity::from_pem(&peer.cert, &peer.key));
    let endpoint =
        tally_server::node::network::peer_endpoint(&raft.to_string(), Some(&client_tls)).unwrap();
    cluster_status(endpoint.connect_lazy()).await.unwrap();

    // Without it: plaintext, TLS without a certificate, or another CA's certificate.
    for (what, channel) in [
        ("plaintext", channel(raft, None, None)),
        ("no certificate", channel(raft, Some(&cluster), None)),
        (
            "another CA's",
            channel(raft, Some(&cluster), Some(&intruder)),
        ),
    ] {
        let e = cluster_status(channel.clone()).await.unwrap_err();
        assert_refused(&e, what);
        let e = RaftClient::new(channel)
            .vote(RaftPayload { data: vec![] })
            .await
            .unwrap_err();
        assert_refused(&e, what);
    }
    // The gRPC listener stays plaintext (its TLS is separate).
    get_status(connect(t.server.grpc_addr).await).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_start() {
    let ca = Ca::new("tally test CA");
    let leaf = ca.leaf("node");
    let dir = tempfile::tempdir().unwrap();
    let base = || ServerConfig {
        data_dir: dir.path().join("node-1"),
        ..ServerConfig::default()
    };
    let garbage = TlsConfig {
        cert_pem: b"not a certificate".to_vec(),
        key_pem: leaf.key.clone().into_bytes(),
        client_ca_pem: None,
    };
    let e = server::spawn(ServerConfig {
        tls: Some(garbage),
        ..base()
    })
    .await
    .err()
    .expect("refused");
    assert!(matches!(e, ServerError::Tls(_)), "{e}");
    let e = server::spawn(ServerConfig {
        raft_tls: Some(server_tls(&leaf, None)),
        ..base()
    })
    .await
    .err()
    .expect("refused");
    assert!(e.to_string().contains("--raft-tls-ca is required"), "{e}");
    // The key is never shown.
    let shown = format!("{:?}", server_tls(&leaf, None));
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    // Files are read by path.
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, &leaf.cert).unwrap();
    std::fs::write(&key, &leaf.key).unwrap();
    let read = TlsConfig::from_files(&cert, &key, None).unwrap();
    assert_eq!(read.cert_pem, leaf.cert.as_bytes());
    let e = TlsConfig::from_files(&dir.path().join("missing.pem"), &key, None).unwrap_err();
    assert!(e.to_string().contains("missing.pem"), "{e}");
}
