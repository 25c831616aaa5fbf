//! One-off admin calls to PostgreSQL servers (version and role, promote,
//! synchronous_standby_names, ALTER SYSTEM, checkpoint, current LSN), on
//! the `postgres` client.
//!
//! Each runs on a worker thread that is abandoned at its deadline, so a
//! stopped or hanging server can never stall the caller; while an
//! abandoned call to a server is still stuck, further admin calls to that
//! server fail at once instead of piling up threads. What differs between
//! majors comes from [`PgVer`]. Must not: decide, retry beyond the bounded
//! wait for a promotion, or show a password anywhere.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use postgres::{Client, SimpleQueryMessage};

use crate::exec::pg::{parse_lsn, sql_literal, PgError, Target, PROMOTE_WAIT};
use crate::exec::pgstatus::{cell, Results};
use crate::exec::pgver::{PgVer, Promote};
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, Error};
use crate::model::config::Config;
use crate::model::meta::Db;

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

pub(crate) fn simple(c: &mut Client, what: &str, sql: &str) -> Result<Results, PgError> {
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

/// Run admin statements as ha_db_user on db's `postgres` database within
/// `limit`; `f` gets the connection.
pub(crate) fn admin<T: Send + 'static>(
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

/// Promote a standby as its major allows ([`PgVer::promote`]):
/// `pg_promote(wait => true)` from 12, `pg_ctl promote -w` on 10 and 11,
/// and on 9.x `pg_ctl promote` then pg_is_in_recovery() watched until it
/// is false (within [`PROMOTE_WAIT`]). A server that is not in recovery is
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
    match PgVer::of(version).promote {
        Promote::PgCtlWait => {
            pgctl::promote(remote, db, cfg, true)?;
        }
        Promote::PgCtlThenPoll => {
            pgctl::promote(remote, db, cfg, false)?;
            wait_promoted(db, cfg, PROMOTE_WAIT)?;
        }
        Promote::Function => promote_by_function(db, cfg)?,
    }
    Ok(())
}

/// Watch pg_is_in_recovery() until it is false, for at most `limit`.
fn wait_promoted(db: &Db, cfg: &Config, limit: Duration) -> Result<(), PgError> {
    let end = Instant::now() + limit;
    loop {
        let last = match version_and_role(db, cfg) {
            Ok((_, false)) => return Ok(()),
            Ok((_, true)) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= end {
            let why = last.map_or(String::new(), |e| format!(" ({e})"));
            return Err(PgError::new(
                &format!("promote {}", db.addr()),
                format!(
                    "still in recovery {}s after pg_ctl promote{why}",
                    limit.as_secs()
                ),
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `SELECT pg_promote(wait => true, ...)` (12+).
fn promote_by_function(db: &Db, cfg: &Config) -> Result<(), PgError> {
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
    )
}

/// `ALTER SYSTEM SET synchronous_standby_names = names` and reload, in
/// the syntax of the server's major ([`PgVer::sync_names`]: 9.6 has no
/// `FIRST`, 9.x no `ANY`).
pub fn set_sync_names(db: &Db, cfg: &Config, names: &str) -> Result<(), PgError> {
    let (version, _) = version_and_role(db, cfg)?;
    let names = PgVer::of(version).sync_names(names).map_err(|m| {
        PgError::new(
            &format!("set synchronous_standby_names on {}", db.addr()),
            m,
        )
    })?;
    let sql = format!(
        "ALTER SYSTEM SET synchronous_standby_names = {}",
        sql_literal(&names)
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
        let res = simple(c, what, "SELECT current_setting('server_version_num')")?;
        let v = PgVer::of(
            cell(&res, 0, 0, 0)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| PgError::new(what, "no server_version_num"))?,
        );
        let sql = format!(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN {}() ELSE {}() END)::text",
            v.replay_lsn_fn, v.current_lsn_fn
        );
        let res = simple(c, what, &sql)?;
        cell(&res, 0, 0, 0)
            .and_then(parse_lsn)
            .ok_or_else(|| PgError::new(what, "no WAL position"))
    })
}
