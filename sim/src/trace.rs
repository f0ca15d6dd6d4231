//! The readable record of one seed: every fault, crash, restart, leader change, client call
//! and outcome, stamped with simulated time. Same seed ⇒ same trace, byte for byte (a test
//! checks it), so a trace is also the determinism witness.

use std::fmt::Display;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Clone)]
pub struct Trace(Arc<Mutex<Inner>>);

struct Inner {
    start: Instant,
    lines: Vec<String>,
    /// Print each line as it is written (replaying one seed).
    echo: bool,
}

impl Trace {
    /// A trace whose time zero is now (simulated).
    pub fn new(echo: bool) -> Trace {
        Trace(Arc::new(Mutex::new(Inner {
            start: Instant::now(),
            lines: Vec::new(),
            echo,
        })))
    }

    /// Simulated milliseconds since the start of the seed.
    pub fn now_ms(&self) -> u64 {
        let start = self.0.lock().start;
        Instant::now().duration_since(start).as_millis() as u64
    }

    pub fn log(&self, what: impl Display) {
        let at = self.now_ms();
        let line = format!("[{:>4}.{:03}] {what}", at / 1000, at % 1000);
        let mut inner = self.0.lock();
        if inner.echo {
            println!("{line}");
        }
        inner.lines.push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().lines.clone()
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for line in self.0.lock().lines.iter() {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}
