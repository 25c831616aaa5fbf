//! A small deterministic fuzzer over every parser that takes outside input:
//! clup.conf, init.json, change_meta, clupserver's router, cstlb's
//! management router and cstlb's reading of clupserver's answer.
//!
//! Each target first replays its corpus (`tests/corpus/<target>/`, inputs
//! that once were interesting), then runs a fixed number of mutations of a
//! few valid seeds with a seeded PRNG, so a failure is reproducible from the
//! seed printed with it (`CLUP_FUZZ_SEED`, `CLUP_FUZZ_ITERS` override).
//! Every input must give no panic, a clear error (non-empty, short, no
//! control characters, no secret echoed) or an accepted value that
//! re-validates. A failing input is written to `target/fuzz-failures/`.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clup::model::config::{Config, Secret};
use clup::model::meta::{self, parse_clusters};
use clup::server::api::{self, Ctx, Req};
use clup::store::{MetaDoc, MetaStore, StoreError};
use serde_json::{json, Value};

use crate::util::{sample_conf, SAMPLE_INIT};

// ---------------------------------------------------------------- the PRNG

/// splitmix64: tiny, fast, and good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Text that breaks shells, parsers and terminals.
pub const NASTY: &[&str] = &[
    ";",
    "$(",
    "$(touch /tmp/pwned)",
    "`id`",
    "'",
    "\"",
    "\\",
    "\0",
    "\n",
    "\r\n",
    "\t",
    "\x1b[31m",
    "%",
    "%00",
    "%ff",
    "%2F..%2F",
    "&",
    "=",
    "?",
    "#",
    "/",
    "..",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "18446744073709551616",
    "99999999999999999999999999999",
    "-9223372036854775809",
    "4294967296",
    "65536",
    "256",
    "1.5",
    "\u{feff}",
    "\u{202e}",
    "é",
    "\u{10ffff}",
    "${IFS}",
    "|",
    ">",
    "<",
    "*",
    "~",
];

fn nasty_blob(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => "x".repeat(1 + rng.below(100_000)).into_bytes(),
        1 => {
            let depth = 1 + rng.below(5000);
            let mut s = "[".repeat(depth);
            s.push_str(&"]".repeat(rng.below(depth + 1)));
            s.into_bytes()
        }
        2 => {
            let depth = 1 + rng.below(3000);
            "{\"a\":".repeat(depth).into_bytes()
        }
        3 => (0..1 + rng.below(64)).map(|_| rng.next() as u8).collect(),
        4 => vec![0xff, 0xfe, 0xc0, 0x80],
        _ => rng.pick(NASTY).as_bytes().to_vec(),
    }
}

/// One to four mutations of `seed`.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = if b.is_empty() {
            0
        } else {
            rng.below(b.len() + 1)
        };
        match rng.below(9) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 | 2 => {
                let tok = rng.pick(NASTY).as_bytes().to_vec();
                b.splice(at..at, tok);
            }
            3 => {
                let blob = nasty_blob(rng);
                b.splice(at..at, blob);
            }
            4 => b.truncate(at),
            5 if !b.is_empty() => {
                // duplicate a slice
                let from = rng.below(b.len());
                let to = (from + 1 + rng.below(64)).min(b.len());
                let piece = b[from..to].to_vec();
                b.splice(at..at, piece);
            }
            6 if !b.is_empty() => {
                // delete a slice
                let to = (at + 1 + rng.below(16)).min(b.len());
                b.drain(at.min(b.len())..to);
            }
            7 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = rng.next() as u8;
            }
            _ => {
                // replace a run of digits or a word with a nasty token
                let tok = rng.pick(NASTY).as_bytes().to_vec();
                let to = (at + rng.below(8)).min(b.len());
                b.splice(at..to, tok);
            }
        }
    }
    b
}

