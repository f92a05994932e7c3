//! Classifier: (poster, overview, caption) -> 18 genre scores and the predicted set.
//! It takes decoded images and strings, never paths: reading files is the caller's job.

use super::batch::{FusionRow, batch};
use crate::infer::labels::decide;
use crate::model::cache::CacheDir;
use crate::model::dir::{ImageInput, ModelDir, TowerSource};
use crate::model::towers::Towers;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::preprocess::resize::resize_to_chw;
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use image::RgbImage;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The text the text tower reads: the overview, then the caption, whichever exist.
/// `None` when there is no text at all (a kiosk scan without a caption).
pub fn compose_text(overview: Option<&str>, caption: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = [overview, caption]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// Images resized to the tower's input and normalised: `[n, 3, H, W]` on the host.
/// It becomes a tensor only where burn's modules run the tower.
pub fn image_input(images: &[RgbImage], input: ImageInput) -> TensorData {
    let (w, h) = (input.width, input.height);
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for img in images {
        data.extend(resize_to_chw(img, w, h));
    }
    TensorData::new(data, [images.len(), 3, h as usize, w as usize])
}

/// The feature map of an image batch as tokens: `[n, cells, 1280]`, row-major cells.
/// On a CPU device the folded host kernels run it; elsewhere burn's modules.
pub fn tower_tokens(towers: &Towers, x: TensorData, device: &Device) -> Tensor<3> {
    let Some(host) = &towers.image_host else {
        let f = towers
            .image
            .forward_features(Tensor::from_data(x, device))
            .features;
        let [b, c, fh, fw] = f.dims();
        return f.reshape([b, c, fh * fw]).swap_dims(1, 2);
    };
    let [b, _, h, w] = x.shape()[..] else {
        unreachable!("image_input makes [n, 3, H, W]");
    };
    let data = x.try_into_vec::<f32>().expect("f32 image input");
    let mut tokens = Vec::new();
    let mut cells = 0;
    for image in data.chunks_exact(3 * h * w) {
        let (t, fh, fw) = host.tokens(image, h, w);
        cells = fh * fw;
        tokens.extend(t);
    }
    Tensor::from_data(TensorData::new(tokens, [b, cells, FEATURE_DIM]), device)
}

/// [`image_input`] then [`tower_tokens`].
pub fn image_tokens(
    towers: &Towers,
    images: &[RgbImage],
    input: ImageInput,
    device: &Device,
) -> Tensor<3> {
    tower_tokens(towers, image_input(images, input), device)
}

#[derive(Debug, Clone, Serialize)]
pub struct GenreScore {
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// All genres, highest score first.
    pub genres: Vec<GenreScore>,
    pub predicted: Vec<String>,
    pub caption: Option<String>,
    /// Per stage, in the order they ran, then "total".
    pub timings_ms: Vec<(String, f64)>,
}

pub struct Classifier {
    pub towers: Towers,
    pub model: ModelDir,
    pub device: Device,
}

impl Classifier {
    /// Loads a model directory and its towers (bundled, or from the cache).
    pub fn load(model_dir: &Path, cache: &CacheDir, device: &Device) -> Result<Self> {
        let model = ModelDir::load(model_dir, device)?;
        let towers = match &model.spec.towers {
            TowerSource::Cache => Towers::load(cache, device)?,
            TowerSource::Bundled { .. } => Towers::load_bundled(model_dir, &model.spec, device)?,
        };
        Ok(Self {
            towers,
            model,
            device: device.clone(),
        })
    }

    pub fn labels(&self) -> &[String] {
        &self.model.spec.labels
    }

    pub fn classify(
        &self,
        poster: &RgbImage,
        overview: Option<&str>,
        caption: Option<&str>,
    ) -> Result<Prediction> {
        let start = Instant::now();
        let mut timings = Vec::new();
        let mut lap = |name: &str, since: Instant| {
            timings.push((name.to_string(), since.elapsed().as_secs_f64() * 1e3));
            Instant::now()
        };
        let spec = &self.model.spec;
        let dev = &self.device;
        let t = Instant::now();
        let mut inputs = vec![image_input(std::slice::from_ref(poster), spec.image_input)];
        if spec.tta_flip {
            let flipped = image::imageops::flip_horizontal(poster);
            inputs.push(image_input(&[flipped], spec.image_input));
        }
        let t = lap("preprocess", t);
        // Read back inside the stage, so that an asynchronous backend (wgpu) is timed
        // for the work and not just for queueing it.
        let views: Vec<Vec<f32>> = inputs
            .into_iter()
            .map(|x| {
                tower_tokens(&self.towers, x, dev)
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 image tokens")
            })
            .collect();
        let t = lap("image_tower", t);
        let ids = match compose_text(overview, caption) {
            Some(s) => self.towers.tokenizer.encode(&s)?,
            None => Vec::new(),
        };
        let t = lap("tokenize", t);
        let has_text = !ids.is_empty();
        let text: Vec<f32> = if has_text {
            let n = ids.len();
            let idt = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), dev);
            let mask = Tensor::<2>::ones([1, n], dev);
            let h = self.towers.text.forward_layers(idt, mask, spec.text_layers);
            h.into_data()
                .try_to_vec::<f32>()
                .expect("f32 hidden states")
        } else {
            Vec::new()
        };
        let t = lap("text_tower", t);
        let cells = views[0].len() / FEATURE_DIM;
        let k = spec.fusion.classes;
        let mut scores = vec![0f32; k];
        let weight = 1.0 / (views.len() * self.model.members.len()) as f32;
        for m in &self.model.members {
            for v in &views {
                let row = FusionRow {
                    image: &v[..],
                    hide_image: false,
                    text: &text[..],
                };
                let input = batch(&[row], cells, dev);
                let p = sigmoid(m.forward(input))
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 scores");
                for (a, b) in scores.iter_mut().zip(p) {
                    *a += b * weight;
                }
            }
        }
        lap("fusion", t);
        timings.push(("total".into(), start.elapsed().as_secs_f64() * 1e3));
        Ok(self.prediction(&scores, has_text, caption, timings))
    }

    fn prediction(
        &self,
        scores: &[f32],
        has_text: bool,
        caption: Option<&str>,
        timings_ms: Vec<(String, f64)>,
    ) -> Prediction {
        let spec = &self.model.spec;
        let thresholds = if has_text {
            &spec.thresholds
        } else {
            &spec.thresholds_text_less
        };
        let chosen = decide(scores, thresholds);
        let mut genres: Vec<GenreScore> = spec
            .labels
            .iter()
            .zip(scores)
            .map(|(l, &s)| GenreScore {
                label: l.clone(),
                score: s,
            })
            .collect();
        genres.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut predicted: Vec<(f32, String)> = spec
            .labels
            .iter()
            .zip(scores)
            .zip(&chosen)
            .filter(|(_, c)| **c == 1)
            .map(|((l, &s), _)| (s, l.clone()))
            .collect();
        predicted.sort_by(|a, b| b.0.total_cmp(&a.0));
        Prediction {
            genres,
            predicted: predicted.into_iter().map(|(_, l)| l).collect(),
            caption: caption.map(str::to_string),
            timings_ms,
        }
    }
}
