//! The round's last phase, on a calm round only (the primary healthy,
//! nothing decided): bring every cstlb's backends in line with the healthy
//! standbys, make sure the primary's host holds the write VIP and, with
//! use_slots, that the standbys' replication slots are there. It runs
//! after the round's observation is published, which it must not delay.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::thread;

use super::{task, Memory, Shared};
use crate::exec::{cstlb, vip};
use crate::ha::Facts;
use crate::model::event::{EventKind, NewEvent};
use crate::model::meta::{Cluster, Db};

/// Run the upkeep of a calm round; `primary_ok`: the primary answered as
/// one (the write VIP is only checked then).
pub(super) fn upkeep(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    facts: &Facts,
    mem: &mut Memory,
    primary_ok: bool,
) {
    reconcile_cstlb(shared, name, cluster, facts, &mut mem.cstlb_errors);
    if primary_ok && shared.cfg.use_slots {
        super::slots::upkeep(shared, name, cluster, facts, &mut mem.slots);
    }
    if primary_ok {
        let now = crate::now_secs();
        if now.saturating_sub(mem.write_vip_failed_at) >= VIP_RECHECK_SECS
            && !reconcile_write_vip(shared, name, cluster, &mut mem.write_vip_seen_on)
        {
            mem.write_vip_failed_at = now;
        }
    }
}

/// How long a failed write-VIP check waits before it is tried again.
const VIP_RECHECK_SECS: u64 = 30;

/// Make sure the healthy primary's host holds the write VIP: checked once
/// after this thread starts and after every action (one ssh call), not every
/// round. A switch or failover interrupted by a clupserver restart between
/// "delete write vip" and "add write vip" leaves the VIP nowhere; this puts
/// it back on the primary the meta names (vip::add checks first that no
/// other host answers for it).
/// Returns false when the check or the repair failed (retried later).
fn reconcile_write_vip(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    seen: &mut Option<u32>,
) -> bool {
    let Some(primary) = cluster.primary() else {
        return true;
    };
    if *seen == Some(primary.id) {
        return true;
    }
    let Ok(vip_addr) = cluster.write_vip.parse::<Ipv4Addr>() else {
        return true;
    };
    let holds = shared
        .recent_addresses(&primary.host)
        .map(|addrs| addrs.iter().any(|a| a.addr == vip_addr));
    match holds {
        Ok(true) => {
            *seen = Some(primary.id);
            true
        }
        Ok(false) => {
            // A switch or a failover moves the VIP under the cluster lock,
            // off the old primary first: added here meanwhile, from this
            // round's older picture, it would be on two hosts. So only
            // under the lock, and only for the primary the meta names then.
            let holder = format!("write vip upkeep of cluster {name}");
            if let Err(e) = task::lock(&*shared.store, name, &holder, 60) {
                log::info!(
                    "Cluster({name}): write vip({vip_addr}) is not on the primary's host({}); left alone: {e}",
                    primary.host
                );
                return false;
            }
            let done = add_write_vip(shared, name, cluster, vip_addr, seen);
            task::unlock(&*shared.store, name, &holder);
            done
        }
        Err(e) => {
            log::warn!(
                "Cluster({name}): cannot check the write vip on host({}): {e}",
                primary.host
            );
            false
        }
    }
}

