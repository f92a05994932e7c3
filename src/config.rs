//! The appliance's TOML config, parsed and validated once at the door into typed
//! structs. Every key has a default; secrets can come from the environment
//! (`MARQUEE_MQTT_PASSWORD`, `MARQUEE_HTTP_TOKEN`) so they stay out of the file.

use crate::backend::Backend;
use crate::caption::stage::{CaptionConfig, Mode};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config problem, named by its key. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {msg}")]
pub struct ConfigError {
    pub path: String,
    pub msg: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names this appliance in MQTT topics and Home Assistant.
    pub device_id: String,
    pub mqtt: MqttConfig,
    pub sources: SourcesConfig,
    pub status: StatusConfig,
    pub classify: ClassifyConfig,
    /// Florence-2 captions: off, on the device, or from a caption server.
    pub caption: CaptionConfig,
    pub pipeline: PipelineConfig,
    /// Folder for the MQTT outbox and other state (systemd's StateDirectory).
    pub state_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_id: "marquee".into(),
            mqtt: MqttConfig::default(),
            sources: SourcesConfig::default(),
            status: StatusConfig::default(),
            classify: ClassifyConfig::default(),
            caption: CaptionConfig::default(),
            pipeline: PipelineConfig::default(),
            state_dir: PathBuf::from("/var/lib/marquee"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub prefix: String,
    pub discovery_prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate; set it to use TLS.
    pub tls_ca: Option<PathBuf>,
    pub keep_alive_s: u64,
    /// Seconds between `stats` messages.
    pub stats_interval_s: u64,
    /// Most results kept in the disk outbox while the broker is away.
    pub outbox_max: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 1883,
            prefix: "marquee".into(),
            discovery_prefix: "homeassistant".into(),
            username: None,
            password: None,
            tls_ca: None,
            keep_alive_s: 30,
            stats_interval_s: 60,
            outbox_max: 10_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    pub folder: Option<FolderConfig>,
    pub camera: Option<CameraConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FolderConfig {
    pub path: PathBuf,
    /// Milliseconds between scans.
    pub poll_ms: u64,
    /// A file is read only once its size and mtime have not changed for this long.
    pub settle_ms: u64,
}

impl Default for FolderConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/marquee/inbox"),
            poll_ms: 500,
            settle_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    pub device: PathBuf,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// `mjpeg` or `yuyv`.
    pub format: String,
    /// Frames a new poster must stay still before it is classified.
    pub steady_frames: u32,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            device: PathBuf::from("/dev/video0"),
            width: 640,
            height: 480,
            fps: 10,
            format: "mjpeg".into(),
            steady_frames: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub enabled: bool,
    pub listen: String,
    /// Bearer token for the mutating endpoints (POST /api/classify).
    pub token: Option<String>,
    /// Largest upload accepted (bytes); larger gets HTTP 413.
    pub max_upload_bytes: usize,
    /// Results kept for /api/history and the page.
    pub history: usize,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            token: None,
            max_upload_bytes: 16 * 1024 * 1024,
            history: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Model directory; empty means the bundled models/.
    pub model: Option<PathBuf>,
    pub backend: Backend,
    /// Cache of converted tower weights; empty means `$MARQUEE_CACHE` or ~/.cache/marquee.
    pub cache: Option<PathBuf>,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            model: None,
            backend: Backend::Flex,
            cache: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Posters waiting for the classifier; a full queue makes sources wait.
    pub queue: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self { queue: 8 }
    }
}

