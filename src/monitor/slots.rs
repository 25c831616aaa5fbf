//! Replication slots (use_slots): which slots a cluster's primary keeps,
//! made before standbys follow a new primary, checked on calm rounds, and
//! dropped for a database Fault longer than slot_keep_time.
//!
//! Owns: the choice of slots (one per Normal standby, named by
//! [`slot_name`]), the upkeep's timing and what it remembers. Must not:
//! block or fail a failover, switch or repair (a slot that cannot be made
//! is logged; the upkeep tries again), or drop a slot it does not own (only
//! those named after a database of the cluster, and only unused ones).

use std::collections::{BTreeMap, BTreeSet};
use std::thread;

use super::{task, Shared};
use crate::exec::pgver::slot_name;
use crate::exec::slots::{self, KeepSize};
use crate::ha::Facts;
use crate::model::meta::{Cluster, Db, DB_FAULT};
use crate::model::report::SlotRow;

/// How often the upkeep looks at the slots (one query on the primary):
/// well within the 30 s after which a standby that does not stream is
/// taken out of service.
const CHECK_EVERY_SECS: u64 = 10;

/// What the slot upkeep remembers between rounds.
#[derive(Debug, Default)]
pub(super) struct SlotMemory {
    /// When the slots were last checked (epoch seconds); 0: at the next
    /// calm round (after any action).
    pub(super) checked_at: u64,
    /// Databases seen Fault, by id: since when (epoch seconds), as this
    /// clupserver has watched them.
    fault_since: BTreeMap<u32, u64>,
    /// The primary max_slot_wal_keep_size was seen to on.
    keep_size_on: Option<u32>,
    /// (primary, standby) pairs already repointed to use their slot, so a
    /// standby that does not take it is not restarted every check.
    repointed: BTreeSet<(u32, u32)>,
    /// The last error, logged when it changes.
    last_error: String,
}

/// Make on `on` (a new or current primary, maybe still in recovery) the
/// slots of `dbs` that it lacks. Returns what to log; never fails.
pub fn create_for(shared: &Shared, on: &Db, dbs: &[&Db]) -> Result<String, String> {
    let names: Vec<String> = dbs.iter().map(|d| slot_name(&d.repl_app_name)).collect();
    match slots::create_missing(on, &shared.cfg, &names) {
        Ok(made) if made.is_empty() => Ok(format!(
            "replication slots ({}) already on database({})",
            names.join(", "),
            on.addr()
        )),
        Ok(made) => Ok(format!(
            "replication slots ({}) created on database({})",
            made.join(", "),
            on.addr()
        )),
        Err(e) => Err(format!(
            "cannot create replication slots ({}) on database({}): {e}; the standbys stream without them until the upkeep makes them",
            names.join(", "),
            on.addr()
        )),
    }
}

/// [`create_for`] into the log, for a step that must go on whatever happens.
pub fn create_logged(shared: &Shared, on: &Db, dbs: &[&Db], log: impl Fn(bool, &str)) {
    if !shared.cfg.use_slots || dbs.is_empty() {
        return;
    }
    match create_for(shared, on, dbs) {
        Ok(m) => log(true, &m),
        Err(m) => log(false, &m),
    }
}

/// The slot upkeep of a calm round with a healthy primary.
pub(super) fn upkeep(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    facts: &Facts,
    mem: &mut SlotMemory,
) {
    let now = crate::now_secs();
    note_faults(cluster, now, &mut mem.fault_since);
    if now.saturating_sub(mem.checked_at) < CHECK_EVERY_SECS {
        return;
    }
    mem.checked_at = now;
    let Some(primary) = cluster.primary() else {
        return;
    };
    let have = match slots::list(primary, &shared.cfg) {
        Ok(s) => s,
        Err(e) => {
            let e = e.to_string();
            if e != mem.last_error {
                log::warn!("Cluster({name}): cannot check the replication slots: {e}");
                mem.last_error = e;
            }
            return;
        }
    };
    mem.last_error.clear();
    keep_size(shared, name, primary, &mut mem.keep_size_on);
    let standbys: Vec<&Db> = cluster.normal_standbys().collect();
    let missing: Vec<&Db> = standbys
        .iter()
        .copied()
        .filter(|d| have.get(&slot_name(&d.repl_app_name)).is_none())
        .collect();
    create_logged(shared, primary, &missing, |ok, m| {
        if ok {
            log::info!("Cluster({name}): {m}.");
        } else {
            log::warn!("Cluster({name}): {m}.");
        }
    });
    // Streaming, but not through its slot (set up before use_slots, or by
    // hand): its recovery settings get primary_slot_name.
    let unused: Vec<&Db> = standbys
        .iter()
        .copied()
        .filter(|d| {
            have.get(&slot_name(&d.repl_app_name))
                .is_some_and(|s| !s.active)
                && facts.seen.get(&d.id).is_some_and(|s| {
                    s.ok && s.upstream_status.as_deref() == Some("streaming")
                        && s.upstream_host.as_deref() == Some(primary.host.as_str())
                })
                && mem.repointed.insert((primary.id, d.id))
        })
        .collect();
    if !unused.is_empty() {
        use_slots(shared, name, primary, &unused);
    }
    drop_expired(shared, name, cluster, primary, now, &mem.fault_since);
    drop_stale_on_standbys(shared, name, cluster, &standbys);
}

/// Keep `since` in line with the meta: when each database was first seen
/// Fault.
fn note_faults(cluster: &Cluster, now: u64, since: &mut BTreeMap<u32, u64>) {
    since.retain(|id, _| {
        cluster
            .db(*id)
            .is_some_and(|d| d.state == DB_FAULT && !d.is_primary())
    });
    for d in &cluster.db_list {
        if d.state == DB_FAULT && !d.is_primary() {
            since.entry(d.id).or_insert(now);
        }
    }
}

