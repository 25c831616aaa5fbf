//! The client of cstlb's management port: list, add and remove read
//! backends.
//!
//! Owns: the HTTP requests (`GET http://<mgr>/backend/{list,add,delete}
//! ?backend=<h:p>&token=<token>`), their time bound (cstlb_timeout, whole
//! request) and [`CstlbError`]. Must not: decide which backends belong, retry,
//! or show the token (errors name the address and the reason only; any echo
//! of the token in a reply is masked).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::model::config::{Config, Secret};

/// A failed request to one cstlb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CstlbError {
    /// The management address, `h:p`.
    pub addr: String,
    /// `list`, `add 10.0.0.2:5432`, `delete 10.0.0.2:5432`.
    pub action: String,
    pub reason: String,
}

impl fmt::Display for CstlbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cstlb {}: {}: {}", self.addr, self.action, self.reason)
    }
}

impl std::error::Error for CstlbError {}

/// A client for cstlb management ports, one agent for all of them.
pub struct Client {
    agent: ureq::Agent,
    timeout: Duration,
}

impl Client {
    pub fn from_config(cfg: &Config) -> Client {
        Client::new(cfg.cstlb_timeout)
    }

    pub fn new(timeout: Duration) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // Management ports are on the cluster's network: never through
            // a proxy from the environment.
            .proxy(None)
            .max_redirects(0)
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
            timeout,
        }
    }

    fn get(
        &self,
        mgr: &str,
        action: &str,
        path: &str,
        backend: Option<&str>,
        token: &Secret,
    ) -> Result<String, CstlbError> {
        let err = |reason: String| CstlbError {
            addr: mgr.to_string(),
            action: action.to_string(),
            reason: mask(&reason, token),
        };
        let url = format!("http://{mgr}{path}");
        let mut req = self.agent.get(&url);
        if let Some(b) = backend {
            req = req.query("backend", b);
        }
        req = req.query("token", token.expose());
        let mut resp = req.call().map_err(|e| err(describe(&e, self.timeout)))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .map_err(|e| err(describe(&e, self.timeout)))?;
        if !(200..300).contains(&status) {
            let text: String = body.trim().chars().take(200).collect();
            return Err(err(if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            }));
        }
        Ok(body)
    }

    /// The backends of cstlb `mgr`, as it reports them:
    /// `{"h:p": {"State": 0, "NextAddress": ..., "PreAddress": ...}}`.
    pub fn list(
        &self,
        mgr: &str,
        token: &Secret,
    ) -> Result<BTreeMap<String, serde_json::Value>, CstlbError> {
        let body = self.get(mgr, "list", "/backend/list", None, token)?;
        serde_json::from_str(&body).map_err(|e| CstlbError {
            addr: mgr.to_string(),
            action: "list".to_string(),
            reason: format!("not a JSON object of backends: {e}"),
        })
    }

    /// Add `backend` (`h:p`) to cstlb `mgr`.
    pub fn add(&self, mgr: &str, backend: &str, token: &Secret) -> Result<(), CstlbError> {
        self.get(
            mgr,
            &format!("add {backend}"),
            "/backend/add",
            Some(backend),
            token,
        )
        .map(|_| ())
    }

    /// Remove `backend` (`h:p`) from cstlb `mgr`: it gets no new connections.
    pub fn delete(&self, mgr: &str, backend: &str, token: &Secret) -> Result<(), CstlbError> {
        self.get(
            mgr,
            &format!("delete {backend}"),
            "/backend/delete",
            Some(backend),
            token,
        )
        .map(|_| ())
    }
}

/// ureq's error in words, without the URL (it holds the token).
fn describe(e: &ureq::Error, timeout: Duration) -> String {
    match e {
        ureq::Error::Timeout(_) => format!("no answer within {:.1}s", timeout.as_secs_f64()),
        ureq::Error::Io(io) => io.to_string(),
        ureq::Error::ConnectionFailed => "connection failed".to_string(),
        ureq::Error::HostNotFound => "host not found".to_string(),
        ureq::Error::BadUri(_) => "bad address".to_string(),
        other => other.to_string(),
    }
}

