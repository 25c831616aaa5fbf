//! `repair`: bring a Fault node back as a standby of the current primary,
//! as it is, after pg_rewind (`--rewind`) or from a fresh pg_basebackup
//! (`--rebuild`); when it cannot, the exact commands for the operator.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{cluster_of, spawn_task};
use crate::exec::pg::{self};
use crate::exec::pgver::PgVer;
use crate::exec::shell::quote;
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, recovery};
use crate::model::event::{EventKind, NewEvent};
use crate::model::meta::{Cluster, Db, DB_NORMAL};
use crate::model::words;
use crate::monitor::task::TaskHandle;
use crate::monitor::{self, cstlb_all, repoint_db, Shared};

/// How long repair waits for the node to show up streaming.
const STREAM_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// Check that it streams (rewrite its recovery settings first).
    Plain,
    /// pg_rewind from the current primary first.
    Rewind,
    /// pg_basebackup into a fresh directory (the old one moved aside).
    Rebuild,
}

pub fn start_repair(
    shared: &Arc<Shared>,
    cluster: &str,
    id: u32,
    mode: RepairMode,
) -> Result<(u64, String), String> {
    let c = cluster_of(shared, cluster)?;
    let db = c
        .db(id)
        .ok_or_else(|| format!("cluster '{cluster}' has no db {id}"))?;
    if db.is_primary() {
        return Err(format!(
            "db {id} ({}) is the primary; repair works on standbys",
            db.addr()
        ));
    }
    match c.primary() {
        Some(p) if p.is_normal() => {}
        _ => {
            return Err(format!(
                "cluster '{cluster}' has no healthy primary to repair from"
            ))
        }
    }
    let name = format!("repair {cluster}(dbid={id})");
    let cl = cluster.to_string();
    let event = NewEvent::new(EventKind::Repair, cluster).db(id, &db.host);
    let how = match mode {
        RepairMode::Plain => "repair",
        RepairMode::Rewind => "repair --rewind",
        RepairMode::Rebuild => "repair --rebuild",
    };
    spawn_task(shared, cluster, name, move |s, t| {
        let res = repair(s, &cl, id, mode, t);
        let end = match &res {
            Ok(()) => format!("{how} completed (task {})", t.id),
            Err(e) => format!("{how} failed (task {}): {e}", t.id),
        };
        s.emit(event.reason(&end));
        res
    })
}

/// What a repair works on: the primary to follow and the node to repair,
/// as the cluster was read when the task started.
struct RepairFacts {
    c: Cluster,
    primary: Db,
    /// The node to repair.
    db: Db,
}

/// The repair task: optionally rewind or rebuild the node, point it at the
/// primary, wait until it streams, then mark it Normal and put it back
/// behind the cstlbs. The first error ends the task. The log has the
/// manual's lines in the manual's order: the streaming check is announced
/// before recovery.conf is written, and ends after it.
fn repair(
    shared: &Arc<Shared>,
    name: &str,
    id: u32,
    mode: RepairMode,
    t: &TaskHandle,
) -> Result<(), String> {
    let pre = words::repair_pre(name, id);
    t.info(&words::repair_lock(&pre));
    t.info(&words::repair_begin(&pre));
    let f = find_primary_and_fault(shared, name, id, t, &pre)?;
    let hp = words::repair_host_pre(name, &f.db.host);
    match mode {
        RepairMode::Plain => {}
        RepairMode::Rewind => rewind(shared, &f, t, &hp)?,
        RepairMode::Rebuild => rebuild(shared, &f, t, &hp)?,
    }
    t.info(&words::repair_check_streaming(&hp));
    rewrite_recovery_settings(shared, &f, t, &hp)?;
    wait_until_streaming(shared, &f, t, &hp)?;
    mark_normal(shared, name, &f, t, &hp)?;
    t.info(&words::repair_all_done(&hp));
    Ok(())
}

/// Read the cluster and find the primary and the node to repair, logging
/// both as the manual shows them.
fn find_primary_and_fault(
    shared: &Shared,
    name: &str,
    id: u32,
    t: &TaskHandle,
    pre: &str,
) -> Result<RepairFacts, String> {
    let c = cluster_of(shared, name)?;
    t.info(&words::repair_find_primary(pre));
    let primary = c.primary().ok_or("no primary")?.clone();
    t.info(&words::repair_primary_is(pre, &primary));
    t.info(&words::repair_find_fault(pre));
    let db = c.db(id).ok_or("db vanished")?.clone();
    t.info(&words::repair_fault_is(&db));
    Ok(RepairFacts { c, primary, db })
}

