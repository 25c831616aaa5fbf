//! cstlb's management API, as a router that knows nothing of sockets, plus
//! the loop that feeds it ([`crate::util::http`]).
//!
//! - `GET /backend/list?token=` — the manual's shape, nothing added;
//! - `GET /backend/stats?token=` — our counters per backend;
//! - `GET /backend/add?backend=h:p&token=`, `GET /backend/delete?backend=h:p&token=`.
//!
//! The token (query `token=` or header `X-Cstlb-Token`) is compared in
//! constant time; a wrong or missing one, or none configured, is 401 and
//! nothing changes. Answers other than the list are `{"ok":..}` JSON like
//! clupserver's. The router never logs a token.

use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use serde_json::json;

use super::proxy::Shared;
use super::ring::{parse_backend, Outcome};
use crate::model::config::{constant_time_eq, Secret};
use crate::util::http;
use crate::util::url::split_url;

/// Longest request URL looked at (the real ones are under 100 bytes).
pub const MAX_URL: usize = 4096;

/// The API takes no body; anything longer than this is refused unread.
const MAX_BODY: usize = 4096;

pub struct Mgmt {
    pub shared: Arc<Shared>,
    /// None: no token source, every request is refused.
    pub token: Mutex<Option<Secret>>,
    /// Asks the health checker to check now (a backend was added).
    pub check_now: Sender<()>,
}

pub struct Answer {
    pub status: u16,
    pub body: String,
}

fn ok(v: serde_json::Value) -> Answer {
    Answer {
        status: 200,
        body: json!({"ok": true, "data": v}).to_string(),
    }
}

fn err(status: u16, msg: &str) -> Answer {
    Answer {
        status,
        body: json!({"ok": false, "error": msg}).to_string(),
    }
}

impl Mgmt {
    fn authorized(&self, given: Option<&str>) -> Result<(), Answer> {
        let want = self.token.lock().unwrap_or_else(|p| p.into_inner());
        let Some(want) = want.as_ref() else {
            return Err(err(401, "no management token configured on this cstlb"));
        };
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), want.expose().as_bytes()) => Ok(()),
            Some(_) => Err(err(401, "wrong token")),
            None => Err(err(
                401,
                "token required (query token= or header X-Cstlb-Token)",
            )),
        }
    }

    pub fn route(&self, method: &str, url: &str, header_token: Option<&str>) -> Answer {
        if url.len() > MAX_URL {
            return err(414, "request URL too long");
        }
        let (path, q) = split_url(url);
        let known = matches!(
            path,
            "/backend/list" | "/backend/stats" | "/backend/add" | "/backend/delete"
        );
        if !known {
            return err(404, "unknown path");
        }
        if method != "GET" {
            return err(405, "use GET");
        }
        let given = q.get("token").map(String::as_str).or(header_token);
        if let Err(a) = self.authorized(given) {
            return a;
        }
        let mut ring = self.shared.ring.lock().unwrap_or_else(|p| p.into_inner());
        match path {
            "/backend/list" => Answer {
                status: 200,
                body: ring.list_json(),
            },
            "/backend/stats" => ok(ring.stats_json()),
            _ => {
                let Some(b) = q.get("backend") else {
                    return err(400, "missing backend=IPv4:port");
                };
                let a = match parse_backend(b) {
                    Ok(a) => a,
                    Err(e) => return err(400, &format!("bad backend: {e}")),
                };
                if path == "/backend/add" {
                    let note = match ring.add(a) {
                        Outcome::AlreadyThere => "already present",
                        _ => {
                            log::info!("Add backend({a}): requested through the management API.");
                            let _ = self.check_now.try_send(());
                            "added"
                        }
                    };
                    ok(json!({"backend": a.to_string(), "note": note}))
                } else {
                    let note = match ring.delete(a) {
                        Outcome::Done => {
                            log::info!(
                                "Delete backend({a}): requested through the management API."
                            );
                            "deleted; open sessions go on"
                        }
                        _ => "not present",
                    };
                    ok(json!({"backend": a.to_string(), "note": note}))
                }
            }
        }
    }
}

