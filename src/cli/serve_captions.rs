//! `marquee serve-captions`: the caption server, until SIGTERM.

use super::Global;
use super::args::ServeCaptionsArgs;
use anyhow::Result;
use marquee::caption::local::FlorenceCaptioner;
use marquee::caption::server::{CaptionServer, ServerConfig};
use marquee::util::progress::note;
use marquee::util::service::{Service, Tick};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

#[derive(Serialize)]
pub struct ServerStopped {
    addr: String,
}

impl fmt::Display for ServerStopped {
    fn fmt(&self, _: &mut fmt::Formatter) -> fmt::Result {
        Ok(())
    }
}

pub fn run(a: ServeCaptionsArgs, g: &Global) -> Result<ServerStopped> {
    let device = g.backend.device()?;
    let service = Service::new()?;
    let captioner = Arc::new(FlorenceCaptioner::load(&a.model, &device)?);
    let cfg = ServerConfig {
        listen: a.listen,
        token: a.token,
        workers: a.workers,
        queue: a.queue,
        max_body: a.max_body,
        ..Default::default()
    };
    let server = CaptionServer::start(captioner.clone(), cfg)?;
    let addr = server.addr().to_string();
    note(&format!(
        "serving {} captions on http://{addr}",
        captioner.name
    ));
    // A worker that ended (it never should: panics are caught per request) stops
    // the service, so that systemd restarts it.
    let outcome = service.run(|| {
        if server.workers_alive() {
            Tick::Healthy
        } else {
            Tick::Fail(anyhow::anyhow!("a captioning worker stopped"))
        }
    });
    server.shutdown();
    note("caption server stopped");
    outcome?;
    Ok(ServerStopped { addr })
}