/// Structure-aware: replace one random node of a JSON value.
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
    fn nodes(v: &Value) -> usize {
        1 + match v {
            Value::Array(a) => a.iter().map(nodes).sum(),
            Value::Object(o) => o.values().map(nodes).sum(),
            _ => 0,
        }
    }
    fn nth<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
        if *n == 0 {
            return Some(v);
        }
        *n -= 1;
        match v {
            Value::Array(a) => a.iter_mut().find_map(|c| nth(c, n)),
            Value::Object(o) => o.values_mut().find_map(|c| nth(c, n)),
            _ => None,
        }
    }
    let mut n = rng.below(nodes(v));
    let slot = nth(v, &mut n).expect("node exists");
    let tok = String::from_utf8_lossy(&nasty_blob(rng)).into_owned();
    let old = slot.take();
    *slot = match rng.below(10) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(1.5),
        4 => json!(tok),
        5 => json!(format!(
            "{}{}",
            old.as_str().unwrap_or("x"),
            rng.pick(NASTY)
        )),
        6 => json!([]),
        7 => json!({}),
        8 => match old {
            Value::Object(o) => {
                let mut o = o.clone();
                o.insert(tok, json!(1));
                Value::Object(o)
            }
            Value::Array(a) => {
                let mut a = a.clone();
                if let Some(first) = a.first().cloned() {
                    a.push(first);
                }
                Value::Array(a)
            }
            other => other,
        },
        _ => json!(rng.next() % 70_000),
    };
}

// ------------------------------------------------------------- the driver

