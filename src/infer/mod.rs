//! Inference: a decoded poster and its texts in, genre scores and the predicted set
//! out. It joins the pure networks (`nn`) and their weights (`model`) into a
//! `Classifier`, holds the genre labels and the decision rule, the one fusion-input
//! builder that training shares, and the `Captioner` trait. Everything above it
//! (caption, train, the appliance, the binary) goes through here.

pub mod batch;
pub mod captioner;
pub mod classifier;
pub mod labels;
pub mod task;
pub mod timings;

pub use batch::TEXT_DIM;
pub use captioner::Captioner;
pub use classifier::{
    Classifier, GenreScore, Prediction, compose_text, image_input, image_tokens, text_tokens,
    tower_tokens,
};
