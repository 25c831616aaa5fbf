//! The round's first phase: probe every database of the cluster, retry the
//! ones that failed, and meanwhile run the checks a failover of the primary
//! would wait for (its host, the standbys' view of it, the write VIP), so
//! that they are off the failover's critical path. Then fold the answers
//! into the loop's memory and into [`Facts`] for the decision.
//!
//! It only observes: nothing here changes a database, a VIP or the meta.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::checks::gather;
use super::{EarlySlot, Memory, Shared};
use crate::exec::pg::{self, DbProbe};
use crate::ha::{self, Facts, Kind, Seen};
use crate::model::meta::{Cluster, Db};

/// What the probe phase found.
pub(super) struct Probed {
    /// Every database's probe, retried where it failed.
    pub probes: BTreeMap<u32, DbProbe>,
    /// Host, peer and write-VIP answers gathered beside the retries of a
    /// failing primary (empty when every probe answered).
    pub early: Facts,
}

/// Probe the cluster's databases. A probe of the primary still unanswered
/// after [`AHEAD_AFTER`] starts the checks a failover would wait for: on a
/// dead host they then run beside the probe's timeout instead of after it.
pub(super) fn probe(
    shared: &Arc<Shared>,
    name: &str,
    cluster: &Cluster,
    mem: &mut Memory,
    t0: Instant,
) -> Probed {
    let all: Vec<&Db> = cluster.db_list.iter().collect();
    let ids: Vec<u32> = all.iter().map(|d| d.id).collect();
    mem.conns.retain(&ids);
    let after = AHEAD_AFTER.min(shared.cfg.probe_timeout / 2);
    let ahead = std::cell::RefCell::new(None);
    let start_ahead = || *ahead.borrow_mut() = check_ahead(shared, name, cluster, t0, after);
    let late = cluster
        .primary()
        .filter(|_| cluster.db_list.len() > 1)
        .map(|p| pg::Late {
            id: p.id,
            after,
            then: &start_ahead,
        });
    let mut probes = probe_dbs(shared, &all, &mut mem.conns, late);
    let ahead = ahead.into_inner();
    let probing = t0.elapsed();
    let early = if probes.values().any(|p| !p.ok) {
        let first = FirstTry {
            ahead,
            took: probing,
            began: t0,
        };
        retry_with_checks(shared, name, cluster, mem, &mut probes, first)
    } else {
        Facts::default()
    };
    Probed { probes, early }
}

/// The first probe of the round, as its retries need to know it.
struct FirstTry {
    /// The checks started ahead while the primary's probe was late.
    ahead: Option<crossbeam_channel::Receiver<Facts>>,
    /// How long the first probe ran.
    took: Duration,
    /// When the round began: a shared check begun since is as good as ours.
    began: Instant,
}

/// A failed probe is retried before it counts. Meanwhile the checks the
/// decision will ask for (host, peers, write VIP) already run, unless they
/// were started ahead: they only gather facts, and a retry that succeeds
/// makes them moot. This takes the retry off a failover's critical path.
/// Returns the facts those checks gathered.
fn retry_with_checks(
    shared: &Arc<Shared>,
    name: &str,
    cluster: &Cluster,
    mem: &mut Memory,
    probes: &mut BTreeMap<u32, DbProbe>,
    first_try: FirstTry,
) -> Facts {
    let FirstTry {
        ahead,
        took: probing,
        began: t0,
    } = first_try;
    let mut early = Facts::default();
    let first = facts_of(probes, mem);
    let d = ha::decide(cluster, &first, &shared.params(), crate::now_secs());
    let primary_failed =
        d.kind == Kind::Gather && cluster.primary().is_some_and(|p| d.subject == Some(p.id));
    // Checks made ahead serve the primary's failure only.
    let ahead = ahead.filter(|_| primary_failed);
    let retry = shared.cfg.probe_retries > 0;
    // Only for the primary, whose failover waits on them, and only a
    // few clusters at a time: checks for a probe whose retry then
    // succeeds are wasted ssh logins, and when many clusters' probes
    // are slow at once (an overloaded monitor) they would make it worse.
    let slot = (ahead.is_none() && retry && primary_failed)
        .then(|| EarlySlot::take(&shared.early_gathers))
        .flatten();
    if (ahead.is_some() || slot.is_some()) && d.reason != mem.last_reason {
        log::info!("{}", d.reason);
        mem.last_reason = d.reason.clone();
    }
    if let Some(rx) = ahead {
        // Each check is bounded by its own timeouts; this is a backstop.
        let bound = shared.cfg.probe_timeout + shared.cfg.ssh_connect_timeout * 2;
        match rx.recv_timeout(bound + Duration::from_secs(12)) {
            Ok(f) => early = f,
            Err(_) => log::warn!("Cluster({name}): the checks started ahead did not end"),
        }
    }
    if retry {
        let down: Vec<String> = early
            .hosts
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(h, _)| h.clone())
            .collect();
        thread::scope(|s| {
            if slot.is_some() {
                let (plan, early) = (&d.plan, &mut early);
                s.spawn(move || gather(shared, cluster, plan, t0, early));
            }
            retry_failed(shared, cluster, probes, &mut mem.conns, probing, &down);
        });
    }
    drop(slot);
    early
}

