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
    /// The key, dotted (`mqtt.port`).
    pub path: String,
    /// What is wrong with it.
    pub msg: String,
}

/// The appliance config (`/etc/marquee/marquee.toml`), parsed and checked once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Names this appliance in MQTT topics and Home Assistant.
    pub device_id: DeviceId,
    /// `[mqtt]`: the broker and the topics.
    pub mqtt: MqttConfig,
    /// `[sources]`: the hot folder and the camera.
    pub sources: SourcesConfig,
    /// `[status]`: the status page.
    pub status: StatusConfig,
    /// `[classify]`: the model and the backend.
    pub classify: ClassifyConfig,
    /// Florence-2 captions: off, on the device, or from a caption server.
    pub caption: CaptionConfig,
    /// `[pipeline]`: the classifier queue.
    pub pipeline: PipelineConfig,
    /// Folder for the MQTT outbox and other state (systemd's StateDirectory).
    pub state_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_id: DeviceId("marquee".into()),
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

/// An appliance's name: 1-64 letters, digits, '-' or '_', checked when the config is
/// read, so topics and client ids built from it are always valid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DeviceId(String);

impl TryFrom<String> for DeviceId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(DeviceId(s))
        } else {
            Err("must be 1-64 letters, digits, '-' or '_'".into())
        }
    }
}

