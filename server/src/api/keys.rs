//! `tally.v1.Keys`: API keys (create, list, show, disable/enable, delete, rotate, ephemeral)
//! and the subscriptions they are bound to.
//!
//! Secrets are drawn here (`key_secret`), returned once, and never reach the engine: it gets
//! their SHA-256. Every change is a replicated command proposed through the [`Node`]; reads
//! are linearizable. Wire ⇄ domain conversions are the small `From` impls at the bottom.

use std::time::Duration;

use tally_proto::tally::v1 as wire;
use tally_proto::tally::v1::keys_server;
use tonic::{Request, Response, Status};

use super::audit::{actor, audited};
use super::auth::Caller;
use super::deadline;
use super::key_secret;
use super::status;
use crate::engine::access::{
    Authorize, CLASSIFICATIONS, KeyOverrides, KeyView, NewKey, Subscription,
};
use crate::engine::audit::Actor;
use crate::engine::{Command, CommandError, Engine, Outcome};
use crate::node::Node;

/// Lifetime of an ephemeral key without a TTL in the request.
pub const DEFAULT_EPHEMERAL_TTL_MS: u64 = 4 * 3_600_000;
/// Longest lifetime of an ephemeral key.
pub const MAX_EPHEMERAL_TTL_MS: u64 = 24 * 3_600_000;

pub struct Keys {
    node: Node,
}

impl Keys {
    pub fn new(node: Node) -> Keys {
        Keys { node }
    }

    async fn propose(
        &self,
        command: Command,
        deadline: Option<Duration>,
    ) -> Result<Outcome, Status> {
        let late = "not applied within the caller's deadline (no leader or no quorum)";
        match deadline::propose(&self.node, command, deadline, late).await? {
            Outcome::Rejected(e) => Err(e.into()),
            other => Ok(other),
        }
    }

    async fn key_outcome(
        &self,
        command: Command,
        deadline: Option<Duration>,
    ) -> Result<KeyView, Status> {
        match self.propose(command, deadline).await? {
            Outcome::Key(view) => Ok(*view),
            other => Err(status::unexpected(&other)),
        }
    }

    async fn read<R>(
        &self,
        deadline: Option<Duration>,
        f: impl FnOnce(&Engine) -> R,
    ) -> Result<R, Status> {
        deadline::read(&self.node, deadline, f).await
    }

    /// Creates a key with a fresh id and secret; answers it with the secret.
    async fn create(
        &self,
        actor: &Actor,
        mut key: NewKey,
        deadline: Option<Duration>,
    ) -> Result<wire::KeyWithSecret, Status> {
        key.id = key_secret::new_key_id();
        let secret = key_secret::generate(&key.id);
        key.secret_sha256 = key_secret::hash(&secret);
        key.validate()?;
        let command = audited(actor, Command::CreateKey(key));
        let view = self.key_outcome(command, deadline).await?;
        Ok(wire::KeyWithSecret {
            key: Some(view.into()),
            secret,
        })
    }
}

/// A key as shown by reads: with its subscription as it applies to it.
fn with_effective(e: &Engine, k: KeyView) -> wire::Key {
    let effective = e
        .effective_subscription(&k.id)
        .map(wire::Subscription::from);
    wire::Key {
        effective,
        ..k.into()
    }
}

/// A key-overrides document (empty: none); its errors name the request field.
fn overrides(document: &str, field: &str) -> Result<Option<KeyOverrides>, Status> {
    let parsed = crate::config::subscriptions::parse_key_overrides(document, field)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((!parsed.is_empty()).then_some(parsed))
}

fn labels(wire: Vec<wire::Label>) -> Vec<(String, String)> {
    wire.into_iter().map(|l| (l.key, l.value)).collect()
}

fn expiry(ms: i64) -> Result<Option<i64>, CommandError> {
    match ms {
        0 => Ok(None),
        t if t < 0 => Err(CommandError::invalid(
            "expires_ms",
            "must be a Unix time in ms",
        )),
        t => Ok(Some(t)),
    }
}