/// `repair --rewind`: check pg_rewind can work, checkpoint the primary,
/// stop the node and pg_rewind it from the primary.
fn rewind(shared: &Shared, f: &RepairFacts, t: &TaskHandle, hp: &str) -> Result<(), String> {
    let (cfg, ssh, primary, db) = (&shared.cfg, &shared.ssh, &f.primary, &f.db);
    t.info(&format!(
        "{hp}: checking pg_rewind prerequisites on the primary..."
    ));
    rewind_prerequisites(shared, primary)?;
    // A freshly promoted primary has not checkpointed on its new
    // timeline yet; pg_rewind reads the timeline from the control
    // file and would wrongly find nothing to rewind.
    t.info(&format!(
        "{hp}: checkpoint on the primary database({})...",
        primary.addr()
    ));
    pg::checkpoint(primary, cfg, Duration::from_secs(300))
        .map_err(|e| format!("{hp}: checkpoint on the primary failed: {e}"))?;
    t.info(&format!("{hp}: stop database before pg_rewind..."));
    pgctl::stop_fast(ssh, db, cfg).map_err(|e| e.to_string())?;
    let v = PgVer::of(monitor::version_from_files(shared, db)?);
    if !v.rewind_recovers_target {
        t.info(&format!(
            "{hp}: PostgreSQL {} pg_rewind needs a cleanly stopped target: single-user crash recovery first if it was not...",
            v.major()
        ));
    }
    t.info(&format!("{hp}: pg_rewind from host({})...", primary.host));
    let t0 = Instant::now();
    let script = rewind_script(cfg, db, primary, &v);
    let pass = format!("{}\n", cfg.ha_db_pass.expose());
    let out = ssh
        .run_script(
            &db.host,
            "pg_rewind",
            &script,
            Some(pass.as_bytes()),
            Duration::from_secs(3600),
        )
        .map_err(|e| format!("{hp}: pg_rewind failed: {e}"))?;
    for l in out.stdout.lines().filter(|l| l.starts_with("target state")) {
        t.info(&format!("{hp}: {l}"));
    }
    t.info(&format!(
        "{hp}: pg_rewind completed in {} ms: {}",
        t0.elapsed().as_millis(),
        out.stdout.lines().last().unwrap_or("").trim()
    ));
    Ok(())
}

/// The script that pg_rewinds `db` (major `v`) from `primary` as the
/// ha_db_user, whose password it reads from stdin (never on a command
/// line). Before 13, pg_rewind refuses a target that was not shut down
/// cleanly (a powered-off primary): the script first runs the crash
/// recovery pg_rewind 13 runs itself (`postgres --single`), with a
/// recovery.conf moved aside (single-user mode cannot be a standby; clup
/// writes a new one after the rewind).
fn rewind_script(cfg: &crate::model::config::Config, db: &Db, primary: &Db, v: &PgVer) -> String {
    let clean = if v.rewind_recovers_target {
        String::new()
    } else {
        format!(
            r#"{}state=$(as_user "$bin/pg_controldata" -D "$pgdata" | sed -n 's/^Database cluster state: *//p')
case "$state" in
  "shut down"|"shut down in recovery") ;;
  *) echo "target state '$state': single-user crash recovery"
     [ ! -f "$pgdata/recovery.conf" ] || mv "$pgdata/recovery.conf" "$pgdata/recovery.conf.clup-rewind" || exit 1
     as_user "$bin/postgres" --single -F -D "$pgdata" template1 </dev/null >/dev/null 2>"$pgdata/clup_single.log" ||
       {{ echo "clup: single-user crash recovery failed:" >&2; tail -n 20 "$pgdata/clup_single.log" >&2; exit 1; }} ;;
esac
"#,
            need_tool("pg_controldata", "of the server's major version")
        )
    };
    format!(
        "{}{}{clean}IFS= read -r PGPASSWORD; export PGPASSWORD\nas_user \"$bin/pg_rewind\" --target-pgdata=\"$pgdata\" --source-server={}{} 2>&1\n",
        pgctl::prelude(db, cfg),
        need_tool("pg_rewind", "of the server's major version"),
        quote(&format!(
            "host={} port={} user={} dbname=postgres connect_timeout=5 {}",
            primary.host,
            primary.port,
            cfg.ha_db_user,
            cfg.pg_ssl.conninfo()
        )),
        if v.rewind_flags.is_empty() { String::new() } else { format!(" {}", v.rewind_flags) }
    )
}

