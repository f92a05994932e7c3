//! Model directories and weights: where they live, how they are fetched, converted,
//! loaded and saved. The networks themselves are in `nn`.
pub mod bundle;
pub mod cache;
pub mod dir;
pub mod export;
pub mod florence;
pub mod towers;