fn mask(text: &str, token: &Secret) -> String {
    let t = token.expose();
    if t.is_empty() {
        return text.to_string();
    }
    let mut out = text.replace(t, "******");
    // The query string form too.
    let encoded: String = form_encode(t);
    if encoded != t {
        out = out.replace(&encoded, "******");
    }
    out
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Convenience: list via a fresh client with cfg's timeout and token.
pub fn list(mgr: &str, cfg: &Config) -> Result<BTreeMap<String, serde_json::Value>, CstlbError> {
    Client::from_config(cfg).list(mgr, &cfg.cstlb_token)
}

/// Convenience: add via a fresh client with cfg's timeout and token.
pub fn add(mgr: &str, backend: &str, cfg: &Config) -> Result<(), CstlbError> {
    Client::from_config(cfg).add(mgr, backend, &cfg.cstlb_token)
}

/// Convenience: delete via a fresh client with cfg's timeout and token.
pub fn delete(mgr: &str, backend: &str, cfg: &Config) -> Result<(), CstlbError> {
    Client::from_config(cfg).delete(mgr, backend, &cfg.cstlb_token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    const TOKEN: &str = "8e722522 d733&x=1";

    /// A cstlb stand-in on 127.0.0.1 answering `replies` in turn and
    /// reporting each request URL.
    fn fake(replies: Vec<(u16, &'static str)>) -> (String, mpsc::Receiver<String>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = server.server_addr().to_ip().unwrap().to_string();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (status, body) in replies {
                let Ok(req) = server.recv() else { return };
                tx.send(req.url().to_string()).unwrap();
                let _ =
                    req.respond(tiny_http::Response::from_string(body).with_status_code(status));
            }
        });
        (addr, rx)
    }

    #[test]
    fn requests_carry_backend_and_encoded_token() {
        let list_body = r#"{"10.0.0.2:5432":{"State":0,"NextAddress":"10.0.0.3:5432","PreAddress":"10.0.0.3:5432"},"10.0.0.3:5432":{"State":0,"NextAddress":"10.0.0.2:5432","PreAddress":"10.0.0.2:5432"}}"#;
        let (addr, urls) = fake(vec![(200, "ok"), (200, "ok"), (200, list_body)]);
        let c = Client::new(Duration::from_secs(2));
        let tok = Secret::new(TOKEN);
        c.delete(&addr, "10.0.0.2:5432", &tok).unwrap();
        assert_eq!(
            urls.recv().unwrap(),
            "/backend/delete?backend=10.0.0.2%3A5432&token=8e722522%20d733%26x%3D1"
        );
        c.add(&addr, "10.0.0.2:5432", &tok).unwrap();
        assert_eq!(
            urls.recv().unwrap(),
            "/backend/add?backend=10.0.0.2%3A5432&token=8e722522%20d733%26x%3D1"
        );
        let l = c.list(&addr, &tok).unwrap();
        assert_eq!(
            urls.recv().unwrap(),
            "/backend/list?token=8e722522%20d733%26x%3D1"
        );
        assert_eq!(l.len(), 2);
        assert_eq!(l["10.0.0.2:5432"]["NextAddress"], "10.0.0.3:5432");
    }

    #[test]
    fn http_errors_name_address_not_token() {
        let (addr, _urls) = fake(vec![
            (403, "bad token 8e722522 d733&x=1"),
            (500, ""),
            (200, "[1,2]"),
        ]);
        let c = Client::new(Duration::from_secs(2));
        let tok = Secret::new(TOKEN);
        let e = c.delete(&addr, "10.0.0.2:5432", &tok).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cstlb {addr}: delete 10.0.0.2:5432: HTTP 403: bad token ******")
        );
        let e = c.add(&addr, "10.0.0.2:5432", &tok).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cstlb {addr}: add 10.0.0.2:5432: HTTP 500")
        );
        let e = c.list(&addr, &tok).unwrap_err();
        assert!(e.reason.starts_with("not a JSON object"), "{e}");
    }

    #[test]
    fn unreachable_cstlb_fails_fast() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let c = Client::new(Duration::from_secs(1));
        let started = Instant::now();
        let e = c.list(&addr, &Secret::new(TOKEN)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!e.to_string().contains("8e722522"), "{e}");
        assert!(
            e.to_string().starts_with(&format!("cstlb {addr}: list: ")),
            "{e}"
        );
    }

    #[test]
    fn silent_cstlb_fails_within_the_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Accept and never answer.
        let keep = std::thread::spawn(move || {
            let c = l.accept();
            std::thread::sleep(Duration::from_secs(4));
            drop(c);
        });
        let c = Client::new(Duration::from_millis(700));
        let started = Instant::now();
        let e = c
            .delete(&addr, "10.0.0.2:5432", &Secret::new(TOKEN))
            .unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        assert_eq!(
            e.to_string(),
            format!("cstlb {addr}: delete 10.0.0.2:5432: no answer within 0.7s")
        );
        drop(keep);
    }

    #[test]
    fn masking() {
        let t = Secret::new("a b&c");
        assert_eq!(mask("x a b&c y a%20b%26c", &t), "x ****** y ******");
    }
}