/// [`reconcile_write_vip`]'s repair, under the cluster lock: the VIP is
/// added on the primary's host if the meta still names that primary and
/// the host still lacks it.
fn add_write_vip(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    vip_addr: Ipv4Addr,
    seen: &mut Option<u32>,
) -> bool {
    let ssh = &shared.ssh;
    let Some(primary) = cluster.primary() else {
        return true;
    };
    let same = match shared.store.load_cluster(name) {
        Ok(Some(now)) => {
            !now.is_frozen()
                && now.write_vip == cluster.write_vip
                && now.primary().map(|p| (p.id, &p.host)) == Some((primary.id, &primary.host))
        }
        _ => false,
    };
    if !same {
        log::info!("Cluster({name}): the meta changed since this round began; the write vip is left to the next one.");
        return false;
    }
    shared.forget_addresses(&primary.host);
    match shared.recent_addresses(&primary.host) {
        Ok(addrs) if addrs.iter().any(|a| a.addr == vip_addr) => {
            *seen = Some(primary.id);
            return true;
        }
        Ok(_) => {}
        Err(e) => {
            log::warn!(
                "Cluster({name}): cannot check the write vip on host({}): {e}",
                primary.host
            );
            return false;
        }
    }
    log::warn!(
        "Cluster({name}): write vip({vip_addr}) is not on the primary's host({}): adding it...",
        primary.host
    );
    let added = vip::find_interface(ssh, &primary.host, shared.cfg.network, vip_addr)
        .and_then(|(ifname, _)| vip::add(ssh, &primary.host, vip_addr, &ifname));
    shared.forget_addresses(&primary.host);
    match added {
        Ok(()) => {
            log::info!(
                "Cluster({name}): write vip({vip_addr}) added on host({}).",
                primary.host
            );
            *seen = Some(primary.id);
            true
        }
        Err(e) => {
            log::error!(
                "Cluster({name}): cannot add write vip({vip_addr}) on host({}): {e}",
                primary.host
            );
            false
        }
    }
}

/// Bring every cstlb's backend list to the healthy Normal standbys: a cstlb
/// that restarted gets its backends back, one that missed a delete loses the
/// backend. Calls run in parallel, bounded by cstlb_timeout; an unreachable
/// cstlb is logged when it starts and stops failing, and never delays
/// anything else.
fn reconcile_cstlb(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    facts: &Facts,
    errors: &mut BTreeMap<String, String>,
) {
    let want: std::collections::BTreeSet<String> = cluster
        .normal_standbys()
        .filter(|d| {
            facts
                .seen
                .get(&d.id)
                .is_none_or(|s| s.ok && s.in_recovery == Some(true))
        })
        .map(Db::addr)
        .collect();
    let cfg = &shared.cfg;
    let results: Vec<(String, Result<Vec<String>, String>)> = thread::scope(|s| {
        let hs: Vec<_> = cluster
            .cstlb_list
            .iter()
            .map(|mgr| {
                let want = &want;
                s.spawn(move || {
                    let r = (|| {
                        let have = cstlb::list(mgr, cfg).map_err(|e| e.to_string())?;
                        let mut changed = Vec::new();
                        for b in have.keys().filter(|b| !want.contains(*b)) {
                            cstlb::delete(mgr, b, cfg).map_err(|e| e.to_string())?;
                            changed.push(format!("-{b}"));
                        }
                        for b in want.iter().filter(|b| !have.contains_key(*b)) {
                            cstlb::add(mgr, b, cfg).map_err(|e| e.to_string())?;
                            changed.push(format!("+{b}"));
                        }
                        Ok(changed)
                    })();
                    (mgr.clone(), r)
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    for (mgr, r) in results {
        match r {
            Ok(changed) => {
                if errors.remove(&mgr).is_some() {
                    log::info!("Cluster({name}): cstlb({mgr}) answers again.");
                }
                if !changed.is_empty() {
                    log::info!(
                        "Cluster({name}): cstlb({mgr}) backends reconciled: {}",
                        changed.join(" ")
                    );
                    for c in &changed {
                        let (verb, backend) = match c.strip_prefix('+') {
                            Some(b) => ("added to", b),
                            None => ("removed from", c.trim_start_matches('-')),
                        };
                        shared.emit(
                            NewEvent::new(EventKind::CstlbChange, name)
                                .host(backend)
                                .reason(&format!("backend {backend} {verb} cstlb({mgr}) (upkeep: it differed from the meta)")),
                        );
                    }
                }
            }
            Err(e) => {
                shared
                    .counters
                    .cstlb_failures
                    .fetch_add(1, Ordering::Relaxed);
                if errors.get(&mgr) != Some(&e) {
                    log::warn!("Cluster({name}): cannot reconcile cstlb({mgr}): {e}");
                    errors.insert(mgr, e);
                }
            }
        }
    }
}
