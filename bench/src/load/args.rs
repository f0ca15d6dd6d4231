//! The command line and its validation into a [`Plan`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::template::Template;

/// Most requests in flight (each worker keeps its own histogram, ~220 KB).
pub const MAX_CONCURRENCY: usize = 1024;
/// Longest measured duration, and longest warm-up: every run stops by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_WARMUP: Duration = Duration::from_secs(600);

#[derive(Parser, Debug)]
#[command(
    name = "tally-bench",
    version,
    about = "gRPC load generator for any rate-limit service speaking Envoy RLS v3 or Kuadrant v1",
    long_about = "gRPC load generator for any rate-limit service speaking Envoy RLS v3 \
        (envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit) or Kuadrant v1 \
        (kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit + Report): Tally, \
        Limitador, envoyproxy/ratelimit, ...\n\n\
        Sends only to 127.0.0.1. Every run is bounded: by --duration (after --warmup), by \
        --max-requests, and by --timeout per call. Prints a table and appends one JSON line per \
        run to --results.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a markdown table of the tally-bench runs in a results file (JSON lines)
    Summarize {
        /// The results file (`--results` of the runs)
        file: PathBuf,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// envoy.service.ratelimit.v3 ShouldRateLimit
    Rls,
    /// kuadrant.service.ratelimit.v1 CheckRateLimit, then Report when admitted
    Kuadrant,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One decision per operation (rls: ShouldRateLimit with --hits; kuadrant: CheckRateLimit
    /// then Report, both with --hits)
    Plain,
    /// A token flow: a check that debits nothing (rls: every descriptor's hits_addend = 0;
    /// kuadrant: CheckRateLimit with --hits), then, if admitted, a report of --tokens (rls:
    /// ShouldRateLimit with hits_addend = --tokens; kuadrant: Report)
    Tokens,
    /// One key with a known limit (--limit): counts the hits admitted against it. The key is
    /// new for every run, warm-up is off, and every operation counts
    Accuracy,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The server's gRPC address: 127.0.0.1:PORT (other hosts are refused)
    #[arg(long, value_name = "HOST:PORT", required = true)]
    pub target: Option<String>,

    /// Which API to call
    #[arg(long, value_enum, default_value = "rls")]
    pub api: Api,

    /// What one operation is
    #[arg(long, value_enum, default_value = "plain")]
    pub workload: Workload,

    /// Operations in flight (closed loop: each sends its next as soon as the last answers;
    /// with --rate: the most in flight). Default 16, or 256 with --rate
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,

    /// HTTP/2 connections the operations are spread over (at most --concurrency)
    #[arg(long, value_name = "C", default_value_t = 2)]
    pub connections: usize,

    /// Open loop: start operations at this many per second on a fixed schedule; latency is
    /// measured from each one's scheduled time (no coordinated omission)
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Measured time (e.g. 10s, 500ms, 2m; a bare number is seconds), at most 1h
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Load sent before measuring starts, not counted, at most 10m
    #[arg(long, value_name = "D", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Hard cap on operations started (warm-up included)
    #[arg(long, value_name = "N", default_value_t = 50_000_000)]
    pub max_requests: u64,

    /// Per-operation timeout; a timed-out operation counts as the error CLIENT_TIMEOUT
    #[arg(long, value_name = "D", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Distinct keys; `{key}` in the template is drawn from 0..K
    #[arg(long, value_name = "K", default_value_t = 10_000)]
    pub keys: u64,

    /// Draw keys Zipf-distributed with this exponent (> 0; key 0 the hottest) instead of
    /// uniformly
    #[arg(long, value_name = "S")]
    pub zipf: Option<f64>,

    /// Descriptors per request, each with its own key (`{i}` is its position)
    #[arg(long, value_name = "D", default_value_t = 1)]
    pub descriptors: usize,

    /// Hits per decision (the request's hits_addend)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub hits: u32,

    /// Tokens reported per operation by the `tokens` workload
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub tokens: u32,

    /// The RLS domain
    #[arg(long, default_value = "bench")]
    pub domain: String,

    /// One descriptor: comma-separated key=value entries; `{key}` is the key drawn, `{i}` the
    /// descriptor's position
    #[arg(
        long,
        value_name = "TEMPLATE",
        default_value = "kind=requests,api_key={key}"
    )]
    pub descriptor_template: String,

    /// The accuracy workload's known limit L (hits its key may have admitted)
    #[arg(long, value_name = "L")]
    pub limit: Option<u64>,

    /// Sample this process's CPU and RSS while measuring (repeat for every node of a cluster)
    #[arg(long, value_name = "PID")]
    pub server_pid: Vec<u32>,

    /// Append one JSON line for the run to this file
    #[arg(long, value_name = "FILE")]
    pub results: Option<PathBuf>,

    /// Free text stored with the run (e.g. the server and its configuration)
    #[arg(long, default_value = "")]
    pub label: String,

    /// Seed of the key choice (each worker derives its own)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Runtime worker threads (default: the CPUs this process may run on)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

