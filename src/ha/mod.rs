//! The HA decisions, as pure functions: cluster meta + what was observed +
//! now -> a plan of actions and a human-readable reason.
//!
//! Nothing here does I/O, reads a clock or starts a thread. When a decision
//! needs a fact it does not have (is that host up? can the standbys still
//! reach the primary?), it returns a plan of *gather* actions; the monitor
//! runs them, adds the answers to [`Facts`] and asks again. The reasons are
//! the manual's log lines where the manual has one.
//!
//! Safety rules encoded here (each has a unit test):
//! - never fail over while any standby can still reach the primary (the
//!   monitor alone being cut off is not a primary failure);
//! - never act when the monitor reaches none of the cluster's hosts;
//! - promote only a Normal standby that is in recovery, has the most WAL, and
//!   is within `failover_max_lag` of the primary's last known LSN;
//! - a Fault node found running as a primary is fenced, never given the VIP.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::meta::{Cluster, Db, DB_FAULT};
use crate::model::words;

mod failover;
mod sync;
#[cfg(test)]
mod tests;

pub use failover::choose_candidate;
use failover::{failover, failover_plan, failover_reason, failover_target, write_vip_taken};
use sync::sync_upkeep;
pub use sync::{acknowledgers, sync_met, sync_names_after};

/// What one probe round saw of one database.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// It answered (the write probe, on the primary).
    pub ok: bool,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    /// Primary: current WAL LSN; standby: last received LSN.
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    /// A standby's WAL receiver: the host it streams from and its status.
    pub upstream_host: Option<String>,
    pub upstream_status: Option<String>,
}

/// Everything known when deciding. Filled by the monitor; plain data.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// This round's probes, by db id. A db missing here was not probed.
    pub seen: BTreeMap<u32, Seen>,
    /// ssh checks made in this round: host -> up.
    pub hosts: BTreeMap<String, bool>,
    /// Asked from a standby's host: can it open the primary's port?
    /// via host -> reachable; a failed check is absent.
    pub peer_sees_primary: BTreeMap<String, bool>,
    /// The peer checks of this round were made (some may have failed).
    pub peers_asked: bool,
    /// Asked this round from a standby's host: who has the write VIP?
    /// None when not asked or the check failed.
    pub write_vip: Option<VipSeen>,
    /// Restarts already tried for a database in its current incident.
    pub restarts: BTreeMap<u32, u32>,
    /// Why the last restart of a database failed, if it did.
    pub restart_why: BTreeMap<u32, String>,
    /// The highest LSN the primary was last seen at.
    pub primary_last_lsn: Option<u64>,
    /// The primary's synchronous_standby_names, as last seen.
    pub sync_names: Option<String>,
    /// Standbys (repl_app_name) last seen with sync_state sync or quorum.
    pub sync_standbys: BTreeSet<String>,
    /// Normal standbys that answer but do not stream from the primary, by
    /// db id: since when (epoch seconds), as the monitor has watched it.
    pub not_streaming_since: BTreeMap<u32, u64>,
    /// Databases whose probes have stalled (a new connection accepted, no
    /// answer: the postmaster lives but does not serve), by db id: since
    /// when (epoch seconds), without a round in between that was not.
    pub stalled_since: BTreeMap<u32, u64>,
    /// Databases whose probes fail, by db id: since when (epoch seconds),
    /// without a round in between that answered.
    pub failing_since: BTreeMap<u32, u64>,
    /// Asked this round over ssh (`pg_ctl status`): does the server run?
    /// A failed check is absent.
    pub running: BTreeMap<u32, bool>,
    /// Standbys (repl_app_name) that acknowledge the primary's WAL now: see
    /// [`acknowledgers`].
    pub acks: BTreeSet<String>,
    /// Since when (epoch seconds) the primary's synchronous_standby_names
    /// cannot be met by [`Facts::acks`]: commits wait. See [`sync_met`].
    pub sync_unmet_since: Option<u64>,
    /// When clup last started a rewind of a Fault standby (`auto_rewind`),
    /// by db id (epoch seconds).
    pub rewound_at: BTreeMap<u32, u64>,
}

