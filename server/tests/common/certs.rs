//! Test certificates, made at run time with rcgen: a CA, the certificates it signs (for
//! 127.0.0.1 and localhost, good as server and as client), a listener's `TlsConfig` from
//! them, and a tonic channel that trusts a CA and presents a certificate. Shared by the TLS
//! tests (`#[path = "common/certs.rs"] mod certs;`).
#![allow(dead_code)]

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tally_server::server::TlsConfig;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA and what it signs.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for 127.0.0.1 and localhost, good as server and as client.
    pub fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        Leaf {
            cert,
            key: key.serialize_pem(),
        }
    }
}

pub fn server_tls(leaf: &Leaf, client_ca: Option<&Ca>) -> TlsConfig {
    TlsConfig {
        cert_pem: leaf.cert.clone().into_bytes(),
        key_pem: leaf.key.clone().into_bytes(),
        client_ca_pem: client_ca.map(|ca| ca.pem.clone().into_bytes()),
    }
}

/// A channel to `addr` (lazily connected): TLS trusting `ca`, presenting `identity`, or
/// plaintext when `ca` is `None`.
pub fn channel(addr: std::net::SocketAddr, ca: Option<&Ca>, identity: Option<&Leaf>) -> Channel {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(ca) = ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
        }
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect_lazy()
}
