//! What a command hands back: a report the binary prints as text or as one JSON
//! object (`--json`). The commands never print themselves.

use serde::Serialize;
use std::fmt::Display;
use std::io::Write;

pub trait Report: Display {
    fn to_json(&self) -> serde_json::Result<String>;
}

impl<T: Display + Serialize> Report for T {
    fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }
}

/// Prints a report to stdout. A reader that went away (`| head`) is not an error.
pub fn print(report: &dyn Report, json: bool) -> anyhow::Result<()> {
    let text = if json {
        report.to_json()? + "\n"
    } else {
        let t = report.to_string();
        if t.is_empty() || t.ends_with('\n') {
            t
        } else {
            t + "\n"
        }
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
