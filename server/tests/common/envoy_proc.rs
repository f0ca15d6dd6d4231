//! The real Envoy (from `pyenv`) as a process, running the shipped `examples/envoy/envoy.yaml`
//! with the addresses of one test: its listener on a free port, its admin port chosen by the
//! OS, the Tally nodes and the upstream the test started, and a reservation TTL. Every
//! substitution must find its place exactly once, so the test fails if the example's shape
//! changes under it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http1;
use super::tallyd_proc::{Output, PROC_WAIT, tail};

/// The shipped configuration.
pub const EXAMPLE: &str = "examples/envoy/envoy.yaml";

/// What a test's Envoy points at.
pub struct EnvoySetup<'a> {
    /// Every Tally node's gRPC address.
    pub tally: &'a [SocketAddr],
    pub upstream: SocketAddr,
    /// The reservations' `reserve_ttl_s`.
    pub reserve_ttl_s: u32,
}

pub struct EnvoyProc {
    child: Child,
    out: Output,
    pub listener: SocketAddr,
    admin_path: std::path::PathBuf,
}

impl Drop for EnvoyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{EXAMPLE} has `{from}` exactly once"
    );
    text.replace(from, to)
}

/// A port free right now (bound, then released for Envoy to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The example with this test's addresses.
pub fn config_for(example: &str, setup: &EnvoySetup<'_>, listener_port: u16) -> String {
    let mut text = replace_once(
        example,
        "port_value: 10000",
        &format!("port_value: {listener_port}"),
    );
    text = replace_once(&text, "port_value: 9901", "port_value: 0");
    text = replace_once(
        &text,
        "port_value: 8000",
        &format!("port_value: {}", setup.upstream.port()),
    );
    text = replace_once(
        &text,
        "descriptor_value: \"600\"",
        &format!("descriptor_value: \"{}\"", setup.reserve_ttl_s),
    );
    let (begin, end) = ("# tally-endpoints-begin", "# tally-endpoints-end");
    let start = text.find(begin).expect("endpoints marker") + begin.len();
    let stop = text.find(end).expect("endpoints end marker");
    let indent = text[..stop].rsplit('\n').next().unwrap().to_owned();
    let endpoints: String = setup
        .tally
        .iter()
        .map(|a| {
            format!(
                "\n{indent}- endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}",
                a.port()
            )
        })
        .collect();
    text.replace_range(start..stop, &format!("{endpoints}\n{indent}"));
    text
}

impl EnvoyProc {
    /// Starts Envoy with the example configured for `setup` and waits until a public path
    /// (`/healthz`) passes through it to the upstream.
    pub async fn start(envoy: &Path, dir: &Path, setup: &EnvoySetup<'_>) -> EnvoyProc {
        let example = std::fs::read_to_string(super::pyenv::repo_file(EXAMPLE)).unwrap();
        let port = free_port();
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, config_for(&example, setup, port)).unwrap();
        let mut child = Command::new(envoy)
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .arg("--admin-address-path")
            .arg(dir.join("envoy-admin.txt"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("envoy starts");
        let out = Output::default();
        out.drain(child.stdout.take().unwrap());
        out.drain(child.stderr.take().unwrap());
        let proc = EnvoyProc {
            child,
            out,
            listener: SocketAddr::from(([127, 0, 0, 1], port)),
            admin_path: dir.join("envoy-admin.txt"),
        };
        proc.wait_passing().await;
        proc
    }

    /// Waits until `/healthz` answers 200 through Envoy.
    async fn wait_passing(&self) {
        let started = Instant::now();
        loop {
            let ok = http1::status_of(self.listener, "/healthz", Duration::from_secs(2)).await
                == Some(200);
            if ok {
                return;
            }
            assert!(
                started.elapsed() < PROC_WAIT,
                "envoy passing /healthz within {PROC_WAIT:?}:\n{}",
                tail(&self.out.text())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.out.text()
    }

    /// Waits until Envoy's active health checks have taken the Tally node at `grpc` out of
    /// rotation (admin `/clusters`: its health flags say `failed_active_hc`).
    pub async fn wait_host_unhealthy(&self, grpc: SocketAddr) {
        let started = Instant::now();
        let flag = format!("tally::{grpc}::health_flags::");
        loop {
            let text = self.admin_get("/clusters").await;
            let failed = text
                .lines()
                .any(|l| l.starts_with(&flag) && l.contains("failed_active_hc"));
            if failed {
                return;
            }
            assert!(
                started.elapsed() < PROC_WAIT,
                "{grpc} not marked unhealthy within {PROC_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Envoy's counters and gauges whose names contain `filter` (admin `/stats`), one per line.
    pub async fn stats(&self, filter: &str) -> String {
        self.admin_get(&format!("/stats?filter={filter}")).await
    }

    /// A GET of Envoy's admin interface, as text (or what went wrong).
    async fn admin_get(&self, path: &str) -> String {
        let Ok(addr) = std::fs::read_to_string(&self.admin_path) else {
            return "no admin address".into();
        };
        let Ok(addr) = addr.trim().parse::<SocketAddr>() else {
            return format!("bad admin address {addr:?}");
        };
        let get = async {
            let r = http1::get(addr, path).await?;
            r.text().await
        };
        match tokio::time::timeout(Duration::from_secs(5), get).await {
            Ok(Ok(text)) => text,
            other => format!("stats unavailable: {other:?}"),
        }
    }
}
