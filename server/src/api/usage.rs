//! `tally.v1.Usage`: metering over gRPC — usage reports, reservations, prices, billing queries,
//! the usage export and quota events.
//!
//! Writes are validated here (the engine's `validate`, so bad input answers INVALID_ARGUMENT
//! naming the wire field) and proposed through the [`Node`] with the caller's deadline; the
//! engine validates again when it applies them. Reads that a billing job relies on (queries,
//! the overview, prices, an export's end) are linearizable, on any node (`deadline::read`): a
//! follower takes the leader's read index and answers once it has applied up to it. Export
//! pages come from the node's usage archive, which holds every record up to that end. Wire ⇄ domain
//! conversions live in `usage_convert`; errors become statuses only in `status`.

use std::time::Duration;

use tally_proto::tally::v1 as wire;
use tally_proto::tally::v1::usage_server;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::deadline::{self, MAX_DECISION_WAIT};
use super::status;
use crate::engine::usage::{
    self, Commit, PriceCatalog, ReportUsage, Reserve, UsageQuery, UsageRecord,
};
use crate::engine::{Command, CommandError, Engine, Outcome};
use crate::node::Node;

/// Most usage records one export page reads from the node's usage archive.
pub const EXPORT_PAGE: usize = 1_000;
/// Pages an export buffers ahead of its reader: a slow reader holds the export back, so memory
/// stays bounded by this many pages per stream.
pub const EXPORT_BUFFER_PAGES: usize = 4;
/// How often an events stream looks for new events.
pub const EVENT_POLL: Duration = Duration::from_millis(100);
/// Most events read at once by an events stream.
pub const EVENT_PAGE: usize = 256;
/// Events an events stream buffers ahead of its reader.
const EVENT_BUFFER: usize = EVENT_PAGE;

pub struct Usage {
    node: Node,
    /// Turns true when the server shuts down: open event streams end then.
    stop: watch::Receiver<bool>,
}

impl Usage {
    pub fn new(node: Node, stop: watch::Receiver<bool>) -> Usage {
        Usage { node, stop }
    }

    /// Proposes `command` and waits for its outcome, at most the caller's deadline.
    async fn propose(
        &self,
        command: Command,
        deadline: Option<Duration>,
    ) -> Result<Outcome, Status> {
        let wait = deadline.unwrap_or(MAX_DECISION_WAIT);
        let late = "no outcome within the caller's deadline (no leader or no quorum); the command \
                    may still be applied: a retry with the same request_id counts it once";
        deadline::propose(&self.node, command, Some(wait), late).await
    }

    /// Proposes a usage command and answers its receipt.
    async fn receipt(
        &self,
        command: Command,
        deadline: Option<Duration>,
    ) -> Result<Response<wire::UsageReceipt>, Status> {
        match self.propose(command, deadline).await? {
            Outcome::Usage(receipt) => Ok(Response::new(receipt.into())),
            Outcome::Rejected(e) => Err(e.into()),
            other => Err(status::unexpected(&other)),
        }
    }
}

/// Completes when the server shuts down (never, when it was given no stop signal).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[tonic::async_trait]
impl usage_server::Usage for Usage {
    async fn report_usage(
        &self,
        request: Request<wire::ReportUsageRequest>,
    ) -> Result<Response<wire::UsageReceipt>, Status> {
        let deadline = deadline::of(&request);
        let report = ReportUsage::try_from(request.into_inner())?;
        report.validate()?;
        self.receipt(Command::ReportUsage(report), deadline).await
    }

    async fn reserve(
        &self,
        request: Request<wire::ReserveRequest>,
    ) -> Result<Response<wire::UsageReceipt>, Status> {
        let deadline = deadline::of(&request);
        let reserve = Reserve::try_from(request.into_inner())?;
        reserve.validate()?;
        self.receipt(Command::Reserve(reserve), deadline).await
    }