/// Set max_slot_wal_keep_size on the primary once (per primary).
fn keep_size(shared: &Shared, name: &str, primary: &Db, done_on: &mut Option<u32>) {
    let Some(bytes) = shared.cfg.max_slot_wal_keep_size else {
        return;
    };
    if *done_on == Some(primary.id) {
        return;
    }
    match slots::set_wal_keep_size(primary, &shared.cfg, bytes) {
        Ok(KeepSize::Missing(major)) => {
            log::warn!("Cluster({name}): max_slot_wal_keep_size does not exist on PostgreSQL {major} (13 and later have it): a slot may hold back any amount of WAL there; only slot_keep_time limits it.");
        }
        Ok(KeepSize::Already(_)) => {}
        Ok(KeepSize::Set(mb)) => log::info!(
            "Cluster({name}): max_slot_wal_keep_size = {mb}MB set on primary database({}).",
            primary.addr()
        ),
        Err(e) => {
            log::warn!("Cluster({name}): {e}");
            return;
        }
    }
    *done_on = Some(primary.id);
}

/// Repoint standbys that stream without their slot, under the cluster lock
/// (on PostgreSQL < 13 that restarts them).
fn use_slots(shared: &Shared, name: &str, primary: &Db, dbs: &[&Db]) {
    let holder = format!("slot upkeep of cluster {name}");
    if let Err(e) = task::lock(&*shared.store, name, &holder, shared.cfg.lock_ttl.as_secs()) {
        log::info!("Cluster({name}): standbys not streaming through their slots left alone: {e}");
        return;
    }
    for d in dbs {
        log::warn!(
            "Cluster({name}): standby database({}) streams without its replication slot: setting primary_slot_name = '{}' (a restart before PostgreSQL 13).",
            d.addr(),
            slot_name(&d.repl_app_name)
        );
        if let Err(e) = super::repoint_db(shared, d, primary) {
            log::error!(
                "Cluster({name}): cannot set primary_slot_name on database({}): {e}",
                d.addr()
            );
        }
    }
    task::unlock(&*shared.store, name, &holder);
}

/// Drop the primary's slots of databases Fault for longer than
/// slot_keep_time, loudly.
fn drop_expired(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    primary: &Db,
    now: u64,
    fault_since: &BTreeMap<u32, u64>,
) {
    let keep = shared.cfg.slot_keep_time.as_secs();
    let expired: Vec<(&Db, u64)> = fault_since
        .iter()
        .filter(|(_, since)| now.saturating_sub(**since) >= keep)
        .filter_map(|(id, since)| Some((cluster.db(*id)?, now - since)))
        .collect();
    if expired.is_empty() {
        return;
    }
    let names: Vec<String> = expired
        .iter()
        .map(|(d, _)| slot_name(&d.repl_app_name))
        .collect();
    match slots::drop_inactive(primary, &shared.cfg, &names) {
        Ok(dropped) => {
            for (d, secs) in expired {
                if dropped.contains(&slot_name(&d.repl_app_name)) {
                    log::error!(
                        "Cluster({name}): DROPPED replication slot {} of database({}) on primary database({}): it has been Fault for {secs} s (slot_keep_time = {keep} s); the primary no longer keeps WAL for it, it may need repair --rebuild.",
                        slot_name(&d.repl_app_name),
                        d.addr(),
                        primary.addr()
                    );
                }
            }
        }
        Err(e) => log::warn!("Cluster({name}): cannot drop expired replication slots: {e}"),
    }
}

/// A standby keeps no slot of its own cluster (left from when it was the
/// primary): unused there, it would hold its WAL back for ever.
fn drop_stale_on_standbys(shared: &Shared, name: &str, cluster: &Cluster, standbys: &[&Db]) {
    let names: Vec<String> = cluster
        .db_list
        .iter()
        .map(|d| slot_name(&d.repl_app_name))
        .collect();
    thread::scope(|s| {
        for d in standbys {
            let names = &names;
            s.spawn(move || match slots::drop_inactive(d, &shared.cfg, names) {
                Ok(dropped) if !dropped.is_empty() => log::info!(
                    "Cluster({name}): dropped the unused replication slots ({}) on standby database({}).",
                    dropped.join(", "),
                    d.addr()
                ),
                Ok(_) => {}
                Err(e) => log::debug!("Cluster({name}): slots of standby database({}): {e}", d.addr()),
            });
        }
    });
}

/// `clupadm show`'s slot rows: each standby's slot on the primary and the
/// WAL it holds back, read now.
pub fn rows(shared: &Shared, name: &str, cluster: &Cluster) -> Vec<SlotRow> {
    let have = cluster
        .primary()
        .map(|p| slots::list(p, &shared.cfg).map_err(|e| e.to_string()));
    cluster
        .db_list
        .iter()
        .filter(|d| !d.is_primary())
        .map(|d| {
            let slot = slot_name(&d.repl_app_name);
            let (found, error) = match &have {
                Some(Ok(s)) => (s.get(&slot).map(|x| (x.clone(), s.current_lsn)), None),
                Some(Err(e)) => (None, Some(e.clone())),
                None => (None, Some("no primary".to_string())),
            };
            SlotRow {
                cluster_name: name.to_string(),
                id: d.id,
                host: d.host.clone(),
                slot_name: slot,
                exists: found.is_some(),
                active: found.as_ref().map(|(s, _)| s.active),
                restart_lsn: found
                    .as_ref()
                    .and_then(|(s, _)| s.restart_lsn)
                    .map(crate::exec::pg::format_lsn),
                retained_bytes: found.as_ref().and_then(|(s, cur)| s.retained(*cur)),
                error,
            }
        })
        .collect()
}
