//! Traces over OTLP: the process's `tracing` spans (one per gRPC call, `api::request_span`,
//! with the caller's W3C trace context as parent) exported as OpenTelemetry spans to an
//! OTLP/gRPC collector. Off unless an endpoint is configured (`tallyd --otlp-endpoint`).
//!
//! OpenTelemetry's batch span processor exports from a thread of its own, while the tonic
//! exporter needs a Tokio reactor: [`RuntimeExporter`] owns a one-thread runtime that every
//! export runs on, so spans are never dropped for want of one (a known pitfall of
//! `opentelemetry-otlp` with `grpc-tonic`).

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// How long one export may take at most.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where traces go.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP exporter runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The tonic exporter, run on a runtime of its own.
#[derive(Debug)]
pub struct RuntimeExporter {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for RuntimeExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        // Called on the batch processor's own thread (never a Tokio worker): blocking here
        // is what that thread is for.
        let result = self.runtime.block_on(self.inner.export(batch));
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A tracer provider exporting to `config.endpoint`. Keep it for the life of the process and
/// call `shutdown` on it at the end (flushes what is buffered).
pub fn provider(config: &OtlpConfig) -> Result<SdkTracerProvider, OtlpError> {
    let bad = |reason: String| OtlpError::Endpoint {
        endpoint: config.endpoint.clone(),
        reason,
    };
    if !(config.endpoint.starts_with("http://") || config.endpoint.starts_with("https://")) {
        return Err(bad("must start with http:// or https://".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tally-otlp")
        .enable_all()
        .build()?;
    let inner = {
        // The channel is made inside the runtime that will drive it.
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| bad(e.to_string()))?
    };
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(RuntimeExporter { inner, runtime })
        .with_resource(resource)
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`, and the W3C
/// trace-context propagator installed for `api::request_span` to read callers' parents.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_opentelemetry::layer().with_tracer(provider.tracer("tally"))
}
