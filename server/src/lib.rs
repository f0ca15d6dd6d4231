//! Tally: Raft-replicated rate limiting and metering for AI gateways.
//!
//! Layout:
//! - [`engine`]: the pure, deterministic state machine (limits, windows, counters). No clock,
//!   no I/O, no protobuf.
//! - [`node`]: the seam to replication: orders commands into stamped batches and applies them.
//! - [`api`]: the gRPC services (Envoy RLS v3, Kuadrant v1, tally.v1 admin) and the HTTP
//!   health endpoints; wire⇄domain conversion and error mapping live here.
//! - [`config`]: limit files (native, Limitador, envoyproxy/ratelimit) into a limit set.
//! - [`server`]: wiring for `tallyd`: listeners, limit-file reload, shutdown.
//! - [`event_log`]: quota events to the log.
//! - [`metrics`]: OpenTelemetry metrics (decisions, gRPC, Raft, engine) for `GET /metrics`,
//!   in Prometheus's text format, with bounded labels.
//! - [`usage_metrics`]: tokens, cost and records per key and model (bounded labels), counted
//!   from the usage records this replica applies, for `GET /metrics`.
//! - [`otlp`]: traces (a span per gRPC call) over OTLP/gRPC, when an endpoint is configured.

pub mod api;
pub mod config;
pub mod engine;
pub mod event_log;
pub mod metrics;
pub mod node;
pub mod otlp;
pub mod server;
pub mod usage_metrics;
