//! Marquee's integration tests, as one test binary: each module was its own binary,
//! and each of those linked burn (with LTO) on its own. One binary costs one link.
//!
//! `cargo test --release` runs them all; `cargo test --release --test it faults::`
//! runs one module.

mod common;

mod appliance;
mod captions;
mod cli;
mod faults;
mod florence;
mod florence_manifest;
mod layers;
mod model;
mod parity;
