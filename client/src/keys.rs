//! `tally.v1.Keys` calls, and how keys and subscriptions are shown to people.

use crate::proto::tally::v1::Metric;
use crate::proto::tally::v1::keys_client::KeysClient;
use crate::proto::tally::v1::{
    CreateEphemeralKeyRequest, CreateKeyRequest, DeleteKeyRequest, DeleteSubscriptionRequest,
    GetKeyRequest, Key, KeyWithSecret, ListKeysRequest, ListSubscriptionsRequest, PutMode,
    PutSubscriptionsRequest, RotateKeyRequest, SetKeyEnabledRequest, SetKeyOverridesRequest,
    Subscription,
};
use crate::{ClientError, TallyClient, format_time_ms, format_usd, table};

impl TallyClient {
    /// `tally.v1.Keys/CreateKey`: a new key and its secret (shown this once).
    pub async fn create_key(
        &self,
        request: CreateKeyRequest,
    ) -> Result<KeyWithSecret, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        self.call(client.create_key(self.request(request))).await
    }

    /// `tally.v1.Keys/ListKeys`: every key (never a secret).
    pub async fn list_keys(&self) -> Result<Vec<Key>, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let r = self
            .call(client.list_keys(self.request(ListKeysRequest {})))
            .await?;
        Ok(r.keys)
    }

    /// `tally.v1.Keys/GetKey`.
    pub async fn get_key(&self, id: &str) -> Result<Key, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = GetKeyRequest { id: id.to_owned() };
        self.call(client.get_key(self.request(request))).await
    }

    /// `tally.v1.Keys/SetKeyEnabled`.
    pub async fn set_key_enabled(&self, id: &str, enabled: bool) -> Result<Key, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = SetKeyEnabledRequest {
            id: id.to_owned(),
            enabled,
        };
        self.call(client.set_key_enabled(self.request(request)))
            .await
    }

    /// `tally.v1.Keys/DeleteKey`: for good.
    pub async fn delete_key(&self, id: &str) -> Result<(), ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = DeleteKeyRequest { id: id.to_owned() };
        self.call(client.delete_key(self.request(request))).await?;
        Ok(())
    }

    /// `tally.v1.Keys/RotateKey`: a new secret; the old one valid for `grace_ms`.
    pub async fn rotate_key(&self, id: &str, grace_ms: u64) -> Result<KeyWithSecret, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = RotateKeyRequest {
            id: id.to_owned(),
            grace_ms,
        };
        self.call(client.rotate_key(self.request(request))).await
    }

    /// `tally.v1.Keys/CreateEphemeralKey`.
    pub async fn create_ephemeral_key(
        &self,
        request: CreateEphemeralKeyRequest,
    ) -> Result<KeyWithSecret, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        self.call(client.create_ephemeral_key(self.request(request)))
            .await
    }

    /// `tally.v1.Keys/SetKeyOverrides`: replaces a key's overrides of its subscription's
    /// fields (`document` in the config's syntax without `name`; empty: none).
    pub async fn set_key_overrides(&self, id: &str, document: String) -> Result<Key, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = SetKeyOverridesRequest {
            id: id.to_owned(),
            document,
        };
        self.call(client.set_key_overrides(self.request(request)))
            .await
    }

    /// `tally.v1.Keys/PutSubscriptions`: create or replace subscriptions from a document in
    /// the config file's syntax; answers them as now in force.
    pub async fn put_subscriptions(
        &self,
        document: String,
        mode: PutMode,
    ) -> Result<Vec<Subscription>, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = PutSubscriptionsRequest {
            document,
            mode: mode as i32,
        };
        let r = self
            .call(client.put_subscriptions(self.request(request)))
            .await?;
        Ok(r.subscriptions)
    }

    /// `tally.v1.Keys/DeleteSubscription`: one no key is bound to.
    pub async fn delete_subscription(&self, name: &str) -> Result<(), ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = DeleteSubscriptionRequest {
            name: name.to_owned(),
        };
        self.call(client.delete_subscription(self.request(request)))
            .await?;
        Ok(())
    }

    /// `tally.v1.Keys/ListSubscriptions`.
    pub async fn list_subscriptions(&self) -> Result<Vec<Subscription>, ClientError> {
        let mut client = KeysClient::new(self.channel.clone());
        let request = ListSubscriptionsRequest {};
        let r = self
            .call(client.list_subscriptions(self.request(request)))
            .await?;
        Ok(r.subscriptions)
    }
}

