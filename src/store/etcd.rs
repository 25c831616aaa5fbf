//! etcd as the meta store and as the arbiter of which monitor leads.
//!
//! Owns: a minimal etcd v3 client over the v3 JSON gateway (plain HTTP POSTs
//! of JSON to `/v3/...`, keys and values in base64), [`EtcdStore`] (the
//! [`MetaDoc`] under `<prefix>/meta`, saved by compare-and-swap), and the
//! leader lease ([`Campaign`], [`Leader`]): a key `<prefix>/leader` bound to a
//! lease, and saves fenced on holding it.
//!
//! Must not: decide anything about clusters, start threads, sleep or retry
//! beyond trying the next endpoint once, or print what it stores. Every
//! request is bounded: one attempt per endpoint, each at most the configured
//! timeout, so a call takes at most endpoints x timeout.
//!
//! Writes are never sent twice when the first may have been applied: a
//! request whose connection was refused (or never set up) moves on to the
//! next endpoint, but one that was sent and got no answer is reported as of
//! unknown outcome instead of being retried elsewhere, because a compare-and-
//! swap that did succeed would then fail on its own effect.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::model::config::parse_endpoint;
use crate::store::{MetaDoc, MetaStore, StoreError};

// ---------------------------------------------------------------- base64

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as the gateway encodes `bytes` fields.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict decoding of standard, padded base64: anything else is `None`.
pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let s = text.as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let last = ci == s.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        // Bits that padding drops must be zero, or two texts would decode
        // to the same bytes.
        if bytes[3 - pad..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

// ---------------------------------------------------------------- errors

/// Why a request to etcd failed. Every variant names the endpoint(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdError {
    /// No endpoint took the request: each endpoint with its reason.
    Unreachable(Vec<(String, String)>),
    /// A write was sent and no answer came: it may or may not have been
    /// applied (typically etcd has lost its quorum).
    Unknown { endpoint: String, reason: String },
    /// etcd answered with an error (gRPC code and message).
    Server {
        endpoint: String,
        code: i64,
        message: String,
    },
    /// The answer is not what the v3 gateway sends.
    BadReply { endpoint: String, reason: String },
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Unreachable(tries) => {
                f.write_str("no etcd endpoint answered: ")?;
                for (i, (ep, why)) in tries.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{ep}: {why}")?;
                }
                Ok(())
            }
            EtcdError::Unknown { endpoint, reason } => write!(
                f,
                "etcd {endpoint}: {reason} after the write was sent; \
                 whether it was applied is unknown (has etcd lost its quorum?)"
            ),
            EtcdError::Server {
                endpoint,
                code,
                message,
            } => write!(f, "etcd {endpoint}: {message} (code {code})"),
            EtcdError::BadReply { endpoint, reason } => {
                write!(f, "etcd {endpoint}: unexpected reply: {reason}")
            }
        }
    }
}

impl std::error::Error for EtcdError {}

/// gRPC's UNAVAILABLE: "no leader", "request timed out", "leader changed".
const CODE_UNAVAILABLE: i64 = 14;
/// gRPC's NOT_FOUND: "requested lease not found".
const CODE_NOT_FOUND: i64 = 5;

/// How one attempt at one endpoint failed.
enum Attempt {
    /// The request never reached etcd: the next endpoint may take it.
    NotSent(String),
    /// It was sent; what etcd did with it is unknown.
    Lost(String),
    /// etcd answered, and said no.
    Failed(EtcdError),
}

// ---------------------------------------------------------------- wire types

/// int64 fields come as JSON strings from the gateway; accept numbers too.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::I(n) => Ok(n),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct WireKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_i64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    version: i64,
    #[serde(default, deserialize_with = "de_i64")]
    lease: i64,
}

#[derive(Deserialize, Default)]
struct WireRange {
    #[serde(default)]
    kvs: Vec<WireKv>,
}

#[derive(Deserialize, Default)]
struct WireOpResponse {
    response_range: Option<WireRange>,
    response_put: Option<Value>,
    response_delete_range: Option<Value>,
}

#[derive(Deserialize, Default)]
struct WireTxn {
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<WireOpResponse>,
}

#[derive(Deserialize)]
struct WireLease {
    #[serde(rename = "ID", deserialize_with = "de_i64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// How often the key was written since it was (re)created.
    pub version: i64,
    /// The lease it is bound to, 0 for none.
    pub lease: i64,
}

impl WireKv {
    fn decode(self) -> Result<Kv, String> {
        let key = b64_decode(&self.key).ok_or("a key is not base64")?;
        let value = b64_decode(&self.value).ok_or("a value is not base64")?;
        Ok(Kv {
            key,
            value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        })
    }
}

/// What a compare in a transaction looks at; it must be equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The key's write count (0: the key does not exist).
    Version(i64),
    /// The revision that created it (0: the key does not exist).
    Create(i64),
    Mod(i64),
    /// Its value (never equal when the key does not exist).
    Value(Vec<u8>),
    /// The lease it is bound to.
    Lease(i64),
}

