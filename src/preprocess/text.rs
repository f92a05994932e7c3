//! WordPiece tokenization through the `tokenizers` crate.
//!
//! all-MiniLM-L6-v2's tokenizer.json turns on fixed padding to 128. We switch it off
//! and pad each batch only to its longest row, with an attention mask, which gives
//! the same embeddings for far less work on short overviews.

use std::path::Path;
use tokenizers::{Tokenizer, TruncationParams};

/// The model card trained at 128 tokens; longer text is cut there.
pub const MAX_TOKENS: usize = 128;
/// Longest text we tokenize at all (bytes): a huge overview is cut before the
/// tokenizer sees it, so it costs bounded time and memory.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// A tokenizer that could not be read or used.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(String);

/// A right-padded batch of token ids with its 0/1 attention mask, row-major `[rows, len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Token ids.
    pub ids: Vec<i64>,
    /// 1 for a token, 0 for padding.
    pub mask: Vec<f32>,
    /// Texts in the batch.
    pub rows: usize,
    /// Tokens per row (the longest text's).
    pub len: usize,
}

/// MiniLM's wordpiece tokenizer, truncating to the model's length.
pub struct TextTokenizer {
    inner: Tokenizer,
}

impl TextTokenizer {
    /// Reads a tokenizer.json.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer(inner)
    }

    /// A tokenizer from tokenizer.json's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError(e.to_string()))?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(mut inner: Tokenizer) -> Result<Self, TokenizerError> {
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| TokenizerError(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Token ids of one text, `[CLS] … [SEP]`, truncated at `MAX_TOKENS`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let text = clip(text, MAX_TEXT_BYTES);
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Encodes texts into one batch padded (id 0) to the longest row.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch, TokenizerError> {
        let rows: Vec<Vec<i64>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_, _>>()?;
        Ok(pad_batch(&rows))
    }
}

/// Right-pads rows of ids with 0 and builds the mask.
pub fn pad_batch(rows: &[Vec<i64>]) -> TokenBatch {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i64; rows.len() * len];
    let mut mask = vec![0f32; rows.len() * len];
    for (r, row) in rows.iter().enumerate() {
        ids[r * len..r * len + row.len()].copy_from_slice(row);
        mask[r * len..r * len + row.len()].fill(1.0);
    }
    TokenBatch {
        ids,
        mask,
        rows: rows.len(),
        len,
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}