#[tonic::async_trait]
impl keys_server::Keys for Keys {
    async fn create_key(
        &self,
        request: Request<wire::CreateKeyRequest>,
    ) -> Result<Response<wire::KeyWithSecret>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let r = request.into_inner();
        let subscription = match (r.legacy, r.subscription.is_empty()) {
            (true, true) => None,
            (false, false) => Some(r.subscription),
            (true, false) => {
                return Err(CommandError::invalid("subscription", "a legacy key has none").into());
            }
            (false, true) => {
                return Err(CommandError::invalid(
                    "subscription",
                    "required: a key is bound to a subscription at creation",
                )
                .into());
            }
        };
        let key = NewKey {
            id: String::new(),
            name: r.name,
            description: r.description,
            subscription,
            labels: labels(r.labels),
            expires_ms: expiry(r.expires_ms)?,
            ephemeral: false,
            secret_sha256: [0; 32],
            created_by: actor.name.clone(),
            overrides: overrides(&r.overrides, "overrides")?,
        };
        Ok(Response::new(self.create(&actor, key, deadline).await?))
    }

    async fn list_keys(
        &self,
        request: Request<wire::ListKeysRequest>,
    ) -> Result<Response<wire::ListKeysResponse>, Status> {
        let deadline = deadline::of(&request);
        let keys = self
            .read(deadline, |e| {
                e.keys()
                    .into_iter()
                    .map(|k| with_effective(e, k.clone()))
                    .collect()
            })
            .await?;
        Ok(Response::new(wire::ListKeysResponse { keys }))
    }

    async fn get_key(
        &self,
        request: Request<wire::GetKeyRequest>,
    ) -> Result<Response<wire::Key>, Status> {
        let deadline = deadline::of(&request);
        let id = request.into_inner().id;
        let key = self
            .read(deadline, |e| {
                e.key(&id).map(|k| with_effective(e, k.clone()))
            })
            .await?;
        key.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no key {id:?}")))
    }

    async fn set_key_enabled(
        &self,
        request: Request<wire::SetKeyEnabledRequest>,
    ) -> Result<Response<wire::Key>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let r = request.into_inner();
        let command = audited(
            &actor,
            Command::SetKeyEnabled {
                id: r.id,
                enabled: r.enabled,
            },
        );
        Ok(Response::new(
            self.key_outcome(command, deadline).await?.into(),
        ))
    }

    async fn delete_key(
        &self,
        request: Request<wire::DeleteKeyRequest>,
    ) -> Result<Response<wire::DeleteKeyResponse>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let id = request.into_inner().id;
        match self
            .propose(audited(&actor, Command::DeleteKey { id }), deadline)
            .await?
        {
            Outcome::KeyDeleted { id } => Ok(Response::new(wire::DeleteKeyResponse { id })),
            other => Err(status::unexpected(&other)),
        }
    }

    async fn rotate_key(
        &self,
        request: Request<wire::RotateKeyRequest>,
    ) -> Result<Response<wire::KeyWithSecret>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let r = request.into_inner();
        let secret = key_secret::generate(&r.id);
        let command = audited(
            &actor,
            Command::RotateKey {
                secret_sha256: key_secret::hash(&secret),
                id: r.id,
                grace_ms: r.grace_ms,
            },
        );
        let view = self.key_outcome(command, deadline).await?;
        Ok(Response::new(wire::KeyWithSecret {
            key: Some(view.into()),
            secret,
        }))
    }

    async fn create_ephemeral_key(
        &self,
        request: Request<wire::CreateEphemeralKeyRequest>,
    ) -> Result<Response<wire::KeyWithSecret>, Status> {
        let deadline = deadline::of(&request);
        let admin = request.extensions().get::<Caller>().cloned();
        let r = request.into_inner();
        let ttl_ms = match r.ttl_ms {
            0 => DEFAULT_EPHEMERAL_TTL_MS,
            t if t > MAX_EPHEMERAL_TTL_MS => {
                return Err(CommandError::invalid(
                    "ttl_ms",
                    format!("at most {MAX_EPHEMERAL_TTL_MS} (24 hours)"),
                )
                .into());
            }
            t => t,
        };
        let (subscription, actor) = self.ephemeral_parent(&r, admin, deadline).await?;
        let now_ms = self.read(deadline, Engine::last_ms).await?;
        let key = NewKey {
            id: String::new(),
            name: if r.name.is_empty() {
                "ephemeral".into()
            } else {
                r.name
            },
            description: format!("ephemeral key issued to {}", actor.name),
            subscription,
            labels: Vec::new(),
            expires_ms: Some(now_ms.saturating_add(ttl_ms as i64)),
            ephemeral: true,
            secret_sha256: [0; 32],
            created_by: actor.name.clone(),
            overrides: None,
        };
        Ok(Response::new(self.create(&actor, key, deadline).await?))
    }

    async fn list_subscriptions(
        &self,
        request: Request<wire::ListSubscriptionsRequest>,
    ) -> Result<Response<wire::ListSubscriptionsResponse>, Status> {
        let deadline = deadline::of(&request);
        let subscriptions = self
            .read(deadline, |e| {
                e.subscriptions()
                    .cloned()
                    .map(wire::Subscription::from)
                    .collect()
            })
            .await?;
        Ok(Response::new(wire::ListSubscriptionsResponse {
            subscriptions,
        }))
    }

    async fn put_subscriptions(
        &self,
        request: Request<wire::PutSubscriptionsRequest>,
    ) -> Result<Response<wire::ListSubscriptionsResponse>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let r = request.into_inner();
        let mode = wire::PutMode::try_from(r.mode)
            .map_err(|_| CommandError::invalid("mode", format!("unknown mode {}", r.mode)))?;
        let list = crate::config::subscriptions::parse_subscriptions(&r.document, "document")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let names: Vec<String> = list.iter().map(|s| s.name.clone()).collect();
        let in_force: Vec<String> = self
            .read(deadline, |e| {
                e.subscriptions().map(|s| s.name.clone()).collect()
            })
            .await?;
        check_mode(mode, &names, &in_force)?;
        for s in list {
            let command = audited(&actor, Command::PutSubscription(s));
            match self.propose(command, deadline).await? {
                Outcome::SubscriptionsChanged { .. } => {}
                other => return Err(status::unexpected(&other)),
            }
        }
        let subscriptions = self
            .read(deadline, |e| {
                e.subscriptions()
                    .filter(|s| names.contains(&s.name))
                    .cloned()
                    .map(wire::Subscription::from)
                    .collect()
            })
            .await?;
        Ok(Response::new(wire::ListSubscriptionsResponse {
            subscriptions,
        }))
    }

    async fn delete_subscription(
        &self,
        request: Request<wire::DeleteSubscriptionRequest>,
    ) -> Result<Response<wire::DeleteSubscriptionResponse>, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let name = request.into_inner().name;
        let command = audited(&actor, Command::DeleteSubscription { name: name.clone() });
        match self.propose(command, deadline).await? {
            Outcome::SubscriptionsChanged { .. } => {
                Ok(Response::new(wire::DeleteSubscriptionResponse { name }))
            }
            other => Err(status::unexpected(&other)),
        }
    }

    async fn set_key_overrides(
        &self,
        request: Request<wire::SetKeyOverridesRequest>,
    ) -> Result<Response<wire::Key>, Status> {
        Ok(Response::new(self.set_overrides(request).await?))
    }
}

