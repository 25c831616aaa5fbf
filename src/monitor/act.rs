//! The round's third phase: carry out a decision. A restart runs at once;
//! every other action runs as a task under the cluster lock, step by step,
//! with the manual's log lines. It decides nothing: the plan comes from
//! [`crate::ha::decide`], and a step that fails either aborts the plan
//! (before the promotion) or is logged and passed (after it).
//!
//! A check that must be repeated right before an irreversible step (the
//! write VIP free before promoting, the old primary fenced) is a step of its
//! own in the plan, run here with a fresh, unshared look.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::checks::write_vip_seen_within;
use super::events;
use super::probe::seen_of;
use super::task::{self, TaskHandle};
use super::Shared;
use crate::exec::pg;
use crate::exec::recovery::{self, Applied};
use crate::exec::ssh as exssh;
use crate::exec::wire::Handshake;
use crate::exec::{cstlb, pgctl, vip};
use crate::ha::{self, Action, Decision, Facts, Kind, VipSeen};
use crate::model::event::{EventKind, NewEvent};
use crate::model::meta::{Cluster, Db, DB_FAULT};
use crate::model::words;
use crate::store::update;

/// What the act phase did, for the loop's memory.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Acted {
    /// Nothing was to be done: the round may run its upkeep.
    Calm,
    /// Nothing was done: more facts are wanted, this clupserver no longer
    /// leads, or the meta changed while the round probed.
    Held,
    /// These databases were (re)started; why a start failed, if it did.
    Restarted(Vec<(u32, Option<String>)>),
    /// A plan of this kind ran as a task.
    Ran(Kind),
    /// A repair --rewind of this database was started (its own task).
    Rewinding(u32),
}

/// Carry out `d` for cluster `name`, whose meta was `cluster` when the
/// round began.
pub(super) fn act_on(
    shared: &Arc<Shared>,
    name: &str,
    cluster: &Cluster,
    d: &Decision,
    facts: &Facts,
) -> Acted {
    match d.kind {
        Kind::Nothing => Acted::Calm,
        Kind::Gather => Acted::Held,
        _ if !shared.gate.may_act() => {
            log::warn!(
                "Cluster({name}): not acting on '{}': this clupserver no longer leads",
                d.reason.replace('\n', " ")
            );
            Acted::Held
        }
        _ if !unchanged(shared, name, cluster) => {
            // Frozen, locked or edited while this round probed: what was
            // decided may no longer hold. Decide again next round.
            log::info!(
                "Cluster({name}): the meta changed during this round; not acting on: {}",
                d.reason.replace('\n', " ")
            );
            Acted::Held
        }
        Kind::Restart => {
            log::info!("{}", d.reason);
            Acted::Restarted(restart(shared, name, cluster, &d.plan))
        }
        Kind::AutoRewind => match d.plan.first() {
            Some(&Action::RewindDb { id }) => {
                log::warn!("Cluster({name}): {}", d.reason);
                match super::ops::start_repair(shared, name, id, super::ops::RepairMode::Rewind) {
                    Ok((task, _)) => {
                        log::info!("Cluster({name}): rewind of db {id} runs as task {task}.")
                    }
                    Err(e) => {
                        log::error!("Cluster({name}): cannot start the rewind of db {id}: {e}")
                    }
                }
                Acted::Rewinding(id)
            }
            _ => Acted::Held,
        },
        kind => {
            run_as_task(shared, name, cluster, d, facts);
            Acted::Ran(kind)
        }
    }
}

