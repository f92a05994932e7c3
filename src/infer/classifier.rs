//! Classifier: (poster, overview, caption) -> 18 genre scores and the predicted set.
//! It takes decoded images and strings, never paths: reading files is the caller's job.

use super::batch::{FusionRow, batch};
use super::timings::Timings;
use crate::infer::labels::decide;
use crate::model::cache::CacheDir;
use crate::model::dir::{ImageInput, ModelDir, TowerSource, top_file};
use crate::model::towers::{Form, Towers};
use crate::nn::cpu_ops::host_device;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::nn::fusion::HostFusion;
use crate::preprocess::resize::resize_to_chw;
use anyhow::{Result, bail};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use image::RgbImage;
use rayon::prelude::*;
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

/// The text tower's hidden states `[L, 384]` of one unpadded text, after its first
/// `layers` layers, on the host. On a CPU device the host layers run it; elsewhere
/// burn's modules.
pub fn text_tokens(towers: &Towers, ids: &[i64], layers: usize, device: &Device) -> Vec<f32> {
    if ids.is_empty() {
        return Vec::new();
    }
    if let Some(host) = &towers.text_host {
        return host.forward_layers(&towers.text, ids, layers);
    }
    let n = ids.len();
    let idt = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, n]), device);
    let mask = Tensor::<2>::ones([1, n], device);
    towers
        .text
        .forward_layers(idt, mask, layers)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 hidden states")
}

/// One genre's sigmoid score.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct GenreScore {
    /// The genre.
    pub label: String,
    /// Its score in 0..=1.
    pub score: f32,
}

/// What the classifier says of one poster.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    /// All genres, highest score first.
    pub genres: Vec<GenreScore>,
    /// The genres over their thresholds, highest score first.
    pub predicted: Vec<String>,
    /// The caption it read, if any.
    pub caption: Option<String>,
    /// Where the time went, stage by stage.
    pub timings_ms: Timings,
}

/// How the two towers share the CPU within one poster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// At the same time (a GPU queue would serialise them anyway).
    Overlapped,
    /// One after the other: each stage's time is its own.
    Sequential,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The genre model, loaded: towers, fusion members and thresholds, on one device.
pub struct Classifier {
    /// The poster and text towers, and the tokenizer.
    pub towers: Towers,
    /// The fusion networks and their spec.
    pub model: ModelDir,
    /// Where it computes.
    pub device: Device,
    /// The members copied for the host kernels (on a CPU device, when every member
    /// has the served shape); empty otherwise.
    fusion_host: Vec<HostFusion>,
}

impl Classifier {
    /// Loads a model directory and its towers (bundled, or from the cache) to serve.
    pub fn load(model_dir: &Path, cache: &CacheDir, device: &Device) -> Result<Self> {
        Self::load_as(model_dir, cache, device, Form::Serving)
    }

    /// [`Classifier::load`] with the towers in `form`.
    pub fn load_as(
        model_dir: &Path,
        cache: &CacheDir,
        device: &Device,
        form: Form,
    ) -> Result<Self> {
        if model_dir.join(top_file(0)).is_file() {
            bail!(
                "{} is a teacher that tunes MiniLM layers: it serves `train --teacher` only",
                model_dir.display()
            );
        }
        let model = ModelDir::load(model_dir, device)?;
        let towers = match &model.spec.towers {
            TowerSource::Cache => Towers::load(cache, device, form)?,
            TowerSource::Bundled { .. } => {
                Towers::load_bundled(model_dir, &model.spec, device, form)?
            }
        };
        let host = host_device(device);
        let fusion_host = match host {
            true => model.members.iter().map(HostFusion::new).collect(),
            false => None,
        };
        Ok(Self {
            towers,
            model,
            fusion_host: fusion_host.unwrap_or_default(),
            device: device.clone(),
        })
    }

    /// The genre names, in the model's order.
    pub fn labels(&self) -> &[String] {
        &self.model.spec.labels
    }

    /// Scores a poster, the towers overlapped where the device allows it.
    pub fn classify(
        &self,
        poster: &RgbImage,
        overview: Option<&str>,
        caption: Option<&str>,
    ) -> Result<Prediction> {
        let schedule = if host_device(&self.device) {
            Schedule::Overlapped
        } else {
            Schedule::Sequential
        };
        self.classify_in(schedule, poster, overview, caption)
    }

