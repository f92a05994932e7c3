//! Training and evaluation on a manifest: the feature cache, the networks, the
//! logistic-regression peers, the recipe behind the shipped model, and metrics.
//! Features come from `infer`'s towers, so training and inference compute them the
//! same way.

pub mod captions;
pub mod eval;
pub mod fusion;
pub mod manifest;
pub mod metrics;
pub mod peers;
pub mod recipe;
pub mod report;
pub mod split;
pub mod tokens;