/// A validated run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub target: SocketAddr,
    pub api: Api,
    pub workload: Workload,
    pub concurrency: usize,
    pub connections: usize,
    /// Open loop: operations started per second, on a fixed schedule.
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub max_requests: u64,
    pub timeout: Duration,
    pub keys: u64,
    pub zipf: Option<f64>,
    pub descriptors: usize,
    pub hits: u32,
    pub tokens: u32,
    pub domain: String,
    pub template_text: String,
    pub template: Template,
    pub limit: Option<u64>,
    pub server_pids: Vec<u32>,
    pub results: Option<PathBuf>,
    pub label: String,
    pub seed: u64,
    pub threads: usize,
}

/// `127.0.0.1:PORT` (an `http://` prefix is allowed); anything else is refused.
pub fn parse_target(text: &str) -> Result<SocketAddr, String> {
    let bare = text.strip_prefix("http://").unwrap_or(text);
    let refuse = || {
        format!(
            "refusing --target `{text}`: tally-bench only sends load to 127.0.0.1 \
             (give 127.0.0.1:PORT)"
        )
    };
    let addr: SocketAddr = bare.trim_end_matches('/').parse().map_err(|_| refuse())?;
    if addr.ip() != Ipv4Addr::LOCALHOST {
        return Err(refuse());
    }
    if addr.port() == 0 {
        return Err(format!("--target `{text}`: port 0 is not a server's port"));
    }
    Ok(addr)
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds (fractions allowed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 1e7 {
        return Err(format!("`{text}` is not a duration (e.g. 10s, 500ms, 2m)"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

impl RunArgs {
    /// Checks every bound and fills the defaults that depend on other flags.
    pub fn validate(&self) -> Result<Plan, String> {
        let target = parse_target(self.target.as_deref().ok_or("--target is required")?)?;
        let open = self.rate.is_some();
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0 && r <= 10_000_000.0)
        {
            return Err(format!("--rate {r}: want 0 < R ≤ 10000000 operations/s"));
        }
        let concurrency = self.concurrency.unwrap_or(if open { 256 } else { 16 });
        if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
            return Err(format!(
                "--concurrency {concurrency}: want 1..={MAX_CONCURRENCY}"
            ));
        }
        if self.connections == 0 {
            return Err("--connections 0: want at least 1".into());
        }
        let connections = self.connections.min(concurrency);
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return Err(format!(
                "--duration {:?}: want more than 0 and at most 1h",
                self.duration
            ));
        }
        if self.warmup > MAX_WARMUP {
            return Err(format!("--warmup {:?}: at most 10m", self.warmup));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(format!("--timeout {:?}: want 1ms..=60s", self.timeout));
        }
        if self.max_requests == 0 {
            return Err("--max-requests 0: want at least 1".into());
        }
        if self.keys == 0 {
            return Err("--keys 0: want at least 1".into());
        }
        if let Some(s) = self.zipf
            && !(s.is_finite() && s > 0.0 && s <= 100.0)
        {
            return Err(format!("--zipf {s}: the exponent must be > 0 (and ≤ 100)"));
        }
        if !(1..=64).contains(&self.descriptors) {
            return Err(format!(
                "--descriptors {}: want 1..=64 (the RLS bound)",
                self.descriptors
            ));
        }
        if self.hits == 0 {
            return Err("--hits 0: want at least 1".into());
        }
        if self.tokens == 0 {
            return Err("--tokens 0: want at least 1".into());
        }
        if self.domain.is_empty() {
            return Err("--domain must not be empty".into());
        }
        let template = Template::parse(&self.descriptor_template)?;
        let (mut keys, mut warmup, mut zipf) = (self.keys, self.warmup, self.zipf);
        match self.workload {
            Workload::Accuracy => {
                let Some(limit) = self.limit else {
                    return Err(
                        "--workload accuracy needs --limit L (the key's known limit)".into(),
                    );
                };
                if limit == 0 {
                    return Err("--limit 0: want at least 1".into());
                }
                if self.descriptors != 1 {
                    return Err("--workload accuracy sends one descriptor (--descriptors 1)".into());
                }
                if !template.uses_key() {
                    return Err(
                        "--workload accuracy needs {key} in the template (each run uses a new key)"
                            .into(),
                    );
                }
                (keys, warmup, zipf) = (1, Duration::ZERO, None);
            }
            _ => {
                if self.limit.is_some() {
                    return Err("--limit is for --workload accuracy".into());
                }
            }
        }
        let threads = match self.threads {
            Some(t) if (1..=256).contains(&t) => t,
            Some(t) => return Err(format!("--threads {t}: want 1..=256")),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if self.server_pid.contains(&std::process::id()) {
            return Err("--server-pid is this process".into());
        }
        Ok(Plan {
            target,
            api: self.api,
            workload: self.workload,
            concurrency,
            connections,
            rate: self.rate,
            duration: self.duration,
            warmup,
            max_requests: self.max_requests,
            timeout: self.timeout,
            keys,
            zipf,
            descriptors: self.descriptors,
            hits: self.hits,
            tokens: self.tokens,
            domain: self.domain.clone(),
            template_text: self.descriptor_template.clone(),
            template,
            limit: self.limit,
            server_pids: self.server_pid.clone(),
            results: self.results.clone(),
            label: self.label.clone(),
            seed: self.seed,
            threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["tally-bench"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.run.validate()
    }

    #[test]
    fn only_127_0_0_1_is_a_target() {
        for ok in [
            "127.0.0.1:8081",
            "http://127.0.0.1:8081",
            "http://127.0.0.1:9/",
        ] {
            assert!(plan(&["--target", ok]).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.1:8081",
            "192.168.1.5:8081",
            "8.8.8.8:53",
            "example.com:8081",
            "localhost:8081",
            "0.0.0.0:8081",
            "127.0.0.2:8081",
            "[::1]:8081",
            "127.0.0.1",
            "https://127.0.0.1:8081",
        ] {
            let err = plan(&["--target", bad]).unwrap_err();
            assert!(err.contains("only sends load to 127.0.0.1"), "{bad}: {err}");
        }
        assert!(
            plan(&["--target", "127.0.0.1:0"])
                .unwrap_err()
                .contains("port 0")
        );
        assert!(plan(&[]).unwrap_err().contains("--target"));
    }

    #[test]
    fn defaults_and_derived_values() {
        let p = plan(&["--target", "127.0.0.1:8081"]).unwrap();
        assert_eq!(p.concurrency, 16);
        assert_eq!(p.connections, 2);
        assert_eq!(p.duration, Duration::from_secs(10));
        assert_eq!(p.warmup, Duration::from_secs(2));
        assert_eq!(p.keys, 10_000);
        assert_eq!(p.api, Api::Rls);
        let p = plan(&[
            "--target",
            "127.0.0.1:1",
            "--rate",
            "1000",
            "--concurrency",
            "1",
        ])
        .unwrap();
        assert_eq!((p.concurrency, p.connections), (1, 1));
        assert_eq!(
            plan(&["--target", "127.0.0.1:1", "--rate", "500"])
                .unwrap()
                .concurrency,
            256
        );
        let p = plan(&[
            "--target",
            "127.0.0.1:1",
            "--workload",
            "accuracy",
            "--limit",
            "100",
            "--keys",
            "99",
            "--zipf",
            "1.1",
        ])
        .unwrap();
        assert_eq!((p.keys, p.warmup, p.zipf), (1, Duration::ZERO, None));
    }

    #[test]
    fn refuses_out_of_bounds_arguments() {
        let t = ["--target", "127.0.0.1:8081"];
        for (extra, why) in [
            (&["--concurrency", "0"][..], "--concurrency"),
            (&["--concurrency", "5000"], "--concurrency"),
            (&["--connections", "0"], "--connections"),
            (&["--rate", "0"], "--rate"),
            (&["--rate=-5"], "--rate"),
            (&["--duration", "0s"], "--duration"),
            (&["--duration", "2h"], "--duration"),
            (&["--warmup", "11m"], "--warmup"),
            (&["--timeout", "0"], "--timeout"),
            (&["--max-requests", "0"], "--max-requests"),
            (&["--keys", "0"], "--keys"),
            (&["--zipf", "0"], "--zipf"),
            (&["--zipf", "NaN"], "--zipf"),
            (&["--descriptors", "65"], "--descriptors"),
            (&["--hits", "0"], "--hits"),
            (&["--domain", ""], "--domain"),
            (&["--descriptor-template", "k={nope}"], "placeholder"),
            (&["--workload", "accuracy"], "--limit"),
            (
                &[
                    "--workload",
                    "accuracy",
                    "--limit",
                    "5",
                    "--descriptor-template",
                    "k=v",
                ],
                "{key}",
            ),
            (&["--limit", "5"], "accuracy"),
            (&["--duration", "ten"], "not a duration"),
        ] {
            let mut args = t.to_vec();
            args.extend_from_slice(extra);
            let err = plan(&args).unwrap_err();
            assert!(err.contains(why), "{extra:?}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn summarize_needs_no_target() {
        let cli = Cli::try_parse_from(["tally-bench", "summarize", "x.jsonl"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Summarize { .. })));
    }
}
