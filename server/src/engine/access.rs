//! Access: virtual API keys and the subscriptions (tiers) they are bound to, as plain data —
//! the interface of `engine::keys`.
//!
//! Secrets never enter the engine: the API layer draws a key's secret, shows it once, and
//! proposes only its SHA-256. Every decision about a key (valid? enabled? expired? may it use
//! this model?) is a command applied at batch time, so it is the same on every replica and
//! changes exactly at the batch whose stamp passes a key's expiry or follows a disable.

use serde::{Deserialize, Serialize};

use super::command::CommandError;
use super::limits::WindowSpec;
use super::usage::{Enforcement, Metric};

/// Most keys held at once (deleted ones included: their ids are never valid again).
pub const MAX_KEYS: usize = 1_000_000;
/// Most subscriptions.
pub const MAX_SUBSCRIPTIONS: usize = 1_000;
/// Longest key name, description, subscription name, model name or label, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;
/// Most labels on a key or subscription.
pub const MAX_LABELS: usize = 16;
/// Most models a subscription lists.
pub const MAX_MODELS: usize = 256;
/// Most budgets a subscription has.
pub const MAX_BUDGETS: usize = 8;
/// Key ids: this many characters of `[a-z0-9]`.
pub const KEY_ID_LEN: usize = 16;
/// Longest grace period of a rotated key's old secret: 7 days.
pub const MAX_ROTATION_GRACE_MS: u64 = 7 * 86_400_000;
/// Last-used times are written at most once per this period per key (debounced).
pub const LAST_USED_EVERY_MS: i64 = 60_000;
/// Data-classification levels, lowest first; a subscription's ceiling is one of them.
pub const CLASSIFICATIONS: [&str; 4] = ["public", "internal", "confidential", "restricted"];

/// A SHA-256 digest of a key's secret.
pub type SecretHash = [u8; 32];

/// A key to create. `id` and `secret_sha256` are drawn by the API layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub description: String,
    /// The subscription it is bound to, for good; `None`: a legacy key (no limits, every
    /// model, no classification ceiling) — kept working until deleted.
    pub subscription: Option<String>,
    pub labels: Vec<(String, String)>,
    /// It stops being valid at the first batch at or after this time.
    pub expires_ms: Option<i64>,
    /// Issued through the ephemeral-key path (short-lived by construction).
    pub ephemeral: bool,
    pub secret_sha256: SecretHash,
    /// Who asked (token name, or the key that issued an ephemeral key), for the record.
    pub created_by: String,
    /// This key's own values for some of its subscription's fields.
    pub overrides: Option<KeyOverrides>,
}

/// A key's own values for fields of its subscription: each one set replaces the
/// subscription's for this key alone (its limits become quotas of its own, named
/// `sub:<tier>:<limit>@<key id>`, and the tier's quotas no longer count it). An override sets
/// a value; it cannot lift a limit (set it high instead).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOverrides {
    /// Models the key may use (empty: every model).
    pub allowed_models: Option<Vec<String>>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Replaces the subscription's whole list of budgets.
    pub budgets: Option<Vec<Budget>>,
    pub max_classification: Option<u8>,
    pub max_concurrent: Option<u64>,
    /// Replaces the subscription's audit labels.
    pub labels: Option<Vec<(String, String)>>,
}

impl KeyOverrides {
    pub fn is_empty(&self) -> bool {
        *self == KeyOverrides::default()
    }

    /// The subscription as it applies to a key with these overrides.
    pub fn apply(&self, sub: &Subscription) -> Subscription {
        let or = |mine: Option<u64>, theirs: Option<u64>| mine.or(theirs);
        Subscription {
            name: sub.name.clone(),
            allowed_models: self
                .allowed_models
                .clone()
                .unwrap_or_else(|| sub.allowed_models.clone()),
            requests_per_minute: or(self.requests_per_minute, sub.requests_per_minute),
            tokens_per_minute: or(self.tokens_per_minute, sub.tokens_per_minute),
            budgets: self.budgets.clone().unwrap_or_else(|| sub.budgets.clone()),
            max_classification: self.max_classification.or(sub.max_classification),
            max_concurrent: or(self.max_concurrent, sub.max_concurrent),
            labels: self.labels.clone().unwrap_or_else(|| sub.labels.clone()),
        }
    }

    /// Checks the overrides on their own (the subscription's checks, fields named
    /// `overrides.<field>`).
    pub fn validate(&self) -> Result<(), CommandError> {
        let probe = self.apply(&Subscription {
            name: "overrides".into(),
            ..Subscription::default()
        });
        probe.validate().map_err(|e| match e {
            CommandError::Invalid { field, reason } => {
                CommandError::invalid(format!("overrides.{field}"), reason)
            }
            other => other,
        })
    }
}

/// A key as shown (never its secret or hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub subscription: Option<String>,
    pub labels: Vec<(String, String)>,
    pub created_ms: i64,
    pub created_by: String,
    pub expires_ms: Option<i64>,
    pub ephemeral: bool,
    pub enabled: bool,
    /// Debounced: within [`LAST_USED_EVERY_MS`] of the true last use.
    pub last_used_ms: Option<i64>,
    /// When the secret was last rotated, and until when the previous one is still accepted.
    pub rotated_ms: Option<i64>,
    pub previous_valid_until_ms: Option<i64>,
    /// This key's own values for fields of its subscription, if any.
    pub overrides: Option<Box<KeyOverrides>>,
}

/// One budget of a subscription: a quota per key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    pub name: String,
    pub metric: Metric,
    pub limit: u64,
    pub window: WindowSpec,
    pub enforcement: Enforcement,
    pub thresholds_pct: Vec<u8>,
}

