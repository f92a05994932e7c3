//! The appliance harness shared by the end-to-end tests: a real Mosquitto broker on a
//! loopback port, `mosquitto_sub` as the independent client, and `marquee run` as a
//! real process.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests of this file run one at a time: one kills its broker and restarts it on
/// the same port, which a parallel test could otherwise grab in between.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn signal(p: &Proc, sig: &str) {
    Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .unwrap();
}

pub struct Broker {
    pub port: u16,
    pub conf: PathBuf,
    pub proc: Option<Proc>,
}

impl Broker {
    /// Persistence on and saved after every change, so a subscriber's session and
    /// its queued messages survive even a SIGKILL of the broker. `user root`: started
    /// as root (CI), mosquitto would drop to its own user and could not write its store
    /// into the test folder.
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_on_changes true\nautosave_interval 1\n\
                 user root\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut b = Self {
            port,
            conf,
            proc: None,
        };
        b.restart();
        b
    }

    pub fn restart(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto installed (apt-get install mosquitto)");
        self.proc = Some(Proc(child));
        let port = self.port;
        wait_for("the broker", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            signal(&p, "-KILL");
        }
    }

    /// The retained message on `topic`, read by a fresh `mosquitto_sub`.
    pub fn retained(&self, topic: &str) -> Option<String> {
        let out = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-C",
                "1",
                "-W",
                "3",
                "--retained-only",
            ])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}

/// `mosquitto_sub -v` with a persistent QoS 1 session, collecting lines.
pub struct Subscriber {
    pub lines: Arc<Mutex<Vec<String>>>,
    pub _proc: Proc,
}

impl Subscriber {
    pub fn start(port: u16, topics: &[&str]) -> Self {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-i",
            "marquee-test-sub",
            "-c",
            "-q",
            "1",
            "-v",
        ]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Self {
            lines,
            _proc: Proc(child),
        }
    }

    /// Everything the test device publishes, and its discovery, subscribed before
    /// the device starts.
    pub fn device(port: u16) -> Self {
        let sub = Self::start(
            port,
            &[
                "marquee/kiosk-test/#",
                "homeassistant/device/kiosk-test/config",
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        sub
    }

    pub fn on(&self, topic: &str) -> Vec<String> {
        let prefix = format!("{topic} ");
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(String::from))
            .collect()
    }
}

pub struct Marquee {
    pub proc: Proc,
    pub status: String,
    pub inbox: PathBuf,
    pub stderr: Arc<Mutex<String>>,
}

pub const TOKEN: &str = "test-token-123";

/// The binary under test: this build's, or `MARQUEE_BIN` (to replay the fault tests
/// against another build, e.g. an older release).
pub fn marquee_bin() -> PathBuf {
    std::env::var_os("MARQUEE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_marquee")))
}

pub fn start_marquee(dir: &Path, broker_port: u16, extra: &str) -> Marquee {
    start_marquee_env(dir, broker_port, extra, &[])
}

/// `start_marquee` with more environment (e.g. systemd's `NOTIFY_SOCKET`).
pub fn start_marquee_env(
    dir: &Path,
    broker_port: u16,
    extra: &str,
    env: &[(&str, &str)],
) -> Marquee {
    super::cache();
    let inbox = dir.join("inbox");
    // marquee makes the folder too, but its status server may answer first, and a
    // test that writes a poster at once must not race it.
    std::fs::create_dir_all(&inbox).unwrap();
    let status_port = free_port();
    let config = dir.join("marquee.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"kiosk-test\"\nstate_dir = \"{}\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\n\
             prefix = \"marquee\"\ndiscovery_prefix = \"homeassistant\"\nstats_interval_s = 2\n\
             [sources.folder]\npath = \"{}\"\npoll_ms = 100\nsettle_ms = 300\n\
             [status]\nlisten = \"127.0.0.1:{status_port}\"\nmax_upload_bytes = 2000000\n{extra}",
            dir.join("state").display(),
            inbox.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(marquee_bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("MARQUEE_HTTP_TOKEN", TOKEN)
        .env("MARQUEE_LOG", "info")
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let s2 = stderr.clone();
    std::thread::spawn(move || {
        let mut r = BufReader::new(err);
        let mut buf = String::new();
        while r.read_line(&mut buf).unwrap_or(0) > 0 {
            s2.lock().unwrap().push_str(&buf);
            buf.clear();
        }
    });
    let status = format!("http://127.0.0.1:{status_port}");
    let url = format!("{status}/healthz");
    let m = Marquee {
        proc: Proc(child),
        status,
        inbox,
        stderr,
    };
    wait_for("marquee's status server", Duration::from_secs(60), || {
        ureq::get(&url).call().is_ok()
    });
    m
}

/// Real posters from posters-v1, by manifest order.
pub fn posters(n: usize) -> Vec<PathBuf> {
    let root = super::shared().join("data/posters-v1");
    let text = std::fs::read_to_string(root.join("movies.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            root.join(
                serde_json::from_str::<Value>(l).unwrap()["poster"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect()
}

/// Drops a file the way a careful writer does: a temp name, then a rename.
pub fn drop_file(inbox: &Path, name: &str, bytes: &[u8]) {
    let tmp = inbox.join(format!("{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}

pub fn events(sub: &Subscriber) -> Vec<Value> {
    sub.on("marquee/kiosk-test/events")
        .iter()
        .map(|l| serde_json::from_str(l).expect("valid JSON event"))
        .collect()
}

pub fn seq_of(id: &str) -> u64 {
    id.rsplit('-').next().unwrap().parse().unwrap()
}