/// Fold this round's probes into the loop's memory: restart counts and
/// probe errors of databases that answer are forgotten, a failure's reason
/// is logged once per change, and the healthy primary's end of WAL and
/// synchronous standbys are kept for the decision after it fails.
/// `began`: when the round's probes began (epoch seconds): a failure or
/// stall seen now has lasted since then.
pub(super) fn remember(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    probes: &BTreeMap<u32, DbProbe>,
    mem: &mut Memory,
    began: u64,
) {
    let now = crate::now_secs();
    for (id, p) in probes {
        if p.stalled {
            mem.stalled_since.entry(*id).or_insert(began);
        } else {
            mem.stalled_since.remove(id);
        }
        if p.ok {
            mem.failing_since.remove(id);
        } else {
            mem.failing_since.entry(*id).or_insert(began);
        }
        if p.ok {
            mem.restarts.remove(id);
            mem.restart_why.remove(id);
            mem.probe_errors.remove(id);
        } else {
            shared
                .counters
                .probe_failures
                .fetch_add(1, Ordering::Relaxed);
            // Why, once per change: the decision's log lines say only that
            // it failed.
            if mem.probe_errors.get(id) != Some(&p.error) {
                log::warn!("Cluster({name}): {}", p.error);
                mem.probe_errors.insert(*id, p.error.clone());
            }
        }
    }
    if let Some(primary) = cluster.primary() {
        if let Some(p) = probes
            .get(&primary.id)
            .filter(|p| p.ok && p.in_recovery == Some(false))
        {
            note_acks(p, mem, now);
            if let Some(lsn) = p.wal_lsn {
                mem.primary_last_lsn = Some(mem.primary_last_lsn.map_or(lsn, |l| l.max(lsn)));
            }
            mem.sync_names = p.sync_names.clone();
            mem.sync_standbys = p
                .replicas
                .iter()
                .filter(|r| r.sync_state == "sync" || r.sync_state == "quorum")
                .map(|r| r.application_name.clone())
                .collect();
        }
    }
    // The standbys streaming from the primary know its end of WAL as of
    // its last message to them: failover_max_lag is judged against the
    // freshest position anyone saw, not only the monitor's last probe.
    if let Some(primary) = cluster.primary() {
        let seen_by_standbys = probes
            .values()
            .filter_map(|p| p.upstream.as_ref())
            .filter(|u| u.sender_host.as_deref() == Some(primary.host.as_str()))
            .filter_map(|u| u.latest_end_lsn)
            .max();
        if let Some(lsn) = seen_by_standbys {
            mem.primary_last_lsn = Some(mem.primary_last_lsn.map_or(lsn, |l| l.max(lsn)));
        }
    }
    watch_streaming(cluster, probes, &mut mem.not_streaming_since);
}

