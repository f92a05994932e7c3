//! Turning raw inputs (encoded images, text) into the numbers the networks read.
pub mod image;
pub mod resize;
pub mod text;