/// How long a Normal standby may answer without streaming from the primary
/// before it is marked Fault: longer than a primary restart or a repoint
/// (the WAL receiver retries every 5 s), short enough that the meta does not
/// call a diverged standby Normal for long.
pub const STUCK_STANDBY_SECS: u64 = 30;

/// What a standby's host saw of the write VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VipSeen {
    /// Nobody answers ARP for it.
    Free,
    /// The asking host has it itself.
    HeldBy(String),
    /// Some other machine on the link answers for it.
    Answered,
}

/// Tunables from clup.conf.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// 0 = no limit.
    pub failover_max_lag: u64,
    pub restart_tries: u32,
    /// Seconds a stalled primary whose host answers is waited for before
    /// it is fenced (killed) and failed over.
    pub hung_timeout: u64,
    /// What to do when no synchronous standby acknowledges for
    /// [`SYNC_GRACE_SECS`]: drop to what acknowledges (asynchronous if
    /// none) until they stream again, or keep commits waiting.
    pub sync_fallback: SyncFallback,
    /// Rewind running Fault standbys without an operator.
    pub auto_rewind: bool,
    /// Standbys stream through replication slots: a failover makes their
    /// slots on the new primary before they follow it.
    pub use_slots: bool,
}

/// How often one Fault standby is rewound by `auto_rewind` at most: a rewind
/// that fails (no pg_rewind, no wal_log_hints) is not retried every round.
pub const AUTO_REWIND_EVERY_SECS: u64 = 600;

/// clup.conf's `sync_fallback`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncFallback {
    /// Name only the standbys that acknowledge (none: asynchronous), log it
    /// loudly, and restore the operator's setting once they stream again.
    Async,
    /// Leave synchronous_standby_names alone: commits wait, on purpose.
    Block,
}

/// How long the synchronous standbys may fail to acknowledge before
/// [`SyncFallback`] applies: longer than a standby's restart or a
/// reconnection after a network blip, short enough that a hung standby
/// does not become an outage.
pub const SYNC_GRACE_SECS: u64 = 3;

/// One step of a plan. Gather steps only add facts; the rest act.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Gather: is the host up (ssh answers)?
    CheckHost {
        host: String,
    },
    /// Gather: from `via`, can the primary's postgres port be opened?
    CheckPeer {
        via: String,
        host: String,
        port: u16,
    },
    /// Gather: from `via` (a standby's host), does anybody answer ARP for
    /// the write VIP?
    CheckWriteVip {
        via: String,
    },
    /// Gather: does the database's server run on its host (pg_ctl status
    /// over ssh)?
    CheckRunning {
        id: u32,
    },
    /// Start the database again in place, as its os_user.
    RestartDb {
        id: u32,
    },
    /// Stop a database that must not run as a primary.
    Fence {
        id: u32,
    },
    /// Kill a hung database for certain, over ssh: kill -9 of its
    /// postmaster and the postmaster's children, then check they are gone
    /// and its port is closed. The plan stops if that cannot be confirmed.
    KillDb {
        id: u32,
    },
    /// Right before the old primary `id` loses its place to `cand`, look
    /// again, afresh: `id` must still take no connection (a flap that
    /// healed while the failover was decided ends it), and `cand` must
    /// still be the standby with the most WAL (positions read now, not at
    /// the start of the round). The plan stops if either fails; the next
    /// round decides again with fresh facts.
    ConfirmGone {
        id: u32,
        cand: u32,
    },
    /// Remove a backend from every cstlb of the cluster.
    CstlbDelete {
        backend: String,
    },
    /// Add a backend to every cstlb of the cluster.
    CstlbAdd {
        backend: String,
    },
    /// Best effort: drop the write VIP from a host.
    DeleteWriteVip {
        host: String,
    },
    /// Abort the plan if anybody answers ARP for the write VIP (from `id`'s host).
    EnsureWriteVipFree {
        id: u32,
    },
    Promote {
        id: u32,
    },
    AddWriteVip {
        id: u32,
    },
    /// Best effort, never fails the plan: make on `id` (the new primary,
    /// maybe still in recovery) the replication slots of the standbys
    /// `for_ids`, before they are repointed to it (use_slots).
    CreateSlots {
        id: u32,
        for_ids: Vec<u32>,
    },
    /// Rewrite a standby's recovery settings to stream from `to`.
    Repoint {
        id: u32,
        to: u32,
    },
    SetSyncNames {
        id: u32,
        names: String,
    },
    MoveReadVip {
        from: String,
        to: String,
    },
    /// Meta: `id` becomes the primary, the old one Fault.
    MetaPrimary {
        id: u32,
        old: u32,
    },
    MetaDbState {
        id: u32,
        state: u8,
    },
    MetaClusterState {
        state: u8,
    },
    /// Meta: the synchronous_standby_names the operator set, saved while
    /// clup names fewer standbys (empty: clears it, nothing is degraded).
    MetaSyncWanted {
        names: String,
    },
    /// Start `repair --rewind` of a Fault standby, as its own task.
    RewindDb {
        id: u32,
    },
}

