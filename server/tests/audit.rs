//! The audit log (`tally.v1.Audit`): every admin change is recorded once, replicated, with
//! who (the token's name and role), what, when (batch time), and the object before and after;
//! refused changes too; never a secret; in snapshots; and as `tally::audit` log lines.

mod common;

use std::time::Duration;

use common::*;
use tally_proto::tally::v1::audit_client::AuditClient;
use tally_proto::tally::v1::keys_client::KeysClient;
use tally_proto::tally::v1::usage_client::UsageClient;
use tally_proto::tally::v1::{
    AuditRecord, CreateKeyRequest, DeleteKeyRequest, ListAuditRequest, ModelPrice, PutMode,
    PutSubscriptionsRequest, RotateKeyRequest, SetKeyEnabledRequest, SetPricesRequest,
};
use tally_server::api::auth::{AuthConfig, Role};
use tally_server::engine::access::NewKey;
use tally_server::engine::audit::{Actor, AuditNote, AuditQuery, Audited};
use tally_server::engine::{Command, Engine, EngineSettings, Outcome};
use tonic::transport::Channel;
use tonic::{Code, Request};

const ADMIN: &str = "tally_admin_audit_4f1c0d9e8b7a6f5e4d3c";
const READER: &str = "tally_reader_audit_99887766554433221100";

const TEST_LIMIT: Duration = Duration::from_secs(90);

fn tokens() -> AuthConfig {
    AuthConfig::default()
        .with_token("ops", Role::Admin, ADMIN)
        .unwrap()
        .with_token("dashboard", Role::ReadOnly, READER)
        .unwrap()
}

fn bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(token) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json(text: &Option<String>) -> serde_json::Value {
    text.as_deref().map_or(serde_json::Value::Null, |t| {
        serde_json::from_str(t).unwrap()
    })
}

async fn audit_page(channel: &Channel, query: ListAuditRequest) -> Vec<AuditRecord> {
    let mut audit = AuditClient::new(channel.clone());
    let page = audit
        .list_audit(bearer(query, Some(READER)))
        .await
        .unwrap()
        .into_inner();
    page.records
}

