//! The `marquee` binary: parse the command line, run one mode, print its report.
//! The library does the work and never prints; this is where output happens.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::args::Cli::try_parse() {
        Ok(a) => a,
        // --help and --version.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", one_line(&e.render().to_string()));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MARQUEE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    marquee::util::progress::install(Box::new(cli::progress::Bars::default()));
    let json = args.json;
    let outcome = cli::run(args).and_then(|report| cli::report::print(report.as_ref(), json));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole context chain, joined.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            // A bad config is a usage error: exit 2, as systemd and scripts expect.
            if e.downcast_ref::<marquee::config::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A clap error as one line: what was wrong and what is allowed, without the usage
/// block, like every other error of the binary.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect::<Vec<_>>()
        .join("; ")
}
