//! Draws the library's progress reports as indicatif bars on stderr. This is the one
//! place that knows about bars; the library only reports stages and notes.

use indicatif::{ProgressBar, ProgressStyle};
use marquee::util::progress::Reporter;
use std::sync::Mutex;

#[derive(Default)]
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn with(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        f(&mut self.bar.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Reporter for Bars {
    fn start(&self, name: &str, total: u64) {
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        self.with(|b| {
            if let Some(old) = b.replace(bar) {
                old.finish_and_clear();
            }
        });
    }

    fn advance(&self, n: u64, message: Option<&str>) {
        self.with(|b| {
            if let Some(bar) = b {
                if let Some(m) = message {
                    bar.set_message(m.to_string());
                }
                let before = bar.position();
                bar.inc(n);
                // No terminal (a log under nohup, a service): a line every tenth instead.
                let total = bar.length().unwrap_or(0).max(1);
                if bar.is_hidden() && before * 10 / total != bar.position() * 10 / total {
                    let secs = bar.elapsed().as_secs();
                    eprintln!("{}: {}/{total} ({secs} s)", bar.prefix(), bar.position());
                }
            }
        });
    }

    fn finish(&self) {
        self.with(|b| {
            if let Some(bar) = b.take() {
                bar.finish_and_clear();
            }
        });
    }

    fn note(&self, line: &str) {
        // A hidden bar drops what it is asked to print, so a log would lose the line.
        self.with(|b| match b {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        });
    }
}