/// `key`'s `target` must equal the given value for the transaction to take
/// its success branch. (clup needs no other comparison than equality.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub target: Target,
}

impl Compare {
    pub fn new(key: impl Into<Vec<u8>>, target: Target) -> Compare {
        Compare {
            key: key.into(),
            target,
        }
    }

    fn to_json(&self) -> Value {
        let key = b64_encode(&self.key);
        let (target, field, value) = match &self.target {
            Target::Version(v) => ("VERSION", "version", json!(v.to_string())),
            Target::Create(v) => ("CREATE", "create_revision", json!(v.to_string())),
            Target::Mod(v) => ("MOD", "mod_revision", json!(v.to_string())),
            Target::Value(v) => ("VALUE", "value", json!(b64_encode(v))),
            Target::Lease(v) => ("LEASE", "lease", json!(v.to_string())),
        };
        json!({"key": key, "result": "EQUAL", "target": target, field: value})
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get(Vec<u8>),
    /// Put a value, bound to a lease unless it is 0.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(Vec<u8>),
}

impl Op {
    fn to_json(&self) -> Value {
        match self {
            Op::Get(k) => json!({"request_range": {"key": b64_encode(k)}}),
            Op::Put { key, value, lease } => {
                let mut put = json!({"key": b64_encode(key), "value": b64_encode(value)});
                if *lease != 0 {
                    put["lease"] = json!(lease.to_string());
                }
                json!({ "request_put": put })
            }
            Op::Delete(k) => json!({"request_delete_range": {"key": b64_encode(k)}}),
        }
    }

    fn is_write(&self) -> bool {
        !matches!(self, Op::Get(_))
    }
}

/// A transaction: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// The request body of `/v3/kv/txn`.
    pub fn to_json(&self) -> Value {
        let ops = |v: &[Op]| v.iter().map(Op::to_json).collect::<Vec<_>>();
        json!({
            "compare": self.compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": ops(&self.success),
            "failure": ops(&self.failure),
        })
    }
}

/// The answer to one operation of the branch that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// The keys found (none when it does not exist).
    Get(Vec<Kv>),
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// One per operation of the branch that ran, in order.
    pub results: Vec<OpResult>,
}

impl TxnResult {
    /// The key read by the `i`-th operation of the branch that ran, if found.
    pub fn got(&self, i: usize) -> Option<&Kv> {
        match self.results.get(i) {
            Some(OpResult::Get(kvs)) => kvs.first(),
            _ => None,
        }
    }
}

/// Parse a `/v3/kv/txn` answer.
fn parse_txn(v: Value) -> Result<TxnResult, String> {
    let w: WireTxn = serde_json::from_value(v).map_err(|e| format!("txn answer: {e}"))?;
    let mut results = Vec::with_capacity(w.responses.len());
    for r in w.responses {
        results.push(if let Some(range) = r.response_range {
            OpResult::Get(
                range
                    .kvs
                    .into_iter()
                    .map(WireKv::decode)
                    .collect::<Result<_, _>>()?,
            )
        } else if r.response_put.is_some() {
            OpResult::Put
        } else if r.response_delete_range.is_some() {
            OpResult::Delete
        } else {
            return Err("txn answer: an operation result of unknown kind".to_string());
        });
    }
    Ok(TxnResult {
        succeeded: w.succeeded,
        results,
    })
}

// ---------------------------------------------------------------- client

