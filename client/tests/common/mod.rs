//! Running the real `tally` binary in client tests.

use std::process::Command;
use std::time::Duration;

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `tally --addr ADDR ARGS...`, at most 30 s.
pub async fn tally(addr: &str, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command.arg("--addr").arg(addr).arg("--timeout").arg("5s");
    command.args(args);
    let run = tokio::task::spawn_blocking(move || command.output().expect("tally runs"));
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("tally finishes within 30 s")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Its output, asserting it succeeded.
pub fn ok(run: &Run) -> &str {
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    &run.stdout
}