/// A tier: what its keys may use and the limits every one of them gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub name: String,
    /// Models its keys may use; empty: every model.
    pub allowed_models: Vec<String>,
    /// Requests per rolling 60 s, per key.
    pub requests_per_minute: Option<u64>,
    /// Tokens (input + output) per rolling 60 s, per key.
    pub tokens_per_minute: Option<u64>,
    pub budgets: Vec<Budget>,
    /// Highest data classification (index into [`CLASSIFICATIONS`]) its keys may send.
    pub max_classification: Option<u8>,
    /// Requests in flight per key.
    pub max_concurrent: Option<u64>,
    /// Labels recorded with every audit entry about it.
    pub labels: Vec<(String, String)>,
}

/// Asks whether a presented secret may make a request (and marks the key used).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorize {
    pub key_id: String,
    pub secret_sha256: SecretHash,
    pub model: Option<String>,
    pub classification: Option<u8>,
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Denial {
    #[error("unknown API key")]
    UnknownKey,
    #[error("this API key was deleted")]
    DeletedKey,
    #[error("this API key expired")]
    ExpiredKey,
    #[error("invalid API key")]
    BadSecret,
    #[error("this API key is disabled")]
    Disabled,
    #[error("model {model:?} is not allowed for subscription {subscription:?}")]
    ModelNotAllowed { model: String, subscription: String },
    #[error("data classification {level:?} is above this key's ceiling {max:?}")]
    ClassificationTooHigh { level: String, max: String },
}

impl Denial {
    /// 401 (who are you?) rather than 403 (not allowed).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Denial::UnknownKey | Denial::DeletedKey | Denial::ExpiredKey | Denial::BadSecret
        )
    }
}

/// A request allowed: who it is charged to (the headers the rate-limit filter's descriptors
/// use).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub key_id: String,
    pub name: String,
    pub subscription: Option<String>,
    pub labels: Vec<(String, String)>,
    pub model: Option<String>,
}

/// The answer to [`Authorize`].
pub type Authorization = Result<Grant, Denial>;

/// Checks a short text field.
pub(crate) fn check_text(field: &str, value: &str, required: bool) -> Result<(), CommandError> {
    if required && value.is_empty() {
        return Err(CommandError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(CommandError::invalid(
            field,
            format!("{} bytes; at most {MAX_TEXT_BYTES}", value.len()),
        ));
    }
    Ok(())
}

/// Checks labels: bounded, keys non-empty and unique.
pub(crate) fn check_labels(field: &str, labels: &[(String, String)]) -> Result<(), CommandError> {
    if labels.len() > MAX_LABELS {
        return Err(CommandError::invalid(
            field,
            format!("{} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (i, (k, v)) in labels.iter().enumerate() {
        check_text(&format!("{field}[{i}].key"), k, true)?;
        check_text(&format!("{field}[{i}].value"), v, false)?;
        if labels[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(CommandError::invalid(
                format!("{field}[{i}].key"),
                format!("{k:?} is repeated"),
            ));
        }
    }
    Ok(())
}

/// Whether `id` is a well-formed key id.
pub fn valid_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl NewKey {
    pub fn validate(&self) -> Result<(), CommandError> {
        if !valid_key_id(&self.id) {
            return Err(CommandError::invalid(
                "id",
                format!("{KEY_ID_LEN} characters of a-z and 0-9"),
            ));
        }
        check_text("name", &self.name, true)?;
        check_text("description", &self.description, false)?;
        if let Some(s) = &self.subscription {
            check_text("subscription", s, true)?;
        }
        check_text("created_by", &self.created_by, false)?;
        check_labels("labels", &self.labels)?;
        match &self.overrides {
            Some(_) if self.subscription.is_none() => Err(CommandError::invalid(
                "overrides",
                "a legacy key has no subscription to override",
            )),
            Some(o) => o.validate(),
            None => Ok(()),
        }
    }
}

impl Subscription {
    pub fn validate(&self) -> Result<(), CommandError> {
        check_text("name", &self.name, true)?;
        if self.allowed_models.len() > MAX_MODELS {
            return Err(CommandError::invalid(
                "allowed_models",
                format!("at most {MAX_MODELS}"),
            ));
        }
        for (i, m) in self.allowed_models.iter().enumerate() {
            check_text(&format!("allowed_models[{i}]"), m, true)?;
        }
        for (field, v) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("max_concurrent", self.max_concurrent),
        ] {
            if v == Some(0) {
                return Err(CommandError::invalid(
                    field,
                    "must be at least 1 (or unset)",
                ));
            }
        }
        if self
            .max_classification
            .is_some_and(|c| usize::from(c) >= CLASSIFICATIONS.len())
        {
            return Err(CommandError::invalid(
                "max_classification",
                format!("one of {}", CLASSIFICATIONS.join(", ")),
            ));
        }
        if self.budgets.len() > MAX_BUDGETS {
            return Err(CommandError::invalid(
                "budgets",
                format!("at most {MAX_BUDGETS}"),
            ));
        }
        for (i, b) in self.budgets.iter().enumerate() {
            check_text(&format!("budgets[{i}].name"), &b.name, true)?;
            if self.budgets[..i].iter().any(|o| o.name == b.name) {
                return Err(CommandError::invalid(
                    format!("budgets[{i}].name"),
                    format!("{:?} is repeated", b.name),
                ));
            }
            if b.metric == Metric::Concurrent {
                return Err(CommandError::invalid(
                    format!("budgets[{i}].metric"),
                    "use max_concurrent for in-flight caps",
                ));
            }
        }
        check_labels("labels", &self.labels)
    }
}