/// An etcd v3 client over the JSON gateway, for a list of endpoints.
///
/// Each call tries the endpoint that last answered first, then the others in
/// order. It is `Sync`: threads may share one client.
pub struct Client {
    endpoints: Vec<String>,
    timeout: Duration,
    agent: ureq::Agent,
    /// The endpoint that answered last; tried first.
    preferred: AtomicUsize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The largest answer read (etcd's own request limit is 1.5 MiB, which
/// base64 and JSON make about 2 MiB).
const MAX_REPLY: u64 = 8 << 20;

impl Client {
    /// A client for `endpoints` (each `http://host:port`, checked here too),
    /// with `timeout` for each attempt at one endpoint.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Client, String> {
        if endpoints.is_empty() {
            return Err("no etcd endpoints".to_string());
        }
        let endpoints = endpoints
            .iter()
            .map(|e| parse_endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // A connect that will not finish is given half the budget, so
            // that it is reported as a refusal to connect (safe to take
            // elsewhere) rather than as a request without an answer.
            .timeout_connect(Some(timeout / 2))
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            // No pooled connections: a connection kept from before an etcd
            // restart fails only after the request was written on it,
            // which would turn a harmless refusal into an unknown outcome.
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .build();
        Ok(Client {
            endpoints,
            timeout,
            agent: ureq::Agent::new_with_config(config),
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// POST `body` to `path` at each endpoint in turn until one answers;
    /// the answer and who gave it. `idempotent`: may be sent again
    /// elsewhere after no answer.
    fn call(&self, path: &str, body: &Value, idempotent: bool) -> Result<(Value, &str), EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut tries = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            match self.post_once(ep, path, &body) {
                Ok(v) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((v, ep));
                }
                Err(Attempt::NotSent(why)) => tries.push((ep.clone(), why)),
                Err(Attempt::Lost(why)) if idempotent => tries.push((ep.clone(), why)),
                Err(Attempt::Lost(why)) => {
                    return Err(EtcdError::Unknown {
                        endpoint: ep.clone(),
                        reason: why,
                    })
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(EtcdError::Unreachable(tries))
    }

    fn post_once(&self, ep: &str, path: &str, body: &str) -> Result<Value, Attempt> {
        let url = format!("{ep}{path}");
        let mut resp = self
            .agent
            .post(&url)
            .content_type("application/json")
            .send(body)
            .map_err(|e| classify(&e, self.timeout))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_string()
            .map_err(|e| Attempt::Lost(describe(&e, self.timeout)))?;
        let bad = |reason: String| {
            Attempt::Failed(EtcdError::BadReply {
                endpoint: ep.to_string(),
                reason,
            })
        };
        // A streaming call (lease keepalive) answers one JSON object per
        // line, `{"result": ...}` or `{"error": ...}`; one request, one line.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let mut v: Value = serde_json::from_str(first).map_err(|_| {
            let shown: String = text.trim().chars().take(200).collect();
            bad(format!("HTTP {status} to {path}, not JSON: {shown}"))
        })?;
        if let Some(inner) = v.get_mut("result") {
            v = inner.take();
        } else if let Some(e) = v.get("error").filter(|e| e.is_object()) {
            v = e.clone();
        }
        let code = v.get("code").and_then(Value::as_i64);
        if status != 200 || code.is_some_and(|c| c != 0) {
            let message = v
                .get("message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map(crate::model::config::clip)
                .unwrap_or_else(|| format!("HTTP {status}"));
            let code = code.unwrap_or(-1);
            if code == CODE_UNAVAILABLE {
                return Err(Attempt::Lost(message));
            }
            return Err(Attempt::Failed(EtcdError::Server {
                endpoint: ep.to_string(),
                code,
                message,
            }));
        }
        Ok(v)
    }
}

fn bad(endpoint: &str, reason: String) -> EtcdError {
    EtcdError::BadReply {
        endpoint: endpoint.to_string(),
        reason,
    }
}

impl Client {
    /// The key, if it exists (a linearizable read: it needs etcd's quorum).
    pub fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let (v, ep) = self.call("/v3/kv/range", &json!({"key": b64_encode(key)}), true)?;
        let r: WireRange =
            serde_json::from_value(v).map_err(|e| bad(ep, format!("range answer: {e}")))?;
        match r.kvs.into_iter().next() {
            None => Ok(None),
            Some(kv) => kv.decode().map(Some).map_err(|e| bad(ep, e)),
        }
    }

    /// Put a value, bound to `lease` unless it is 0.
    pub fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let op = Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        };
        self.call("/v3/kv/put", &op.to_json()["request_put"], false)
            .map(|_| ())
    }

    /// Delete a key (no error when it does not exist).
    pub fn delete(&self, key: &[u8]) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/deleterange",
            &json!({"key": b64_encode(key)}),
            false,
        )
        .map(|_| ())
    }

    /// Run a transaction. One that only reads may be sent to the next
    /// endpoint after no answer; one that writes may not.
    pub fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        let writes = txn.success.iter().chain(&txn.failure).any(Op::is_write);
        let (v, ep) = self.call("/v3/kv/txn", &txn.to_json(), !writes)?;
        parse_txn(v).map_err(|e| bad(ep, e))
    }

    /// Grant a lease of `ttl` seconds; its id and the TTL etcd granted
    /// (etcd raises a TTL below its minimum).
    pub fn lease_grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = ttl.as_secs().max(1);
        // A lease granted without our hearing of it simply expires.
        let (v, ep) = self.call(
            "/v3/lease/grant",
            &json!({"TTL": secs.to_string(), "ID": "0"}),
            true,
        )?;
        let l: WireLease =
            serde_json::from_value(v).map_err(|e| bad(ep, format!("lease answer: {e}")))?;
        if l.id == 0 || l.ttl <= 0 {
            return Err(bad(ep, "lease granted without an id or a TTL".to_string()));
        }
        Ok((l.id, Duration::from_secs(l.ttl as u64)))
    }

    /// Renew a lease; the TTL it was renewed for, `None` if it is gone
    /// (expired or revoked).
    pub fn lease_keepalive(&self, lease: i64) -> Result<Option<Duration>, EtcdError> {
        let (v, ep) = self.call(
            "/v3/lease/keepalive",
            &json!({"ID": lease.to_string()}),
            true,
        )?;
        let l: WireLease =
            serde_json::from_value(v).map_err(|e| bad(ep, format!("keepalive answer: {e}")))?;
        Ok((l.ttl > 0).then(|| Duration::from_secs(l.ttl as u64)))
    }

    /// Revoke a lease, deleting its keys. A lease already gone is no error.
    pub fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}), true) {
            Ok(_) => Ok(()),
            Err(EtcdError::Server { code, .. }) if code == CODE_NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Sort ureq's error: did the request reach etcd?
fn classify(e: &ureq::Error, timeout: Duration) -> Attempt {
    use std::io::ErrorKind as K;
    match e {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => Attempt::NotSent(
            format!("cannot connect within {:.1}s", (timeout / 2).as_secs_f64()),
        ),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::BadUri(_) => {
            Attempt::NotSent(describe(e, timeout))
        }
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::NetworkDown
                    | K::AddrNotAvailable
            ) =>
        {
            Attempt::NotSent(describe(e, timeout))
        }
        _ => Attempt::Lost(describe(e, timeout)),
    }
}

