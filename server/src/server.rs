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

use crate::api::auth::{AuthConfig, AuthLayer, SharedAuth};
use crate::api::http::Readiness;
use crate::api::{self, ResponseOptions};
use crate::config::{self, Config, Format, Metering};
use crate::engine::access::Subscription;
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
    /// The admin API's bearer tokens (`api::auth`); none: admin, billing and cluster calls
    /// are served to loopback peers only.
    pub auth: AuthConfig,
    /// Re-read the tokens file every `limits_poll` and put its tokens in force when it
    /// changes (a file that does not parse leaves the tokens in force and logs an error).
    pub auth_reload: Option<AuthReload>,
    /// TLS for the gRPC and HTTP listeners (with a client CA: mutual TLS, a client
    /// certificate signed by it required); none: plaintext.
    pub tls: Option<TlsConfig>,
    /// Mutual TLS for the Raft listener (its client CA is required: a peer without a
    /// certificate signed by it cannot connect); none: plaintext.
    pub raft_tls: Option<TlsConfig>,
    /// Paths ext_authz's Check passes without an API key (exact match, query string ignored).
    pub authz_public_paths: Vec<String>,
    /// The usage metrics' labels and bound (`--metrics-usage-labels`,
    /// `--metrics-max-usage-series`).
    pub usage_metrics: crate::usage_metrics::UsageMetricsConfig,
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
            auth: AuthConfig::default(),
            auth_reload: None,
            tls: None,
            raft_tls: None,
            authz_public_paths: api::AuthzConfig::default().public_paths,
            usage_metrics: crate::usage_metrics::UsageMetricsConfig::default(),
        }
    }
}

/// Where the admin API's tokens come from, for reloading: the tokens file, and the tokens
/// that are not from it (`TALLY_ADMIN_TOKEN`), which every reload keeps.
#[derive(Clone, Debug)]
pub struct AuthReload {
    pub file: PathBuf,
    pub base: AuthConfig,
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
    #[error("subscriptions refused by the engine: {0}")]
    SubscriptionsRejected(crate::engine::CommandError),
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
    #[error("TLS: {0}")]
    Tls(String),
}

/// A TLS file or setting that cannot be used (the message names it; never a key's bytes).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

impl From<TlsError> for ServerError {
    fn from(e: TlsError) -> ServerError {
        ServerError::Tls(e.0)
    }
}

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on the HTTP listener; more connections are dropped.
const MAX_HTTP_HANDSHAKES: usize = 256;

