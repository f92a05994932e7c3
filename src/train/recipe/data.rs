//! The recipe's first step: the three splits' token features, extracted once (or
//! read from the cache), each with its labels and its rows with text.

use super::options::RecipeOptions;
use crate::model::cache::CacheDir;
use crate::model::towers::{Form, Towers};
use crate::nn::bert::BertLayer;
use crate::nn::efficientnet::Tail;
use crate::train::manifest::{Manifest, Row, multi_hot};
use crate::train::split::fit_tune_split;
use crate::train::tokens::{Extra, TEACHER_TEXT_LAYERS, TokenSet, extract_tokens};
use crate::util::progress::note;
use anyhow::{Result, bail};
use burn::prelude::*;
use std::path::Path;

/// Rows of a split as indices into its token set, with and without text.
pub(super) struct Part {
    pub(super) set: TokenSet,
    pub(super) y: Vec<u8>,
    pub(super) all: Vec<usize>,
    pub(super) with_text: Vec<usize>,
}

impl Part {
    fn new(set: TokenSet, rows: &[Row], labels: &[String]) -> Self {
        let all: Vec<usize> = (0..set.n).collect();
        let with_text = all
            .iter()
            .copied()
            .filter(|&i| set.text_len(i) > 0)
            .collect();
        Self {
            y: multi_hot(rows, labels),
            set,
            all,
            with_text,
        }
    }

    /// The labels of `idx`, row-major.
    pub(super) fn y_of(&self, idx: &[usize]) -> Vec<u8> {
        let k = self.y.len() / self.set.n.max(1);
        idx.iter()
            .flat_map(|&i| self.y[i * k..(i + 1) * k].iter().copied())
            .collect()
    }

    /// The labels of `idx` as hard f32 targets.
    pub(super) fn hard(&self, idx: &[usize]) -> Vec<f32> {
        self.y_of(idx).iter().map(|&v| v as f32).collect()
    }
}

/// The fit, tune and val splits, with the fit and tune rows they came from.
pub(super) struct Data {
    pub(super) fit_rows: Vec<Row>,
    pub(super) tune_rows: Vec<Row>,
    pub(super) fit: Part,
    pub(super) tune: Part,
    pub(super) val: Part,
    /// Pretrained copies of the MiniLM layers the teacher tunes (none by default).
    pub(super) text_top: Vec<BertLayer>,
    /// A pretrained copy of EfficientNet's last blocks and head, when they are tuned.
    pub(super) image_tail: Option<Tail>,
}

/// Reads the manifest, splits it and extracts (or finds) every row's features.
pub(super) fn load(
    manifest_path: &Path,
    cache: &CacheDir,
    device: &Device,
    opts: &RecipeOptions,
    labels: &[String],
) -> Result<Data> {
    let manifest = Manifest::load(manifest_path)?;
    let (mut fit_rows, tune_rows) = fit_tune_split(&manifest.split(Some("train")));
    if opts.fit_limit > 0 {
        fit_rows.truncate(opts.fit_limit);
    }
    let val_rows = manifest.split(Some("val"));
    if fit_rows.is_empty() || tune_rows.is_empty() || val_rows.is_empty() {
        bail!(
            "manifest {} lacks train or val rows",
            manifest_path.display()
        );
    }
    let towers = Towers::load(cache, device, Form::Modules)?;
    let top = opts.teacher_top_layers;
    if top > TEACHER_TEXT_LAYERS {
        bail!("the teacher can tune at most {TEACHER_TEXT_LAYERS} MiniLM layers, not {top}");
    }
    let below = (top > 0).then_some(TEACHER_TEXT_LAYERS - top);
    let dir = cache.tokens();
    note(&format!(
        "token features: {} fit, {} tune, {} val rows (cached in {})",
        fit_rows.len(),
        tune_rows.len(),
        val_rows.len(),
        dir.display()
    ));
    // Flipped teacher maps for the rows that are scored (tune and val), and for the
    // fit rows when training sees mirror images too; flipped student maps for every
    // row the student scores text-less (tune, val, and the fit rows out of fold).
    let part = |rows: &[Row], flip: bool| -> Result<Part> {
        let set = extract_tokens(
            &towers,
            device,
            &manifest,
            rows,
            &dir,
            Extra {
                flip,
                student_flip: opts.kiosk_flips(),
                below,
                tail: opts.image_tail,
            },
        )?;
        Ok(Part::new(set, rows, labels))
    };
    let val = part(&val_rows, true)?;
    let tune = part(&tune_rows, true)?;
    let fit = part(&fit_rows, opts.fusion.augment_flip)?;
    Ok(Data {
        fit_rows,
        tune_rows,
        fit,
        tune,
        val,
        text_top: towers.text.top_layers(top),
        image_tail: opts.image_tail.map(|n| towers.image.tail(n)),
    })
}