/// Start the databases the plan names; returns their ids. A probe that
/// failed for want of an answer (an overloaded server or network) finds
/// the server running: pg_ctl leaves it be.
fn restart(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    plan: &[Action],
) -> Vec<(u32, Option<String>)> {
    let mut out = Vec::new();
    for a in plan {
        let Action::RestartDb { id } = a else {
            continue;
        };
        let Some(db) = cluster.db(*id) else {
            out.push((*id, None));
            continue;
        };
        let (why, outcome) = match pgctl::start(&shared.ssh, db, &shared.cfg) {
            Ok(o) if o.stdout.contains("server is already running") => {
                log::info!("Database({}) is running: not restarted.", db.addr());
                (None, "it was running: not restarted".to_string())
            }
            Ok(_) => {
                log::info!("Database({}) restarted.", db.addr());
                (None, "restarted".to_string())
            }
            Err(e) => {
                log::error!("Restart of database({}) failed: {e}", db.addr());
                let why = pgctl::start_failure_why(&e.to_string());
                let outcome = format!("restart failed: {why}");
                (Some(why), outcome)
            }
        };
        shared.emit(
            NewEvent::new(EventKind::Restart, name)
                .db(db.id, &db.host)
                .reason(&outcome),
        );
        out.push((*id, why));
    }
    out
}

/// Is the cluster's meta still what this round decided on?
fn unchanged(shared: &Shared, name: &str, cluster: &Cluster) -> bool {
    matches!(shared.store.load(), Ok(doc) if doc.clusters.get(name) == Some(cluster))
}

/// Run an acting decision as a task, under the cluster lock.
fn run_as_task(shared: &Arc<Shared>, name: &str, cluster: &Cluster, d: &Decision, facts: &Facts) {
    let what = match d.kind {
        Kind::Failover => "failover",
        Kind::StandbyFault => "standby fault",
        Kind::Fence => "fence",
        Kind::Repoint => "repoint",
        Kind::NoCandidate => "no candidate",
        Kind::SyncStandbys => "synchronous standbys",
        _ => "action",
    };
    let holder = format!("{what} of cluster {name}");
    if let Err(e) = task::lock(&*shared.store, name, &holder, shared.cfg.lock_ttl.as_secs()) {
        log::warn!("Cluster({name}): {e}; not acting now.");
        return;
    }
    let task_name = format!("{what} {name}");
    let t = match task::begin(&*shared.store, &shared.home.task_dir(), name, &task_name) {
        Ok(t) => t,
        Err(e) => {
            log::error!("Cluster({name}): cannot record a task, not acting: {e}");
            task::unlock(&*shared.store, name, &holder);
            return;
        }
    };
    let pre = prefix(cluster, d);
    // The reason's first line now; a failover's "switch to new host" line
    // when it commits, as the manual orders them.
    let mut lines = d.reason.lines().map(str::to_string);
    t.info(&lines.next().unwrap_or_default());
    let mut commit_lines: Vec<String> = lines.collect();
    if d.kind != Kind::Failover {
        commit_lines.drain(..).for_each(|l| t.info(&l));
    }
    if d.kind == Kind::StandbyFault {
        t.info(&words::standby_switch_to(
            &pre,
            read_vip_host_after(cluster, d),
        ));
    }
    let started = Instant::now();
    let run = Run {
        shared,
        name,
        cluster,
        facts,
        pre,
        commit_lines,
        reason: d.reason.lines().next().unwrap_or_default(),
        t: &t,
    };
    let failover = (d.kind == Kind::Failover).then(|| events::failover_begin(name, cluster, d));
    if let Some(e) = &failover {
        shared.emit(e.clone().reason(&d.reason));
    }
    let ok = run_plan(&run, d);
    let ms = started.elapsed().as_millis() as u64;
    if let Some(mut e) = failover {
        e.kind = EventKind::FailoverEnd;
        let how = if ok { "completed" } else { "failed" };
        shared.emit(e.reason(&format!("failover {how} after {ms} ms (task {})", t.id)));
    }
    if d.kind == Kind::Failover && ok {
        shared.counters.failovers.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .last_failover_ms
            .store(ms, Ordering::Relaxed);
    }
    t.finish(&*shared.store, ok);
    task::unlock(&*shared.store, name, &holder);
}

/// Prefix for a plan's log lines, as the manual words them.
fn prefix(cluster: &Cluster, d: &Decision) -> String {
    let subject = d.subject.and_then(|id| cluster.db(id));
    let addr = subject.map(Db::addr).unwrap_or_default();
    match (d.kind, subject) {
        (Kind::Failover, Some(db)) if db.is_primary() => words::primary_pre(&addr),
        (Kind::StandbyFault, _) => words::standby_pre(&addr),
        _ => format!("Cluster action on database({addr})"),
    }
}

