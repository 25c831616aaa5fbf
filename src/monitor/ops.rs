//! Operator-requested operations that run as background tasks: `switch`
//! (planned switchover with zero data loss) and `repair` (bring a Fault
//! node back, optionally with pg_rewind or pg_basebackup), plus the live
//! reports `get_last_lsn` and `repl_delay`.
//!
//! A task takes the cluster lock before it starts (so a refusal reaches the
//! operator at once), renews it while it runs, and goes on when clupadm
//! goes away. Every step is written to the task log in the manual's words.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::exec::pg::{self, format_lsn, parse_lsn, DbProbe};
use crate::exec::shell::quote;
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, recovery, vip};
use crate::ha;
use crate::model::meta::{Cluster, Db, DB_NORMAL};
use crate::model::report::{DelayRow, LsnRow};
use crate::monitor::task::{self, TaskHandle};
use crate::monitor::{self, cstlb_all, repoint_db, vip_of, Shared};

/// How long a switch waits for the target to replay the old primary's last
/// WAL before it gives up and puts the old primary back.
const CATCH_UP: Duration = Duration::from_secs(30);
/// How long repair waits for the node to show up streaming.
const STREAM_WAIT: Duration = Duration::from_secs(30);

/// Keeps the cluster lock renewed (every lock_ttl/3) until dropped.
struct LockKeeper {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl LockKeeper {
    fn start(shared: &Arc<Shared>, cluster: &str, holder: &str) -> LockKeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, h, st) = (
            shared.clone(),
            cluster.to_string(),
            holder.to_string(),
            stop.clone(),
        );
        let ttl = shared.cfg.lock_ttl;
        let handle = thread::spawn(move || {
            let mut last = Instant::now();
            while !st.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= ttl / 3 {
                    if let Err(e) = task::lock(&*s.store, &c, &h, ttl.as_secs()) {
                        log::error!("cannot renew the lock of cluster {c}: {e}");
                    }
                    last = Instant::now();
                }
            }
        });
        LockKeeper {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn cluster_of(shared: &Shared, name: &str) -> Result<Cluster, String> {
    let doc = shared.store.load().map_err(|e| e.to_string())?;
    doc.clusters
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no cluster named '{name}'"))
}

/// Take the lock, create the task, run `body` on its own thread.
fn spawn_task(
    shared: &Arc<Shared>,
    cluster: &str,
    task_name: String,
    body: impl FnOnce(&Arc<Shared>, &TaskHandle) -> Result<(), String> + Send + 'static,
) -> Result<(u64, String), String> {
    let holder = format!("task '{task_name}'");
    task::lock(
        &*shared.store,
        cluster,
        &holder,
        shared.cfg.lock_ttl.as_secs(),
    )?;
    let t = match task::begin(&*shared.store, &shared.home.task_dir(), cluster, &task_name) {
        Ok(t) => t,
        Err(e) => {
            task::unlock(&*shared.store, cluster, &holder);
            return Err(e.to_string());
        }
    };
    let id = t.id;
    let (s, c) = (shared.clone(), cluster.to_string());
    thread::Builder::new()
        .name(format!("task-{id}"))
        .spawn(move || {
            let keeper = LockKeeper::start(&s, &c, &holder);
            let res = body(&s, &t);
            if let Err(e) = &res {
                t.error(e);
            }
            drop(keeper);
            task::unlock(&*s.store, &c, &holder);
            t.finish(&*s.store, res.is_ok());
        })
        .map_err(|e| format!("cannot start the task thread: {e}"))?;
    Ok((id, task_name))
}

// ---------------------------------------------------------------- switch

/// Check and start a switchover of `cluster` to db `target`.
pub fn start_switch(
    shared: &Arc<Shared>,
    cluster: &str,
    target: u32,
) -> Result<(u64, String), String> {
    let c = cluster_of(shared, cluster)?;
    let db = c
        .db(target)
        .ok_or_else(|| format!("cluster '{cluster}' has no db {target}"))?;
    if db.is_primary() {
        return Err(format!(
            "db {target} ({}) is already the primary",
            db.addr()
        ));
    }
    if !db.is_normal() {
        return Err(format!(
            "db {target} ({}) is Fault; repair it first",
            db.addr()
        ));
    }
    match c.primary() {
        Some(p) if p.is_normal() => {}
        _ => {
            return Err(format!(
                "cluster '{cluster}' has no healthy primary to switch from"
            ))
        }
    }
    let name = format!("switch {cluster} to dbid={target}");
    let cl = cluster.to_string();
    spawn_task(shared, cluster, name, move |s, t| switch(s, &cl, target, t))
}

/// What a switch found out before it changed anything: every later step
/// works from these, so that all of them act on the same cluster view.
struct SwitchFacts {
    /// The cluster as read when the task started.
    c: Cluster,
    /// The primary to switch from.
    old: Db,
    /// The standby to promote.
    new: Db,
    /// synchronous_standby_names of the old primary, from the probe that
    /// found it answering (it is stopped by the time the new one needs it).
    old_sync_names: Option<String>,
    write_vip: std::net::Ipv4Addr,
}

/// The switchover task, phase by phase; each phase logs its own steps and
/// the first error ends the task. From stopping the old primary until the
/// promotion, a failure starts the old primary again ([`restore_primary`]).
fn switch(shared: &Arc<Shared>, name: &str, target: u32, t: &TaskHandle) -> Result<(), String> {
    let pre = format!("Switch(cluster={name}, dbid={target})");
    let f = switch_preflight(shared, name, target, t, &pre)?;
    let last = stop_old_primary(shared, &f, t, &pre)?;
    wait_for_catch_up(shared, &f, last, t, &pre)?;
    promote_new_primary(shared, &f, t, &pre)?;

    t.info(&format!("{pre}: save node state to meta server..."));
    meta_set_primary(shared, name, f.new.id)?;
    t.info(&format!("{pre}: save node state to meta server completed."));

    set_sync_names_on_new_primary(shared, &f, t, &pre);
    repoint_to_new_primary(shared, &f, t, &pre)?;
    cstlb_all(shared, &f.c, &f.new.addr(), false, t);
    cstlb_all(shared, &f.c, &f.old.addr(), true, t);
    if f.c.read_vip_host == f.new.host {
        move_read_vip_to_old_primary(shared, name, &f, t, &pre)?;
    }
    shared.counters.switchovers.fetch_add(1, Ordering::Relaxed);
    t.info(&format!("{pre}: all completed."));
    Ok(())
}

/// Find the old and new primary and check, before anything is touched,
/// that the old one answers and the target streams from it: a refusal here
/// leaves the cluster as it was.
fn switch_preflight(
    shared: &Shared,
    name: &str,
    target: u32,
    t: &TaskHandle,
    pre: &str,
) -> Result<SwitchFacts, String> {
    let cfg = &shared.cfg;
    let c = cluster_of(shared, name)?;
    let new = c.db(target).ok_or("target vanished")?.clone();
    let old = c.primary().ok_or("no primary")?.clone();
    t.info(&format!("{pre}: begin..."));

    t.info(&format!(
        "{pre}: checking database({}) is a healthy standby streaming from the primary...",
        new.addr()
    ));
    let op = pg::probe(&old, cfg, true);
    if !op.ok {
        return Err(format!(
            "{pre}: the primary database({}) does not answer: {}",
            old.addr(),
            op.error
        ));
    }
    let np = pg::probe(&new, cfg, false);
    if !streams_from(&np, &old.host) {
        return Err(format!(
            "{pre}: database({}) is not a healthy standby streaming from {} (ok={}, in recovery={:?}, upstream={:?}); refusing",
            new.addr(),
            old.host,
            np.ok,
            np.in_recovery,
            np.upstream.as_ref().map(|u| (&u.status, &u.sender_host))
        ));
    }
    let write_vip = vip_of(&c.write_vip)?;
    Ok(SwitchFacts {
        c,
        old,
        new,
        old_sync_names: op.sync_names,
        write_vip,
    })
}

/// A standby's probe says it is in recovery and its WAL receiver streams
/// from `host`.
fn streams_from(p: &DbProbe, host: &str) -> bool {
    p.ok && p.in_recovery == Some(true)
        && p.upstream
            .as_ref()
            .is_some_and(|u| u.status == "streaming" && u.sender_host.as_deref() == Some(host))
}

/// Fence the old primary: take its write VIP away, stop it cleanly and
/// read where it stopped, the LSN the target must replay past before it
/// may be promoted without losing a transaction.
fn stop_old_primary(
    shared: &Shared,
    f: &SwitchFacts,
    t: &TaskHandle,
    pre: &str,
) -> Result<u64, String> {
    let (cfg, ssh, old, write_vip) = (&shared.cfg, &shared.ssh, &f.old, f.write_vip);
    t.info(&format!(
        "{pre}: delete write vip({write_vip}) from host({})...",
        old.host
    ));
    vip::delete(ssh, &old.host, write_vip).map_err(|e| e.to_string())?;

    t.info(&format!(
        "{pre}: stop old primary database({}) cleanly...",
        old.addr()
    ));
    let t0 = Instant::now();
    if let Err(e) = pgctl::stop_fast(ssh, old, cfg) {
        restore_primary(shared, &f.c, old, t, pre);
        return Err(format!("{pre}: cannot stop the old primary: {e}"));
    }
    let last = match checkpoint_lsn(shared, old) {
        Ok(l) => l,
        Err(e) => {
            restore_primary(shared, &f.c, old, t, pre);
            return Err(format!(
                "{pre}: cannot read the old primary's last checkpoint: {e}"
            ));
        }
    };
    t.info(&format!(
        "{pre}: old primary stopped at {} ({} ms); waiting for database({}) to replay it...",
        format_lsn(last),
        t0.elapsed().as_millis(),
        f.new.addr()
    ));
    Ok(last)
}

/// Wait (up to [`CATCH_UP`]) until the target has replayed past `last`;
/// if it does not, put the old primary back.
fn wait_for_catch_up(
    shared: &Shared,
    f: &SwitchFacts,
    last: u64,
    t: &TaskHandle,
    pre: &str,
) -> Result<(), String> {
    let end = Instant::now() + CATCH_UP;
    loop {
        let p = pg::probe(&f.new, &shared.cfg, false);
        if p.replay_lsn.is_some_and(|r| r > last) {
            return Ok(());
        }
        if Instant::now() >= end {
            restore_primary(shared, &f.c, &f.old, t, pre);
            return Err(format!(
                "{pre}: database({}) did not replay {} within {} s (replayed {:?}); the old primary was put back",
                f.new.addr(),
                format_lsn(last),
                CATCH_UP.as_secs(),
                p.replay_lsn.map(format_lsn)
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Promote the target and give it the write VIP. A failed promotion still
/// puts the old primary back; past it there is no way back.
fn promote_new_primary(
    shared: &Shared,
    f: &SwitchFacts,
    t: &TaskHandle,
    pre: &str,
) -> Result<(), String> {
    let (cfg, ssh, new, write_vip) = (&shared.cfg, &shared.ssh, &f.new, f.write_vip);
    t.info(&format!(
        "{pre}: Promote standby database({}) to primary...",
        new.host
    ));
    if let Err(e) = pg::promote(ssh, new, cfg) {
        restore_primary(shared, &f.c, &f.old, t, pre);
        return Err(format!("{pre}: promote failed: {e}"));
    }
    t.info(&format!(
        "{pre}: Promote standby database({}) to primary completed.",
        new.host
    ));
    let (ifname, _) =
        vip::find_interface(ssh, &new.host, cfg.network).map_err(|e| e.to_string())?;
    vip::add(ssh, &new.host, write_vip, &ifname).map_err(|e| e.to_string())?;
    t.info(&format!(
        "{pre}: write vip({write_vip}) added on host({}).",
        new.host
    ));
    Ok(())
}

/// Carry synchronous replication over to the new primary, naming the other
/// standbys and the old primary. A failure is logged, not fatal: the switch
/// itself is done by now.
fn set_sync_names_on_new_primary(shared: &Shared, f: &SwitchFacts, t: &TaskHandle, pre: &str) {
    let current = f.old_sync_names.as_deref();
    if let Some(names) = ha::sync_names_after(&f.c, &f.old, &f.new, current) {
        match pg::set_sync_names(&f.new, &shared.cfg, &names) {
            Ok(()) => t.info(&format!(
                "{pre}: synchronous_standby_names on database({}) set to '{names}'.",
                f.new.addr()
            )),
            Err(e) => t.error(&format!("{pre}: cannot set synchronous_standby_names: {e}")),
        }
    }
}

/// Point the other normal standbys (in parallel; failures logged, not
/// fatal) and then the old primary at the new primary. The old primary
/// failing to follow ends the task with an error.
fn repoint_to_new_primary(
    shared: &Shared,
    f: &SwitchFacts,
    t: &TaskHandle,
    pre: &str,
) -> Result<(), String> {
    let (old, new) = (&f.old, &f.new);
    t.info(&format!(
        "{pre}: change all standby database upper level primary database to host({})...",
        new.host
    ));
    let others: Vec<&Db> = f.c.normal_standbys().filter(|d| d.id != new.id).collect();
    let errors: Vec<String> = thread::scope(|s| {
        let hs: Vec<_> = others
            .iter()
            .map(|d| {
                s.spawn(|| {
                    repoint_db(shared, d, new)
                        .err()
                        .map(|e| format!("database({}): {e}", d.addr()))
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    });
    for e in &errors {
        t.error(&format!("{pre}: repoint failed: {e}"));
    }
    t.info(&format!(
        "{pre}: turn old primary database({}) into a standby of host({})...",
        old.addr(),
        new.host
    ));
    repoint_db(shared, old, new)
        .map_err(|e| format!("{pre}: old primary cannot follow the new one: {e}"))
}

/// The read VIP was on the target, now the primary: move it to the old
/// primary, now a standby, and record where it is.
fn move_read_vip_to_old_primary(
    shared: &Shared,
    name: &str,
    f: &SwitchFacts,
    t: &TaskHandle,
    pre: &str,
) -> Result<(), String> {
    let (ssh, old, new) = (&shared.ssh, &f.old, &f.new);
    let read_vip = vip_of(&f.c.read_vip)?;
    t.info(&format!(
        "{pre}: move read vip({read_vip}) from host({}) to host({})...",
        new.host, old.host
    ));
    let _ = vip::delete(ssh, &new.host, read_vip);
    let (ifname, _) =
        vip::find_interface(ssh, &old.host, shared.cfg.network).map_err(|e| e.to_string())?;
    vip::add(ssh, &old.host, read_vip, &ifname).map_err(|e| e.to_string())?;
    let h = old.host.clone();
    monitor::meta_update_cluster(shared, name, move |c| {
        c.read_vip_host = h.clone();
        Ok(())
    })
}

/// A switch that failed before the promotion: start the old primary again
/// and give it back the write VIP.
fn restore_primary(shared: &Shared, c: &Cluster, old: &Db, t: &TaskHandle, pre: &str) {
    t.error(&format!(
        "{pre}: rolling back: starting database({}) again as the primary...",
        old.addr()
    ));
    if let Err(e) = pgctl::start(&shared.ssh, old, &shared.cfg) {
        t.error(&format!("{pre}: cannot start the old primary: {e}"));
    }
    if let Ok(v) = vip_of(&c.write_vip) {
        if let Ok((ifname, _)) = vip::find_interface(&shared.ssh, &old.host, shared.cfg.network) {
            if let Err(e) = vip::add(&shared.ssh, &old.host, v, &ifname) {
                t.error(&format!("{pre}: cannot put the write vip back: {e}"));
            }
        }
    }
}

/// The last checkpoint of a stopped server: from pg_controldata when the
/// bin dir has it, else read from `global/pg_control` itself (a bin dir
/// with only initdb, pg_ctl and postgres, as some packages ship; a
/// pg_controldata of another major misreads the file, so none is borrowed).
fn checkpoint_lsn(shared: &Shared, db: &Db) -> Result<u64, String> {
    let script = checkpoint_script(db, &shared.cfg);
    let out = shared
        .ssh
        .run_script(
            &db.host,
            "pg_controldata",
            &script,
            None,
            Duration::from_secs(20),
        )
        .map_err(|e| e.to_string())?;
    parse_checkpoint(&out.stdout)
}

fn checkpoint_script(db: &Db, cfg: &crate::model::config::Config) -> String {
    format!(
        r#"{}if [ -x "$bin/pg_controldata" ]; then as_user "$bin/pg_controldata" -D "$pgdata"
else printf '{PG_CONTROL_TAG}%s\n' "$(od -An -v -t x1 -N 40 "$pgdata/global/pg_control" | tr -d ' \n')"; fi
"#,
        pgctl::prelude(db, cfg)
    )
}

/// Marks the raw first bytes of pg_control in [`checkpoint_lsn`]'s output.
const PG_CONTROL_TAG: &str = "pg_control bytes: ";

/// The checkpoint location in pg_controldata's output, or in the first 40
/// bytes of pg_control (hex, after [`PG_CONTROL_TAG`]). Their layout has
/// been the same from 9.3 to 18 (ControlFileData: system_identifier u64,
/// pg_control_version u32, catalog_version_no u32, state u32, padding,
/// time i64, checkPoint u64; in the host's byte order, little-endian on the
/// hosts clup supports); the version and the state (1, shut down) are
/// checked so that another layout or a server not cleanly stopped is an
/// error, never a wrong LSN.
fn parse_checkpoint(stdout: &str) -> Result<u64, String> {
    if let Some(hex) = stdout.lines().find_map(|l| l.strip_prefix(PG_CONTROL_TAG)) {
        let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        let b = match bytes {
            Some(b) if b.len() == 40 && hex.len() == 80 => b,
            _ => return Err(format!("cannot read global/pg_control (got '{hex}')")),
        };
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let (version, state) = (u32_at(8), u32_at(16));
        if !(942..1900).contains(&version) {
            return Err(format!(
                "global/pg_control: unknown pg_control version {version}; set pg_bin_dir to a bin dir with pg_controldata"
            ));
        }
        if state != 1 {
            return Err(format!(
                "global/pg_control: the server was not shut down cleanly (state {state})"
            ));
        }
        return Ok(u64::from_le_bytes(b[32..40].try_into().unwrap()));
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .and_then(|v| parse_lsn(v.trim()))
        .ok_or_else(|| "no 'Latest checkpoint location' in pg_controldata's output".to_string())
}

fn meta_set_primary(shared: &Shared, name: &str, id: u32) -> Result<(), String> {
    monitor::meta_update_cluster(shared, name, move |c| {
        for d in c.db_list.iter_mut() {
            d.is_primary = u8::from(d.id == id);
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- repair

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
    spawn_task(shared, cluster, name, move |s, t| {
        repair(s, &cl, id, mode, t)
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
/// behind the cstlbs. The first error ends the task.
fn repair(
    shared: &Arc<Shared>,
    name: &str,
    id: u32,
    mode: RepairMode,
    t: &TaskHandle,
) -> Result<(), String> {
    let pre = format!("Repair(cluster={name}, dbid={id})");
    t.info(&format!("{pre}: begin get cluster lock..."));
    t.info(&format!("{pre}: begin..."));
    let f = find_primary_and_fault(shared, name, id, t, &pre)?;
    let hp = format!("Repair(cluster={name}, host={})", f.db.host);
    match mode {
        RepairMode::Plain => {}
        RepairMode::Rewind => rewind(shared, &f, t, &hp)?,
        RepairMode::Rebuild => rebuild(shared, &f, t, &hp)?,
    }
    rewrite_recovery_settings(shared, &f, t, &hp)?;
    wait_until_streaming(shared, &f, t, &hp)?;
    mark_normal(shared, name, &f, t, &hp)?;
    t.info(&format!("{hp}: all completed."));
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
    t.info(&format!("{pre}: find primary database ..."));
    let primary = c.primary().ok_or("no primary")?.clone();
    t.info(&format!(
        "{pre}: primary database: {}",
        serde_json::to_string(&primary).unwrap_or_default()
    ));
    t.info(&format!("{pre}: find fault database ..."));
    let db = c.db(id).ok_or("db vanished")?.clone();
    t.info(&format!(
        "Repair: fault database: {}",
        serde_json::to_string(&db).unwrap_or_default()
    ));
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
    t.info(&format!("{hp}: pg_rewind from host({})...", primary.host));
    let t0 = Instant::now();
    let script = rewind_script(cfg, db, primary);
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
    t.info(&format!(
        "{hp}: pg_rewind completed in {} ms: {}",
        t0.elapsed().as_millis(),
        out.stdout.lines().last().unwrap_or("").trim()
    ));
    Ok(())
}

/// The script that pg_rewinds `db` from `primary` as the ha_db_user, whose
/// password it reads from stdin (never on a command line).
fn rewind_script(cfg: &crate::model::config::Config, db: &Db, primary: &Db) -> String {
    format!(
        "{}{}IFS= read -r PGPASSWORD; export PGPASSWORD\nas_user \"$bin/pg_rewind\" --target-pgdata=\"$pgdata\" --source-server={} 2>&1\n",
        pgctl::prelude(db, cfg),
        need_tool("pg_rewind", "of the server's major version"),
        quote(&format!(
            "host={} port={} user={} dbname=postgres connect_timeout=5 {}",
            primary.host,
            primary.port,
            cfg.ha_db_user,
            cfg.pg_ssl.conninfo()
        ))
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
    let script = rebuild_script(cfg, db, primary, ts, &aside);
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
    ts: u64,
    aside: &str,
) -> String {
    // A connection string rather than -h/-p/-U: it carries pg_sslmode.
    let backup = format!(
        "\"$bin/pg_basebackup\" -d {} -X stream --checkpoint=fast",
        quote(&format!(
            "host={} port={} user={} {}",
            primary.host,
            primary.port,
            cfg.db_repl_user,
            cfg.pg_ssl.conninfo()
        ))
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
    t.info(&format!("{hp}: create recovery.conf for this database..."));
    repoint_db(shared, db, primary)
        .map_err(|e| format!("{hp}: {e}\n{}", instructions(&shared.cfg, db, primary)))?;
    t.info(&format!(
        "{hp}: create recovery.conf for this database completed"
    ));
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
        "{hp}: checking repair database replication steaming is ok..."
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
            return Err(format!(
                "{hp}: database({}) does not stream from the primary after {} s.\n{}",
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
    t.info(&format!("{hp}: change fault database node to normal ..."));
    monitor::meta_update_cluster(shared, name, move |c| {
        let d = c.db_mut(id).ok_or("db vanished")?;
        d.state = DB_NORMAL;
        d.is_primary = 0;
        Ok(())
    })?;
    cstlb_all(shared, &f.c, &f.db.addr(), true, t);
    Ok(())
}

/// A script line that stops (before anything is moved or copied) when the
/// bin dir lacks `tool`: a clear error, not a half-done repair.
fn need_tool(tool: &str, which: &str) -> String {
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
pub fn instructions(cfg: &crate::model::config::Config, db: &Db, primary: &Db) -> String {
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

fn probe_cluster(shared: &Shared, c: &Cluster) -> Vec<(Db, DbProbe)> {
    thread::scope(|s| {
        let hs: Vec<_> = c
            .db_list
            .iter()
            .map(|d| s.spawn(move || (d.clone(), pg::probe(d, &shared.cfg, false))))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// `get_last_lsn`: timeline and LSN of every database, read now.
pub fn last_lsn(shared: &Shared, c: &Cluster) -> Vec<LsnRow> {
    probe_cluster(shared, c)
        .into_iter()
        .map(|(d, p)| LsnRow {
            id: d.id,
            host: d.host.clone(),
            primary: d.is_primary,
            timeline: p.timeline,
            lsn: p.wal_lsn.or(p.replay_lsn).map(format_lsn),
        })
        .collect()
}

/// `repl_delay`: each standby's delays in bytes behind the primary, from
/// the primary's pg_stat_replication, read now.
pub fn repl_delay(shared: &Shared, c: &Cluster) -> Vec<DelayRow> {
    let primary_probe = c.primary().map(|p| pg::probe(p, &shared.cfg, false));
    let current = primary_probe.as_ref().and_then(|p| p.wal_lsn);
    c.db_list
        .iter()
        .map(|d| {
            let none = DelayRow {
                host: d.host.clone(),
                primary: d.is_primary,
                current_lsn: None,
                sent_delay: None,
                write_delay: None,
                flush_delay: None,
                replay_delay: None,
                is_sync: None,
                state: None,
            };
            if d.is_primary() {
                return none;
            }
            let r = primary_probe.as_ref().and_then(|p| {
                p.replicas
                    .iter()
                    .find(|r| r.application_name == d.repl_app_name)
            });
            let Some(r) = r else {
                return DelayRow {
                    state: Some("down".into()),
                    ..none
                };
            };
            let delay = |x: Option<u64>| current.zip(x).map(|(c, x)| c.saturating_sub(x));
            DelayRow {
                current_lsn: current.map(format_lsn),
                sent_delay: delay(r.sent_lsn),
                write_delay: delay(r.write_lsn),
                flush_delay: delay(r.flush_lsn),
                replay_delay: delay(r.replay_lsn),
                is_sync: Some(r.sync_state.clone()),
                state: Some(if r.state == "streaming" {
                    "normal".into()
                } else {
                    r.state.clone()
                }),
                ..none
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Config, SAMPLE};
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    /// pg_controldata's line, or the raw bytes of pg_control as PG 10, 11,
    /// 16 and 18 wrote them (taken from initdb'd, cleanly stopped clusters).
    #[test]
    fn checkpoint_from_pg_controldata_or_pg_control() {
        let out = "pg_control version number:            1300\n\
                   Latest checkpoint location:           0/3000028\n";
        assert_eq!(parse_checkpoint(out), Ok(0x300_0028));
        let raw = |hex: &str| format!("{PG_CONTROL_TAG}{hex}\n");
        for (hex, lsn) in [
            (
                "ffd4dcd1ec37086bea030000cbce050c0100000000000000ed37086b000000002800000300000000",
                0x300_0028,
            ),
            (
                "34a5c805ee37086b4c0400009b5c070c0100000000000000ef37086b000000002800000300000000",
                0x300_0028,
            ),
            (
                "5b866a66f337086b14050000fff50e0c0100000000000000f437086b00000000c8de4d0100000000",
                0x14D_DEC8,
            ),
            (
                "b936c42df537086b080700003300120c0100000000000000f537086b0000000040b3740100000000",
                0x174_B340,
            ),
        ] {
            assert_eq!(parse_checkpoint(&raw(hex)), Ok(lsn), "{hex}");
        }
        // Not cleanly shut down (state 6, in production): an error.
        let e = parse_checkpoint(&raw(
            "b936c42df537086b080700003300120c0600000000000000f537086b0000000040b3740100000000",
        ))
        .unwrap_err();
        assert!(e.contains("not shut down cleanly (state 6)"), "{e}");
        // Another layout (or byte order): an error, not a wrong LSN.
        let e = parse_checkpoint(&raw(
            "b936c42df537086b000007083300120c0100000000000000f537086b0000000040b3740100000000",
        ))
        .unwrap_err();
        assert!(e.contains("unknown pg_control version"), "{e}");
        // A short or unreadable file.
        assert!(parse_checkpoint(&raw("b936c42d")).is_err());
        assert!(parse_checkpoint(&raw("")).is_err());
        assert!(parse_checkpoint(&raw(&"zz".repeat(40))).is_err());
        assert!(parse_checkpoint("pg_controldata: error: could not open file\n").is_err());
    }

    /// The script, run by the local sh: a bin dir without pg_controldata
    /// reads pg_control's bytes, one with it runs it.
    #[test]
    fn checkpoint_script_runs_in_sh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("clup-ckpt-{}", std::process::id()));
        let (bin, pgdata) = (dir.join("bin"), dir.join("pgdata"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(pgdata.join("global")).unwrap();
        let mut control = vec![0u8; 8192];
        control[8..12].copy_from_slice(&1800u32.to_le_bytes());
        control[16..20].copy_from_slice(&1u32.to_le_bytes());
        control[32..40].copy_from_slice(&0x1_0174_B340u64.to_le_bytes());
        std::fs::write(pgdata.join("global/pg_control"), control).unwrap();
        let text = format!("{SAMPLE}pg_bin_dir = {}\n", bin.display());
        let cfg = Config::parse(&text, std::path::Path::new("/c")).unwrap();
        let mut db = parse_clusters(SAMPLE_INIT).unwrap()["cluster01"].db_list[0].clone();
        db.pgdata = pgdata.display().to_string();
        let me = crate::exec::cmd::run("id", &["-un".into()], None, Duration::from_secs(5))
            .unwrap()
            .stdout;
        db.os_user = me.trim().to_string();
        let run = || {
            let out = crate::exec::cmd::run(
                "sh",
                &["-c".into(), checkpoint_script(&db, &cfg)],
                None,
                Duration::from_secs(5),
            )
            .unwrap();
            parse_checkpoint(&out.stdout)
        };
        assert_eq!(run(), Ok(0x1_0174_B340));
        let fake = bin.join("pg_controldata");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Latest checkpoint location:           2/ABC'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(run(), Ok(0x2_0000_0ABC));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A repair script stops at once when its tool is missing.
    #[test]
    fn need_tool_stops_the_script() {
        let script = format!(
            "bin=/nonexistent\n{}echo moved",
            need_tool("pg_basebackup", "x")
        );
        let out = crate::exec::cmd::run("sh", &["-c".into(), script], None, Duration::from_secs(5));
        match out {
            Err(crate::exec::cmd::CommandError::Failed {
                code,
                stderr,
                stdout,
                ..
            }) => {
                assert_eq!(code, 127);
                assert!(stdout.is_empty(), "{stdout}");
                assert!(
                    stderr.contains("clup: no pg_basebackup in /nonexistent"),
                    "{stderr}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// The manual's advice (§3.2.3) when a node cannot follow the primary:
    /// the pg_basebackup command and the recovery settings, password masked.
    #[test]
    fn repair_instructions_mask_the_password() {
        let cfg = Config::parse(SAMPLE, std::path::Path::new("clup.conf")).unwrap();
        let c = parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap();
        let text = instructions(&cfg, c.db(2).unwrap(), c.db(1).unwrap());
        assert!(text.contains("pg_basebackup -D /home/postgres/pgdata -Upostgres -h 192.168.56.41 -p 5432 -X stream"), "{text}");
        assert!(
            text.contains("standby_mode = 'on'\nrecovery_target_timeline = 'latest'\n"),
            "{text}"
        );
        assert!(text.contains("primary_conninfo = 'application_name=stb42 user=postgres host=192.168.56.41 port=5432 password=****** sslmode=prefer'"), "{text}");
        assert!(text.contains("pg_rewind"), "{text}");
        assert!(!text.contains("password=postgres"), "{text}");
    }
}
