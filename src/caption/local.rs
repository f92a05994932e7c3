//! On-device captioning: a Florence-2 model directory (config, weights of either
//! layout, tokenizer, generation and processor configs) loaded once, then
//! image -> caption with per-stage timings.

use super::processor::{ImageSize, normalize, resize};
use crate::infer::captioner::{CaptionOptions, CaptionOutput, Captioner, StageTimings};
use crate::infer::task::{Task, clean};
use crate::model::florence::load_weights;
use crate::nn::florence::Florence2;
use crate::nn::florence::config::FlorenceConfig;
use crate::nn::florence::generate::{Generated, GenerationConfig, generate};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Longest prompt we feed the encoder, in tokens (Florence's prompts are ~15).
const MAX_PROMPT_TOKENS: usize = 256;

/// Florence-2 in burn, loaded from a model directory: image in, caption out.
pub struct FlorenceCaptioner {
    model: Florence2,
    tokenizer: Tokenizer,
    /// Beams, token limits and forced tokens (the directory's generation_config.json).
    pub generation: GenerationConfig,
    /// The input size the processor resizes to.
    pub image_size: ImageSize,
    /// The network's shape.
    pub config: FlorenceConfig,
    /// The directory's name, reported with every caption.
    pub name: String,
    /// What the `Captioner` trait generates with (the appliance's beams and length).
    pub options: CaptionOptions,
    device: Device,
}

/// The weights file of a model directory: safetensors first, then Microsoft's pickle.
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    for f in ["model.safetensors", "pytorch_model.bin"] {
        if dir.join(f).is_file() {
            return Ok(dir.join(f));
        }
    }
    bail!(
        "no Florence-2 weights in {} (expected model.safetensors or pytorch_model.bin)",
        dir.display()
    )
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: bad JSON", path.display()))?;
    Ok(Some(v))
}

impl FlorenceCaptioner {
    /// Loads a Florence-2 directory (weights, tokenizer, configs), checking each file.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: not a Florence-2 model directory", dir.display()))?;
        let config = FlorenceConfig::from_json(&text)
            .with_context(|| format!("{}: not a Florence-2 config", cfg_path.display()))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
        let mut model = Florence2::new(&config, device);
        load_weights(&mut model, &config, &weights_file(dir)?)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
        let generation: GenerationConfig = match read_json(&dir.join("generation_config.json"))? {
            Some(v) => serde_json::from_value(v).context("generation_config.json")?,
            None => GenerationConfig::default(),
        };
        let vocab = config.text_config.vocab_size;
        generation
            .validate(vocab)
            .map_err(|e| anyhow::anyhow!("{}: generation_config.json: {e}", dir.display()))?;
        if tokenizer.get_vocab_size(true) == 0 || tokenizer.get_vocab_size(true) > vocab {
            anyhow::bail!(
                "{}: the tokenizer has {} tokens; the model has {vocab}",
                tok_path.display(),
                tokenizer.get_vocab_size(true)
            );
        }
        let image_size = ["processor_config.json", "preprocessor_config.json"]
            .iter()
            .find_map(|f| read_json(&dir.join(f)).ok().flatten())
            .and_then(|v| ImageSize::from_json(&v))
            .unwrap_or(ImageSize::FLORENCE);
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "florence-2".into());
        Ok(Self {
            model,
            tokenizer,
            generation,
            image_size,
            config,
            name,
            options: CaptionOptions::default(),
            device: device.clone(),
        })
    }

    /// The network.
    pub fn model(&self) -> &Florence2 {
        &self.model
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `<s> prompt </s>` ids for a task.
    pub fn prompt_ids(&self, task: Task) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(task.prompt(), true)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(MAX_PROMPT_TOKENS);
        Ok(ids)
    }

    /// Images -> `[B, 3, H, W]` pixel values.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Tensor<4> {
        let ImageSize { width, height } = self.image_size;
        let data: Vec<f32> = images
            .iter()
            .flat_map(|img| normalize(&resize(img, self.image_size)))
            .collect();
        Tensor::from_data(
            TensorData::new(data, [images.len(), 3, height as usize, width as usize]),
            &self.device,
        )
    }

    /// Encoder input for one image and a prompt: merged embeddings and mask.
    pub fn encode(&self, pixels: Tensor<4>, prompt: &[u32]) -> (Tensor<3>, Tensor<2>) {
        let [b, _, _, _] = pixels.dims();
        let image = self.model.encode_image(pixels);
        let ids: Vec<i64> = prompt.iter().map(|&i| i as i64).collect();
        let l = ids.len();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [l]), &self.device)
            .reshape([1, l])
            .expand([b, l]);
        let mask = Tensor::ones([b, l], &self.device);
        self.model.merge(image, ids, mask)
    }

    /// Token ids to text, special tokens dropped.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        clean(&self.tokenizer.decode(ids, false).unwrap_or_default())
    }

    /// The effective generation settings for a request.
    pub fn generation_for(&self, opts: &CaptionOptions) -> GenerationConfig {
        let mut g = self.generation.clone();
        if let Some(b) = opts.beams {
            g.num_beams = b.max(1);
        }
        if let Some(n) = opts.max_new_tokens {
            g.max_new_tokens = n.max(1);
        }
        g
    }

    /// Captions one image with `task`, timing each stage.
    pub fn caption(
        &self,
        image: &RgbImage,
        task: Task,
        opts: &CaptionOptions,
    ) -> Result<CaptionOutput> {
        let t0 = Instant::now();
        let prompt = self.prompt_ids(task)?;
        let pixels = self.pixel_values(std::slice::from_ref(image));
        let t1 = Instant::now();
        let (embeds, mask) = self.encode(pixels, &prompt);
        let embeds = sync(embeds);
        let prompt_tokens = embeds.dims()[1];
        let t2 = Instant::now();
        let encoded = self.model.encode(embeds, mask.clone());
        // Force the lazy backends to finish the encoder before the clock reads.
        let encoded = sync(encoded);
        let t3 = Instant::now();
        let g = self.generation_for(opts);
        let Generated { ids, .. } = generate(&self.model, encoded, mask, &g, false);
        let t4 = Instant::now();
        let ids = ids.into_iter().next().unwrap_or_default();
        let caption = self.decode_text(&ids);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let generated = ids.len().saturating_sub(1);
        Ok(CaptionOutput {
            caption,
            task,
            model: self.name.clone(),
            tokens: generated,
            prompt_tokens,
            ids,
            timings_ms: StageTimings {
                preprocess: ms(t0, t1),
                vision: ms(t1, t2),
                encoder: ms(t2, t3),
                decoder: ms(t3, t4),
                per_token: ms(t3, t4) / generated.max(1) as f64,
                total: ms(t0, Instant::now()),
            },
        })
    }
}

impl Captioner for FlorenceCaptioner {
    fn describe(&self) -> String {
        format!("local {}", self.name)
    }

    fn caption(&self, image: &RgbImage, task: Task) -> Result<CaptionOutput> {
        FlorenceCaptioner::caption(self, image, task, &self.options)
    }
}

/// Reads one value back so that the work queued for `t` is done (burn is lazy on some
/// backends); returns `t` unchanged.
pub fn sync<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    let probe = t.clone().slice(0..1).sum();
    let _ = probe.into_data();
    t
}
