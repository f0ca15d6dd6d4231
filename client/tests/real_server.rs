//! The `tally` binary and the client library against a real in-process Tally server: the
//! newcomer's path through the README (check until the Free tier says 429, then inspect).

use std::process::Command;

use tally_client::TallyClient;
use tally_server::server::{self, ServerConfig};

fn tally(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--addr")
        .arg(addr)
        .args(args)
        .output()
        .expect("tally runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_works_against_the_embedded_example() {
    // The embedded example limits, exactly as `tallyd` with no arguments serves them.
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: dir.path().join("node-1"),
        ..ServerConfig::default()
    };
    let running = server::spawn(config).await.unwrap();
    running
        .wait_ready(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let addr = format!("http://{}", running.grpc_addr);
    let check = [
        "check",
        "--domain",
        "ai-gateway",
        "--descriptor",
        "kind=requests,tier=free,api_key=k1",
    ];
    let a = addr.clone();
    let runs =
        tokio::task::spawn_blocking(move || (0..6).map(|_| tally(&a, &check)).collect::<Vec<_>>())
            .await
            .unwrap();
    for (i, (code, stdout, stderr)) in runs.iter().enumerate().take(5) {
        assert_eq!(*code, 0, "run {i}: {stdout}{stderr}");
        assert!(stdout.contains("free-requests-per-minute"), "{stdout}");
        assert!(stdout.contains(&format!("remaining {}", 4 - i)), "{stdout}");
    }
    let (code, stdout, _) = &runs[5];
    assert_eq!(*code, 1, "the sixth is over the Free tier's 5 per minute");
    assert!(
        stdout.contains("OVER_LIMIT") && stdout.contains("rate_limit_exceeded"),
        "{stdout}"
    );

    let client = TallyClient::connect(&addr).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!((status.live_counters, status.limits), (1, 7));
    let limits = client.list_limits(Some("ai-gateway")).await.unwrap();
    assert_eq!(limits.limits.len(), 7);

    let a = addr.clone();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        tally(&a, &["check", "--domain", "", "--descriptor", "k=v"])
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{stdout}");
    assert!(stderr.contains("invalid domain"), "{stderr}");
    // Cluster operations go to the Raft address.
    let raft = format!("http://{}", running.raft_addr);
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || tally(&raft, &["cluster", "status"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("leader: 1 ("), "{stdout}");
    assert!(stdout.contains("voter"), "{stdout}");
    running.stop().await.unwrap();
}