impl Action {
    pub fn is_gather(&self) -> bool {
        matches!(
            self,
            Action::CheckHost { .. }
                | Action::CheckPeer { .. }
                | Action::CheckWriteVip { .. }
                | Action::CheckRunning { .. }
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CheckHost { host } => write!(f, "check host {host}"),
            Action::CheckPeer { via, host, port } => {
                write!(f, "check from {via} whether {host}:{port} answers")
            }
            Action::CheckWriteVip { via } => {
                write!(f, "check from {via} whether the write vip answers")
            }
            Action::CheckRunning { id } => write!(f, "check whether db {id} runs"),
            Action::RestartDb { id } => write!(f, "restart db {id}"),
            Action::Fence { id } => write!(f, "fence (stop) db {id}"),
            Action::KillDb { id } => write!(f, "fence (kill -9) db {id}"),
            Action::ConfirmGone { id, cand } => {
                write!(f, "confirm db {id} is gone and db {cand} has the most WAL")
            }
            Action::CstlbDelete { backend } => write!(f, "remove {backend} from cstlb"),
            Action::CstlbAdd { backend } => write!(f, "add {backend} to cstlb"),
            Action::DeleteWriteVip { host } => write!(f, "delete write vip from {host}"),
            Action::EnsureWriteVipFree { id } => {
                write!(f, "check write vip is free (from db {id})")
            }
            Action::Promote { id } => write!(f, "promote db {id}"),
            Action::AddWriteVip { id } => write!(f, "add write vip on db {id}"),
            Action::CreateSlots { id, for_ids } => {
                let ids: Vec<String> = for_ids.iter().map(u32::to_string).collect();
                write!(f, "create slots on db {id} for db {}", ids.join(", "))
            }
            Action::Repoint { id, to } => write!(f, "repoint db {id} to db {to}"),
            Action::SetSyncNames { id, names } => {
                write!(f, "set synchronous_standby_names on db {id} to '{names}'")
            }
            Action::MoveReadVip { from, to } => write!(f, "move read vip from {from} to {to}"),
            Action::MetaPrimary { id, old } => write!(f, "meta: db {id} primary, db {old} Fault"),
            Action::MetaDbState { id, state } => write!(f, "meta: db {id} state {state}"),
            Action::MetaClusterState { state } => write!(f, "meta: cluster state {state}"),
            Action::RewindDb { id } => write!(f, "repair --rewind db {id}"),
            Action::MetaSyncWanted { names } => {
                write!(f, "meta: synchronous_standby_names wanted '{names}'")
            }
        }
    }
}

/// What a decision is about; the monitor runs acting kinds as tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Nothing to do (healthy, frozen, locked, or refusing to act).
    Nothing,
    /// Only gather actions: run them and decide again.
    Gather,
    Restart,
    StandbyFault,
    Failover,
    Fence,
    /// A standby streams from the wrong upstream.
    Repoint,
    /// The primary is gone and no standby is safe to promote.
    NoCandidate,
    /// synchronous_standby_names changed to what acknowledges, or restored.
    SyncStandbys,
    /// A Fault standby is rewound (`auto_rewind`).
    AutoRewind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub kind: Kind,
    pub plan: Vec<Action>,
    pub reason: String,
    /// The db the incident is about, if any.
    pub subject: Option<u32>,
}

