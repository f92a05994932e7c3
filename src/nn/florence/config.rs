//! Florence-2 shapes. They parse from a checkpoint's `config.json` in either layout
//! (transformers-native or Microsoft's remote code), and the two released sizes are
//! presets so the manifest tests need no file.

use serde::{Deserialize, Serialize};

/// DaViT's shape (`vision_config` of config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Channels per stage.
    #[serde(alias = "dim_embed")]
    pub embed_dim: Vec<usize>,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Spatial attention heads per stage.
    pub num_heads: Vec<usize>,
    /// Channel attention groups per stage.
    pub num_groups: Vec<usize>,
    /// Patch-embedding kernel per stage.
    pub patch_size: Vec<usize>,
    /// Patch-embedding stride per stage.
    pub patch_stride: Vec<usize>,
    /// Patch-embedding padding per stage.
    pub patch_padding: Vec<usize>,
    /// LayerNorm before each patch embedding.
    pub patch_prenorm: Vec<bool>,
    /// Side of the attention windows.
    pub window_size: usize,
    /// Width of the projected image tokens.
    pub projection_dim: usize,
    /// Positions of the 2-D position embedding.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Frames of the temporal embedding.
    #[serde(default = "default_max_temporal")]
    pub max_temporal_embeddings: usize,
}

fn default_max_pos() -> usize {
    50
}
fn default_max_temporal() -> usize {
    100
}

/// BART's shape (`text_config` of config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Encoder layers.
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
    /// Encoder attention heads.
    pub encoder_attention_heads: usize,
    /// Decoder attention heads.
    pub decoder_attention_heads: usize,
    /// Encoder feed-forward width.
    pub encoder_ffn_dim: usize,
    /// Decoder feed-forward width.
    pub decoder_ffn_dim: usize,
    /// Longest input, in tokens.
    pub max_position_embeddings: usize,
}

/// Florence-2's shape (its config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlorenceConfig {
    /// The vision encoder.
    pub vision_config: VisionConfig,
    /// The language model.
    pub text_config: TextConfig,
}

/// BART's learned position table starts two rows in.
pub const POSITION_OFFSET: usize = 2;
/// The native layout pads the vocabulary to a multiple of 64.
const VOCAB_MULTIPLE: usize = 64;

impl FlorenceConfig {
    /// Reads `config.json` of either layout. Microsoft's vocabulary (without `<image>`)
    /// is widened to the native one, so both layouts build the same model.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let mut c: Self = serde_json::from_str(text)?;
        c.text_config.vocab_size = native_vocab(c.text_config.vocab_size);
        Ok(c)
    }

    fn davit(embed_dim: [usize; 4], heads: [usize; 4], projection_dim: usize) -> VisionConfig {
        VisionConfig {
            embed_dim: embed_dim.to_vec(),
            depths: vec![1, 1, 9, 1],
            num_heads: heads.to_vec(),
            num_groups: heads.to_vec(),
            patch_size: vec![7, 3, 3, 3],
            patch_stride: vec![4, 2, 2, 2],
            patch_padding: vec![3, 1, 1, 1],
            patch_prenorm: vec![false, true, true, true],
            window_size: 12,
            projection_dim,
            max_position_embeddings: 50,
            max_temporal_embeddings: 100,
        }
    }

    fn bart(d: usize, layers: usize, heads: usize, positions: usize) -> TextConfig {
        TextConfig {
            vocab_size: 51328,
            d_model: d,
            encoder_layers: layers,
            decoder_layers: layers,
            encoder_attention_heads: heads,
            decoder_attention_heads: heads,
            encoder_ffn_dim: 4 * d,
            decoder_ffn_dim: 4 * d,
            max_position_embeddings: positions,
        }
    }

    /// Florence-2-base (0.23 B).
    pub fn base() -> Self {
        Self {
            vision_config: Self::davit([128, 256, 512, 1024], [4, 8, 16, 32], 768),
            text_config: Self::bart(768, 6, 12, 1024),
        }
    }

    /// Florence-2-large (0.77 B), with the 4k position table of its 2024-12 revision.
    pub fn large() -> Self {
        Self {
            vision_config: Self::davit([256, 512, 1024, 2048], [8, 16, 32, 64], 1024),
            text_config: Self::bart(1024, 12, 16, 4096),
        }
    }

    /// Refuses shapes the networks cannot be built from (a config.json typo should be an
    /// error, not a panic deep in a reshape).
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let stages = v.embed_dim.len();
        if stages == 0 {
            return Err("vision_config.embed_dim is empty".into());
        }
        for (name, len) in [
            ("depths", v.depths.len()),
            ("num_heads", v.num_heads.len()),
            ("num_groups", v.num_groups.len()),
            ("patch_size", v.patch_size.len()),
            ("patch_stride", v.patch_stride.len()),
            ("patch_padding", v.patch_padding.len()),
            ("patch_prenorm", v.patch_prenorm.len()),
        ] {
            if len != stages {
                return Err(format!(
                    "vision_config.{name} has {len} entries, embed_dim has {stages}"
                ));
            }
        }
        for s in 0..stages {
            let d = v.embed_dim[s];
            if v.num_heads[s] == 0
                || !d.is_multiple_of(v.num_heads[s])
                || v.num_groups[s] == 0
                || !d.is_multiple_of(v.num_groups[s])
            {
                return Err(format!(
                    "stage {s}: embed_dim {d} is not divisible by its heads/groups"
                ));
            }
        }
        if v.window_size == 0 || v.patch_stride.contains(&0) {
            return Err("window_size and patch_stride must be positive".into());
        }
        let t = &self.text_config;
        for (name, heads) in [
            ("encoder", t.encoder_attention_heads),
            ("decoder", t.decoder_attention_heads),
        ] {
            if heads == 0 || !t.d_model.is_multiple_of(heads) {
                return Err(format!(
                    "text_config: d_model {} is not divisible by {name} heads {heads}",
                    t.d_model
                ));
            }
        }
        Ok(())
    }

    /// Image tokens the projector emits for a square input of `side` pixels.
    pub fn image_tokens(&self, side: usize) -> usize {
        let stride: usize = self.vision_config.patch_stride.iter().product();
        let grid = side / stride;
        grid * grid + 1
    }
}

/// Microsoft's 51289 (or the tiny 2024) rows plus `<image>`, rounded up to 64.
pub fn native_vocab(vocab: usize) -> usize {
    if vocab.is_multiple_of(VOCAB_MULTIPLE) {
        vocab
    } else {
        (vocab + 1).div_ceil(VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    }
}
