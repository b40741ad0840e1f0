//! A small W3C WebDriver client over HTTP (reqwest) for the browser tests: starts Debian's
//! `chromedriver`, opens headless Chromium sessions, and drives pages (navigate, run script,
//! click, type, screenshot). Only the handful of commands the tests use.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::DEADLINE;

/// Where Debian installs the driver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Where Debian installs the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The key W3C WebDriver names element references with.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The Enter key, for [`Browser::type_into`].
pub const ENTER: char = '\u{E007}';

/// A running chromedriver (stopped on drop, with the browsers it started).
/// How long a page may take to show what a test waits for: longer than the harness's
/// [`DEADLINE`], because a message shown on a page has gone through a sender's page, two
/// daemons and a browser's event stream, next to a browser that shares the machine's two cores.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(45);

pub struct Driver {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Driver {
    /// Starts chromedriver on a free loopback port; `None` when the driver or the browser is
    /// not installed (the caller skips and says so).
    pub async fn start() -> Result<Option<Self>> {
        if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            // Its own process group, which its browsers join: a test that fails half way
            // leaves no browser behind (see `Drop`).
            .process_group(0)
            .spawn()
            .context("starting chromedriver")?;
        let driver = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        crate::wait_for("chromedriver to answer", || async {
            let status = driver
                .http
                .get(format!("{}/status", driver.base))
                .send()
                .await
                .ok()?;
            let body: Value = status.json().await.ok()?;
            (body["value"]["ready"] == true).then_some(())
        })
        .await?;
        Ok(Some(driver))
    }

    /// A new headless browser with its own profile in `profile`.
    pub async fn browser(&self, profile: &Path) -> Result<Browser> {
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1100,760", "--no-first-run", "--lang=en-GB",
                    "--disable-crash-reporter", "--disable-breakpad",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let answer: Value = self
            .http
            .post(format!("{}/session", self.base))
            .json(&caps)
            .timeout(Duration::from_secs(60))
            .send()
            .await?
            .json()
            .await?;
        let Some(id) = answer["value"]["sessionId"].as_str() else {
            bail!("chromedriver did not open a session: {answer}");
        };
        Ok(Browser {
            http: self.http.clone(),
            session: format!("{}/session/{id}", self.base),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One browser session.
pub struct Browser {
    http: reqwest::Client,
    session: String,
}

impl Browser {
    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.session))
            .timeout(Duration::from_secs(60));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await?.json().await?;
        let value = answer["value"].clone();
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            bail!(
                "webdriver {path}: {error}: {}",
                value["message"].as_str().unwrap_or_default()
            );
        }
        Ok(value)
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(|_| ())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Runs an async script: it must call `arguments[arguments.length - 1]` with its result.
    pub async fn js_async(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// What the page knows, for a failed wait: the messages it shows, the last events it got
    /// from the daemon, and the newest messages the daemon has for the open conversation
    /// (kith's page keeps them in `window.kith`).
    async fn diagnosis(&self) -> String {
        let script = "const done = arguments[arguments.length - 1];
            const k = window.kith;
            if (!k) { done('no window.kith on the page'); return; }
            const shown = k.state.messages.slice(-8).map(m => [m.id, m.direction, m.text, m.state, !!m.local]);
            const open = k.state.open && k.state.open.id;
            const seen = { open, shown, events: k.log };
            if (!open) { done(JSON.stringify(seen)); return; }
            fetch(`/v1/messages?with=${encodeURIComponent(open)}&limit=8`, { credentials: 'same-origin' })
              .then(r => r.json())
              .then(ms => { seen.daemon = ms.map(m => [m.id, m.direction, m.text, m.state]); done(JSON.stringify(seen)); })
              .catch(e => { seen.daemon = String(e); done(JSON.stringify(seen)); });";
        match self.js_async(script, json!([])).await {
            Ok(Value::String(s)) => format!("the page: {s}"),
            Ok(other) => format!("the page: {other}"),
            Err(e) => format!("the page could not say what it shows: {e:#}"),
        }
    }

    /// Polls `expression` (a JavaScript expression) until it is truthy, for at most
    /// [`PAGE_DEADLINE`]; returns its value.
    pub async fn wait(&self, what: &str, expression: &str) -> Result<Value> {
        let script = format!("try {{ return ({expression}); }} catch (e) {{ return null; }}");
        let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
        loop {
            let value = self.js(&script, json!([])).await?;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if tokio::time::Instant::now() > deadline {
                let seen = self.diagnosis().await;
                bail!("timed out waiting in the browser for {what} ({expression}); {seen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first element matching `css`.
    pub async fn find(&self, css: &str) -> Result<String> {
        let value = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .with_context(|| format!("finding {css}"))?;
        value[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no element reference in {value}"))
    }

    /// Runs `command` (`click` or `value`) on the first element matching `css`, waiting for it
    /// to exist. The page redraws parts of itself as events arrive, so an element found may be
    /// replaced before the command reaches it: it is then found again.
    async fn on_element(&self, css: &str, command: &str, body: Value) -> Result<()> {
        self.wait(css, &format!("document.querySelector({})", json!(css)))
            .await?;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let element = self.find(css).await?;
            let done = self
                .command(
                    reqwest::Method::POST,
                    &format!("/element/{element}/{command}"),
                    Some(body.clone()),
                )
                .await;
            match done {
                // Replaced by a re-render, or not shown yet (a panel still opening): the
                // element is found again.
                Err(e)
                    if (e.to_string().contains("stale element")
                        || e.to_string().contains("not interactable"))
                        && tokio::time::Instant::now() < deadline => {}
                other => return other.map(|_| ()),
            }
        }
    }

    /// Clicks the first element matching `css` (waiting for it to exist).
    pub async fn click(&self, css: &str) -> Result<()> {
        self.on_element(css, "click", json!({})).await
    }

    /// Types `text` into the first element matching `css` (for a file input: a file's path).
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        self.on_element(css, "value", json!({ "text": text })).await
    }

    /// Makes the page see `prefers-color-scheme: dark` (or `light`), through Chromium's
    /// DevTools protocol.
    pub async fn color_scheme(&self, scheme: &str) -> Result<()> {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({
                "cmd": "Emulation.setEmulatedMedia",
                "params": { "features": [{ "name": "prefers-color-scheme", "value": scheme }] },
            })),
        )
        .await
        .map(|_| ())
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        let png = decode_base64(value.as_str().context("no screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Ends the session (closes the browser).
    pub async fn quit(self) -> Result<()> {
        self.command(reqwest::Method::DELETE, "", None)
            .await
            .map(|_| ())
    }
}

/// Where the tests write screenshots: `target/ui-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("ui-screenshots")
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
pub fn decode_base64(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("not base64: {c:?}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::decode_base64("aGVsbG8=").expect("valid"), b"hello");
        assert_eq!(super::decode_base64("aGk=").expect("valid"), b"hi");
        assert!(super::decode_base64("a*b").is_err());
    }
}
