//! The audit log: who changed what, when, and the object before and after.
//!
//! An admin change travels as [`Command::Audited`](super::Command::Audited): the change
//! itself and the [`Actor`] who asked for it (the API layer fills it in from the caller's
//! token). Applying it applies the change and appends one [`AuditRecord`], stamped with the
//! batch time, on every replica alike: the audit log is replicated state, in snapshots. A
//! refused change is recorded too (the attempt, with its error); nothing else of it is
//! applied. Changes that are not engine commands (cluster membership) are recorded with
//! [`Command::AuditNote`](super::Command::AuditNote) once they are done.
//!
//! Before and after are the changed object as JSON text (a key as `KeyView`, never a secret
//! or its hash; a subscription; the settings; the price catalog...). An object whose JSON is
//! longer than [`MAX_AUDIT_OBJECT_BYTES`] (a large limit set) is recorded as its size and
//! SHA-256 instead. The log keeps the newest [`MAX_AUDIT_RECORDS`] records and at most
//! [`MAX_AUDIT_BYTES`] of them; every record also goes to the process log (target
//! `tally::audit`), which is where long-term retention belongs.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::access::{NewKey, Subscription};
use super::keys::DERIVED_PREFIX;
use super::{Command, CommandError, Engine, Outcome};

/// Most audit records kept (oldest dropped first).
pub const MAX_AUDIT_RECORDS: usize = 10_000;
/// Most bytes of audit records kept (their objects' JSON and texts; oldest dropped first).
pub const MAX_AUDIT_BYTES: usize = 32 << 20;
/// Longest before/after JSON kept as it is; a longer one is recorded by size and digest.
pub const MAX_AUDIT_OBJECT_BYTES: usize = 16 << 10;
/// Longest actor name, role, action or target, in bytes.
pub const MAX_AUDIT_TEXT_BYTES: usize = 256;
/// Most records one read returns.
pub const MAX_AUDIT_PAGE: usize = 1_000;

/// The role of [`Actor::config`].
pub const CONFIG_ROLE: &str = "config";

/// Who asked for a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The admin token's name, `loopback`, `key <id>`, or `tallyd` for changes the server
    /// makes itself from its configuration files.
    pub name: String,
    /// `admin`, `billing`, `read-only`, `key` or `config`.
    pub role: String,
}

impl Actor {
    pub fn from_parts(name: &str, role: &str) -> Actor {
        Actor {
            name: name.to_owned(),
            role: role.to_owned(),
        }
    }

    /// The server itself, applying its configuration (`source` says which).
    pub fn config(source: &str) -> Actor {
        Actor {
            name: format!("tallyd ({source})"),
            role: CONFIG_ROLE.into(),
        }
    }

    /// Whether a change that changed nothing is recorded: not for the server's own
    /// configuration, which every node applies again at each start.
    fn records_no_ops(&self) -> bool {
        self.role != CONFIG_ROLE
    }

    pub fn validate(&self) -> Result<(), CommandError> {
        text("actor.name", &self.name)?;
        text("actor.role", &self.role)
    }
}

