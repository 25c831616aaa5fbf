//! Talking to PostgreSQL servers: bounded-time probes and the few admin
//! statements clup needs (promote, synchronous_standby_names, checkpoint).
//!
//! Owns: connection settings (timeouts, application_name=clup, TLS as
//! pg_sslmode says, through [`tls`]), the
//! probe's queries and their parsing into [`DbProbe`], the probe sessions a
//! cluster keeps between rounds ([`ProbeConns`]), LSN text <-> u64, SQL
//! literal quoting. Must not: decide what a probe result means, retry, or
//! show a password anywhere.
//!
//! Probes go through [`wire`]: all of a cluster's databases at once (one
//! scoped thread per database but the first, joined before returning),
//! under one deadline, on sessions kept between rounds.
//! The one-off admin calls use the `postgres` client on a worker thread that
//! is abandoned at its deadline, so a stopped or hanging server can never
//! stall the caller; while an abandoned call to a server is still stuck,
//! further admin calls to that server fail at once instead of piling up
//! threads.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, SimpleQueryMessage};
use serde::{Deserialize, Serialize};

use crate::exec::heartbeat::{self, Turn};
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, pool, tls, wire, Error};
use crate::model::config::{Config, PgSsl, Secret, SslMode};
use crate::model::meta::Db;

/// A standby's WAL receiver, from `pg_stat_wal_receiver`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// `streaming`, `starting`, `catchup`, `waiting`, `stopping`...
    pub status: String,
    /// The primary it streams from (PG >= 11: sender_host/sender_port; PG 10:
    /// parsed from conninfo). None when hidden (not a privileged user).
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
    /// The timeline of the WAL it received last.
    pub timeline: Option<u32>,
}

/// One row of a primary's `pg_stat_replication`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub application_name: String,
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, `startup`, `backup`, `stopping`; empty when
    /// hidden.
    pub state: String,
    /// `sync`, `async`, `potential`, `quorum`; empty when hidden.
    pub sync_state: String,
    pub sent_lsn: Option<u64>,
    pub write_lsn: Option<u64>,
    pub flush_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
}

/// What one probe of one database saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbProbe {
    /// The database answered (and, probed as primary, took the heartbeat
    /// write) within probe_timeout.
    pub ok: bool,
    /// Why not, when `ok` is false.
    pub error: String,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    /// Primary: pg_current_wal_lsn(); standby: pg_last_wal_receive_lsn().
    pub wal_lsn: Option<u64>,
    /// Standby: pg_last_wal_replay_lsn().
    pub replay_lsn: Option<u64>,
    /// Standby: its WAL receiver, if one runs.
    pub upstream: Option<Upstream>,
    /// server_version_num, e.g. 150004.
    pub version: Option<u32>,
    /// synchronous_standby_names as the server uses it now.
    pub sync_names: Option<String>,
    /// Primary: its pg_stat_replication rows, by application_name.
    pub replicas: Vec<Replica>,
    /// Standby: now() - the heartbeat time it replayed, when readable.
    pub heartbeat_age_ms: Option<u64>,
    /// How long this probe took (for /metrics).
    #[serde(default)]
    pub probe_ms: u64,
}

/// A failed connection or statement: `what` names the server and the action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub what: String,
    pub msg: String,
    /// SQLSTATE, when the server sent one.
    pub code: Option<String>,
}

impl PgError {
    pub(crate) fn new(what: &str, msg: impl Into<String>) -> PgError {
        PgError {
            what: what.to_string(),
            msg: msg.into(),
            code: None,
        }
    }

    fn from_pg(what: &str, e: &postgres::Error) -> PgError {
        match e.as_db_error() {
            Some(db) => PgError {
                what: what.to_string(),
                msg: format!("{}: {}", db.severity(), db.message()),
                code: Some(db.code().code().to_string()),
            },
            None => PgError {
                what: what.to_string(),
                msg: e.to_string(),
                code: e.code().map(|c| c.code().to_string()),
            },
        }
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.msg)
    }
}

impl std::error::Error for PgError {}

/// `0/30E73D0` -> 0x30E73D0.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let ok = |p: &str| !p.is_empty() && p.len() <= 8 && p.chars().all(|c| c.is_ascii_hexdigit());
    if !ok(hi) || !ok(lo) {
        return None;
    }
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some(hi << 32 | lo)
}

/// 0x30E73D0 -> `0/30E73D0`, as PostgreSQL prints it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// `s` as an SQL string literal that means `s` whatever
/// standard_conforming_strings is: `'...'` with `'` doubled, or `E'...'` with
/// `\` doubled too when `s` has a backslash.
pub fn sql_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if s.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// How long pg_promote waits for the promotion to finish.
pub const PROMOTE_WAIT: Duration = Duration::from_secs(60);

/// Who to connect as, where, and for how long. Owned, so a worker thread can
/// take it.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    dbname: String,
    user: String,
    password: Secret,
    connect_timeout: Duration,
    statement_timeout: Duration,
    /// Extra `-c name=value` settings for the session.
    settings: Vec<(&'static str, &'static str)>,
    ssl: PgSsl,
}

