//! `marquee caption`: one Florence-2 caption of one image.

use super::args::CaptionArgs;
use super::{Global, read_image};
use anyhow::Result;
use marquee::caption::local::FlorenceCaptioner;
use marquee::infer::captioner::{CaptionOptions, CaptionOutput};
use serde::Serialize;
use std::fmt;

#[derive(Serialize)]
#[serde(transparent)]
pub struct CaptionReport(CaptionOutput);

impl fmt::Display for CaptionReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let out = &self.0;
        let t = &out.timings_ms;
        writeln!(f, "{}", out.caption)?;
        write!(
            f,
            "{} tokens; preprocess {:.0} ms, vision {:.0} ms, encoder {:.0} ms, decoder {:.0} ms ({:.1} ms/token), total {:.0} ms",
            out.tokens, t.preprocess, t.vision, t.encoder, t.decoder, t.per_token, t.total
        )
    }
}

pub fn run(a: CaptionArgs, g: &Global) -> Result<CaptionReport> {
    let device = g.backend.device()?;
    let img = read_image(&a.image)?;
    let captioner = FlorenceCaptioner::load(&a.model, &device)?;
    let opts = CaptionOptions {
        beams: a.beams,
        max_new_tokens: a.max_new_tokens,
    };
    Ok(CaptionReport(captioner.caption(&img, a.task, &opts)?))
}