fn text(field: &str, value: &str) -> Result<(), CommandError> {
    if value.len() > MAX_AUDIT_TEXT_BYTES {
        return Err(CommandError::invalid(
            field,
            format!("longer than {MAX_AUDIT_TEXT_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A change that is not an engine command, recorded once it is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditNote {
    pub actor: Actor,
    /// What was done, e.g. `cluster.add-learner`.
    pub action: String,
    /// What it was done to, e.g. `node 3`.
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

impl AuditNote {
    pub fn validate(&self) -> Result<(), CommandError> {
        self.actor.validate()?;
        text("action", &self.action)?;
        text("target", &self.target)?;
        for (field, object) in [("before", &self.before), ("after", &self.after)] {
            if object
                .as_ref()
                .is_some_and(|o| o.len() > MAX_AUDIT_OBJECT_BYTES)
            {
                return Err(CommandError::invalid(
                    field,
                    format!("longer than {MAX_AUDIT_OBJECT_BYTES} bytes"),
                ));
            }
        }
        Ok(())
    }
}

/// One entry of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1, 2, 3, ... in log order (a reader's cursor).
    pub seq: u64,
    /// Batch time of the change, Unix ms.
    pub at_ms: i64,
    pub actor: Actor,
    /// What was done: `keys.create`, `keys.disable`, `subscriptions.put`, `limits.replace`...
    pub action: String,
    /// What it was done to: a key id, a subscription name, `limits`, `prices`...
    pub target: String,
    /// The object before, as JSON (`None`: it did not exist).
    pub before: Option<String>,
    /// The object after, as JSON (`None`: it no longer exists).
    pub after: Option<String>,
    /// Why the change was refused; `None` when it was applied.
    pub error: Option<String>,
}

impl AuditRecord {
    fn bytes(&self) -> usize {
        let texts = [
            &self.actor.name,
            &self.actor.role,
            &self.action,
            &self.target,
        ];
        let objects = [&self.before, &self.after, &self.error];
        64 + texts.iter().map(|t| t.len()).sum::<usize>()
            + objects
                .iter()
                .map(|o| o.as_ref().map_or(0, String::len))
                .sum::<usize>()
    }
}

/// Which records a read wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Records after this seq (0: from the oldest held).
    pub after_seq: u64,
    /// At most this many (1..=[`MAX_AUDIT_PAGE`]).
    pub limit: usize,
    /// Only records about this target, when set.
    pub target: Option<String>,
    /// Only records by this actor name, when set.
    pub actor: Option<String>,
}

/// A page of the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    /// The oldest seq still held (records before it were dropped); 0 when the log is empty.
    pub first_seq: u64,
    /// The newest seq written so far.
    pub last_seq: u64,
}

/// The records kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    records: VecDeque<AuditRecord>,
    last_seq: u64,
    bytes: usize,
}

impl AuditLog {
    /// Appends a record (its seq is assigned here) and drops the oldest beyond the bounds.
    pub fn push(&mut self, mut record: AuditRecord) -> u64 {
        self.last_seq += 1;
        record.seq = self.last_seq;
        self.bytes += record.bytes();
        self.records.push_back(record);
        while self.records.len() > MAX_AUDIT_RECORDS
            || (self.bytes > MAX_AUDIT_BYTES && self.records.len() > 1)
        {
            let dropped = self.records.pop_front().expect("more than one record");
            self.bytes -= dropped.bytes();
        }
        self.last_seq
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The records `query` asks for, oldest first.
    pub fn read(&self, query: &AuditQuery) -> AuditPage {
        let limit = query.limit.clamp(1, MAX_AUDIT_PAGE);
        let start = self.records.partition_point(|r| r.seq <= query.after_seq);
        let records = self
            .records
            .range(start..)
            .filter(|r| query.target.as_ref().is_none_or(|t| *t == r.target))
            .filter(|r| query.actor.as_ref().is_none_or(|a| *a == r.actor.name))
            .take(limit)
            .cloned()
            .collect();
        AuditPage {
            records,
            first_seq: self.records.front().map_or(0, |r| r.seq),
            last_seq: self.last_seq,
        }
    }

    /// Checks what restore relies on: seqs increasing up to `last_seq`, bounds kept, the
    /// byte count right.
    pub fn check(&self) -> Result<(), String> {
        if self.records.len() > MAX_AUDIT_RECORDS {
            return Err("more audit records than the bound".into());
        }
        let mut previous = 0;
        for r in &self.records {
            if r.seq <= previous || r.seq > self.last_seq {
                return Err(format!("audit record seq {} out of order", r.seq));
            }
            previous = r.seq;
        }
        let bytes: usize = self.records.iter().map(AuditRecord::bytes).sum();
        if bytes != self.bytes {
            return Err("audit byte count does not match its records".into());
        }
        Ok(())
    }
}

/// An admin change and who asked for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audited {
    pub actor: Actor,
    pub command: Command,
}

impl Engine {
    /// Applies an audited change and records it (applied or refused).
    pub(super) fn apply_audited(&mut self, audited: &Audited, now_ms: i64) -> Outcome {
        let command = &audited.command;
        let Some((action, target)) = audit_subject(command) else {
            return Outcome::Rejected(CommandError::invalid(
                "command",
                "not an admin change (only those are audited)",
            ));
        };
        if let Err(e) = audited.actor.validate() {
            return Outcome::Rejected(e);
        }
        let before = self.audit_object(command);
        let outcome = self.apply_one(command, now_ms);
        let error = match &outcome {
            Outcome::Rejected(e) => Some(e.to_string()),
            _ => None,
        };
        let after = self.audit_object(command);
        if error.is_none() && before == after && !audited.actor.records_no_ops() {
            return outcome;
        }
        self.audit.push(AuditRecord {
            seq: 0,
            at_ms: now_ms,
            actor: audited.actor.clone(),
            action: action.into(),
            target,
            before,
            after,
            error,
        });
        outcome
    }

    /// Records a change made outside the engine.
    pub(super) fn apply_audit_note(
        &mut self,
        note: &AuditNote,
        now_ms: i64,
    ) -> Result<Outcome, CommandError> {
        note.validate()?;
        let seq = self.audit.push(AuditRecord {
            seq: 0,
            at_ms: now_ms,
            actor: note.actor.clone(),
            action: note.action.clone(),
            target: note.target.clone(),
            before: note.before.clone(),
            after: note.after.clone(),
            error: None,
        });
        Ok(Outcome::AuditRecorded { seq })
    }

    /// The audit records `query` asks for.
    pub fn audit(&self, query: &AuditQuery) -> AuditPage {
        self.audit.read(query)
    }

    /// The newest audit record's seq (0: none yet).
    pub fn last_audit_seq(&self) -> u64 {
        self.audit.last_seq()
    }

    /// The object `command` changes, as it is now (`None`: it does not exist).
    fn audit_object(&self, command: &Command) -> Option<String> {
        match command {
            Command::ReplaceLimits(_) => Some(object_json(&self.limits().collect::<Vec<_>>())),
            Command::RetireNode { node_id } => {
                self.is_retired(*node_id).then(|| object_json("retired"))
            }
            Command::Configure(_) => Some(object_json(&self.settings)),
            Command::SetPrices(_) => {
                let (version, catalog) = self.prices();
                Some(object_json(
                    &serde_json::json!({ "version": version, "models": catalog.models }),
                ))
            }
            Command::ReplaceQuotas(_) => {
                let configured: Vec<_> = self
                    .quotas()
                    .filter(|q| !q.name.starts_with(DERIVED_PREFIX))
                    .collect();
                Some(object_json(&configured))
            }
            Command::CreateKey(NewKey { id, .. })
            | Command::SetKeyEnabled { id, .. }
            | Command::DeleteKey { id }
            | Command::RotateKey { id, .. }
            | Command::SetKeyOverrides { id, .. } => self.key(id).map(object_json),
            Command::PutSubscription(Subscription { name, .. })
            | Command::DeleteSubscription { name } => self.keys.subscription(name).map(object_json),
            _ => None,
        }
    }
}

/// What an admin command does and to what; `None` for commands that are not admin changes.
fn audit_subject(command: &Command) -> Option<(&'static str, String)> {
    let subject = match command {
        Command::ReplaceLimits(_) => ("limits.replace", "limits".to_owned()),
        Command::RetireNode { node_id } => ("cluster.retire-node", format!("node {node_id}")),
        Command::Configure(_) => ("settings.configure", "settings".to_owned()),
        Command::SetPrices(_) => ("prices.set", "prices".to_owned()),
        Command::ReplaceQuotas(_) => ("quotas.replace", "quotas".to_owned()),
        Command::CreateKey(k) if k.ephemeral => ("keys.create-ephemeral", k.id.clone()),
        Command::CreateKey(k) => ("keys.create", k.id.clone()),
        Command::SetKeyEnabled { id, enabled: true } => ("keys.enable", id.clone()),
        Command::SetKeyEnabled { id, enabled: false } => ("keys.disable", id.clone()),
        Command::DeleteKey { id } => ("keys.delete", id.clone()),
        Command::RotateKey { id, .. } => ("keys.rotate", id.clone()),
        Command::SetKeyOverrides { id, .. } => ("keys.set-overrides", id.clone()),
        Command::PutSubscription(s) => ("subscriptions.put", s.name.clone()),
        Command::DeleteSubscription { name } => ("subscriptions.delete", name.clone()),
        _ => return None,
    };
    Some(subject)
}

/// `value` as the JSON an audit record holds: as it is, or its size and digest when longer
/// than [`MAX_AUDIT_OBJECT_BYTES`].
pub fn object_json<T: Serialize + ?Sized>(value: &T) -> String {
    let json = serde_json::to_string(value).expect("engine data serializes to JSON");
    if json.len() <= MAX_AUDIT_OBJECT_BYTES {
        return json;
    }
    let digest = Sha256::digest(json.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "omitted": "larger than the audit log keeps", "bytes": json.len(), "sha256": hex })
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: &str, actor: &str, before: Option<String>) -> AuditRecord {
        AuditRecord {
            seq: 0,
            at_ms: 1,
            actor: Actor {
                name: actor.into(),
                role: "admin".into(),
            },
            action: "keys.create".into(),
            target: target.into(),
            before,
            after: None,
            error: None,
        }
    }

    #[test]
    fn records_are_numbered_filtered_and_paged() {
        let mut log = AuditLog::default();
        for i in 0..10 {
            let target = if i % 2 == 0 { "a" } else { "b" };
            assert_eq!(log.push(record(target, "ops", None)), i + 1);
        }
        let page = log.read(&AuditQuery {
            after_seq: 3,
            limit: 2,
            target: Some("a".into()),
            actor: None,
        });
        let seqs: Vec<u64> = page.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [5, 7]);
        assert_eq!((page.first_seq, page.last_seq), (1, 10));
        let none = log.read(&AuditQuery {
            actor: Some("someone".into()),
            limit: 100,
            ..AuditQuery::default()
        });
        assert!(none.records.is_empty());
        log.check().unwrap();
    }

    #[test]
    fn the_oldest_records_go_first_at_either_bound() {
        let mut log = AuditLog::default();
        for _ in 0..MAX_AUDIT_RECORDS + 5 {
            log.push(record("k", "ops", None));
        }
        let page = log.read(&AuditQuery {
            limit: 1,
            ..AuditQuery::default()
        });
        assert_eq!(page.first_seq, 6);
        assert_eq!(page.records[0].seq, 6);
        log.check().unwrap();

        let mut log = AuditLog::default();
        let big = "x".repeat(MAX_AUDIT_OBJECT_BYTES);
        let fit = MAX_AUDIT_BYTES / (MAX_AUDIT_OBJECT_BYTES + 64 + 10);
        for _ in 0..fit + 10 {
            log.push(record("k", "ops", Some(big.clone())));
        }
        assert!(log.bytes <= MAX_AUDIT_BYTES);
        assert!(log.read(&AuditQuery::default()).first_seq > 1);
        log.check().unwrap();
    }

    #[test]
    fn large_objects_are_recorded_by_size_and_digest() {
        let small = object_json(&vec![1, 2, 3]);
        assert_eq!(small, "[1,2,3]");
        let large = object_json(&"y".repeat(MAX_AUDIT_OBJECT_BYTES + 1));
        let v: serde_json::Value = serde_json::from_str(&large).unwrap();
        assert_eq!(v["bytes"], MAX_AUDIT_OBJECT_BYTES + 3);
        assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn long_texts_are_refused_naming_the_field() {
        let actor = Actor {
            name: "n".repeat(MAX_AUDIT_TEXT_BYTES + 1),
            role: "admin".into(),
        };
        let e = actor.validate().unwrap_err();
        assert!(e.to_string().contains("actor.name"), "{e}");
    }
}