impl Target {
    fn status(db: &Db, cfg: &Config, dbname: &str) -> Target {
        Target {
            host: db.host.clone(),
            port: db.port,
            dbname: dbname.to_string(),
            user: cfg.ha_db_user.clone(),
            password: cfg.ha_db_pass.clone(),
            connect_timeout: cfg.probe_timeout,
            statement_timeout: cfg.probe_timeout,
            settings: Vec::new(),
            ssl: cfg.pg_ssl.clone(),
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The startup `options`: `-c name=value` settings for the session.
    fn options(&self) -> String {
        let mut options = format!(
            "-c statement_timeout={} -c lock_timeout={}",
            self.statement_timeout.as_millis().max(1),
            self.statement_timeout.as_millis().max(1)
        );
        for (k, v) in &self.settings {
            options.push_str(&format!(" -c {k}={v}"));
        }
        options
    }

    /// The same session for [`wire`].
    fn params(&self) -> wire::Params {
        wire::Params {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            dbname: self.dbname.clone(),
            password: self.password.clone(),
            options: self.options(),
            ssl: self.ssl.clone(),
        }
    }

    /// Connect with the `postgres` crate. Its sslmode knows disable,
    /// prefer and require (what to do with the answer to SSLRequest); the
    /// certificate checks are [`tls::Connector`]'s, and libpq's second
    /// attempts ([`tls::retry`]) are made here.
    fn connect(&self, what: &str) -> Result<Client, PgError> {
        use postgres::config::SslMode as Pq;
        let first = match self.ssl.mode {
            SslMode::Disable | SslMode::Allow => Pq::Disable,
            SslMode::Prefer => Pq::Prefer,
            _ => Pq::Require,
        };
        let e = match self.connect_with(first) {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let handshake = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<tls::HandshakeError>())
            .map(|h| h.0.clone());
        // After a server error under prefer, whether TLS was in use is not
        // known here: no second attempt then.
        let (used_tls, failure) = match (&handshake, e.as_db_error()) {
            (Some(_), _) => (true, tls::Failure::Handshake),
            (None, Some(_)) => (first == Pq::Require, tls::Failure::Refused),
            (None, None) => (false, tls::Failure::Other),
        };
        let next = match tls::retry(self.ssl.mode, used_tls, failure) {
            Some(tls::Start::Plain) => Pq::Disable,
            Some(tls::Start::SslRequest) => Pq::Require,
            None => {
                return Err(match handshake {
                    Some(m) => PgError::new(what, m),
                    None => PgError::from_pg(what, &e),
                })
            }
        };
        self.connect_with(next)
            .map_err(|e| PgError::from_pg(what, &e))
    }

    fn connect_with(&self, ssl_mode: postgres::config::SslMode) -> Result<Client, postgres::Error> {
        let options = self.options();
        let mut c = postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.user)
            .password(self.password.expose())
            .application_name("clup")
            .options(&options)
            .ssl_mode(ssl_mode)
            .connect_timeout(self.connect_timeout)
            .tcp_user_timeout(self.connect_timeout + self.statement_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        c.connect(tls::Connector::new(&self.ssl))
    }
}

/// Calls running on worker threads, by id: the server they talk to and
/// whether the caller gave up on them.
static CALLS: Mutex<Calls> = Mutex::new(Calls {
    next: 0,
    running: BTreeMap::new(),
});

struct Calls {
    next: u64,
    running: BTreeMap<u64, (String, bool)>,
}

fn calls() -> std::sync::MutexGuard<'static, Calls> {
    CALLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many abandoned calls are still stuck (all servers).
pub fn hanging_calls() -> usize {
    calls()
        .running
        .values()
        .filter(|(_, gave_up)| *gave_up)
        .count()
}

/// Run `f` on a worker thread and wait at most `limit` for it. A call that
/// does not finish is abandoned (its thread ends when the server answers or
/// the connection dies); until then, calls to the same server fail at once.
fn bounded<T: Send + 'static>(
    addr: &str,
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> Result<T, PgError> + Send + 'static,
) -> Result<T, PgError> {
    let id = {
        let mut c = calls();
        if c.running.values().any(|(a, gave_up)| a == addr && *gave_up) {
            return Err(PgError::new(
                what,
                "an earlier call to this server is still hanging",
            ));
        }
        c.next += 1;
        let id = c.next;
        c.running.insert(id, (addr.to_string(), false));
        id
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = thread::Builder::new()
        .name("clup-pg".to_string())
        .spawn(move || {
            let r = f();
            calls().running.remove(&id);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        calls().running.remove(&id);
        return Err(PgError::new(what, format!("cannot start a thread: {e}")));
    }
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            if let Some(entry) = calls().running.get_mut(&id) {
                entry.1 = true;
            }
            Err(PgError::new(
                what,
                format!("no answer within {:.1}s", limit.as_secs_f64()),
            ))
        }
    }
}

/// Rows of each statement of a simple query, as text.
type Results = Vec<Vec<Vec<Option<String>>>>;

fn simple(c: &mut Client, what: &str, sql: &str) -> Result<Results, PgError> {
    let msgs = c
        .simple_query(sql)
        .map_err(|e| PgError::from_pg(what, &e))?;
    let mut out: Results = vec![Vec::new()];
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => {
                let row = (0..r.len()).map(|i| r.get(i).map(str::to_string)).collect();
                if let Some(last) = out.last_mut() {
                    last.push(row);
                }
            }
            SimpleQueryMessage::CommandComplete(_) => out.push(Vec::new()),
            _ => {}
        }
    }
    out.pop();
    Ok(out)
}

fn affected(c: &mut Client, what: &str, sql: &str) -> Result<u64, PgError> {
    let msgs = c
        .simple_query(sql)
        .map_err(|e| PgError::from_pg(what, &e))?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .sum())
}

