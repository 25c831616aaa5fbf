//! The clupserver side of cstlb: `GET <--clup url>` with `X-Clup-Token`,
//! answered by `{"ok":true,"data":{"cluster":..,"backends":[..],"cstlb_token":..}}`.
//!
//! Fetching is I/O with a bounded time; [`parse_answer`] is pure. What the
//! list means for the ring is [`Ring::reconcile`](super::ring::Ring::reconcile)'s
//! business, not this module's.

use std::time::Duration;

use serde_json::Value;

use super::ring::{parse_backend, Addr};
use crate::model::config::Secret;

/// What clupserver said.
#[derive(Debug, PartialEq)]
pub struct LbHost {
    pub cluster: String,
    pub backends: Vec<Addr>,
    pub mgr_token: Option<Secret>,
}

/// Largest answer read (a cluster lists a handful of standbys).
const MAX_ANSWER: u64 = 1 << 20;

pub fn fetch(url: &str, token: &Secret, timeout: Duration) -> Result<LbHost, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .header("X-Clup-Token", token.expose())
        .call()
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    parse_answer(status, &body)
}

pub fn parse_answer(status: u16, body: &str) -> Result<LbHost, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|_| format!("HTTP {status}, answer is not JSON"))?;
    if status != 200 || v["ok"] != Value::Bool(true) {
        let why = v["error"]
            .as_str()
            .map_or("no reason given".to_string(), crate::model::config::clip);
        let hint = if status == 401 {
            " (check CSTLB_TOKEN: it must be clupserver's http_token)"
        } else {
            ""
        };
        return Err(format!("HTTP {status}: {why}{hint}"));
    }
    let d = &v["data"];
    let list = d["backends"]
        .as_array()
        .ok_or("answer has no data.backends list")?;
    let mut backends = Vec::new();
    for b in list {
        let s = b
            .as_str()
            .ok_or("a backend in data.backends is not a string")?;
        let a = parse_backend(s).map_err(|e| {
            format!(
                "bad backend \"{}\" from clupserver: {e}",
                crate::model::config::clip(s)
            )
        })?;
        if !backends.contains(&a) {
            backends.push(a);
        }
    }
    let mgr_token = d["cstlb_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(Secret::new);
    Ok(LbHost {
        cluster: d["cluster"].as_str().unwrap_or("").to_string(),
        backends,
        mgr_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clupservers_answer() {
        let h = parse_answer(
            200,
            r#"{"ok":true,"data":{"cluster":"cluster01","backends":["10.213.0.42:5432","10.213.0.43:5432"],"cstlb_token":"tok"}}"#,
        )
        .unwrap();
        assert_eq!(h.cluster, "cluster01");
        assert_eq!(h.backends.len(), 2);
        assert_eq!(h.mgr_token.as_ref().map(|t| t.expose()), Some("tok"));
        let h = parse_answer(200, r#"{"ok":true,"data":{"backends":[]}}"#).unwrap();
        assert!(h.backends.is_empty() && h.mgr_token.is_none());
    }

    #[test]
    fn refuses_bad_answers_without_echoing_tokens() {
        let e = parse_answer(401, r#"{"ok":false,"error":"wrong token"}"#).unwrap_err();
        assert!(
            e.contains("HTTP 401: wrong token") && e.contains("CSTLB_TOKEN"),
            "{e}"
        );
        assert!(parse_answer(200, "<html>").is_err());
        assert!(parse_answer(200, r#"{"ok":true,"data":{}}"#).is_err());
        assert!(parse_answer(200, r#"{"ok":true,"data":{"backends":["pg02:5432"]}}"#).is_err());
        assert!(parse_answer(200, r#"{"ok":true,"data":{"backends":[5432]}}"#).is_err());
    }
}