fn iters(default: usize) -> usize {
    std::env::var("CLUP_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("CLUP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C1_0FF5_EED5)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn save_failure(target: &str, tag: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{target}-{tag}"));
    let _ = std::fs::write(&p, input);
    p
}

/// Replay the corpus, then `n` mutations of `seeds`; `check` returns Err with
/// the reason an input is wrong. Panics (with seed and saved input) on the
/// first failure. Returns (inputs run, elapsed).
fn drive(
    target: &str,
    seeds: &[Vec<u8>],
    n: usize,
    mut gen: impl FnMut(&mut Rng, &[u8]) -> Vec<u8>,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
) -> (usize, Duration) {
    let t0 = Instant::now();
    let mut run = |tag: String, input: &[u8]| {
        let res = catch_unwind(AssertUnwindSafe(|| check(input)));
        let why = match res {
            Ok(Ok(())) => return,
            Ok(Err(why)) => why,
            Err(p) => format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
        };
        let saved = save_failure(target, &tag, input);
        let shown: String = String::from_utf8_lossy(input).chars().take(300).collect();
        panic!(
            "fuzz {target} ({tag}): {why}\ninput saved at {}\ninput (first 300 chars): {shown:?}",
            saved.display()
        );
    };
    let mut count = 0;
    for (name, input) in corpus(target) {
        run(format!("corpus-{name}"), &input);
        count += 1;
    }
    for s in seeds {
        run("seed".into(), s);
        count += 1;
    }
    let seed = base_seed() ^ fnv(target);
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let s = rng.pick(seeds).clone();
        let input = gen(&mut rng, &s);
        run(format!("seed{seed}-iter{i}"), &input);
        count += 1;
    }
    let took = t0.elapsed();
    eprintln!("fuzz {target}: {count} inputs in {took:?}");
    (count, took)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A clear message: non-empty, bounded, no control characters (which could
/// rewrite an operator's terminal), none of `secrets`.
fn clear_message(msg: &str, secrets: &[&str]) -> Result<(), String> {
    if msg.trim().is_empty() {
        return Err("empty error message".into());
    }
    if msg.len() > 2000 {
        return Err(format!("error message of {} bytes", msg.len()));
    }
    if msg.chars().any(|c| c.is_control() && c != '\n') {
        return Err(format!("control character in error message: {msg:?}"));
    }
    for s in secrets {
        if msg.contains(s) {
            return Err(format!("secret {s:?} echoed: {msg}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------ the secrets

const PASS: &str = "Hx7-adminPASS-q2";
const TOKEN: &str = "Tk9-httpTOKEN-z4";
const CSTLB: &str = "Cs3-cstlbTOKEN-w8";
const PROBE_PW: &str = "Pp1-probePW-m5";
const HA_PW: &str = "Ha2-haPW-n6";
const REPL_PW: &str = "Rp3-replPW-k7";
const ALL_SECRETS: &[&str] = &[PASS, TOKEN, CSTLB, PROBE_PW, HA_PW, REPL_PW];

fn secret_conf() -> String {
    sample_conf(8080)
        .replace("csha_cluster_pass", PASS)
        .replace("540cd628-d74e-11e7-992e-60f81dd129c2", TOKEN)
        .replace("8e722522-d733-11e7-93e8-60f81dd129c2", CSTLB)
        .replace(
            "probe_password = postgres",
            &format!("probe_password = {PROBE_PW}"),
        )
        .replace("ha_db_pass = postgres", &format!("ha_db_pass = {HA_PW}"))
        .replace(
            "db_repl_pass = postgres",
            &format!("db_repl_pass = {REPL_PW}"),
        )
        + "pg_bin_dir = /usr/lib/postgresql/16/bin\nssh_options = -o StrictHostKeyChecking=no\n"
}

// ------------------------------------------------------------- clup.conf

fn check_config(input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    match Config::parse(&text, Path::new("/opt/clup/conf/clup.conf")) {
        Ok(c) => {
            // Accepted values satisfy what later code relies on.
            for (k, v) in [
                ("probe_user", &c.probe_user),
                ("ha_db_user", &c.ha_db_user),
                ("db_repl_user", &c.db_repl_user),
                ("ssh_user", &c.ssh_user),
                ("probe_db_name", &c.probe_db_name),
            ] {
                if !clup::model::config::is_plain_name(v) {
                    return Err(format!("accepted {k} {v:?}"));
                }
            }
            if !c.pg_bin_dir.is_empty() && !clup::model::config::is_safe_path(&c.pg_bin_dir) {
                return Err(format!("accepted pg_bin_dir {:?}", c.pg_bin_dir));
            }
            for s in [
                &c.ha_rpc_pass,
                &c.http_token,
                &c.cstlb_token,
                &c.probe_password,
                &c.ha_db_pass,
                &c.db_repl_pass,
            ] {
                let s = s.expose();
                if s.is_empty() || s.chars().any(char::is_control) {
                    return Err(format!("accepted secret {s:?}"));
                }
            }
            let secs = |d: Duration| (1..=86_400).contains(&d.as_secs());
            if !secs(c.probe_interval) || !secs(c.lock_ttl) || !secs(c.probe_timeout) {
                return Err("accepted a duration out of range".into());
            }
            if c.http_port == 0 {
                return Err("accepted port 0".into());
            }
            let dbg = format!("{c:?}");
            for s in ALL_SECRETS {
                if dbg.contains(s) {
                    return Err(format!("Debug of Config shows {s}"));
                }
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            if !msg.starts_with("/opt/clup/conf/clup.conf") {
                return Err(format!("error does not name the file: {msg}"));
            }
            // A secret may be shown only when a mutation moved it into the
            // value of a non-secret key on the line the error names (the
            // operator's own line, e.g. a lost newline).
            let line = e
                .line
                .and_then(|l| text.lines().nth(l - 1))
                .unwrap_or("")
                .to_string();
            let secret_key = e.key.as_deref().is_some_and(|k| {
                clup::model::config::KEYS
                    .iter()
                    .any(|d| d.name == k && d.kind == clup::model::config::Kind::Secret)
            });
            let hidden: Vec<&str> = ALL_SECRETS
                .iter()
                .copied()
                .filter(|s| secret_key || !line.contains(s))
                .collect();
            clear_message(&msg, &hidden)
        }
    }
}

#[test]
fn fuzz_config() {
    let seeds = vec![secret_conf().into_bytes()];
    drive("config", &seeds, iters(20_000), mutate, check_config);
}

// ------------------------------------------------------------- init.json

/// Every string of an accepted cluster that reaches a shell, SQL or an
/// address must be free of anything a shell would interpret.
fn shell_safe(c: &meta::Cluster) -> Result<(), String> {
    let ok = |s: &str| {
        s.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "/._-:".contains(ch))
    };
    for d in &c.db_list {
        for (k, v) in [
            ("os_user", &d.os_user),
            ("pgdata", &d.pgdata),
            ("repl_app_name", &d.repl_app_name),
            ("host", &d.host),
            ("switch_host", &d.switch_host),
        ] {
            if !ok(v) || v.is_empty() {
                return Err(format!("accepted {k} {v:?}"));
            }
        }
    }
    for v in [&c.write_vip, &c.read_vip] {
        if v.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(format!("accepted VIP {v:?}"));
        }
    }
    Ok(())
}

fn check_meta(input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    match parse_clusters(&text) {
        Ok(cs) => {
            for (name, c) in &cs {
                meta::validate_cluster(name, c).map_err(|e| format!("re-validate: {e}"))?;
                shell_safe(c)?;
            }
            let again = serde_json::to_string(&cs).unwrap();
            let back = parse_clusters(&again).map_err(|e| format!("round trip: {e}"))?;
            if back != cs {
                return Err("round trip changed the clusters".into());
            }
            Ok(())
        }
        Err(e) => clear_message(&e.to_string(), ALL_SECRETS),
    }
}

fn json_gen(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    if rng.chance(2) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(seed) {
            for _ in 0..1 + rng.below(3) {
                mutate_json(rng, &mut v);
            }
            return v.to_string().into_bytes();
        }
    }
    mutate(rng, seed)
}

#[test]
fn fuzz_meta() {
    let seeds = vec![SAMPLE_INIT.as_bytes().to_vec()];
    drive("meta", &seeds, iters(20_000), json_gen, check_meta);
}

// --------------------------------------------- clupserver's router (no I/O)

/// The meta store in memory, validating on save like the file store.
struct MemStore(Mutex<MetaDoc>);

impl MetaStore for MemStore {
    fn load(&self) -> Result<MetaDoc, StoreError> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError> {
        doc.validate().map_err(StoreError::Invalid)?;
        let mut cur = self.0.lock().unwrap();
        if cur.version != doc.version {
            return Err(StoreError::Conflict {
                expected: doc.version,
                found: cur.version,
            });
        }
        *cur = doc.clone();
        cur.version += 1;
        Ok(cur.version)
    }
    fn exists(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn fresh_doc() -> MetaDoc {
    MetaDoc {
        version: 1,
        clusters: parse_clusters(SAMPLE_INIT).unwrap(),
        ..Default::default()
    }
}

fn router_ctx() -> Ctx {
    Ctx {
        cfg: Config::parse(&secret_conf(), Path::new("clup.conf")).unwrap(),
        store: Arc::new(MemStore(Mutex::new(fresh_doc()))),
        task_dir: std::env::temp_dir().join(format!("clup-fuzz-tasks-{}", std::process::id())),
        monitor: None,
    }
}

/// A request as bytes: `METHOD URL\nHeader: value\n...\n\nbody`, so one
/// byte mutator covers method, URL, headers and body.
fn encode_req(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {url}\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

struct Decoded {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn decode_req(input: &[u8]) -> Decoded {
    let split = input
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(input.len());
    let head = String::from_utf8_lossy(&input[..split]).into_owned();
    let body = input.get(split + 2..).unwrap_or(&[]).to_vec();
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or("");
    let (method, url) = first.split_once(' ').unwrap_or((first, "/"));
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Decoded {
        method: method.to_string(),
        url: url.to_string(),
        headers,
        body,
    }
}

fn call(ctx: &Ctx, d: &Decoded) -> api::Resp {
    let header = |name: &str| {
        d.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    api::route(
        ctx,
        &Req {
            method: &d.method,
            url: &d.url,
            header: &header,
            body: &d.body,
        },
    )
}

fn check_resp(d: &Decoded, r: &api::Resp, authed_pass: bool) -> Result<(), String> {
    if !matches!(r.status, 200 | 400 | 401 | 404 | 405 | 409 | 413 | 500) {
        return Err(format!("unexpected status {}", r.status));
    }
    // The status page (GET /): the one answer that is not JSON. It holds
    // no secret and no data (the page fetches those with the token).
    if let Some((ctype, page)) = &r.text {
        let path = d.url.split(['?', '#']).next().unwrap_or("");
        if !(d.method == "GET"
            && (path == "/" || path.is_empty())
            && r.status == 200
            && ctype.starts_with("text/html"))
        {
            return Err(format!(
                "a {ctype} answer with status {} to {} {}",
                r.status, d.method, d.url
            ));
        }
        if let Some(s) = ALL_SECRETS.iter().find(|s| page.contains(*s)) {
            return Err(format!("secret {s} in the status page"));
        }
        return Ok(());
    }
    let text = r.body.to_string();
    let ok = r.body["ok"].as_bool().ok_or("answer without ok")?;
    if ok != (r.status == 200) {
        return Err(format!("ok={ok} with status {}", r.status));
    }
    // cstlb_token is part of a successful get_lb_host answer, and only that.
    let lb_answer = r.status == 200 && d.url.contains("get_lb_host");
    // A secret the client itself put in the method, URL or body may come
    // back to it (e.g. in "no such endpoint"); one sent only in a header,
    // or not sent at all, never.
    let own = |s: &str| {
        d.method.contains(s) || d.url.contains(s) || String::from_utf8_lossy(&d.body).contains(s)
    };
    let secrets: Vec<&str> = ALL_SECRETS
        .iter()
        .copied()
        .filter(|s| !(own(s) || lb_answer && *s == CSTLB))
        .collect();
    if !ok {
        let e = r.body["error"].as_str().ok_or("error without text")?;
        clear_message(e, &secrets)?;
    } else {
        for s in &secrets {
            if text.contains(s) {
                return Err(format!("secret {s} in a 200 answer"));
            }
        }
    }
    // No admin command succeeds without the password.
    if ok && d.url.starts_with("/admin") && !authed_pass {
        return Err("admin command succeeded without the password".into());
    }
    Ok(())
}

fn router_seeds() -> Vec<Vec<u8>> {
    let meta = serde_json::to_value(&fresh_doc().clusters["cluster01"]).unwrap();
    let pass = [("X-Clup-Pass", PASS)];
    vec![
        encode_req(
            "GET",
            &format!("/cluster01/get_lb_host?token={TOKEN}"),
            &[],
            b"",
        ),
        encode_req(
            "GET",
            "/cluster01/get_lb_host",
            &[("X-Clup-Token", TOKEN)],
            b"",
        ),
        encode_req("GET", "/health", &[], b""),
        encode_req("POST", "/admin/show", &pass, b"{}"),
        encode_req(
            "POST",
            "/admin/get_meta",
            &pass,
            br#"{"cluster":"cluster01"}"#,
        ),
        encode_req("POST", "/admin/froze", &pass, br#"{"cluster":"cluster01"}"#),
        encode_req("POST", "/admin/unfroze", &pass, b"{}"),
        encode_req("POST", "/admin/show_task", &pass, b"{}"),
        encode_req(
            "POST",
            "/admin/task_log",
            &pass,
            br#"{"task":1,"offset":0}"#,
        ),
        encode_req(
            "POST",
            "/admin/change_meta",
            &pass,
            json!({"cluster": "cluster01", "meta": meta})
                .to_string()
                .as_bytes(),
        ),
        encode_req(
            "PUT",
            "/admin/show?x=%ff%fe%zz",
            &[("X-Clup-Pass", "x")],
            b"[1]",
        ),
    ]
}

#[test]
fn fuzz_router() {
    let ctx = router_ctx();
    let check = |input: &[u8]| {
        let d = decode_req(input);
        let authed = d
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x-clup-pass") && v == PASS);
        let r = call(&ctx, &d);
        check_resp(&d, &r, authed)?;
        // Whatever was accepted, the store still holds a valid document.
        ctx.store.load().unwrap().validate()
    };
    drive("router", &router_seeds(), iters(20_000), mutate, check);
}

/// change_meta with structure-aware mutations of the meta itself.
#[test]
fn fuzz_change_meta() {
    let ctx = router_ctx();
    let meta = serde_json::to_value(&fresh_doc().clusters["cluster01"]).unwrap();
    let seeds = vec![json!({"cluster": "cluster01", "meta": meta})
        .to_string()
        .into_bytes()];
    let mut accepted = 0usize;
    let check = |body: &[u8]| {
        let d = Decoded {
            method: "POST".into(),
            url: "/admin/change_meta".into(),
            headers: vec![("X-Clup-Pass".into(), PASS.into())],
            body: body.to_vec(),
        };
        let before = ctx.store.load().unwrap();
        let r = call(&ctx, &d);
        check_resp(&d, &r, true)?;
        let after = ctx.store.load().unwrap();
        if r.status == 200 {
            accepted += 1;
            after.validate()?;
            for c in after.clusters.values() {
                shell_safe(c)?;
            }
        } else if after != before {
            return Err(format!("refused ({}) but the meta changed", r.status));
        }
        // Put the sample back so mutations keep starting from valid meta.
        let mut fresh = fresh_doc();
        fresh.version = after.version;
        ctx.store
            .save(&fresh)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    drive("change_meta", &seeds, iters(5_000), json_gen, check);
    eprintln!("fuzz change_meta: {accepted} changes accepted");
}

// ------------------------------------------------------------------ cstlb

fn mgmt() -> clup::lb::mgmt::Mgmt {
    use clup::lb::proxy::Shared;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::mem::forget(rx);
    clup::lb::mgmt::Mgmt {
        shared: Arc::new(Shared {
            ring: Mutex::new(clup::lb::ring::Ring::new()),
            stop: Default::default(),
            listening: Default::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            drain_timeout: Duration::from_secs(1),
        }),
        token: Mutex::new(Some(Secret::new(CSTLB))),
        check_now: tx,
    }
}

#[test]
fn fuzz_cstlb_mgmt() {
    let m = mgmt();
    let seeds: Vec<Vec<u8>> = [
        format!("GET /backend/list?token={CSTLB}"),
        format!("GET /backend/stats?token={CSTLB}"),
        format!("GET /backend/add?backend=127.0.0.1:5432&token={CSTLB}"),
        format!("GET /backend/delete?backend=127.0.0.1:5432&token={CSTLB}"),
        format!("GET /backend/add?backend=127.0.0.2%3A5433\n{CSTLB}"),
        "GET /backend/list\nwrong".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let check = |input: &[u8]| {
        let text = String::from_utf8_lossy(input);
        let (line, header) = text.split_once('\n').unwrap_or((&text, ""));
        let (method, url) = line.split_once(' ').unwrap_or((line, "/"));
        let header = (!header.is_empty()).then_some(header);
        let a = m.route(method, url, header);
        if !matches!(a.status, 200 | 400 | 401 | 404 | 405 | 414) {
            return Err(format!("unexpected status {}", a.status));
        }
        let v: Value = serde_json::from_str(&a.body).map_err(|e| format!("not JSON: {e}"))?;
        if a.body.contains(CSTLB) {
            return Err("token echoed".into());
        }
        if a.status != 200 {
            clear_message(v["error"].as_str().ok_or("no error text")?, ALL_SECRETS)?;
        }
        let authed = url.contains(&format!("token={CSTLB}")) || header == Some(CSTLB);
        if a.status == 200 && !authed {
            // The token may also arrive %-encoded; accept only if it decodes.
            let (_, q) = clup::util::url::split_url(url);
            if q.get("token").map(String::as_str) != Some(CSTLB) && header != Some(CSTLB) {
                return Err("answered 200 without the token".into());
            }
        }
        // The ring stays consistent: its list is valid JSON of IPv4:port keys.
        let list: BTreeMap<String, Value> =
            serde_json::from_str(&m.shared.ring.lock().unwrap().list_json())
                .map_err(|e| format!("ring list: {e}"))?;
        for k in list.keys() {
            clup::lb::ring::parse_backend(k).map_err(|e| format!("ring holds {k:?}: {e}"))?;
        }
        Ok(())
    };
    drive("cstlb_mgmt", &seeds, iters(20_000), mutate, check);
}

#[test]
fn fuzz_cstlb_reads_clupserver_answer() {
    let seeds: Vec<Vec<u8>> = [
        format!(
            r#"200 {{"ok":true,"data":{{"cluster":"cluster01","backends":["127.0.56.42:5432","127.0.56.43:5432"],"cstlb_token":"{CSTLB}"}}}}"#
        ),
        r#"200 {"ok":true,"data":{"backends":[]}}"#.to_string(),
        r#"401 {"ok":false,"error":"wrong or missing token"}"#.to_string(),
        r#"500 {"ok":false,"error":"cluster meta is corrupt"}"#.to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let check = |input: &[u8]| {
        let text = String::from_utf8_lossy(input);
        let (st, body) = text.split_once(' ').unwrap_or(("200", &text));
        let status: u16 = st.parse().unwrap_or(200);
        match clup::lb::clup::parse_answer(status, body) {
            Ok(h) => {
                for b in &h.backends {
                    clup::lb::ring::parse_backend(&b.to_string())
                        .map_err(|e| format!("accepted backend {b}: {e}"))?;
                }
                if h.mgr_token.as_ref().is_some_and(|t| t.expose().is_empty()) {
                    return Err("accepted an empty token".into());
                }
                if format!("{h:?}").contains(CSTLB) {
                    return Err("Debug shows the token".into());
                }
                Ok(())
            }
            // clupserver's own error text is shown as it came, so only the
            // token it sent in data (never in an error) must not appear.
            Err(e) => {
                if e.trim().is_empty() {
                    return Err("empty error".into());
                }
                let echoed_error = serde_json::from_str::<Value>(body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if e.contains(CSTLB) && !echoed_error.contains(CSTLB) {
                    return Err(format!("token echoed: {e}"));
                }
                if e.len() > 2000 + echoed_error.len() {
                    return Err(format!("error of {} bytes", e.len()));
                }
                Ok(())
            }
        }
    };
    drive("clup_answer", &seeds, iters(20_000), json_or_bytes, check);
}

fn json_or_bytes(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(seed);
    let (st, body) = text.split_once(' ').unwrap_or(("200", &text));
    let mut out = st.as_bytes().to_vec();
    out.push(b' ');
    out.extend(json_gen(rng, body.as_bytes()));
    out
}

#[test]
fn prng_is_deterministic() {
    let a: Vec<u64> = {
        let mut r = Rng::new(7);
        (0..4).map(|_| r.next()).collect()
    };
    let mut r = Rng::new(7);
    assert_eq!(a, (0..4).map(|_| r.next()).collect::<Vec<_>>());
    let mut r = Rng::new(1);
    let m1 = mutate(&mut r, b"abc=def");
    let mut r = Rng::new(1);
    assert_eq!(m1, mutate(&mut r, b"abc=def"));
}