/// Everything the probe reads, for any role and any version from 10, in one
/// round trip: the views come back as JSON so their columns may differ by
/// version. The WAL senders are read as pg_stat_replication would show
/// them, without it: the view asks pg_stat_get_activity() for every
/// backend (and each of those looks its process up among all of them);
/// here it is asked for the senders' pids only, and not at all where no
/// sender runs. The same columns are hidden from a login without
/// pg_read_all_stats. Prepared once per session: planning these costs the
/// server several times what running them does.
const STATUS_SQL: [&str; 3] = [
    "SELECT current_setting('server_version_num'), pg_is_in_recovery(), \
 (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END)::text, \
 (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() END)::text, \
 CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
  ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int4 END, \
 current_setting('synchronous_standby_names')",
    "SELECT to_jsonb(s) || jsonb_build_object('application_name', a.application_name, \
 'client_addr', a.client_addr) \
 FROM pg_stat_get_wal_senders() s, LATERAL pg_stat_get_activity(s.pid) a \
 ORDER BY a.application_name, s.pid",
    "SELECT to_jsonb(w) FROM pg_stat_wal_receiver w",
];

/// SQLSTATE too_many_connections.
const TOO_MANY_CONNECTIONS: &str = "53300";

const HEARTBEAT_WRITE_SQL: &str = "UPDATE cs_sys_heartbeat SET hb_time = now()";
const HEARTBEAT_INSERT_SQL: &str = "INSERT INTO cs_sys_heartbeat (hb_time) VALUES (now())";
const HEARTBEAT_AGE_SQL: &str = "SELECT greatest(0, extract(epoch FROM now() - max(hb_time)) * 1000)::int8 FROM cs_sys_heartbeat";

/// The probe sessions a cluster's loop keeps between rounds, by db id: at
/// most one per (server, login, database, settings) the probe of that db
/// used last time. A session that failed is never kept; one the probe did
/// not need (the db changed role, host or port) is closed.
#[derive(Default)]
pub struct ProbeConns(BTreeMap<u32, Vec<wire::Conn>>);

impl ProbeConns {
    /// Close the sessions of databases not in `ids` (removed from the meta).
    pub fn retain(&mut self, ids: &[u32]) {
        self.0.retain(|id, _| ids.contains(id));
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The server pids of db `id`'s sessions (to see them reused).
    pub fn backend_pids(&self, id: u32) -> Vec<i32> {
        self.0
            .get(&id)
            .map(|v| v.iter().map(wire::Conn::backend_pid).collect())
            .unwrap_or_default()
    }
}

/// Probe one database within `cfg.probe_timeout` (connect plus queries),
/// on new sessions closed afterwards. See [`probe_many`].
pub fn probe(db: &Db, cfg: &Config, role_hint_primary: bool) -> DbProbe {
    let mut none = ProbeConns::default();
    probe_many(&[(db, role_hint_primary)], cfg, &mut none)
        .remove(&db.id)
        .unwrap_or_default()
}

/// Probe `dbs` (each with its role hint: primary or not) in parallel,
/// all within one `cfg.probe_timeout`, reusing and refilling `conns`.
///
/// The first db is probed on this thread, each other one on a scoped
/// thread of its own that takes the db's kept sessions and hands back the
/// ones still good. Every socket call is bounded by the round's deadline,
/// so every thread ends by it (plus a few milliseconds) and none outlives
/// the call: at rest a cluster has its loop's thread and no other.
///
/// As primary: update cs_sys_heartbeat in probe_db_name as probe_user
/// (with synchronous_commit=local, so a missing synchronous standby cannot
/// make the probe wait), then read the status; a failed write means
/// `ok == false`. A heartbeat write to the same database in flight from
/// another cluster entry's probe is waited for rather than repeated
/// ([`heartbeat`]). As standby: read-only, as ha_db_user. When probe_user and
/// ha_db_user are the same login, one session does both.
pub fn probe_many(
    dbs: &[(&Db, bool)],
    cfg: &Config,
    conns: &mut ProbeConns,
) -> BTreeMap<u32, DbProbe> {
    probe_watching(dbs, cfg, conns, None)
}

/// A database whose probe is watched: if it alone has not answered within
/// `after` (the others probed on the calling thread have), `then` runs
/// (once, on the calling thread, while the probes go on). When the others
/// are slow too, the trouble is not that one database's.
pub struct Late<'a> {
    pub id: u32,
    pub after: Duration,
    pub then: &'a dyn Fn(),
}