/// A listener's TLS, as PEM: its certificate chain and private key, and for mutual TLS the CA
/// certificate(s) a client's certificate must be signed by. `Debug` never shows the key.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Some: clients must present a certificate signed by one of these CAs.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .field("mutual", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// Reads the PEM files.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<TlsConfig, TlsError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))
        };
        Ok(TlsConfig {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: client_ca.map(read).transpose()?,
        })
    }

    /// tonic's server TLS (gRPC and Raft listeners; rustls with the ring provider).
    fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        tls
    }

    /// The client side of this TLS, for dialling peers (the Raft listener's `raft_tls`): it
    /// presents this certificate and key, and verifies a peer's server certificate against
    /// `client_ca_pem`, the cluster's CA (which signed every member's certificate; the
    /// certificate must name the host or IP of the peer's Raft address). `what` names the
    /// settings in the error: a missing CA, or PEM that rustls refuses.
    pub fn peer_client(&self, what: &str) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let Some(ca) = &self.client_ca_pem else {
            return Err(TlsError(format!(
                "{what}: peers are verified against a CA, and none is given"
            )));
        };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ));
        // tonic reads the PEM when TLS is put on an endpoint: do it once here, so that a file
        // it refuses stops the start instead of making every peer unreachable.
        tonic::transport::Endpoint::from_static("https://127.0.0.1")
            .tls_config(tls.clone())
            .map_err(|e| TlsError(format!("{what}: {}", error_chain(&e))))?;
        Ok(tls)
    }

    /// A rustls acceptor for the HTTP listener (HTTP/1.1), with the same certificates.
    fn http_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError(format!("{what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", &e))?;
        if certs.is_empty() {
            return Err(TlsError("certificate: no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("key", &e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| bad("client CA", &e))?;
                    roots.add(cert).map_err(|e| bad("client CA", &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("client CA", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate and key", &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// Checks that the PEM files make a usable server configuration (for tonic and for the
    /// HTTP listener), so a bad file stops the start with a message naming the flags.
    fn check(&self, what: &str) -> Result<(), TlsError> {
        tonic::transport::Server::builder()
            .tls_config(self.grpc())
            .map_err(|e| TlsError(format!("{what}: {}", error_chain(&e))))?;
        self.http_acceptor()
            .map_err(|e| TlsError(format!("{what}: {}", e.0)))?;
        Ok(())
    }
}

/// An error and its causes, joined with `": "`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Checks the TLS settings of a configuration before anything starts.
fn check_tls(config: &ServerConfig) -> Result<(), TlsError> {
    if let Some(tls) = &config.tls {
        tls.check("--tls-cert/--tls-key/--tls-client-ca")?;
    }
    if let Some(tls) = &config.raft_tls {
        if tls.client_ca_pem.is_none() {
            return Err(TlsError(
                "Raft TLS is mutual: --raft-tls-ca is required with --raft-tls-cert".into(),
            ));
        }
        tls.check("--raft-tls-cert/--raft-tls-key/--raft-tls-ca")?;
    }
    Ok(())
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
    check_tls(&config)?;
    let raft_addr = listeners.raft.local_addr()?;
    // The Raft listener's certificate is also this node's client certificate towards its
    // peers, and its client CA verifies theirs.
    let peer_tls = config
        .raft_tls
        .as_ref()
        .map(|tls| tls.peer_client("--raft-tls-cert/--raft-tls-key/--raft-tls-ca"))
        .transpose()?;
    let node = Node::start(
        NodeConfig {
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
        },
        peer_tls,
    )
    .await?;
    if let Some(started) = started {
        let _ = started.set(node.clone());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // One per server (tests run several in a process): `/metrics` on the HTTP listener.
    let metrics = crate::metrics::Metrics::new();
    tokio::spawn(metrics.clone().watch_raft(node.clone(), stop_rx.clone()));
    tokio::spawn(crate::usage_metrics::run(
        node.clone(),
        metrics.clone(),
        config.usage_metrics,
        stop_rx.clone(),
    ));
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
    if config.auth.is_configured() {
        tracing::info!(
            tokens = config.auth.len(),
            "admin API: bearer tokens required for admin, billing and cluster calls"
        );
    } else {
        tracing::warn!(
            "admin API: no tokens configured (--auth-tokens, TALLY_ADMIN_TOKEN): admin, billing and cluster calls are served to loopback peers (127.0.0.1, ::1) only"
        );
    }
    let auth = SharedAuth::new(config.auth.clone());
    if let (Some(reload), false) = (&config.auth_reload, config.limits_poll.is_zero()) {
        tokio::spawn(watch_tokens(
            reload.clone(),
            config.limits_poll,
            auth.clone(),
            stop_rx.clone(),
        ));
    }
    let raft_task = tokio::spawn(serve_raft(
        listeners.raft,
        node.clone(),
        auth.clone(),
        config.raft_tls.clone(),
        stop_rx.clone(),
        metrics.clone(),
    ));
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
    let http_app = api::http::router(node.clone(), readiness, metrics.clone());
    let http_stop = stopped(stop_rx.clone());
    let http = listeners.http;
    let http_task = match &config.tls {
        None => tokio::spawn(async move {
            axum::serve(http, http_app)
                .with_graceful_shutdown(http_stop)
                .await
        }),
        Some(tls) => {
            let tls = tls_listener(http, tls.http_acceptor()?, stop_rx.clone())?;
            tokio::spawn(async move {
                axum::serve(tls, http_app)
                    .with_graceful_shutdown(http_stop)
                    .await
            })
        }
    };
    let incoming = limited_incoming(listeners.grpc, config.max_connections, stop_rx.clone());
    let mut grpc = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        grpc = grpc.tls_config(tls.grpc())?;
    }
    grpc.max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(
            api::grpc_routes_secured(
                node.clone(),
                config.response,
                auth,
                api::AuthzConfig {
                    public_paths: config.authz_public_paths.clone(),
                },
                stop_rx.clone(),
                metrics,
            )
            .await,
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

/// Serves Raft, forwarding and cluster operations to peers. Cluster operations are behind
/// the admin API's tokens ([`AuthLayer`]); Raft and forwarding are node-to-node. Every call
/// (unknown paths too) is counted and timed in `metrics`, as on the gRPC listener.
async fn serve_raft(
    listener: TcpListener,
    node: Node,
    auth: SharedAuth,
    tls: Option<TlsConfig>,
    stop: watch::Receiver<bool>,
    metrics: crate::metrics::Metrics,
) -> Result<(), ServerError> {
    use tower_layer::Layer;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        // Mutual: the client CA is required (checked at start), so a peer without a
        // certificate signed by it fails the handshake and reaches no service.
        builder = builder.tls_config(tls.grpc())?;
    }
    let routes = tonic::service::Routes::new(api::raft::raft_service_for(&node))
        .add_service(crate::node::forward::forward_service(node.clone()))
        .add_service(AuthLayer::new(auth).layer(api::cluster::cluster_service(node)));
    // Outermost, over the fallback as well.
    let routes =
        tonic::service::Routes::from(routes.into_axum_router().layer(metrics.grpc_layer()));
    builder
        .tcp_nodelay(true)
        .add_routes(routes)
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
        let configured = match node
            .propose(from_config(Command::Configure(settings)))
            .await
        {
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
    check_tls(&config)?;
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

/// A change the server makes from its flags and configuration file, for the audit log
/// (recorded only when it changes something: every node re-applies its file at start).
fn from_config(command: Command) -> Command {
    Command::Audited(Box::new(crate::engine::audit::Audited {
        actor: crate::engine::audit::Actor::config("flags and configuration file"),
        command,
    }))
}

async fn replace_limits(node: &Node, set: LimitSet) -> Result<(u64, u64), ServerError> {
    match node.propose(from_config(Command::ReplaceLimits(set))).await {
        Ok(Outcome::LimitsReplaced { limits, kept, .. }) => Ok((limits, kept)),
        Ok(Outcome::Rejected(e)) => Err(ServerError::LimitsRejected(e)),
        Ok(other) => panic!("ReplaceLimits answered with {other:?}"),
        Err(e) => Err(ServerError::NotInForce(e)),
    }
}

async fn replace_quotas(node: &Node, set: QuotaSet) -> Result<(u64, u64), ServerError> {
    match node.propose(from_config(Command::ReplaceQuotas(set))).await {
        Ok(Outcome::QuotasReplaced { quotas, kept }) => Ok((quotas, kept)),
        Ok(Outcome::Rejected(e)) => Err(ServerError::QuotasRejected(e)),
        Ok(other) => panic!("ReplaceQuotas answered with {other:?}"),
        Err(e) => Err(ServerError::NotInForce(e)),
    }
}

/// Puts each of the file's subscriptions in force that differs from the one in force.
async fn put_subscriptions(node: &Node, list: Vec<Subscription>) -> Result<(), ServerError> {
    for s in list {
        let same = node
            .read(|e| e.subscriptions().any(|x| *x == s))
            .await
            .map_err(ServerError::NotInForce)?;
        if same {
            continue;
        }
        match node.propose(from_config(Command::PutSubscription(s))).await {
            Ok(Outcome::SubscriptionsChanged { .. }) => {}
            Ok(Outcome::Rejected(e)) => return Err(ServerError::SubscriptionsRejected(e)),
            Ok(other) => panic!("PutSubscription answered with {other:?}"),
            Err(e) => return Err(ServerError::NotInForce(e)),
        }
    }
    Ok(())
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
    match node.propose(from_config(Command::SetPrices(catalog))).await {
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
        metering:
            Metering {
                prices,
                quotas,
                subscriptions,
            },
    } = config;
    let (limits, limits_kept) = replace_limits(node, limits).await?;
    put_subscriptions(node, subscriptions).await?;
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
/// Re-reads the tokens file every `poll`; a changed file that parses is put in force (with
/// the tokens not from the file), one that does not leaves the tokens in force.
async fn watch_tokens(
    reload: AuthReload,
    poll: Duration,
    auth: SharedAuth,
    mut stop: watch::Receiver<bool>,
) {
    let path = reload.file.display().to_string();
    let mut last = tokio::fs::read_to_string(&reload.file)
        .await
        .ok()
        .map(|t| fingerprint(&t));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let text = match tokio::fs::read_to_string(&reload.file).await {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot read the tokens file; the tokens in force stay");
                continue;
            }
        };
        let print = Some(fingerprint(&text));
        if print == last {
            continue;
        }
        last = print;
        match reload.base.clone().with_file_text(&text, &path) {
            Ok(tokens) => {
                tracing::info!(path, tokens = tokens.len(), "tokens file reloaded");
                auth.replace(tokens);
            }
            Err(e) => {
                tracing::error!(path, error = %e, "tokens file refused; the tokens in force stay");
            }
        }
    }
}

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

/// The HTTP listener behind TLS: connections are accepted and their handshakes run in the
/// background (at most [`MAX_HTTP_HANDSHAKES`] at once, each within
/// [`TLS_HANDSHAKE_TIMEOUT`]); axum gets only the established ones.
struct TlsListener {
    established: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.established.recv().await {
            Some(conn) => conn,
            // The accept task ended (the server is stopping): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

fn tls_listener(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<TlsListener> {
    let local = listener.local_addr()?;
    let (tx, established) = mpsc::channel(16);
    let handshakes = Arc::new(Semaphore::new(MAX_HTTP_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (stream, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
                }
            });
        }
    });
    Ok(TlsListener { established, local })
}
