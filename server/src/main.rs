//! `tallyd`: the Tally server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, ValueEnum};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tally_server::api::ResponseOptions;
use tally_server::api::auth::AuthConfig;
use tally_server::config::Format;
use tally_server::engine::{self, CommandError, EngineSettings};
use tally_server::node::usage_archive::ArchiveConfig;
use tally_server::node::{
    BatchConfig, MAX_BATCH_COMMANDS, MAX_INFLIGHT_BATCHES, RaftTimings, SystemClock,
};
use tally_server::otlp;
use tally_server::server::{self, AuthReload, LimitsSource, ServerConfig, TlsConfig};
use tally_server::usage_metrics::{self, UsageLabels, UsageMetricsConfig};

/// Tally: rate limiting and metering for AI gateways (Envoy RLS v3 and Kuadrant v1).
///
/// With no arguments it serves the shipped example limits (examples/limits.yaml, embedded in
/// the binary) on 127.0.0.1. Every flag can also be set by the environment variable shown.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// gRPC listen address (Envoy RLS v3, Kuadrant v1, tally.v1, gRPC health and reflection).
    #[arg(long, env = "TALLY_GRPC_LISTEN", default_value = "127.0.0.1:8081")]
    grpc_listen: SocketAddr,

    /// HTTP listen address (GET /healthz liveness, GET /readyz readiness).
    #[arg(long, env = "TALLY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,

    /// Raft listen address: node-to-node traffic (Raft, forwarding) and `tally cluster`.
    #[arg(long, env = "TALLY_RAFT_LISTEN", default_value = "127.0.0.1:8082")]
    raft_listen: SocketAddr,

    /// The Raft address peers reach this node at (host:port); the listen address if unset.
    #[arg(long, env = "TALLY_RAFT_ADVERTISE")]
    raft_advertise: Option<String>,

    /// This node's id in the cluster: unique, never reused for another node (1 to 2^64 - 2).
    #[arg(long, env = "TALLY_NODE_ID", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..tally_server::node::log_store::NO_VOTE))]
    node_id: u64,

    /// The node's data directory (Raft log, snapshots). Never shared between nodes.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = server::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,

    /// Do not make an empty node a one-node cluster: wait for `tally cluster init`, or to be
    /// added by a leader (`tally cluster add-learner`).
    #[arg(long, env = "TALLY_NO_BOOTSTRAP")]
    no_bootstrap: bool,

    /// Raft heartbeat interval, ms. Elections time out after 3 to 6 heartbeats.
    #[arg(long, env = "TALLY_RAFT_HEARTBEAT_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    raft_heartbeat_ms: u64,

    /// Log entries between snapshots; the log is purged behind each snapshot.
    #[arg(long, env = "TALLY_SNAPSHOT_EVERY", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    snapshot_every: u64,

    /// Limits file: limits, and in the native format also `metering` (quotas and model
    /// prices). Without it, the embedded example is served.
    #[arg(long, env = "TALLY_LIMITS")]
    limits: Option<PathBuf>,

    /// Format of the limits file; detected from its shape when not given.
    #[arg(long, env = "TALLY_LIMITS_FORMAT", value_enum)]
    limits_format: Option<Format>,

    /// How often the limits file is checked for changes, in ms; 0 disables reloading.
    /// A changed file that does not load is logged and the limits, quotas and prices in
    /// force stay. Its prices are set only if they differ from those in force (they may
    /// also be set over the API: the last writer wins).
    #[arg(long, env = "TALLY_LIMITS_POLL_MS", default_value_t = 1_000)]
    limits_poll_ms: u64,

    /// Rate-limit headers added to every response: `off`, or `draft03`
    /// (x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset).
    #[arg(long, env = "TALLY_RATELIMIT_HEADERS", value_enum, default_value_t = Headers::Off)]
    ratelimit_headers: Headers,

    /// Most counters held in memory; a request that would create more is refused with
    /// RESOURCE_EXHAUSTED (Envoy then applies its failure mode).
    #[arg(long, env = "TALLY_MAX_COUNTERS", default_value_t = engine::DEFAULT_MAX_COUNTERS)]
    max_counters: u64,

    /// Most request ids remembered for exactly-once usage (report, reserve, commit); a
    /// command with a new id beyond it is refused with RESOURCE_EXHAUSTED until retention
    /// frees some (never forgetting an id early).
    #[arg(long, env = "TALLY_MAX_REQUEST_IDS", default_value_t = engine::DEFAULT_MAX_REQUEST_IDS)]
    max_request_ids: u64,

    /// How long a settled request id is remembered: a retry within it gets its first answer
    /// again and counts nothing twice. A duration (ms, s, m, h, d, w: 24h, 7d); at least 1h,
    /// the longest reservation.
    #[arg(long, env = "TALLY_REQUEST_ID_RETENTION", default_value = "24h",
          value_parser = duration_ms, value_name = "DURATION")]
    request_id_retention: u64,

    /// Most quota counters held at once; usage that needs a new one beyond it is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "TALLY_MAX_QUOTA_COUNTERS", default_value_t = engine::DEFAULT_MAX_QUOTA_COUNTERS)]
    max_quota_counters: u64,

    /// Most usage records (one per request) kept in memory (and in snapshots) for minute-level
    /// usage queries, oldest dropped first. The export reads the on-disk usage archive
    /// instead (--usage-archive-retention, --max-usage-archive-gib).
    #[arg(long, env = "TALLY_MAX_USAGE_RECORDS", default_value_t = engine::DEFAULT_MAX_USAGE_RECORDS)]
    max_usage_records: u64,

    /// Most 15-minute usage aggregate rows kept for usage queries; the oldest period is
    /// dropped first.
    #[arg(long, env = "TALLY_MAX_USAGE_BUCKETS", default_value_t = engine::DEFAULT_MAX_USAGE_BUCKETS)]
    max_usage_buckets: u64,

    /// How long 15-minute usage aggregates are kept for usage queries. A duration (ms, s, m,
    /// h, d, w: 400d, 13w); at least 1d.
    #[arg(long, env = "TALLY_USAGE_RETENTION", default_value = "400d",
          value_parser = duration_ms, value_name = "DURATION")]
    usage_retention: u64,

    /// How long usage records are kept in this node's on-disk archive (`<data-dir>/usage`,
    /// what ExportUsage reads), counted back from the newest record. A duration (ms, s, m, h,
    /// d, w). Node-local: not replicated.
    #[arg(long, env = "TALLY_USAGE_ARCHIVE_RETENTION", default_value = "400d",
          value_parser = duration_ms, value_name = "DURATION")]
    usage_archive_retention: u64,

    /// Largest size of this node's usage archive on disk, in GiB; the oldest 64 MiB segments
    /// are deleted beyond it (an export that needs them is refused with OUT_OF_RANGE).
    #[arg(long, env = "TALLY_MAX_USAGE_ARCHIVE_GIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    max_usage_archive_gib: u64,

    /// Most commands applied in one batch.
    #[arg(long, env = "TALLY_BATCH_MAX_COMMANDS", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=MAX_BATCH_COMMANDS as u64))]
    batch_max_commands: u64,

    /// How long a batch waits for more commands after its first, in microseconds, even when
    /// it could be proposed. 0 (the default) proposes as soon as the pipeline has room:
    /// commands arriving while it is full join the waiting batch, so batching needs no added
    /// latency.
    #[arg(long, env = "TALLY_BATCH_LINGER_US", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    batch_linger_us: u64,

    /// Batches in flight (proposed, not yet committed) at most. Commands arriving while the
    /// pipeline is full join the next, larger batch, so one fsync and one replication round
    /// trip serve them all.
    #[arg(long, env = "TALLY_BATCH_MAX_INFLIGHT", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=MAX_INFLIGHT_BATCHES as u64))]
    batch_max_inflight: u64,

    /// Most open gRPC connections; further connections wait to be accepted.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = server::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,

    /// Paths Envoy's ext_authz Check passes without an API key, comma-separated (exact
    /// match of the path, query string ignored); empty: none.
    #[arg(
        long,
        env = "TALLY_AUTHZ_PUBLIC_PATHS",
        value_delimiter = ',',
        default_value = "/healthz,/readyz",
        value_name = "PATHS"
    )]
    authz_public_paths: Vec<String>,

    /// Admin API tokens: a YAML or JSON list of `{ name, role, token_sha256 }` (role admin,
    /// billing or read-only; only the SHA-256 hex of each token, from `tally auth
    /// new-token` or `tally auth hash-token`, so the file holds no secret). The environment
    /// variable TALLY_ADMIN_TOKEN may also hold one plain admin token (at least 16
    /// characters). With neither, admin, billing and cluster calls are served to loopback
    /// peers only.
    #[arg(long, env = "TALLY_AUTH_TOKENS", value_name = "FILE")]
    auth_tokens: Option<PathBuf>,

    /// TLS certificate chain (PEM) for the gRPC and HTTP listeners; with --tls-key. Without
    /// them both listeners are plaintext.
    #[arg(
        long,
        env = "TALLY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "TALLY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM) for mutual TLS on the gRPC and HTTP listeners: every client
    /// must present a certificate signed by one of them. Needs --tls-cert.
    #[arg(
        long,
        env = "TALLY_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<PathBuf>,

    /// Mutual TLS between Raft peers: this node's certificate chain (PEM), presented both as
    /// the Raft listener's server certificate and as this node's client certificate when it
    /// dials its peers (Raft, forwarding, `tally cluster` calls passed on to the leader). It
    /// must be signed by --raft-tls-ca and name the host or IP of this node's
    /// --raft-advertise address. Needs --raft-tls-key and --raft-tls-ca. Without the three
    /// flags, node-to-node traffic is plaintext.
    #[arg(
        long,
        env = "TALLY_RAFT_TLS_CERT",
        value_name = "FILE",
        requires_all = ["raft_tls_key", "raft_tls_ca"]
    )]
    raft_tls_cert: Option<PathBuf>,

    /// Mutual TLS between Raft peers: the private key (PEM) of --raft-tls-cert.
    #[arg(
        long,
        env = "TALLY_RAFT_TLS_KEY",
        value_name = "FILE",
        requires_all = ["raft_tls_cert", "raft_tls_ca"]
    )]
    raft_tls_key: Option<PathBuf>,

    /// Mutual TLS between Raft peers: the cluster's CA certificate(s) (PEM). Every member
    /// must use the same CA: a peer without a certificate signed by it cannot join the
    /// cluster or send Raft messages (its TLS handshake fails before any call), and peers'
    /// certificates are verified against it when this node dials them. `tally cluster`
    /// reaches the Raft listener with --ca (this CA) and --client-cert/--client-key (a
    /// certificate it signed). Needs --raft-tls-cert and --raft-tls-key.
    #[arg(
        long,
        env = "TALLY_RAFT_TLS_CA",
        value_name = "FILE",
        requires_all = ["raft_tls_cert", "raft_tls_key"]
    )]
    raft_tls_ca: Option<PathBuf>,

    /// Labels of the usage metrics on GET /metrics (tally_usage_tokens_total,
    /// tally_usage_cost_nusd_total, tally_usage_records_total): `key-model` (a series per API
    /// key and model), `model` (per model, every key counted as key="_all"), or `none` (the
    /// usage metrics are not registered at all).
    #[arg(long, env = "TALLY_METRICS_USAGE_LABELS", value_enum,
          default_value_t = UsageLabelsFlag::KeyModel)]
    metrics_usage_labels: UsageLabelsFlag,

    /// Most distinct (key, model) label pairs of the usage metrics with series of their own
    /// (with `--metrics-usage-labels model`: most models), the first ones counted since the
    /// node started; later pairs count under key="_other", model="_other" (key="_all",
    /// model="_other" with `model`). Keys and model names come from the network: this bounds
    /// the series at 4 x (N + 1) token series and N + 1 of each other usage counter. 0 to
    /// 100000.
    #[arg(long, env = "TALLY_METRICS_MAX_USAGE_SERIES",
          default_value_t = usage_metrics::DEFAULT_MAX_USAGE_SERIES as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_USAGE_SERIES_FLAG))]
    metrics_max_usage_series: u64,

    /// Export traces (a span per gRPC call, a child of the caller's W3C `traceparent`) to
    /// this OTLP/gRPC collector, e.g. http://127.0.0.1:4317. Off when unset.
    #[arg(long, env = "TALLY_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans.
    #[arg(long, env = "TALLY_OTLP_SERVICE_NAME", default_value = "tally")]
    otlp_service_name: String,

    /// Log format.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter (tracing-subscriber syntax, e.g. `info` or `tally_server=debug`).
    #[arg(long, env = "TALLY_LOG", default_value = "info,openraft=warn")]
    log: String,
}