/// Where the read VIP is once a plan has run: where it moves to, or where
/// it was.
fn read_vip_host_after<'a>(cluster: &'a Cluster, d: &'a Decision) -> &'a str {
    d.plan
        .iter()
        .find_map(|a| match a {
            Action::MoveReadVip { to, .. } => Some(to.as_str()),
            _ => None,
        })
        .unwrap_or(&cluster.read_vip_host)
}

/// Does the failover commit with this step (its log says "switch to new
/// host" just before)? Everything before only checks, fences, or takes the
/// old primary's VIP away.
fn commits(a: &Action) -> bool {
    !matches!(
        a,
        Action::KillDb { .. }
            | Action::ConfirmGone { .. }
            | Action::DeleteWriteVip { .. }
            | Action::CreateSlots { .. }
    )
}

/// What every step of a running plan needs.
struct Run<'a> {
    shared: &'a Shared,
    name: &'a str,
    /// The meta the plan was decided on.
    cluster: &'a Cluster,
    /// The facts it was decided on.
    facts: &'a Facts,
    /// The prefix of its log lines.
    pre: String,
    /// The reason's lines logged when the plan commits ([`commits`]).
    commit_lines: Vec<String>,
    /// The reason's first line, for events.
    reason: &'a str,
    t: &'a TaskHandle,
}

/// Run the plan step by step. Steps before the promotion abort the plan on
/// failure; after it, every step is tried and failures are logged.
fn run_plan(run: &Run, d: &Decision) -> bool {
    let Run {
        shared, cluster, t, ..
    } = *run;
    let pre = run.pre.as_str();
    let mut promoted = false;
    let mut ok = true;
    // Repoints run in parallel: collect them and run when the plan reaches them.
    let repoints: Vec<(u32, u32)> = d
        .plan
        .iter()
        .filter_map(|a| match a {
            Action::Repoint { id, to } => Some((*id, *to)),
            _ => None,
        })
        .collect();
    let mut repointed = false;
    let mut committed = false;
    for a in &d.plan {
        if !committed && commits(a) {
            committed = true;
            run.commit_lines.iter().for_each(|l| t.info(l));
        }
        if let Action::Repoint { .. } = a {
            if !repointed {
                repointed = true;
                ok &= repoint_all(shared, cluster, &repoints, pre, t);
            }
            continue;
        }
        let t0 = Instant::now();
        let res = step(run, a);
        let ms = t0.elapsed().as_millis();
        match res {
            Ok(()) => {
                if let Action::Promote { .. } = a {
                    promoted = true;
                }
                if let Some(e) = events::of_step(run.name, cluster, run.reason, a) {
                    shared.emit(e);
                }
                log::debug!("{pre}: step '{a}' done in {ms} ms");
            }
            Err(e) => {
                t.error(&format!("{pre}: {a} failed after {ms} ms: {e}"));
                let critical = matches!(
                    a,
                    Action::KillDb { .. }
                        | Action::ConfirmGone { .. }
                        | Action::EnsureWriteVipFree { .. }
                        | Action::Promote { .. }
                        | Action::MetaPrimary { .. }
                ) || (!promoted
                    && matches!(a, Action::MetaDbState { .. } | Action::Fence { .. }));
                if critical {
                    t.error(&format!("{pre}: aborted, nothing further is changed."));
                    return false;
                }
                ok = false;
            }
        }
    }
    match d.kind {
        Kind::Failover => {
            // The new primary: promoted now, or by an unfinished failover.
            if let Some(new) = d.plan.iter().find_map(|a| match a {
                Action::Promote { id } | Action::AddWriteVip { id } => cluster.db(*id),
                _ => None,
            }) {
                t.info(&words::switch_new_host_done(pre, &new.host));
            }
        }
        Kind::StandbyFault => t.info(&words::standby_all_done(pre)),
        _ => t.info(&format!("{pre}: all completed.")),
    }
    ok
}