impl DeviceId {
    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[mqtt]`: the broker, the credentials, the topics and the outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Publish results over MQTT.
    pub enabled: bool,
    /// Broker host name or address.
    pub host: String,
    /// Broker port (1883, or 8883 with TLS).
    pub port: u16,
    /// Topic prefix of the device's own topics.
    pub prefix: String,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password (or `MARQUEE_MQTT_PASSWORD`).
    pub password: Option<String>,
    /// PEM file of the CA that signed the broker's certificate; set it to use TLS.
    pub tls_ca: Option<PathBuf>,
    /// MQTT keep-alive interval.
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

/// `[sources]`: where posters come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// The hot folder, if any.
    pub folder: Option<FolderConfig>,
    /// The kiosk camera, if any.
    pub camera: Option<CameraConfig>,
}

/// `[sources.folder]`: a folder watched for poster files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FolderConfig {
    /// The inbox; done/ and failed/ go beside the files.
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

/// `[sources.camera]`: a V4L2 camera, or a replay of recorded frames.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// The device node (`/dev/video0`) or `replay:DIR`.
    pub device: PathBuf,
    /// Frame width asked of the camera.
    pub width: u32,
    /// Frame height asked of the camera.
    pub height: u32,
    /// Frames per second asked of the camera.
    pub fps: u32,
    /// Pixel format asked of the camera.
    pub format: CameraFormat,
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
            format: CameraFormat::Mjpeg,
            steady_frames: 8,
        }
    }
}

/// The pixel format asked of a V4L2 camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraFormat {
    /// Motion JPEG.
    Mjpeg,
    /// Packed YUV 4:2:2.
    Yuyv,
}

/// `[status]`: the local status page and upload desk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Serve the status page.
    pub enabled: bool,
    /// Address and port (loopback by default).
    pub listen: SocketAddr,
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
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_upload_bytes: 16 * 1024 * 1024,
            history: 50,
        }
    }
}

/// `[classify]`: the genre model and where it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Model directory; empty means the bundled models/.
    pub model: Option<PathBuf>,
    /// The burn backend.
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

/// `[pipeline]`: between the sources and the classifier.
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

/// Longest path accepted in a config (Linux's PATH_MAX).
const PATH_MAX: usize = 4096;

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

    /// Parses TOML into the typed sections. A bad value is named by its key path
    /// (`status.listen`), a syntax error by its line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let at_line = |e: &toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .unwrap_or(0);
            err(&format!("line {line}"), e.message().replace('\n', " "))
        };
        let de = toml::Deserializer::parse(text).map_err(|e| at_line(&e))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                at_line(&inner)
            } else {
                err(&path, inner.message().replace('\n', " "))
            }
        })
    }

    /// Takes secrets from the environment (`MARQUEE_MQTT_PASSWORD`, `MARQUEE_HTTP_TOKEN`, ...) over the file.
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

    /// Checks every value against its range and the paths against the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_ranges()?;
        for (key, v) in [
            ("mqtt.prefix", &self.mqtt.prefix),
            ("mqtt.discovery_prefix", &self.mqtt.discovery_prefix),
        ] {
            // `$` topics are the broker's own (`$SYS`): a publish there is dropped.
            if v.is_empty()
                || v.contains(['#', '+'])
                || v.starts_with(['/', '$'])
                || v.ends_with('/')
                || v.chars().any(char::is_control)
            {
                return Err(err(
                    key,
                    "must be a topic prefix without wildcards, control characters, a leading '$' or edge slashes",
                ));
            }
        }
        if self.mqtt.host.is_empty() {
            return Err(err("mqtt.host", "must not be empty"));
        }
        for (key, v) in [
            ("mqtt.host", Some(&self.mqtt.host)),
            ("mqtt.username", self.mqtt.username.as_ref()),
            ("mqtt.password", self.mqtt.password.as_ref()),
        ] {
            if v.is_some_and(|v| v.chars().any(char::is_control)) {
                return Err(err(key, "must not contain control characters"));
            }
        }
        if self.classify.backend == Backend::Wgpu && !cfg!(feature = "wgpu") {
            return Err(err(
                "classify.backend",
                "\"wgpu\" needs a build with the wgpu feature (cargo build --features wgpu)",
            ));
        }
        self.check_paths()?;
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
        if self.mqtt.port == 0 {
            return Err(err("mqtt.port", "must be 1-65535"));
        }
        if self.mqtt.password.is_some() && self.mqtt.username.is_none() {
            return Err(err("mqtt.username", "is required when a password is set"));
        }
        if let Some(f) = &self.sources.folder
            && f.path.as_os_str().is_empty()
        {
            return Err(err("sources.folder.path", "must not be empty"));
        }
        Ok(())
    }

    /// Every path is one `run` can use: not empty, no NUL, not absurdly long, a
    /// folder where a folder is meant and a readable PEM file for the CA.
    fn check_paths(&self) -> Result<(), ConfigError> {
        let mut dirs: Vec<(&str, &Path)> = vec![("state_dir", &self.state_dir)];
        if let Some(f) = &self.sources.folder {
            dirs.push(("sources.folder.path", &f.path));
        }
        let mut optional: Vec<(&str, Option<&Path>)> = vec![
            ("classify.model", self.classify.model.as_deref()),
            ("classify.cache", self.classify.cache.as_deref()),
            ("caption.model", self.caption.model.as_deref()),
            ("mqtt.tls_ca", self.mqtt.tls_ca.as_deref()),
        ];
        if let Some(cam) = &self.sources.camera {
            optional.push(("sources.camera.device", Some(&cam.device)));
        }
        for (key, p) in dirs.iter().map(|(k, p)| (*k, Some(*p))).chain(optional) {
            let Some(p) = p else { continue };
            let text = p.as_os_str().as_encoded_bytes();
            if text.is_empty() {
                return Err(err(
                    key,
                    "must not be empty (leave the key out for the default)",
                ));
            }
            if text.contains(&0) {
                return Err(err(key, "must not contain a NUL byte"));
            }
            if text.len() > PATH_MAX {
                return Err(err(
                    key,
                    format!("is {} bytes long; the limit is {PATH_MAX}", text.len()),
                ));
            }
        }
        for (key, p) in dirs {
            if p.exists() && !p.is_dir() {
                return Err(err(
                    key,
                    format!("{} exists and is not a folder", p.display()),
                ));
            }
        }
        for (key, p) in [
            ("classify.model", self.classify.model.as_deref()),
            ("caption.model", self.caption.model.as_deref()),
        ] {
            if let Some(p) = p
                && !p.is_dir()
            {
                return Err(err(key, format!("{} is not a folder", p.display())));
            }
        }
        if let Some(ca) = &self.mqtt.tls_ca {
            // The same reader and parser as the MQTT session's.
            let pem = crate::util::limited::read_file(ca, crate::util::tls::CA_MAX)
                .map_err(|e| err("mqtt.tls_ca", e.to_string()))?;
            crate::util::tls::client_config(&pem)
                .map_err(|e| err("mqtt.tls_ca", format!("{}: {e}", ca.display())))?;
        }
        Ok(())
    }

    /// Every number and text has a range, so a config that passes `config check`
    /// is one that `run` can live with (no giant allocation, no overflowing timer).
    fn check_ranges(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let c = &self.caption;
        let mut nums: Vec<(&str, u64, u64, u64)> = vec![
            ("mqtt.keep_alive_s", m.keep_alive_s, 5, 3600),
            ("mqtt.stats_interval_s", m.stats_interval_s, 1, 86_400),
            ("mqtt.outbox_max", m.outbox_max as u64, 1, 1_000_000),
            (
                "status.max_upload_bytes",
                self.status.max_upload_bytes as u64,
                1,
                crate::preprocess::image::MAX_BYTES as u64,
            ),
            ("status.history", self.status.history as u64, 1, 1000),
            ("pipeline.queue", self.pipeline.queue as u64, 1, 1024),
            ("caption.deadline_ms", c.deadline_ms, 1, 10_000),
            ("caption.beams", c.beams.unwrap_or(1) as u64, 1, 8),
            (
                "caption.max_new_tokens",
                c.max_new_tokens.unwrap_or(1) as u64,
                1,
                1024,
            ),
            ("caption.remote.timeout_ms", c.remote.timeout_ms, 1, 600_000),
            ("caption.remote.retries", c.remote.retries.into(), 0, 10),
            (
                "caption.remote.breaker_failures",
                c.remote.breaker_failures.into(),
                1,
                1000,
            ),
            (
                "caption.remote.breaker_cooldown_ms",
                c.remote.breaker_cooldown_ms,
                0,
                3_600_000,
            ),
        ];
        if let Some(f) = &self.sources.folder {
            nums.push(("sources.folder.poll_ms", f.poll_ms, 1, 60_000));
            // A minute of stillness is plenty; longer only delays every poster and junk file.
            nums.push(("sources.folder.settle_ms", f.settle_ms, 0, 60_000));
        }
        if let Some(cam) = &self.sources.camera {
            nums.push(("sources.camera.width", cam.width.into(), 1, 8192));
            nums.push(("sources.camera.height", cam.height.into(), 1, 8192));
            nums.push(("sources.camera.fps", cam.fps.into(), 1, 240));
            nums.push((
                "sources.camera.steady_frames",
                cam.steady_frames.into(),
                1,
                10_000,
            ));
        }
        for (key, v, lo, hi) in nums {
            if !(lo..=hi).contains(&v) {
                return Err(err(key, format!("{v} is outside {lo}..={hi}")));
            }
        }
        let texts = [
            ("mqtt.host", m.host.len(), 253),
            ("mqtt.prefix", m.prefix.len(), 128),
            ("mqtt.discovery_prefix", m.discovery_prefix.len(), 128),
            (
                "mqtt.username",
                m.username.as_ref().map_or(0, String::len),
                256,
            ),
            (
                "mqtt.password",
                m.password.as_ref().map_or(0, String::len),
                256,
            ),
            (
                "status.token",
                self.status.token.as_ref().map_or(0, String::len),
                256,
            ),
            ("caption.remote.url", c.remote.url.len(), 2048),
            (
                "caption.remote.token",
                c.remote.token.as_ref().map_or(0, String::len),
                256,
            ),
            ("caption.remote.model", c.remote.model.len(), 256),
        ];
        for (key, len, max) in texts {
            if len > max {
                return Err(err(key, format!("is {len} bytes long; the limit is {max}")));
            }
        }
        Ok(())
    }

    /// `stats_interval_s` as a duration.
    pub fn stats_interval(&self) -> Duration {
        Duration::from_secs(self.mqtt.stats_interval_s)
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
        assert_eq!(c.device_id.as_str(), "kiosk-test");
        assert_eq!(c.sources.folder.unwrap().path, PathBuf::from("/tmp/inbox"));
        assert!(c.sources.camera.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::parse("[mqtt]\nport = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("mqtt.port"), "{e}");
        let e = Config::parse("[mqtt\nport = 1\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = Config::parse("[mqtt]\nhots = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("hots"), "{e}");
        let e = Config::parse(&CONTRACT.replace("127.0.0.1:8080", "nowhere")).unwrap_err();
        assert!(e.to_string().contains("config status.listen:"), "{e}");
        let e = Config::parse(&CONTRACT.replace("kiosk-test", "a/b")).unwrap_err();
        assert!(e.to_string().contains("config device_id:"), "{e}");
        let e = Config::parse("[sources.camera]\nformat = \"h264\"\n").unwrap_err();
        assert!(e.to_string().contains("sources.camera.format"), "{e}");
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
        assert!(e.to_string().contains("caption.mode"), "{e}");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Any number, any size: the edges and the giants are where configs broke.
        fn num() -> impl Strategy<Value = u64> {
            prop_oneof![
                0u64..100,
                0u64..100_000,
                Just(i64::MAX as u64),
                any::<u32>().prop_map(u64::from)
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Whatever `config check` accepts, `run` can build its parts from.
            #[test]
            fn every_accepted_config_is_one_run_can_live_with(
                queue in num(), stats in num(), outbox in num(), keep in num(),
                upload in num(), history in num(), deadline in num(), poll in num(),
                settle in num(), fps in num(), width in num(), timeout in num(),
                path in prop_oneof![Just(String::new()), "[a-z/]{1,20}"],
                id in "[a-z_/-]{0,80}",
            ) {
                let text = format!(
                    "device_id = \"{id}\"\n[mqtt]\nstats_interval_s = {stats}\noutbox_max = {outbox}\nkeep_alive_s = {keep}\n\
                     [status]\nmax_upload_bytes = {upload}\nhistory = {history}\n[pipeline]\nqueue = {queue}\n\
                     [caption]\ndeadline_ms = {deadline}\n[caption.remote]\ntimeout_ms = {timeout}\n\
                     [sources.folder]\npath = \"{path}\"\npoll_ms = {poll}\nsettle_ms = {settle}\n\
                     [sources.camera]\nfps = {fps}\nwidth = {width}\n"
                );
                let Ok(c) = Config::parse(&text) else { return Ok(()) };
                if c.validate().is_err() {
                    return Ok(());
                }
                // What `run` does with these values, none of which may panic.
                let now = std::time::Instant::now();
                let _ = now + c.stats_interval();
                let _ = now + Duration::from_millis(c.caption.deadline_ms);
                let _ = now + Duration::from_millis(c.caption.remote.timeout_ms);
                let f = c.sources.folder.as_ref().unwrap();
                prop_assert!(!f.path.as_os_str().is_empty());
                let _ = now + Duration::from_millis(f.poll_ms) + Duration::from_millis(f.settle_ms) * 2;
                prop_assert!(c.mqtt.outbox_max >= 1);
                prop_assert!(c.mqtt.keep_alive_s <= u64::from(u16::MAX));
                prop_assert!(c.status.history <= 1000 && (1..=1024).contains(&c.pipeline.queue));
            }
        }
    }

    #[test]
    fn env_overrides_secrets() {
        let mut c = Config::parse(CONTRACT).unwrap();
        c.apply_env(|k| (k == "MARQUEE_HTTP_TOKEN").then(|| "s3cret".to_string()));
        assert_eq!(c.status.token.as_deref(), Some("s3cret"));
        assert!(c.mqtt.password.is_none());
    }
}
