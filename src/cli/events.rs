//! `clupadm events [-c CLUSTER] [--since SEQ] [-f] [--json]`: the events
//! the local clupserver recorded (`GET /events`, with `http_token`), one
//! per line in [`Event::line`]'s fixed layout, or one JSON object per line;
//! `-f` asks again every second and prints the new ones until interrupted.

use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use super::{fail, reason, Failure, Opts, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE};
use crate::model::config::Config;
use crate::model::event::Event;
use crate::model::home::Home;

/// How often `-f` asks for new events.
const POLL: Duration = Duration::from_secs(1);

pub(super) fn cmd_events(home: &Home, o: Opts) -> Result<String, Failure> {
    let cfg = Config::load(&home.conf_file()).map_err(|e| fail(EXIT_USAGE, e.to_string()))?;
    let mut since = o.since.unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let mut unreachable_said = false;
    loop {
        match fetch(&cfg, since) {
            Ok(events) => {
                if unreachable_said {
                    eprintln!("clupadm: clupserver answers again");
                    unreachable_said = false;
                }
                for e in events {
                    since = since.max(e.seq);
                    if o.cluster.as_ref().is_some_and(|c| *c != e.cluster) {
                        continue;
                    }
                    let line = if o.json {
                        serde_json::to_string(&e).expect("json")
                    } else {
                        e.line()
                    };
                    // A closed pipe (`clupadm events -f | head`) ends quietly.
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        return Ok(String::new());
                    }
                }
            }
            // Following, clupserver may restart: say so once and go on.
            Err(f) if o.follow && f.code == EXIT_UNREACHABLE => {
                if !unreachable_said {
                    eprintln!("clupadm: {}; still trying", f.msg);
                    unreachable_said = true;
                }
            }
            Err(f) => return Err(f),
        }
        if !o.follow {
            return Ok(String::new());
        }
        std::thread::sleep(POLL);
    }
}

/// `GET /events?since=SEQ` from the local clupserver.
fn fetch(cfg: &Config, since: u64) -> Result<Vec<Event>, Failure> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{}/events?since={since}", cfg.http_port);
    let unreachable = |e: &ureq::Error| {
        fail(
            EXIT_UNREACHABLE,
            format!("Can not connect clupserver: {}", reason(e)),
        )
    };
    let mut resp = agent
        .get(&url)
        .header("X-Clup-Token", cfg.http_token.expose())
        .call()
        .map_err(|e| unreachable(&e))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| unreachable(&e))?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status != 200 || v["ok"] != Value::Bool(true) {
        let msg = v["error"].as_str().unwrap_or("no reason given");
        return Err(fail(
            EXIT_FAILED,
            match status {
                401 => format!("clupserver refused: {msg} (check http_token in clup.conf)"),
                _ => format!("clupserver answered {status}: {msg}"),
            },
        ));
    }
    serde_json::from_value(v["data"]["events"].clone()).map_err(|e| {
        fail(
            EXIT_FAILED,
            format!("unexpected answer from clupserver: {e}"),
        )
    })
}
