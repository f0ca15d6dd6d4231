//! Output: the table printed after a run, its JSON line, and the markdown summary of a
//! results file.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use super::args::{Api, Plan, Workload};
use super::run::{Measured, ProcUsage, StoppedBy};
use super::summary::LatencySummary;

/// The JSON line of one run (`"bench": "tally-bench"`; other benches share the files).
#[derive(Serialize, Debug)]
pub struct Record {
    pub bench: &'static str,
    pub time: String,
    pub host: String,
    /// CPUs this generator may run on (1 when pinned).
    pub client_cpus: usize,
    pub label: String,
    pub target: String,
    pub api: &'static str,
    pub workload: &'static str,
    #[serde(rename = "loop")]
    pub loop_: &'static str,
    pub concurrency: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub keys: u64,
    pub zipf: Option<f64>,
    pub descriptors: usize,
    pub hits: u32,
    pub tokens: Option<u32>,
    pub domain: String,
    pub template: String,
    pub threads: usize,
    pub ops: u64,
    pub rpcs: u64,
    pub ok: u64,
    pub over_limit: u64,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    pub rpcs_per_s: f64,
    pub latency_us: LatencySummary,
    pub late: u64,
    pub unsent: u64,
    /// Open loop: how long after its scheduled time each operation was sent (the generator's
    /// own lag, included in `latency_us`).
    pub send_delay_us: Option<LatencySummary>,
    pub stopped_by: &'static str,
    pub server: Vec<ProcUsage>,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub client_cpu_pct: Option<f64>,
    pub accuracy: Option<Accuracy>,
    pub aborted_workers: usize,
}

/// The accuracy workload's verdict: hits admitted against the known limit.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Accuracy {
    pub limit: u64,
    /// Hits offered in all (every operation of the run times its hits).
    pub offered_hits: u64,
    pub admitted_hits: u64,
    /// Admitted beyond the limit (a limiter that over-admits).
    pub over_admitted: u64,
    /// Short of min(limit, offered) (a limiter that refused what it had room for).
    pub under_admitted: u64,
    /// Operations whose outcome is unknown (errors, timeouts): the counts are exact only
    /// when this is 0.
    pub unknown_ops: u64,
}

impl Accuracy {
    pub fn new(limit: u64, offered_hits: u64, admitted_hits: u64, unknown_ops: u64) -> Self {
        let expected = limit.min(offered_hits);
        Self {
            limit,
            offered_hits,
            admitted_hits,
            over_admitted: admitted_hits.saturating_sub(limit),
            under_admitted: expected.saturating_sub(admitted_hits),
            unknown_ops,
        }
    }

    pub fn exact(&self) -> bool {
        self.over_admitted == 0 && self.under_admitted == 0 && self.unknown_ops == 0
    }
}

pub fn api_name(api: Api) -> &'static str {
    match api {
        Api::Rls => "rls",
        Api::Kuadrant => "kuadrant",
    }
}

