//! `marquee run`: the appliance daemon, until SIGTERM.

use anyhow::Result;
use marquee::config::Config;
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// Printed nothing: the daemon's story is in its log.
#[derive(Serialize)]
pub struct Stopped {
    stopped: bool,
}

impl fmt::Display for Stopped {
    fn fmt(&self, _: &mut fmt::Formatter) -> fmt::Result {
        Ok(())
    }
}

pub fn run(config: &Path) -> Result<Stopped> {
    marquee::appliance::run(Config::load(config)?)?;
    Ok(Stopped { stopped: true })
}
