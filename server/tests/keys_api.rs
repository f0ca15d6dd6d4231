//! `tally.v1.Keys` over gRPC: a secret is shown once and never again, keys bound to the
//! example tiers, disable/enable, rotate, delete for good, ephemeral keys issued to a key.

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::{
    CreateEphemeralKeyRequest, CreateKeyRequest, DeleteKeyRequest, GetKeyRequest, Label,
    ListKeysRequest, ListSubscriptionsRequest, RotateKeyRequest, SetKeyEnabledRequest,
};
use tally_server::engine::Command;
use tally_server::engine::Outcome;
use tally_server::engine::access::{Authorize, Denial};
use tally_server::server::ServerConfig;
use tonic::Code as GrpcCode;

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test within 60 s");
}

fn sha256(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// Authorizes `secret` through the engine, as Envoy's Check would.
async fn authorize(t: &TestServer, secret: &str) -> Result<String, Denial> {
    let id = secret.split('_').nth(1).unwrap_or_default().to_owned();
    let node = t.server.node().unwrap();
    let cmd = Command::Authorize(Authorize {
        key_id: id,
        secret_sha256: sha256(secret),
        model: None,
        classification: None,
    });
    match node.propose(cmd).await.unwrap() {
        Outcome::Authorized(r) => r.map(|g| g.key_id),
        other => panic!("{other:?}"),
    }
}

fn create(subscription: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        name: "web app".into(),
        description: "the storefront".into(),
        subscription: subscription.into(),
        labels: vec![Label {
            key: "team".into(),
            value: "web".into(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lives_its_whole_life_and_its_secret_is_shown_once() {
    within(async {
        let t = start_with("", |c| c.limits = ServerConfig::default().limits).await;
        let mut keys = KeysClient::new(connect(t.server.grpc_addr).await);
        let subs = keys
            .list_subscriptions(ListSubscriptionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .subscriptions;
        let names: Vec<&str> = subs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["enterprise", "free", "premium"]);
        let made = keys.create_key(create("free")).await.unwrap().into_inner();
        let key = made.key.clone().unwrap();
        assert!(
            made.secret.starts_with(&format!("tly_{}_", key.id)),
            "{}",
            made.secret
        );
        assert!(
            made.secret.len() >= 4 + 16 + 1 + 22,
            "≥ 128 bits of randomness"
        );
        assert_eq!((key.subscription.as_str(), key.enabled), ("free", true));
        assert_eq!(authorize(&t, &made.secret).await, Ok(key.id.clone()));
        // Never again: neither the list nor the key shows it.
        let list = keys
            .list_keys(ListKeysRequest {})
            .await
            .unwrap()
            .into_inner();
        let shown = keys
            .get_key(GetKeyRequest { id: key.id.clone() })
            .await
            .unwrap()
            .into_inner();
        for bytes in [list.encode_to_vec(), shown.encode_to_vec()] {
            let random = &made.secret.as_bytes()[21..];
            assert!(
                !bytes.windows(random.len()).any(|w| w == random),
                "secret shown again"
            );
        }
        assert_eq!(list.keys.len(), 1);
        // A key needs a subscription that exists.
        let e = keys.create_key(create("")).await.unwrap_err();
        assert_eq!(e.code(), GrpcCode::InvalidArgument);
        assert!(e.message().contains("subscription"), "{e:?}");
        let e = keys.create_key(create("gold")).await.unwrap_err();
        assert_eq!(e.code(), GrpcCode::InvalidArgument, "{e:?}");
        // Disable, enable.
        let off = SetKeyEnabledRequest {
            id: key.id.clone(),
            enabled: false,
        };
        assert!(
            !keys
                .set_key_enabled(off)
                .await
                .unwrap()
                .into_inner()
                .enabled
        );
        assert_eq!(authorize(&t, &made.secret).await, Err(Denial::Disabled));
        let on = SetKeyEnabledRequest {
            id: key.id.clone(),
            enabled: true,
        };
        keys.set_key_enabled(on).await.unwrap();
        // Rotate with a grace period: both secrets work within it.
        let rotated = keys
            .rotate_key(RotateKeyRequest {
                id: key.id.clone(),
                grace_ms: 60_000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(rotated.secret, made.secret);
        assert!(authorize(&t, &made.secret).await.is_ok());
        assert!(authorize(&t, &rotated.secret).await.is_ok());
        t.clock.advance_ms(60_000);
        assert_eq!(authorize(&t, &made.secret).await, Err(Denial::BadSecret));
        assert!(authorize(&t, &rotated.secret).await.is_ok());
        // An ephemeral key issued to this key: its subscription, 4 hours by default.
        let eph = keys
            .create_ephemeral_key(CreateEphemeralKeyRequest {
                api_key: rotated.secret.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ek = eph.key.unwrap();
        assert!(ek.ephemeral);
        assert_eq!(ek.subscription, "free");
        assert_eq!(ek.expires_ms - ek.created_ms, 4 * 3_600_000);
        assert!(authorize(&t, &eph.secret).await.is_ok());
        t.clock.advance_ms(4 * 3_600_000);
        assert_eq!(authorize(&t, &eph.secret).await, Err(Denial::ExpiredKey));
        let bad = CreateEphemeralKeyRequest {
            api_key: "tly_nonsense".into(),
            ..Default::default()
        };
        let e = keys.create_ephemeral_key(bad).await.unwrap_err();
        assert_eq!(e.code(), GrpcCode::Unauthenticated);
        // Delete: for good.
        keys.delete_key(DeleteKeyRequest { id: key.id.clone() })
            .await
            .unwrap();
        assert_eq!(
            authorize(&t, &rotated.secret).await,
            Err(Denial::DeletedKey)
        );
        let e = keys
            .get_key(GetKeyRequest { id: key.id.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), GrpcCode::NotFound);
        t.stop().await;
    })
    .await
}