/// Serve the management API on `listener` until `stop` is set, with the
/// same small HTTP server as clupserver's (an accept error such as EMFILE
/// is waited out, never the end of the API).
pub fn serve(listener: std::net::TcpListener, m: Arc<Mgmt>, stop: &std::sync::atomic::AtomicBool) {
    let handler: Arc<http::Handler> = Arc::new(move |req: http::Request| {
        let token = req.header("X-Cstlb-Token");
        let a = m.route(&req.method, &req.url, token.as_deref());
        http::Response::new(a.status, "application/json", a.body)
    });
    http::serve(listener, handler, MAX_BODY, stop);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::ring::Ring;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::Duration;

    fn mgmt(token: Option<&str>) -> Mgmt {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        Mgmt {
            shared: Arc::new(Shared {
                ring: Mutex::new(Ring::new()),
                stop: AtomicBool::new(false),
                listening: AtomicUsize::new(0),
                connect_timeout: Duration::from_secs(1),
                idle_timeout: None,
                drain_timeout: Duration::from_secs(1),
            }),
            token: Mutex::new(token.map(Secret::new)),
            check_now: tx,
        }
    }

    #[test]
    fn token_checks() {
        let m = mgmt(Some("s3cret"));
        assert_eq!(
            m.route("GET", "/backend/list?token=s3cret", None).status,
            200
        );
        assert_eq!(m.route("GET", "/backend/list", Some("s3cret")).status, 200);
        for (url, h) in [
            ("/backend/list", None),
            ("/backend/list?token=", None),
            ("/backend/list?token=s3cre", None),
            ("/backend/list?token=s3cret2", None),
            ("/backend/list", Some("S3CRET")),
            ("/backend/add?backend=10.0.0.1:5432&token=x", None),
        ] {
            let a = m.route("GET", url, h);
            assert_eq!(a.status, 401, "{url}");
            assert!(!a.body.contains("s3cret"));
        }
        assert!(m
            .route("GET", "/backend/list", None)
            .body
            .contains("token required"));
        assert_eq!(
            m.route("GET", "/backend/list?token=s3cret", None).body,
            "{}"
        );
        // No token source: everything refused, even an empty token.
        let m = mgmt(None);
        assert_eq!(m.route("GET", "/backend/list?token=", None).status, 401);
        assert_eq!(m.route("GET", "/backend/list", Some("")).status, 401);
    }

    #[test]
    fn add_delete_and_bad_input() {
        let m = mgmt(Some("t"));
        let a = m.route("GET", "/backend/add?backend=10.0.0.1:5432&token=t", None);
        assert_eq!((a.status, a.body.contains("\"added\"")), (200, true));
        let a = m.route("GET", "/backend/add?backend=10.0.0.1:5432&token=t", None);
        assert_eq!((a.status, a.body.contains("already present")), (200, true));
        let a = m.route("GET", "/backend/add?backend=10.0.0.2%3A5432&token=t", None);
        assert_eq!(a.status, 200);
        let a = m.route("GET", "/backend/delete?backend=10.0.0.9:5432&token=t", None);
        assert_eq!((a.status, a.body.contains("not present")), (200, true));
        let a = m.route("GET", "/backend/delete?backend=10.0.0.1:5432&token=t", None);
        assert_eq!((a.status, a.body.contains("deleted")), (200, true));
        assert_eq!(
            m.route("GET", "/backend/list?token=t", None).body,
            r#"{"10.0.0.2:5432":{"State":0,"NextAddress":"10.0.0.2:5432","PreAddress":"10.0.0.2:5432"}}"#
        );
        for url in [
            "/backend/add?token=t",
            "/backend/add?backend=&token=t",
            "/backend/add?backend=pg01:5432&token=t",
            "/backend/add?backend=10.0.0.1&token=t",
            "/backend/delete?backend=10.0.0.1:99999&token=t",
            "/backend/add?backend=%ff%fe&token=t",
        ] {
            let a = m.route("GET", url, None);
            assert_eq!(a.status, 400, "{url}");
            assert!(a.body.contains("\"ok\":false"));
        }
        assert_eq!(m.route("GET", "/nope?token=t", None).status, 404);
        assert_eq!(m.route("POST", "/backend/list?token=t", None).status, 405);
        let huge = format!("/backend/list?token=t&x={}", "a".repeat(1 << 20));
        assert_eq!(m.route("GET", &huge, None).status, 414);
        let s = m.route("GET", "/backend/stats?token=t", None);
        let v: serde_json::Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(v["data"]["backends"]["10.0.0.2:5432"]["active"], json!(0));
    }
}
