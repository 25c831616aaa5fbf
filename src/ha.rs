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

use crate::model::meta::{Cluster, Db, CLUSTER_FAULT, DB_FAULT};

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
    /// Standbys (repl_app_name) that acknowledge the primary's WAL now: see
    /// [`acknowledgers`].
    pub acks: BTreeSet<String>,
    /// Since when (epoch seconds) the primary's synchronous_standby_names
    /// cannot be met by [`Facts::acks`]: commits wait. See [`sync_met`].
    pub sync_unmet_since: Option<u64>,
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
}

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
pub const SYNC_GRACE_SECS: u64 = 5;

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
}

impl Action {
    pub fn is_gather(&self) -> bool {
        matches!(
            self,
            Action::CheckHost { .. } | Action::CheckPeer { .. } | Action::CheckWriteVip { .. }
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
            Action::Repoint { id, to } => write!(f, "repoint db {id} to db {to}"),
            Action::SetSyncNames { id, names } => {
                write!(f, "set synchronous_standby_names on db {id} to '{names}'")
            }
            Action::MoveReadVip { from, to } => write!(f, "move read vip from {from} to {to}"),
            Action::MetaPrimary { id, old } => write!(f, "meta: db {id} primary, db {old} Fault"),
            Action::MetaDbState { id, state } => write!(f, "meta: db {id} state {state}"),
            Action::MetaClusterState { state } => write!(f, "meta: cluster state {state}"),
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
    if let Some(d) = sync_upkeep(cluster, primary, facts, p, now) {
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

fn find_msg(d: &Db) -> String {
    format!("Find database({}) failed, repair it ....", d.addr())
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
    match facts.hosts.get(&primary.host) {
        None => Decision::gather(
            primary.id,
            primary_checks(cluster, primary, facts),
            find_msg(primary),
        ),
        Some(true) => {
            if let Some(&since) = facts.stalled_since.get(&primary.id) {
                return primary_stalled(cluster, primary, facts, p, now.saturating_sub(since));
            }
            let tried = facts.restarts.get(&primary.id).copied().unwrap_or(0);
            if tried < p.restart_tries {
                Decision {
                    kind: Kind::Restart,
                    plan: vec![Action::RestartDb { id: primary.id }],
                    reason: format!(
                        "Host({}) is ok, only database({}) failed, restart database ....",
                        primary.host,
                        primary.addr()
                    ),
                    subject: Some(primary.id),
                }
            } else {
                failover(
                    cluster,
                    primary,
                    facts,
                    p,
                    format!(
                        "database({}) did not come back after {tried} restart(s)",
                        primary.addr()
                    ),
                )
            }
        }
        Some(false) => failover(
            cluster,
            primary,
            facts,
            p,
            format!(
                "Host({}) is not ok, switch database({})...",
                primary.host,
                primary.addr()
            ),
        ),
    }
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
            "no action yet: database({}) accepts connections but serves none for {stalled_for} s while its host is ok; it is running, so it is not restarted; fenced and failed over after hung_timeout ({} s)",
            primary.addr(),
            p.hung_timeout
        ));
    }
    let why = format!(
        "database({}) is hung: it accepts connections but has served none for {stalled_for} s while its host is ok; fencing it (kill -9)",
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
    plan.extend(failover_plan(cluster, primary, cand, facts, adopting, true));
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
                reason: format!(
                    "Host({}) is ok, only database({}) failed, restart database ....",
                    d.host,
                    d.addr()
                ),
                subject: Some(d.id),
            }
        }
        Some(up) => {
            let plan = fault_plan(cluster, d, facts);
            let why = if *up {
                format!("database({}) did not come back after restarts", d.addr())
            } else {
                format!("Host({}) is not ok", d.host)
            };
            Decision {
                kind: Kind::StandbyFault,
                plan,
                reason: format!("{why}, switch database({})...", d.addr()),
                subject: Some(d.id),
            }
        }
    }
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

/// The standbys that acknowledge the primary's WAL now, of its
/// pg_stat_replication rows `(application_name, state, flush LSN)`: those
/// streaming whose flush position moved since the last round
/// (`last_flush`), or that have flushed all the primary had then
/// (`last_primary_lsn`). A hung standby keeps its walsender "streaming"
/// for wal_sender_timeout but flushes nothing; a busy one still moves.
pub fn acknowledgers(
    replicas: &[(String, String, Option<u64>)],
    last_flush: &BTreeMap<String, u64>,
    last_primary_lsn: Option<u64>,
) -> BTreeSet<String> {
    replicas
        .iter()
        .filter(|(_, state, _)| state == "streaming")
        .filter(|(name, _, flush)| {
            let Some(flush) = *flush else { return false };
            let moved = last_flush.get(name).is_none_or(|f| flush > *f);
            let caught_up = last_primary_lsn.is_some_and(|l| flush >= l);
            moved || caught_up
        })
        .map(|(name, _, _)| name.clone())
        .collect()
}