/// ureq's error in words, without the URL.
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

// ---------------------------------------------------------------- meta store

/// `prefix` without trailing slashes, joined with `name`: `/clup` + `meta`.
fn key_under(prefix: &str, name: &str) -> String {
    format!("{}/{name}", prefix.trim_end_matches('/'))
}

/// The meta in etcd: one JSON document under `<prefix>/meta`.
///
/// The compare-and-swap uses etcd's own write count of the key (its
/// `version`): every save by clup is one put, so the document's `version`
/// and the key's write count move together (a put on a missing key creates
/// it with count 1, the version of a first save). A save is then one
/// transaction, "if the key's count is still `doc.version`, put", and needs
/// no read first; a missing key has count 0, so a first save also refuses to
/// overwrite a document someone created meanwhile. A document whose
/// `version` differs from the count was written by something other than
/// clup, and is refused as corrupt like any other damage.
pub struct EtcdStore {
    client: Arc<Client>,
    key: String,
}

impl EtcdStore {
    pub fn new(client: Arc<Client>, prefix: &str) -> EtcdStore {
        EtcdStore {
            client,
            key: key_under(prefix, "meta"),
        }
    }

    /// The key holding the document.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn place(&self) -> String {
        format!("etcd key {}", self.key)
    }

    fn remote(&self, e: EtcdError) -> StoreError {
        StoreError::Remote(format!("meta {}: {e}", self.place()))
    }

    /// Check a stored document; `None` for a missing key.
    fn decode(&self, kv: Option<&Kv>) -> Result<Option<MetaDoc>, StoreError> {
        let Some(kv) = kv else { return Ok(None) };
        let corrupt = |m: String| StoreError::Corrupt(self.place(), m);
        let doc: MetaDoc = serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
        if doc.version == 0 {
            return Err(corrupt("version 0 in a saved document".to_string()));
        }
        if doc.version != kv.version as u64 {
            return Err(corrupt(format!(
                "the document says version {} but the key was written {} times: \
                 written by something other than clup",
                doc.version, kv.version
            )));
        }
        doc.validate().map_err(corrupt)?;
        Ok(Some(doc))
    }

    fn read(&self) -> Result<Option<MetaDoc>, StoreError> {
        let kv = self
            .client
            .get(self.key.as_bytes())
            .map_err(|e| self.remote(e))?;
        self.decode(kv.as_ref())
    }

    /// The transaction of a save; `fence` adds the leader's compares.
    fn save_txn(&self, doc: &MetaDoc, fence: Option<&Leader>) -> Result<(Txn, u64), StoreError> {
        doc.validate().map_err(StoreError::Invalid)?;
        let mut next = doc.clone();
        next.version = doc.version + 1;
        let value = serde_json::to_vec(&next).expect("meta serializes");
        let mut txn = Txn {
            compare: vec![Compare::new(
                self.key.as_bytes(),
                Target::Version(doc.version as i64),
            )],
            success: vec![Op::Put {
                key: self.key.as_bytes().to_vec(),
                value,
                lease: 0,
            }],
            failure: vec![Op::Get(self.key.as_bytes().to_vec())],
        };
        if let Some(l) = fence {
            txn.compare.extend(l.compares());
            txn.failure.push(Op::Get(l.key.as_bytes().to_vec()));
        }
        Ok((txn, next.version))
    }

    /// Save only while `leader` still holds the leader key with its lease:
    /// a monitor that lost the lease (expired, revoked, another elected)
    /// gets [`StoreError::NotLeader`] and writes nothing, whatever its own
    /// clock believes.
    pub fn save_fenced(&self, doc: &MetaDoc, leader: &Leader) -> Result<u64, StoreError> {
        let (txn, next) = self.save_txn(doc, Some(leader))?;
        let r = self.client.txn(&txn).map_err(|e| self.remote(e))?;
        if r.succeeded {
            return Ok(next);
        }
        let holder = r.got(1);
        if !leader.is_holder(holder) {
            leader.mark_lost();
            return Err(StoreError::NotLeader(format!(
                "{} is no longer the leader ({}); the save was refused",
                leader.id,
                describe_holder(holder)
            )));
        }
        Err(StoreError::Conflict {
            expected: doc.version,
            found: r.got(0).map_or(0, |kv| kv.version as u64),
        })
    }

    /// Move a corrupt document aside to `<key>.corrupt.<secs>` and delete
    /// it, in one transaction that holds only if it did not change since it
    /// was read. Returns the key it now lives under.
    fn set_aside(&self) -> Result<String, StoreError> {
        let kv = self
            .client
            .get(self.key.as_bytes())
            .map_err(|e| self.remote(e))?
            .ok_or_else(|| StoreError::Missing(self.place()))?;
        let aside = format!("{}.corrupt.{}", self.key, crate::now_secs());
        let txn = Txn {
            compare: vec![Compare::new(
                self.key.as_bytes(),
                Target::Mod(kv.mod_revision),
            )],
            success: vec![
                Op::Put {
                    key: aside.as_bytes().to_vec(),
                    value: kv.value,
                    lease: 0,
                },
                Op::Delete(self.key.as_bytes().to_vec()),
            ],
            failure: vec![],
        };
        let r = self.client.txn(&txn).map_err(|e| self.remote(e))?;
        if !r.succeeded {
            return Err(StoreError::Remote(format!(
                "meta {} changed while being set aside; retry",
                self.place()
            )));
        }
        Ok(aside)
    }
}