impl Keys {
    async fn set_overrides(
        &self,
        request: Request<wire::SetKeyOverridesRequest>,
    ) -> Result<wire::Key, Status> {
        let deadline = deadline::of(&request);
        let actor = actor(&request);
        let r = request.into_inner();
        let command = Command::SetKeyOverrides {
            overrides: overrides(&r.document, "document")?,
            id: r.id,
        };
        let view = self.key_outcome(audited(&actor, command), deadline).await?;
        Ok(view.into())
    }
}

/// Refuses the whole document when create meets a name in force, or update one that is not.
fn check_mode(
    mode: wire::PutMode,
    names: &[String],
    in_force: &[String],
) -> Result<(), CommandError> {
    for name in names {
        let exists = in_force.contains(name);
        match mode {
            wire::PutMode::Create if exists => {
                return Err(CommandError::invalid(
                    "document",
                    format!("subscription {name:?} exists (update it instead)"),
                ));
            }
            wire::PutMode::Update if !exists => {
                return Err(CommandError::invalid(
                    "document",
                    format!("no subscription {name:?} (create it first)"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

impl Keys {
    /// Who an ephemeral key is issued for: the key whose secret the request carries (its
    /// subscription), or an admin (the subscription asked for).
    async fn ephemeral_parent(
        &self,
        r: &wire::CreateEphemeralKeyRequest,
        admin: Option<Caller>,
        deadline: Option<Duration>,
    ) -> Result<(Option<String>, Actor), Status> {
        if r.api_key.is_empty() {
            let Some(admin) = admin.filter(|c| c.role == super::auth::Role::Admin) else {
                return Err(Status::unauthenticated(
                    "an ephemeral key is issued to an existing key (api_key) or an admin",
                ));
            };
            if r.subscription.is_empty() {
                return Err(
                    CommandError::invalid("subscription", "required when an admin asks").into(),
                );
            }
            return Ok((Some(r.subscription.clone()), Actor::from(&admin)));
        }
        let Some(id) = key_secret::parse(&r.api_key) else {
            return Err(Status::unauthenticated("malformed api_key"));
        };
        let authorize = Command::Authorize(Authorize {
            key_id: id.to_owned(),
            secret_sha256: key_secret::hash(&r.api_key),
            model: None,
            classification: None,
        });
        match self.propose(authorize, deadline).await? {
            Outcome::Authorized(Ok(grant)) => {
                let actor = Actor::from_parts(&format!("key {}", grant.key_id), "key");
                Ok((grant.subscription, actor))
            }
            Outcome::Authorized(Err(denial)) if denial.is_unauthenticated() => {
                Err(Status::unauthenticated(denial.to_string()))
            }
            Outcome::Authorized(Err(denial)) => Err(Status::permission_denied(denial.to_string())),
            other => Err(status::unexpected(&other)),
        }
    }
}

impl From<KeyView> for wire::Key {
    fn from(k: KeyView) -> wire::Key {
        wire::Key {
            id: k.id,
            name: k.name,
            description: k.description,
            subscription: k.subscription.unwrap_or_default(),
            labels: k
                .labels
                .into_iter()
                .map(|(key, value)| wire::Label { key, value })
                .collect(),
            created_ms: k.created_ms,
            created_by: k.created_by,
            expires_ms: k.expires_ms.unwrap_or(0),
            ephemeral: k.ephemeral,
            enabled: k.enabled,
            last_used_ms: k.last_used_ms.unwrap_or(0),
            rotated_ms: k.rotated_ms.unwrap_or(0),
            previous_valid_until_ms: k.previous_valid_until_ms.unwrap_or(0),
            overrides_json: k
                .overrides
                .map(|o| crate::engine::audit::object_json(&o))
                .unwrap_or_default(),
            effective: None,
        }
    }
}

impl From<Subscription> for wire::Subscription {
    fn from(s: Subscription) -> wire::Subscription {
        wire::Subscription {
            name: s.name,
            allowed_models: s.allowed_models,
            requests_per_minute: s.requests_per_minute.unwrap_or(0),
            tokens_per_minute: s.tokens_per_minute.unwrap_or(0),
            max_concurrent: s.max_concurrent.unwrap_or(0),
            max_classification: s
                .max_classification
                .and_then(|c| CLASSIFICATIONS.get(usize::from(c)))
                .map_or_else(String::new, |c| (*c).to_owned()),
            budgets: s
                .budgets
                .into_iter()
                .map(|b| wire::SubscriptionBudget {
                    name: b.name,
                    metric: wire::Metric::from(b.metric) as i32,
                    limit: b.limit,
                    window: super::admin::describe_window(&b.window),
                    enforcement: wire::Enforcement::from(b.enforcement) as i32,
                    thresholds_pct: b.thresholds_pct.into_iter().map(u32::from).collect(),
                })
                .collect(),
            labels: s
                .labels
                .into_iter()
                .map(|(key, value)| wire::Label { key, value })
                .collect(),
        }
    }
}