impl Decision {
    fn nothing(reason: impl Into<String>) -> Decision {
        Decision {
            kind: Kind::Nothing,
            plan: vec![],
            reason: reason.into(),
            subject: None,
        }
    }
    fn gather(subject: u32, plan: Vec<Action>, reason: impl Into<String>) -> Decision {
        Decision {
            kind: Kind::Gather,
            plan,
            reason: reason.into(),
            subject: Some(subject),
        }
    }
}

/// Decide what to do for one cluster.
pub fn decide(cluster: &Cluster, facts: &Facts, p: &Params, now: u64) -> Decision {
    if let Some(d) = hold_off(cluster, now) {
        return d;
    }
    let Some(primary) = cluster.primary() else {
        return Decision::nothing("no action: the meta names no primary");
    };
    // A returning old primary is fenced before anything else.
    if let Some(d) = fence_returning_primary(cluster, primary, facts) {
        return d;
    }

    let failed = |d: &Db| facts.seen.get(&d.id).is_some_and(|s| !s.ok);

    if primary.is_normal() && failed(primary) {
        return primary_failed(cluster, primary, facts, p, now);
    }
    if !primary.is_normal() {
        // A previous failover found no candidate; look again each round.
        return failover(cluster, primary, facts, p, "primary is Fault".to_string());
    }

    // Commits waiting on synchronous standbys that do not acknowledge are
    // an outage of the primary: seen to before a failed standby's repair.
    if let Some(d) = sync_upkeep(cluster, primary, facts, p, now) {
        return d;
    }
    for d in cluster.normal_standbys() {
        if failed(d) {
            return standby_failed(cluster, d, facts, p);
        }
    }
    if let Some(d) = repoint_misrouted(cluster, primary, facts) {
        return d;
    }
    if let Some(d) = fault_stuck_standby(cluster, primary, facts, now) {
        return d;
    }
    if let Some(d) = auto_rewind(cluster, primary, facts, p, now) {
        return d;
    }

    let ok = cluster.normal_standbys().filter(|d| !failed(d)).count();
    Decision::nothing(format!(
        "no action: primary database({}) ok, {ok} standby(s) ok",
        primary.addr()
    ))
}

/// Nothing may be done while the cluster is frozen or locked by an
/// operation: the operator or that operation owns it. `None` when free.
fn hold_off(cluster: &Cluster, now: u64) -> Option<Decision> {
    if cluster.is_frozen() {
        return Some(Decision::nothing("no action: cluster is frozen"));
    }
    if cluster.lock_time > now {
        let who = if cluster.lock_holder.is_empty() {
            "an operation"
        } else {
            &cluster.lock_holder
        };
        // The expiry as a time, not a countdown: the reason stays the same
        // from round to round and is logged once.
        return Some(Decision::nothing(format!(
            "no action: cluster is locked by {who} until {}",
            crate::util::logging::format_epoch(cluster.lock_time)
        )));
    }
    None
}

/// A Fault node that runs as a primary while another node is the primary
/// is the returning old primary: two writable nodes would split the data,
/// so it is stopped and gets nothing. The first such node, if any.
fn fence_returning_primary(cluster: &Cluster, primary: &Db, facts: &Facts) -> Option<Decision> {
    for d in cluster
        .db_list
        .iter()
        .filter(|d| !d.is_normal() && !d.is_primary())
    {
        if let Some(s) = facts.seen.get(&d.id) {
            if s.ok && s.in_recovery == Some(false) {
                return Some(Decision {
                    kind: Kind::Fence,
                    plan: vec![Action::Fence { id: d.id }],
                    reason: format!(
                        "database({}) is Fault but runs as a primary while database({}) is the primary: fencing it (stop), it keeps no VIP and stays Fault until repaired",
                        d.addr(),
                        primary.addr()
                    ),
                    subject: Some(d.id),
                });
            }
        }
    }
    None
}