impl MetaStore for EtcdStore {
    fn load(&self) -> Result<MetaDoc, StoreError> {
        self.read()?
            .ok_or_else(|| StoreError::Missing(self.place()))
    }

    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError> {
        let (txn, next) = self.save_txn(doc, None)?;
        let r = self.client.txn(&txn).map_err(|e| self.remote(e))?;
        if r.succeeded {
            Ok(next)
        } else {
            Err(StoreError::Conflict {
                expected: doc.version,
                found: r.got(0).map_or(0, |kv| kv.version as u64),
            })
        }
    }

    fn exists(&self) -> Result<bool, StoreError> {
        Ok(self.read()?.is_some())
    }

    fn describe(&self) -> String {
        format!("etcd {} at {}", self.key, self.client.endpoints.join(","))
    }

    fn set_aside_corrupt(&self) -> Result<String, StoreError> {
        self.set_aside()
    }
}

/// A store whose saves are all fenced on a leader lease: what a leading
/// monitor hands to the code that writes the meta.
pub struct FencedStore {
    pub store: Arc<EtcdStore>,
    pub leader: Arc<Leader>,
}

impl MetaStore for FencedStore {
    fn load(&self) -> Result<MetaDoc, StoreError> {
        self.store.load()
    }
    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError> {
        self.store.save_fenced(doc, &self.leader)
    }
    fn exists(&self) -> Result<bool, StoreError> {
        self.store.exists()
    }
    fn describe(&self) -> String {
        format!(
            "{} (writes fenced on leader {})",
            self.store.describe(),
            self.leader.id
        )
    }
}

// ---------------------------------------------------------------- leader

fn describe_holder(kv: Option<&Kv>) -> String {
    match kv {
        None => "nobody holds the leader key".to_string(),
        Some(kv) => format!(
            "the leader key is held by '{}'",
            crate::model::config::clip(&String::from_utf8_lossy(&kv.value))
        ),
    }
}

/// Who holds the leader key now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub id: String,
    pub lease: i64,
}

/// The result of one campaign attempt.
#[derive(Debug)]
pub enum Elected {
    Won(Leader),
    /// Someone holds the key (possibly an earlier run of this very id,
    /// whose lease has not expired yet).
    Lost(Holder),
}

/// Campaigns for `<prefix>/leader` as `id`, with leases of `ttl`.
pub struct Campaign {
    client: Arc<Client>,
    key: String,
    id: String,
    ttl: Duration,
}

