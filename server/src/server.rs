//! Wiring for `tallyd`: the node, the gRPC, Raft and HTTP listeners, limit-file reload
//! (limits, quotas and prices), shutdown.
//!
//! `run(listeners, config, shutdown)` serves until `shutdown` completes, then stops accepting,
//! lets in-flight calls finish, stops Raft and returns. Tests bind port 0 and use [`spawn`].

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::api::http::Readiness;
use crate::api::{self, ResponseOptions};
use crate::config::{self, Config, Format, Metering};
use crate::engine::usage::{PriceCatalog, QuotaSet};
use crate::engine::{Command, EngineSettings, LimitSet, Outcome};
use crate::node::raft_types::NodeId;
use crate::node::usage_archive::ArchiveConfig;
use crate::node::{BatchConfig, Clock, Node, NodeConfig, NodeError, RaftTimings, SystemClock};

/// Default bound on open gRPC connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;
/// HTTP/2 streams one gRPC connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1_024;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Where a node keeps its data when not told otherwise (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = ".tally-data/node-1";
/// Pause between attempts to put the initial limits in force while there is no leader.
const LIMITS_RETRY: Duration = Duration::from_millis(200);
/// The example limits served when no file is given.
pub const EMBEDDED_LIMITS: &str = include_str!("../../examples/limits.yaml");

/// Where the limits come from.
#[derive(Clone, Debug)]
pub enum LimitsSource {
    /// A file, reloaded when it changes.
    File(PathBuf),
    /// Text held in memory (the embedded example); never reloaded.
    Inline { origin: String, text: String },
}

#[derive(Clone)]
pub struct ServerConfig {
    pub limits: LimitsSource,
    /// `None`: detect the format from the file's shape.
    pub limits_format: Option<Format>,
    /// How often the limits file is checked for changes; zero disables reloading.
    pub limits_poll: Duration,
    pub response: ResponseOptions,
    pub engine: EngineSettings,
    /// Bounds of this node's on-disk usage archive.
    pub archive: ArchiveConfig,
    pub batch: BatchConfig,
    pub max_connections: usize,
    pub clock: Arc<dyn Clock>,
    pub node_id: NodeId,
    /// The node's own directory: Raft log, snapshot, node id.
    pub data_dir: PathBuf,
    /// The Raft address peers use to reach this node; the Raft listener's address if unset.
    pub raft_advertise: Option<String>,
    /// With an empty data directory, become a one-node cluster (else wait for `cluster init`
    /// or to be added by a leader).
    pub bootstrap: bool,
    pub timings: RaftTimings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: LimitsSource::Inline {
                origin: "embedded examples/limits.yaml".into(),
                text: EMBEDDED_LIMITS.into(),
            },
            limits_format: None,
            limits_poll: Duration::from_secs(1),
            response: ResponseOptions::default(),
            engine: EngineSettings::default(),
            archive: ArchiveConfig::default(),
            batch: BatchConfig::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            clock: Arc::new(SystemClock),
            node_id: 1,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            raft_advertise: None,
            bootstrap: true,
            timings: RaftTimings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Limits(#[from] config::ConfigError),
    #[error("cannot read limits file {path}: {error}")]
    LimitsFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("limits refused by the engine: {0}")]
    LimitsRejected(crate::engine::CommandError),
    #[error("quotas refused by the engine: {0}")]
    QuotasRejected(crate::engine::CommandError),
    #[error("prices refused by the engine: {0}")]
    PricesRejected(crate::engine::CommandError),
    #[error("node: {0}")]
    Node(#[from] crate::node::NodeStartError),
    #[error("limits not put in force: {0}")]
    NotInForce(NodeError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "raft stopped: {0}; exiting so that the service manager restarts this node from its data directory"
    )]
    RaftStopped(String),
}

/// The three listeners a node serves.
pub struct Listeners {
    /// Envoy RLS, Kuadrant, tally.v1 admin, gRPC health and reflection.
    pub grpc: TcpListener,
    /// `/healthz`, `/readyz`.
    pub http: TcpListener,
    /// Node-to-node: Raft, forwarding, cluster operations.
    pub raft: TcpListener,
}

/// Serves until `shutdown` completes.
pub async fn run(
    listeners: Listeners,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(listeners, config, shutdown, Readiness::default(), None).await
}