/// The first answering standby that streams from somebody other than the
/// primary: every standby of a cluster streams from the primary, so it is
/// repointed there.
fn repoint_misrouted(cluster: &Cluster, primary: &Db, facts: &Facts) -> Option<Decision> {
    for d in cluster.normal_standbys() {
        if let Some(s) = facts.seen.get(&d.id) {
            if let Some(up) = &s.upstream_host {
                if s.ok && up != &primary.host {
                    return Some(Decision {
                        kind: Kind::Repoint,
                        plan: vec![Action::Repoint { id: d.id, to: primary.id }],
                        reason: format!(
                            "standby database({}) streams from {up}, not from the primary {}: repointing it",
                            d.addr(),
                            primary.host
                        ),
                        subject: Some(d.id),
                    });
                }
            }
        }
    }
    None
}

/// The first standby that answers but has not streamed from the primary
/// for [`STUCK_STANDBY_SECS`]: after a failover one whose WAL went past the
/// new timeline's fork cannot follow it, and the meta must not call it
/// Normal. It is taken out of service.
fn fault_stuck_standby(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    now: u64,
) -> Option<Decision> {
    for d in cluster.normal_standbys() {
        if let Some(&since) = facts.not_streaming_since.get(&d.id) {
            if now.saturating_sub(since) >= STUCK_STANDBY_SECS {
                return Some(Decision {
                    kind: Kind::StandbyFault,
                    plan: fault_plan(cluster, d, facts),
                    reason: format!(
                        "standby database({}) answers but has not streamed from the primary {} for {} s (its WAL may have gone past the new timeline): switch database({})... repair it",
                        d.addr(),
                        primary.host,
                        now - since,
                        d.addr()
                    ),
                    subject: Some(d.id),
                });
            }
        }
    }
    None
}

/// With `auto_rewind`, the first Fault standby that runs as a standby
/// (left behind by a failover, or back after an outage) is repaired with
/// pg_rewind from the healthy primary, at most every
/// [`AUTO_REWIND_EVERY_SECS`]. A Fault node running as a primary is fenced
/// first ([`fence_returning_primary`]), then looked at here once stopped and
/// started as a standby by an operator; a stopped one is left alone.
fn auto_rewind(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    now: u64,
) -> Option<Decision> {
    if !p.auto_rewind {
        return None;
    }
    let d = cluster.db_list.iter().find(|d| {
        !d.is_normal()
            && !d.is_primary()
            && facts
                .seen
                .get(&d.id)
                .is_some_and(|s| s.ok && s.in_recovery == Some(true))
            && facts
                .rewound_at
                .get(&d.id)
                .is_none_or(|t| now.saturating_sub(*t) >= AUTO_REWIND_EVERY_SECS)
    })?;
    Some(Decision {
        kind: Kind::AutoRewind,
        plan: vec![Action::RewindDb { id: d.id }],
        reason: format!(
            "database({}) is Fault but runs as a standby: rewinding it from the primary database({}) (auto_rewind = on)",
            d.addr(),
            primary.addr()
        ),
        subject: Some(d.id),
    })
}

fn find_msg(d: &Db) -> String {
    words::find_failed(&d.addr())
}

/// What a failed primary's failover would need to know: whether its host
/// is up and, asked at the same time so that no time is lost if it is not,
/// whether the standbys that answer (in `facts.seen`) still reach it and who
/// answers for the write VIP. The monitor also asks this ahead, while a
/// probe of the primary is late.
pub fn primary_checks(cluster: &Cluster, primary: &Db, facts: &Facts) -> Vec<Action> {
    let mut plan = vec![Action::CheckHost {
        host: primary.host.clone(),
    }];
    if !facts.peers_asked {
        let reachable: Vec<&Db> = cluster
            .normal_standbys()
            .filter(|d| facts.seen.get(&d.id).is_some_and(|s| s.ok))
            .collect();
        plan.extend(reachable.iter().map(|d| Action::CheckPeer {
            via: d.host.clone(),
            host: primary.host.clone(),
            port: primary.port,
        }));
        // And whether the write VIP still answers on the link: a failover
        // needs that answer before it promotes.
        if let Some(d) = reachable.first() {
            plan.push(Action::CheckWriteVip {
                via: d.host.clone(),
            });
        }
    }
    plan
}