impl Campaign {
    pub fn new(client: Arc<Client>, prefix: &str, id: &str, ttl: Duration) -> Campaign {
        Campaign {
            client,
            key: key_under(prefix, "leader"),
            id: id.to_string(),
            ttl,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Who holds the leader key, if anyone.
    pub fn holder(&self) -> Result<Option<Holder>, EtcdError> {
        Ok(self.client.get(self.key.as_bytes())?.map(|kv| Holder {
            id: String::from_utf8_lossy(&kv.value).into_owned(),
            lease: kv.lease,
        }))
    }

    /// One attempt to become the leader: if nobody holds the key, grant a
    /// lease and create the key bound to it, in a transaction that holds
    /// only while the key does not exist. Never waits for a holder to go.
    pub fn try_acquire(&self) -> Result<Elected, EtcdError> {
        if let Some(h) = self.holder()? {
            return Ok(Elected::Lost(h));
        }
        // The lease lives on etcd at least `ttl` from when etcd granted
        // it, which is after this instant.
        let sent = Instant::now();
        let (lease, ttl) = self.client.lease_grant(self.ttl)?;
        let txn = Txn {
            compare: vec![Compare::new(self.key.as_bytes(), Target::Create(0))],
            success: vec![Op::Put {
                key: self.key.as_bytes().to_vec(),
                value: self.id.as_bytes().to_vec(),
                lease,
            }],
            failure: vec![Op::Get(self.key.as_bytes().to_vec())],
        };
        let holder_of = |kv: &Kv| Holder {
            id: String::from_utf8_lossy(&kv.value).into_owned(),
            lease: kv.lease,
        };
        let outcome = match self.client.txn(&txn) {
            Ok(r) if r.succeeded => Ok(None),
            // The failure branch read the key, which existed then.
            Ok(r) => r.got(0).map(|kv| Some(holder_of(kv))).ok_or_else(|| {
                bad(
                    &self.client.endpoints.join(","),
                    "a failed campaign read no leader key".to_string(),
                )
            }),
            // Did the put happen? Ask; the answer decides.
            Err(e @ EtcdError::Unknown { .. }) => match self.holder() {
                Ok(Some(h)) if h.lease == lease && h.id == self.id => Ok(None),
                Ok(Some(h)) => Ok(Some(h)),
                Ok(None) | Err(_) => Err(e),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) => Ok(Elected::Won(Leader {
                client: self.client.clone(),
                key: self.key.clone(),
                id: self.id.clone(),
                lease,
                ttl,
                margin: safety_margin(ttl),
                renewed: Mutex::new(Some(sent)),
            })),
            Ok(Some(h)) => {
                let _ = self.client.lease_revoke(lease);
                Ok(Elected::Lost(h))
            }
            Err(e) => {
                // Whatever happened, the lease ends now or at its TTL.
                let _ = self.client.lease_revoke(lease);
                Err(e)
            }
        }
    }
}

/// How long before the lease's earliest possible expiry the leader stops
/// acting: a fifth of the TTL, at least 500 ms. It covers the time between
/// asking [`Leader::may_act_for`] and finishing the act, and any difference
/// in clock rate between this host and etcd's leader.
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500))
}

/// A won election: the leader key holds our id, bound to our lease.
///
/// It is kept only by calling [`Leader::keepalive`] more often than the TTL
/// (every [`Leader::keepalive_every`]); nothing here runs by itself. `Sync`:
/// one thread may keep it alive while others ask whether they may act or
/// save through it.
#[derive(Debug)]
pub struct Leader {
    client: Arc<Client>,
    key: String,
    id: String,
    lease: i64,
    ttl: Duration,
    margin: Duration,
    /// When the last successful grant or keepalive was *sent*; `None` once
    /// the lease is known to be gone.
    renewed: Mutex<Option<Instant>>,
}

impl Leader {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often to call [`Leader::keepalive`]: a third of the TTL, so that
    /// one keepalive may fail and the next still comes in time.
    pub fn keepalive_every(&self) -> Duration {
        self.ttl / 3
    }

