//! The HTTP client the `kith` command line uses to talk to a running daemon: one typed method
//! per route, each returning an [`Answer`] that keeps the JSON the daemon sent (what `--json`
//! prints, unchanged) and decodes into the API's view type (what a person's output reads).

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::chats::TimerBody;
use super::files::{DownloadBody, SendFileBody};
use super::groups::{ChangeBody, CreateBody, Created, DeclineBody};
use super::requests::AcceptBody;
use super::{AddContact, Read, RenameContact, SendBody, Typed, WithBody};
use crate::config::{SettingsChange, SettingsView};
use crate::core::crypto::verify::VerifyView;
use crate::core::AttachmentView;
use crate::core::{ContactView, IdInfo, MessageView, Sent, StatusView};
use crate::features::group::{ChangeKind, DeclineView, GroupView, InvitationView};
use crate::features::presence::PresenceView;
use crate::features::strangers::{BlockView, RequestView};
use crate::features::timers::TimerView;
use crate::health::HealthView;
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

/// A JSON answer of the daemon and the view type it decodes to.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    json: Value,
    view: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Answer<T> {
    /// The document as the daemon sent it (`--json` prints this).
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The document as the daemon sent it, owned.
    pub fn into_json(self) -> Value {
        self.json
    }

    /// The typed answer.
    pub fn decode(self) -> Result<T, ClientError> {
        serde_json::from_value(self.json)
            .map_err(|e| ClientError::Api(format!("the daemon's answer does not read: {e}")))
    }
}

