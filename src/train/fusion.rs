//! Trains early-fusion networks on cached token features with burn autodiff on the
//! CPU, and scores them. Deterministic for a seed: batch order and modality dropout
//! come from a seeded stream, burn's initialisation from the seeded device.

use super::metrics::{decide_all, report, tune_thresholds};
use super::tokens::{STUDENT_INPUT, TEACHER_INPUT, TokenSet, grid, grid_tokens};
use crate::infer::batch::{FusionRow, TEXT_DIM, batch};
use crate::nn::bert::BertLayer;
use crate::nn::efficientnet::{FEATURE_DIM, Tail};
use crate::nn::fusion::{EarlyFusion, FusionConfig, FusionInput, TunedFusion};
use crate::util::progress::{Stage, note};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use half::f16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Which cached features a network reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// 224x336 maps (or their mirror image), MiniLM after 6 layers.
    Teacher,
    /// 160x240 maps, MiniLM after 3 layers.
    Student,
}

/// Which view of the poster a batch uses (the teacher averages both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The poster as given.
    Plain,
    /// Its mirror image.
    Flipped,
}

/// How every network of a run is trained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FusionOptions {
    /// Most epochs (early stopping usually ends sooner).
    pub epochs: usize,
    /// Rows per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW's weight decay.
    pub weight_decay: f32,
    /// Seed of the weights and the shuffles.
    pub seed: u64,
    /// Epochs without a better tune macro-F1 before stopping.
    pub patience: usize,
    /// Share of text rows whose text is hidden in a step (the kiosk case).
    pub text_dropout: f64,
    /// Share of text rows whose poster is hidden in a step (keeps the text path strong).
    pub image_dropout: f64,
    /// How the learning rate moves over the steps.
    pub schedule: Schedule,
    /// How positives of each genre weigh in the loss.
    pub positives: PositiveWeight,
    /// Learning rate of tuned pretrained (MiniLM) layers, as a share of `lr`: they
    /// start trained, so they move slower than the new layers.
    pub pretrained_lr_share: f64,
    /// The loss on each genre's logit.
    pub loss: Loss,
    /// Train half the batches on the mirror-image poster maps (networks that read
    /// the teacher's 224x336 maps; the student's maps have no mirror image cached).
    pub augment_flip: bool,
}

/// The loss on a genre's logit `z` against a soft target `t`, before the positives'
/// weight. With `p = sigmoid(z)`, each is `w t a(p) (-log p) + (1 - t) b(p) (-log(1 - q))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// Binary cross-entropy: `a = b = 1`, `q = p`.
    Bce,
    /// Asymmetric loss (Ridnik et al., 2021): `a = 1`, `b = q^4` with `q = max(p - 0.05, 0)`:
    /// the many easy negatives of a rare genre stop drowning its few positives.
    Asymmetric,
    /// Focal loss (Lin et al., 2017): `a = (1 - p)^2`, `b = p^2`, `q = p`.
    Focal,
}

impl Loss {
    /// Mean loss over `[rows, classes]` logits against soft targets in [0, 1], the
    /// positives of genre `j` weighted by `pos_weight[j]`.
    fn mean(self, logits: Tensor<2>, targets: Tensor<2>, pos_weight: Tensor<1>) -> Tensor<1> {
        match self {
            Loss::Bce => soft_bce(logits, targets, pos_weight),
            Loss::Asymmetric => {
                let w = pos_weight.unsqueeze::<2>();
                let pos = softplus(logits.clone().neg());
                let q = sigmoid(logits).sub_scalar(ASL_MARGIN).clamp_min(0.0);
                let neg = q.clone().powi_scalar(4) * q.neg().add_scalar(1.0).log().neg();
                (pos * targets.clone() * w + neg * targets.neg().add_scalar(1.0)).mean()
            }
            Loss::Focal => {
                let w = pos_weight.unsqueeze::<2>();
                let p = sigmoid(logits.clone());
                let pos =
                    softplus(logits.clone().neg()) * p.clone().neg().add_scalar(1.0).powi_scalar(2);
                let neg = softplus(logits) * p.powi_scalar(2);
                (pos * targets.clone() * w + neg * targets.neg().add_scalar(1.0)).mean()
            }
        }
    }
}

/// Probability below which the asymmetric loss ignores a negative.
const ASL_MARGIN: f32 = 0.05;

/// `log(1 + e^z)`, stable for large `|z|`.
fn softplus(z: Tensor<2>) -> Tensor<2> {
    relu(z.clone()) + z.abs().neg().exp().log1p()
}