    fn renewed(&self) -> Option<Instant> {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_lost(&self) {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Renew the lease. `Ok(true)` while it holds, `Ok(false)` once etcd
    /// says it is gone (expired or revoked): then this leader never acts
    /// again and must campaign anew. An error changes nothing: the time
    /// left still counts from the last renewal that worked.
    pub fn keepalive(&self) -> Result<bool, EtcdError> {
        if self.renewed().is_none() {
            return Ok(false);
        }
        // Taken before sending: etcd renews when it receives, later.
        let sent = Instant::now();
        match self.client.lease_keepalive(self.lease)? {
            None => {
                self.mark_lost();
                Ok(false)
            }
            Some(_) => {
                let mut r = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(prev) = *r {
                    *r = Some(prev.max(sent));
                }
                Ok(r.is_some())
            }
        }
    }

    /// How much longer this leader may act (probe, fail over, move a VIP),
    /// as seen at `now`: until the last renewal's send time plus the TTL,
    /// less the safety margin. Zero once the lease may have expired on
    /// etcd's side, whether or not etcd has said so yet.
    ///
    /// This bounds expiry only: a lease revoked by someone else (an
    /// operator with etcdctl) ends early, unseen until the next keepalive
    /// or fenced save. Writes to the meta are safe regardless, because
    /// [`EtcdStore::save_fenced`] is checked by etcd itself.
    pub fn may_act_for_at(&self, now: Instant) -> Duration {
        match self.renewed() {
            None => Duration::ZERO,
            Some(at) => (at + self.ttl)
                .checked_sub(self.margin)
                .map_or(Duration::ZERO, |until| until.saturating_duration_since(now)),
        }
    }

    /// [`Leader::may_act_for_at`] now.
    pub fn may_act_for(&self) -> Duration {
        self.may_act_for_at(Instant::now())
    }

    /// Whether `kv` (the leader key as read) is still ours.
    fn is_holder(&self, kv: Option<&Kv>) -> bool {
        kv.is_some_and(|kv| kv.lease == self.lease && kv.value == self.id.as_bytes())
    }

    /// The compares a fenced write adds: the leader key still holds our id,
    /// bound to our lease (a re-election of the same id has another lease).
    fn compares(&self) -> [Compare; 2] {
        [
            Compare::new(
                self.key.as_bytes(),
                Target::Value(self.id.as_bytes().to_vec()),
            ),
            Compare::new(self.key.as_bytes(), Target::Lease(self.lease)),
        ]
    }

    /// Step down: revoke the lease, which deletes the leader key at once so
    /// another monitor can win without waiting for the TTL. This leader
    /// stops acting even if the revoke fails (the lease then expires).
    pub fn resign(&self) -> Result<(), EtcdError> {
        self.mark_lost();
        self.client.lease_revoke(self.lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::parse_endpoints;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64_encode(plain.as_bytes()), coded);
            assert_eq!(b64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(b64_decode(&b64_encode(&all)).unwrap(), all);
        assert_eq!(b64_encode(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn base64_refuses_what_etcd_never_sends() {
        for bad in [
            "Zg", "Zg=", "Z===", "Zm9v!A==", "Zg==Zg==", "Zh==", "Zm9=", "====", "Zm-v", "Zm_v",
        ] {
            assert_eq!(b64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_are_checked_and_normalized() {
        assert_eq!(
            parse_endpoints("http://10.0.0.1:2379,http://[::1]:2379/ , http://e-1.x:1").unwrap(),
            [
                "http://10.0.0.1:2379",
                "http://[::1]:2379",
                "http://e-1.x:1"
            ]
        );
        for bad in [
            "",
            "10.0.0.1:2379",
            "http://:2379",
            "http://h:99999",
            "http://-h:1",
            "http://[zz]:1",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
        let e = parse_endpoint("http://root:hunter2@h:2379").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn txn_json_has_the_gateway_shape() {
        let txn = Txn {
            compare: vec![
                Compare::new("/c/meta", Target::Version(0)),
                Compare::new("/c/leader", Target::Value(b"m1".to_vec())),
                Compare::new("/c/leader", Target::Lease(7587862070981383178)),
                Compare::new("/c/leader", Target::Create(0)),
                Compare::new("/c/x", Target::Mod(12)),
            ],
            success: vec![
                Op::Put {
                    key: b"/c/meta".to_vec(),
                    value: b"{}".to_vec(),
                    lease: 0,
                },
                Op::Put {
                    key: b"/c/leader".to_vec(),
                    value: b"m1".to_vec(),
                    lease: 5,
                },
                Op::Delete(b"/c/x".to_vec()),
            ],
            failure: vec![Op::Get(b"/c/meta".to_vec())],
        };
        let want = json!({
            "compare": [
                {"key": "L2MvbWV0YQ==", "result": "EQUAL", "target": "VERSION", "version": "0"},
                {"key": "L2MvbGVhZGVy", "result": "EQUAL", "target": "VALUE", "value": "bTE="},
                {"key": "L2MvbGVhZGVy", "result": "EQUAL", "target": "LEASE",
                 "lease": "7587862070981383178"},
                {"key": "L2MvbGVhZGVy", "result": "EQUAL", "target": "CREATE",
                 "create_revision": "0"},
                {"key": "L2MveA==", "result": "EQUAL", "target": "MOD", "mod_revision": "12"},
            ],
            "success": [
                {"request_put": {"key": "L2MvbWV0YQ==", "value": "e30="}},
                {"request_put": {"key": "L2MvbGVhZGVy", "value": "bTE=", "lease": "5"}},
                {"request_delete_range": {"key": "L2MveA=="}},
            ],
            "failure": [{"request_range": {"key": "L2MvbWV0YQ=="}}],
        });
        assert_eq!(txn.to_json(), want);
    }

    #[test]
    fn txn_answers_parse_as_etcd_3_4_sends_them() {
        // A success: "succeeded" is there, the put answers with a header.
        let ok = json!({"header": {"revision": "3"}, "succeeded": true,
            "responses": [{"response_put": {"header": {"revision": "3"}}}]});
        let r = parse_txn(ok).unwrap();
        assert!(r.succeeded);
        assert_eq!(r.results, [OpResult::Put]);
        // A failure: no "succeeded" at all (proto3 leaves out false), the
        // range answers with int64 fields as strings.
        let failed = json!({"header": {"revision": "4"}, "responses": [
            {"response_range": {"header": {"revision": "4"}, "count": "1", "kvs": [
                {"key": "bGVhZGVy", "create_revision": "4", "mod_revision": "4",
                 "version": "1", "value": "YQ==", "lease": "4111120259247621646"}]}},
            {"response_range": {"header": {"revision": "4"}}}]});
        let r = parse_txn(failed).unwrap();
        assert!(!r.succeeded);
        let kv = r.got(0).unwrap();
        assert_eq!(kv.key, b"leader");
        assert_eq!(kv.value, b"a");
        assert_eq!((kv.create_revision, kv.version), (4, 1));
        assert_eq!(kv.lease, 4111120259247621646);
        assert_eq!(r.got(1), None);
        // A deleted key's answer and an empty value.
        let r = parse_txn(json!({"succeeded": true, "responses": [
            {"response_delete_range": {"header": {}, "deleted": "1"}},
            {"response_range": {"kvs": [{"key": "eA==", "version": "2"}]}}]}))
        .unwrap();
        assert_eq!(r.results[0], OpResult::Delete);
        assert_eq!(r.got(1).unwrap().value, b"");
        // What the gateway never sends is an error, not a guess.
        assert!(parse_txn(json!({"responses": [{"response_range": {
            "kvs": [{"key": "not base64!"}]}}]}))
        .is_err());
        assert!(parse_txn(json!({"responses": [{"response_what": {}}]})).is_err());
        assert!(parse_txn(json!({"succeeded": "yes"})).is_err());
    }

    #[test]
    fn lease_answers_parse() {
        let l: WireLease =
            serde_json::from_value(json!({"ID": "4111120259247621640", "TTL": "5"})).unwrap();
        assert_eq!((l.id, l.ttl), (4111120259247621640, 5));
        // A keepalive of a lease that is gone has no TTL.
        let l: WireLease = serde_json::from_value(json!({"ID": "7"})).unwrap();
        assert_eq!(l.ttl, 0);
        let l: WireLease = serde_json::from_value(json!({"ID": 7, "TTL": 3})).unwrap();
        assert_eq!((l.id, l.ttl), (7, 3));
    }

    #[test]
    fn keys_live_under_the_prefix() {
        assert_eq!(key_under("/clup", "meta"), "/clup/meta");
        assert_eq!(key_under("/clup/", "leader"), "/clup/leader");
        assert_eq!(key_under("/", "meta"), "/meta");
    }

    fn leader(ttl: Duration, renewed: Option<Instant>) -> Leader {
        Leader {
            client: Arc::new(Client::new(&["http://127.0.0.1:9".to_string()], ttl).unwrap()),
            key: "/c/leader".to_string(),
            id: "m1".to_string(),
            lease: 1,
            ttl,
            margin: safety_margin(ttl),
            renewed: Mutex::new(renewed),
        }
    }

    #[test]
    fn a_leader_acts_only_until_its_lease_may_expire() {
        let t0 = Instant::now();
        let l = leader(Duration::from_secs(10), Some(t0));
        // ttl 10 s, margin 2 s: act until t0 + 8 s.
        assert_eq!(l.may_act_for_at(t0), Duration::from_secs(8));
        assert_eq!(
            l.may_act_for_at(t0 + Duration::from_secs(5)),
            Duration::from_secs(3)
        );
        assert_eq!(
            l.may_act_for_at(t0 + Duration::from_secs(8)),
            Duration::ZERO
        );
        assert_eq!(
            l.may_act_for_at(t0 + Duration::from_secs(60)),
            Duration::ZERO
        );
        assert_eq!(l.keepalive_every(), Duration::from_secs(10) / 3);
        // A short TTL keeps a margin of at least 500 ms.
        let l = leader(Duration::from_secs(2), Some(t0));
        assert_eq!(l.may_act_for_at(t0), Duration::from_millis(1500));
        // Known lost: never again, and a keepalive does not revive it.
        let l = leader(Duration::from_secs(10), None);
        assert_eq!(l.may_act_for_at(t0), Duration::ZERO);
        assert!(!l.keepalive().unwrap());
    }

    #[test]
    fn errors_name_the_endpoints() {
        let e = EtcdError::Unreachable(vec![
            ("http://a:1".into(), "Connection refused".into()),
            ("http://b:2".into(), "no answer within 1.0s".into()),
        ]);
        assert_eq!(
            e.to_string(),
            "no etcd endpoint answered: http://a:1: Connection refused; http://b:2: no answer within 1.0s"
        );
        let e = EtcdError::Unknown {
            endpoint: "http://a:1".into(),
            reason: "no answer within 1.0s".into(),
        };
        assert!(
            e.to_string().contains("whether it was applied is unknown"),
            "{e}"
        );
    }
}
