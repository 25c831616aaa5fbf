//! Talking to PostgreSQL servers: bounded-time probes, and the shared
//! pieces of the admin calls ([`pgadmin`](crate::exec::pgadmin), re-exported
//! here).
//!
//! Owns: connection settings (timeouts, application_name=clup, TLS as
//! pg_sslmode says, through [`tls`]), the probe sessions a cluster keeps
//! between rounds ([`ProbeConns`]) and the probe's flow (heartbeat write,
//! status read); LSN text <-> u64, SQL literal quoting. The status SQL and
//! its parsing live in [`pgstatus`](crate::exec::pgstatus), by the server's
//! major ([`pgver`](crate::exec::pgver)). Must not: decide what a probe
//! result means, retry, or show a password anywhere.
//!
//! Probes go through [`wire`]: all of a cluster's databases at once (one
//! scoped thread per database but the first, joined before returning),
//! under one deadline, on sessions kept between rounds. A session's status
//! SQL is that of the version its server reported at login.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use postgres::Client;
use serde::{Deserialize, Serialize};

use crate::exec::heartbeat::{self, Turn};
use crate::exec::pgstatus::{fill_status, status_sql, Results, STATUS_STATEMENTS};
use crate::exec::pgver::PgVer;
use crate::exec::{accepts, pool, tls, wire};

pub(crate) use crate::exec::pgadmin::alter_system;
pub use crate::exec::pgadmin::{
    checkpoint, current_lsn, hanging_calls, promote, query_row, set_sync_names, version_and_role,
};
pub use crate::exec::pgstatus::parse_conninfo;
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
    /// The primary's end of WAL as of its last message to this standby
    /// (`latest_end_lsn`): fresher than the monitor's own last look at a
    /// primary that has just failed.
    #[serde(default)]
    pub latest_end_lsn: Option<u64>,
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
    /// A new connection to the server was accepted but its startup packet
    /// got no answer in time: the postmaster lives but does not serve
    /// ([`crate::exec::accepts`]).
    #[serde(default)]
    pub stalled: bool,
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

    pub(crate) fn from_pg(what: &str, e: &postgres::Error) -> PgError {
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
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) dbname: String,
    pub(crate) user: String,
    pub(crate) password: Secret,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    /// Extra `-c name=value` settings for the session.
    pub(crate) settings: Vec<(&'static str, &'static str)>,
    pub(crate) ssl: PgSsl,
}

impl Target {
    pub(crate) fn status(db: &Db, cfg: &Config, dbname: &str) -> Target {
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

    pub(crate) fn addr(&self) -> String {
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
    pub(crate) fn connect(&self, what: &str) -> Result<Client, PgError> {
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

/// The version assumed for a server that did not report one at login
/// (every server from 7.4 does): the newest names.
const UNKNOWN_VERSION: u32 = 180000;

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

/// Does the server take a new session? [`wire::handshake`] as ha_db_user
/// (no password is sent), bounded by `timeout`.
pub fn accepts(db: &Db, cfg: &Config, timeout: Duration) -> wire::Handshake {
    let t = Target::status(db, cfg, &cfg.probe_db_name);
    wire::handshake(
        &t.params(),
        &format!("database({})", db.addr()),
        wire::Deadline::after(timeout),
    )
}

/// [`accepts`], asked again every `every` until `within` has passed while
/// the connection attempts time out: a SYN dropped by a partition is sent
/// again only after a second, and a partition that heals meanwhile must
/// not go unseen. A refused connection (the host answers, nothing listens)
/// is an answer: not asked again.
pub fn accepts_within(db: &Db, cfg: &Config, within: Duration, every: Duration) -> wire::Handshake {
    accepts_while(db, cfg, within, every, &AtomicBool::new(false), within)
}

/// [`accepts_within`], and past `within` asked again as long as `busy` is
/// set (other checks of the same look still run), never past `cap`: the
/// last answer is then as fresh as the slowest check.
pub fn accepts_while(
    db: &Db,
    cfg: &Config,
    within: Duration,
    every: Duration,
    busy: &AtomicBool,
    cap: Duration,
) -> wire::Handshake {
    keep_asking(|t| accepts(db, cfg, t), within, every, busy, cap)
}

/// The loop of [`accepts_while`] around `ask` (one attempt, bounded by
/// the duration it is given).
fn keep_asking(
    mut ask: impl FnMut(Duration) -> wire::Handshake,
    within: Duration,
    every: Duration,
    busy: &AtomicBool,
    cap: Duration,
) -> wire::Handshake {
    let start = Instant::now();
    let (end, cap) = (start + within, start + cap.max(within));
    loop {
        let began = Instant::now();
        let until = if busy.load(Ordering::Acquire) {
            cap
        } else {
            end
        };
        let left = until.saturating_duration_since(began);
        let h = ask(left.min(every).max(Duration::from_millis(10)));
        let timed_out = began.elapsed() + Duration::from_millis(5) >= left.min(every);
        let more = Instant::now() < end || (busy.load(Ordering::Acquire) && Instant::now() < cap);
        match h {
            wire::Handshake::Unreachable(_) if timed_out && more => continue,
            h => return h,
        }
    }
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
    /// How long an answered handshake with this server serves.
    fresh: Duration,
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
            fresh: cfg.probe_interval,
        }
    }

    fn run(mut self) -> (DbProbe, Vec<wire::Conn>) {
        let started = Instant::now();
        let handshake = accepts::start(&self.reader, &self.what, self.deadline, self.fresh);
        let mut keep = Vec::new();
        let what = &self.what;
        let p = if self.primary {
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
        let mut p = accepts::judge(p, handshake, self.deadline);
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
    // The session's server said its version at login: the SQL for it.
    let v = PgVer::of(s.conn.server_version().unwrap_or(UNKNOWN_VERSION));
    let mut stmts: Vec<&str> = status_sql(&v).iter().map(String::as_str).collect();
    stmts.extend(extra);
    let (mut res, error) = s.batch(what, &stmts, deadline)?;
    if res.len() < STATUS_STATEMENTS {
        return Err(error.unwrap_or_else(|| PgError::new(what, "no answer to the status query")));
    }
    let more = res.split_off(STATUS_STATEMENTS);
    fill_status(&rows_of(res), &v, p).map_err(|m| PgError::new(what, m))?;
    Ok(extra.map(|_| match (more.into_iter().next(), error) {
        (_, Some(e)) => Err(e),
        (Some(r), None) => Ok(r),
        (None, None) => Err(PgError::new(what, "no answer")),
    }))
}

#[cfg(test)]
mod tests;
