//! `switch`: the planned switchover to a chosen standby, with nothing
//! lost: the old primary stops cleanly, the target replays up to its last
//! checkpoint, then it is promoted and takes the write VIP; a failure
//! before the promotion starts the old primary again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{cluster_of, spawn_task};
use crate::exec::pg::{self, format_lsn, parse_lsn, DbProbe};
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, vip};
use crate::ha;
use crate::model::event::{EventKind, NewEvent};
use crate::model::meta::{Cluster, Db};
use crate::monitor::task::TaskHandle;
use crate::monitor::{self, cstlb_all, repoint_db, vip_of, Shared};

/// How long a switch waits for the target to replay the old primary's last
/// WAL before it gives up and puts the old primary back.
const CATCH_UP: Duration = Duration::from_secs(30);

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
    let event = NewEvent::new(EventKind::Switch, cluster)
        .db(target, &db.host)
        .primaries(&c.primary().map(Db::addr).unwrap_or_default(), &db.addr());
    spawn_task(shared, cluster, name, move |s, t| {
        let res = switch(s, &cl, target, t);
        let how = match &res {
            Ok(()) => format!("switchover completed (task {})", t.id),
            Err(e) => format!("switchover failed (task {}): {e}", t.id),
        };
        s.emit(event.reason(&how));
        res
    })
}

/// What a switch found out before it changed anything: every later step
/// works from these, so that all of them act on the same cluster view.
struct SwitchFacts {
    /// The cluster's name.
    name: String,
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
    cstlb_all(shared, name, &f.c, &f.new.addr(), false, t);
    cstlb_all(shared, name, &f.c, &f.old.addr(), true, t);
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
        name: name.to_string(),
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
    shared.emit(
        NewEvent::new(EventKind::Promote, &f.name)
            .db(new.id, &new.host)
            .primaries(&f.old.addr(), &new.addr())
            .reason("switchover requested with clupadm switch"),
    );
    let (ifname, _) =
        vip::find_interface(ssh, &new.host, cfg.network, write_vip).map_err(|e| e.to_string())?;
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
    // The slots first, so that the new primary keeps their WAL from the
    // moment they follow it; a failure is logged, the switch goes on.
    let mut slotted = others.clone();
    slotted.push(old);
    crate::monitor::slots::create_logged(shared, new, &slotted, |ok, m| {
        if ok {
            t.info(&format!("{pre}: {m}."));
        } else {
            t.error(&format!("{pre}: {m}."));
        }
    });
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
    let (ifname, _) = vip::find_interface(ssh, &old.host, shared.cfg.network, read_vip)
        .map_err(|e| e.to_string())?;
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
        if let Ok((ifname, _)) = vip::find_interface(&shared.ssh, &old.host, shared.cfg.network, v)
        {
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

pub(super) fn checkpoint_script(db: &Db, cfg: &crate::model::config::Config) -> String {
    format!(
        r#"{}if [ -x "$bin/pg_controldata" ]; then as_user "$bin/pg_controldata" -D "$pgdata"
else printf '{PG_CONTROL_TAG}%s\n' "$(od -An -v -t x1 -N 40 "$pgdata/global/pg_control" | tr -d ' \n')"; fi
"#,
        pgctl::prelude(db, cfg)
    )
}

/// Marks the raw first bytes of pg_control in [`checkpoint_lsn`]'s output.
pub(super) const PG_CONTROL_TAG: &str = "pg_control bytes: ";

/// The checkpoint location in pg_controldata's output, or in the first 40
/// bytes of pg_control (hex, after [`PG_CONTROL_TAG`]). Their layout has
/// been the same from 9.3 to 18 (ControlFileData: system_identifier u64,
/// pg_control_version u32, catalog_version_no u32, state u32, padding,
/// time i64, checkPoint u64; in the host's byte order, little-endian on the
/// hosts clup supports); the version and the state (1, shut down) are
/// checked so that another layout or a server not cleanly stopped is an
/// error, never a wrong LSN.
pub(super) fn parse_checkpoint(stdout: &str) -> Result<u64, String> {
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