/// [`probe_many`], watching one database's probe with `late`. That probe
/// then runs on another thread, never on the calling one, which waits for
/// it after its own probe.
pub fn probe_watching(
    dbs: &[(&Db, bool)],
    cfg: &Config,
    conns: &mut ProbeConns,
    late: Option<Late>,
) -> BTreeMap<u32, DbProbe> {
    let started = Instant::now();
    let deadline = wire::Deadline::after(cfg.probe_timeout);
    let mut jobs: Vec<ProbeJob> = dbs
        .iter()
        .map(|&(db, primary)| {
            let held = conns.0.remove(&db.id).unwrap_or_default();
            ProbeJob::new(db, cfg, primary, held, deadline)
        })
        .collect();
    let watched = late.as_ref().map(|l| l.id);
    // The watched database goes to the end, among those sent away.
    if let Some(id) = watched {
        if let Some(i) = jobs.iter().position(|j| j.id == id) {
            let j = jobs.remove(i);
            jobs.push(j);
        }
    }
    let own = if jobs.len() > 1 || watched.is_none() {
        jobs.len().min(1)
    } else {
        0
    };
    let away = jobs.split_off(own);
    let mut pending: Vec<u32> = away.iter().map(|j| j.id).collect();
    let (tx, rx) = crossbeam_channel::bounded(away.len());
    for job in away {
        let tx = tx.clone();
        pool::probes().run(move || {
            let id = job.id;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()));
            let _ = tx.send((id, r));
        });
    }
    drop(tx);
    let mut done: Vec<(u32, (DbProbe, Vec<wire::Conn>))> =
        jobs.into_iter().map(|j| (j.id, j.run())).collect();
    let mut take = |(id, r): (u32, std::thread::Result<(DbProbe, Vec<wire::Conn>)>)| {
        pending.retain(|p| *p != id);
        // A panic in a probe is a bug: it reaches the caller, as one on
        // this thread would.
        done.push((id, r.unwrap_or_else(|e| std::panic::resume_unwind(e))));
        id
    };
    if let Some(l) = late.as_ref().filter(|l| started.elapsed() < l.after) {
        loop {
            match rx.recv_deadline(started + l.after) {
                Ok(r) => {
                    if take(r) == l.id {
                        break;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    (l.then)();
                    break;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    // Every probe ends by the deadline; one whose job never ran (no thread
    // could be started) ends the channel.
    while let Ok(r) = rx.recv() {
        take(r);
    }
    for id in pending {
        let p = DbProbe {
            error: "probe not run: no thread could be started for it (see the log)".to_string(),
            ..DbProbe::default()
        };
        done.push((id, (p, Vec::new())));
    }
    let mut out = BTreeMap::new();
    for (id, (p, keep)) in done {
        if !keep.is_empty() {
            conns.0.insert(id, keep);
        }
        out.insert(id, p);
    }
    out
}

/// One database's probe with all it needs, owned: it may run on a thread
/// of [`pool::probes`].
struct ProbeJob {
    id: u32,
    what: String,
    primary: bool,
    /// The database as the heartbeat write sees it (see [`heartbeat`]).
    key: String,
    same_login: bool,
    writer: wire::Params,
    reader: wire::Params,
    fallback: wire::Params,
    held: Vec<wire::Conn>,
    deadline: wire::Deadline,
}

impl ProbeJob {
    fn new(
        db: &Db,
        cfg: &Config,
        primary: bool,
        held: Vec<wire::Conn>,
        deadline: wire::Deadline,
    ) -> ProbeJob {
        let writer = Target {
            dbname: cfg.probe_db_name.clone(),
            user: cfg.probe_user.clone(),
            password: cfg.probe_password.clone(),
            settings: vec![("synchronous_commit", "local")],
            ..Target::status(db, cfg, &cfg.probe_db_name)
        }
        .params();
        ProbeJob {
            id: db.id,
            what: format!("probe {}", db.addr()),
            primary,
            key: format!(
                "{}:{}/{}/{}",
                db.host, db.port, cfg.probe_db_name, cfg.probe_user
            ),
            same_login: cfg.probe_user == cfg.ha_db_user && cfg.probe_password == cfg.ha_db_pass,
            writer,
            reader: Target::status(db, cfg, &cfg.probe_db_name).params(),
            fallback: Target::status(db, cfg, "postgres").params(),
            held,
            deadline,
        }
    }

    fn run(mut self) -> (DbProbe, Vec<wire::Conn>) {
        let started = Instant::now();
        let mut keep = Vec::new();
        let what = &self.what;
        let mut p = if self.primary {
            probe_primary(
                what,
                &self.key,
                self.same_login,
                &self.writer,
                &self.fallback,
                &mut self.held,
                &mut keep,
                self.deadline,
            )
        } else {
            probe_standby(
                what,
                &self.reader,
                &self.fallback,
                &mut self.held,
                &mut keep,
                self.deadline,
            )
        };
        p.probe_ms = started.elapsed().as_millis() as u64;
        keep.retain(|c| !c.is_broken());
        (p, keep)
    }
}

#[allow(clippy::too_many_arguments)]
fn probe_primary(
    what: &str,
    key: &str,
    same_login: bool,
    writer: &wire::Params,
    other: &wire::Params,
    held: &mut Vec<wire::Conn>,
    keep: &mut Vec<wire::Conn>,
    deadline: wire::Deadline,
) -> DbProbe {
    let mut p = DbProbe::default();
    let mut w = match Session::open(held, writer, what, deadline) {
        Ok(s) => s,
        Err(e) => return failed_probe(what, p, e),
    };
    let turn = heartbeat::turn(key);
    let (status, write) = if same_login {
        // One session, one round trip: the status, then the write (unless
        // another cluster entry's write to this database is in flight).
        let extra = matches!(turn, Turn::Lead(_)).then_some(HEARTBEAT_WRITE_SQL);
        match read_status(&mut w, what, &mut p, extra, deadline) {
            Ok(written) => {
                let write = match turn {
                    Turn::Lead(lead) => {
                        let written =
                            written.unwrap_or_else(|| Err(PgError::new(what, "no answer")));
                        let r = heartbeat_done(&mut w, what, written, deadline);
                        lead.finish(r.is_ok());
                        r
                    }
                    Turn::Follow(flight) => follow_heartbeat(&mut w, what, &flight, deadline),
                };
                (Ok(None), write)
            }
            Err(e) => (Err(e), Ok(())),
        }
    } else {
        let write = match turn {
            Turn::Lead(lead) => {
                let r = write_heartbeat(&mut w, what, deadline);
                lead.finish(r.is_ok());
                r
            }
            Turn::Follow(flight) => follow_heartbeat(&mut w, what, &flight, deadline),
        };
        keep.push(w.conn);
        let mut r = match Session::open(held, other, what, deadline) {
            Ok(s) => s,
            Err(e) => return failed_probe(what, p, e),
        };
        let status = read_status(&mut r, what, &mut p, None, deadline);
        w = r;
        (status, write)
    };
    keep.push(w.conn);
    if let Err(e) = status {
        return failed_probe(what, p, e);
    }
    match write {
        Ok(()) => p.ok = true,
        Err(e) => return failed_probe(what, p, e),
    }
    p
}

fn probe_standby(
    what: &str,
    reader: &wire::Params,
    fallback: &wire::Params,
    held: &mut Vec<wire::Conn>,
    keep: &mut Vec<wire::Conn>,
    deadline: wire::Deadline,
) -> DbProbe {
    let mut p = DbProbe::default();
    // A kept session on the postgres database means the probe database
    // was missing when it was opened; it serves until it fails.
    let opened = match Session::take(held, reader) {
        Some(s) => Ok((s, true)),
        None => match Session::take(held, fallback) {
            Some(s) => Ok((s, false)),
            None => match Session::open(held, reader, what, deadline) {
                Ok(s) => Ok((s, true)),
                // No probe database (yet): the status is readable elsewhere.
                Err(e) if e.code.as_deref() == Some("3D000") => {
                    Session::open(held, fallback, what, deadline).map(|s| (s, false))
                }
                Err(e) => Err(e),
            },
        },
    };
    let (mut s, in_probe_db) = match opened {
        Ok(x) => x,
        Err(e) => return failed_probe(what, p, e),
    };
    // The heartbeat's age rides along in the probe database; optional: a
    // missing table or privilege only leaves it unknown.
    let extra = in_probe_db.then_some(HEARTBEAT_AGE_SQL);
    let status = read_status(&mut s, what, &mut p, extra, deadline);
    if let Ok(Some(Ok(r))) = &status {
        p.heartbeat_age_ms = r
            .rows
            .first()
            .and_then(|row| row.first()?.as_deref()?.parse().ok());
    }
    keep.push(s.conn);
    if let Err(e) = status {
        return failed_probe(what, p, e);
    }
    p.ok = true;
    p
}

/// A probe's session: one kept from an earlier round, or a new one.
struct Session {
    conn: wire::Conn,
    /// Kept from an earlier round and not used yet in this one.
    reused: bool,
}

impl Session {
    fn take(held: &mut Vec<wire::Conn>, t: &wire::Params) -> Option<Session> {
        let i = held
            .iter()
            .position(|c| !c.is_broken() && c.params().same_session(t))?;
        Some(Session {
            conn: held.swap_remove(i),
            reused: true,
        })
    }

    fn open(
        held: &mut Vec<wire::Conn>,
        t: &wire::Params,
        what: &str,
        deadline: wire::Deadline,
    ) -> Result<Session, PgError> {
        if let Some(s) = Session::take(held, t) {
            return Ok(s);
        }
        Ok(Session {
            conn: wire::Conn::connect(t, what, deadline)?,
            reused: false,
        })
    }

    /// Run `sql`. A kept session found dead at its first use in a round
    /// (the server restarted or closed idle sessions since) is replaced
    /// once by a new one, within the same deadline: a probe on a new
    /// connection, as clup made before it kept them, would not have failed.
    fn query(
        &mut self,
        what: &str,
        stmts: &[&str],
        deadline: wire::Deadline,
    ) -> Result<Vec<wire::QueryResult>, PgError> {
        match self.batch(what, stmts, deadline)? {
            (results, None) => Ok(results),
            (_, Some(e)) => Err(e),
        }
    }

    /// As [`wire::Conn::prepared_batch`], with the replacement above.
    fn batch(
        &mut self,
        what: &str,
        stmts: &[&str],
        deadline: wire::Deadline,
    ) -> Result<(Vec<wire::QueryResult>, Option<PgError>), PgError> {
        let r = self.conn.prepared_batch(what, stmts, deadline);
        if !std::mem::replace(&mut self.reused, false) || r.is_ok() || !self.conn.is_broken() {
            return r;
        }
        let params = self.conn.params().clone();
        self.conn = wire::Conn::connect(&params, what, deadline)?;
        self.conn.prepared_batch(what, stmts, deadline)
    }
}

/// Each statement's rows, as [`simple`] gives them.
fn rows_of(res: Vec<wire::QueryResult>) -> Results {
    res.into_iter().map(|r| r.rows).collect()
}

/// A probe that ended in `e`. "too many clients" is the exception: the
/// server is up and answering, just full (say, sessions hung on a
/// synchronous commit while every standby is down). Restarting it or
/// failing over would not help and would cost every session, so it counts
/// as alive, loudly.
fn failed_probe(what: &str, mut p: DbProbe, e: PgError) -> DbProbe {
    p.error = e.to_string();
    p.ok = e.code.as_deref() == Some(TOO_MANY_CONNECTIONS);
    if p.ok {
        log::warn!("{what}: the database is up but refuses new connections (too many clients); counted as alive: {e}");
    }
    p
}

/// The heartbeat write on its own: the UPDATE, and the row if missing.
fn write_heartbeat(s: &mut Session, what: &str, deadline: wire::Deadline) -> Result<(), PgError> {
    let updated = s.query(what, &[HEARTBEAT_WRITE_SQL], deadline);
    let updated = updated.and_then(|r| {
        r.into_iter()
            .next()
            .ok_or_else(|| PgError::new(what, "no answer"))
    });
    heartbeat_done(s, what, updated, deadline)
}

/// Wait for the heartbeat write another cluster entry has in flight to
/// this database: its success is ours; after its failure, write ourselves;
/// unfinished by our deadline, the write path did not answer in time.
fn follow_heartbeat(
    s: &mut Session,
    what: &str,
    flight: &heartbeat::Flight,
    deadline: wire::Deadline,
) -> Result<(), PgError> {
    match flight.wait(deadline.at) {
        Some(true) => Ok(()),
        Some(false) => write_heartbeat(s, what, deadline),
        None => Err(PgError::new(
            &format!("{what}: heartbeat write"),
            format!(
                "no answer within {:.1}s (waited for the write another cluster entry had in flight to this database)",
                deadline.limit.as_secs_f64()
            ),
        )),
    }
}

/// The heartbeat write, from what its UPDATE gave.
fn heartbeat_done(
    s: &mut Session,
    what: &str,
    updated: Result<wire::QueryResult, PgError>,
    deadline: wire::Deadline,
) -> Result<(), PgError> {
    let what = format!("{what}: heartbeat write");
    let relabel = |mut e: PgError| {
        e.what = what.clone();
        e
    };
    // An UPDATE of no row writes no WAL and proves nothing: add the row.
    if updated.map_err(relabel)?.count() == 0 {
        s.query(&what, &[HEARTBEAT_INSERT_SQL], deadline)?;
    }
    Ok(())
}

fn cell(res: &Results, stmt: usize, row: usize, col: usize) -> Option<&str> {
    res.get(stmt)?.get(row)?.get(col)?.as_deref()
}

/// What a statement run after the status query gave.
type Extra = Option<Result<wire::QueryResult, PgError>>;

/// Read the status into `p`, and run `extra` after it in the same round
/// trip: Err if the status could not be read; else `extra`'s outcome
/// (None without one), whose error leaves the status read.
fn read_status(
    s: &mut Session,
    what: &str,
    p: &mut DbProbe,
    extra: Option<&str>,
    deadline: wire::Deadline,
) -> Result<Extra, PgError> {
    let mut stmts = STATUS_SQL.to_vec();
    stmts.extend(extra);
    let (mut res, error) = s.batch(what, &stmts, deadline)?;
    if res.len() < STATUS_SQL.len() {
        return Err(error.unwrap_or_else(|| PgError::new(what, "no answer to the status query")));
    }
    let more = res.split_off(STATUS_SQL.len());
    fill_status(&rows_of(res), p).map_err(|m| PgError::new(what, m))?;
    Ok(extra.map(|_| match (more.into_iter().next(), error) {
        (_, Some(e)) => Err(e),
        (Some(r), None) => Ok(r),
        (None, None) => Err(PgError::new(what, "no answer")),
    }))
}

/// Fill `p` from the three result sets of [`STATUS_SQL`].
fn fill_status(res: &Results, p: &mut DbProbe) -> Result<(), String> {
    if res.len() != 3 || res[0].len() != 1 {
        return Err("unexpected answer to the status query".to_string());
    }
    p.version = cell(res, 0, 0, 0).and_then(|v| v.parse().ok());
    p.in_recovery = cell(res, 0, 0, 1).map(|v| v == "t");
    p.wal_lsn = cell(res, 0, 0, 2).and_then(parse_lsn);
    p.replay_lsn = cell(res, 0, 0, 3).and_then(parse_lsn);
    p.timeline = cell(res, 0, 0, 4).and_then(|v| v.parse().ok());
    p.sync_names = cell(res, 0, 0, 5).map(str::to_string);
    p.replicas = res[1]
        .iter()
        .filter_map(|row| row.first()?.as_deref())
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .map(|j| replica_from_json(&j))
        .collect();
    p.upstream = res[2]
        .first()
        .and_then(|row| row.first()?.as_deref())
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .map(|j| upstream_from_json(&j));
    if let Some(up) = &p.upstream {
        // The receiver's timeline is current; the checkpoint's may lag.
        if up.timeline.is_some() {
            p.timeline = up.timeline;
        }
    }
    Ok(())
}

fn jstr(j: &serde_json::Value, k: &str) -> Option<String> {
    j.get(k)?.as_str().map(str::to_string)
}

fn jlsn(j: &serde_json::Value, k: &str) -> Option<u64> {
    parse_lsn(j.get(k)?.as_str()?)
}

fn replica_from_json(j: &serde_json::Value) -> Replica {
    Replica {
        application_name: jstr(j, "application_name").unwrap_or_default(),
        client_addr: jstr(j, "client_addr").map(|a| a.trim_end_matches("/32").to_string()),
        state: jstr(j, "state").unwrap_or_default(),
        sync_state: jstr(j, "sync_state").unwrap_or_default(),
        sent_lsn: jlsn(j, "sent_lsn"),
        write_lsn: jlsn(j, "write_lsn"),
        flush_lsn: jlsn(j, "flush_lsn"),
        replay_lsn: jlsn(j, "replay_lsn"),
    }
}

fn upstream_from_json(j: &serde_json::Value) -> Upstream {
    let conninfo = jstr(j, "conninfo").unwrap_or_default();
    let from_conninfo = parse_conninfo(&conninfo);
    let sender_host = jstr(j, "sender_host").or_else(|| from_conninfo.get("host").cloned());
    let sender_port = j
        .get("sender_port")
        .and_then(|v| v.as_u64())
        .and_then(|v| u16::try_from(v).ok())
        .or_else(|| from_conninfo.get("port").and_then(|v| v.parse().ok()));
    Upstream {
        status: jstr(j, "status").unwrap_or_default(),
        sender_host,
        sender_port,
        timeline: j
            .get("received_tli")
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .filter(|t| *t > 0),
    }
}

/// `key=value key='quoted \' value'` (libpq conninfo) into a map.
pub fn parse_conninfo(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '\'' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    val.extend(chars.next());
                } else {
                    val.push(c);
                }
            }
        }
        out.insert(key, val);
    }
    out
}