/// `repair --rebuild`: stop the node, move its data aside (kept, never
/// deleted) and pg_basebackup a fresh copy from the primary.
fn rebuild(shared: &Shared, f: &RepairFacts, t: &TaskHandle, hp: &str) -> Result<(), String> {
    let (cfg, ssh, primary, db) = (&shared.cfg, &shared.ssh, &f.primary, &f.db);
    t.info(&format!("{hp}: stop database before rebuilding it..."));
    pgctl::stop_fast(ssh, db, cfg).map_err(|e| e.to_string())?;
    let ts = crate::now_secs();
    let aside = format!("{}.clup-{ts}", db.pgdata);
    t.info(&format!(
        "{hp}: move {} aside (to {aside}, or to {}/clup-old-{ts} when it is a mount point; kept, never deleted)...",
        db.pgdata, db.pgdata
    ));
    t.info(&format!(
        "{hp}: pg_basebackup -D {} -U{} -h {} -p {} -X stream ...",
        db.pgdata, cfg.db_repl_user, primary.host, primary.port
    ));
    let t0 = Instant::now();
    let (pv, _) = pg::version_and_role(primary, cfg).map_err(|e| format!("{hp}: {e}"))?;
    let script = rebuild_script(cfg, db, primary, (ts, &aside), &PgVer::of(pv));
    let pass = format!("{}\n", cfg.db_repl_pass.expose());
    let out = ssh
        .run_script(
            &db.host,
            "pg_basebackup",
            &script,
            Some(pass.as_bytes()),
            Duration::from_secs(6 * 3600),
        )
        .map_err(|e| {
            format!(
                "{hp}: pg_basebackup failed (the old data is kept beside or inside {}): {e}",
                db.pgdata
            )
        })?;
    t.info(&format!(
        "{hp}: pg_basebackup completed in {} ms; {}.",
        t0.elapsed().as_millis(),
        out.stdout.lines().last().unwrap_or("").trim()
    ));
    Ok(())
}

