//! Running under systemd, the one way: SIGTERM and SIGINT set a stop flag, and
//! sd_notify says READY, feeds the watchdog while the caller says all is well, and
//! says STOPPING. The appliance and the caption server both run through this.

use anyhow::{Context, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What the caller's check says on each tick of `Service::run`.
pub enum Tick {
    /// All is well: the watchdog may be fed.
    Healthy,
    /// Still running, but do not feed the watchdog (a stalled worker).
    Unhealthy,
    /// Stop now, with this error (a worker died).
    Fail(anyhow::Error),
}

/// The process under systemd: readiness, the watchdog, SIGTERM.
pub struct Service {
    stop: Arc<AtomicBool>,
}

impl Service {
    /// Installs the signal handlers.
    pub fn new() -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
        }
        Ok(Self { stop })
    }

    /// Set by a signal (or by the caller): workers watch it to end.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Says READY, then ticks every 100 ms until a signal or a failed check; feeds the
    /// watchdog (at half its interval) only on healthy ticks. Says STOPPING on return.
    pub fn run(&self, mut check: impl FnMut() -> Tick) -> Result<()> {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
        let mut petted = Instant::now();
        let mut outcome = Ok(());
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if self.stop.load(Ordering::SeqCst) {
                // Asked to stop: workers ending now are not dying.
                break;
            }
            match check() {
                Tick::Fail(e) => {
                    self.stop.store(true, Ordering::SeqCst);
                    outcome = Err(e);
                    break;
                }
                Tick::Unhealthy => {}
                Tick::Healthy => {
                    if let Some(every) = watchdog
                        && petted.elapsed() >= every
                    {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                        petted = Instant::now();
                    }
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        outcome
    }
}
