//! Debian's headless Chromium, driven over the Chrome DevTools Protocol: just enough
//! to navigate, type, set a file input, click, read the DOM and take a screenshot.

use super::appliance::Proc;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Browser {
    _proc: Proc,
    port: String,
}

impl Browser {
    /// Starts Chromium with a fresh profile under `dir`.
    pub fn start(dir: &Path) -> Self {
        let profile = dir.join("chromium");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("chromium installed (tests/setup.sh installs it)");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let proc = Proc(child);
        let mut line = String::new();
        let ws_browser = loop {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "chromium exited");
            if let Some(u) = line.trim().strip_prefix("DevTools listening on ") {
                break u.to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let port = ws_browser
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        Self { _proc: proc, port }
    }

    /// The first page target.
    pub fn page(&self) -> Cdp {
        let list = ureq::get(&format!("http://127.0.0.1:{}/json/list", self.port))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let targets: Vec<Value> = serde_json::from_str(&list).unwrap();
        let page = targets
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let (ws, _) = tungstenite::connect(page["webSocketDebuggerUrl"].as_str().unwrap()).unwrap();
        let mut cdp = Cdp { ws, next: 0 };
        // Headless pages have no window focus: without this, typed text goes nowhere.
        cdp.call(
            "Emulation.setFocusEmulationEnabled",
            json!({"enabled": true}),
        );
        cdp.call("Page.bringToFront", json!({}));
        cdp
    }
}

/// One page's DevTools connection.
pub struct Cdp {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next: u64,
}

impl Cdp {
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let m = self.ws.read().unwrap();
            if let Ok(text) = m.to_text()
                && let Ok(v) = serde_json::from_str::<Value>(text)
                && v["id"] == id
            {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    pub fn eval(&mut self, expr: &str) -> Value {
        self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// Focuses `selector` and types `text` as keyboard input.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        let q = serde_json::to_string(selector).unwrap();
        self.eval(&format!("document.querySelector({q}).focus()"));
        self.call("Input.insertText", json!({ "text": text }));
        let value = self.eval(&format!("document.querySelector({q}).value"));
        assert!(
            value.as_str().is_some_and(|v| v.ends_with(text)),
            "typing into {selector} left {value}"
        );
    }

    /// Waits until the text of element `id` contains `needle`; a timeout shows it.
    pub fn wait_text(&mut self, id: &str, needle: &str, timeout: std::time::Duration) -> String {
        let end = std::time::Instant::now() + timeout;
        loop {
            let t = self.eval(&format!("document.getElementById('{id}').textContent"));
            let t = t.as_str().unwrap_or_default().to_string();
            if t.contains(needle) {
                return t;
            }
            assert!(
                std::time::Instant::now() < end,
                "#{id} never said {needle:?}; it says {t:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Sets the files of an `<input type=file>`, as a person choosing them would.
    pub fn set_files(&mut self, selector: &str, files: &[&Path]) {
        let root = self.call("DOM.getDocument", json!({}))["root"]["nodeId"].clone();
        let node = self.call(
            "DOM.querySelector",
            json!({"nodeId": root, "selector": selector}),
        )["nodeId"]
            .clone();
        // Chromium will not upload a file named through `..`: give it the real path.
        let files: Vec<String> = files
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap().display().to_string())
            .collect();
        self.call(
            "DOM.setFileInputFiles",
            json!({"nodeId": node, "files": files}),
        );
    }

    /// A PNG screenshot, also saved as target/NAME for CI to keep.
    pub fn screenshot(&mut self, name: &str) -> Vec<u8> {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(&out, &png).unwrap();
        png
    }
}
