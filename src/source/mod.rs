//! Where posters come from: the kiosk camera (V4L2, or a replay of recorded
//! frames), and the hot folder. HTTP uploads arrive through the status server.
pub mod camera;
pub mod folder;
pub mod frame;
pub mod trigger;