/// Run admin statements as ha_db_user on db's `postgres` database within
/// `limit`; `f` gets the connection.
fn admin<T: Send + 'static>(
    db: &Db,
    cfg: &Config,
    action: &str,
    statement_timeout: Duration,
    f: impl FnOnce(&mut Client, &str) -> Result<T, PgError> + Send + 'static,
) -> Result<T, PgError> {
    let target = Target {
        statement_timeout,
        ..Target::status(db, cfg, "postgres")
    };
    let what = format!("{action} {}", target.addr());
    let limit = target.connect_timeout + statement_timeout + Duration::from_secs(1);
    let w = what.clone();
    bounded(&target.addr(), &what, limit, move || {
        let mut c = target.connect(&w)?;
        f(&mut c, &w)
    })
}

/// The first row of `sql` (run as ha_db_user on the postgres database), as
/// text; NULLs become empty strings. For small admin checks.
pub fn query_row(db: &Db, cfg: &Config, sql: &'static str) -> Result<Vec<String>, PgError> {
    admin(db, cfg, "query", cfg.probe_timeout, move |c, what| {
        let res = simple(c, what, sql)?;
        res.first()
            .and_then(|rows| rows.first())
            .map(|row| row.iter().map(|v| v.clone().unwrap_or_default()).collect())
            .ok_or_else(|| PgError::new(what, "no row"))
    })
}

