//! The caller's deadline, from `grpc-timeout` or Envoy's `x-envoy-expected-rq-timeout-ms`.

use std::time::Duration;

use tonic::Status;

use crate::engine::{Command, Engine, Outcome};
use crate::node::Node;

/// Time kept back from the caller's deadline to answer before it passes: a twentieth of it,
/// and at least this much.
const MIN_MARGIN: Duration = Duration::from_millis(2);
/// The longest a decision may wait for a leader or a quorum, whatever the caller allows.
pub const MAX_DECISION_WAIT: Duration = Duration::from_secs(10);

/// Proposes `command` and waits for its outcome, at most `deadline` (none: until it comes).
/// Past the deadline the answer is UNAVAILABLE with `late` (not DEADLINE_EXCEEDED), so Envoy
/// applies its failure mode.
pub async fn propose(
    node: &Node,
    command: Command,
    deadline: Option<Duration>,
    late: &'static str,
) -> Result<Outcome, Status> {
    let propose = node.propose(command);
    Ok(match deadline {
        Some(d) => tokio::time::timeout(d, propose)
            .await
            .map_err(|_| Status::unavailable(late))??,
        None => propose.await?,
    })
}

/// A linearizable read of the engine (on any node: see `Node::read_linearizable`), at most
/// `deadline` (none: [`MAX_DECISION_WAIT`]). UNAVAILABLE when it cannot be served in time.
pub async fn read<R>(
    node: &Node,
    deadline: Option<Duration>,
    f: impl FnOnce(&Engine) -> R,
) -> Result<R, Status> {
    let wait = deadline.unwrap_or(MAX_DECISION_WAIT);
    match tokio::time::timeout(wait, node.read_linearizable(f)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(super::status::read_unavailable(e)),
        Err(_) => Err(Status::unavailable(
            "no linearizable read within the caller's deadline (no leader, no quorum, or the \
             leader out of reach)",
        )),
    }
}

/// How long this call may wait for its outcome, if the caller said.
pub fn of<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let meta = request.metadata();
    let grpc = meta
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let envoy = meta
        .get("x-envoy-expected-rq-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    let allowed = match (grpc, envoy) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let margin = (allowed / 20).max(MIN_MARGIN);
    Some(allowed.saturating_sub(margin).min(MAX_DECISION_WAIT))
}

/// `grpc-timeout` is at most 8 digits and a unit: H, M, S, m, u or n.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3_600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts_and_refuses_garbage() {
        assert_eq!(parse_grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3_600)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        for bad in ["", "m", "20", "20x", "123456789m", "-1m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_shorter_of_both_headers_wins_minus_a_margin() {
        let mut r = tonic::Request::new(());
        assert_eq!(of(&r), None);
        r.metadata_mut()
            .insert("x-envoy-expected-rq-timeout-ms", "20".parse().unwrap());
        assert_eq!(of(&r), Some(Duration::from_millis(18)));
        r.metadata_mut()
            .insert("grpc-timeout", "10m".parse().unwrap());
        assert_eq!(of(&r), Some(Duration::from_millis(8)));
        r.metadata_mut()
            .insert("grpc-timeout", "99H".parse().unwrap());
        assert_eq!(of(&r), Some(Duration::from_millis(18)));
    }
}