/// From a healthy primary's probe: which standbys acknowledge its WAL
/// ([`ha::acknowledgers`], against the last round's positions), and since
/// when its synchronous_standby_names cannot be met by them.
fn note_acks(p: &DbProbe, mem: &mut Memory, now: u64) {
    let rows: Vec<(String, String, Option<u64>)> = p
        .replicas
        .iter()
        .map(|r| (r.application_name.clone(), r.state.clone(), r.flush_lsn))
        .collect();
    mem.acks = ha::acknowledgers(&rows, &mem.last_flush, mem.primary_last_lsn);
    mem.last_flush = rows
        .iter()
        .filter_map(|(n, _, f)| Some((n.clone(), (*f)?)))
        .collect();
    let chosen: std::collections::BTreeSet<String> = p
        .replicas
        .iter()
        .filter(|r| r.sync_state == "sync")
        .map(|r| r.application_name.clone())
        .collect();
    let names = p.sync_names.as_deref().unwrap_or("");
    mem.sync_unmet_since = if ha::sync_met(names, &mem.acks, Some(&chosen)) {
        None
    } else {
        Some(mem.sync_unmet_since.unwrap_or(now))
    };
}

/// The facts the decision starts from: this round's probes, what the loop
/// remembers, and the checks made while probing.
pub(super) fn facts(probed: Probed, mem: &Memory) -> (BTreeMap<u32, DbProbe>, Facts) {
    let mut facts = facts_of(&probed.probes, mem);
    facts.hosts = probed.early.hosts;
    facts.peer_sees_primary = probed.early.peer_sees_primary;
    facts.peers_asked = probed.early.peers_asked;
    facts.write_vip = probed.early.write_vip;
    (probed.probes, facts)
}

/// One probe of each of `dbs`, in parallel (on the probe pool's threads,
/// all answered before returning), all bounded by one probe_timeout, on the
/// sessions the loop keeps in `conns`.
/// `late`: see [`pg::probe_watching`].
fn probe_dbs(
    shared: &Shared,
    dbs: &[&Db],
    conns: &mut pg::ProbeConns,
    late: Option<pg::Late>,
) -> BTreeMap<u32, DbProbe> {
    let with_role: Vec<(&Db, bool)> = dbs.iter().map(|d| (*d, d.is_primary())).collect();
    pg::probe_watching(&with_role, &shared.cfg, conns, late)
}

/// Probe again, up to probe_retries times, the databases that failed
/// (but stalled ones), except those on a host in `down` (found down since the round began: a
/// newer and stronger answer than another probe's).
/// Each attempt starts at least 200 ms after the one before it began
/// failing (`took` = how long the first attempt ran): a probe that failed
/// at once (refused) gets a pause, one that waited out its timeout none.
fn retry_failed(
    shared: &Shared,
    cluster: &Cluster,
    probes: &mut BTreeMap<u32, DbProbe>,
    conns: &mut pg::ProbeConns,
    mut took: Duration,
    down: &[String],
) {
    for _ in 0..shared.cfg.probe_retries {
        let failed: Vec<&Db> = cluster
            .db_list
            .iter()
            // A stalled server (it took the connection, answered nothing
            // in probe_timeout) is no lost packet: asked again, it only
            // stalls again, and its failover waits for the retry.
            .filter(|d| probes.get(&d.id).is_some_and(|p| !p.ok && !p.stalled))
            .filter(|d| !down.contains(&d.host))
            .collect();
        if failed.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(200).saturating_sub(took));
        let t = Instant::now();
        probes.extend(probe_dbs(shared, &failed, conns, None));
        took = t.elapsed();
    }
}

/// What the probes saw, with what the loop remembers; mem is only read.
fn facts_of(probes: &BTreeMap<u32, DbProbe>, mem: &Memory) -> Facts {
    Facts {
        seen: probes.iter().map(|(id, p)| (*id, seen_of(p))).collect(),
        restarts: mem.restarts.clone(),
        restart_why: mem.restart_why.clone(),
        primary_last_lsn: mem.primary_last_lsn,
        sync_names: mem.sync_names.clone(),
        sync_standbys: mem.sync_standbys.clone(),
        not_streaming_since: mem.not_streaming_since.clone(),
        stalled_since: mem.stalled_since.clone(),
        failing_since: mem.failing_since.clone(),
        acks: mem.acks.clone(),
        sync_unmet_since: mem.sync_unmet_since,
        rewound_at: mem.rewound_at.clone(),
        ..Default::default()
    }
}

