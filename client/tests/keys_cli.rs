//! `tally keys` and `tally subscriptions`, run as the real binary against an in-process
//! server (the embedded example config, with its three tiers) on 127.0.0.1 port 0.

mod common;

use common::{ok, tally};
use std::time::Duration;

use tally_server::server::{self, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_listed_disabled_rotated_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: dir.path().join("node-1"),
        ..ServerConfig::default()
    };
    let running = server::spawn(config).await.unwrap();
    running.wait_ready(Duration::from_secs(10)).await.unwrap();
    let addr = format!("http://{}", running.grpc_addr);

    let subs = tally(&addr, &["subscriptions", "list"]).await;
    let text = ok(&subs);
    assert!(text.starts_with("NAME"), "{text}");
    for tier in ["free", "premium", "enterprise"] {
        assert!(text.contains(tier), "{text}");
    }
    let made = tally(
        &addr,
        &[
            "keys",
            "create",
            "--name",
            "shop",
            "--subscription",
            "free",
            "--label",
            "team=web",
            "--json",
        ],
    )
    .await;
    let made: serde_json::Value = serde_json::from_str(ok(&made)).unwrap();
    let secret = made["secret"].as_str().unwrap().to_owned();
    let id = made["key"]["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with(&format!("tly_{id}_")), "{secret}");
    // Listed, never with its secret.
    let list = tally(&addr, &["keys", "list", "--json"]).await;
    let list_text = ok(&list).to_owned();
    assert!(!list_text.contains(&secret[21..]), "{list_text}");
    let list: serde_json::Value = serde_json::from_str(&list_text).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["labels"]["team"], "web");
    let table = tally(&addr, &["keys", "list"]).await;
    assert!(
        ok(&table).lines().nth(1).unwrap().starts_with(&id),
        "{}",
        table.stdout
    );
    // Disable, show.
    ok(&tally(&addr, &["keys", "disable", &id]).await);
    let shown = tally(&addr, &["keys", "show", &id, "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(ok(&shown)).unwrap();
    assert_eq!(shown["enabled"], false);
    ok(&tally(&addr, &["keys", "enable", &id]).await);
    // Rotate: a new secret.
    let rotated = tally(
        &addr,
        &["keys", "rotate", &id, "--grace-ms", "1000", "--json"],
    )
    .await;
    let rotated: serde_json::Value = serde_json::from_str(ok(&rotated)).unwrap();
    assert_ne!(rotated["secret"].as_str().unwrap(), secret);
    // A key needs a subscription: refused with a clear message, exit code non-zero.
    let bad = tally(
        &addr,
        &["keys", "create", "--name", "x", "--subscription", "gold"],
    )
    .await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("subscription"), "{}", bad.stderr);
    // Delete: gone for good.
    ok(&tally(&addr, &["keys", "delete", &id]).await);
    let gone = tally(&addr, &["keys", "show", &id]).await;
    assert_ne!(gone.code, 0);
    // Subscriptions over the API: create, update, delete; the file's errors name the field.
    let file = dir.path().join("tiers.yaml");
    std::fs::write(
        &file,
        "subscriptions:\n  - name: team\n    models: [gpt-4o]\n    requests_per_minute: 7\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let made = tally(&addr, &["subscriptions", "create", "--file", path]).await;
    assert!(ok(&made).contains("team"), "{}", made.stdout);
    let again = tally(&addr, &["subscriptions", "create", "--file", path]).await;
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("exists"), "{}", again.stderr);
    std::fs::write(
        &file,
        "subscriptions:\n  - name: team\n    requests_per_minute: 9\n",
    )
    .unwrap();
    ok(&tally(&addr, &["subscriptions", "update", "--file", path]).await);
    let shown = tally(&addr, &["subscriptions", "show", "team", "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(ok(&shown)).unwrap();
    assert_eq!(shown[0]["requests_per_minute"], 9);
    std::fs::write(
        &file,
        "subscriptions:\n  - name: team\n    requests_per_minute: 0\n",
    )
    .unwrap();
    let bad = tally(&addr, &["subscriptions", "update", "--file", path]).await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("requests_per_minute"), "{}", bad.stderr);
    // The quotas its limits became are in force; deleting it removes it.
    ok(&tally(&addr, &["subscriptions", "delete", "team"]).await);
    let gone = tally(&addr, &["subscriptions", "show", "team"]).await;
    assert_ne!(gone.code, 0);
    // One with keys bound to it cannot go.
    ok(&tally(
        &addr,
        &[
            "keys",
            "create",
            "--name",
            "k2",
            "--subscription",
            "premium",
        ],
    )
    .await);
    let bound = tally(&addr, &["subscriptions", "delete", "premium"]).await;
    assert_ne!(bound.code, 0);
    assert!(bound.stderr.contains("bound"), "{}", bound.stderr);

    // Per-key overrides from a file; shown, and cleared.
    let made = tally(
        &addr,
        &[
            "keys",
            "create",
            "--name",
            "vip",
            "--subscription",
            "free",
            "--json",
        ],
    )
    .await;
    let made: serde_json::Value = serde_json::from_str(ok(&made)).unwrap();
    let vip = made["key"]["id"].as_str().unwrap().to_owned();
    let over = dir.path().join("vip.yaml");
    std::fs::write(
        &over,
        "requests_per_minute: 50\nmodels: [gpt-4o-mini, gpt-4o]\n",
    )
    .unwrap();
    let over = over.to_str().unwrap();
    ok(&tally(&addr, &["keys", "override", &vip, "--file", over]).await);
    let shown = tally(&addr, &["keys", "show", &vip, "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(ok(&shown)).unwrap();
    assert_eq!(shown["overrides"]["requests_per_minute"], 50);
    assert_eq!(shown["effective"]["requests_per_minute"], 50);
    assert_eq!(
        shown["effective"]["tokens_per_minute"], 100,
        "the tier's value"
    );
    let table = tally(&addr, &["keys", "show", &vip]).await;
    assert!(ok(&table).contains("overrides:"), "{}", table.stdout);
    std::fs::write(dir.path().join("bad.yaml"), "requests_per_minute: 0\n").unwrap();
    let bad_path = dir.path().join("bad.yaml");
    let bad = tally(
        &addr,
        &[
            "keys",
            "override",
            &vip,
            "--file",
            bad_path.to_str().unwrap(),
        ],
    )
    .await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("requests_per_minute"), "{}", bad.stderr);
    ok(&tally(&addr, &["keys", "override", &vip, "--clear"]).await);
    let shown = tally(&addr, &["keys", "show", &vip, "--json"]).await;
    let shown: serde_json::Value = serde_json::from_str(ok(&shown)).unwrap();
    assert!(shown["overrides"].is_null(), "{shown}");
    assert_eq!(shown["effective"]["requests_per_minute"], 5);

    // Every change above is in the audit log, by the loopback caller (no tokens here).
    let audit = tally(&addr, &["audit", "--target", &id]).await;
    let table = ok(&audit);
    assert!(table.starts_with("SEQ"), "{table}");
    for action in [
        "keys.create",
        "keys.disable",
        "keys.enable",
        "keys.rotate",
        "keys.delete",
    ] {
        assert!(table.contains(action), "{action}: {table}");
    }
    assert!(table.contains("loopback"), "{table}");
    let lines = tally(&addr, &["audit", "--target", "premium", "--json"]).await;
    let records: Vec<serde_json::Value> = ok(&lines)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["action"] == "subscriptions.delete")
        .collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    assert!(refused[0]["error"].as_str().unwrap().contains("bound"));
    assert_eq!(refused[0]["before"]["name"], "premium");
    let paged = tally(&addr, &["audit", "--after", "1", "--limit", "2", "--json"]).await;
    let seqs: Vec<u64> = ok(&paged)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [2, 3]);
    let bad = tally(&addr, &["audit", "--limit", "0"]).await;
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("--limit"), "{}", bad.stderr);
    assert!(!format!("{table}{records:?}").contains(&secret[21..]));
    running.stop().await.unwrap();
}
