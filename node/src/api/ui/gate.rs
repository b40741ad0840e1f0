//! Who may talk to the daemon's loopback port: the Host check against DNS rebinding, the
//! one-time codes `kith ui` prints, the session cookies they are exchanged for, and the
//! same-origin check that keeps other web pages from changing anything with that cookie.
//!
//! Flow: `kith ui` asks the API (with the bearer token) for a code and prints
//! `http://127.0.0.1:PORT/#code=…`. The fragment never reaches a server or a log; the page reads
//! it and `POST`s it to `/ui/session`, which spends the code (once, within [`CODE_TTL_MS`]) and
//! answers with an `HttpOnly; SameSite=Strict` cookie. The cookie is stateless: its issue time and
//! a random nonce, with a keyed BLAKE3 MAC under a key derived from the API token. It therefore
//! survives a daemon restart (the page reconnects by itself) and dies with the token.
//!
//! Every request, API or page, must name this port on a loopback host in `Host` (a DNS
//! rebinding page names its own host). A request is then admitted by the bearer token, by a
//! valid session cookie, or because it asks for a public asset. A cookie-authenticated request
//! that is not `GET`/`HEAD` must carry the [`CSRF_HEADER`] (a cross-site form cannot set one, and
//! a cross-site `fetch` with one needs a CORS preflight that this server never grants) and, when
//! the browser sends `Origin`, an origin of this port. Other sites on the same machine share the
//! "site" 127.0.0.1 with us (SameSite ignores ports), which is why the header matters.

use std::net::SocketAddr;
use std::sync::Mutex;

use axum::http::{header, HeaderMap, Method};
use rand::RngCore;
use subtle::ConstantTimeEq;

/// How long a one-time code may wait to be spent.
pub const CODE_TTL_MS: u64 = 2 * 60 * 1000;
/// How many unspent codes are kept; issuing more drops the oldest.
pub const MAX_CODES: usize = 16;
/// How long a session cookie is valid.
pub const SESSION_TTL_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// The header every cookie-authenticated state change must carry (any value).
pub const CSRF_HEADER: &str = "x-kith-csrf";
/// Where the page exchanges a code for a session.
pub const SESSION_PATH: &str = "/ui/session";

/// Why a request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `Host` is not this port on a loopback name (a DNS rebinding attempt, or a typo).
    #[error("the Host header must be 127.0.0.1, localhost or [::1] with this port")]
    WrongHost,
    /// Neither the bearer token nor a valid session cookie.
    #[error(
        "missing or wrong bearer token (see <home>/api.token), or no UI session (run `kith ui`)"
    )]
    NoCredentials,
    /// A cookie-authenticated change without the same-origin proof.
    #[error("cross-site request refused: state changes from the web UI need the x-kith-csrf header and a same-origin Origin")]
    CrossSite,
}

/// On what grounds a request is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A page asset or the code exchange: no credentials needed.
    Public,
    /// The API token.
    Bearer,
    /// A UI session cookie.
    Session,
}

/// The gate of one daemon's port.
pub struct Gate {
    token: String,
    port: u16,
    /// The address the API is bound to, as a `Host` names it (`127.0.0.2:4100`, say).
    bound: String,
    session_key: [u8; 32],
    /// Unspent codes with their expiry (unix ms), oldest first.
    codes: Mutex<Vec<(String, u64)>>,
}

impl Gate {
    /// The gate of the API bound to `addr`, whose bearer token is `token`.
    pub fn new(token: &str, addr: SocketAddr) -> Self {
        Self {
            token: token.to_owned(),
            port: addr.port(),
            bound: addr.to_string(),
            session_key: blake3::derive_key("kith web UI session cookie v1", token.as_bytes()),
            codes: Mutex::new(Vec::new()),
        }
    }

    /// The session cookie's name: per port, since browsers share cookies across the ports of
    /// one host and two daemons may run on one machine.
    pub fn cookie_name(&self) -> String {
        format!("kith_session_{}", self.port)
    }

