//! The failover decision: whether the primary is really gone (the
//! monitor may be the one cut off; the standbys may still reach it), which
//! standby takes over (the most WAL, within failover_max_lag), whether the
//! write VIP may move, and the plan's steps in order.

use super::sync::sync_names_after;
use super::{read_vip_target, Action, Decision, Facts, Kind, Params, VipSeen};
use crate::model::meta::{Cluster, Db, CLUSTER_FAULT};
use crate::model::words;

/// The standby to promote, or why there is none.
pub fn choose_candidate<'a>(
    cluster: &'a Cluster,
    facts: &Facts,
    p: &Params,
) -> Result<&'a Db, String> {
    let mut skipped = Vec::new();
    // Most WAL received, then synchronous, then most replayed, then lowest id.
    type Rank = (u64, bool, u64, std::cmp::Reverse<u32>);
    let mut best: Option<(&Db, Rank)> = None;
    for d in cluster.normal_standbys() {
        let Some(s) = facts.seen.get(&d.id).filter(|s| s.ok) else {
            skipped.push(format!("{} unreachable", d.addr()));
            continue;
        };
        if s.in_recovery != Some(true) {
            skipped.push(format!("{} is not in recovery", d.addr()));
            continue;
        }
        let recv = s.receive_lsn.or(s.replay_lsn).unwrap_or(0);
        if let Some(last) = facts.primary_last_lsn {
            if p.failover_max_lag > 0 && last.saturating_sub(recv) > p.failover_max_lag {
                skipped.push(format!(
                    "{} is {} bytes behind the primary (limit {})",
                    d.addr(),
                    last - recv,
                    p.failover_max_lag
                ));
                continue;
            }
        }
        let key = (
            recv,
            facts.sync_standbys.contains(&d.repl_app_name),
            s.replay_lsn.unwrap_or(0),
            std::cmp::Reverse(d.id),
        );
        if best.as_ref().is_none_or(|(_, k)| key > *k) {
            best = Some((d, key));
        }
    }
    best.map(|(d, _)| d).ok_or_else(|| {
        if skipped.is_empty() {
            "no Normal standby".to_string()
        } else {
            skipped.join("; ")
        }
    })
}

/// Fail over from `primary` (failed, or already Fault), `why` saying what
/// happened to it: only once it is known to be gone for the standbys too,
/// and only to a candidate the write VIP can safely move to.
pub(super) fn failover(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    why: String,
) -> Decision {
    if primary.is_normal() {
        let standbys: Vec<&Db> = cluster.normal_standbys().collect();
        if let Some(d) = monitor_cut_off(primary, &standbys, facts, &why) {
            return d;
        }
        if let Some(d) = standbys_reach_primary(primary, &standbys, facts, &why) {
            return d;
        }
    }
    let (cand, adopting) = match failover_target(cluster, primary, facts, p, &why) {
        Ok(target) => target,
        Err(d) => return d,
    };
    let old_host_up = facts.hosts.get(&primary.host) == Some(&true);
    if let Some(d) = write_vip_taken(primary, cand, facts, old_host_up, &why) {
        return d;
    }
    Decision {
        kind: Kind::Failover,
        plan: failover_plan(
            cluster,
            primary,
            cand,
            facts,
            (adopting, old_host_up),
            p.use_slots,
        ),
        reason: failover_reason(&why, primary, cand, adopting),
        subject: Some(primary.id),
    }
}

/// The database answered this round's probe.
fn answered(facts: &Facts, d: &Db) -> bool {
    facts.seen.get(&d.id).is_some_and(|s| s.ok)
}

/// Is the monitor the one cut off? If no standby answers, look at their
/// hosts; if none of the cluster's hosts answers, do nothing: the monitor
/// may be the isolated one. `None` lets the failover go on.
fn monitor_cut_off(primary: &Db, standbys: &[&Db], facts: &Facts, why: &str) -> Option<Decision> {
    if standbys.iter().any(|d| answered(facts, d)) {
        return None;
    }
    let unchecked: Vec<Action> = standbys
        .iter()
        .filter(|d| !facts.hosts.contains_key(&d.host))
        .map(|d| Action::CheckHost {
            host: d.host.clone(),
        })
        .collect();
    if !unchecked.is_empty() {
        return Some(Decision::gather(
            primary.id,
            unchecked,
            format!("{why} no standby answers either: checking their hosts"),
        ));
    }
    if standbys
        .iter()
        .all(|d| facts.hosts.get(&d.host) == Some(&false))
    {
        return Some(Decision::nothing(format!(
            "no action: {why} and the monitor reaches none of the cluster's hosts; it may be the isolated one"
        )));
    }
    None
}

