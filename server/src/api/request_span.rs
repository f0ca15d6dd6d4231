//! A `tracing` span around every gRPC call, so each log line a call causes names it: the
//! method and a request id (structured fields with `--log-format json`).
//!
//! The request id is the caller's `x-request-id` metadata when it is a sane one (printable
//! ASCII, at most [`MAX_REQUEST_ID_BYTES`]: it lands in logs), else one drawn here
//! (`t-` + 16 hex digits, unique within the process). It is sent back as `x-request-id`
//! response metadata, so a client can quote it. A W3C `traceparent` the caller sent is kept
//! as a field too (checked for its shape), to join Tally's lines to the caller's trace, and
//! becomes the span's OpenTelemetry parent when traces are exported (`crate::otlp`).
//!
//! The span is entered while the inner service is called and for its whole future, so the
//! auth layer's refusals and the handlers' lines all carry it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderValue, Request, Response};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Request headers as OpenTelemetry's propagators read them.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Longest request id taken from a caller.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// The metadata carrying it, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Ids drawn here: a process-wide counter, offset by the process start so two processes'
/// ids differ.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn drawn_id() -> String {
    static OFFSET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // Uniqueness across processes is a nicety; without the OS RNG, counting still works.
        let _ = getrandom::fill(&mut bytes);
        u64::from_le_bytes(bytes)
    });
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("t-{:016x}", offset.wrapping_add(n))
}

/// The caller's id when it is sane.
fn callers_id(value: Option<&HeaderValue>) -> Option<String> {
    let text = value?.to_str().ok()?;
    let sane = !text.is_empty()
        && text.len() <= MAX_REQUEST_ID_BYTES
        && text.bytes().all(|b| b.is_ascii_graphic());
    sane.then(|| text.to_owned())
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if the caller sent one.
fn traceparent(value: Option<&HeaderValue>) -> Option<String> {
    let text = value?.to_str().ok()?;
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2);
    ok.then(|| text.to_owned())
}

/// Puts the span on every call of the service it wraps.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestSpanLayer;

impl<S> tower_layer::Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> RequestSpan<S> {
        RequestSpan { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<Request<B>> for RequestSpan<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let headers = request.headers();
        let id = callers_id(headers.get(REQUEST_ID)).unwrap_or_else(drawn_id);
        let trace = traceparent(headers.get("traceparent"));
        let span = tracing::info_span!(
            "grpc",
            method = %request.uri().path(),
            request_id = %id,
            traceparent = trace.as_deref(),
        );
        if trace.is_some() {
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(headers))
            });
            // Without an OpenTelemetry layer (no --otlp-endpoint) there is nothing to set.
            let _ = span.set_parent(parent);
        }
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let echo = HeaderValue::from_str(&id).ok();
        Box::pin(
            async move {
                let mut response = response.await?;
                if let Some(echo) = echo {
                    response.headers_mut().insert(REQUEST_ID, echo);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sane_ids_and_traceparents_are_kept() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(callers_id(Some(&v("abc-123"))).as_deref(), Some("abc-123"));
        assert_eq!(callers_id(Some(&v("has space"))), None);
        assert_eq!(callers_id(Some(&v(&"x".repeat(129)))), None);
        assert_eq!(callers_id(None), None);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(Some(&v(tp))).as_deref(), Some(tp));
        assert_eq!(traceparent(Some(&v("00-zz-00f067aa0ba902b7-01"))), None);
        let (a, b) = (drawn_id(), drawn_id());
        assert_ne!(a, b);
        assert!(a.starts_with("t-") && a.len() == 18, "{a}");
    }
}