async fn run_with(
    listeners: Listeners,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    readiness: Readiness,
    started: Option<Arc<std::sync::OnceLock<Node>>>,
) -> Result<(), ServerError> {
    let (initial, fingerprint) = load_initial(&config).await?;
    let raft_addr = listeners.raft.local_addr()?;
    let node = Node::start(NodeConfig {
        node_id: config.node_id,
        data_dir: config.data_dir.clone(),
        advertise_addr: config
            .raft_advertise
            .clone()
            .unwrap_or(raft_addr.to_string()),
        bootstrap: config.bootstrap,
        engine: config.engine,
        archive: config.archive,
        batch: config.batch,
        timings: config.timings,
        clock: config.clock.clone(),
    })
    .await?;
    if let Some(started) = started {
        let _ = started.set(node.clone());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // A Raft that stopped on its own cannot be revived in this process: stop serving and
    // return an error, so the process exits non-zero and its supervisor restarts it.
    let failure = Arc::new(parking_lot::Mutex::new(None));
    let watched = node.clone();
    let failed = failure.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            reason = watched.raft_failed() => {
                tracing::error!(%reason, "raft stopped on its own; stopping this node");
                *failed.lock() = Some(reason);
            }
        }
        let _ = stop_tx.send(true);
    });
    tracing::info!(
        node = config.node_id,
        grpc = %listeners.grpc.local_addr()?,
        http = %listeners.http.local_addr()?,
        raft = %raft_addr,
        "tallyd serving"
    );
    let raft_task = tokio::spawn(serve_raft(listeners.raft, node.clone(), stop_rx.clone()));
    tokio::spawn(crate::event_log::run(node.clone(), stop_rx.clone()));
    tokio::spawn(put_limits_in_force(
        node.clone(),
        config.engine,
        initial,
        readiness.clone(),
        stop_rx.clone(),
    ));
    if let (LimitsSource::File(path), false) = (&config.limits, config.limits_poll.is_zero()) {
        tokio::spawn(watch_limits(
            path.clone(),
            config.limits_format,
            config.limits_poll,
            fingerprint,
            node.clone(),
            stop_rx.clone(),
        ));
    }
    let http_app = api::http::router(node.clone(), readiness);
    let http_stop = stopped(stop_rx.clone());
    let http = listeners.http;
    let http_task = tokio::spawn(async move {
        axum::serve(http, http_app)
            .with_graceful_shutdown(http_stop)
            .await
    });
    let incoming = limited_incoming(listeners.grpc, config.max_connections, stop_rx.clone());
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(
            api::grpc_routes_with_stop(node.clone(), config.response, stop_rx.clone()).await,
        )
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx))
        .await?;
    http_task.await.map_err(std::io::Error::other)??;
    raft_task.await.map_err(std::io::Error::other)??;
    node.shutdown().await;
    if let Some(reason) = failure.lock().take() {
        return Err(ServerError::RaftStopped(reason));
    }
    tracing::info!("tallyd stopped");
    Ok(())
}

/// Serves Raft, forwarding and cluster operations to peers.
async fn serve_raft(
    listener: TcpListener,
    node: Node,
    stop: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(api::raft::raft_service_for(&node))
        .add_service(crate::node::forward::forward_service(node.clone()))
        .add_service(api::cluster::cluster_service(node))
        .serve_with_incoming_shutdown(incoming, stopped(stop))
        .await?;
    Ok(())
}

