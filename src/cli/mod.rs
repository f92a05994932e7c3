//! The binary's side: the command line (`args`, the "low" step that validates), one
//! module per subcommand (the "high" step that builds library objects and runs them),
//! the reports they return, and the progress bars.

pub mod args;
pub mod progress;
pub mod report;

mod bench;
mod caption;
mod classify;
mod config;
mod eval;
mod models;
mod run;
mod serve_captions;
mod train;

use anyhow::{Context, Result};
use args::{Cli, Command};
use marquee::backend::Backend;
use marquee::model::cache::CacheDir;
use marquee::preprocess::image::{MAX_BYTES, decode};
use marquee::util::limited::read_file;
use report::Report;
use std::path::Path;

/// What every command may need: the backend asked for and the weight cache.
pub struct Global {
    pub backend: Backend,
    pub cache: CacheDir,
}

/// Runs one mode and hands back its report.
pub fn run(cli: Cli) -> Result<Box<dyn Report>> {
    let ctx = Global {
        backend: cli.backend.into(),
        cache: cli
            .cache
            .map(CacheDir::new)
            .unwrap_or_else(CacheDir::from_env),
    };
    Ok(match cli.command {
        Command::Classify(a) => Box::new(classify::run(a, &ctx)?),
        Command::Eval(a) => Box::new(eval::run(a, &ctx)?),
        Command::Train(a) => Box::new(train::run(a, &ctx)?),
        Command::Bench(a) => bench::run(a, &ctx)?,
        Command::Caption(a) => Box::new(caption::run(a, &ctx)?),
        Command::ServeCaptions(a) => Box::new(serve_captions::run(a, &ctx)?),
        Command::Run { config } => Box::new(run::run(&config)?),
        Command::Config { action } => Box::new(config::run(action)?),
        Command::Models { action } => models::run(action, &ctx)?,
    })
}

/// Reads and decodes an image file with the decode limits.
fn read_image(path: &Path) -> Result<image::RgbImage> {
    let bytes = read_file(path, MAX_BYTES)?;
    decode(&bytes).with_context(|| path.display().to_string())
}