/// Split-brain guard: can the standbys still reach the primary? Their hosts
/// are asked once per round; if one still reaches it (or, when none could
/// be asked, a standby's WAL receiver still streams from it), only the
/// monitor is cut off and there is no failover. `None` lets it go on.
fn standbys_reach_primary(
    primary: &Db,
    standbys: &[&Db],
    facts: &Facts,
    why: &str,
) -> Option<Decision> {
    let via: Vec<&Db> = standbys
        .iter()
        .copied()
        .filter(|d| answered(facts, d))
        .collect();
    let unchecked: Vec<Action> = via
        .iter()
        .filter(|d| !facts.peer_sees_primary.contains_key(&d.host))
        .filter(|d| facts.hosts.get(&d.host).is_none_or(|up| *up))
        .map(|d| Action::CheckPeer {
            via: d.host.clone(),
            host: primary.host.clone(),
            port: primary.port,
        })
        .collect();
    // Ask once per round: a check that failed stays absent.
    if !unchecked.is_empty() && !facts.peers_asked {
        return Some(Decision::gather(
            primary.id,
            unchecked,
            format!("{why} confirming with the standbys that the primary is gone"),
        ));
    }
    if let Some((via, _)) = facts.peer_sees_primary.iter().find(|(_, seen)| **seen) {
        return Some(Decision::nothing(format!(
            "no failover: {why} but standby host {via} still reaches database({}); the monitor alone is cut off from it",
            primary.addr()
        )));
    }
    if !facts.peer_sees_primary.is_empty() {
        return None;
    }
    // No standby could be asked: fall back to their WAL receivers.
    let streaming = via.iter().find(|d| {
        facts.seen.get(&d.id).is_some_and(|s| {
            s.upstream_host.as_deref() == Some(primary.host.as_str())
                && s.upstream_status.as_deref() == Some("streaming")
        })
    })?;
    Some(Decision::nothing(format!(
        "no failover: {why} but standby database({}) still streams from it",
        streaming.addr()
    )))
}

/// The standby to become the primary, and whether it already is one. A
/// standby that already runs as a primary was promoted by a failover that
/// did not finish (the monitor died after the promotion): adopt it, never
/// promote a second one. Two of them need a human. `Err` is the decision
/// to stop at: several promoted, or no standby safe to promote.
pub(super) fn failover_target<'a>(
    cluster: &'a Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    why: &str,
) -> Result<(&'a Db, bool), Decision> {
    let promoted: Vec<&Db> = cluster
        .normal_standbys()
        .filter(|d| {
            facts
                .seen
                .get(&d.id)
                .is_some_and(|s| s.ok && s.in_recovery == Some(false))
        })
        .collect();
    if promoted.len() > 1 {
        let list: Vec<String> = promoted.iter().map(|d| d.addr()).collect();
        return Err(Decision {
            kind: Kind::NoCandidate,
            plan: vec![],
            reason: format!(
                "{why} SEVERAL STANDBYS RUN AS PRIMARIES ({}): not touching anything; stop all but one and repair the others",
                list.join(", ")
            ),
            subject: Some(primary.id),
        });
    }
    if let Some(d) = promoted.first() {
        return Ok((d, true));
    }
    match choose_candidate(cluster, facts, p) {
        Ok(c) => Ok((c, false)),
        Err(e) => Err(no_candidate(cluster, primary, why, &e)),
    }
}

/// No standby is safe to promote: the cluster is left without a primary
/// and marked Fault (once), so that it shows and the next rounds look again.
fn no_candidate(cluster: &Cluster, primary: &Db, why: &str, skipped: &str) -> Decision {
    let plan = if cluster.state == CLUSTER_FAULT {
        vec![]
    } else {
        vec![Action::MetaClusterState {
            state: CLUSTER_FAULT,
        }]
    };
    Decision {
        kind: Kind::NoCandidate,
        plan,
        reason: format!(
            "{why} NO STANDBY IS SAFE TO PROMOTE, cluster left without a primary: {skipped}"
        ),
        subject: Some(primary.id),
    }
}

/// Split-brain guard on the write VIP: refuse to move it while this round
/// saw it answered by a machine that is neither the candidate nor the old
/// primary with its host up (whose VIP the plan deletes and checks again).
/// `None` lets the failover go on.
pub(super) fn write_vip_taken(
    primary: &Db,
    cand: &Db,
    facts: &Facts,
    old_host_up: bool,
    why: &str,
) -> Option<Decision> {
    let refuse = |whom: &str| {
        Some(Decision::nothing(format!(
            "no failover: {why} but {whom} still answers ARP for the write VIP; refusing to move it (split brain guard)"
        )))
    };
    match &facts.write_vip {
        Some(VipSeen::Answered) if !old_host_up => refuse("somebody"),
        Some(VipSeen::HeldBy(h)) if *h != cand.host && !(old_host_up && *h == primary.host) => {
            refuse(&format!("host {h}"))
        }
        _ => None,
    }
}

