//! Greedy and beam-search decoding with the logits processors Florence-2's checkpoints
//! ship with (forced BOS at the first step, forced EOS at the last, no-repeat n-grams).
//! The search follows transformers' `BeamSearchScorer` step for step, so token ids
//! match the reference exactly, ties and early stopping included.

use super::Florence2;
use burn::prelude::*;
use serde::{Deserialize, Deserializer};

/// `generation_config.json`, the fields decoding uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GenerationConfig {
    /// The token the decoder starts from.
    #[serde(default = "two")]
    pub decoder_start_token_id: u32,
    /// The token that ends a caption.
    #[serde(default = "two")]
    pub eos_token_id: u32,
    /// The padding token.
    #[serde(default = "one")]
    pub pad_token_id: u32,
    /// A token forced first, if any.
    #[serde(default)]
    pub forced_bos_token_id: Option<u32>,
    /// A token forced at the length limit, if any.
    #[serde(default)]
    pub forced_eos_token_id: Option<u32>,
    /// No n-gram of this size repeats (0: off).
    #[serde(default)]
    pub no_repeat_ngram_size: usize,
    /// Beams of the search (1: greedy).
    #[serde(default = "one_usize")]
    pub num_beams: usize,
    /// Exponent of the length in a beam's score.
    #[serde(default = "unit")]
    pub length_penalty: f32,
    /// Stop as soon as enough beams are done.
    #[serde(default, deserialize_with = "early_stopping")]
    pub early_stopping: bool,
    /// Most tokens to generate.
    #[serde(default = "twenty")]
    pub max_new_tokens: usize,
}

fn two() -> u32 {
    2
}
fn one() -> u32 {
    1
}
fn one_usize() -> usize {
    1
}
fn unit() -> f32 {
    1.0
}
fn twenty() -> usize {
    20
}

/// `true`, `false` or `"never"` (which, like `false`, waits for a better hypothesis).
fn early_stopping<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(matches!(
        serde_json::Value::deserialize(d)?,
        serde_json::Value::Bool(true)
    ))
}

impl Default for GenerationConfig {
    /// Microsoft's effective defaults for Florence-2.
    fn default() -> Self {
        Self {
            decoder_start_token_id: 2,
            eos_token_id: 2,
            pad_token_id: 1,
            forced_bos_token_id: Some(0),
            forced_eos_token_id: Some(2),
            no_repeat_ngram_size: 3,
            num_beams: 3,
            length_penalty: 1.0,
            early_stopping: true,
            max_new_tokens: 20,
        }
    }
}

/// What a generation returns: one sequence per input (starting with the decoder start
/// token), the beam score of each (0 for greedy), and the raw logits of every step when
/// asked for (greedy only; for parity checks).
#[derive(Debug, Clone, Default)]
pub struct Generated {
    /// Each sequence's token ids.
    pub ids: Vec<Vec<u32>>,
    /// Each sequence's beam score.
    pub scores: Vec<f32>,
    /// Each step's logits (greedy, when asked).
    pub step_logits: Vec<Vec<f32>>,
}

/// The most beams and new tokens a model's own generation config may ask for (the
/// appliance's `caption.beams` and `caption.max_new_tokens` have the same bounds).
pub const MAX_BEAMS: usize = 8;
/// Most new tokens (see `MAX_BEAMS`).
pub const MAX_NEW_TOKENS: usize = 1024;