/// Learning-rate schedule over a run of `epochs` (early stopping may end it sooner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate throughout.
    Constant,
    /// A linear warm-up over the first epoch, then a cosine decay to a tenth.
    WarmupCosine,
}

impl Schedule {
    /// The rate at `step` of `total`, with `warmup` steps of warm-up.
    pub fn rate(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::WarmupCosine if step < warmup => base * (step + 1) as f64 / warmup as f64,
            Schedule::WarmupCosine => {
                let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
            }
        }
    }
}

/// Weight of a genre's positive targets in the loss (negatives weigh 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PositiveWeight {
    /// Plain binary cross-entropy.
    One,
    /// sqrt(negatives / positives) of the genre in the fit targets, within 1..=10:
    /// rare genres (Western, War, History) are not drowned by the frequent ones.
    SqrtRatio,
}

impl PositiveWeight {
    /// Per-genre weights from row-major `[n, k]` targets (soft targets count as mass).
    pub fn weights(self, targets: &[f32], k: usize) -> Vec<f32> {
        let n = targets.len() / k.max(1);
        (0..k)
            .map(|j| match self {
                PositiveWeight::One => 1.0,
                PositiveWeight::SqrtRatio => {
                    let pos: f32 = (0..n).map(|r| targets[r * k + j]).sum();
                    ((n as f32 - pos) / pos.max(1.0)).sqrt().clamp(1.0, 10.0)
                }
            })
            .collect()
    }
}

impl Default for FusionOptions {
    fn default() -> Self {
        Self {
            epochs: 8,
            batch: 64,
            lr: 1e-3,
            weight_decay: 0.05,
            seed: 42,
            patience: 3,
            text_dropout: 0.3,
            image_dropout: 0.1,
            schedule: Schedule::WarmupCosine,
            positives: PositiveWeight::SqrtRatio,
            pretrained_lr_share: 0.05,
            loss: Loss::Bce,
            augment_flip: false,
        }
    }
}

/// The shape of a network of `role` that reads the poster, the text or both.
pub fn config(role: Role, use_image: bool, use_text: bool, classes: usize) -> FusionConfig {
    // The teacher pools its 11x7 map to 6x4 tokens, which keeps CPU training affordable;
    // the student's 8x5 map is small enough to read whole.
    let (input, pool) = match role {
        Role::Teacher => (TEACHER_INPUT, true),
        Role::Student => (STUDENT_INPUT, false),
    };
    FusionConfig {
        image_dim: FEATURE_DIM,
        image_grid: grid(input),
        pool,
        text_dim: TEXT_DIM,
        use_image,
        use_text,
        d_model: 128,
        heads: 4,
        layers: 2,
        d_ff: 256,
        classes,
        dropout: 0.1,
    }
}

/// Rows of one batch, with what to hide in each.
struct BatchSpec<'a> {
    idx: &'a [usize],
    hide_text: Vec<bool>,
    hide_image: Vec<bool>,
}

/// The cached input of `net`'s image tail for the rows of `b`, if it has a tail.
fn tail_input(
    set: &TokenSet,
    view: View,
    net: &TunedFusion,
    b: &BatchSpec,
    device: &Device,
) -> Option<Tensor<4>> {
    net.tail.as_ref()?;
    let src = match view {
        View::Plain => &set.tail_in,
        View::Flipped => &set.tail_flip,
    };
    let [c, h, w] = set.tail_dims;
    let len = c * h * w;
    assert!(
        src.len() == set.n * len,
        "the tail's {view:?} inputs are not in the feature set"
    );
    let data: Vec<f32> = b
        .idx
        .iter()
        .flat_map(|&i| src[i * len..(i + 1) * len].iter().map(|v| v.to_f32()))
        .collect();
    Some(Tensor::<4>::from_data(
        TensorData::new(data, [b.idx.len(), c, h, w]),
        device,
    ))
}