    async fn commit(
        &self,
        request: Request<wire::CommitRequest>,
    ) -> Result<Response<wire::UsageReceipt>, Status> {
        let deadline = deadline::of(&request);
        let commit = Commit::from(request.into_inner());
        commit.validate()?;
        self.receipt(Command::Commit(commit), deadline).await
    }

    async fn release(
        &self,
        request: Request<wire::ReleaseRequest>,
    ) -> Result<Response<wire::UsageReceipt>, Status> {
        let deadline = deadline::of(&request);
        let request_id = request.into_inner().request_id;
        usage::validate_release(&request_id)?;
        self.receipt(Command::Release { request_id }, deadline)
            .await
    }

    async fn set_prices(
        &self,
        request: Request<wire::SetPricesRequest>,
    ) -> Result<Response<wire::SetPricesResponse>, Status> {
        let deadline = deadline::of(&request);
        let actor = super::audit::actor(&request);
        let catalog = PriceCatalog::from(request.into_inner());
        catalog.validate()?;
        let command = super::audit::audited(&actor, Command::SetPrices(catalog));
        match self.propose(command, deadline).await? {
            Outcome::PricesSet { version } => {
                Ok(Response::new(wire::SetPricesResponse { version }))
            }
            Outcome::Rejected(e) => Err(e.into()),
            other => Err(status::unexpected(&other)),
        }
    }

