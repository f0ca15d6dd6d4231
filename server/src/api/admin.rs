//! `tally.v1.Admin`: what a node holds, for operators.

use tally_proto::tally::v1::admin_server;
use tally_proto::tally::v1::{
    GetStatusRequest, GetStatusResponse, LimitInfo, ListLimitsRequest, ListLimitsResponse,
};
use tonic::{Request, Response, Status};

use crate::engine::EngineStatus;
use crate::engine::limits::{
    CalendarUnit, Capacity, DescriptorKey, EntryCondition, LimitSpec, Scope, ValueMatch, WindowSpec,
};
use crate::node::Node;

pub struct Admin {
    node: Node,
}

impl Admin {
    pub fn new(node: Node) -> Admin {
        Admin { node }
    }
}

impl From<EngineStatus> for GetStatusResponse {
    fn from(s: EngineStatus) -> GetStatusResponse {
        GetStatusResponse {
            live_counters: s.live_counters,
            counter_bytes_estimate: s.counter_bytes_estimate,
            reclaimed_counters: s.reclaimed_counters,
            limits: s.limits,
            limits_generation: s.limits_generation,
            last_batch_ms: s.last_batch_ms,
            applied_commands: s.applied_commands,
            applied_batches: s.applied_batches,
        }
    }
}

impl From<&LimitSpec> for LimitInfo {
    fn from(l: &LimitSpec) -> LimitInfo {
        let (matcher, variables) = describe_scope(&l.scope);
        LimitInfo {
            domain: l.domain.clone(),
            name: l.name.clone(),
            capacity: match l.capacity {
                Capacity::Max(n) => n,
                Capacity::Unlimited => u64::MAX,
            },
            window: describe_window(&l.window),
            matcher,
            variables,
            shadow: l.shadow,
        }
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Admin {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let status = self.node.read(|e| e.status()).await?;
        Ok(Response::new(status.into()))
    }

    async fn list_limits(
        &self,
        request: Request<ListLimitsRequest>,
    ) -> Result<Response<ListLimitsResponse>, Status> {
        let domain = request.into_inner().domain;
        let limits = self
            .node
            .read(|e| {
                e.limits()
                    .filter(|l| domain.is_empty() || l.domain == domain)
                    .map(LimitInfo::from)
                    .collect()
            })
            .await?;
        Ok(Response::new(ListLimitsResponse { limits }))
    }
}

pub(super) fn describe_window(w: &WindowSpec) -> String {
    match w {
        WindowSpec::Fixed { duration_ms } => format!("fixed {duration_ms}ms"),
        WindowSpec::FromFirstHit { duration_ms } => format!("from_first_hit {duration_ms}ms"),
        WindowSpec::Rolling {
            window_ms,
            resolution_ms,
        } => format!("rolling {window_ms}ms/{resolution_ms}ms"),
        WindowSpec::TokenBucket {
            refill_amount,
            refill_every_ms,
        } => format!("token_bucket {refill_amount} per {refill_every_ms}ms"),
        WindowSpec::Calendar { unit, time_zone } => match unit {
            CalendarUnit::Day => format!("calendar day {time_zone}"),
            CalendarUnit::Week { start } => {
                format!("calendar week from ISO weekday {start} {time_zone}")
            }
            CalendarUnit::Month { day } => format!("calendar month from day {day} {time_zone}"),
            CalendarUnit::Year { month, day } => {
                format!("calendar year from {month:02}-{day:02} {time_zone}")
            }
        },
    }
}

fn describe_scope(scope: &Scope) -> (String, Vec<String>) {
    match scope {
        Scope::Descriptor { conditions, key } => {
            let matcher = conditions
                .iter()
                .map(describe_condition)
                .collect::<Vec<_>>()
                .join(" && ");
            let variables = match key {
                DescriptorKey::Entries(keys) => keys.clone(),
                DescriptorKey::AllEntries => vec!["<all entries>".to_owned()],
            };
            (matcher, variables)
        }
        Scope::Request {
            conditions,
            variables,
        } => (conditions.join(" && "), variables.clone()),
    }
}

fn describe_condition(c: &EntryCondition) -> String {
    match c {
        EntryCondition::Equals { key, value } => format!("{key} == {value:?}"),
        EntryCondition::NotEquals { key, value } => format!("{key} != {value:?}"),
        EntryCondition::In { key, values } => format!("{key} in {values:?}"),
        EntryCondition::Present { key } => format!("has({key})"),
        EntryCondition::Absent { key } => format!("!has({key})"),
        EntryCondition::EntryCount(n) => format!("entries == {n}"),
        EntryCondition::Positional { index, key, value } => {
            let v = match value {
                ValueMatch::Exact(v) => format!("{v:?}"),
                ValueMatch::Prefix { prefix, .. } => format!("{prefix:?}*"),
                ValueMatch::Any { .. } => "*".to_owned(),
            };
            format!("entries[{index}] == ({key}, {v})")
        }
    }
}
