//! `tallyd` as a real process, for end-to-end tests: every listener on port 0 (the addresses
//! read back from its "tallyd serving" line, in text or JSON logs), its output captured, stopped with SIGTERM
//! (graceful) or SIGKILL (a crash), killed when dropped. And three of them joined into a
//! cluster over the Raft listener.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tally_proto::tally::v1::cluster_client::ClusterClient;
use tally_proto::tally::v1::{AddLearnerRequest, PromoteRequest};
use tonic::transport::Channel;

/// Every wait here is bounded by this.
pub const PROC_WAIT: Duration = Duration::from_secs(30);

/// Bytes a child wrote to one of its pipes, read by a thread until end of file.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<Vec<u8>>>);

impl Output {
    pub fn drain(&self, mut pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let out = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.0.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The last few KiB of a text (for failure messages).
pub fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// A running `tallyd`.
pub struct TallydProc {
    child: Child,
    stdout: Output,
    stderr: Output,
    /// The threads reading its pipes: joined once it exited, so the output is complete.
    readers: Vec<JoinHandle<()>>,
    pub node_id: u64,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub raft: SocketAddr,
}

impl Drop for TallydProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=addr` (text logs, no colour) in a log line.
pub fn field_addr(line: &str, name: &str) -> Option<SocketAddr> {
    for (i, _) in line.match_indices(name) {
        let rest = line[i + name.len()..].trim_start_matches(['"', '=', ':', ' ']);
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
            .unwrap_or(rest.len());
        if let Ok(addr) = rest[..end].parse() {
            return Some(addr);
        }
    }
    None
}

impl TallydProc {
    /// Starts `tallyd` as node `node_id` with its data in `data_dir` (node 1 bootstraps a
    /// one-node cluster, the others wait to be added), plus `args` and `env`.
    pub async fn spawn(
        node_id: u64,
        data_dir: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> TallydProc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tallyd"));
        // Nothing from the environment the test runs in may change the server's flags.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("TALLY_") {
                command.env_remove(name);
            }
        }
        command
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--raft-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--node-id", &node_id.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if node_id != 1 {
            command.arg("--no-bootstrap");
        }
        let mut child = command.spawn().expect("tallyd starts");
        let (stdout, stderr) = (Output::default(), Output::default());
        let readers = vec![
            stdout.drain(child.stdout.take().unwrap()),
            stderr.drain(child.stderr.take().unwrap()),
        ];
        let started = Instant::now();
        let (grpc, http, raft) = loop {
            let text = stdout.text();
            if let Some(line) = text.lines().find(|l| l.contains("tallyd serving")) {
                let addr = |name| field_addr(line, name);
                match (addr("grpc"), addr("http"), addr("raft")) {
                    (Some(g), Some(h), Some(r)) => break (g, h, r),
                    _ => panic!("no addresses in {line:?}"),
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "tallyd exited with {status}:\n{}\n{}",
                    stderr.text(),
                    tail(&text)
                );
            }
            assert!(
                started.elapsed() < PROC_WAIT,
                "tallyd serving within {PROC_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        TallydProc {
            child,
            stdout,
            stderr,
            readers,
            node_id,
            grpc,
            http,
            raft,
        }
    }

    /// Everything it wrote so far, stdout then stderr.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.stdout.text(), self.stderr.text())
    }

    /// Polls `GET /readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let ready = super::http1::status_of(self.http, "/readyz", Duration::from_secs(2)).await
                == Some(200);
            if ready {
                return;
            }
            assert!(
                started.elapsed() < PROC_WAIT,
                "node {} ready within {PROC_WAIT:?}:\n{}",
                self.node_id,
                tail(&self.logs())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A crash: SIGKILL, no goodbye.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an operator stops it; waits for the exit (which must be clean). Everything
    /// it wrote, stdout then stderr.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM sent to {pid}");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < PROC_WAIT,
                "stopped within {PROC_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The pipes are closed: the readers reach end of file.
        for reader in std::mem::take(&mut self.readers) {
            reader.join().unwrap();
        }
        let logs = self.logs();
        assert!(status.success(), "clean exit ({status}):\n{}", tail(&logs));
        logs
    }
}

/// A request with `authorization: Bearer <token>` when a token is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Starts three nodes in `dir` (`node-1`, ...) and joins them through node 1 (which leads):
/// every node ready when this returns.
pub async fn three_node_cluster(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    token: Option<&str>,
) -> Vec<TallydProc> {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        nodes.push(TallydProc::spawn(id, &dir.join(format!("node-{id}")), args, env).await);
    }
    nodes[0].wait_ready().await;
    let channel = Channel::from_shared(format!("http://{}", nodes[0].raft))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(PROC_WAIT)
        .connect()
        .await
        .expect("connects to node 1");
    let mut cluster = ClusterClient::new(channel);
    for node in &nodes[1..] {
        let (id, addr) = (node.node_id, node.raft.to_string());
        cluster
            .add_learner(with_token(AddLearnerRequest { id, addr }, token))
            .await
            .unwrap_or_else(|s| panic!("add learner {id}: {s:?}"));
        cluster
            .promote(with_token(PromoteRequest { id }, token))
            .await
            .unwrap_or_else(|s| panic!("promote {id}: {s:?}"));
        node.wait_ready().await;
    }
    nodes
}