fn primary_failed(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    now: u64,
) -> Decision {
    // A stalled server's host took the connection (its kernel runs and the
    // network reaches it): no host check is needed to wait for it, and the
    // kill over ssh fails, stopping the plan, if ssh does not answer.
    if let Some(&since) = facts.stalled_since.get(&primary.id) {
        return primary_stalled(cluster, primary, facts, p, now.saturating_sub(since));
    }
    match facts.hosts.get(&primary.host) {
        None => Decision::gather(
            primary.id,
            primary_checks(cluster, primary, facts),
            find_msg(primary),
        ),
        Some(true) => {
            // A switch or failover cut short after its promotion (the
            // monitor restarted): a standby already runs as the primary.
            // Starting the old one again would make two: adopt that one.
            let promoted = cluster.normal_standbys().find(|d| {
                facts
                    .seen
                    .get(&d.id)
                    .is_some_and(|s| s.ok && s.in_recovery == Some(false))
            });
            if let Some(d) = promoted {
                return failover(
                    cluster,
                    primary,
                    facts,
                    p,
                    format!(
                        "database({}) failed and standby database({}) already runs as a primary (a switch or failover was cut short):",
                        primary.addr(),
                        d.addr()
                    ),
                );
            }
            match facts.running.get(&primary.id) {
                None => {
                    return Decision::gather(
                        primary.id,
                        vec![Action::CheckRunning { id: primary.id }],
                        find_msg(primary),
                    )
                }
                Some(true) => return primary_runs_unanswered(cluster, primary, facts, p, now),
                Some(false) => {}
            }
            let tried = facts.restarts.get(&primary.id).copied().unwrap_or(0);
            if tried < p.restart_tries {
                Decision {
                    kind: Kind::Restart,
                    plan: vec![Action::RestartDb { id: primary.id }],
                    reason: words::host_ok_restart(&primary.host, &primary.addr()),
                    subject: Some(primary.id),
                }
            } else {
                failover(
                    cluster,
                    primary,
                    facts,
                    p,
                    format!(
                        "database({}) did not come back after {tried} restart(s){}",
                        primary.addr(),
                        last_start(facts, primary.id)
                    ),
                )
            }
        }
        Some(false) => failover(
            cluster,
            primary,
            facts,
            p,
            words::host_not_ok(&primary.host, &primary.addr()),
        ),
    }
}

/// The primary's host answers and its server runs, but the monitor gets
/// no answer from it (a lossy or cut link between them, or a server that
/// takes no connection): a restart would do nothing. If a standby still
/// reaches it, only the monitor is cut off: nothing to do. If none does,
/// it is treated as hung: waited for `hung_timeout`, then killed and
/// failed over ([`primary_stalled`]).
fn primary_runs_unanswered(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    now: u64,
) -> Decision {
    if !facts.peers_asked {
        return Decision::gather(
            primary.id,
            primary_checks(cluster, primary, facts),
            find_msg(primary),
        );
    }
    if let Some((via, _)) = facts.peer_sees_primary.iter().find(|(_, seen)| **seen) {
        return Decision::nothing(format!(
            "no restart: database({}) runs and standby host {via} reaches it; only the monitor gets no answer from it (a lossy or cut link?)",
            primary.addr()
        ));
    }
    let since = facts.failing_since.get(&primary.id).copied().unwrap_or(now);
    primary_stalled(cluster, primary, facts, p, now.saturating_sub(since))
}