/// server_version_num and pg_is_in_recovery().
pub fn version_and_role(db: &Db, cfg: &Config) -> Result<(u32, bool), PgError> {
    admin(db, cfg, "read version of", cfg.probe_timeout, |c, what| {
        let res = simple(
            c,
            what,
            "SELECT current_setting('server_version_num'), pg_is_in_recovery()",
        )?;
        let v = cell(&res, 0, 0, 0).and_then(|v| v.parse().ok());
        let r = cell(&res, 0, 0, 1).map(|v| v == "t");
        match (v, r) {
            (Some(v), Some(r)) => Ok((v, r)),
            _ => Err(PgError::new(what, "unexpected answer")),
        }
    })
}

/// Promote a standby: `pg_promote(wait => true)` on PG >= 12, else
/// `pg_ctl promote` over `remote`. A server that is not in recovery is
/// left alone (already promoted).
pub fn promote(remote: &dyn Remote, db: &Db, cfg: &Config) -> Result<(), Error> {
    let (version, in_recovery) = version_and_role(db, cfg)?;
    if !in_recovery {
        log::info!(
            "database({}) is not in recovery: nothing to promote",
            db.addr()
        );
        return Ok(());
    }
    if version < 120000 {
        pgctl::promote(remote, db, cfg)?;
        return Ok(());
    }
    let wait = PROMOTE_WAIT.as_secs();
    admin(
        db,
        cfg,
        "promote",
        PROMOTE_WAIT + Duration::from_secs(5),
        move |c, what| {
            let sql = format!("SELECT pg_promote(wait => true, wait_seconds => {wait})");
            let res = simple(c, what, &sql)?;
            match cell(&res, 0, 0, 0) {
                Some("t") => Ok(()),
                _ => Err(PgError::new(what, format!("not promoted within {wait}s"))),
            }
        },
    )?;
    Ok(())
}