/// Can the primary's synchronous_standby_names `names` be met: do enough
/// of the standbys it names acknowledge? `ANY n`: n of them. `FIRST n`
/// (and the plain `n (list)` and `list` forms): the standbys the server
/// chose as synchronous (`chosen`) are n, and all acknowledge; with
/// `chosen` None (not chosen yet, as when restoring), n of the named
/// standbys acknowledge. An empty setting (asynchronous) is always met.
pub fn sync_met(names: &str, acks: &BTreeSet<String>, chosen: Option<&BTreeSet<String>>) -> bool {
    let names = names.trim();
    if names.is_empty() {
        return true;
    }
    let (method, num) = parse_sync_method(names);
    let listed = sync_list(names);
    let named_acks = acks
        .iter()
        .filter(|a| listed.iter().any(|l| l == "*" || l.eq_ignore_ascii_case(a)))
        .count();
    match (method, chosen) {
        ("FIRST", Some(chosen)) => chosen.len() >= num && chosen.iter().all(|c| acks.contains(c)),
        _ => named_acks >= num,
    }
}

/// The standby names of a synchronous_standby_names value.
fn sync_list(names: &str) -> Vec<String> {
    let inner = match (names.find('('), names.rfind(')')) {
        (Some(a), Some(b)) if a < b => &names[a + 1..b],
        _ => names,
    };
    inner
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The setting that names only the standbys in `acks` (in the order the
/// operator listed them), in the operator's own syntax, asking for no more
/// of them than acknowledge; empty (asynchronous) when none does.
fn sync_degraded(wanted: &str, acks: &BTreeSet<String>) -> String {
    let (method, num) = parse_sync_method(wanted);
    let listed = sync_list(wanted);
    let mut keep: Vec<&String> = Vec::new();
    for l in &listed {
        for a in acks
            .iter()
            .filter(|a| l == "*" || l.eq_ignore_ascii_case(a))
        {
            if !keep.contains(&a) {
                keep.push(a);
            }
        }
    }
    if keep.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = keep.iter().map(|s| s.as_str()).collect();
    sync_setting(wanted, method, num.min(names.len()), &names)
}

/// A synchronous_standby_names value in the style of `like`: with the
/// method keyword only when `like` has one (9.6 knows only `n (list)`).
fn sync_setting(like: &str, method: &str, n: usize, names: &[&str]) -> String {
    let upper = like.trim().to_ascii_uppercase();
    if upper.starts_with("ANY ") || upper.starts_with("FIRST ") {
        format!("{method} {n} ({})", names.join(","))
    } else {
        format!("{n} ({})", names.join(","))
    }
}

/// Synchronous replication that nobody acknowledges is an outage nobody
/// chose: every commit waits. After [`SYNC_GRACE_SECS`] of that, with
/// `sync_fallback = async`, the primary names only the standbys that
/// acknowledge (none: asynchronous) and the operator's setting is kept in
/// the meta; it is put back once enough standbys acknowledge again. With
/// `block`, commits keep waiting, and the reason says so every time it
/// changes. `None`: nothing to do.
fn sync_upkeep(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    now: u64,
) -> Option<Decision> {
    let current = facts.sync_names.as_deref()?.trim().to_string();
    let wanted = if cluster.sync_wanted.is_empty() {
        current.clone()
    } else {
        cluster.sync_wanted.clone()
    };
    if wanted.is_empty() {
        return None;
    }
    let decision = |plan: Vec<Action>, reason: String| Decision {
        kind: Kind::SyncStandbys,
        plan,
        reason,
        subject: Some(primary.id),
    };
    if current != wanted && sync_met(&wanted, &facts.acks, None) {
        return Some(decision(
            vec![
                Action::SetSyncNames {
                    id: primary.id,
                    names: wanted.clone(),
                },
                Action::MetaSyncWanted {
                    names: String::new(),
                },
            ],
            format!(
                "synchronous standbys acknowledge again: synchronous_standby_names of database({}) restored to '{wanted}'",
                primary.addr()
            ),
        ));
    }
    let since = facts.sync_unmet_since?;
    let waited = now.saturating_sub(since);
    if current.is_empty() || waited < SYNC_GRACE_SECS {
        return None;
    }
    let acks: Vec<&str> = facts.acks.iter().map(String::as_str).collect();
    let head = format!(
        "SYNCHRONOUS STANDBYS DO NOT ACKNOWLEDGE: database({}) has synchronous_standby_names '{current}' but for {waited} s only [{}] acknowledged, so commits wait",
        primary.addr(),
        acks.join(",")
    );
    if p.sync_fallback == SyncFallback::Block {
        return Some(Decision::nothing(format!(
            "{head}; left so on purpose (sync_fallback = block)"
        )));
    }
    let names = sync_degraded(&wanted, &facts.acks);
    if names == current {
        return None;
    }
    let mut plan = Vec::new();
    if cluster.sync_wanted.is_empty() {
        plan.push(Action::MetaSyncWanted {
            names: wanted.clone(),
        });
    }
    plan.push(Action::SetSyncNames {
        id: primary.id,
        names: names.clone(),
    });
    let now_what = if names.is_empty() {
        "ASYNCHRONOUS until a standby acknowledges again".to_string()
    } else {
        format!("'{names}'")
    };
    Some(decision(
        plan,
        format!("{head}; synchronous_standby_names set to {now_what} (sync_fallback = async; '{wanted}' is restored then)"),
    ))
}

/// synchronous_standby_names after `new` becomes the primary: the same
/// method and count, naming the surviving standbys and then the old primary
/// (which may come back as a standby), so commits neither block forever
/// while a standby can acknowledge them nor get acknowledged by nobody.
/// `None` when the cluster does not use synchronous replication.
pub fn sync_names_after(
    cluster: &Cluster,
    old: &Db,
    new: &Db,
    current: Option<&str>,
) -> Option<String> {
    let current = current?.trim();
    if current.is_empty() {
        return None;
    }
    let (method, num) = parse_sync_method(current);
    let mut names: Vec<&str> = cluster
        .normal_standbys()
        .filter(|d| d.id != new.id)
        .map(|d| d.repl_app_name.as_str())
        .collect();
    names.push(old.repl_app_name.as_str());
    let n = num.clamp(1, names.len().max(1));
    Some(format!("{method} {n} ({})", names.join(",")))
}

/// `ANY 2 (a,b)` -> ("ANY", 2); `FIRST 1 (a)`, `2 (a,b)` and `a,b` -> ("FIRST", n).
fn parse_sync_method(s: &str) -> (&'static str, usize) {
    let upper = s.to_ascii_uppercase();
    let (method, rest) = if let Some(r) = upper.strip_prefix("ANY ") {
        ("ANY", r)
    } else if let Some(r) = upper.strip_prefix("FIRST ") {
        ("FIRST", r)
    } else {
        ("FIRST", upper.as_str())
    };
    let num = rest
        .split_whitespace()
        .next()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1);
    (method, num)
}

/// Fail over from `primary` (failed, or already Fault), `why` saying what
/// happened to it: only once it is known to be gone for the standbys too,
/// and only to a candidate the write VIP can safely move to.
fn failover(cluster: &Cluster, primary: &Db, facts: &Facts, p: &Params, why: String) -> Decision {
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
        plan: failover_plan(cluster, primary, cand, facts, adopting, old_host_up),
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
fn failover_target<'a>(
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
fn write_vip_taken(
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

/// The failover's steps, in order: free the write VIP, promote the
/// candidate (unless adopting one already promoted), give it the write VIP
/// and the meta's primary, then bring the rest along: synchronous names,
/// the other standbys, the cstlbs, the read VIP and the cluster state.
fn failover_plan(
    cluster: &Cluster,
    primary: &Db,
    cand: &Db,
    facts: &Facts,
    adopting: bool,
    old_host_up: bool,
) -> Vec<Action> {
    let mut plan = Vec::new();
    if !adopting && primary.is_normal() {
        plan.push(Action::ConfirmGone {
            id: primary.id,
            cand: cand.id,
        });
    }
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
    for d in cluster.normal_standbys().filter(|d| d.id != cand.id) {
        plan.push(Action::Repoint {
            id: d.id,
            to: cand.id,
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

/// The failover's log line: what happened, from where to where, and
/// whether it only finishes an earlier, unfinished one.
fn failover_reason(why: &str, primary: &Db, cand: &Db, adopting: bool) -> String {
    format!(
        "{why} Failover primary database({}): switch to new host({}){}...",
        primary.addr(),
        cand.host,
        if adopting {
            " (already promoted by an unfinished failover: finishing it)"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{parse_clusters, CLUSTER_FROZEN, SAMPLE_INIT};

    const P: Params = Params {
        failover_max_lag: 16 << 20,
        restart_tries: 2,
        hung_timeout: 20,
        sync_fallback: SyncFallback::Async,
    };

    fn cluster() -> Cluster {
        parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap()
    }

    fn ok_primary(lsn: u64) -> Seen {
        Seen {
            ok: true,
            in_recovery: Some(false),
            receive_lsn: Some(lsn),
            ..Default::default()
        }
    }

    fn ok_standby(recv: u64, replay: u64) -> Seen {
        Seen {
            ok: true,
            in_recovery: Some(true),
            receive_lsn: Some(recv),
            replay_lsn: Some(replay),
            upstream_host: Some("192.168.56.41".into()),
            upstream_status: Some("streaming".into()),
            ..Default::default()
        }
    }

    fn down() -> Seen {
        Seen::default()
    }

    /// All healthy, then `edit` applied.
    fn facts(edit: impl FnOnce(&mut Facts)) -> Facts {
        let mut f = Facts::default();
        f.seen.insert(1, ok_primary(1000));
        for id in 2..=4 {
            f.seen.insert(id, ok_standby(1000, 1000));
        }
        f.primary_last_lsn = Some(1000);
        edit(&mut f);
        f
    }

    #[test]
    fn healthy_cluster_does_nothing() {
        let d = decide(&cluster(), &facts(|_| {}), &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(d.plan.is_empty());
        assert_eq!(
            d.reason,
            "no action: primary database(192.168.56.41:5432) ok, 3 standby(s) ok"
        );
    }

    #[test]
    fn frozen_cluster_is_not_acted_on() {
        let mut c = cluster();
        c.state = CLUSTER_FROZEN;
        let d = decide(
            &c,
            &facts(|f| {
                f.seen.insert(1, down());
            }),
            &P,
            0,
        );
        assert_eq!(d.kind, Kind::Nothing);
        assert_eq!(d.reason, "no action: cluster is frozen");
    }

    #[test]
    fn lock_held_means_no_action_until_it_expires() {
        let mut c = cluster();
        c.lock_time = 130;
        c.lock_holder = "switch task 7".into();
        let f = facts(|f| {
            f.seen.insert(1, down());
        });
        let d = decide(&c, &f, &P, 100);
        assert_eq!(d.kind, Kind::Nothing);
        assert_eq!(
            d.reason,
            format!(
                "no action: cluster is locked by switch task 7 until {}",
                crate::util::logging::format_epoch(130)
            )
        );
        // Expired lock: acting again.
        assert_eq!(decide(&c, &f, &P, 131).kind, Kind::Gather);
    }

    #[test]
    fn failed_db_first_checks_its_host() {
        let d = decide(
            &cluster(),
            &facts(|f| {
                f.seen.insert(4, down());
            }),
            &P,
            0,
        );
        assert_eq!(d.kind, Kind::Gather);
        assert_eq!(
            d.plan,
            [Action::CheckHost {
                host: "192.168.56.44".into()
            }]
        );
        assert_eq!(
            d.reason,
            "Find database(192.168.56.44:5432) failed, repair it ...."
        );
    }

    #[test]
    fn db_down_host_up_is_restarted_in_place() {
        for id in [1, 4] {
            let f = facts(|f| {
                f.seen.insert(id, down());
                f.hosts.insert(format!("192.168.56.4{id}"), true);
            });
            let d = decide(&cluster(), &f, &P, 0);
            assert_eq!(d.kind, Kind::Restart, "db {id}");
            assert_eq!(d.plan, [Action::RestartDb { id }]);
            assert_eq!(
                d.reason,
                format!("Host(192.168.56.4{id}) is ok, only database(192.168.56.4{id}:5432) failed, restart database ....")
            );
        }
    }

    #[test]
    fn standby_host_down_is_marked_fault_and_leaves_cstlb() {
        let f = facts(|f| {
            f.seen.insert(4, down());
            f.hosts.insert("192.168.56.44".into(), false);
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::StandbyFault);
        assert_eq!(
            d.plan,
            [
                Action::CstlbDelete {
                    backend: "192.168.56.44:5432".into()
                },
                Action::MetaDbState {
                    id: 4,
                    state: DB_FAULT
                },
            ]
        );
        assert_eq!(
            d.reason,
            "Host(192.168.56.44) is not ok, switch database(192.168.56.44:5432)..."
        );
    }

    #[test]
    fn standby_not_streaming_for_long_is_marked_fault() {
        let f = facts(|f| {
            f.seen.insert(
                3,
                Seen {
                    upstream_host: None,
                    upstream_status: None,
                    ..ok_standby(900, 900)
                },
            );
            f.not_streaming_since.insert(3, 100);
        });
        // Not yet: a repoint or a primary restart takes a few seconds.
        let d = decide(&cluster(), &f, &P, 100 + STUCK_STANDBY_SECS - 1);
        assert_eq!(d.kind, Kind::Nothing, "{}", d.reason);
        let d = decide(&cluster(), &f, &P, 100 + STUCK_STANDBY_SECS);
        assert_eq!(d.kind, Kind::StandbyFault, "{}", d.reason);
        assert_eq!(
            d.plan,
            [
                Action::CstlbDelete {
                    backend: "192.168.56.43:5432".into()
                },
                Action::MetaDbState {
                    id: 3,
                    state: DB_FAULT
                },
            ]
        );
        assert!(
            d.reason.contains("has not streamed from the primary"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn standby_fault_moves_read_vip_off_its_host() {
        let mut c = cluster();
        c.read_vip_host = "192.168.56.42".into();
        let f = facts(|f| {
            f.seen.insert(2, down());
            f.hosts.insert("192.168.56.42".into(), false);
        });
        let d = decide(&c, &f, &P, 0);
        assert!(
            d.plan.contains(&Action::MoveReadVip {
                from: "192.168.56.42".into(),
                to: "192.168.56.43".into()
            }),
            "{:?}",
            d.plan
        );
    }

    #[test]
    fn standby_that_will_not_restart_becomes_fault() {
        let f = facts(|f| {
            f.seen.insert(3, down());
            f.hosts.insert("192.168.56.43".into(), true);
            f.restarts.insert(3, 2);
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::StandbyFault);
        assert!(
            d.reason
                .starts_with("database(192.168.56.43:5432) did not come back"),
            "{}",
            d.reason
        );
    }

    fn primary_down(edit: impl FnOnce(&mut Facts)) -> Facts {
        facts(|f| {
            f.seen.insert(1, down());
            f.hosts.insert("192.168.56.41".into(), false);
            edit(f);
        })
    }

    #[test]
    fn failed_primary_checks_its_host_and_asks_the_standbys_at_once() {
        let d = decide(
            &cluster(),
            &facts(|f| {
                f.seen.insert(1, down());
            }),
            &P,
            0,
        );
        assert_eq!(d.kind, Kind::Gather);
        assert_eq!(
            d.plan[0],
            Action::CheckHost {
                host: "192.168.56.41".into()
            }
        );
        assert_eq!(d.plan.len(), 5, "{:?}", d.plan);
        assert_eq!(
            d.plan[4],
            Action::CheckWriteVip {
                via: "192.168.56.42".into()
            }
        );
        assert!(d.plan[1..4]
            .iter()
            .all(|a| matches!(a, Action::CheckPeer { host, .. } if host == "192.168.56.41")));
        assert_eq!(
            d.reason,
            "Find database(192.168.56.41:5432) failed, repair it ...."
        );
    }

    #[test]
    fn write_vip_answer_gathered_with_the_peers_decides_the_dad_step() {
        // Free this round: no second check before promoting.
        let free = primary_down(|f| {
            peers(f, false);
            f.write_vip = Some(VipSeen::Free);
        });
        let d = decide(&cluster(), &free, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert!(
            !d.plan
                .iter()
                .any(|a| matches!(a, Action::EnsureWriteVipFree { .. })),
            "{:?}",
            d.plan
        );
        // The last look at the old primary, then the promotion.
        assert_eq!(d.plan[0], Action::ConfirmGone { id: 1, cand: 2 });
        assert_eq!(d.plan[1], Action::Promote { id: 2 });
        // Somebody answers while the old host is down: no failover.
        let taken = primary_down(|f| {
            peers(f, false);
            f.write_vip = Some(VipSeen::Answered);
        });
        let d = decide(&cluster(), &taken, &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(
            d.reason
                .contains("somebody still answers ARP for the write VIP"),
            "{}",
            d.reason
        );
        // On the candidate itself (an unfinished failover had moved it): fine.
        let on_cand = primary_down(|f| {
            peers(f, false);
            f.write_vip = Some(VipSeen::HeldBy("192.168.56.42".into()));
        });
        let d = decide(&cluster(), &on_cand, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert!(
            !d.plan
                .iter()
                .any(|a| matches!(a, Action::EnsureWriteVipFree { .. })),
            "{:?}",
            d.plan
        );
        // On another standby's host: hands off.
        let elsewhere = primary_down(|f| {
            peers(f, false);
            f.write_vip = Some(VipSeen::HeldBy("192.168.56.44".into()));
        });
        let d = decide(&cluster(), &elsewhere, &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(
            d.reason.contains("host 192.168.56.44 still answers ARP"),
            "{}",
            d.reason
        );
        // Old host up (restart failed): delete the VIP there, then check again.
        let up = facts(|f| {
            f.seen.insert(1, down());
            f.hosts.insert("192.168.56.41".into(), true);
            f.restarts.insert(1, 2);
            peers(f, false);
            f.write_vip = Some(VipSeen::Answered);
        });
        let d = decide(&cluster(), &up, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert_eq!(d.plan[0], Action::ConfirmGone { id: 1, cand: 2 });
        assert_eq!(
            d.plan[1],
            Action::DeleteWriteVip {
                host: "192.168.56.41".into()
            }
        );
        assert_eq!(d.plan[2], Action::EnsureWriteVipFree { id: 2 });
    }

    #[test]
    fn primary_host_down_asks_the_standbys_first() {
        let d = decide(&cluster(), &primary_down(|_| {}), &P, 0);
        assert_eq!(d.kind, Kind::Gather);
        assert_eq!(d.plan.len(), 3);
        assert_eq!(
            d.plan[0],
            Action::CheckPeer {
                via: "192.168.56.42".into(),
                host: "192.168.56.41".into(),
                port: 5432
            }
        );
    }

    fn peers(f: &mut Facts, seen: bool) {
        f.peers_asked = true;
        for h in ["192.168.56.42", "192.168.56.43", "192.168.56.44"] {
            f.peer_sees_primary.insert(h.into(), seen);
        }
    }

    #[test]
    fn primary_unreachable_from_monitor_only_is_no_failover() {
        let f = primary_down(|f| {
            peers(f, false);
            f.peer_sees_primary.insert("192.168.56.43".into(), true);
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(
            d.reason
                .contains("standby host 192.168.56.43 still reaches database(192.168.56.41:5432)"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn without_peer_answers_a_streaming_receiver_blocks_failover() {
        let f = primary_down(|f| {
            f.peers_asked = true;
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(d.reason.contains("still streams from it"), "{}", d.reason);
    }

    #[test]
    fn monitor_isolated_does_nothing() {
        let f = Facts {
            seen: (1..=4).map(|id| (id, down())).collect(),
            hosts: (1..=4)
                .map(|i| (format!("192.168.56.4{i}"), false))
                .collect(),
            ..Default::default()
        };
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(
            d.reason.contains("reaches none of the cluster's hosts"),
            "{}",
            d.reason
        );
        // Before the standby hosts are checked, it asks.
        let mut f2 = f.clone();
        f2.hosts.retain(|h, _| h == "192.168.56.41");
        let d = decide(&cluster(), &f2, &P, 0);
        assert_eq!(d.kind, Kind::Gather);
        assert_eq!(d.plan.len(), 3);
    }

    #[test]
    fn failover_promotes_the_standby_with_most_wal_then_reconfigures() {
        let f = primary_down(|f| {
            peers(f, false);
            f.seen.insert(2, ok_standby(900, 900));
            f.seen.insert(3, ok_standby(1000, 950));
            f.seen.insert(4, ok_standby(1000, 990));
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert_eq!(
            d.plan,
            [
                Action::ConfirmGone { id: 1, cand: 4 },
                Action::EnsureWriteVipFree { id: 4 },
                Action::Promote { id: 4 },
                Action::AddWriteVip { id: 4 },
                Action::MetaPrimary { id: 4, old: 1 },
                Action::Repoint { id: 2, to: 4 },
                Action::Repoint { id: 3, to: 4 },
                Action::CstlbDelete {
                    backend: "192.168.56.44:5432".into()
                },
                Action::CstlbDelete {
                    backend: "192.168.56.41:5432".into()
                },
                Action::MoveReadVip {
                    from: "192.168.56.41".into(),
                    to: "192.168.56.42".into()
                },
            ]
        );
        assert_eq!(
            d.reason,
            "Host(192.168.56.41) is not ok, switch database(192.168.56.41:5432)... Failover primary database(192.168.56.41:5432): switch to new host(192.168.56.44)..."
        );
    }

    #[test]
    fn level_candidates_prefer_sync_then_replay_then_lowest_id() {
        let c = cluster();
        let mut f = primary_down(|f| peers(f, false));
        assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 2);
        f.sync_standbys.insert("stb43".into());
        assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 3);
        f.sync_standbys.clear();
        f.seen.insert(4, ok_standby(1000, 1001));
        assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 4);
    }

    #[test]
    fn restart_that_fails_on_primary_turns_into_failover_with_vip_delete() {
        let f = facts(|f| {
            f.seen.insert(1, down());
            f.hosts.insert("192.168.56.41".into(), true);
            f.restarts.insert(1, 2);
            peers(f, false);
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        // The old primary is looked at once more before its VIP goes.
        assert_eq!(d.plan[0], Action::ConfirmGone { id: 1, cand: 2 });
        assert_eq!(
            d.plan[1],
            Action::DeleteWriteVip {
                host: "192.168.56.41".into()
            }
        );
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn acknowledgers_are_streaming_standbys_whose_flush_moves_or_caught_up() {
        let rows = |f2: u64, f3: u64, s4: &str| {
            vec![
                ("stb02".to_string(), "streaming".to_string(), Some(f2)),
                ("stb03".to_string(), "streaming".to_string(), Some(f3)),
                ("stb04".to_string(), s4.to_string(), Some(500)),
            ]
        };
        let last: BTreeMap<String, u64> = [
            ("stb02".into(), 100),
            ("stb03".into(), 300),
            ("stb04".into(), 400),
        ]
        .into();
        // stb02 moved; stb03 stood still but has all the primary had last
        // round; stb04 is not streaming.
        let a = acknowledgers(&rows(200, 300, "catchup"), &last, Some(300));
        assert_eq!(a, set(&["stb02", "stb03"]));
        // stb03 stood still behind the primary: hung.
        let a = acknowledgers(&rows(200, 300, "streaming"), &last, Some(900));
        assert_eq!(a, set(&["stb02", "stb04"]));
    }

    #[test]
    fn sync_setting_is_met_by_enough_acknowledging_standbys() {
        let acks = set(&["stb03"]);
        assert!(sync_met("", &acks, None));
        assert!(sync_met("ANY 1 (stb02,stb03)", &acks, None));
        assert!(!sync_met("ANY 2 (stb02,stb03)", &acks, None));
        // FIRST: the chosen one must acknowledge, whoever else does.
        assert!(!sync_met(
            "FIRST 1 (stb02,stb03)",
            &acks,
            Some(&set(&["stb02"]))
        ));
        assert!(sync_met(
            "FIRST 1 (stb02,stb03)",
            &acks,
            Some(&set(&["stb03"]))
        ));
        assert!(!sync_met("1 (stb02,stb03)", &acks, Some(&set(&[]))));
        assert!(sync_met("*", &acks, Some(&set(&["stb03"]))));
        assert!(!sync_met("ANY 1 (stb02,stb04)", &acks, None));
    }

    /// A synchronous primary nobody acknowledges: after the grace period,
    /// only the acknowledging standbys are named (none: asynchronous), the
    /// operator's setting is kept in the meta and put back once they
    /// acknowledge again; with block, commits wait and the reason says so.
    #[test]
    fn sync_standbys_that_do_not_acknowledge_are_dropped_then_restored() {
        let unmet = |acks: &[&str], since: u64| {
            facts(|f| {
                f.sync_names = Some("FIRST 1 (stb02,stb03,stb04)".into());
                f.acks = set(acks);
                f.sync_unmet_since = Some(since);
            })
        };
        // Within the grace period: nothing.
        let d = decide(&cluster(), &unmet(&["stb03"], 100), &P, 102);
        assert!(d.reason.starts_with("no action: primary"), "{}", d.reason);
        // Then the acknowledging one alone.
        let d = decide(&cluster(), &unmet(&["stb03"], 100), &P, 106);
        assert_eq!(d.kind, Kind::SyncStandbys, "{d:?}");
        assert_eq!(
            d.plan,
            [
                Action::MetaSyncWanted {
                    names: "FIRST 1 (stb02,stb03,stb04)".into()
                },
                Action::SetSyncNames {
                    id: 1,
                    names: "FIRST 1 (stb03)".into()
                }
            ]
        );
        // Nobody: asynchronous, loudly.
        let d = decide(&cluster(), &unmet(&[], 100), &P, 106);
        assert_eq!(
            d.plan[1],
            Action::SetSyncNames {
                id: 1,
                names: String::new()
            }
        );
        assert!(d.reason.contains("ASYNCHRONOUS"), "{}", d.reason);
        // block: nothing changes, and the reason says why.
        let block = Params {
            sync_fallback: SyncFallback::Block,
            ..P
        };
        let d = decide(&cluster(), &unmet(&[], 100), &block, 106);
        assert_eq!(d.kind, Kind::Nothing);
        assert!(d.reason.contains("sync_fallback = block"), "{}", d.reason);
        // Degraded, and enough acknowledge again: restored.
        let mut c = cluster();
        c.sync_wanted = "FIRST 1 (stb02,stb03,stb04)".into();
        let back = facts(|f| {
            f.sync_names = Some(String::new());
            f.acks = set(&["stb02"]);
        });
        let d = decide(&c, &back, &P, 200);
        assert_eq!(d.kind, Kind::SyncStandbys);
        assert_eq!(
            d.plan,
            [
                Action::SetSyncNames {
                    id: 1,
                    names: "FIRST 1 (stb02,stb03,stb04)".into()
                },
                Action::MetaSyncWanted {
                    names: String::new()
                }
            ]
        );
        // An asynchronous cluster is left alone.
        let plain = facts(|f| f.sync_names = Some(String::new()));
        assert!(decide(&cluster(), &plain, &P, 200)
            .reason
            .starts_with("no action: primary"));
        // The 9.6 form keeps its form.
        assert_eq!(
            sync_degraded("2 (stb02,stb03)", &set(&["stb03"])),
            "1 (stb03)"
        );
    }

    /// A hung primary (accepts connections, serves none, its host up) is
    /// never restarted; after hung_timeout it is killed, then failed over,
    /// even though every standby still opens its port (the accepting
    /// socket fools that check, and a dead server cannot take writes).
    #[test]
    fn hung_primary_is_waited_for_then_killed_and_failed_over() {
        let hung = |stalled_at: u64| {
            facts(|f| {
                f.seen.insert(1, down());
                f.hosts.insert("192.168.56.41".into(), true);
                f.stalled_since.insert(1, stalled_at);
                peers(f, true);
            })
        };
        let d = decide(&cluster(), &hung(100), &P, 105);
        assert_eq!(d.kind, Kind::Nothing, "{d:?}");
        assert!(
            d.reason.contains("for 5 s") && d.reason.contains("not restarted"),
            "{}",
            d.reason
        );
        assert!(d.plan.is_empty());

        let d = decide(&cluster(), &hung(100), &P, 120);
        assert_eq!(d.kind, Kind::Failover, "{d:?}");
        assert_eq!(d.plan[0], Action::KillDb { id: 1 });
        assert_eq!(d.plan[1], Action::ConfirmGone { id: 1, cand: 2 });
        assert_eq!(
            d.plan[2],
            Action::DeleteWriteVip {
                host: "192.168.56.41".into()
            }
        );
        let promote = d
            .plan
            .iter()
            .position(|a| matches!(a, Action::Promote { .. }));
        let free = d
            .plan
            .iter()
            .position(|a| matches!(a, Action::EnsureWriteVipFree { .. }));
        assert!(free.unwrap() < promote.unwrap(), "{:?}", d.plan);
        assert!(d.reason.contains("is hung"), "{}", d.reason);

        // A primary that refuses (not stalled) is restarted, as before.
        let mut f = hung(100);
        f.stalled_since.clear();
        let d = decide(&cluster(), &f, &P, 120);
        assert_eq!(d.kind, Kind::Restart);
    }

    #[test]
    fn candidate_too_far_behind_is_skipped_and_none_left_is_fault() {
        let f = primary_down(|f| {
            peers(f, false);
            f.primary_last_lsn = Some(100 << 20);
            f.seen.insert(2, ok_standby(10 << 20, 10 << 20));
            f.seen.insert(3, ok_standby(90 << 20, 90 << 20));
            f.seen.insert(4, down());
        });
        let c = cluster();
        assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 3);
        let mut f2 = f.clone();
        f2.seen.insert(3, ok_standby(80 << 20, 80 << 20));
        let d = decide(&c, &f2, &P, 0);
        assert_eq!(d.kind, Kind::NoCandidate);
        assert_eq!(
            d.plan,
            [Action::MetaClusterState {
                state: CLUSTER_FAULT
            }]
        );
        assert!(
            d.reason.contains("NO STANDBY IS SAFE TO PROMOTE"),
            "{}",
            d.reason
        );
        assert!(
            d.reason
                .contains("192.168.56.42:5432 is 94371840 bytes behind"),
            "{}",
            d.reason
        );
        assert!(
            d.reason.contains("192.168.56.44:5432 unreachable"),
            "{}",
            d.reason
        );
        // Limit 0 means no limit.
        let p0 = Params {
            failover_max_lag: 0,
            ..P
        };
        assert_eq!(decide(&c, &f2, &p0, 0).kind, Kind::Failover);
    }

    #[test]
    fn unfinished_failover_is_rolled_forward_never_a_second_promotion() {
        // db 3 was promoted, then the monitor died before saving the meta.
        let f = primary_down(|f| {
            peers(f, false);
            f.seen.insert(
                3,
                Seen {
                    in_recovery: Some(false),
                    ..ok_standby(900, 900)
                },
            );
            f.seen.insert(4, ok_standby(1000, 1000)); // more WAL, but too late
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert!(
            !d.plan.iter().any(|a| matches!(a, Action::Promote { .. })),
            "{:?}",
            d.plan
        );
        assert!(d.plan.contains(&Action::MetaPrimary { id: 3, old: 1 }));
        assert!(d.plan.contains(&Action::AddWriteVip { id: 3 }));
        assert!(d.plan.contains(&Action::Repoint { id: 4, to: 3 }));
        assert!(
            d.reason
                .contains("already promoted by an unfinished failover"),
            "{}",
            d.reason
        );
        // Two promoted standbys: hands off.
        let f2 = primary_down(|f| {
            peers(f, false);
            f.seen.insert(
                3,
                Seen {
                    in_recovery: Some(false),
                    ..ok_standby(900, 900)
                },
            );
            f.seen.insert(
                4,
                Seen {
                    in_recovery: Some(false),
                    ..ok_standby(900, 900)
                },
            );
        });
        let d = decide(&cluster(), &f2, &P, 0);
        assert_eq!(d.kind, Kind::NoCandidate);
        assert!(d.plan.is_empty());
        assert!(
            d.reason.contains("SEVERAL STANDBYS RUN AS PRIMARIES"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn standby_not_in_recovery_is_never_a_candidate() {
        let f = primary_down(|f| {
            peers(f, false);
            for id in 2..=4 {
                f.seen.insert(
                    id,
                    Seen {
                        in_recovery: Some(false),
                        ..ok_standby(2000, 2000)
                    },
                );
            }
        });
        assert_eq!(decide(&cluster(), &f, &P, 0).kind, Kind::NoCandidate);
    }

    #[test]
    fn sync_names_after_failover_name_survivors_then_old_primary() {
        let c = cluster();
        let (old, new) = (c.db(1).unwrap(), c.db(3).unwrap());
        assert_eq!(
            sync_names_after(&c, old, new, Some("ANY 1 (stb42,stb43,stb44)")).as_deref(),
            Some("ANY 1 (stb42,stb44,stb41)")
        );
        assert_eq!(
            sync_names_after(&c, old, new, Some("FIRST 2 (stb42, stb43)")).as_deref(),
            Some("FIRST 2 (stb42,stb44,stb41)")
        );
        assert_eq!(
            sync_names_after(&c, old, new, Some("stb43")).as_deref(),
            Some("FIRST 1 (stb42,stb44,stb41)")
        );
        assert_eq!(sync_names_after(&c, old, new, Some("")), None);
        assert_eq!(sync_names_after(&c, old, new, None), None);
        let mut small = c.clone();
        small.db_list.retain(|d| d.id == 1 || d.id == 3);
        assert_eq!(
            sync_names_after(&small, old, new, Some("ANY 3 (stb42,stb43,stb44)")).as_deref(),
            Some("ANY 1 (stb41)")
        );
        // And the failover plan carries it.
        let f = primary_down(|f| {
            peers(f, false);
            f.sync_names = Some("ANY 1 (stb42,stb43,stb44)".into());
        });
        let d = decide(&c, &f, &P, 0);
        assert!(
            d.plan.contains(&Action::SetSyncNames {
                id: 2,
                names: "ANY 1 (stb43,stb44,stb41)".into()
            }),
            "{:?}",
            d.plan
        );
    }

    #[test]
    fn returning_old_primary_is_fenced() {
        let mut c = cluster();
        c.db_list[0].is_primary = 0;
        c.db_list[0].state = DB_FAULT;
        c.db_list[1].is_primary = 1;
        let f = facts(|f| {
            f.seen.insert(1, ok_primary(5000));
            f.seen.insert(2, ok_primary(6000));
        });
        let d = decide(&c, &f, &P, 0);
        assert_eq!(d.kind, Kind::Fence);
        assert_eq!(d.plan, [Action::Fence { id: 1 }]);
        // Once it is down (or runs as a standby) nothing more is done.
        let f = facts(|f| {
            f.seen.insert(1, down());
            f.seen.insert(2, ok_primary(6000));
            for id in 3..=4 {
                f.seen.insert(
                    id,
                    Seen {
                        upstream_host: Some("192.168.56.42".into()),
                        ..ok_standby(6000, 6000)
                    },
                );
            }
        });
        assert_eq!(decide(&c, &f, &P, 0).kind, Kind::Nothing);
    }

    #[test]
    fn standby_streaming_from_the_wrong_host_is_repointed() {
        let f = facts(|f| {
            f.seen.insert(
                3,
                Seen {
                    upstream_host: Some("192.168.56.42".into()),
                    ..ok_standby(1000, 1000)
                },
            );
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Repoint);
        assert_eq!(d.plan, [Action::Repoint { id: 3, to: 1 }]);
    }

    #[test]
    fn fault_primary_is_retried_and_recovers_cluster_state() {
        let mut c = cluster();
        c.db_list[0].state = DB_FAULT;
        c.state = CLUSTER_FAULT;
        let f = primary_down(|f| peers(f, false));
        let d = decide(&c, &f, &P, 0);
        assert_eq!(d.kind, Kind::Failover);
        assert_eq!(
            d.plan.last(),
            Some(&Action::MetaClusterState {
                state: crate::model::meta::CLUSTER_NORMAL
            })
        );
        // No candidate and already Fault: nothing more to write.
        let f = primary_down(|f| {
            for id in 2..=4 {
                f.seen.insert(id, down());
            }
        });
        let d = decide(&c, &f, &P, 0);
        assert_eq!(d.kind, Kind::NoCandidate);
        assert!(d.plan.is_empty());
    }
}