impl GenerationConfig {
    /// Every token id inside the vocabulary, beams and length within bounds: a
    /// generation config that would index out of range or run for minutes is
    /// refused when the model loads, not at its first caption.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        let ids = [
            ("decoder_start_token_id", Some(self.decoder_start_token_id)),
            ("eos_token_id", Some(self.eos_token_id)),
            ("pad_token_id", Some(self.pad_token_id)),
            ("forced_bos_token_id", self.forced_bos_token_id),
            ("forced_eos_token_id", self.forced_eos_token_id),
        ];
        for (name, id) in ids {
            if let Some(id) = id
                && id as usize >= vocab
            {
                return Err(format!("{name} {id} is outside the vocabulary of {vocab}"));
            }
        }
        if !(1..=MAX_BEAMS).contains(&self.num_beams) {
            return Err(format!(
                "num_beams {} is outside 1..={MAX_BEAMS}",
                self.num_beams
            ));
        }
        if !(1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens) {
            return Err(format!(
                "max_new_tokens {} is outside 1..={MAX_NEW_TOKENS}",
                self.max_new_tokens
            ));
        }
        if self.no_repeat_ngram_size > MAX_NEW_TOKENS || !self.length_penalty.is_finite() {
            return Err("no_repeat_ngram_size or length_penalty out of range".into());
        }
        Ok(())
    }

    /// Masks what the processors forbid, in transformers' order. `seq` is the decoder
    /// sequence so far; `max_length` counts the start token.
    fn process(&self, scores: &mut [f32], seq: &[u32], max_length: usize) {
        let cur = seq.len();
        let n = self.no_repeat_ngram_size;
        if n > 0 && cur + 1 >= n {
            let prefix = &seq[cur + 1 - n..];
            for start in 0..(cur + 1).saturating_sub(n) {
                if &seq[start..start + n - 1] == prefix {
                    scores[seq[start + n - 1] as usize] = f32::NEG_INFINITY;
                }
            }
        }
        let force = |scores: &mut [f32], token: u32| {
            scores.fill(f32::NEG_INFINITY);
            scores[token as usize] = 0.0;
        };
        if cur == 1
            && let Some(bos) = self.forced_bos_token_id
        {
            force(scores, bos);
        }
        if cur + 1 == max_length
            && let Some(eos) = self.forced_eos_token_id
        {
            force(scores, eos);
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn log_softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = v.iter().map(|&x| (x - max).exp()).sum();
    let log = max + sum.ln();
    v.iter_mut().for_each(|x| *x -= log);
}

/// One decoder step for the last token of every sequence: `[rows, vocab]` logits.
fn step(
    model: &Florence2,
    seqs: &[Vec<u32>],
    cache: &mut super::bart::DecoderCache,
    device: &Device,
) -> (Vec<f32>, usize) {
    let last: Vec<i64> = seqs
        .iter()
        .map(|s| *s.last().unwrap_or(&0) as i64)
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(last, [seqs.len(), 1]), device);
    let logits = model.decode_logits(ids, cache);
    let [_, _, vocab] = logits.dims();
    let data = logits
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default();
    (data, vocab)
}

/// Decodes every row of an encoded batch (`[B, S, d]`, mask `[B, S]`).
pub fn generate(
    model: &Florence2,
    encoded: Tensor<3>,
    mask: Tensor<2>,
    config: &GenerationConfig,
    record_logits: bool,
) -> Generated {
    // The decoder's position table bounds the output length.
    let max_new = config
        .max_new_tokens
        .min(model.max_positions().saturating_sub(1))
        .max(1);
    if config.num_beams <= 1 {
        greedy(model, encoded, mask, config, max_new + 1, record_logits)
    } else {
        beam(model, encoded, mask, config, max_new + 1)
    }
}

fn greedy(
    model: &Florence2,
    encoded: Tensor<3>,
    mask: Tensor<2>,
    c: &GenerationConfig,
    max_length: usize,
    record: bool,
) -> Generated {
    let [b, _, _] = encoded.dims();
    let device = encoded.device();
    let mut cache = model.start(encoded, mask);
    let mut seqs = vec![vec![c.decoder_start_token_id]; b];
    let mut finished = vec![false; b];
    let mut out = Generated {
        scores: vec![0.0; b],
        ..Default::default()
    };
    while seqs[0].len() < max_length && !finished.iter().all(|&f| f) {
        let (logits, vocab) = step(model, &seqs, &mut cache, &device);
        if record {
            out.step_logits.push(logits.clone());
        }
        for (i, row) in logits.chunks(vocab).enumerate() {
            let mut scores = row.to_vec();
            c.process(&mut scores, &seqs[i], max_length);
            let token = if finished[i] {
                c.pad_token_id
            } else {
                argmax(&scores) as u32
            };
            finished[i] |= token == c.eos_token_id;
            seqs[i].push(token);
        }
    }
    out.ids = seqs;
    out
}

/// The finished hypotheses of one input, as transformers' `BeamHypotheses`.
struct Hypotheses {
    beams: Vec<(f32, Vec<u32>)>,
    worst: f32,
    size: usize,
    length_penalty: f32,
    early_stopping: bool,
}