/// The admin API's tokens: the `--auth-tokens` file and/or `TALLY_ADMIN_TOKEN` (read from
/// the environment, never a flag, so it stays out of process listings).
fn auth_config(
    file: Option<&std::path::Path>,
    admin_token: Option<std::ffi::OsString>,
) -> anyhow::Result<(AuthConfig, Option<AuthReload>)> {
    let mut base = AuthConfig::default();
    if let Some(token) = admin_token {
        let token = token
            .into_string()
            .map_err(|_| anyhow!("TALLY_ADMIN_TOKEN: not valid UTF-8"))?;
        base = base.with_admin_token(&token)?;
    }
    let Some(path) = file else {
        return Ok((base, None));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--auth-tokens: cannot read {}", path.display()))?;
    let auth = base
        .clone()
        .with_file_text(&text, &path.display().to_string())
        .context("--auth-tokens")?;
    let reload = AuthReload {
        file: path.to_owned(),
        base,
    };
    Ok((auth, Some(reload)))
}

/// `--authz-public-paths`, without empty entries (`""` means none).
fn public_paths(flag: &[String]) -> Vec<String> {
    flag.iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A duration flag (`24h`, `400d`), in milliseconds.
fn duration_ms(s: &str) -> Result<u64, String> {
    tally_server::config::parse_duration_ms(s)
}

/// The engine settings the flags give, checked; an error names the flag.
fn engine_settings(args: &Args) -> anyhow::Result<EngineSettings> {
    let settings = EngineSettings {
        max_counters: args.max_counters,
        max_request_ids: args.max_request_ids,
        request_id_retention_ms: args.request_id_retention,
        max_quota_counters: args.max_quota_counters,
        max_usage_records: args.max_usage_records,
        max_usage_buckets: args.max_usage_buckets,
        usage_bucket_retention_ms: args.usage_retention,
    };
    settings.validate().map_err(|e| match e {
        CommandError::Invalid { field, reason } => {
            let flag = match field.as_str() {
                "max_counters" => "--max-counters",
                "max_request_ids" => "--max-request-ids",
                "request_id_retention_ms" => "--request-id-retention",
                "max_quota_counters" => "--max-quota-counters",
                "max_usage_records" => "--max-usage-records",
                "max_usage_buckets" => "--max-usage-buckets",
                "usage_bucket_retention_ms" => "--usage-retention",
                other => other,
            };
            anyhow!("{flag}: {reason}")
        }
        other => anyhow!("engine settings: {other}"),
    })?;
    Ok(settings)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Headers {
    Off,
    Draft03,
}

/// `--metrics-usage-labels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UsageLabelsFlag {
    KeyModel,
    Model,
    None,
}

/// The largest `--metrics-max-usage-series`.
const MAX_USAGE_SERIES_FLAG: u64 = 100_000;

/// The usage metrics' settings the flags give.
fn usage_metrics_config(args: &Args) -> UsageMetricsConfig {
    UsageMetricsConfig {
        labels: match args.metrics_usage_labels {
            UsageLabelsFlag::KeyModel => UsageLabels::KeyModel,
            UsageLabelsFlag::Model => UsageLabels::Model,
            UsageLabelsFlag::None => UsageLabels::None,
        },
        max_series: args.metrics_max_usage_series as usize,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Installs the log subscriber, and the OTLP trace exporter when `--otlp-endpoint` is given:
/// the tracer provider is returned, to be shut down (flushed) once serving ends, outside the
/// async runtime (it owns a runtime of its own).
fn init_logging(args: &Args) -> anyhow::Result<Option<SdkTracerProvider>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    let provider = match &args.otlp_endpoint {
        Some(endpoint) => Some(otlp::provider(&otlp::OtlpConfig {
            endpoint: endpoint.clone(),
            service_name: args.otlp_service_name.clone(),
        })?),
        None => None,
    };
    let traces = provider.as_ref().map(otlp::layer);
    let (text, json) = match args.log_format {
        LogFormat::Text => (Some(tracing_subscriber::fmt::layer()), None),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json())),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(traces)
        .try_init()
        .context("installing the log subscriber")?;
    Ok(provider)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received; finishing in-flight calls");
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let traces = match init_logging(&args) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("tallyd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tallyd: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let served = runtime.block_on(serve(args));
    if let Some(provider) = traces {
        // Flushes the spans still buffered (bounded by the exporter's timeout).
        let _ = provider.shutdown();
    }
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, causes joined: operators read this in service logs.
            eprintln!("tallyd: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let engine = engine_settings(&args)?;
    let (auth, auth_reload) = auth_config(
        args.auth_tokens.as_deref(),
        std::env::var_os("TALLY_ADMIN_TOKEN"),
    )?;
    let limits = match &args.limits {
        Some(path) => LimitsSource::File(path.clone()),
        None => {
            tracing::info!("no --limits given: serving the embedded example limits");
            ServerConfig::default().limits
        }
    };
    let config = ServerConfig {
        limits,
        limits_format: args.limits_format,
        limits_poll: Duration::from_millis(args.limits_poll_ms),
        response: ResponseOptions {
            draft03_headers: args.ratelimit_headers == Headers::Draft03,
        },
        engine,
        archive: ArchiveConfig {
            retention_ms: args.usage_archive_retention,
            max_bytes: args.max_usage_archive_gib.saturating_mul(1 << 30),
            ..ArchiveConfig::default()
        },
        batch: BatchConfig {
            max_batch_commands: args.batch_max_commands as usize,
            batch_linger: Duration::from_micros(args.batch_linger_us),
            max_inflight_batches: args.batch_max_inflight as usize,
        },
        max_connections: args.max_connections as usize,
        authz_public_paths: public_paths(&args.authz_public_paths),
        usage_metrics: usage_metrics_config(&args),
        clock: Arc::new(SystemClock),
        node_id: args.node_id,
        data_dir: args.data_dir.clone(),
        raft_advertise: args.raft_advertise.clone(),
        bootstrap: !args.no_bootstrap,
        timings: RaftTimings {
            heartbeat_ms: args.raft_heartbeat_ms,
            election_min_ms: 3 * args.raft_heartbeat_ms,
            election_max_ms: 6 * args.raft_heartbeat_ms,
            snapshot_every_entries: args.snapshot_every,
            logs_kept_behind_snapshot: RaftTimings::default().logs_kept_behind_snapshot,
        },
        auth,
        auth_reload,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(
                TlsConfig::from_files(cert, key, args.tls_client_ca.as_deref())
                    .context("--tls-cert/--tls-key/--tls-client-ca")?,
            ),
            _ => None,
        },
        raft_tls: match (&args.raft_tls_cert, &args.raft_tls_key, &args.raft_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(
                TlsConfig::from_files(cert, key, Some(ca))
                    .context("--raft-tls-cert/--raft-tls-key/--raft-tls-ca")?,
            ),
            _ => None,
        },
    };
    let grpc = tokio::net::TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", args.grpc_listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    let raft = tokio::net::TcpListener::bind(args.raft_listen)
        .await
        .with_context(|| format!("cannot listen for Raft on {}", args.raft_listen))?;
    let listeners = server::Listeners { grpc, http, raft };
    server::run(listeners, config, shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn args(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("tallyd").chain(flags.iter().copied()))
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn auth_tokens_come_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let digest = tally_server::api::auth::sha256_hex("finance-token-0123456789");
        std::fs::write(
            &path,
            format!("- {{ name: finance, role: billing, token_sha256: {digest} }}\n"),
        )
        .unwrap();
        let a = args(&["--auth-tokens", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            auth_config(a.auth_tokens.as_deref(), None).unwrap().0.len(),
            1
        );
        let both = auth_config(
            a.auth_tokens.as_deref(),
            Some("an-admin-token-0123456789".into()),
        )
        .unwrap();
        assert_eq!(both.0.len(), 2);
        // A reload re-reads the file and keeps the environment's token.
        let reload = both.1.unwrap();
        assert_eq!(reload.file, a.auth_tokens.clone().unwrap());
        assert_eq!(reload.base.len(), 1);
        assert!(!auth_config(None, None).unwrap().0.is_configured());
        let e = auth_config(None, Some("short".into())).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("TALLY_ADMIN_TOKEN: must be at least"),
            "{e:#}"
        );
        let e = auth_config(Some(&dir.path().join("missing.yaml")), None).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("--auth-tokens: cannot read"),
            "{e:#}"
        );
    }

    #[test]
    fn authz_public_paths_default_to_the_health_paths() {
        let default = public_paths(&args(&[]).unwrap().authz_public_paths);
        assert_eq!(default, ServerConfig::default().authz_public_paths);
        let a = args(&["--authz-public-paths", "/healthz, /v1/models"]).unwrap();
        assert_eq!(
            public_paths(&a.authz_public_paths),
            ["/healthz", "/v1/models"]
        );
        let none = args(&["--authz-public-paths", ""]).unwrap();
        assert!(public_paths(&none.authz_public_paths).is_empty());
    }

    #[test]
    fn tls_flags_come_in_pairs() {
        assert!(args(&["--tls-cert", "c.pem"]).is_err());
        assert!(args(&["--tls-key", "k.pem"]).is_err());
        assert!(args(&["--tls-client-ca", "ca.pem"]).is_err());
        let a = args(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .unwrap();
        assert!(a.tls_client_ca.is_some());
    }

    #[test]
    fn raft_tls_flags_come_together() {
        let all = [
            ("--raft-tls-cert", "c.pem"),
            ("--raft-tls-key", "k.pem"),
            ("--raft-tls-ca", "ca.pem"),
        ];
        // Any one or two of the three are refused, naming a missing one.
        for leave_out in 0..all.len() {
            for only in [true, false] {
                let flags: Vec<&str> = all
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (*i == leave_out) == only)
                    .flat_map(|(_, (flag, value))| [*flag, *value])
                    .collect();
                let e = args(&flags).expect_err("incomplete --raft-tls-* flags");
                assert_eq!(
                    e.kind(),
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "{flags:?}: {e}"
                );
                assert!(e.to_string().contains("--raft-tls-"), "{flags:?}: {e}");
            }
        }
        let flags: Vec<&str> = all.iter().flat_map(|(f, v)| [*f, *v]).collect();
        let a = args(&flags).unwrap();
        assert_eq!(
            a.raft_tls_ca.as_deref(),
            Some(std::path::Path::new("ca.pem"))
        );
        // Independent of the gRPC listener's TLS.
        assert!(a.tls_cert.is_none());
        let none = args(&[]).unwrap();
        assert!(none.raft_tls_cert.is_none() && none.raft_tls_key.is_none());
    }

    #[test]
    fn usage_metrics_flags_set_the_labels_and_the_bound() {
        assert_eq!(
            usage_metrics_config(&args(&[]).unwrap()),
            ServerConfig::default().usage_metrics
        );
        assert_eq!(
            usage_metrics_config(&args(&[]).unwrap()),
            UsageMetricsConfig {
                labels: UsageLabels::KeyModel,
                max_series: 1000,
            }
        );
        for (value, labels) in [
            ("key-model", UsageLabels::KeyModel),
            ("model", UsageLabels::Model),
            ("none", UsageLabels::None),
        ] {
            let a = args(&[
                "--metrics-usage-labels",
                value,
                "--metrics-max-usage-series",
                "2",
            ])
            .unwrap();
            assert_eq!(
                usage_metrics_config(&a),
                UsageMetricsConfig {
                    labels,
                    max_series: 2,
                }
            );
        }
        assert!(args(&["--metrics-usage-labels", "key"]).is_err());
        assert!(args(&["--metrics-max-usage-series", "100001"]).is_err());
        assert!(args(&["--metrics-max-usage-series", "-1"]).is_err());
        assert_eq!(
            usage_metrics_config(&args(&["--metrics-max-usage-series", "0"]).unwrap()).max_series,
            0
        );
    }

    #[test]
    fn default_flags_are_the_default_engine_settings() {
        let settings = engine_settings(&args(&[]).unwrap()).unwrap();
        assert_eq!(settings, EngineSettings::default());
    }

    #[test]
    fn metering_flags_set_the_engine_settings() {
        let a = args(&[
            "--max-counters",
            "7",
            "--max-request-ids",
            "10",
            "--request-id-retention",
            "2h",
            "--max-quota-counters",
            "11",
            "--max-usage-records",
            "12",
            "--max-usage-buckets",
            "13",
            "--usage-retention",
            "30d",
        ])
        .unwrap();
        assert_eq!(
            engine_settings(&a).unwrap(),
            EngineSettings {
                max_counters: 7,
                max_request_ids: 10,
                request_id_retention_ms: 7_200_000,
                max_quota_counters: 11,
                max_usage_records: 12,
                max_usage_buckets: 13,
                usage_bucket_retention_ms: 30 * 86_400_000,
            }
        );
    }

    #[test]
    fn bad_metering_flags_name_the_flag() {
        let e = args(&["--usage-retention", "5 days"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--usage-retention") && e.contains("unknown unit"),
            "{e}"
        );
        let e = args(&["--request-id-retention", "24"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--request-id-retention") && e.contains("no unit"),
            "{e}"
        );
        for (flags, expected) in [
            (
                &["--max-request-ids", "0"][..],
                "--max-request-ids: must be at least 1",
            ),
            (
                &["--max-quota-counters", "0"],
                "--max-quota-counters: must be at least 1",
            ),
            (
                &["--max-usage-records", "0"],
                "--max-usage-records: must be at least 1",
            ),
            (
                &["--max-usage-buckets", "0"],
                "--max-usage-buckets: must be at least 1",
            ),
            (
                &["--max-counters", "0"],
                "--max-counters: must be at least 1",
            ),
            (
                &["--request-id-retention", "59m"],
                "--request-id-retention: must be at least the longest reservation",
            ),
            (
                &["--usage-retention", "23h"],
                "--usage-retention: must be at least a day",
            ),
        ] {
            let e = engine_settings(&args(flags).unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{flags:?}: {e}");
        }
    }
}
