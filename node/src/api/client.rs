//! The HTTP client the `kith` command line uses to talk to a running daemon.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{ApiInfo, API_FILE, TOKEN_FILE};

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon runs with this home.
    #[error("no kith daemon is running for {} (start one with `kith --home {} daemon`)", .0.display(), .0.display())]
    NotRunning(PathBuf),
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(String),
    /// The connection failed.
    #[error("talking to the daemon: {0}")]
    Http(#[from] reqwest::Error),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A client for one home's daemon.
pub struct Client {
    home: PathBuf,
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// Finds the daemon of `home` through `<home>/api.json`.
    pub fn for_home(home: &Path) -> Result<Self, ClientError> {
        let not_running = || ClientError::NotRunning(home.to_path_buf());
        let info = std::fs::read(home.join(API_FILE)).map_err(|_| not_running())?;
        let info: ApiInfo = serde_json::from_slice(&info).map_err(|_| not_running())?;
        let token_path = home.join(TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path)
            .map_err(|source| ClientError::Io {
                path: token_path,
                source,
            })?
            .trim()
            .to_owned();
        Ok(Self {
            home: home.to_path_buf(),
            base: format!("http://{}", info.api),
            token,
            http: reqwest::Client::new(),
        })
    }

    /// A request that failed before any answer: a refused connection means the daemon that
    /// wrote `api.json` is gone (it crashed, or was killed).
    fn failed(&self, e: reqwest::Error) -> ClientError {
        if e.is_connect() {
            ClientError::NotRunning(self.home.clone())
        } else {
            ClientError::Http(e)
        }
    }

    async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, ClientError> {
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("daemon answered {status}"));
            return Err(ClientError::Api(message));
        }
        serde_json::from_value(body).map_err(|e| ClientError::Api(e.to_string()))
    }

    /// GET a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        Self::answer(response).await
    }

    /// DELETE a resource, get a JSON document back.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        Self::answer(response).await
    }

    /// POST a JSON document, get one back.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, ClientError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        Self::answer(response).await
    }

    /// Streams events, calling `each` with every JSON event until the daemon stops.
    pub async fn events(&self, mut each: impl FnMut(Value)) -> Result<(), ClientError> {
        self.events_until(|v| {
            each(v);
            false
        })
        .await
    }

    /// Streams events until `each` returns `true` or the daemon stops.
    pub async fn events_until(
        &self,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/events", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        if !response.status().is_success() {
            return Self::answer::<Value>(response).await.map(|_| ());
        }
        let mut stream = response.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = buf.find('\n') {
                let line: String = buf.drain(..=end).collect();
                if let Some(data) = line.trim_end().strip_prefix("data:") {
                    if let Ok(value) = serde_json::from_str(data.trim_start()) {
                        if each(value) {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