fn time_or(ms: i64, none: &str) -> String {
    if ms == 0 {
        none.to_owned()
    } else {
        format_time_ms(ms)
    }
}

fn labels(key: &Key) -> String {
    key.labels
        .iter()
        .map(|l| format!("{}={}", l.key, l.value))
        .collect::<Vec<_>>()
        .join(",")
}

/// Keys as a table: ID, NAME, SUBSCRIPTION, ENABLED, EXPIRES, LAST USED, LABELS.
pub fn render_keys(keys: &[Key]) -> String {
    let header: Vec<String> = [
        "ID",
        "NAME",
        "SUBSCRIPTION",
        "ENABLED",
        "EXPIRES",
        "LAST USED",
        "LABELS",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.name.clone(),
                if k.subscription.is_empty() {
                    "(legacy)".into()
                } else {
                    k.subscription.clone()
                },
                if k.enabled { "yes".into() } else { "no".into() },
                time_or(k.expires_ms, "never"),
                time_or(k.last_used_ms, "never"),
                labels(k),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// One key as JSON (never a secret: keys have none).
pub fn key_json(k: &Key) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = k
        .labels
        .iter()
        .map(|l| (l.key.clone(), serde_json::Value::String(l.value.clone())))
        .collect();
    serde_json::json!({
        "id": k.id,
        "name": k.name,
        "description": k.description,
        "subscription": k.subscription,
        "labels": labels,
        "enabled": k.enabled,
        "ephemeral": k.ephemeral,
        "created_ms": k.created_ms,
        "created_by": k.created_by,
        "expires_ms": k.expires_ms,
        "last_used_ms": k.last_used_ms,
        "rotated_ms": k.rotated_ms,
        "previous_valid_until_ms": k.previous_valid_until_ms,
        "overrides": if k.overrides_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&k.overrides_json)
                .unwrap_or_else(|_| serde_json::Value::String(k.overrides_json.clone()))
        },
        "effective": k.effective.as_ref().map(subscription_json),
    })
}

/// Subscriptions as a table.
pub fn render_subscriptions(subs: &[Subscription]) -> String {
    let header: Vec<String> = [
        "NAME",
        "MODELS",
        "REQ/MIN",
        "TOKENS/MIN",
        "CONCURRENT",
        "MAX CLASS",
        "BUDGETS",
    ]
    .map(String::from)
    .to_vec();
    let limit = |n: u64| {
        if n == 0 {
            "-".to_owned()
        } else {
            n.to_string()
        }
    };
    let rows: Vec<Vec<String>> = subs
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                if s.allowed_models.is_empty() {
                    "(all)".into()
                } else {
                    s.allowed_models.join(",")
                },
                limit(s.requests_per_minute),
                limit(s.tokens_per_minute),
                limit(s.max_concurrent),
                if s.max_classification.is_empty() {
                    "-".into()
                } else {
                    s.max_classification.clone()
                },
                s.budgets
                    .iter()
                    .map(|b| {
                        let limit = if b.metric == Metric::CostNusd as i32 {
                            format!("${}", format_usd(b.limit))
                        } else {
                            b.limit.to_string()
                        };
                        format!("{} {limit} ({})", b.name, b.window)
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// One subscription as JSON.
pub fn subscription_json(s: &Subscription) -> serde_json::Value {
    let budgets: Vec<serde_json::Value> = s
        .budgets
        .iter()
        .map(|b| serde_json::json!({ "name": b.name, "limit": b.limit, "window": b.window, "thresholds_pct": b.thresholds_pct }))
        .collect();
    serde_json::json!({
        "name": s.name,
        "allowed_models": s.allowed_models,
        "requests_per_minute": s.requests_per_minute,
        "tokens_per_minute": s.tokens_per_minute,
        "max_concurrent": s.max_concurrent,
        "max_classification": s.max_classification,
        "budgets": budgets,
    })
}