/// Note since when each Normal standby has answered without streaming
/// from the primary's host; forget those that stream, fail or are not
/// Normal standbys (any more), and everything while the primary is down.
fn watch_streaming(
    cluster: &Cluster,
    probes: &BTreeMap<u32, DbProbe>,
    since: &mut BTreeMap<u32, u64>,
) {
    // Only while the primary answers as a primary: when it is down its
    // standbys cannot stream, and that is the primary's failure, not theirs.
    let Some(primary) = cluster.primary().filter(|p| {
        probes
            .get(&p.id)
            .is_some_and(|pr| pr.ok && pr.in_recovery == Some(false))
    }) else {
        since.clear();
        return;
    };
    let stuck: Vec<u32> = cluster
        .normal_standbys()
        .filter(|d| {
            probes.get(&d.id).is_some_and(|p| {
                p.ok && p.in_recovery == Some(true)
                    && !p.upstream.as_ref().is_some_and(|u| {
                        u.status == "streaming"
                            && u.sender_host.as_deref() == Some(primary.host.as_str())
                    })
            })
        })
        .map(|d| d.id)
        .collect();
    since.retain(|id, _| stuck.contains(id));
    let now = crate::now_secs();
    for id in stuck {
        since.entry(id).or_insert(now);
    }
}

pub(super) fn seen_of(p: &DbProbe) -> Seen {
    Seen {
        ok: p.ok,
        in_recovery: p.in_recovery,
        timeline: p.timeline,
        receive_lsn: p.wal_lsn,
        replay_lsn: p.replay_lsn,
        upstream_host: p.upstream.as_ref().and_then(|u| u.sender_host.clone()),
        upstream_status: p.upstream.as_ref().map(|u| u.status.clone()),
    }
}

/// A probe of the primary unanswered after this long (or half of
/// probe_timeout, if shorter) starts the checks a failover would wait for.
/// On a LAN a probe answers within milliseconds.
const AHEAD_AFTER: Duration = Duration::from_millis(250);

/// At most one cluster per this long starts checks ahead. When a host
/// dies, the first of its clusters to notice checks it ahead (the others
/// reuse that host check); when many probes are late at once, the servers
/// or the monitor are overloaded, and more ssh logins would make it worse.
const AHEAD_SPACING: Duration = Duration::from_secs(1);

/// Start, on a thread of its own, the checks a failover of `cluster`'s
/// primary would wait for (its host, the standbys that answered last round,
/// the write VIP): called while a probe of the primary is `late`. None when
/// there is no last round to go by, the primary was as slow then (a loaded
/// server, not a dead one: no checks every round), another cluster did so
/// less than [`AHEAD_SPACING`] ago or [`EARLY_GATHERS`] are running. The
/// answers come on the channel; a primary that answers after all leaves
/// them unread.
fn check_ahead(
    shared: &Arc<Shared>,
    name: &str,
    cluster: &Cluster,
    since: Instant,
    late: Duration,
) -> Option<crossbeam_channel::Receiver<Facts>> {
    let primary = cluster.primary()?;
    let last = {
        let observed = shared.observed.lock().unwrap_or_else(|p| p.into_inner());
        let probes = &observed.get(name)?.probes;
        let was = probes.get(&primary.id)?;
        if !was.ok || u128::from(was.probe_ms) >= late.as_millis() {
            return None;
        }
        Facts {
            seen: probes.iter().map(|(id, p)| (*id, seen_of(p))).collect(),
            ..Default::default()
        }
    };
    let plan = ha::primary_checks(cluster, primary, &last);
    let slot = {
        let mut at = shared.last_ahead.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_some_and(|t| t.elapsed() < AHEAD_SPACING) {
            return None;
        }
        let slot = EarlySlot::take(&shared.early_gathers)?;
        *at = Some(Instant::now());
        slot
    };
    log::debug!(
        "Cluster({name}): database({}) is slow to answer: checking its host and asking the standbys ahead",
        primary.addr()
    );
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (shared, cluster) = (Arc::clone(shared), cluster.clone());
    let spawned = thread::Builder::new()
        .name(format!("ahead-{name}"))
        .spawn(move || {
            let mut facts = Facts::default();
            gather(&shared, &cluster, &plan, since, &mut facts);
            drop(slot);
            let _ = tx.send(facts);
        });
    spawned.ok().map(|_| rx)
}
