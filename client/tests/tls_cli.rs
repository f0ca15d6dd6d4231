//! `tally --ca` (and `--client-cert`/`--client-key`) against a real server whose gRPC
//! listener has mutual TLS; certificates made at run time with rcgen, all on 127.0.0.1.

use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tally_server::server::{self, LimitsSource, ServerConfig, TlsConfig};

fn ca() -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer).unwrap().pem();
    (cert, key.serialize_pem())
}

async fn tally(args: Vec<String>) -> (i32, String, String) {
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&args)
            .env_remove("TALLY_ADDR")
            .env_remove("TALLY_TOKEN")
            .env_remove("TALLY_CA")
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_talks_to_a_mutual_tls_server_with_its_certificate() {
    let (ca_pem, issuer) = ca();
    let (server_cert, server_key) = leaf(&issuer);
    let (client_cert, client_key) = leaf(&issuer);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (ca_file, cert_file, key_file) = (
        file("ca.pem", &ca_pem),
        file("client.pem", &client_cert),
        file("client.key", &client_key),
    );
    let config = ServerConfig {
        limits: LimitsSource::Inline {
            origin: "test".into(),
            text: "domains:\n  - domain: d\n    limits:\n      - { name: l, capacity: 1, window: 1m }\n".into(),
        },
        data_dir: dir.path().join("node-1"),
        tls: Some(TlsConfig {
            cert_pem: server_cert.into_bytes(),
            key_pem: server_key.into_bytes(),
            client_ca_pem: Some(ca_pem.clone().into_bytes()),
        }),
        ..ServerConfig::default()
    };
    let server = server::spawn(config).await.unwrap();
    server.wait_ready(Duration::from_secs(10)).await.unwrap();
    let addr = server.grpc_addr.to_string();
    let https = format!("https://{addr}");

    let args = |extra: &[&str]| -> Vec<String> { extra.iter().map(|s| s.to_string()).collect() };
    let (code, out, err) = tally(args(&[
        "--addr",
        &addr,
        "--ca",
        &ca_file,
        "--client-cert",
        &cert_file,
        "--client-key",
        &key_file,
        "status",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("limits:"), "{out}");
    let (code, _, err) = tally(args(&[
        "--addr",
        &https,
        "--ca",
        &ca_file,
        "--client-cert",
        &cert_file,
        "--client-key",
        &key_file,
        "limits",
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    // Without the client certificate, or in plaintext: refused.
    let (code, _, err) = tally(args(&["--addr", &addr, "--ca", &ca_file, "status"])).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = tally(args(&["--addr", &addr, "status"])).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = tally(args(&["--addr", &https, "status"])).await;
    assert_eq!(code, 2);
    assert!(err.contains("needs TLS"), "{err}");
    server.stop().await.unwrap();
}