    async fn list_prices(
        &self,
        request: Request<wire::ListPricesRequest>,
    ) -> Result<Response<wire::ListPricesResponse>, Status> {
        let deadline = deadline::of(&request);
        let response = deadline::read(&self.node, deadline, |e| {
            let (version, catalog) = e.prices();
            wire::ListPricesResponse {
                version,
                models: catalog.models.iter().map(wire::ModelPrice::from).collect(),
            }
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn query_usage(
        &self,
        request: Request<wire::QueryUsageRequest>,
    ) -> Result<Response<wire::QueryUsageResponse>, Status> {
        let deadline = deadline::of(&request);
        let query = UsageQuery::try_from(request.into_inner())?;
        let rows = deadline::read(&self.node, deadline, |e| e.query_usage(&query)).await??;
        Ok(Response::new(wire::QueryUsageResponse {
            rows: rows.into_iter().map(wire::UsageRow::from).collect(),
        }))
    }

    async fn get_usage_overview(
        &self,
        request: Request<wire::GetUsageOverviewRequest>,
    ) -> Result<Response<wire::GetUsageOverviewResponse>, Status> {
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        if r.subject.is_empty() {
            return Err(CommandError::invalid("subject", "must not be empty").into());
        }
        usage::check_len("subject", &r.subject)?;
        usage::check_len("subscription", &r.subscription)?;
        let standings = deadline::read(&self.node, deadline, |e| {
            e.usage_overview(&r.subject, &r.subscription)
        })
        .await?;
        Ok(Response::new(wire::GetUsageOverviewResponse {
            standings: standings
                .into_iter()
                .map(wire::QuotaStanding::from)
                .collect(),
        }))
    }

    type ExportUsageStream = ReceiverStream<Result<wire::UsageRecord, Status>>;

    /// The end (the last seq written) is a linearizable read, and the first page is read before
    /// the stream starts, so a cursor past retention or a node that cannot serve linearizable
    /// reads is the call's status; the stream ends at that end (records written later belong
    /// to the next export). Pages come from this node's on-disk usage archive: records never
    /// change once written, and the archive holds every record up to the end once the read
    /// returned (it is written as entries are applied).
    async fn export_usage(
        &self,
        request: Request<wire::ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        let deadline = deadline::of(&request);
        let r = request.into_inner();
        let wanted = match r.max_records {
            0 => u64::MAX,
            n => n,
        };
        let end = deadline::read(&self.node, deadline, Engine::last_usage_seq).await?;
        let first = records(&self.node, r.after_seq, page_len(wanted)).await?;
        let (tx, rx) = mpsc::channel(EXPORT_BUFFER_PAGES * EXPORT_PAGE);
        tokio::spawn(export(
            self.node.clone(),
            Export {
                cursor: r.after_seq,
                end,
                left: wanted,
            },
            first,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchEventsStream = ReceiverStream<Result<wire::UsageEvent, Status>>;

    async fn watch_events(
        &self,
        request: Request<wire::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let after_seq = request.into_inner().after_seq;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(watch_events(
            self.node.clone(),
            after_seq,
            tx,
            self.stop.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Where an export stands.
struct Export {
    /// Seq of the last record sent (or the request's `after_seq`).
    cursor: u64,
    /// The last seq this export sends: the last record written when it started.
    end: u64,
    /// Records it may still send (`max_records`).
    left: u64,
}

/// The page size to read with `left` records still wanted.
fn page_len(left: u64) -> usize {
    usize::try_from(left).map_or(EXPORT_PAGE, |n| n.min(EXPORT_PAGE))
}

/// One page of the node's usage archive (file reads: off the async threads).
async fn records(node: &Node, after_seq: u64, len: usize) -> Result<Vec<UsageRecord>, Status> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || node.usage_records(after_seq, len))
        .await
        .map_err(|e| Status::internal(format!("usage archive read stopped: {e}")))?
        .map_err(Status::from)
}

/// Sends `page`, then reads and sends further pages, until the export is complete, the
/// reader went away or a read failed (sent as the stream's last item).
async fn export(
    node: Node,
    mut at: Export,
    mut page: Vec<UsageRecord>,
    tx: mpsc::Sender<Result<wire::UsageRecord, Status>>,
) {
    loop {
        if page.is_empty() {
            return;
        }
        for record in page {
            if record.seq > at.end || at.left == 0 {
                return;
            }
            if record.seq <= at.cursor {
                tracing::error!(
                    seq = record.seq,
                    cursor = at.cursor,
                    "export page out of order"
                );
                let _ = tx
                    .send(Err(Status::internal("usage records out of order")))
                    .await;
                return;
            }
            at.cursor = record.seq;
            at.left -= 1;
            if tx.send(Ok(record.into())).await.is_err() {
                return; // The reader went away.
            }
        }
        if at.cursor >= at.end || at.left == 0 {
            return;
        }
        page = match records(&node, at.cursor, page_len(at.left)).await {
            Ok(page) => page,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
    }
}

/// Polls this replica's events and sends the new ones until the reader goes away or the
/// server stops. Events are notifications: at-least-best-effort, bounded retention.
async fn watch_events(
    node: Node,
    mut cursor: u64,
    tx: mpsc::Sender<Result<wire::UsageEvent, Status>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Some(reason) = node.raft_failure() {
            let _ = tx.try_send(Err(Status::unavailable(format!(
                "this node stopped replicating: {reason}"
            ))));
            return;
        }
        let events = match node.read(|e| e.events_after(cursor, EVENT_PAGE)).await {
            Ok(events) => events,
            Err(e) => {
                let _ = tx.try_send(Err(e.into()));
                return;
            }
        };
        let full = events.len() == EVENT_PAGE;
        for event in events {
            cursor = cursor.max(event.seq);
            tokio::select! {
                sent = tx.send(Ok(event.into())) => if sent.is_err() { return },
                () = stopping(&mut stop) => return shutting_down(&tx),
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(EVENT_POLL) => {}
            () = tx.closed() => return,
            () = stopping(&mut stop) => return shutting_down(&tx),
        }
    }
}

/// Tells an events reader the server is going away, if its buffer has room.
fn shutting_down(tx: &mpsc::Sender<Result<wire::UsageEvent, Status>>) {
    let _ = tx.try_send(Err(Status::unavailable(
        "server shutting down; reconnect with after_seq = the last seq received",
    )));
}