pub fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::Plain => "plain",
        Workload::Tokens => "tokens",
        Workload::Accuracy => "accuracy",
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Record {
    pub fn new(plan: &Plan, m: &Measured) -> Self {
        let accuracy = (plan.workload == Workload::Accuracy).then(|| {
            // In the accuracy workload every operation counts (no warm-up).
            let offered = m.ops * u64::from(plan.hits);
            Accuracy::new(
                plan.limit.unwrap_or(0),
                offered,
                m.admitted_hits,
                m.errors_total(),
            )
        });
        let round1 = |v: f64| (v * 10.0).round() / 10.0;
        Record {
            bench: "tally-bench",
            time: jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            host: hostname(),
            client_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            label: plan.label.clone(),
            target: plan.target.to_string(),
            api: api_name(plan.api),
            workload: workload_name(plan.workload),
            loop_: if plan.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            concurrency: plan.concurrency,
            connections: plan.connections,
            rate: plan.rate,
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            keys: plan.keys,
            zipf: plan.zipf,
            descriptors: plan.descriptors,
            hits: plan.hits,
            tokens: (plan.workload == Workload::Tokens).then_some(plan.tokens),
            domain: plan.domain.clone(),
            template: plan.template_text.clone(),
            threads: plan.threads,
            ops: m.ops,
            rpcs: m.rpcs,
            ok: m.ok,
            over_limit: m.over_limit,
            errors: m.errors.clone(),
            errors_total: m.errors_total(),
            elapsed_s: (m.elapsed_s * 1000.0).round() / 1000.0,
            ops_per_s: round1(m.ops_per_s()),
            rpcs_per_s: round1(if m.elapsed_s > 0.0 {
                m.rpcs as f64 / m.elapsed_s
            } else {
                0.0
            }),
            latency_us: m.latency,
            late: m.late,
            unsent: m.unsent,
            send_delay_us: m.send_delay,
            stopped_by: match m.stopped_by {
                StoppedBy::Duration => "duration",
                StoppedBy::MaxRequests => "max_requests",
            },
            server_cpu_pct: (!m.server.is_empty())
                .then(|| round1(m.server.iter().map(|s| s.cpu_pct).sum())),
            server_rss_kib: (!m.server.is_empty())
                .then(|| m.server.iter().map(|s| s.rss_kib).sum()),
            server: m.server.clone(),
            client_cpu_pct: m.client_cpu_pct,
            accuracy,
            aborted_workers: m.aborted_workers,
        }
    }

    /// Appends the record as one JSON line.
    pub fn append_to(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut line = serde_json::to_string(self)?;
        line.push('\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("cannot append to {}", path.display()))
    }

    /// The human-readable report of the run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!("  [{}]", self.label)
        };
        let _ = writeln!(
            s,
            "tally-bench: {} {} -> {}{label}",
            self.api, self.workload, self.target
        );
        let load = match self.rate {
            Some(r) => format!(
                "open loop at {r} op/s (at most {} in flight) over {} connection(s)",
                self.concurrency, self.connections
            ),
            None => format!(
                "closed loop, {} in flight over {} connection(s)",
                self.concurrency, self.connections
            ),
        };
        let _ = writeln!(
            s,
            "  load      {load}; {:.1} s measured after {:.1} s warm-up; {} client thread(s)",
            self.elapsed_s, self.warmup_s, self.threads
        );
        let dist = match self.zipf {
            Some(z) => format!("zipf s={z}"),
            None => "uniform".into(),
        };
        let tokens = self
            .tokens
            .map(|t| format!(", {t} tokens reported"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "  workload  {} keys {dist}, {} descriptor(s) `{}` in domain `{}`, hits {}{tokens}",
            self.keys, self.descriptors, self.template, self.domain, self.hits
        );
        let l = &self.latency_us;
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  | ops | op/s | rpc/s | ok | over_limit | errors | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |"
        );
        let _ = writeln!(
            s,
            "  |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let _ = writeln!(
            s,
            "  | {} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.ops,
            self.ops_per_s,
            self.rpcs_per_s,
            self.ok,
            self.over_limit,
            self.errors_total,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        let _ = writeln!(s);
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let _ = writeln!(s, "  errors    {}", list.join(", "));
        }
        if self.rate.is_some() {
            let d = self.send_delay_us.unwrap_or_default();
            let _ = writeln!(
                s,
                "  schedule  sent after the scheduled time by p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs \
                 (included in the latencies); {} more than 1 ms late; {} never sent (behind at the end)",
                d.p50, d.p99, d.max, self.late, self.unsent
            );
        }
        for p in &self.server {
            let _ = writeln!(
                s,
                "  server    pid {}: cpu {:.1}% of a core, rss {:.1} MiB (max {:.1} MiB)",
                p.pid,
                p.cpu_pct,
                p.rss_kib as f64 / 1024.0,
                p.rss_max_kib as f64 / 1024.0
            );
        }
        if let Some(c) = self.client_cpu_pct {
            let _ = writeln!(s, "  client    cpu {c:.1}% of a core");
        }
        if let Some(a) = &self.accuracy {
            let _ = writeln!(
                s,
                "  accuracy  limit {}, offered {} hits, admitted {} ({} over, {} under, {} unknown): {}",
                a.limit,
                a.offered_hits,
                a.admitted_hits,
                a.over_admitted,
                a.under_admitted,
                a.unknown_ops,
                if a.exact() { "exact" } else { "NOT exact" }
            );
        }
        if self.stopped_by == "max_requests" {
            let _ = writeln!(
                s,
                "  stopped   at --max-requests, before the duration ended"
            );
        }
        if self.aborted_workers > 0 {
            let _ = writeln!(
                s,
                "  WARNING   {} worker(s) aborted by the watchdog; their operations are missing",
                self.aborted_workers
            );
        }
        s
    }
}

/// A markdown table of every tally-bench line in a results file (other lines are skipped).
pub fn summarize(text: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| configuration | workload | api | loop | conc | keys | op/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | ok | over | errors | server CPU % | server RSS MiB | notes |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
        if v["bench"] != "tally-bench" {
            continue;
        }
        let _ = writeln!(out, "{}", summary_row(&v));
    }
    Ok(out)
}