    /// A new one-time code, valid for [`CODE_TTL_MS`].
    pub fn issue_code(&self, now_ms: u64) -> String {
        let mut bytes = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut bytes);
        let code = hex::encode(bytes);
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|(_, expires)| *expires > now_ms);
        if codes.len() >= MAX_CODES {
            codes.remove(0);
        }
        codes.push((code.clone(), now_ms + CODE_TTL_MS));
        code
    }

    /// Spends `code`: a session cookie value if it was issued, unspent and unexpired.
    pub fn redeem(&self, code: &str, now_ms: u64) -> Option<String> {
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|(_, expires)| *expires > now_ms);
        let at = codes
            .iter()
            .position(|(c, _)| bool::from(c.as_bytes().ct_eq(code.as_bytes())))?;
        codes.remove(at);
        drop(codes);
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        Some(self.session_value(now_ms, &hex::encode(nonce)))
    }

    fn mac(&self, issued_ms: u64, nonce: &str) -> String {
        let message = format!("{issued_ms}.{nonce}");
        blake3::keyed_hash(&self.session_key, message.as_bytes())
            .to_hex()
            .to_string()
    }

    fn session_value(&self, issued_ms: u64, nonce: &str) -> String {
        format!("{issued_ms}.{nonce}.{}", self.mac(issued_ms, nonce))
    }

    /// Whether `value` is a session this gate issued less than [`SESSION_TTL_MS`] ago.
    pub fn session_valid(&self, value: &str, now_ms: u64) -> bool {
        let mut parts = value.splitn(3, '.');
        let (Some(issued), Some(nonce), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(issued_ms) = issued.parse::<u64>() else {
            return false;
        };
        if issued_ms > now_ms.saturating_add(60_000)
            || now_ms.saturating_sub(issued_ms) > SESSION_TTL_MS
        {
            return false;
        }
        bool::from(self.mac(issued_ms, nonce).as_bytes().ct_eq(mac.as_bytes()))
    }

    /// The `Set-Cookie` value for a new session.
    pub fn set_cookie(&self, value: &str) -> String {
        format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            self.cookie_name(),
            SESSION_TTL_MS / 1000
        )
    }

    /// Whether `host` (a `Host` header) names this port on a loopback name, or the address
    /// the API is bound to.
    pub fn host_allowed(&self, host: &str) -> bool {
        if host == self.bound {
            return true;
        }
        let port = self.port.to_string();
        ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|name| host.strip_prefix(name).and_then(|r| r.strip_prefix(':')) == Some(&port))
    }

    /// Whether `origin` (an `Origin` header) is a page of this port.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .is_some_and(|host| self.host_allowed(host))
    }

    fn bearer_valid(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        bool::from(given.as_bytes().ct_eq(self.token.as_bytes()))
    }

    fn session_cookie<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then_some(v)
            })
    }

    /// Whether a browser request proves it comes from a page of this port.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        let origin_ok = match headers.get(header::ORIGIN).map(|v| v.to_str()) {
            None => true,
            Some(Ok(origin)) => self.origin_allowed(origin),
            Some(Err(_)) => false,
        };
        origin_ok && headers.contains_key(CSRF_HEADER)
    }

    /// Decides about one request.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        now_ms: u64,
    ) -> Result<Access, Refusal> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if !host.is_some_and(|h| self.host_allowed(h)) {
            return Err(Refusal::WrongHost);
        }
        let reads = method == Method::GET || method == Method::HEAD;
        if reads && is_public_asset(path) {
            return Ok(Access::Public);
        }
        if method == Method::POST && path == SESSION_PATH {
            return match self.same_origin(headers) {
                true => Ok(Access::Public),
                false => Err(Refusal::CrossSite),
            };
        }
        if self.bearer_valid(headers) {
            return Ok(Access::Bearer);
        }
        match self.session_cookie(headers) {
            Some(value) if self.session_valid(value, now_ms) => {
                if reads || self.same_origin(headers) {
                    Ok(Access::Session)
                } else {
                    Err(Refusal::CrossSite)
                }
            }
            _ => Err(Refusal::NoCredentials),
        }
    }
}