/// The changes an admin makes over the API, on a follower: subscription, key life, prices,
/// and one refused.
async fn make_changes(keys: &mut KeysClient<Channel>, channel: &Channel) -> (String, Vec<String>) {
    let document =
        "subscriptions:\n  - name: team\n    models: [gpt-4o]\n    requests_per_minute: 7\n";
    keys.put_subscriptions(bearer(
        PutSubscriptionsRequest {
            document: document.into(),
            mode: PutMode::Create as i32,
        },
        Some(ADMIN),
    ))
    .await
    .unwrap();
    let made = keys
        .create_key(bearer(
            CreateKeyRequest {
                name: "web".into(),
                subscription: "team".into(),
                ..Default::default()
            },
            Some(ADMIN),
        ))
        .await
        .unwrap()
        .into_inner();
    let id = made.key.unwrap().id;
    let disable = SetKeyEnabledRequest {
        id: id.clone(),
        enabled: false,
    };
    keys.set_key_enabled(bearer(disable, Some(ADMIN)))
        .await
        .unwrap();
    let rotate = RotateKeyRequest {
        id: id.clone(),
        grace_ms: 60_000,
    };
    let rotated = keys
        .rotate_key(bearer(rotate, Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    let delete = DeleteKeyRequest { id: id.clone() };
    keys.delete_key(bearer(delete, Some(ADMIN))).await.unwrap();
    // Refused by the engine (the key is gone): recorded as an attempt.
    let again = SetKeyEnabledRequest {
        id: id.clone(),
        enabled: true,
    };
    keys.set_key_enabled(bearer(again, Some(ADMIN)))
        .await
        .unwrap_err();
    let prices = SetPricesRequest {
        models: vec![ModelPrice {
            model: "gpt-4o".into(),
            input_nusd: 2_500,
            cached_input_nusd: 1_250,
            output_nusd: 10_000,
        }],
    };
    UsageClient::new(channel.clone())
        .set_prices(bearer(prices, Some(ADMIN)))
        .await
        .unwrap();
    (id, vec![made.secret, rotated.secret])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_change_is_recorded_with_who_what_when_before_and_after() {
    tokio::time::timeout(TEST_LIMIT, async {
        let mut cluster = Cluster::unjoined_with_auth(
            auth_cluster::base_config(),
            [tokens(), tokens(), tokens()],
        )
        .await;
        cluster.join(2, 1, Some(ADMIN)).await;
        cluster.join(3, 1, Some(ADMIN)).await;
        // Node 1 leads (steady timings); the changes are made on a follower.
        let channel = connect(cluster.node(2).grpc_addr).await;
        let mut keys = KeysClient::new(channel.clone());
        let (id, secrets) = make_changes(&mut keys, &channel).await;

        let records = audit_page(&channel, ListAuditRequest::default()).await;
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
        // The server's own configuration: recorded once, though every node applied it.
        let config: Vec<&str> = records
            .iter()
            .filter(|r| r.role == "config")
            .map(|r| r.action.as_str())
            .collect();
        assert_eq!(
            config.iter().filter(|a| **a == "limits.replace").count(),
            1,
            "{config:?}"
        );
        assert!(config.contains(&"subscriptions.put"), "{config:?}");
        // The cluster was formed by `ops`: each membership change, with the members before
        // and after.
        let cluster_changes: Vec<(&str, &str)> = records
            .iter()
            .filter(|r| r.action.starts_with("cluster."))
            .map(|r| (r.action.as_str(), r.target.as_str()))
            .collect();
        assert_eq!(
            cluster_changes,
            [
                ("cluster.add-learner", "node 2"),
                ("cluster.promote", "node 2"),
                ("cluster.add-learner", "node 3"),
                ("cluster.promote", "node 3"),
            ]
        );
        let promote_3 = records
            .iter()
            .find(|r| r.action == "cluster.promote" && r.target == "node 3")
            .unwrap();
        assert_eq!(promote_3.actor, "ops");
        assert_eq!(json(&promote_3.before_json)["3"]["role"], "learner");
        assert_eq!(json(&promote_3.after_json)["3"]["role"], "voter");
        let by_ops: Vec<&AuditRecord> = records
            .iter()
            .filter(|r| r.actor == "ops" && !r.action.starts_with("cluster."))
            .collect();
        let actions: Vec<(&str, &str)> = by_ops
            .iter()
            .map(|r| (r.action.as_str(), r.target.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                ("subscriptions.put", "team"),
                ("keys.create", id.as_str()),
                ("keys.disable", id.as_str()),
                ("keys.rotate", id.as_str()),
                ("keys.delete", id.as_str()),
                ("keys.enable", id.as_str()),
                ("prices.set", "prices"),
            ]
        );
        for r in &by_ops {
            assert_eq!(r.role, "admin");
            assert_eq!(r.at_ms, T0_MS, "batch time of the manual clock");
        }
        let [sub, create, disable, rotate, delete, refused, prices] = by_ops[..] else {
            unreachable!()
        };
        assert_eq!(sub.before_json, None);
        assert_eq!(json(&sub.after_json)["requests_per_minute"], 7);
        assert_eq!(create.before_json, None);
        assert_eq!(json(&create.after_json)["enabled"], true);
        assert_eq!(json(&create.after_json)["created_by"], "ops");
        assert_eq!(json(&disable.before_json)["enabled"], true);
        assert_eq!(json(&disable.after_json)["enabled"], false);
        assert!(json(&rotate.before_json)["rotated_ms"].is_null());
        assert_eq!(json(&rotate.after_json)["rotated_ms"], T0_MS);
        assert_eq!(json(&delete.before_json)["id"], id.as_str());
        assert_eq!(delete.after_json, None);
        assert!(delete.error.is_empty());
        assert!(refused.error.contains(&id), "{:?}", refused.error);
        assert_eq!((&refused.before_json, &refused.after_json), (&None, &None));
        assert_eq!(json(&prices.after_json)["models"][0]["model"], "gpt-4o");
        let version = |o: &Option<String>| json(o)["version"].as_u64().unwrap();
        assert_eq!(
            version(&prices.after_json),
            version(&prices.before_json) + 1
        );

        // Never a secret, nor its digest.
        let all = format!("{records:?}");
        for secret in &secrets {
            assert!(!all.contains(secret.as_str()));
            assert!(!all.contains(&sha256_hex(secret)));
            assert!(!all.contains(secret.rsplit('_').next().unwrap()));
        }

        // Filters and cursors.
        let about_key = audit_page(
            &channel,
            ListAuditRequest {
                target: id.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(about_key.len(), 5);
        let page = audit_page(
            &channel,
            ListAuditRequest {
                after_seq: create.seq,
                limit: 2,
                actor: "ops".into(),
                ..Default::default()
            },
        )
        .await;
        let two: Vec<u64> = page.iter().map(|r| r.seq).collect();
        assert_eq!(two, [disable.seq, rotate.seq]);

        // Replicated: the leader and the other follower hold the same records.
        for i in [1, 3] {
            let other = connect(cluster.node(i).grpc_addr).await;
            assert_eq!(
                audit_page(&other, ListAuditRequest::default()).await,
                records
            );
        }

        // Reading needs a token (read-only is enough); a limit above the page is refused.
        let mut audit = AuditClient::new(channel.clone());
        let e = audit
            .list_audit(bearer(ListAuditRequest::default(), None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let too_many = ListAuditRequest {
            limit: 5_000,
            ..Default::default()
        };
        let e = audit
            .list_audit(bearer(too_many, Some(READER)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("limit"), "{e:?}");
        cluster.stop_all().await;
    })
    .await
    .expect("within the test limit");
}

fn new_key(id: &str) -> NewKey {
    NewKey {
        id: id.into(),
        name: "k".into(),
        description: String::new(),
        subscription: None,
        labels: vec![],
        expires_ms: None,
        ephemeral: false,
        secret_sha256: [7; 32],
        created_by: "ops".into(),
        overrides: None,
    }
}

fn audited(command: Command) -> Command {
    Command::Audited(Box::new(Audited {
        actor: Actor::from_parts("ops", "admin"),
        command,
    }))
}

#[test]
fn the_engine_records_audited_changes_and_keeps_them_in_snapshots() {
    let mut engine = Engine::new(EngineSettings::default());
    let id = "abcdefghijklmnop";
    let out = engine.apply(
        T0_MS,
        &[
            audited(Command::CreateKey(new_key(id))),
            audited(Command::SetKeyEnabled {
                id: id.into(),
                enabled: false,
            }),
            // Not an admin change: refused, not recorded.
            audited(Command::Release {
                request_id: "r".into(),
            }),
            // Nested: refused.
            audited(audited(Command::DeleteKey { id: id.into() })),
            Command::AuditNote(AuditNote {
                actor: Actor::from_parts("ops", "admin"),
                action: "cluster.add-learner".into(),
                target: "node 4".into(),
                before: None,
                after: Some("{\"addr\":\"127.0.0.1:1\"}".into()),
            }),
        ],
    );
    assert!(matches!(out[0], Outcome::Key(_)), "{out:?}");
    assert!(matches!(out[1], Outcome::Key(_)), "{out:?}");
    assert!(matches!(out[2], Outcome::Rejected(_)), "{out:?}");
    assert!(matches!(out[3], Outcome::Rejected(_)), "{out:?}");
    assert_eq!(out[4], Outcome::AuditRecorded { seq: 3 });
    let page = engine.audit(&AuditQuery {
        limit: 10,
        ..AuditQuery::default()
    });
    let actions: Vec<&str> = page.records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["keys.create", "keys.disable", "cluster.add-learner"]
    );
    // The key's hash never shows (it is [7; 32]: "0707..." in hex, 7,7,... in JSON).
    for r in &page.records {
        let text = format!("{:?}{:?}", r.before, r.after);
        assert!(!text.contains("0707") && !text.contains("7,7,7"), "{text}");
    }
    // Replicated state: a restored engine holds the same log and numbers on from it.
    let mut restored = Engine::restore(&engine.snapshot()).unwrap();
    let all = AuditQuery {
        limit: 10,
        ..AuditQuery::default()
    };
    assert_eq!(restored.audit(&all), engine.audit(&all));
    restored.apply(T0_MS + 1, &[audited(Command::DeleteKey { id: id.into() })]);
    assert_eq!(restored.last_audit_seq(), 4);
    assert_eq!(
        engine.snapshot(),
        Engine::restore(&engine.snapshot()).unwrap().snapshot()
    );
}

#[test]
fn the_servers_own_configuration_is_recorded_only_when_it_changes_something() {
    let mut engine = Engine::new(EngineSettings::default());
    let config = |command| {
        Command::Audited(Box::new(Audited {
            actor: Actor::config("test"),
            command,
        }))
    };
    let settings = EngineSettings::default();
    engine.apply(T0_MS, &[config(Command::Configure(settings))]);
    assert_eq!(
        engine.last_audit_seq(),
        0,
        "the same settings: nothing changed"
    );
    let changed = EngineSettings {
        max_counters: 10,
        ..settings
    };
    engine.apply(T0_MS, &[config(Command::Configure(changed))]);
    assert_eq!(engine.last_audit_seq(), 1);
    // An admin's change is recorded even when it changes nothing.
    engine.apply(T0_MS, &[audited(Command::Configure(changed))]);
    assert_eq!(engine.last_audit_seq(), 2);
}