/// `s` as one segment of an API path.
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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

    async fn answer(response: reqwest::Response) -> Result<Value, ClientError> {
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
        Ok(body)
    }

    async fn call<T>(&self, request: reqwest::RequestBuilder) -> Result<Answer<T>, ClientError> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        Ok(Answer {
            json: Self::answer(response).await?,
            view: PhantomData,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get_answer<T>(&self, path: &str) -> Result<Answer<T>, ClientError> {
        self.call(self.http.get(self.url(path))).await
    }

    async fn post_answer<T>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Answer<T>, ClientError> {
        self.call(self.http.post(self.url(path)).json(body)).await
    }

    /// GET a JSON document of any route.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get_answer::<T>(path).await?.decode()
    }

    /// DELETE a resource of any route, get a JSON document back.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<T>(self.http.delete(self.url(path)))
            .await?
            .decode()
    }

    /// POST a JSON document to any route, get one back.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.post_answer::<T>(path, body).await?.decode()
    }

    /// `GET /v1/id`.
    pub async fn id(&self) -> Result<Answer<IdInfo>, ClientError> {
        self.get_answer("/v1/id").await
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Answer<HealthView>, ClientError> {
        self.get_answer("/v1/health").await
    }

    /// `POST /v1/settings`: changes the given settings, answers the settings in effect.
    pub async fn change_settings(
        &self,
        change: &SettingsChange,
    ) -> Result<Answer<SettingsView>, ClientError> {
        self.post_answer("/v1/settings", change).await
    }

    /// `GET /v1/contacts`.
    pub async fn contacts(&self) -> Result<Answer<Vec<ContactView>>, ClientError> {
        self.get_answer("/v1/contacts").await
    }

    /// `POST /v1/contacts`.
    pub async fn add_contact(&self, body: &AddContact) -> Result<Answer<ContactView>, ClientError> {
        self.post_answer("/v1/contacts", body).await
    }

    /// `DELETE /v1/contacts/{name}`.
    pub async fn remove_contact(&self, name: &str) -> Result<Answer<ContactView>, ClientError> {
        let path = format!("/v1/contacts/{}", segment(name));
        self.call(self.http.delete(self.url(&path))).await
    }

    /// `POST /v1/contacts/{name}/rename`.
    pub async fn rename_contact(
        &self,
        name: &str,
        new: &str,
    ) -> Result<Answer<ContactView>, ClientError> {
        let path = format!("/v1/contacts/{}/rename", segment(name));
        let body = RenameContact {
            name: new.to_owned(),
        };
        self.post_answer(&path, &body).await
    }

    /// `GET /v1/contacts/{name}/verify`, or with `mark` the `POST` that records the comparison.
    pub async fn verify(&self, name: &str, mark: bool) -> Result<Answer<VerifyView>, ClientError> {
        let path = format!("/v1/contacts/{}/verify", segment(name));
        match mark {
            true => self.post_answer(&path, &serde_json::json!({})).await,
            false => self.get_answer(&path).await,
        }
    }

    /// `POST /v1/contacts/{who}/block` (or `unblock`).
    pub async fn block(&self, who: &str, blocked: bool) -> Result<Answer<BlockView>, ClientError> {
        let action = if blocked { "block" } else { "unblock" };
        let path = format!("/v1/contacts/{}/{action}", segment(who));
        self.post_answer(&path, &serde_json::json!({})).await
    }

    /// `GET /v1/requests`.
    pub async fn requests(&self) -> Result<Answer<Vec<RequestView>>, ClientError> {
        self.get_answer("/v1/requests").await
    }

    /// `POST /v1/requests/{peer}/accept`.
    pub async fn accept_request(
        &self,
        who: &str,
        body: &AcceptBody,
    ) -> Result<Answer<ContactView>, ClientError> {
        let path = format!("/v1/requests/{}/accept", segment(who));
        self.post_answer(&path, body).await
    }

    /// `POST /v1/requests/{peer}/block`.
    pub async fn block_request(&self, who: &str) -> Result<Answer<BlockView>, ClientError> {
        let path = format!("/v1/requests/{}/block", segment(who));
        self.post_answer(&path, &serde_json::json!({})).await
    }

    /// `POST /v1/send`.
    pub async fn send(&self, body: &SendBody) -> Result<Answer<Sent>, ClientError> {
        self.post_answer("/v1/send", body).await
    }

    /// `GET /v1/messages[?with=…]`.
    pub async fn messages(
        &self,
        with: Option<&str>,
    ) -> Result<Answer<Vec<MessageView>>, ClientError> {
        let path = match with {
            Some(w) => format!("/v1/messages?with={}", segment(w)),
            None => "/v1/messages".to_owned(),
        };
        self.get_answer(&path).await
    }

    /// `POST /v1/read`.
    pub async fn read(&self, with: &str) -> Result<Answer<Read>, ClientError> {
        let body = WithBody {
            with: with.to_owned(),
        };
        self.post_answer("/v1/read", &body).await
    }

    /// `GET /v1/status/{id}`.
    pub async fn status(&self, id: &str) -> Result<Answer<StatusView>, ClientError> {
        self.get_answer(&format!("/v1/status/{}", segment(id)))
            .await
    }

    /// `GET /v1/presence/{who}`.
    pub async fn presence(&self, who: &str) -> Result<Answer<PresenceView>, ClientError> {
        self.get_answer(&format!("/v1/presence/{}", segment(who)))
            .await
    }

    /// `POST /v1/typing`.
    pub async fn typing(&self, to: &str) -> Result<Answer<Typed>, ClientError> {
        let body = super::TypingBody { to: to.to_owned() };
        self.post_answer("/v1/typing", &body).await
    }

    /// `GET /v1/groups`.
    pub async fn groups(&self) -> Result<Answer<Vec<GroupView>>, ClientError> {
        self.get_answer("/v1/groups").await
    }

    /// `GET /v1/groups/{group}`.
    pub async fn group(&self, group: &str) -> Result<Answer<GroupView>, ClientError> {
        self.get_answer(&format!("/v1/groups/{}", segment(group)))
            .await
    }

    /// `POST /v1/groups`.
    pub async fn create_group(&self, body: &CreateBody) -> Result<Answer<Created>, ClientError> {
        self.post_answer("/v1/groups", body).await
    }

    /// `POST /v1/groups/{group}/{add,remove,promote,leave}`.
    pub async fn change_group(
        &self,
        group: &str,
        kind: ChangeKind,
        who: Option<&str>,
    ) -> Result<Answer<GroupView>, ClientError> {
        let kind = match kind {
            ChangeKind::Add => "add",
            ChangeKind::Remove => "remove",
            ChangeKind::Promote => "promote",
            ChangeKind::Leave => "leave",
            ChangeKind::Rekey => "rekey",
        };
        let path = format!("/v1/groups/{}/{kind}", segment(group));
        let body = ChangeBody {
            who: who.map(str::to_owned),
        };
        self.post_answer(&path, &body).await
    }

    /// `GET /v1/invitations`.
    pub async fn invitations(&self) -> Result<Answer<Vec<InvitationView>>, ClientError> {
        self.get_answer("/v1/invitations").await
    }

    /// `POST /v1/groups/{group}/accept`.
    pub async fn accept_invitation(&self, group: &str) -> Result<Answer<GroupView>, ClientError> {
        let path = format!("/v1/groups/{}/accept", segment(group));
        self.post_answer(&path, &serde_json::json!({})).await
    }

    /// `POST /v1/groups/{group}/decline`.
    pub async fn decline_invitation(
        &self,
        group: &str,
        block: bool,
    ) -> Result<Answer<DeclineView>, ClientError> {
        let path = format!("/v1/groups/{}/decline", segment(group));
        self.post_answer(&path, &DeclineBody { block }).await
    }

    /// `POST /v1/send-file`.
    pub async fn send_file(&self, body: &SendFileBody) -> Result<Answer<Sent>, ClientError> {
        self.post_answer("/v1/send-file", body).await
    }

    /// `POST /v1/download`: answers once the file is complete.
    pub async fn download(
        &self,
        body: &DownloadBody,
    ) -> Result<Answer<AttachmentView>, ClientError> {
        self.post_answer("/v1/download", body).await
    }

    /// `GET /v1/chats/{with}/timer`, or with a body the `POST` that sets it.
    pub async fn timer(
        &self,
        with: &str,
        set: Option<&TimerBody>,
    ) -> Result<Answer<TimerView>, ClientError> {
        let path = format!("/v1/chats/{}/timer", segment(with));
        match set {
            Some(body) => self.post_answer(&path, body).await,
            None => self.get_answer(&path).await,
        }
    }

    /// `GET /v1/chats/{with}/export`: the export document, whose JSON is the output itself.
    pub async fn export(&self, with: &str) -> Result<Value, ClientError> {
        let answer: Answer<Value> = self
            .get_answer(&format!("/v1/chats/{}/export", segment(with)))
            .await?;
        Ok(answer.json)
    }

    /// `POST /v1/ui/code`: a one-time code for the web UI, and the page's address with it.
    pub async fn ui_code(&self) -> Result<Answer<super::ui::CodeView>, ClientError> {
        self.post_answer("/v1/ui/code", &serde_json::json!({}))
            .await
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
            return Self::answer(response).await.map(|_| ());
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use kith_protocol::MessageState;
    use serde_json::json;

    use super::*;

    fn answer<T>(json: Value) -> Answer<T> {
        Answer {
            json,
            view: PhantomData,
        }
    }

    /// What the daemon sends for `view`, read back the way the command line reads it.
    fn round_trip<T: Serialize + DeserializeOwned>(view: &T) -> T {
        answer(serde_json::to_value(view).expect("serialises"))
            .decode()
            .expect("decodes")
    }

    #[test]
    fn views_decode_from_what_the_api_sends() {
        // Fields the API leaves out when empty must decode as empty.
        let status = round_trip(&StatusView {
            id: "m".into(),
            state: MessageState::Delivered,
            members: HashMap::new(),
            member_names: HashMap::new(),
            reason: None,
        });
        assert_eq!(status.state, MessageState::Delivered);
        assert!(status.member_names.is_empty() && status.reason.is_none());
        let group = round_trip(&GroupView {
            group_id: "g".into(),
            name: "friends".into(),
            admins: vec!["a".into()],
            members: vec!["a".into(), "b".into()],
            version: 3,
            epoch: 2,
            relay: "/ip4/127.0.0.1/tcp/1".into(),
            member_names: HashMap::new(),
            member: false,
        });
        assert_eq!((group.members.len(), group.version), (2, 3));
        assert!(!group.member);
        let peer = libp2p::PeerId::random();
        let seen = round_trip(&PresenceView {
            peer_id: peer,
            online: false,
            last_seen_ms: Some(7),
        });
        assert_eq!((seen.peer_id, seen.last_seen_ms), (peer, Some(7)));
        let health: HealthView = answer(json!({
            "peer_id": "p", "name": "ann", "pending_outbox": 2, "last_mailbox_fetch_ms": null,
            "relays": [{"addr": "/ip4/1.2.3.4/tcp/1", "connected": false, "reserved": false,
                        "error": "refused", "since_ms": 5}],
            "contacts": [{"name": "bob", "peer_id": "q", "path": "relayed"}],
        }))
        .decode()
        .expect("a health view");
        assert_eq!(health.relays[0].error.as_deref(), Some("refused"));
        assert_eq!(health.contacts[0].path, "relayed");
        let road: Result<crate::health::ContactPath, _> =
            serde_json::from_value(json!({"name": "bob", "peer_id": "q", "path": "teleport"}));
        assert!(road.is_err(), "an unknown road is an error, not a guess");
    }

    #[test]
    fn the_json_stays_as_the_daemon_sent_it() {
        let sent = json!({"id": "m", "state": "pending", "note": "relay down", "later": 1});
        let answer: Answer<Sent> = answer(sent.clone());
        assert_eq!(answer.json(), &sent);
        let typed = answer
            .decode()
            .expect("a field added later does not break decoding");
        assert_eq!(typed.state, MessageState::Pending);
        assert_eq!(typed.note.as_deref(), Some("relay down"));
        let bad: Answer<Sent> = answer_of(json!({"id": 5}));
        assert!(matches!(bad.decode(), Err(ClientError::Api(_))));
    }

    fn answer_of<T>(json: Value) -> Answer<T> {
        answer(json)
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("ann"), "ann");
        assert_eq!(segment("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
