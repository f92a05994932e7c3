//! Classifier: (poster, overview, caption) -> 18 genre scores and the predicted set.
//! It takes decoded images and strings, never paths: reading files is the caller's job.

use crate::model::dir::{ImageInput, ModelDir};
use crate::model::towers::Towers;
use crate::nn::bert::mean_pool_normalize;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::nn::head::{FusionHead, HeadInput};
use crate::preprocess::image::{resize_exact, to_chw};
use crate::train::metrics::decide;
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use image::RgbImage;
use serde::Serialize;
use std::time::Instant;

/// Width of the text embedding.
pub const TEXT_DIM: usize = 384;

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

/// The frozen towers, turning images and text into the head's input features.
pub struct Encoder {
    pub towers: Towers,
    pub image_input: ImageInput,
    pub device: Device,
}

impl Encoder {
    /// Pooled image features of a batch, row-major `[n, 1280]`.
    pub fn image_features(&self, images: &[RgbImage]) -> Vec<f32> {
        let (w, h) = (self.image_input.width, self.image_input.height);
        let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
        for img in images {
            data.extend(to_chw(&resize_exact(img, w, h)));
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(data, [images.len(), 3, h as usize, w as usize]),
            &self.device,
        );
        let pooled = self.towers.image.forward_features(x).pooled;
        pooled
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 features")
    }

    /// Sentence embeddings of a batch, row-major `[n, 384]`.
    pub fn text_features(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let batch = self.towers.tokenizer.encode_batch(texts)?;
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(batch.ids, [batch.rows, batch.len]),
            &self.device,
        );
        let mask = Tensor::<2>::from_data(
            TensorData::new(batch.mask, [batch.rows, batch.len]),
            &self.device,
        );
        let hidden = self.towers.text.forward(ids, mask.clone());
        let emb = mean_pool_normalize(hidden, mask);
        Ok(emb.into_data().try_to_vec::<f32>().expect("f32 embeddings"))
    }
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

/// Sigmoid scores of head inputs, row-major `[n, classes]`.
pub fn head_scores(head: &FusionHead, input: HeadInput) -> Vec<f32> {
    sigmoid(head.forward(input))
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 scores")
}

/// Builds head inputs from feature rows already on the host.
pub fn head_input(
    image: Vec<f32>,
    text: Vec<f32>,
    present: Vec<f32>,
    device: &Device,
) -> HeadInput {
    let n = present.len();
    HeadInput {
        image: Tensor::from_data(TensorData::new(image, [n, FEATURE_DIM]), device),
        text: Tensor::from_data(TensorData::new(text, [n, TEXT_DIM]), device),
        text_present: Tensor::from_data(TensorData::new(present, [n, 1]), device),
    }
}

pub struct Classifier {
    pub encoder: Encoder,
    pub model: ModelDir,
}

impl Classifier {
    pub fn new(towers: Towers, model: ModelDir, device: Device) -> Self {
        let encoder = Encoder {
            towers,
            image_input: model.spec.image_input,
            device,
        };
        Self { encoder, model }
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
        let t = Instant::now();
        let image = self.encoder.image_features(std::slice::from_ref(poster));
        let t = lap("image_tower", t);
        let text = compose_text(overview, caption);
        let (text_feat, present) = match &text {
            Some(s) => (self.encoder.text_features(&[s.as_str()])?, 1.0),
            None => (vec![0.0; TEXT_DIM], 0.0),
        };
        let t = lap("text_tower", t);
        let input = head_input(image, text_feat, vec![present], &self.encoder.device);
        let scores = head_scores(&self.model.head, input);
        lap("head", t);
        timings.push(("total".into(), start.elapsed().as_secs_f64() * 1e3));
        Ok(self.prediction(&scores, caption, timings))
    }

    fn prediction(
        &self,
        scores: &[f32],
        caption: Option<&str>,
        timings_ms: Vec<(String, f64)>,
    ) -> Prediction {
        let spec = &self.model.spec;
        let chosen = decide(scores, &spec.thresholds);
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
