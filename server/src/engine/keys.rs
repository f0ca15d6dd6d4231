//! Keys and subscriptions: the table, the commands that change it, and authorization.
//!
//! Architecture invariant: a deleted key's id is never valid again (a tombstone stays).
//! Architecture invariant: a subscription's limits are quotas of the meter named
//! `sub:<subscription>:<limit>` (per key: `per: [subject]`, matching `subscription`); they are
//! rebuilt whenever a subscription changes, and configured quotas may not use the prefix.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::access::{
    Authorization, Authorize, CLASSIFICATIONS, Denial, Grant, KeyOverrides, KeyView,
    LAST_USED_EVERY_MS, MAX_KEYS, MAX_ROTATION_GRACE_MS, MAX_SUBSCRIPTIONS, NewKey, SecretHash,
    Subscription, valid_key_id,
};
use super::command::CommandError;
use super::limits::WindowSpec;
use super::usage::{Dimension, Enforcement, Metric, QuotaFilter, QuotaSpec};

/// Names of quotas derived from subscriptions start with this.
pub const DERIVED_PREFIX: &str = "sub:";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Key {
    view: KeyView,
    hash: SecretHash,
    /// The secret before the last rotation, accepted until the time given.
    previous: Option<(SecretHash, i64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Keys {
    // Ordered maps: a snapshot's bytes are the same on every replica.
    keys: BTreeMap<String, Key>,
    deleted: BTreeSet<String>,
    subscriptions: BTreeMap<String, Subscription>,
}

fn unknown(id: &str) -> CommandError {
    CommandError::invalid("id", format!("no key {id:?}"))
}

impl Keys {
    pub fn create(&mut self, k: &NewKey, now_ms: i64) -> Result<KeyView, CommandError> {
        k.validate()?;
        if self.keys.contains_key(&k.id) || self.deleted.contains(&k.id) {
            return Err(CommandError::invalid("id", format!("{:?} is taken", k.id)));
        }
        if self.keys.len() + self.deleted.len() >= MAX_KEYS {
            return Err(CommandError::UsageTableFull {
                table: "key table".into(),
                max: MAX_KEYS as u64,
            });
        }
        if let Some(s) = &k.subscription
            && !self.subscriptions.contains_key(s)
        {
            return Err(CommandError::invalid(
                "subscription",
                format!("no subscription {s:?}"),
            ));
        }
        let view = KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            description: k.description.clone(),
            subscription: k.subscription.clone(),
            labels: k.labels.clone(),
            created_ms: now_ms,
            created_by: k.created_by.clone(),
            expires_ms: k.expires_ms,
            ephemeral: k.ephemeral,
            enabled: true,
            last_used_ms: None,
            rotated_ms: None,
            previous_valid_until_ms: None,
            overrides: k.overrides.clone().filter(|o| !o.is_empty()).map(Box::new),
        };
        let key = Key {
            view: view.clone(),
            hash: k.secret_sha256,
            previous: None,
        };
        self.keys.insert(k.id.clone(), key);
        Ok(view)
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<KeyView, CommandError> {
        let key = self.keys.get_mut(id).ok_or_else(|| unknown(id))?;
        key.view.enabled = enabled;
        Ok(key.view.clone())
    }

    /// Deletes a key for good: its id stays taken and never authorizes again.
    pub fn delete(&mut self, id: &str) -> Result<(), CommandError> {
        self.keys.remove(id).ok_or_else(|| unknown(id))?;
        self.deleted.insert(id.to_owned());
        Ok(())
    }

    pub fn rotate(
        &mut self,
        id: &str,
        hash: SecretHash,
        grace_ms: u64,
        now_ms: i64,
    ) -> Result<KeyView, CommandError> {
        if grace_ms > MAX_ROTATION_GRACE_MS {
            return Err(CommandError::invalid(
                "grace_ms",
                format!("at most {MAX_ROTATION_GRACE_MS} (7 days)"),
            ));
        }
        let key = self.keys.get_mut(id).ok_or_else(|| unknown(id))?;
        let until_ms = now_ms.saturating_add(i64::try_from(grace_ms).unwrap_or(i64::MAX));
        key.previous = (grace_ms > 0).then_some((key.hash, until_ms));
        key.hash = hash;
        key.view.rotated_ms = Some(now_ms);
        key.view.previous_valid_until_ms = key.previous.map(|(_, t)| t);
        Ok(key.view.clone())
    }

    /// Whether the presented secret may make this request now; marks the key used.
    pub fn authorize(&mut self, a: &Authorize, now_ms: i64) -> Authorization {
        if !valid_key_id(&a.key_id) {
            return Err(Denial::UnknownKey);
        }
        let Some(key) = self.keys.get_mut(&a.key_id) else {
            return Err(if self.deleted.contains(&a.key_id) {
                Denial::DeletedKey
            } else {
                Denial::UnknownKey
            });
        };
        if key.view.expires_ms.is_some_and(|t| t <= now_ms) {
            return Err(Denial::ExpiredKey);
        }
        let current = bool::from(key.hash.ct_eq(&a.secret_sha256));
        let previous = key
            .previous
            .is_some_and(|(h, until)| now_ms < until && bool::from(h.ct_eq(&a.secret_sha256)));
        if !current && !previous {
            return Err(Denial::BadSecret);
        }
        if !key.view.enabled {
            return Err(Denial::Disabled);
        }
        if let Some(sub) = key
            .view
            .subscription
            .as_ref()
            .and_then(|s| self.subscriptions.get(s))
        {
            match &key.view.overrides {
                None => permitted(sub, a)?,
                Some(o) => permitted(&o.apply(sub), a)?,
            }
        }
        if key
            .view
            .last_used_ms
            .is_none_or(|t| now_ms - t >= LAST_USED_EVERY_MS)
        {
            key.view.last_used_ms = Some(now_ms);
        }
        Ok(Grant {
            key_id: key.view.id.clone(),
            name: key.view.name.clone(),
            subscription: key.view.subscription.clone(),
            labels: key.view.labels.clone(),
            model: a.model.clone(),
        })
    }

    /// Replaces a key's overrides (`None`: none); answers the previous ones.
    pub fn set_overrides(
        &mut self,
        id: &str,
        overrides: Option<KeyOverrides>,
    ) -> Result<Option<KeyOverrides>, CommandError> {
        let key = self.keys.get_mut(id).ok_or_else(|| unknown(id))?;
        let overrides = overrides.filter(|o| !o.is_empty());
        if let Some(o) = &overrides {
            if key.view.subscription.is_none() {
                return Err(CommandError::invalid(
                    "overrides",
                    "a legacy key has no subscription to override",
                ));
            }
            o.validate()?;
        }
        let previous = std::mem::replace(&mut key.view.overrides, overrides.map(Box::new));
        Ok(previous.map(|o| *o))
    }

    /// The subscription as it applies to key `id` (its overrides applied).
    pub fn effective_subscription(&self, id: &str) -> Option<Subscription> {
        let view = &self.keys.get(id)?.view;
        let sub = self.subscriptions.get(view.subscription.as_ref()?)?;
        Some(match &view.overrides {
            None => sub.clone(),
            Some(o) => o.apply(sub),
        })
    }

    pub fn put_subscription(&mut self, s: &Subscription) -> Result<(), CommandError> {
        s.validate()?;
        if !self.subscriptions.contains_key(&s.name)
            && self.subscriptions.len() >= MAX_SUBSCRIPTIONS
        {
            return Err(CommandError::UsageTableFull {
                table: "subscription table".into(),
                max: MAX_SUBSCRIPTIONS as u64,
            });
        }
        self.subscriptions.insert(s.name.clone(), s.clone());
        Ok(())
    }

    /// Deletes a subscription no key is bound to.
    pub fn delete_subscription(&mut self, name: &str) -> Result<(), CommandError> {
        if !self.subscriptions.contains_key(name) {
            return Err(CommandError::invalid(
                "name",
                format!("no subscription {name:?}"),
            ));
        }
        let bound = self
            .keys
            .values()
            .filter(|k| k.view.subscription.as_deref() == Some(name))
            .count();
        if bound > 0 {
            return Err(CommandError::invalid(
                "name",
                format!("{bound} keys are bound to {name:?}; delete them first"),
            ));
        }
        self.subscriptions.remove(name);
        Ok(())
    }

    pub fn key(&self, id: &str) -> Option<&KeyView> {
        self.keys.get(id).map(|k| &k.view)
    }

    /// Keys in id order.
    pub fn list(&self) -> Vec<&KeyView> {
        self.keys.values().map(|k| &k.view).collect()
    }

    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.subscriptions.values()
    }

    pub fn subscription(&self, name: &str) -> Option<&Subscription> {
        self.subscriptions.get(name)
    }

    /// The quotas every subscription's limits become: per key of the tier, except the keys
    /// with overrides, which get quotas of their own (`sub:<tier>:<limit>@<key id>`).
    ///
    /// O(keys): called only when a subscription or a key's overrides change.
    pub fn derived_quotas(&self) -> Vec<QuotaSpec> {
        let overriding: Vec<&KeyView> = self
            .keys
            .values()
            .map(|k| &k.view)
            .filter(|v| v.overrides.is_some())
            .collect();
        let mut out = Vec::new();
        for s in self.subscriptions.values() {
            // Key ids in map order: sorted, as the filter's binary search needs.
            let except: Vec<String> = overriding
                .iter()
                .filter(|v| v.subscription.as_deref() == Some(s.name.as_str()))
                .map(|v| v.id.clone())
                .collect();
            out.extend(derived(s).into_iter().map(|mut q| {
                q.filter.except_subjects = except.clone();
                q
            }));
        }
        for view in overriding {
            let Some(effective) = self.effective_subscription(&view.id) else {
                continue;
            };
            out.extend(derived(&effective).into_iter().map(|mut q| {
                q.name = format!("{}@{}", q.name, view.id);
                q.filter.subject = Some(view.id.clone());
                q
            }));
        }
        out
    }
}

fn key_outcome(view: KeyView) -> super::Outcome {
    super::Outcome::Key(Box::new(view))
}

/// Whether `sub` lets a request for this model and classification through.
fn permitted(sub: &Subscription, a: &Authorize) -> Result<(), Denial> {
    if let Some(model) = &a.model
        && !sub.allowed_models.is_empty()
        && !sub.allowed_models.contains(model)
    {
        return Err(Denial::ModelNotAllowed {
            model: model.clone(),
            subscription: sub.name.clone(),
        });
    }
    if let (Some(level), Some(max)) = (a.classification, sub.max_classification)
        && level > max
    {
        let name = |l: u8| {
            CLASSIFICATIONS
                .get(usize::from(l))
                .copied()
                .unwrap_or("?")
                .to_owned()
        };
        return Err(Denial::ClassificationTooHigh {
            level: name(level),
            max: name(max),
        });
    }
    Ok(())
}

/// A subscription's limits as per-key quotas.
fn derived(s: &Subscription) -> Vec<QuotaSpec> {
    let quota = |limit: &str, metric, value, window| QuotaSpec {
        name: format!("{DERIVED_PREFIX}{}:{limit}", s.name),
        filter: QuotaFilter {
            subscription: Some(s.name.clone()),
            ..QuotaFilter::default()
        },
        per: vec![Dimension::Subject],
        metric,
        limit: value,
        window,
        enforcement: Enforcement::Hard,
        thresholds_pct: Vec::new(),
    };
    let minute = || {
        Some(WindowSpec::Rolling {
            window_ms: 60_000,
            resolution_ms: 1_000,
        })
    };
    let mut out = Vec::new();
    if let Some(n) = s.requests_per_minute {
        out.push(quota("requests-per-minute", Metric::Requests, n, minute()));
    }
    if let Some(n) = s.tokens_per_minute {
        out.push(quota("tokens-per-minute", Metric::TotalTokens, n, minute()));
    }
    if let Some(n) = s.max_concurrent {
        out.push(quota("concurrent", Metric::Concurrent, n, None));
    }
    for b in &s.budgets {
        let mut q = quota(&b.name, b.metric, b.limit, Some(b.window.clone()));
        q.enforcement = b.enforcement;
        q.thresholds_pct = b.thresholds_pct.clone();
        out.push(q);
    }
    out
}

impl super::Engine {
    /// Applies one key or subscription command at `now_ms`.
    pub(crate) fn apply_access(
        &mut self,
        command: &super::Command,
        now_ms: i64,
    ) -> Result<super::Outcome, CommandError> {
        use super::{Command, Outcome};
        let keys = &mut self.keys;
        match command {
            Command::CreateKey(k) if k.overrides.is_some() => {
                let view = keys.create(k, now_ms)?;
                self.rebuild_key_quotas(|keys| {
                    keys.keys.remove(&view.id);
                })?;
                Ok(Outcome::Key(Box::new(view)))
            }
            Command::CreateKey(k) => keys.create(k, now_ms).map(key_outcome),
            Command::SetKeyOverrides { id, overrides } => {
                let previous = keys.set_overrides(id, overrides.clone())?;
                self.rebuild_key_quotas(|keys| {
                    keys.set_overrides(id, previous)
                        .expect("the previous overrides were valid");
                })?;
                Ok(key_outcome(
                    self.keys.key(id).expect("just changed").clone(),
                ))
            }
            Command::DeleteKey { id } if keys.key(id).is_some_and(|k| k.overrides.is_some()) => {
                keys.delete(id)?;
                // Fewer quotas than before: the rebuild cannot be refused.
                self.rebuild_key_quotas(|_| unreachable!("removing quotas is never refused"))?;
                Ok(Outcome::KeyDeleted { id: id.clone() })
            }
            Command::SetKeyEnabled { id, enabled } => {
                keys.set_enabled(id, *enabled).map(key_outcome)
            }
            Command::DeleteKey { id } => keys
                .delete(id)
                .map(|()| Outcome::KeyDeleted { id: id.clone() }),
            Command::RotateKey {
                id,
                secret_sha256,
                grace_ms,
            } => keys
                .rotate(id, *secret_sha256, *grace_ms, now_ms)
                .map(key_outcome),
            Command::PutSubscription(s) => self.change_subscriptions(|k| k.put_subscription(s)),
            Command::DeleteSubscription { name } => {
                self.change_subscriptions(|k| k.delete_subscription(name))
            }
            Command::Authorize(a) => Ok(Outcome::Authorized(keys.authorize(a, now_ms))),
            _ => unreachable!("apply_access takes key and subscription commands only"),
        }
    }

    /// Rebuilds the quotas subscriptions and overrides become after a key change; when they
    /// are refused (too many quotas), `undo` takes the change back.
    fn rebuild_key_quotas(&mut self, undo: impl FnOnce(&mut Keys)) -> Result<(), CommandError> {
        match self.meter.set_derived_quotas(self.keys.derived_quotas()) {
            Ok(_) => Ok(()),
            Err(e) => {
                undo(&mut self.keys);
                Err(e)
            }
        }
    }

    /// Changes the subscriptions and rebuilds the quotas they become; all or nothing.
    fn change_subscriptions(
        &mut self,
        change: impl FnOnce(&mut Keys) -> Result<(), CommandError>,
    ) -> Result<super::Outcome, CommandError> {
        // Subscriptions are few: keep a copy to put back if the quotas are refused.
        let before = self.keys.subscriptions.clone();
        change(&mut self.keys)?;
        match self.meter.set_derived_quotas(self.keys.derived_quotas()) {
            Ok(quotas) => Ok(super::Outcome::SubscriptionsChanged { quotas }),
            Err(e) => {
                self.keys.subscriptions = before;
                Err(e)
            }
        }
    }

    /// The key `id` (never its secret).
    pub fn key(&self, id: &str) -> Option<&KeyView> {
        self.keys.key(id)
    }

    /// Every key, in id order.
    pub fn keys(&self) -> Vec<&KeyView> {
        self.keys.list()
    }

    /// Every subscription, in name order.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.keys.subscriptions()
    }

    /// The subscription as it applies to key `id` (its overrides applied); `None` for a
    /// legacy key or no such key.
    pub fn effective_subscription(&self, id: &str) -> Option<Subscription> {
        self.keys.effective_subscription(id)
    }

    /// The models key `id` may use: its subscription's list, or every priced model when the
    /// list is empty (or the key is a legacy key). `None` for no such key.
    pub fn models_for(&self, id: &str) -> Option<Vec<String>> {
        self.keys.key(id)?;
        let listed = self
            .keys
            .effective_subscription(id)
            .map(|s| s.allowed_models)
            .unwrap_or_default();
        if !listed.is_empty() {
            return Some(listed);
        }
        Some(
            self.prices()
                .1
                .models
                .iter()
                .map(|m| m.model.clone())
                .collect(),
        )
    }
}