fn err(path: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        msg: msg.into(),
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(&path.display().to_string(), e.to_string()))?;
        let mut cfg = Self::parse(&text)?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = e.message().replace('\n', " ");
            // toml reports the span; name the key by the line it is on.
            let line = e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .unwrap_or(0);
            err(&format!("line {line}"), msg)
        })
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(p) = get("MARQUEE_MQTT_PASSWORD") {
            self.mqtt.password = Some(p);
        }
        if let Some(t) = get("MARQUEE_HTTP_TOKEN") {
            self.status.token = Some(t);
        }
        if let Some(t) = get("MARQUEE_CAPTION_TOKEN") {
            self.caption.remote.token = Some(t);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = !self.device_id.is_empty()
            && self
                .device_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(err(
                "device_id",
                "must be non-empty letters, digits, '-' or '_'",
            ));
        }
        for (key, v) in [
            ("mqtt.prefix", &self.mqtt.prefix),
            ("mqtt.discovery_prefix", &self.mqtt.discovery_prefix),
        ] {
            if v.is_empty() || v.contains(['#', '+']) || v.starts_with('/') || v.ends_with('/') {
                return Err(err(
                    key,
                    "must be a topic prefix without wildcards or edge slashes",
                ));
            }
        }
        if self.mqtt.host.is_empty() {
            return Err(err("mqtt.host", "must not be empty"));
        }
        let c = &self.caption;
        if c.mode == Mode::Local && c.model.is_none() {
            return Err(err(
                "caption.model",
                "a Florence-2 model directory is needed for mode = \"local\"",
            ));
        }
        if c.mode == Mode::Remote
            && !(c.remote.url.starts_with("http://") || c.remote.url.starts_with("https://"))
        {
            return Err(err(
                "caption.remote.url",
                "must be an http:// or https:// URL for mode = \"remote\"",
            ));
        }
        if c.deadline_ms == 0 || c.remote.timeout_ms == 0 {
            return Err(err(
                "caption.deadline_ms",
                "deadline_ms and remote.timeout_ms must be positive",
            ));
        }
        if self.mqtt.port == 0 {
            return Err(err("mqtt.port", "must be 1-65535"));
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err(err("mqtt.keep_alive_s", "must be at least 5"));
        }
        if self.mqtt.password.is_some() && self.mqtt.username.is_none() {
            return Err(err("mqtt.username", "is required when a password is set"));
        }
        if self.status.listen.parse::<SocketAddr>().is_err() {
            return Err(err(
                "status.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    self.status.listen
                ),
            ));
        }
        if self.status.max_upload_bytes == 0 {
            return Err(err("status.max_upload_bytes", "must be positive"));
        }
        if self.pipeline.queue == 0 {
            return Err(err("pipeline.queue", "must be at least 1"));
        }
        if let Some(c) = &self.sources.camera {
            if !matches!(c.format.as_str(), "mjpeg" | "yuyv") {
                return Err(err(
                    "sources.camera.format",
                    "must be \"mjpeg\" or \"yuyv\"",
                ));
            }
            if c.fps == 0 || c.width == 0 || c.height == 0 {
                return Err(err(
                    "sources.camera",
                    "width, height and fps must be positive",
                ));
            }
        }
        if let Some(f) = &self.sources.folder
            && f.poll_ms == 0
        {
            return Err(err("sources.folder.poll_ms", "must be positive"));
        }
        Ok(())
    }

    pub fn stats_interval(&self) -> Duration {
        Duration::from_secs(self.mqtt.stats_interval_s.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
device_id = "kiosk-test"
[mqtt]
host = "127.0.0.1"
port = 1883
prefix = "marquee"
discovery_prefix = "homeassistant"
[sources.folder]
path = "/tmp/inbox"
[status]
listen = "127.0.0.1:8080"
"#;

    #[test]
    fn the_contract_keys_parse() {
        let c = Config::parse(CONTRACT).unwrap();
        c.validate().unwrap();
        assert_eq!(c.device_id, "kiosk-test");
        assert_eq!(c.sources.folder.unwrap().path, PathBuf::from("/tmp/inbox"));
        assert!(c.sources.camera.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::parse("[mqtt]\nport = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = Config::parse("[mqtt]\nhots = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("hots"), "{e}");
        let mut c = Config::parse(CONTRACT).unwrap();
        c.status.listen = "nowhere".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("status.listen")
        );
        c = Config::parse(CONTRACT).unwrap();
        c.device_id = "a/b".into();
        assert!(c.validate().unwrap_err().to_string().contains("device_id"));
    }

    #[test]
    fn the_shipped_example_parses_and_caption_modes_are_checked() {
        let text = include_str!("../systemd/marquee.toml");
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.caption.mode, Mode::Off);
        assert_eq!(c.caption.remote.breaker_failures, 3);
        let mut c = Config::parse(CONTRACT).unwrap();
        c.caption.mode = Mode::Local;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("caption.model")
        );
        c.caption.mode = Mode::Remote;
        c.caption.remote.url = "captions.local".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("caption.remote.url")
        );
        let e = Config::parse("[caption]\nmode = \"sometimes\"\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn env_overrides_secrets() {
        let mut c = Config::parse(CONTRACT).unwrap();
        c.apply_env(|k| (k == "MARQUEE_HTTP_TOKEN").then(|| "s3cret".to_string()));
        assert_eq!(c.status.token.as_deref(), Some("s3cret"));
        assert!(c.mqtt.password.is_none());
    }
}