/// The primary's host answers and its server accepts connections but
/// serves none (stopped, stuck on a dying disk): restarting a running
/// server does nothing, and the standbys' "can I reach it" check is
/// fooled by the accepting socket. So it is waited for `hung_timeout`
/// (a long checkpoint or a busy server answers a login well within it),
/// then killed for certain over ssh before a standby is promoted: once it
/// is dead it cannot take a write, so the split-brain guards that ask
/// whether it is gone have nothing to add.
fn primary_stalled(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    stalled_for: u64,
) -> Decision {
    if stalled_for < p.hung_timeout {
        return Decision::nothing(format!(
            "no action yet: database({}) runs but has served no connection for {stalled_for} s while its host is ok; it is running, so it is not restarted; fenced and failed over after hung_timeout ({} s)",
            primary.addr(),
            p.hung_timeout
        ));
    }
    let why = format!(
        "database({}) is hung: it runs but has served no connection for {stalled_for} s while its host is ok; fencing it (kill -9)",
        primary.addr()
    );
    let (cand, adopting) = match failover_target(cluster, primary, facts, p, &why) {
        Ok(target) => target,
        Err(d) => return d,
    };
    if let Some(d) = write_vip_taken(primary, cand, facts, true, &why) {
        return d;
    }
    let mut plan = vec![Action::KillDb { id: primary.id }];
    plan.extend(failover_plan(
        cluster,
        primary,
        cand,
        facts,
        (adopting, true),
        p.use_slots,
    ));
    Decision {
        kind: Kind::Failover,
        plan,
        reason: failover_reason(&why, primary, cand, adopting),
        subject: Some(primary.id),
    }
}

fn standby_failed(cluster: &Cluster, d: &Db, facts: &Facts, p: &Params) -> Decision {
    match facts.hosts.get(&d.host) {
        None => Decision::gather(
            d.id,
            vec![Action::CheckHost {
                host: d.host.clone(),
            }],
            find_msg(d),
        ),
        Some(true) if facts.restarts.get(&d.id).copied().unwrap_or(0) < p.restart_tries => {
            Decision {
                kind: Kind::Restart,
                plan: vec![Action::RestartDb { id: d.id }],
                reason: words::host_ok_restart(&d.host, &d.addr()),
                subject: Some(d.id),
            }
        }
        Some(up) => {
            let plan = fault_plan(cluster, d, facts);
            let reason = if *up {
                format!(
                    "database({}) did not come back after restarts, switch database({})...{}",
                    d.addr(),
                    d.addr(),
                    last_start(facts, d.id)
                )
            } else {
                words::host_not_ok(&d.host, &d.addr())
            };
            Decision {
                kind: Kind::StandbyFault,
                plan,
                reason,
                subject: Some(d.id),
            }
        }
    }
}

/// Why the last restart of a database failed, for a reason string: a
/// full disk, a broken config, said where the decision is logged.
fn last_start(facts: &Facts, id: u32) -> String {
    facts
        .restart_why
        .get(&id)
        .map(|w| format!(" (the last start said: {w})"))
        .unwrap_or_default()
}

/// Take a standby out of service: out of the cstlbs, the read VIP off its
/// host, Fault in the meta.
fn fault_plan(cluster: &Cluster, d: &Db, facts: &Facts) -> Vec<Action> {
    let mut plan = vec![Action::CstlbDelete { backend: d.addr() }];
    if cluster.read_vip_host == d.host {
        if let Some(to) = read_vip_target(cluster, facts, &[d.id]) {
            plan.push(Action::MoveReadVip {
                from: d.host.clone(),
                to,
            });
        }
    }
    plan.push(Action::MetaDbState {
        id: d.id,
        state: DB_FAULT,
    });
    plan
}

/// Where the read VIP should go: the first healthy Normal standby (by id)
/// not in `exclude`, else the primary's host if it is healthy.
pub fn read_vip_target(cluster: &Cluster, facts: &Facts, exclude: &[u32]) -> Option<String> {
    let healthy = |d: &&Db| facts.seen.get(&d.id).is_some_and(|s| s.ok);
    cluster
        .normal_standbys()
        .filter(|d| !exclude.contains(&d.id))
        .find(healthy)
        .or_else(|| {
            cluster
                .primary()
                .filter(|d| d.is_normal() && !exclude.contains(&d.id))
                .filter(healthy)
        })
        .map(|d| d.host.clone())
}
