//! `marquee config check`: parse and validate an appliance config without running.

use super::args::ConfigAction;
use anyhow::Result;
use marquee::config::Config;
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

#[derive(Serialize)]
pub struct ConfigReport {
    path: PathBuf,
    ok: bool,
    device_id: String,
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}: ok (device_id {})",
            self.path.display(),
            self.device_id
        )
    }
}

pub fn run(action: ConfigAction) -> Result<ConfigReport> {
    let ConfigAction::Check { path } = action;
    let c = Config::load(&path)?;
    Ok(ConfigReport {
        path,
        ok: true,
        device_id: c.device_id.to_string(),
    })
}