/// `ALTER SYSTEM SET synchronous_standby_names = names` and reload.
pub fn set_sync_names(db: &Db, cfg: &Config, names: &str) -> Result<(), PgError> {
    let sql = format!(
        "ALTER SYSTEM SET synchronous_standby_names = {}",
        sql_literal(names)
    );
    alter_system(db, cfg, "set synchronous_standby_names on", vec![sql])
}

/// Run ALTER SYSTEM statements (each on its own: ALTER SYSTEM cannot run in
/// a transaction block) and then `pg_reload_conf()`. Statement logging is
/// switched off for the session first where allowed, because these
/// statements may carry a password (primary_conninfo).
pub(crate) fn alter_system(
    db: &Db,
    cfg: &Config,
    action: &str,
    statements: Vec<String>,
) -> Result<(), PgError> {
    admin(db, cfg, action, cfg.probe_timeout, move |c, what| {
        for quiet in [
            "SET log_statement = 'none'",
            "SET log_min_duration_statement = -1",
            "SET log_min_error_statement = 'panic'",
        ] {
            // Needs superuser; without it the statements are still correct.
            let _ = c.simple_query(quiet);
        }
        for s in &statements {
            // The message never includes the statement (it may hold a
            // password); the server's error says which setting failed.
            c.simple_query(s).map_err(|e| PgError::from_pg(what, &e))?;
        }
        c.simple_query("SELECT pg_reload_conf()")
            .map_err(|e| PgError::from_pg(what, &e))?;
        Ok(())
    })
}

/// `CHECKPOINT` (before pg_rewind, or to speed up a clean shutdown).
pub fn checkpoint(db: &Db, cfg: &Config, timeout: Duration) -> Result<(), PgError> {
    admin(db, cfg, "checkpoint", timeout, |c, what| {
        affected(c, what, "CHECKPOINT").map(|_| ())
    })
}

