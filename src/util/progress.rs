//! Progress of long work (training, evaluation, downloads, benchmarks). The library
//! never prints: it reports here, and the program that runs it decides how to show
//! it (the binary draws bars on stderr). With no reporter installed, as in the
//! appliance and the tests, progress goes nowhere.

use std::sync::OnceLock;

/// Where progress goes; the binary installs one.
pub trait Reporter: Send + Sync {
    /// A stage of `total` steps begins.
    fn start(&self, name: &str, total: u64);
    /// `n` more steps are done; `message`, if any, replaces the stage's message.
    fn advance(&self, n: u64, message: Option<&str>);
    /// The stage is over.
    fn finish(&self);
    /// A line for the person who started the work (a summary, a download).
    fn note(&self, line: &str);
}

static REPORTER: OnceLock<Box<dyn Reporter>> = OnceLock::new();

/// Installs the process's reporter; false if one was installed already.
pub fn install(reporter: Box<dyn Reporter>) -> bool {
    REPORTER.set(reporter).is_ok()
}

fn reporter() -> Option<&'static dyn Reporter> {
    REPORTER.get().map(|r| r.as_ref())
}

/// A line for the person who started the work; also logged at info level.
pub fn note(line: &str) {
    tracing::info!("{line}");
    if let Some(r) = reporter() {
        r.note(line);
    }
}

/// One stage of long work; dropping it ends the stage.
pub struct Stage(());

impl Stage {
    /// A stage of `total` steps named `name`.
    pub fn start(name: &str, total: u64) -> Self {
        if let Some(r) = reporter() {
            r.start(name, total);
        }
        Stage(())
    }

    /// `n` more steps done.
    pub fn inc(&self, n: u64) {
        if let Some(r) = reporter() {
            r.advance(n, None);
        }
    }

    /// What the stage is doing now.
    pub fn message(&self, message: &str) {
        if let Some(r) = reporter() {
            r.advance(0, Some(message));
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(r) = reporter() {
            r.finish();
        }
    }
}
