//! What a training run is asked to do: its seeds, ensemble sizes, how far it goes
//! and where the student's thresholds are tuned.

use crate::train::fusion::FusionOptions;
use serde::Serialize;
use std::path::PathBuf;

/// The recipe's knobs; `Default` is the recipe behind the shipped model.
#[derive(Debug, Clone, Serialize)]
pub struct RecipeOptions {
    /// The first network's seed (an ensemble's members take `seed`, `seed + 1`, ...).
    pub seed: u64,
    /// Networks in the teacher ensemble.
    pub teacher_members: usize,
    /// MiniLM's top layers that each teacher network tunes inside it (0: the
    /// teacher reads frozen layer-6 states, as every other network does).
    pub teacher_top_layers: usize,
    /// EfficientNet's last blocks that the teacher and the poster-only network tune
    /// with its head, on cached inputs of the first of them (none: frozen maps).
    pub image_tail: Option<usize>,
    /// Networks in the student ensemble (seeds `seed`, `seed + 1`, ...).
    pub student_members: usize,
    /// The student's share of text rows trained without their text: higher than the
    /// other networks' (`fusion.text_dropout`), because the student alone serves the
    /// kiosk, where no overview comes with the poster.
    pub student_text_dropout: f64,
    /// Score a text-less poster (the kiosk case) on the poster and its mirror image,
    /// and tune the text-less thresholds on such scores (the skipped text tower pays
    /// for part of the second view).
    pub kiosk_flip: bool,
    /// Weight of the hard labels in the student's targets (the rest is the teacher's).
    pub hard_weight: f32,
    /// Use only the first N fit rows (smoke tests); 0 = all.
    pub fit_limit: usize,
    /// Every network's optimiser, schedule and dropouts.
    pub fusion: FusionOptions,
    /// How far the recipe goes.
    pub until: Until,
    /// Where the student's thresholds are tuned.
    pub thresholds: Thresholds,
    /// Distil from this trained teacher (an earlier run's `WORK/teacher`) instead of
    /// fitting the peers, the single-modality networks and a teacher.
    pub teacher_from: Option<PathBuf>,
}

/// Where the student's per-genre thresholds are tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Thresholds {
    /// On the tune films alone (981 rows), as every other network's.
    Tune,
    /// On the tune films and on out-of-fold scores of all fit films: one more
    /// student per fold, each trained without the films it scores.
    OutOfFold,
}

/// The last step a run takes (experiments stop early; only `Student` bundles a model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Until {
    /// The logistic-regression peers.
    Peers,
    /// The peers, the single-modality networks and their late fusion.
    Ablations,
    /// Everything: the teacher and the distilled student too.
    Student,
    /// The teacher alone, without the peers and the single-modality networks.
    Teacher,
    /// The single-modality networks alone, without the peers (quick experiments).
    Singles,
}

impl RecipeOptions {
    /// Whether the run trains the single-modality networks: not when it distils from
    /// an earlier teacher, nor when it trains the teacher alone.
    pub fn trains_singles(&self) -> bool {
        self.teacher_from.is_none() && self.until != Until::Teacher
    }

    /// Whether the run fits the logistic-regression peers: as for the singles, and
    /// not when it asks for the singles alone.
    pub fn fits_peers(&self) -> bool {
        self.trains_singles() && self.until != Until::Singles
    }

    /// Whether the run scores the student's text-less rows on the mirror image too
    /// (and so needs the flipped student maps).
    pub fn kiosk_flips(&self) -> bool {
        self.kiosk_flip && self.until == Until::Student
    }
}

impl Default for RecipeOptions {
    fn default() -> Self {
        Self {
            seed: 42,
            teacher_members: 2,
            teacher_top_layers: 2,
            image_tail: None,
            student_members: 2,
            student_text_dropout: 0.5,
            kiosk_flip: true,
            hard_weight: 0.5,
            fit_limit: 0,
            fusion: FusionOptions::default(),
            until: Until::Student,
            thresholds: Thresholds::OutOfFold,
            teacher_from: None,
        }
    }
}