/// The page and its assets, which hold no data and need no credentials.
fn is_public_asset(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const NOW: u64 = 1_700_000_000_000;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4100))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        map
    }

    #[test]
    fn a_code_is_spent_once_and_expires() {
        let gate = Gate::new("token", addr());
        let code = gate.issue_code(NOW);
        assert!(gate.redeem("not-a-code", NOW).is_none());
        let session = gate.redeem(&code, NOW + 1000).expect("first use");
        assert!(gate.session_valid(&session, NOW + 2000));
        assert!(gate.redeem(&code, NOW + 1000).is_none(), "spent");
        let late = gate.issue_code(NOW);
        assert!(
            gate.redeem(&late, NOW + CODE_TTL_MS + 1).is_none(),
            "expired"
        );
    }

    #[test]
    fn only_the_newest_codes_are_kept() {
        let gate = Gate::new("token", addr());
        let first = gate.issue_code(NOW);
        let rest: Vec<String> = (0..MAX_CODES).map(|_| gate.issue_code(NOW)).collect();
        assert!(gate.redeem(&first, NOW).is_none());
        assert!(rest.iter().all(|c| gate.redeem(c, NOW).is_some()));
    }

    #[test]
    fn sessions_are_bound_to_the_token_and_expire() {
        let gate = Gate::new("token", addr());
        let code = gate.issue_code(NOW);
        let session = gate.redeem(&code, NOW).expect("session");
        // Another daemon (another token) does not take it; a restart of this one does.
        assert!(!Gate::new("other", addr()).session_valid(&session, NOW));
        assert!(Gate::new("token", addr()).session_valid(&session, NOW));
        assert!(!gate.session_valid(&session, NOW + SESSION_TTL_MS + 1));
        // A changed issue time or nonce breaks the MAC.
        let (issued, rest) = session.split_once('.').expect("parts");
        let forged = format!("{}.{rest}", issued.parse::<u64>().expect("ms") + 1);
        assert!(!gate.session_valid(&forged, NOW));
        assert!(!gate.session_valid("", NOW));
        assert!(!gate.session_valid("1.2", NOW));
        assert!(!gate.session_valid(&format!("{session}0"), NOW));
    }

    #[test]
    fn the_host_must_be_this_port_on_loopback() {
        let gate = Gate::new("token", addr());
        for ok in ["127.0.0.1:4100", "localhost:4100", "[::1]:4100"] {
            assert!(gate.host_allowed(ok), "{ok}");
        }
        let elsewhere = Gate::new("token", SocketAddr::from(([127, 0, 0, 2], 4100)));
        assert!(elsewhere.host_allowed("127.0.0.2:4100"));
        assert!(!elsewhere.host_allowed("127.0.0.3:4100"));
        for bad in [
            "127.0.0.1:4101",
            "127.0.0.1",
            "evil.example:4100",
            "localhost.evil.example:4100",
            "127.0.0.1:41000",
            "",
        ] {
            assert!(!gate.host_allowed(bad), "{bad}");
        }
        let get = |host: &str| gate.check(&Method::GET, "/", &headers(&[("host", host)]), NOW);
        assert_eq!(get("127.0.0.1:4100"), Ok(Access::Public));
        assert_eq!(get("attacker.example:4100"), Err(Refusal::WrongHost));
        // Even the bearer token does not get past a wrong Host.
        let with_token = headers(&[
            ("host", "rebind.example"),
            ("authorization", "Bearer token"),
        ]);
        assert_eq!(
            gate.check(&Method::GET, "/v1/id", &with_token, NOW),
            Err(Refusal::WrongHost)
        );
    }

    #[test]
    fn api_calls_need_the_token_or_a_session() {
        let gate = Gate::new("token", addr());
        let host = ("host", "127.0.0.1:4100");
        let check = |method: Method, pairs: &[(&'static str, &str)]| {
            gate.check(&method, "/v1/send", &headers(pairs), NOW)
        };
        assert_eq!(check(Method::GET, &[host]), Err(Refusal::NoCredentials));
        assert_eq!(
            check(Method::POST, &[host, ("authorization", "Bearer token")]),
            Ok(Access::Bearer)
        );
        assert_eq!(
            check(Method::POST, &[host, ("authorization", "Bearer toke")]),
            Err(Refusal::NoCredentials)
        );
        let session = gate.redeem(&gate.issue_code(NOW), NOW).expect("session");
        let cookie = format!("other=1; {}={session}", gate.cookie_name());
        let wrong_port_cookie = format!("kith_session_4101={session}");
        assert_eq!(
            check(Method::GET, &[host, ("cookie", &cookie)]),
            Ok(Access::Session)
        );
        assert_eq!(
            check(Method::GET, &[host, ("cookie", &wrong_port_cookie)]),
            Err(Refusal::NoCredentials)
        );
        assert_eq!(
            check(Method::GET, &[host, ("cookie", "kith_session_4100=1.2.3")]),
            Err(Refusal::NoCredentials)
        );
    }

    #[test]
    fn cookie_changes_need_the_same_origin_proof() {
        let gate = Gate::new("token", addr());
        let host = ("host", "127.0.0.1:4100");
        let session = gate.redeem(&gate.issue_code(NOW), NOW).expect("session");
        let cookie = format!("{}={session}", gate.cookie_name());
        let post = |pairs: &[(&'static str, &str)]| {
            let mut all = vec![host, ("cookie", cookie.as_str())];
            all.extend_from_slice(pairs);
            gate.check(&Method::POST, "/v1/send", &headers(&all), NOW)
        };
        // A cross-site form: cookie (if the browser sent it) but no header.
        assert_eq!(post(&[]), Err(Refusal::CrossSite));
        assert_eq!(
            post(&[("origin", "http://evil.example")]),
            Err(Refusal::CrossSite)
        );
        // Another local server on another port, even with the header.
        assert_eq!(
            post(&[(CSRF_HEADER, "1"), ("origin", "http://127.0.0.1:8080")]),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            post(&[(CSRF_HEADER, "1"), ("origin", "http://localhost:4100")]),
            Ok(Access::Session)
        );
        assert_eq!(post(&[(CSRF_HEADER, "1")]), Ok(Access::Session));
        // The code exchange itself is same-origin only.
        let exchange = |pairs: &[(&'static str, &str)]| {
            let mut all = vec![host];
            all.extend_from_slice(pairs);
            gate.check(&Method::POST, SESSION_PATH, &headers(&all), NOW)
        };
        assert_eq!(exchange(&[]), Err(Refusal::CrossSite));
        assert_eq!(
            exchange(&[(CSRF_HEADER, "1"), ("origin", "http://127.0.0.1:4100")]),
            Ok(Access::Public)
        );
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        let gate = Gate::new("token", addr());
        let set = gate.set_cookie("v");
        assert!(set.starts_with("kith_session_4100=v;"));
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
    }
}