/// Point every standby in `repoints` (db id, new upstream id) at its new
/// upstream, in parallel; false if any failed (each failure is logged).
fn repoint_all(
    shared: &Shared,
    cluster: &Cluster,
    repoints: &[(u32, u32)],
    pre: &str,
    t: &TaskHandle,
) -> bool {
    let mut ok = true;
    let to = cluster
        .db(repoints[0].1)
        .map(|d| d.host.clone())
        .unwrap_or_default();
    t.info(&words::repoint_all_begin(pre, &to));
    let t0 = Instant::now();
    let results: Vec<(u32, Result<(), String>)> = thread::scope(|s| {
        let hs: Vec<_> = repoints
            .iter()
            .map(|(id, to)| s.spawn(move || (*id, repoint(shared, cluster, *id, *to))))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (id, r) in results {
        if let Err(e) = r {
            ok = false;
            t.error(&format!("{pre}: repoint of db {id} failed: {e}"));
        }
    }
    log::debug!("{pre}: repoint took {} ms", t0.elapsed().as_millis());
    t.info(&words::repoint_all_done(pre, &to));
    ok
}

fn db_or_err(cluster: &Cluster, id: u32) -> Result<&Db, String> {
    cluster
        .db(id)
        .ok_or_else(|| format!("db {id} is not in the cluster"))
}

/// One acting step. Gather actions never reach here.
fn step(run: &Run, a: &Action) -> Result<(), String> {
    let Run {
        shared,
        name,
        cluster,
        t,
        ..
    } = *run;
    let pre = run.pre.as_str();
    match a {
        Action::CheckHost { .. }
        | Action::CheckPeer { .. }
        | Action::CheckWriteVip { .. }
        | Action::CheckRunning { .. }
        | Action::RestartDb { .. }
        | Action::RewindDb { .. }
        | Action::Repoint { .. } => Ok(()),
        Action::Fence { id } => fence(shared, cluster, *id, pre, t),
        Action::KillDb { id } => kill(shared, cluster, *id, pre, t),
        Action::ConfirmGone { id, cand } => confirm_gone(run, *id, *cand),
        Action::CstlbDelete { backend } => {
            cstlb_change(shared, name, cluster, backend, false, pre, t)
        }
        Action::CstlbAdd { backend } => cstlb_change(shared, name, cluster, backend, true, pre, t),
        Action::DeleteWriteVip { host } => delete_write_vip(shared, cluster, host, t),
        Action::EnsureWriteVipFree { id } => ensure_write_vip_free(shared, cluster, *id),
        Action::Promote { id } => promote(shared, cluster, *id, pre, t),
        Action::CreateSlots { id, for_ids } => {
            // Never fails the plan: the upkeep makes what is missing.
            let on = db_or_err(cluster, *id)?;
            let dbs: Vec<&Db> = for_ids.iter().filter_map(|i| cluster.db(*i)).collect();
            super::slots::create_logged(shared, on, &dbs, |ok, m| {
                if ok {
                    t.info(&format!("{pre}: {m}."));
                } else {
                    t.error(&format!("{pre}: {m}."));
                }
            });
            Ok(())
        }
        Action::AddWriteVip { id } => add_write_vip(shared, cluster, *id, pre, t),
        Action::SetSyncNames { id, names } => {
            let db = db_or_err(cluster, *id)?;
            pg::set_sync_names(db, &shared.cfg, names).map_err(|e| e.to_string())?;
            t.info(&format!(
                "{pre}: synchronous_standby_names on database({}) set to '{names}'.",
                db.addr()
            ));
            Ok(())
        }
        Action::MoveReadVip { from, to } => move_read_vip(shared, name, cluster, from, to, pre, t),
        Action::MetaPrimary { id, old } => {
            let (id, old) = (*id, *old);
            save_node_state(shared, name, pre, t, |c| {
                for d in c.db_list.iter_mut() {
                    d.is_primary = u8::from(d.id == id);
                }
                if let Some(o) = c.db_mut(old) {
                    o.state = DB_FAULT;
                }
                Ok(())
            })
        }
        Action::MetaDbState { id, state } => {
            let (id, state) = (*id, *state);
            save_node_state(shared, name, pre, t, |c| {
                c.db_mut(id).ok_or("db vanished")?.state = state;
                Ok(())
            })
        }
        Action::MetaSyncWanted { names } => {
            let names = names.clone();
            meta_update_cluster(shared, name, move |c| {
                c.sync_wanted = names.clone();
                Ok(())
            })
        }
        Action::MetaClusterState { state } => {
            let state = *state;
            meta_update_cluster(shared, name, |c| {
                c.state = state;
                Ok(())
            })
        }
    }
}

/// Stop the old primary (fast) so that it cannot take writes, and take the
/// write VIP off its host first (best effort: the host may be gone).
fn fence(
    shared: &Shared,
    cluster: &Cluster,
    id: u32,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let db = db_or_err(cluster, id)?;
    t.info(&format!(
        "{pre}: stop database({}) so that it cannot take writes...",
        db.addr()
    ));
    let _ = vip::delete(&shared.ssh, &db.host, vip_of(&cluster.write_vip)?);
    pgctl::stop_fast(&shared.ssh, db, &shared.cfg)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Kill a hung server for certain (see [`pgctl::kill_script`]); the plan
/// stops here if its death cannot be confirmed.
fn kill(
    shared: &Shared,
    cluster: &Cluster,
    id: u32,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let db = db_or_err(cluster, id)?;
    t.info(&format!(
        "{pre}: fence database({}): kill -9 its postmaster and children so that it cannot take writes...",
        db.addr()
    ));
    let out = pgctl::kill(&shared.ssh, db).map_err(|e| e.to_string())?;
    t.info(&format!(
        "{pre}: fence database({}) completed: {}.",
        db.addr(),
        out.stdout.trim()
    ));
    Ok(())
}

/// How long the last look at an old primary waits for it to answer. On a
/// LAN a live server answers a new connection in milliseconds; a dead host
/// costs the failover this much.
const CONFIRM_WAIT: Duration = Duration::from_millis(300);

/// Within [`CONFIRM_WAIT`], a connection attempt that times out is made
/// again this often (a partition that heals meanwhile is seen).
const CONFIRM_EVERY: Duration = Duration::from_millis(75);

/// [`Action::ConfirmGone`]: in parallel, a new connection to the old
/// primary (it must not be answered) and fresh probes of the Normal
/// standbys (the candidate must still be the one [`ha::choose_candidate`]
/// picks from them). Facts older than the promotion decide nothing.
fn confirm_gone(run: &Run, id: u32, cand: u32) -> Result<(), String> {
    let Run {
        shared, cluster, t, ..
    } = *run;
    let cfg = &shared.cfg;
    let old = db_or_err(cluster, id)?;
    let standbys: Vec<(&Db, bool)> = cluster.normal_standbys().map(|d| (d, false)).collect();
    let wait = cfg.probe_timeout.min(CONFIRM_WAIT);
    let cand_db = db_or_err(cluster, cand)?;
    // The new connections go on until the ARP check and the standbys'
    // probes are done (arping listens for a second after its one request):
    // the old primary's last answer is then at most CONFIRM_EVERY older
    // than the promotion, never the age of the slowest check.
    let busy = AtomicBool::new(true);
    let cap = cfg.probe_timeout + Duration::from_secs(2);
    let (answer, vip, probes) = thread::scope(|s| {
        let h = s.spawn(|| pg::accepts_while(old, cfg, wait, CONFIRM_EVERY, &busy, cap));
        // Who answers ARP for the write VIP, from the candidate's host: an
        // old primary back on the link with it is seen here too. Not when
        // its host was up: the plan took the VIP off it and checked.
        let old_host_up = run.facts.hosts.get(&old.host) == Some(&true)
            || run.facts.stalled_since.contains_key(&old.id);
        let v = s.spawn(move || {
            (!old_host_up)
                .then(|| write_vip_seen_within(shared, cluster, &cand_db.host, None, wait).0)
        });
        let probes = pg::probe_many(&standbys, cfg, &mut pg::ProbeConns::default());
        let vip = v.join();
        busy.store(false, Ordering::Release);
        (h.join(), vip, probes)
    });
    if let Ok(Some(Ok(VipSeen::Answered))) = vip {
        return Err(format!(
            "another host answers ARP for the write vip({}) again: not promoting, the next round decides again",
            cluster.write_vip
        ));
    }
    match answer {
        Ok(Handshake::Unreachable(_)) => {}
        Ok(Handshake::Answered) => {
            return Err(format!(
                "database({}) answers again: its outage was shorter than the failover; not promoting, the next round decides again",
                old.addr()
            ))
        }
        Ok(Handshake::Stalled(_)) => {
            return Err(format!(
                "database({}) is reachable again (it accepts connections, serves none); not promoting, the next round decides again",
                old.addr()
            ))
        }
        Err(_) => return Err("the check of the old primary panicked".to_string()),
    }
    let mut fresh = run.facts.clone();
    for (db_id, p) in &probes {
        fresh.seen.insert(*db_id, seen_of(p));
    }
    log_positions(run, cand, &probes);
    match ha::choose_candidate(cluster, &fresh, &shared.params()) {
        Ok(c) if c.id == cand => {
            t.info(&format!(
                "{}: database({}) is still gone and database({}) still has the most WAL.",
                run.pre,
                old.addr(),
                c.addr()
            ));
            Ok(())
        }
        Ok(c) => Err(format!(
            "database({}) now has more WAL than database({}); not promoting on old positions, the next round decides again",
            c.addr(),
            db_or_err(cluster, cand)?.addr()
        )),
        Err(e) => Err(format!("no standby is safe to promote now: {e}")),
    }
}

/// The standbys' received WAL right before the promotion, against the
/// candidate's: WAL a standby has past the candidate's end forks off the
/// new timeline and is lost with it (in sync mode it may hold acknowledged
/// commits): said loudly, with how many bytes, for each such standby.
fn log_positions(run: &Run, cand: u32, probes: &std::collections::BTreeMap<u32, pg::DbProbe>) {
    let Some(at) = probes.get(&cand).and_then(|p| p.wal_lsn) else {
        return;
    };
    let mut shown = Vec::new();
    for (id, p) in probes.iter().filter(|(id, _)| **id != cand) {
        let (Some(db), Some(lsn)) = (run.cluster.db(*id), p.wal_lsn) else {
            continue;
        };
        let delta = lsn as i128 - at as i128;
        shown.push(format!("database({}) {delta:+} bytes", db.addr()));
        if delta > 0 {
            run.t.error(&format!(
                "{}: database({}) has {delta} bytes of WAL past the promotion point {}: they fork off the new timeline and are lost with it; it needs repair --rewind (auto_rewind = on does it)",
                run.pre,
                db.addr(),
                pg::format_lsn(at)
            ));
        }
    }
    if !shown.is_empty() {
        run.t.info(&format!(
            "{}: received WAL against the promotion point {}: {}.",
            run.pre,
            pg::format_lsn(at),
            shown.join(", ")
        ));
    }
}

/// Add a backend to, or remove it from, every cstlb (never fatal).
fn cstlb_change(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    backend: &str,
    add: bool,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    if add {
        t.info(&format!("{pre}: begin add host({backend}) to cstlb ..."));
        cstlb_all(shared, name, cluster, backend, add, t);
        t.info(&format!("{pre}: add host({backend}) to cstlb finished."));
    } else {
        t.info(&words::cstlb_remove_begin(pre, backend));
        cstlb_all(shared, name, cluster, backend, add, t);
        t.info(&words::cstlb_remove_done(pre, backend));
    }
    Ok(())
}

/// Take the write VIP off the old primary's host; a failure is logged and
/// ignored (the host may be gone; the promotion checks ARP first).
fn delete_write_vip(
    shared: &Shared,
    cluster: &Cluster,
    host: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let v = &cluster.write_vip;
    // The old primary, named by its host:port as the manual does.
    let addr = cluster
        .db_list
        .iter()
        .filter(|d| d.host == host)
        .max_by_key(|d| d.is_primary)
        .map_or_else(|| host.to_string(), Db::addr);
    t.info(&words::delete_write_vip_begin(&addr, v));
    match vip::delete(&shared.ssh, host, vip_of(v)?) {
        Ok(()) => t.info(&words::delete_write_vip_done(&addr, v)),
        Err(e) => t.error(&format!("Switch primary database({addr}): delete write vip({v}) on host({host}) failed (ignored, host may be gone): {e}")),
    }
    Ok(())
}

/// The split-brain guard before a promotion: from the candidate's host, no
/// other host may still answer ARP for the write VIP (asked afresh, never
/// a shared answer).
fn ensure_write_vip_free(shared: &Shared, cluster: &Cluster, id: u32) -> Result<(), String> {
    let db = db_or_err(cluster, id)?;
    // An ARP answer on a LAN takes milliseconds: no need to wait a second.
    let wait = shared.cfg.probe_timeout.min(CONFIRM_WAIT);
    match write_vip_seen_within(shared, cluster, &db.host, None, wait).0 {
        Ok(VipSeen::Free | VipSeen::HeldBy(_)) => Ok(()),
        Ok(VipSeen::Answered) => Err(format!(
            "another host still answers ARP for the write vip({}): refusing to promote (split brain guard)",
            cluster.write_vip
        )),
        Err(e) => Err(format!("cannot check that the write vip is free: {e}")),
    }
}

fn promote(
    shared: &Shared,
    cluster: &Cluster,
    id: u32,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let db = db_or_err(cluster, id)?;
    t.info(&words::promote_begin(pre, &db.host));
    pg::promote(&shared.ssh, db, &shared.cfg).map_err(|e| e.to_string())?;
    t.info(&words::promote_done(pre, &db.host));
    Ok(())
}

/// Add the write VIP on the new primary's host, on the interface seen
/// there; a remembered interface that has gone is looked up once more.
fn add_write_vip(
    shared: &Shared,
    cluster: &Cluster,
    id: u32,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let ssh = &shared.ssh;
    let db = db_or_err(cluster, id)?;
    let v = vip_of(&cluster.write_vip)?;
    let ifname = shared.ifname(&db.host, v)?;
    if let Err(e) = vip::add(ssh, &db.host, v, &ifname) {
        log::warn!("{e}; looking up the interface of host {} again", db.host);
        let (ifname, _) =
            vip::find_interface(ssh, &db.host, shared.cfg.network, v).map_err(|e| e.to_string())?;
        shared.remember_ifname(&db.host, &ifname);
        vip::add(ssh, &db.host, v, &ifname).map_err(|e| e.to_string())?;
    }
    t.info(&format!(
        "{pre}: write vip({}) added on host({}).",
        cluster.write_vip, db.host
    ));
    Ok(())
}

fn move_read_vip(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    from: &str,
    to: &str,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let ssh = &shared.ssh;
    t.info(&format!(
        "{pre}: move read vip({}) from host({from}) to host({to}) ...",
        cluster.read_vip
    ));
    let read_vip = vip_of(&cluster.read_vip)?;
    let _ = vip::delete(ssh, from, read_vip);
    let (ifname, _) =
        vip::find_interface(ssh, to, shared.cfg.network, read_vip).map_err(|e| e.to_string())?;
    vip::add(ssh, to, read_vip, &ifname).map_err(|e| e.to_string())?;
    let to = to.to_string();
    meta_update_cluster(shared, name, |c| {
        c.read_vip_host = to.clone();
        Ok(())
    })
}

/// Save node states in the meta, between the manual's two log lines.
fn save_node_state(
    shared: &Shared,
    name: &str,
    pre: &str,
    t: &TaskHandle,
    f: impl Fn(&mut Cluster) -> Result<(), &'static str>,
) -> Result<(), String> {
    t.info(&words::save_node_state_begin(pre));
    meta_update_cluster(shared, name, f)?;
    t.info(&words::save_node_state_done(pre));
    Ok(())
}

/// Change one cluster's meta (validated and saved atomically by the store).
pub fn meta_update_cluster(
    shared: &Shared,
    name: &str,
    f: impl Fn(&mut Cluster) -> Result<(), &'static str>,
) -> Result<(), String> {
    update(&*shared.store, |doc| {
        let c = doc.clusters.get_mut(name).ok_or("cluster vanished")?;
        f(c).map_err(str::to_string)
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Tell every cstlb of the cluster, in parallel; failures are logged and
/// counted, never fatal, never slower than cstlb_timeout.
pub fn cstlb_all(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    backend: &str,
    add: bool,
    t: &TaskHandle,
) {
    let cfg = &shared.cfg;
    let errors: Vec<String> = thread::scope(|s| {
        let hs: Vec<_> = cluster
            .cstlb_list
            .iter()
            .map(|mgr| {
                s.spawn(move || {
                    let r = if add {
                        cstlb::add(mgr, backend, cfg)
                    } else {
                        cstlb::delete(mgr, backend, cfg)
                    };
                    r.err().map(|e| format!("cstlb({mgr}): {e}"))
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    });
    let failed = errors.len();
    if failed < cluster.cstlb_list.len() {
        shared.emit(
            NewEvent::new(EventKind::CstlbChange, name)
                .host(backend)
                .reason(&format!(
                    "backend {backend} {} {} of {} cstlb(s)",
                    if add { "added to" } else { "removed from" },
                    cluster.cstlb_list.len() - failed,
                    cluster.cstlb_list.len()
                )),
        );
    }
    for e in errors {
        shared
            .counters
            .cstlb_failures
            .fetch_add(1, Ordering::Relaxed);
        t.error(&format!(
            "Can not {} host({backend}) {} {e}",
            if add { "add" } else { "remove" },
            if add { "to" } else { "from" }
        ));
    }
}

pub fn vip_of(s: &str) -> Result<Ipv4Addr, String> {
    s.parse()
        .map_err(|_| format!("invalid VIP '{s}' in the meta"))
}

/// The server_version_num of a stopped server, from its PG_VERSION file.
pub fn version_from_files(shared: &Shared, db: &Db) -> Result<u32, String> {
    let script = format!("cat {}/PG_VERSION", crate::exec::shell::quote(&db.pgdata));
    let out = exssh::Remote::run_script(
        &shared.ssh,
        &db.host,
        "read PG_VERSION",
        &script,
        None,
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    crate::exec::pgver::parse_pg_version_file(&out.stdout)
        .ok_or_else(|| format!("unexpected PG_VERSION '{}'", out.stdout.trim()))
}

/// Point standby `id` at `to`: recovery settings by version, then reload,
/// restart or start as the version and state need.
fn repoint(shared: &Shared, cluster: &Cluster, id: u32, to: u32) -> Result<(), String> {
    let db = db_or_err(cluster, id)?;
    let primary = db_or_err(cluster, to)?;
    repoint_db(shared, db, primary)
}

pub fn repoint_db(shared: &Shared, db: &Db, primary: &Db) -> Result<(), String> {
    let cfg = &shared.cfg;
    let (version, running) = match pg::version_and_role(db, cfg) {
        Ok((v, true)) => (v, true),
        Ok((_, false)) => {
            return Err(format!(
                "database({}) runs as a primary; it must be stopped (and rewound) before it can follow {}",
                db.addr(),
                primary.addr()
            ))
        }
        Err(_) => (version_from_files(shared, db)?, false),
    };
    let applied = recovery::repoint(
        &shared.ssh,
        db,
        cfg,
        version,
        running,
        &primary.host,
        primary.port,
    )
    .map_err(|e| e.to_string())?;
    match applied {
        Applied::Reloaded => Ok(()),
        Applied::NeedsRestart => {
            pgctl::stop_fast(&shared.ssh, db, cfg).map_err(|e| e.to_string())?;
            pgctl::start(&shared.ssh, db, cfg)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Applied::Written => pgctl::start(&shared.ssh, db, cfg)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}