/// Proposes this node's engine settings and the file loaded at start (limits, then quotas,
/// then prices if the file has any and they differ from those in force), retrying while
/// there is no leader, then marks the node ready. In a cluster every replica switches at the
/// same log index (the last node to start sets them: give every node the same flags and
/// file). If the engine refuses any of them the node never becomes ready.
async fn put_limits_in_force(
    node: Node,
    settings: EngineSettings,
    config: Config,
    readiness: Readiness,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let configured = match node.propose(Command::Configure(settings)).await {
            Ok(Outcome::Configured) => Ok(()),
            Ok(Outcome::Rejected(e)) => Err(ServerError::LimitsRejected(e)),
            Ok(other) => panic!("Configure answered with {other:?}"),
            Err(e) => Err(ServerError::NotInForce(e)),
        };
        let result = match configured {
            Ok(()) => apply_config(&node, config.clone()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(applied) => {
                tracing::info!(
                    limits = applied.limits,
                    kept = applied.limits_kept,
                    quotas = applied.quotas,
                    quotas_kept = applied.quotas_kept,
                    prices = %applied.prices,
                    "limits, quotas and prices in force"
                );
                readiness.set_ready();
                return;
            }
            Err(
                e @ (ServerError::LimitsRejected(_)
                | ServerError::QuotasRejected(_)
                | ServerError::PricesRejected(_)),
            ) => {
                tracing::error!(error = %e, "initial configuration refused by the engine; not ready");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "initial limits not yet in force; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(LIMITS_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A server running in the background, for tests and embedding.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    readiness: Readiness,
    node: Arc<std::sync::OnceLock<Node>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// Binds the three listeners on 127.0.0.1 port 0 and serves in the background.
pub async fn spawn(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let listeners = Listeners {
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        http: TcpListener::bind("127.0.0.1:0").await?,
        raft: TcpListener::bind("127.0.0.1:0").await?,
    };
    spawn_on(listeners, config).await
}

/// Serves on the given listeners in the background (a restarted node keeps its addresses).
pub async fn spawn_on(
    listeners: Listeners,
    config: ServerConfig,
) -> Result<RunningServer, ServerError> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;
    let raft_addr = listeners.raft.local_addr()?;
    // Load the limits here so a bad file fails the spawn, not the background task.
    load_initial(&config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let readiness = Readiness::default();
    let node = Arc::new(std::sync::OnceLock::new());
    let task = tokio::spawn(run_with(
        listeners,
        config,
        async move {
            let _ = stopped.await;
        },
        readiness.clone(),
        Some(node.clone()),
    ));
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        raft_addr,
        readiness,
        node,
        stop: Some(stop),
        task,
    })
}

impl RunningServer {
    /// Waits until the node's limits are in force (it has a leader and took part in a
    /// commit), at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), &'static str> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.readiness.is_ready() {
            if self.task.is_finished() {
                return Err("server stopped");
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("not ready in time");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// The node, once it has started.
    pub fn node(&self) -> Option<Node> {
        self.node.get().cloned()
    }

    /// True once the server has stopped (asked to, or on its own after a Raft failure).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Shuts the server down and waits for it.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(std::io::Error::other)?
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn fingerprint(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

async fn load_initial(config: &ServerConfig) -> Result<(Config, u64), ServerError> {
    match &config.limits {
        LimitsSource::File(path) => {
            let text =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|error| ServerError::LimitsFile {
                        path: path.clone(),
                        error,
                    })?;
            let origin = path.display().to_string();
            let parsed = config::parse_config(&text, config.limits_format, &origin)?;
            Ok((parsed, fingerprint(&text)))
        }
        LimitsSource::Inline { origin, text } => Ok((
            config::parse_config(text, config.limits_format, origin)?,
            fingerprint(text),
        )),
    }
}

async fn replace_limits(node: &Node, set: LimitSet) -> Result<(u64, u64), ServerError> {
    match node.propose(Command::ReplaceLimits(set)).await {
        Ok(Outcome::LimitsReplaced { limits, kept, .. }) => Ok((limits, kept)),
        Ok(Outcome::Rejected(e)) => Err(ServerError::LimitsRejected(e)),
        Ok(other) => panic!("ReplaceLimits answered with {other:?}"),
        Err(e) => Err(ServerError::NotInForce(e)),
    }
}

async fn replace_quotas(node: &Node, set: QuotaSet) -> Result<(u64, u64), ServerError> {
    match node.propose(Command::ReplaceQuotas(set)).await {
        Ok(Outcome::QuotasReplaced { quotas, kept }) => Ok((quotas, kept)),
        Ok(Outcome::Rejected(e)) => Err(ServerError::QuotasRejected(e)),
        Ok(other) => panic!("ReplaceQuotas answered with {other:?}"),
        Err(e) => Err(ServerError::NotInForce(e)),
    }
}

/// What became of a file's prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PricesApplied {
    /// The file has no `prices:` list: the prices in force were left alone.
    NotInFile,
    /// The file's prices are the ones in force already (version): nothing proposed.
    Unchanged { version: u64 },
    /// The file's prices were set as this new version.
    Set { version: u64 },
}

impl std::fmt::Display for PricesApplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PricesApplied::NotInFile => f.write_str("left alone (the file sets none)"),
            PricesApplied::Unchanged { version } => {
                write!(f, "version {version} (the file's, unchanged)")
            }
            PricesApplied::Set { version } => write!(f, "version {version} set from the file"),
        }
    }
}