impl Hypotheses {
    fn add(&mut self, seq: Vec<u32>, sum_logprobs: f32, generated_len: usize) {
        let score = sum_logprobs / (generated_len as f32).powf(self.length_penalty);
        if self.beams.len() < self.size || score > self.worst {
            self.beams.push((score, seq));
            if self.beams.len() > self.size {
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&a, &b| self.beams[a].0.total_cmp(&self.beams[b].0));
                self.worst = self.beams[order[1]].0;
                self.beams.remove(order[0]);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    fn is_done(&self, best_sum_logprobs: f32, generated_len: usize) -> bool {
        if self.beams.len() < self.size {
            return false;
        }
        if self.early_stopping {
            return true;
        }
        self.worst >= best_sum_logprobs / (generated_len as f32).powf(self.length_penalty)
    }

    fn best(&self) -> Option<&(f32, Vec<u32>)> {
        // Of equal scores transformers keeps the last added.
        self.beams.iter().max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

fn beam(
    model: &Florence2,
    encoded: Tensor<3>,
    mask: Tensor<2>,
    c: &GenerationConfig,
    max_length: usize,
) -> Generated {
    let nb = c.num_beams;
    let [b, _, _] = encoded.dims();
    let device = encoded.device();
    let expand: Vec<i64> = (0..b as i64)
        .flat_map(|i| std::iter::repeat_n(i, nb))
        .collect();
    let expand = Tensor::<1, Int>::from_data(TensorData::new(expand, [b * nb]), &device);
    let mut cache = model.start(encoded.select(0, expand.clone()), mask.select(0, expand));
    let mut seqs = vec![vec![c.decoder_start_token_id]; b * nb];
    // Only the first beam is live at the start, so the first step does not pick the same
    // token nb times.
    let mut beam_scores: Vec<f32> = (0..b * nb)
        .map(|r| if r % nb == 0 { 0.0 } else { -1e9 })
        .collect();
    let mut hyps: Vec<Hypotheses> = (0..b)
        .map(|_| Hypotheses {
            beams: Vec::new(),
            worst: 1e9,
            size: nb,
            length_penalty: c.length_penalty,
            early_stopping: c.early_stopping,
        })
        .collect();
    let mut done = vec![false; b];
    while seqs[0].len() < max_length {
        let cur = seqs[0].len();
        let (mut logits, vocab) = step(model, &seqs, &mut cache, &device);
        for (r, row) in logits.chunks_mut(vocab).enumerate() {
            log_softmax(row);
            c.process(row, &seqs[r], max_length);
            row.iter_mut().for_each(|x| *x += beam_scores[r]);
        }
        let mut next: Vec<(f32, u32, usize)> = Vec::with_capacity(b * nb);
        for i in 0..b {
            if done[i] {
                next.extend(std::iter::repeat_n((0.0, c.pad_token_id, i * nb), nb));
                continue;
            }
            let flat = &logits[i * nb * vocab..(i + 1) * nb * vocab];
            let top = top_k(flat, 2 * nb);
            let mut chosen = 0;
            for (rank, &(score, idx)) in top.iter().enumerate() {
                let (beam, token) = (idx / vocab, (idx % vocab) as u32);
                let row = i * nb + beam;
                if token == c.eos_token_id {
                    if rank >= nb {
                        continue;
                    }
                    hyps[i].add(seqs[row].clone(), score, cur);
                } else {
                    next.push((score, token, row));
                    chosen += 1;
                }
                if chosen == nb {
                    break;
                }
            }
            // Fewer than nb live candidates only happens when everything left is -inf.
            while chosen < nb {
                next.push((f32::NEG_INFINITY, c.pad_token_id, i * nb));
                chosen += 1;
            }
            let best = top.first().map(|t| t.0).unwrap_or(f32::NEG_INFINITY);
            done[i] = done[i] || hyps[i].is_done(best, cur);
        }
        seqs = next
            .iter()
            .map(|&(_, token, row)| {
                let mut s = seqs[row].clone();
                s.push(token);
                s
            })
            .collect();
        beam_scores = next.iter().map(|n| n.0).collect();
        let rows: Vec<i64> = next.iter().map(|n| n.2 as i64).collect();
        cache = cache.select(Tensor::from_data(TensorData::new(rows, [b * nb]), &device));
        if done.iter().all(|&d| d) {
            break;
        }
    }
    let mut out = Generated::default();
    for (i, h) in hyps.iter_mut().enumerate() {
        if !done[i] {
            for j in 0..nb {
                let seq = seqs[i * nb + j].clone();
                let len = seq.len() - 1;
                h.add(seq, beam_scores[i * nb + j], len);
            }
        }
        let (score, mut seq) = h
            .best()
            .cloned()
            .unwrap_or((f32::NEG_INFINITY, seqs[i * nb].clone()));
        if seq.len() < max_length {
            seq.push(c.eos_token_id);
        }
        out.ids.push(seq);
        out.scores.push(score);
    }
    out
}

/// The `k` largest values with their indices, largest first; ties keep the lower index.
fn top_k(v: &[f32], k: usize) -> Vec<(f32, usize)> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let k = k.min(v.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        v[b].total_cmp(&v[a]).then(a.cmp(&b))
    });
    let mut top: Vec<(f32, usize)> = idx[..k].iter().map(|&i| (v[i], i)).collect();
    top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    top
}
