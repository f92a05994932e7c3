//! Captioning, the stage between source and classify: Florence-2 on the device
//! (`local`), or a caption server over HTTP (`remote`: Marquee's own or any
//! OpenAI-compatible vision endpoint), and the server Marquee runs for others
//! (`server`). The networks are in `nn::florence`; this folder does the I/O.
//! The `Captioner` trait and the caption types are `infer`'s.

pub mod bench;
pub mod local;
pub mod openai;
pub mod processor;
pub mod remote;
pub mod server;
pub mod stage;
