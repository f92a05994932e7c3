//! Where results go: the disk outbox and MQTT (with Home Assistant discovery).
pub mod delivery;
pub mod mqtt;
pub mod outbox;
pub mod topics;