/// The server's current WAL position: pg_current_wal_lsn() on a primary,
/// the last replayed LSN on a standby.
pub fn current_lsn(db: &Db, cfg: &Config) -> Result<u64, PgError> {
    admin(db, cfg, "read lsn of", cfg.probe_timeout, |c, what| {
        let res = simple(
            c,
            what,
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END)::text",
        )?;
        cell(&res, 0, 0, 0)
            .and_then(parse_lsn)
            .ok_or_else(|| PgError::new(what, "no WAL position"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/30E73D0"), Some(0x30E73D0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(format_lsn(0x30E73D0), "0/30E73D0");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        for s in ["0/30E73D0", "16/B374D848", "1/0", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
        }
        for bad in [
            "",
            "0",
            "/1",
            "1/",
            "0/G",
            "1/2/3",
            "123456789/0",
            "0x1/0",
            "-1/0",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        assert_eq!(parse_lsn("0/30e73d0"), Some(0x30E73D0));
    }

    #[test]
    fn literals() {
        assert_eq!(sql_literal("stb02"), "'stb02'");
        assert_eq!(sql_literal(""), "''");
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_literal("a\\b'c"), "E'a\\\\b''c'");
        assert_eq!(
            sql_literal("FIRST 1 (stb02, stb03)"),
            "'FIRST 1 (stb02, stb03)'"
        );
    }

    #[test]
    fn conninfo_parsing() {
        let m = parse_conninfo(
            "user=repl passfile=/x channel_binding=prefer dbname=replication host=10.0.0.1 port=5432 application_name=stb02 password='a\\'b c' sslmode=disable",
        );
        assert_eq!(m["host"], "10.0.0.1");
        assert_eq!(m["port"], "5432");
        assert_eq!(m["password"], "a'b c");
        assert_eq!(m["sslmode"], "disable");
        assert!(parse_conninfo("").is_empty());
        assert_eq!(parse_conninfo("host = h port=1")["host"], "h");
    }

    fn rows(v: &[&[Option<&str>]]) -> Vec<Vec<Option<String>>> {
        v.iter()
            .map(|r| r.iter().map(|c| c.map(str::to_string)).collect())
            .collect()
    }

    #[test]
    fn status_of_a_primary() {
        let res = vec![
            rows(&[&[
                Some("150004"),
                Some("f"),
                Some("0/3000148"),
                None,
                Some("1"),
                Some("stb02"),
            ]]),
            rows(&[&[Some(
                r#"{"pid": 77, "application_name": "stb02", "client_addr": "127.0.0.1", "state": "streaming", "sync_state": "sync", "sent_lsn": "0/3000148", "write_lsn": "0/3000148", "flush_lsn": "0/3000148", "replay_lsn": "0/3000110"}"#,
            )]]),
            vec![],
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &mut p).unwrap();
        assert_eq!(p.version, Some(150004));
        assert_eq!(p.in_recovery, Some(false));
        assert_eq!(p.wal_lsn, Some(0x3000148));
        assert_eq!(p.timeline, Some(1));
        assert_eq!(p.sync_names.as_deref(), Some("stb02"));
        assert_eq!(p.upstream, None);
        assert_eq!(
            p.replicas,
            [Replica {
                application_name: "stb02".into(),
                client_addr: Some("127.0.0.1".into()),
                state: "streaming".into(),
                sync_state: "sync".into(),
                sent_lsn: Some(0x3000148),
                write_lsn: Some(0x3000148),
                flush_lsn: Some(0x3000148),
                replay_lsn: Some(0x3000110),
            }]
        );
    }

    #[test]
    fn status_of_a_pg10_standby_reads_conninfo() {
        let res = vec![
            rows(&[&[
                Some("100023"),
                Some("t"),
                Some("0/5000000"),
                Some("0/4FFFF00"),
                Some("1"),
                Some(""),
            ]]),
            vec![],
            rows(&[&[Some(
                r#"{"pid": 9, "status": "streaming", "received_tli": 2, "conninfo": "user=repl password=******** dbname=replication host=10.0.0.1 port=5433 application_name=stb02 sslmode=disable"}"#,
            )]]),
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &mut p).unwrap();
        assert_eq!(p.in_recovery, Some(true));
        assert_eq!(p.replay_lsn, Some(0x4FFFF00));
        // received_tli wins over the checkpoint's timeline.
        assert_eq!(p.timeline, Some(2));
        assert_eq!(
            p.upstream,
            Some(Upstream {
                status: "streaming".into(),
                sender_host: Some("10.0.0.1".into()),
                sender_port: Some(5433),
                timeline: Some(2),
            })
        );
        assert!(fill_status(&vec![vec![]], &mut p).is_err());
    }

    #[test]
    fn probe_serializes() {
        let p = DbProbe {
            ok: true,
            wal_lsn: Some(5),
            ..DbProbe::default()
        };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<DbProbe>(&j).unwrap(), p);
    }

    #[test]
    fn too_many_clients_is_alive_other_errors_are_not() {
        let full = PgError {
            what: "probe 10.0.0.1:5432".into(),
            msg: "sorry, too many clients already".into(),
            code: Some("53300".into()),
        };
        let p = failed_probe("probe", DbProbe::default(), full);
        assert!(p.ok);
        assert!(p.error.contains("too many clients"), "{}", p.error);
        for code in [None, Some("57P03".to_string()), Some("28P01".to_string())] {
            let e = PgError {
                what: "probe".into(),
                msg: "no".into(),
                code,
            };
            assert!(!failed_probe("probe", DbProbe::default(), e).ok);
        }
    }
}