fn summary_row(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    let ms = |k: &str| {
        v["latency_us"][k]
            .as_f64()
            .map_or("-".into(), |us| format!("{:.3}", us / 1000.0))
    };
    let mut workload = s("workload");
    if let Some(t) = v["tokens"].as_u64() {
        let _ = write!(workload, " ({t} tok)");
    }
    if u("descriptors") > 1 {
        let _ = write!(workload, " ×{}", u("descriptors"));
    }
    if u("hits") > 1 {
        let _ = write!(workload, " hits {}", u("hits"));
    }
    let keys = match v["zipf"].as_f64() {
        Some(z) => format!("{} zipf {z}", human(u("keys"))),
        None => human(u("keys")),
    };
    let loop_ = match v["rate"].as_f64() {
        Some(r) => format!("open {r}/s"),
        None => s("loop"),
    };
    let mut notes = Vec::new();
    if let Some(errors) = v["errors"].as_object()
        && !errors.is_empty()
    {
        let list: Vec<String> = errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        notes.push(list.join(", "));
    }
    if let Some(a) = v["accuracy"].as_object() {
        let g = |k: &str| a.get(k).and_then(Value::as_u64).unwrap_or(0);
        let exact = g("over_admitted") == 0 && g("under_admitted") == 0 && g("unknown_ops") == 0;
        notes.push(format!(
            "admitted {} of L={} ({} offered){}",
            g("admitted_hits"),
            g("limit"),
            g("offered_hits"),
            if exact { ", exact" } else { ", NOT exact" }
        ));
    }
    if u("unsent") > 0 || u("late") > 0 {
        notes.push(format!("{} late, {} unsent", u("late"), u("unsent")));
    }
    if let Some(c) = v["client_cpu_pct"].as_f64() {
        notes.push(format!("client CPU {c:.0}%"));
    }
    let cpu = v["server_cpu_pct"]
        .as_f64()
        .map_or("-".into(), |c| format!("{c:.0}"));
    let rss = v["server_rss_kib"]
        .as_u64()
        .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    format!(
        "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        s("label"),
        workload,
        s("api"),
        loop_,
        u("concurrency"),
        keys,
        v["ops_per_s"].as_f64().unwrap_or(0.0),
        ms("p50"),
        ms("p90"),
        ms("p99"),
        ms("p999"),
        ms("max"),
        u("ok"),
        u("over_limit"),
        u("errors_total"),
        cpu,
        rss,
        notes.join("; ")
    )
}

/// 10000 → 10k, 1000000 → 1M.
fn human(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_verdicts() {
        let exact = Accuracy::new(1000, 50_000, 1000, 0);
        assert!(exact.exact());
        let over = Accuracy::new(1000, 50_000, 1012, 0);
        assert_eq!((over.over_admitted, over.under_admitted), (12, 0));
        assert!(!over.exact());
        let under = Accuracy::new(1000, 50_000, 990, 0);
        assert_eq!((under.over_admitted, under.under_admitted), (0, 10));
        // Fewer offered than the limit: all of them should pass.
        let few = Accuracy::new(1000, 300, 300, 0);
        assert!(few.exact());
        assert!(!Accuracy::new(1000, 50_000, 1000, 3).exact());
    }

    #[test]
    fn summary_skips_other_benches_and_formats_rows() {
        let text = concat!(
            r#"{"bench":"counter-memory","counters":1000000}"#,
            "\n",
            r#"{"bench":"tally-bench","label":"1-node strict","workload":"plain","api":"rls","loop":"closed","rate":null,"concurrency":64,"keys":1000000,"zipf":null,"descriptors":1,"hits":1,"tokens":null,"ops_per_s":51234.4,"latency_us":{"p50":1200.0,"p90":1800.0,"p99":2500.0,"p999":4000.0,"max":9000.0},"ok":10,"over_limit":2,"errors_total":1,"errors":{"UNAVAILABLE":1},"server_cpu_pct":97.5,"server_rss_kib":20480,"unsent":0,"late":0}"#,
            "\n",
        );
        let md = summarize(text).unwrap();
        let rows: Vec<&str> = md.lines().collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[2]
                .starts_with("| 1-node strict | plain | rls | closed | 64 | 1M | 51234 | 1.200 |"),
            "{}",
            rows[2]
        );
        assert!(
            rows[2].contains("| 98 | 20.0 | UNAVAILABLE 1 |"),
            "{}",
            rows[2]
        );
        assert!(summarize("not json").is_err());
    }

    #[test]
    fn human_counts() {
        assert_eq!(human(10_000), "10k");
        assert_eq!(human(1_000_000), "1M");
        assert_eq!(human(1_500), "1500");
        assert_eq!(human(7), "7");
    }
}