/// The failover's steps, in order: free the write VIP, (with `use_slots`
/// the standbys' slots on the candidate,) the other standbys to the
/// candidate, the last look, promote it (unless `adopting` one already
/// promoted), give it the write VIP and the meta's primary, then bring the
/// rest along: synchronous names, the cstlbs, the read VIP and the cluster
/// state.
pub(super) fn failover_plan(
    cluster: &Cluster,
    primary: &Db,
    cand: &Db,
    facts: &Facts,
    (adopting, old_host_up): (bool, bool),
    use_slots: bool,
) -> Vec<Action> {
    let mut plan = Vec::new();
    if old_host_up {
        plan.push(Action::DeleteWriteVip {
            host: primary.host.clone(),
        });
    }
    // Checked again after a delete; otherwise this round's answer will do.
    // (free, or already on the candidate after an unfinished failover).
    let vip_ok = matches!(&facts.write_vip, Some(VipSeen::Free))
        || matches!(&facts.write_vip, Some(VipSeen::HeldBy(h)) if *h == cand.host);
    if old_host_up || !vip_ok {
        plan.push(Action::EnsureWriteVipFree { id: cand.id });
    }
    // The other standbys stop streaming from the old primary before the
    // candidate is promoted (the manual's order): an old primary that
    // comes back then has no standby left to acknowledge a synchronous
    // commit, which the new timeline would not have. They follow the
    // candidate onto its new timeline. Their slots come first, so that
    // the new primary keeps their WAL from the moment they follow it.
    let others: Vec<u32> = cluster
        .normal_standbys()
        .filter(|d| d.id != cand.id)
        .map(|d| d.id)
        .collect();
    if use_slots && !others.is_empty() {
        plan.push(Action::CreateSlots {
            id: cand.id,
            for_ids: others,
        });
    }
    for d in cluster.normal_standbys().filter(|d| d.id != cand.id) {
        plan.push(Action::Repoint {
            id: d.id,
            to: cand.id,
        });
    }
    // The last look, right before the promotion: the shorter the time
    // between them, the smaller the chance that a flap heals unseen.
    if !adopting && primary.is_normal() {
        plan.push(Action::ConfirmGone {
            id: primary.id,
            cand: cand.id,
        });
    }
    if !adopting {
        plan.push(Action::Promote { id: cand.id });
    }
    plan.push(Action::AddWriteVip { id: cand.id });
    plan.push(Action::MetaPrimary {
        id: cand.id,
        old: primary.id,
    });
    // The operator's setting, when clup had named fewer standbys.
    let wanted = Some(cluster.sync_wanted.as_str()).filter(|w| !w.is_empty());
    if let Some(names) = sync_names_after(
        cluster,
        primary,
        cand,
        wanted.or(facts.sync_names.as_deref()),
    ) {
        plan.push(Action::SetSyncNames { id: cand.id, names });
    }
    if wanted.is_some() {
        plan.push(Action::MetaSyncWanted {
            names: String::new(),
        });
    }
    plan.push(Action::CstlbDelete {
        backend: cand.addr(),
    });
    plan.push(Action::CstlbDelete {
        backend: primary.addr(),
    });
    plan.extend(read_vip_after_failover(cluster, primary, cand, facts));
    if cluster.state == CLUSTER_FAULT {
        plan.push(Action::MetaClusterState {
            state: crate::model::meta::CLUSTER_NORMAL,
        });
    }
    plan
}

/// The read VIP leaves the new primary's and the old primary's host (the
/// one turns writer, the other failed) for a healthy standby, if there is
/// one elsewhere; `None` when it stays.
fn read_vip_after_failover(
    cluster: &Cluster,
    primary: &Db,
    cand: &Db,
    facts: &Facts,
) -> Option<Action> {
    if cluster.read_vip_host != cand.host && cluster.read_vip_host != primary.host {
        return None;
    }
    let to = read_vip_target(cluster, facts, &[cand.id, primary.id])?;
    (to != cluster.read_vip_host).then(|| Action::MoveReadVip {
        from: cluster.read_vip_host.clone(),
        to,
    })
}

/// The failover's log lines, one per line of the reason: what happened,
/// then the manual's "switch to new host" line (logged when the failover
/// commits, after the old primary's VIP was taken away), and whether it
/// only finishes an earlier, unfinished one.
pub(super) fn failover_reason(why: &str, primary: &Db, cand: &Db, adopting: bool) -> String {
    let pre = words::primary_pre(&primary.addr());
    let mut r = format!("{why}\n{}", words::switch_new_host_begin(&pre, &cand.host));
    if adopting {
        r.push_str(&format!(
            "\n{pre}: database({}) was already promoted by an unfinished failover: finishing it.",
            cand.addr()
        ));
    }
    r
}