/// The script that moves `db`'s data aside (to `aside`, or into
/// `clup-old-<ts>` inside a mount point) and pg_basebackups `primary` into
/// its place as the db_repl_user, whose password it reads from stdin.
fn rebuild_script(
    cfg: &crate::model::config::Config,
    db: &Db,
    primary: &Db,
    (ts, aside): (u64, &str),
    v: &PgVer,
) -> String {
    // A connection string rather than -h/-p/-U: it carries pg_sslmode.
    let backup = format!(
        "\"$bin/pg_basebackup\" -d {} {}",
        quote(&format!(
            "host={} port={} user={} {}",
            primary.host,
            primary.port,
            cfg.db_repl_user,
            cfg.pg_ssl.conninfo()
        )),
        v.basebackup_flags
    );
    // A data directory that is a mount point cannot be renamed: its
    // old files go into a directory inside it, the copy is made
    // beside them on the same filesystem and moved up. Only renames.
    format!(
        r#"{prelude}{need}IFS= read -r PGPASSWORD; export PGPASSWORD
if mountpoint -q "$pgdata" 2>/dev/null; then
  old="$pgdata/clup-old-{ts}"; new="$pgdata/clup-new-{ts}"
  mkdir -m 0700 "$old" || exit 1
  for f in "$pgdata"/* "$pgdata"/.[!.]*; do
    case "$f" in "$old") ;; *) [ -e "$f" ] && {{ mv "$f" "$old"/ || exit 1; }} ;; esac
  done
  install -d -m 0700 -o "$user" "$new" || exit 1
  as_user {backup} -D "$new" 2>&1 || exit 1
  for f in "$new"/* "$new"/.[!.]*; do [ -e "$f" ] && {{ mv "$f" "$pgdata"/ || exit 1; }}; done
  rmdir "$new"
  echo "old data kept at $old"
else
  mv "$pgdata" {aside} || exit 1
  install -d -m 0700 -o "$user" "$pgdata" || exit 1
  as_user {backup} -D "$pgdata" 2>&1 || exit 1
  echo "old data kept at "{aside}
fi
"#,
        prelude = pgctl::prelude(db, cfg),
        need = need_tool("pg_basebackup", "of the server's major version or newer"),
        aside = quote(aside),
    )
}

/// Write the node's recovery settings so that it follows the primary (then
/// reload, restart or start it as needed); on failure, the manual's advice
/// goes with the error.
fn rewrite_recovery_settings(
    shared: &Shared,
    f: &RepairFacts,
    t: &TaskHandle,
    hp: &str,
) -> Result<(), String> {
    let (primary, db) = (&f.primary, &f.db);
    t.info(&words::repair_recovery_begin(hp));
    crate::monitor::slots::create_logged(shared, primary, &[db], |ok, m| {
        if ok {
            t.info(&format!("{hp}: {m}."));
        } else {
            t.error(&format!("{hp}: {m}."));
        }
    });
    repoint_db(shared, db, primary)
        .map_err(|e| format!("{hp}: {e}\n{}", instructions(&shared.cfg, db, primary)))?;
    t.info(&words::repair_recovery_done(hp));
    Ok(())
}

/// Wait (up to [`STREAM_WAIT`]) until the primary's pg_stat_replication
/// shows the node streaming; else fail with the manual's advice.
fn wait_until_streaming(
    shared: &Shared,
    f: &RepairFacts,
    t: &TaskHandle,
    hp: &str,
) -> Result<(), String> {
    let (cfg, primary, db) = (&shared.cfg, &f.primary, &f.db);
    t.info(&format!(
        "{hp}: waiting for database({}) to stream from the primary...",
        db.addr()
    ));
    let end = Instant::now() + STREAM_WAIT;
    loop {
        let p = pg::probe(primary, cfg, false);
        if p.replicas
            .iter()
            .any(|r| r.application_name == db.repl_app_name && r.state == "streaming")
        {
            return Ok(());
        }
        if Instant::now() >= end {
            let tail = pgctl::start_log_tail(&shared.ssh, db, cfg, 15);
            let tail = if tail.trim().is_empty() {
                String::new()
            } else {
                format!(
                    "the last lines of its {}:\n{}\n",
                    pgctl::START_LOG,
                    tail.trim_end()
                )
            };
            return Err(format!(
                "{hp}: database({}) does not stream from the primary after {} s.\n{tail}{}",
                db.addr(),
                STREAM_WAIT.as_secs(),
                instructions(cfg, db, primary)
            ));
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// Mark the repaired node Normal (a standby) in the meta and add it back
/// to every cstlb.
fn mark_normal(
    shared: &Shared,
    name: &str,
    f: &RepairFacts,
    t: &TaskHandle,
    hp: &str,
) -> Result<(), String> {
    let id = f.db.id;
    t.info(&words::repair_to_normal(hp));
    monitor::meta_update_cluster(shared, name, move |c| {
        let d = c.db_mut(id).ok_or("db vanished")?;
        d.state = DB_NORMAL;
        d.is_primary = 0;
        Ok(())
    })?;
    cstlb_all(shared, name, &f.c, &f.db.addr(), true, t);
    Ok(())
}

/// A script line that stops (before anything is moved or copied) when the
/// bin dir lacks `tool`: a clear error, not a half-done repair.
pub(super) fn need_tool(tool: &str, which: &str) -> String {
    format!(
        "if [ ! -x \"$bin/{tool}\" ]; then echo \"clup: no {tool} in $bin; this repair needs a {tool} {which} there (pg_bin_dir)\" >&2; exit 127; fi\n"
    )
}

/// pg_rewind needs wal_log_hints or data checksums on the source, and a
/// superuser connection.
fn rewind_prerequisites(shared: &Shared, primary: &Db) -> Result<(), String> {
    let cfg = &shared.cfg;
    let rows = pg::query_row(
        primary,
        cfg,
        "select current_setting('wal_log_hints'), current_setting('data_checksums'), \
         (select rolsuper::text from pg_roles where rolname = current_user)",
    )
    .map_err(|e| {
        format!(
            "cannot check pg_rewind prerequisites on {}: {e}",
            primary.addr()
        )
    })?;
    let (hints, sums, superuser) = (&rows[0], &rows[1], &rows[2]);
    if hints != "on" && sums != "on" {
        return Err(format!(
            "pg_rewind needs wal_log_hints=on or data checksums on {} (wal_log_hints={hints}, data_checksums={sums}); use repair --rebuild",
            primary.addr()
        ));
    }
    if superuser != "true" {
        return Err(format!(
            "pg_rewind needs a superuser source connection; ha_db_user '{}' is not a superuser",
            cfg.ha_db_user
        ));
    }
    Ok(())
}

/// The manual's advice when a node cannot simply follow the primary.
pub(super) fn instructions(cfg: &crate::model::config::Config, db: &Db, primary: &Db) -> String {
    format!(
        "Please rebuild the standby on the fault node, then retry (or run 'clupadm repair --rewind' / '--rebuild'):\n\n\
         pg_basebackup -D {pgdata} -U{user} -h {host} -p {port} -X stream\n\n\
         recovery settings (recovery.conf before PostgreSQL 12; standby.signal + postgresql.auto.conf from 12):\n\
         standby_mode = 'on'\n\
         recovery_target_timeline = 'latest'\n\
         primary_conninfo = '{conninfo}'\n\n\
         If the node's log says 'new timeline N forked off current database system timeline M before current recovery point',\n\
         it went ahead of the new primary before it failed: pg_rewind (repair --rewind) or a rebuild is needed.",
        pgdata = db.pgdata,
        user = cfg.db_repl_user,
        host = primary.host,
        port = primary.port,
        conninfo = recovery::masked_conninfo(&db.repl_app_name, &cfg.db_repl_user, &primary.host, primary.port, &cfg.pg_ssl),
    )
}

// ---------------------------------------------------------------- reports