/// A batch as `net` reads it, and the input of its image tail if it has one: a
/// network that tunes MiniLM's top layers reads the hidden states below them.
fn build(
    set: &TokenSet,
    role: Role,
    view: View,
    net: &TunedFusion,
    b: &BatchSpec,
    device: &Device,
) -> (FusionInput, Option<Tensor<4>>) {
    let (map, cells, text) = match (role, view) {
        (Role::Teacher, View::Plain) => {
            (&set.teacher_map, grid_tokens(TEACHER_INPUT), &set.text_l6)
        }
        (Role::Teacher, View::Flipped) => (&set.flip_map, grid_tokens(TEACHER_INPUT), &set.text_l6),
        (Role::Student, View::Plain) => {
            (&set.student_map, grid_tokens(STUDENT_INPUT), &set.text_l3)
        }
        (Role::Student, View::Flipped) => {
            assert!(
                set.student_flip_map.len() == set.student_map.len(),
                "the student's mirror-image maps are not in the feature set"
            );
            (
                &set.student_flip_map,
                grid_tokens(STUDENT_INPUT),
                &set.text_l3,
            )
        }
    };
    let text = if net.top.is_empty() {
        text
    } else {
        &set.text_below
    };
    let cell_len = cells * FEATURE_DIM;
    let rows: Vec<FusionRow<'_, f16>> = b
        .idx
        .iter()
        .enumerate()
        .map(|(k, &i)| FusionRow {
            image: &map[i * cell_len..(i + 1) * cell_len],
            hide_image: b.hide_image[k],
            text: if b.hide_text[k] {
                &[]
            } else {
                &text[set.text_off[i] * TEXT_DIM..set.text_off[i + 1] * TEXT_DIM]
            },
        })
        .collect();
    let tail = match role {
        Role::Teacher => tail_input(set, view, net, b, device),
        Role::Student => {
            assert!(
                net.tail.is_none(),
                "tail inputs are cached at the teacher's input only"
            );
            None
        }
    };
    (batch(&rows, cells, device), tail)
}

/// Binary cross-entropy on logits against soft targets in [0, 1], positives of genre
/// `j` weighted by `pos_weight[j]`, mean over all:
/// `w t softplus(-z) + (1 - t) softplus(z)`, with `softplus(±z) = relu(±z) + log1p(e^-|z|)`.
fn soft_bce(logits: Tensor<2>, targets: Tensor<2>, pos_weight: Tensor<1>) -> Tensor<1> {
    // One shared tail (not `softplus` twice): the shipped model's gradients, bit for bit.
    let tail = logits.clone().abs().neg().exp().log1p();
    let pos = relu(logits.clone().neg()) + tail.clone();
    let neg = relu(logits) + tail;
    let w = pos_weight.unsqueeze::<2>();
    (pos * targets.clone() * w + neg * targets.neg().add_scalar(1.0)).mean()
}

/// What `score` reads: rows of a token set, as one role sees them, in one view.
#[derive(Clone, Copy)]
pub struct Scoring<'a> {
    /// The cached features the rows index.
    pub set: &'a TokenSet,
    /// The rows scored, in the order of the scores.
    pub rows: &'a [usize],
    /// Which maps and text states the network reads.
    pub role: Role,
    /// The poster as given or its mirror image.
    pub view: View,
    /// Hide every row's overview (the kiosk case).
    pub text_less: bool,
}

/// Sigmoid scores `[rows, classes]` of `s.rows`, in that order.
pub fn score(model: &TunedFusion, c: &FusionConfig, s: &Scoring, device: &Device) -> Vec<f32> {
    let Scoring {
        set,
        rows,
        role,
        view,
        text_less,
    } = *s;
    let mut out = Vec::with_capacity(rows.len() * c.classes);
    // Similar text lengths together, so a batch pads little; results go back in order.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&k| set.text_len(rows[k]));
    let mut scores = vec![0f32; rows.len() * c.classes];
    for chunk in order.chunks(64) {
        let idx: Vec<usize> = chunk.iter().map(|&k| rows[k]).collect();
        let spec = BatchSpec {
            hide_text: vec![text_less || !c.use_text; idx.len()],
            hide_image: vec![!c.use_image; idx.len()],
            idx: &idx,
        };
        let (x, tail_in) = build(set, role, view, model, &spec, device);
        let p = sigmoid(model.forward_tail(x, tail_in))
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 scores");
        for (j, &k) in chunk.iter().enumerate() {
            scores[k * c.classes..(k + 1) * c.classes]
                .copy_from_slice(&p[j * c.classes..(j + 1) * c.classes]);
        }
    }
    out.extend(scores);
    out
}

/// A trained network and how it got there.
pub struct Trained {
    /// The network at its best epoch.
    pub model: TunedFusion,
    /// Its thresholds, tuned on the tune rows.
    pub thresholds: Vec<f32>,
    /// The epoch with the best tune macro-F1.
    pub best_epoch: usize,
    /// That macro-F1.
    pub tune_macro_f1: f64,
    /// Wall time of its training.
    pub seconds: f64,
}

