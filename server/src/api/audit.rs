//! `tally.v1.Audit`: the audit log of admin changes, and the one place an admin call's
//! caller becomes the engine's [`Actor`].
//!
//! Every admin change the API proposes is wrapped in [`Command::Audited`] with the caller
//! ([`audited`]); the engine records it at batch time on every replica. Reads are
//! linearizable, so any node answers every record written before the call.

use std::time::Duration;

use tally_proto::tally::v1 as wire;
use tally_proto::tally::v1::audit_server;
use tonic::{Request, Response, Status};

use super::auth::Caller;
use super::deadline;
use crate::engine::Command;
use crate::engine::audit::{Actor, AuditPage, AuditQuery, AuditRecord, Audited, MAX_AUDIT_PAGE};
use crate::node::Node;

/// Records a read returns when the request does not say.
pub const DEFAULT_AUDIT_PAGE: usize = 100;

pub struct Audit {
    node: Node,
}

impl Audit {
    pub fn new(node: Node) -> Audit {
        Audit { node }
    }
}

/// Who made the call, for the audit log. Admin methods are only reached with a [`Caller`]
/// (the auth layer puts it there); without one the actor says so.
pub fn actor<T>(request: &Request<T>) -> Actor {
    request
        .extensions()
        .get::<Caller>()
        .map_or_else(|| Actor::from_parts("unknown", "none"), Actor::from)
}

/// `command` as an audited change made by `actor`.
pub fn audited(actor: &Actor, command: Command) -> Command {
    Command::Audited(Box::new(Audited {
        actor: actor.clone(),
        command,
    }))
}

impl From<&Caller> for Actor {
    fn from(c: &Caller) -> Actor {
        // A loopback caller (no tokens configured) is named `loopback`, with role admin.
        Actor::from_parts(&c.name, c.role.as_str())
    }
}

impl From<wire::ListAuditRequest> for AuditQuery {
    fn from(r: wire::ListAuditRequest) -> AuditQuery {
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        AuditQuery {
            after_seq: r.after_seq,
            limit: match r.limit {
                0 => DEFAULT_AUDIT_PAGE,
                n => usize::try_from(n).unwrap_or(MAX_AUDIT_PAGE),
            },
            target: non_empty(r.target),
            actor: non_empty(r.actor),
        }
    }
}

impl From<AuditRecord> for wire::AuditRecord {
    fn from(r: AuditRecord) -> wire::AuditRecord {
        wire::AuditRecord {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor.name,
            role: r.actor.role,
            action: r.action,
            target: r.target,
            before_json: r.before,
            after_json: r.after,
            error: r.error.unwrap_or_default(),
        }
    }
}

impl From<AuditPage> for wire::ListAuditResponse {
    fn from(p: AuditPage) -> wire::ListAuditResponse {
        wire::ListAuditResponse {
            records: p.records.into_iter().map(Into::into).collect(),
            first_seq: p.first_seq,
            last_seq: p.last_seq,
        }
    }
}

#[tonic::async_trait]
impl audit_server::Audit for Audit {
    async fn list_audit(
        &self,
        request: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        let deadline: Option<Duration> = deadline::of(&request);
        let r = request.into_inner();
        if r.limit as usize > MAX_AUDIT_PAGE {
            return Err(Status::invalid_argument(format!(
                "invalid limit: at most {MAX_AUDIT_PAGE}"
            )));
        }
        let query = AuditQuery::from(r);
        let page = deadline::read(&self.node, deadline, |e| e.audit(&query)).await?;
        Ok(Response::new(page.into()))
    }
}