/// Whether two catalogs price every model the same, whatever their order.
fn same_prices(a: &PriceCatalog, b: &PriceCatalog) -> bool {
    fn sorted(c: &PriceCatalog) -> Vec<&crate::engine::usage::ModelPrice> {
        let mut models: Vec<_> = c.models.iter().collect();
        models.sort_by(|x, y| x.model.cmp(&y.model));
        models
    }
    a.models.len() == b.models.len() && sorted(a) == sorted(b)
}

/// Proposes the file's prices when it has some and they differ from those in force.
///
/// Prices can also be set over the API: the last writer wins, and a file re-applies its
/// prices (at start, or when it changes) only if they differ from those in force.
async fn put_prices(
    node: &Node,
    prices: Option<PriceCatalog>,
) -> Result<PricesApplied, ServerError> {
    let Some(catalog) = prices else {
        return Ok(PricesApplied::NotInFile);
    };
    let (version, same) = node
        .read(|e| {
            let (version, in_force) = e.prices();
            (version, same_prices(&catalog, in_force))
        })
        .await
        .map_err(ServerError::NotInForce)?;
    if same {
        return Ok(PricesApplied::Unchanged { version });
    }
    match node.propose(Command::SetPrices(catalog)).await {
        Ok(Outcome::PricesSet { version }) => Ok(PricesApplied::Set { version }),
        Ok(Outcome::Rejected(e)) => Err(ServerError::PricesRejected(e)),
        Ok(other) => panic!("SetPrices answered with {other:?}"),
        Err(e) => Err(ServerError::NotInForce(e)),
    }
}

/// What one application of a file put in force.
struct Applied {
    limits: u64,
    limits_kept: u64,
    quotas: u64,
    quotas_kept: u64,
    prices: PricesApplied,
}

/// Puts a parsed file in force: its limits, its quotas (always, an empty set when it has
/// none), then its prices (when it has some and they differ). Each is one command; the
/// first refused stops the rest.
async fn apply_config(node: &Node, config: Config) -> Result<Applied, ServerError> {
    let Config {
        limits,
        metering: Metering { prices, quotas },
    } = config;
    let (limits, limits_kept) = replace_limits(node, limits).await?;
    let (quotas, quotas_kept) = replace_quotas(node, quotas).await?;
    let prices = put_prices(node, prices).await?;
    Ok(Applied {
        limits,
        limits_kept,
        quotas,
        quotas_kept,
        prices,
    })
}

/// Polls the limits file; a changed file that parses is put in force (limits, quotas,
/// prices: [`apply_config`]), one that does not is logged and everything in force stays.
async fn watch_limits(
    path: PathBuf,
    format: Option<Format>,
    poll: Duration,
    mut last: u64,
    node: Node,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read limits file; limits in force stay");
                continue;
            }
        };
        let print = fingerprint(&text);
        if print == last && !retry {
            continue;
        }
        // Tried again at the next poll only if it could not be proposed (no leader for now).
        last = print;
        retry = false;
        let origin = path.display().to_string();
        let parsed =
            tokio::task::spawn_blocking(move || config::parse_config(&text, format, &origin)).await;
        match parsed {
            Ok(Ok(parsed)) => match apply_config(&node, parsed).await {
                Ok(applied) => tracing::info!(
                    path = %path.display(),
                    limits = applied.limits,
                    kept = applied.limits_kept,
                    quotas = applied.quotas,
                    quotas_kept = applied.quotas_kept,
                    prices = %applied.prices,
                    "limits file reloaded"
                ),
                Err(e @ ServerError::NotInForce(_)) => {
                    // Re-proposing is harmless (unchanged limits and quotas keep their
                    // counters, unchanged prices are not set again): try the whole file again.
                    tracing::warn!(error = %e, "limits file reload not in force yet; retrying");
                    retry = true;
                }
                // Limits, quotas and prices are put in force one after the other: what
                // was applied before the refusal stays.
                Err(e) => tracing::error!(error = %e, "limits file reload refused"),
            },
            Ok(Err(e)) => {
                tracing::error!(error = %e, "limits file refused; everything in force stays")
            }
            Err(e) => {
                tracing::error!(error = %e, "limits parser failed; everything in force stays")
            }
        }
    }
}

/// A TCP connection holding one of the server's connection permits until it closes.
struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections while fewer than `max` are open (mini-redis style: a semaphore permit
/// per connection, returned when it closes).
fn limited_incoming(
    listener: TcpListener,
    max: usize,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<LimitedStream>> {
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.wait_for(|s| *s) => return,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = LimitedStream {
                        stream,
                        _permit: permit,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