/// One epoch's batches of positions in `fit`. Rows of similar text length share a
/// batch (poster-only rows have none), so little is spent on padding; the batches
/// themselves go in random order.
fn epoch_batches(
    order: &mut [usize],
    set: &TokenSet,
    fit: &[usize],
    batch: usize,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    order.shuffle(rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch * 16) {
        let mut w = window.to_vec();
        w.sort_by_key(|&j| set.text_len(fit[j]));
        batches.extend(w.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// Held-out rows that pick the epoch and the thresholds, with their labels.
#[derive(Clone, Copy)]
pub struct TuneRows<'a> {
    /// The cached features the rows index.
    pub set: &'a TokenSet,
    /// The rows scored after each epoch.
    pub rows: &'a [usize],
    /// Their multi-hot labels, row-major `[rows.len(), classes]`.
    pub truth: &'a [u8],
}

/// One network to train: what it is, what it reads and what it learns.
pub struct Job<'a> {
    /// Its shape.
    pub config: &'a FusionConfig,
    /// Pretrained MiniLM layers to tune inside it (none: the text features stay frozen).
    pub top: Vec<BertLayer>,
    /// EfficientNet's last blocks and head to tune inside it (none: the poster maps
    /// stay frozen).
    pub tail: Option<Tail>,
    /// Which cached features it reads.
    pub role: Role,
    /// The training features.
    pub set: &'a TokenSet,
    /// The rows of `set` it trains on.
    pub fit: &'a [usize],
    /// Targets `[fit.len(), classes]`, hard or soft.
    pub targets: &'a [f32],
    /// Where the epoch and the thresholds are chosen.
    pub tune: TuneRows<'a>,
    /// The genre names.
    pub labels: &'a [String],
    /// The optimiser and schedule.
    pub opts: &'a FusionOptions,
    /// Its name in progress lines.
    pub name: &'a str,
}

/// Trains one network on `job.fit` rows against `job.targets`, picking the epoch and
/// thresholds on the tune rows.
pub fn train(job: Job, device: &Device) -> Trained {
    let Job {
        config: c,
        top,
        tail,
        role,
        set,
        fit,
        targets,
        tune,
        labels,
        opts,
        name,
    } = job;
    let start = std::time::Instant::now();
    let k = c.classes;
    device.seed(opts.seed);
    let ad = device.clone().autodiff();
    let mut model = TunedFusion {
        top: top.fork(&ad).train(),
        tail: tail.map(|t| t.fork(&ad).train()),
        fusion: EarlyFusion::new(c, &ad),
    };
    let adamw = AdamWConfig::new().with_weight_decay(opts.weight_decay);
    let (mut optim, mut optim_top) = (adamw.init(), adamw.init());
    let mut optim_tail = adamw.init();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..fit.len()).collect();
    let steps = fit.len().div_ceil(opts.batch);
    let pb = Stage::start(name, (opts.epochs * steps) as u64);
    let pos_weight = Tensor::<1>::from_data(
        TensorData::new(opts.positives.weights(targets, k), [k]),
        &ad,
    );
    // A text-only network has no poster to mirror, and keeps its random stream.
    let flip = opts.augment_flip && role == Role::Teacher && c.use_image;
    assert!(
        !flip || set.flip_map.len() == set.teacher_map.len(),
        "flip augmentation needs the fit rows' mirror-image maps"
    );
    let mut step = 0;
    let mut best: Option<Trained> = None;
    let mut since_best = 0;
    for epoch in 1..=opts.epochs {
        for chunk in &epoch_batches(&mut order, set, fit, opts.batch, &mut rng) {
            let idx: Vec<usize> = chunk.iter().map(|&j| fit[j]).collect();
            let mut hide_text = Vec::with_capacity(idx.len());
            let mut hide_image = Vec::with_capacity(idx.len());
            for &i in &idx {
                let has_text = c.use_text && set.text_len(i) > 0;
                let drop_text = has_text && c.use_image && rng.random_bool(opts.text_dropout);
                let drop_image = has_text && !drop_text && rng.random_bool(opts.image_dropout);
                hide_text.push(!has_text || drop_text);
                hide_image.push(!c.use_image || drop_image);
            }
            let spec = BatchSpec {
                idx: &idx,
                hide_text,
                hide_image,
            };
            let y: Vec<f32> = chunk
                .iter()
                .flat_map(|&j| targets[j * k..(j + 1) * k].iter().copied())
                .collect();
            let y = Tensor::<2>::from_data(TensorData::new(y, [idx.len(), k]), &ad);
            // Drawn only when asked for, so that runs without it keep their stream.
            let view = match flip && rng.random_bool(0.5) {
                true => View::Flipped,
                false => View::Plain,
            };
            let (x, tail_in) = build(set, role, view, &model, &spec, &ad);
            let logits = model.forward_tail(x, tail_in);
            let loss = opts.loss.mean(logits, y, pos_weight.clone());
            let mut grads = loss.backward();
            let lr = opts
                .schedule
                .rate(opts.lr, step, steps, opts.epochs * steps);
            if !model.top.is_empty() {
                let g = GradientsParams::from_module(&mut grads, &model.top);
                model.top = optim_top.step(lr * opts.pretrained_lr_share, model.top, g);
            }
            if let Some(tail) = model.tail.take() {
                let g = GradientsParams::from_module(&mut grads, &tail);
                model.tail = Some(optim_tail.step(lr * opts.pretrained_lr_share, tail, g));
            }
            let g = GradientsParams::from_module(&mut grads, &model.fusion);
            model.fusion = optim.step(lr, model.fusion, g);
            step += 1;
            pb.inc(1);
        }
        // Model selection on held-out training films, never on the reported split.
        let valid = model.valid();
        let scoring = Scoring {
            set: tune.set,
            rows: tune.rows,
            role,
            view: View::Plain,
            text_less: false,
        };
        let scores = score(&valid, c, &scoring, device);
        let thresholds = tune_thresholds(&scores, tune.truth, k);
        let macro_f1 = report(&decide_all(&scores, &thresholds), tune.truth, labels).macro_f1;
        note(&format!(
            "{name}: epoch {epoch}, tune macro-F1 {macro_f1:.4}"
        ));
        if best.as_ref().is_none_or(|b| macro_f1 > b.tune_macro_f1) {
            best = Some(Trained {
                model: valid,
                thresholds,
                best_epoch: epoch,
                tune_macro_f1: macro_f1,
                seconds: 0.0,
            });
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= opts.patience {
                break;
            }
        }
    }
    drop(pb);
    let mut best = best.expect("at least one epoch");
    best.seconds = start.elapsed().as_secs_f64();
    note(&format!(
        "{name}: best epoch {} of {}, tune macro-F1 {:.4}, {:.0} s",
        best.best_epoch, opts.epochs, best.tune_macro_f1, best.seconds
    ));
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::batch::{FusionRow, batch};

    #[test]
    fn weighted_bce_is_plain_bce_at_weight_one_and_scales_the_positive_term() {
        let dev = Device::flex();
        let z = [2.0f32, -1.0, 0.5, -3.0];
        let t = [1.0f32, 0.0, 0.3, 1.0];
        let loss = |w: [f32; 2]| {
            soft_bce(
                Tensor::<2>::from_data(TensorData::new(z.to_vec(), [2, 2]), &dev),
                Tensor::<2>::from_data(TensorData::new(t.to_vec(), [2, 2]), &dev),
                Tensor::<1>::from_data(TensorData::new(w.to_vec(), [2]), &dev),
            )
            .into_scalar::<f32>()
        };
        let sp = |x: f32| (1.0 + x.exp()).ln();
        let term = |i: usize, w: f32| w * t[i] * sp(-z[i]) + (1.0 - t[i]) * sp(z[i]);
        let want = |w: [f32; 2]| (0..4).map(|i| term(i, w[i % 2])).sum::<f32>() / 4.0;
        for w in [[1.0, 1.0], [3.0, 1.5]] {
            assert!(
                (loss(w) - want(w)).abs() < 1e-5,
                "{} vs {}",
                loss(w),
                want(w)
            );
        }
    }

    #[test]
    fn asymmetric_and_focal_losses_follow_their_formulas() {
        let dev = Device::flex();
        let z = [2.0f32, -1.0, 0.5, -3.0, -2.9];
        let t = [1.0f32, 0.0, 0.3, 0.0, 1.0];
        let w = [2.0f32];
        let loss = |l: Loss| {
            l.mean(
                Tensor::<2>::from_data(TensorData::new(z.to_vec(), [5, 1]), &dev),
                Tensor::<2>::from_data(TensorData::new(t.to_vec(), [5, 1]), &dev),
                Tensor::<1>::from_data(TensorData::new(w.to_vec(), [1]), &dev),
            )
            .into_scalar::<f32>()
        };
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let asl = |i: usize| {
            let (p, q) = (sig(z[i]), (sig(z[i]) - 0.05).max(0.0));
            w[0] * t[i] * -p.ln() + (1.0 - t[i]) * q.powi(4) * -(1.0 - q).ln()
        };
        let focal = |i: usize| {
            let p = sig(z[i]);
            w[0] * t[i] * (1.0 - p).powi(2) * -p.ln() + (1.0 - t[i]) * p.powi(2) * -(1.0 - p).ln()
        };
        for (l, f) in [
            (Loss::Asymmetric, &asl as &dyn Fn(usize) -> f32),
            (Loss::Focal, &focal),
        ] {
            let want = (0..5).map(f).sum::<f32>() / 5.0;
            assert!(
                (loss(l) - want).abs() < 1e-5,
                "{l:?}: {} vs {want}",
                loss(l)
            );
        }
        // Below the margin a negative costs nothing under the asymmetric loss: z = -3
        // (p = 0.047) with target 0 adds only its zero term.
        assert!(asl(3) == 0.0);
        assert!(loss(Loss::Bce) > loss(Loss::Focal));
    }

    #[test]
    fn rare_genres_weigh_more_and_the_schedule_warms_up_then_decays() {
        // Genre 0 positive in 1 of 10 rows, genre 1 in 5 of 10.
        let t: Vec<f32> = (0..10)
            .flat_map(|r| [f32::from(r == 0), f32::from(r < 5)])
            .collect();
        let w = PositiveWeight::SqrtRatio.weights(&t, 2);
        assert!((w[0] - 3.0).abs() < 1e-6 && w[1] == 1.0, "{w:?}");
        assert_eq!(PositiveWeight::One.weights(&t, 2), [1.0, 1.0]);
        let s = Schedule::WarmupCosine;
        assert!((s.rate(1.0, 0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((s.rate(1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((s.rate(1.0, 100, 10, 100) - 0.1).abs() < 1e-12);
        assert!(s.rate(1.0, 40, 10, 100) > s.rate(1.0, 70, 10, 100));
        assert_eq!(Schedule::Constant.rate(0.5, 3, 10, 100), 0.5);
    }

    fn data(t: Tensor<3>) -> Vec<f32> {
        t.into_data().try_to_vec().unwrap()
    }

    /// A row as training reads it from the feature cache, and the same row as the
    /// classifier serves it, give identical tensors.
    #[test]
    fn a_training_row_is_the_row_that_is_served() {
        let dev = Device::flex();
        let cells = grid_tokens(STUDENT_INPUT);
        let value = |i: usize| f16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0);
        // Two rows: 3 and 5 text tokens; the second is the one compared.
        let n_text = [3, 5];
        let set = TokenSet {
            n: 2,
            student_map: (0..2 * cells * FEATURE_DIM).map(value).collect(),
            text_off: vec![0, 3, 8],
            text_l3: (0..8 * TEXT_DIM).map(|i| value(i + 7)).collect(),
            ..Default::default()
        };
        let served_image: Vec<f32> = set.student_map[cells * FEATURE_DIM..]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let served_text: Vec<f32> = set.text_l3[3 * TEXT_DIM..]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        assert_eq!(served_text.len(), n_text[1] * TEXT_DIM);
        for hide_text in [false, true] {
            let spec = BatchSpec {
                idx: &[1],
                hide_text: vec![hide_text],
                hide_image: vec![false],
            };
            let net = TunedFusion {
                top: Vec::new(),
                tail: None,
                fusion: EarlyFusion::new(&config(Role::Student, true, true, 18), &dev),
            };
            let (trained, _) = build(&set, Role::Student, View::Plain, &net, &spec, &dev);
            let text: &[f32] = if hide_text { &[] } else { &served_text };
            let served = batch(
                &[FusionRow {
                    image: &served_image[..],
                    hide_image: false,
                    text,
                }],
                cells,
                &dev,
            );
            assert_eq!(data(trained.image), data(served.image));
            assert_eq!(data(trained.text), data(served.text));
            let mask = |t: Tensor<2, Bool>| t.into_data().try_to_vec::<bool>().unwrap();
            assert_eq!(mask(trained.text_mask), mask(served.text_mask));
            assert_eq!(mask(trained.image_hidden), mask(served.image_hidden));
        }
    }
}