    /// [`Classifier::classify`] with the towers run as `schedule` says: `bench`
    /// times each stage alone with `Sequential`.
    pub fn classify_in(
        &self,
        schedule: Schedule,
        poster: &RgbImage,
        overview: Option<&str>,
        caption: Option<&str>,
    ) -> Result<Prediction> {
        // On one of rayon's workers from the start: each of the ~150 parallel steps
        // of a poster then shares work with the other workers directly, where from
        // another thread every step would be handed over and waited for (two
        // context switches each).
        rayon::scope(|_| self.scored(schedule, poster, overview, caption))
    }

    fn scored(
        &self,
        schedule: Schedule,
        poster: &RgbImage,
        overview: Option<&str>,
        caption: Option<&str>,
    ) -> Result<Prediction> {
        let start = Instant::now();
        let mut timings = Timings::default();
        // The stage's milliseconds since `since`, and the start of the next stage.
        let lap = |since: Instant| (ms(since), Instant::now());
        let spec = &self.model.spec;
        let dev = &self.device;
        // Whether there is text decides the kiosk's second view; the tokenizer always
        // adds [CLS] and [SEP], so some text means some ids.
        let composed = compose_text(overview, caption);
        let has_text = composed.is_some();
        let t = Instant::now();
        let mut inputs = vec![image_input(std::slice::from_ref(poster), spec.image_input)];
        if spec.tta_flip || (spec.tta_flip_text_less && !has_text) {
            let flipped = image::imageops::flip_horizontal(poster);
            inputs.push(image_input(&[flipped], spec.image_input));
        }
        let (preprocess, t) = lap(t);
        timings.preprocess = preprocess;
        let ids = match composed {
            Some(s) => self.towers.tokenizer.encode(&s)?,
            None => Vec::new(),
        };
        let (tokenize, t) = lap(t);
        timings.tokenize = tokenize;
        // Read back inside the stage, so that an asynchronous backend (wgpu) is timed
        // for the work and not just for queueing it.
        let image = || {
            let t = Instant::now();
            let views: Vec<Vec<f32>> = inputs
                .into_iter()
                .map(|x| {
                    tower_tokens(&self.towers, x, dev)
                        .into_data()
                        .try_to_vec::<f32>()
                        .expect("f32 image tokens")
                })
                .collect();
            (views, ms(t))
        };
        let text = || {
            let t = Instant::now();
            let text = text_tokens(&self.towers, &ids, spec.text_layers, dev);
            (text, ms(t))
        };
        let ((views, image_ms), (text, text_ms)) = match schedule {
            // The towers are independent: on a few cores each fills the other's idle
            // moments between its small parallel steps (measured against one
            // single-thread pool per tower: no better, and more to hold).
            Schedule::Overlapped => rayon::join(image, text),
            Schedule::Sequential => (image(), text()),
        };
        timings.image_tower = image_ms;
        timings.text_tower = text_ms;
        let (towers, t) = lap(t);
        timings.towers = towers;
        let cells = views[0].len() / FEATURE_DIM;
        let k = spec.fusion.classes;
        let mut scores = vec![0f32; k];
        let weight = 1.0 / (views.len() * self.model.members.len()) as f32;
        let probs: Vec<Vec<f32>> = if self.fusion_host.is_empty() {
            let members = self.model.members.iter();
            members
                .flat_map(|m| views.iter().map(move |v| (m, v)))
                .map(|(m, v)| {
                    let row = FusionRow {
                        image: &v[..],
                        hide_image: false,
                        text: &text[..],
                    };
                    sigmoid(m.forward(batch(&[row], cells, dev)))
                        .into_data()
                        .try_to_vec::<f32>()
                        .expect("f32 scores")
                })
                .collect()
        } else {
            let host = |(h, v): (&HostFusion, &Vec<f32>)| -> Vec<f32> {
                let z = h.forward(v, &text);
                z.into_iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect()
            };
            let runs: Vec<(&HostFusion, &Vec<f32>)> = self
                .fusion_host
                .iter()
                .flat_map(|h| views.iter().map(move |v| (h, v)))
                .collect();
            match schedule {
                // Members are independent, and one is too small to keep two cores busy.
                Schedule::Overlapped => runs.into_par_iter().map(host).collect(),
                Schedule::Sequential => runs.into_iter().map(host).collect(),
            }
        };
        for p in probs {
            for (a, b) in scores.iter_mut().zip(p) {
                *a += b * weight;
            }
        }
        timings.fusion = ms(t);
        timings.total = ms(start);
        Ok(self.prediction(&scores, has_text, caption, timings))
    }

    fn prediction(
        &self,
        scores: &[f32],
        has_text: bool,
        caption: Option<&str>,
        timings_ms: Timings,
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
