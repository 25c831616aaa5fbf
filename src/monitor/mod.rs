//! The monitor: one thread per cluster that probes every database each
//! `probe_interval`, turns what it saw into [`ha::Facts`], asks
//! [`ha::decide`] what to do, and runs the plan with the executors.
//!
//! It owns the per-cluster memory between rounds (restart counts, the
//! primary's last LSN, its synchronous standbys) and the last observation
//! served to clupadm and the HTTP API. It decides nothing itself: every
//! branch on cluster state is in `ha`.

pub mod leader;
pub mod ops;
pub mod task;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::model::config::Config;
use std::net::Ipv4Addr;

use crate::exec::pg::{self, DbProbe};
use crate::exec::recovery::Applied;
use crate::exec::ssh::{self as exssh, Ssh};
use crate::exec::{cstlb, pgctl, recovery, vip};
use crate::ha::{self, Action, Decision, Facts, Kind, Params, Seen, VipSeen};
use crate::model::home::Home;
use crate::model::meta::{Cluster, Db, DB_FAULT};
use crate::store::{update, MetaStore};
use task::TaskHandle;

/// What the monitor last saw of a cluster, for clupadm and the HTTP API.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub probes: BTreeMap<u32, DbProbe>,
    /// When the last round finished (epoch seconds).
    pub at: u64,
    pub last_reason: String,
    pub round_ms: u64,
}

/// Counters for /metrics.
#[derive(Default)]
pub struct Counters {
    pub failovers: AtomicU64,
    pub switchovers: AtomicU64,
    pub last_failover_ms: AtomicU64,
    pub probe_failures: AtomicU64,
    pub cstlb_failures: AtomicU64,
    pub overruns: AtomicU64,
}

/// State shared by the monitor threads, the task workers and the API.
pub struct Shared {
    pub cfg: Config,
    pub home: Home,
    pub store: Arc<dyn MetaStore>,
    pub ssh: Ssh,
    pub stop: AtomicBool,
    pub observed: Mutex<BTreeMap<String, Observed>>,
    pub counters: Counters,
    /// Whether this clupserver may act (the leader lease with etcd).
    pub gate: Arc<crate::monitor::leader::Gate>,
    /// The interface in `network` of hosts looked at lately, and when:
    /// spares the VIP step of a failover one ssh call.
    ifnames: Mutex<BTreeMap<String, (String, Instant)>>,
    /// Early gathers running now (see `round`).
    early_gathers: Arc<AtomicUsize>,
    /// When checks were last started ahead of a late probe (any cluster).
    last_ahead: Mutex<Option<Instant>>,
    /// Hosts' addresses as read lately by the write-VIP reconcile.
    recent_addrs: ByHost<Result<Vec<vip::IfAddr>, String>>,
    /// The last host checks, for clusters whose databases share a host.
    host_checks: ByHost<bool>,
    /// The last peer checks (does a standby's host reach a primary's
    /// port?), by standby host and primary, likewise.
    peer_checks: ByHost<Result<bool, String>>,
    /// The last write-VIP checks from a standby's host (with the peer
    /// check riding along), by host, VIP and primary.
    vip_checks: ByHost<(Result<VipSeen, String>, Option<bool>)>,
}

/// Answers about hosts that clusters share: for each host (or question
/// asked of a host) the last answer and when its asking began. A slot is
/// locked while it is being asked, so clusters with databases on one host
/// wait for one ssh call instead of each making its own.
struct ByHost<T>(Mutex<BTreeMap<String, Arc<HostSlot<T>>>>);

/// One host's last answer and when its asking began.
type HostSlot<T> = Mutex<Option<(Instant, T)>>;

impl<T> Default for ByHost<T> {
    fn default() -> Self {
        ByHost(Mutex::new(BTreeMap::new()))
    }
}

impl<T: Clone> ByHost<T> {
    /// The last answer for `host` if `fresh` accepts when its asking
    /// began, else `ask()`'s, which is kept for the others.
    fn get(&self, host: &str, fresh: impl Fn(Instant) -> bool, ask: impl FnOnce() -> T) -> T {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .clone();
        let mut got = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((began, answer)) = got.as_ref() {
            if fresh(*began) {
                return answer.clone();
            }
        }
        let began = Instant::now();
        let answer = ask();
        *got = Some((began, answer.clone()));
        answer
    }

    fn forget(&self, host: &str) {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned();
        if let Some(slot) = slot {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// How long addresses read for the write-VIP reconcile serve other
/// clusters on the same host.
const ADDR_TTL: Duration = Duration::from_secs(2);

/// At most this many clusters run their failover checks ahead (while a
/// probe of the primary is late) or beside a probe retry at once; the
/// others check after the retry.
const EARLY_GATHERS: usize = 4;

/// One of the [`EARLY_GATHERS`] slots, given back when dropped.
struct EarlySlot(Arc<AtomicUsize>);

impl EarlySlot {
    fn take(n: &Arc<AtomicUsize>) -> Option<EarlySlot> {
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v < EARLY_GATHERS).then_some(v + 1)
        })
        .ok()
        .map(|_| EarlySlot(Arc::clone(n)))
    }
}

impl Drop for EarlySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub fn new(cfg: Config, home: Home, store: Arc<dyn MetaStore>) -> Shared {
        Shared {
            ssh: Ssh::from_config(&cfg).with_control_dir(&home.run_dir()),
            cfg,
            home,
            store,
            stop: AtomicBool::new(false),
            observed: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            gate: Arc::new(crate::monitor::leader::Gate::always()),
            ifnames: Mutex::new(BTreeMap::new()),
            early_gathers: Arc::new(AtomicUsize::new(0)),
            last_ahead: Mutex::new(None),
            recent_addrs: ByHost::default(),
            host_checks: ByHost::default(),
            peer_checks: ByHost::default(),
            vip_checks: ByHost::default(),
        }
    }

    /// `host`'s interface in `network`: as seen within the last minute,
    /// else asked for over ssh.
    pub fn ifname(&self, host: &str) -> Result<String, String> {
        let m = self.ifnames.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, at)) = m.get(host) {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(n.clone());
            }
        }
        drop(m);
        let (n, _) =
            vip::find_interface(&self.ssh, host, self.cfg.network).map_err(|e| e.to_string())?;
        self.remember_ifname(host, &n);
        Ok(n)
    }

    /// `host`'s addresses, read over ssh unless another cluster read them
    /// within [`ADDR_TTL`]. Only for the calm-round reconcile: acting
    /// steps always look afresh.
    fn recent_addresses(&self, host: &str) -> Result<Vec<vip::IfAddr>, String> {
        self.recent_addrs.get(
            host,
            |began| began.elapsed() < ADDR_TTL,
            || vip::addresses(&self.ssh, host).map_err(|e| e.to_string()),
        )
    }

    /// Forget what [`Shared::recent_addresses`] read of `host`.
    fn forget_addresses(&self, host: &str) {
        self.recent_addrs.forget(host);
    }

    /// Whether `host` is up, by a check begun at `since` or later: as good
    /// as one of the caller's own. When a host with the databases of many
    /// clusters fails, their checks come together and one ssh login
    /// answers them all.
    fn host_up_since(&self, host: &str, since: Instant) -> bool {
        self.host_checks
            .get(host, |began| began >= since, || self.ssh.host_up(host))
    }

    /// Whether `via` reaches `host:port`, by a check begun at `since` or
    /// later (see [`Shared::host_up_since`]): clusters whose primaries
    /// share a host and port (entries on one instance) ask once.
    fn peer_reaches_since(
        &self,
        via: &str,
        host: &str,
        port: u16,
        since: Instant,
    ) -> Result<bool, String> {
        self.peer_checks.get(
            &format!("{via}>{host}:{port}"),
            |began| began >= since,
            || exssh::peer_reaches(&self.ssh, via, host, port).map_err(|e| e.to_string()),
        )
    }

    /// [`write_vip_seen`] by a check begun at `since` or later, likewise.
    /// The failover's own check before it promotes is never shared.
    fn vip_seen_since(
        &self,
        cluster: &Cluster,
        via: &str,
        peer: Option<(&str, u16)>,
        since: Instant,
    ) -> (Result<VipSeen, String>, Option<bool>) {
        let (host, port) = peer.unwrap_or_default();
        self.vip_checks.get(
            &format!("{via}>{}>{host}:{port}", cluster.write_vip),
            |began| began >= since,
            || write_vip_seen(self, cluster, via, peer),
        )
    }

    fn remember_ifname(&self, host: &str, ifname: &str) {
        self.ifnames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), (ifname.to_string(), Instant::now()));
    }

    /// As [`Shared::new`], acting only while `gate` is open.
    pub fn with_gate(mut self, gate: Arc<crate::monitor::leader::Gate>) -> Shared {
        self.gate = gate;
        self
    }

    pub fn params(&self) -> Params {
        Params {
            failover_max_lag: self.cfg.failover_max_lag,
            restart_tries: self.cfg.restart_tries,
        }
    }

    /// Sleep up to `d`, waking early when the server stops.
    pub fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::Relaxed) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// Start the supervisor, which keeps one probe thread per cluster of the
/// meta (clusters added later by `clupadm init --force` included); returns
/// its handle, joined at shutdown.
pub fn start(shared: &Arc<Shared>) -> thread::JoinHandle<()> {
    let s = shared.clone();
    thread::Builder::new()
        .name("ha-supervisor".into())
        .spawn(move || supervise(&s))
        .expect("spawn supervisor")
}

/// Keep exactly one probe thread per cluster of the meta.
fn supervise(shared: &Arc<Shared>) {
    let mut threads: BTreeMap<String, thread::JoinHandle<()>> = BTreeMap::new();
    let mut leading = false;
    while !shared.stop.load(Ordering::Relaxed) {
        // On becoming the acting monitor (at start with the file store):
        // the tasks of the previous one are finished or rolled forward by
        // the next rounds, and its locks released.
        let now_leading = shared.gate.may_act();
        if now_leading && !leading {
            for t in task::mark_interrupted(&*shared.store) {
                log::warn!(
                    "Task {} ({}) was interrupted by a restart of clupserver; cluster {} is re-examined now.",
                    t.id,
                    t.name,
                    t.cluster
                );
            }
            task::release_stale_locks(&*shared.store);
        }
        leading = now_leading;
        if let Ok(doc) = shared.store.load() {
            let new: Vec<&String> = doc
                .clusters
                .keys()
                .filter(|name| threads.get(*name).is_none_or(|h| h.is_finished()))
                .collect();
            let count = new.len() as u32;
            // Clusters started together spread their first rounds over the
            // interval, and over 20 ms per cluster when there are many,
            // instead of opening every probe session (a fork and a login on
            // the database) and checking every VIP over ssh at once.
            let spread = shared
                .cfg
                .probe_interval
                .max(Duration::from_millis(20) * count);
            for (i, name) in new.into_iter().enumerate() {
                {
                    let offset = spread * i as u32 / count;
                    let (s, n) = (shared.clone(), name.clone());
                    log::info!(
                        "Start checking cluster({name}) every {} s.",
                        shared.cfg.probe_interval.as_secs()
                    );
                    match thread::Builder::new()
                        .name(format!("probe-{name}"))
                        .spawn(move || cluster_loop(&s, &n, offset))
                    {
                        Ok(h) => {
                            threads.insert(name.clone(), h);
                        }
                        Err(e) => {
                            log::error!("cannot start the probe thread of cluster {name}: {e}")
                        }
                    }
                }
            }
        }
        shared.sleep(Duration::from_secs(2));
    }
    for (_, h) in threads {
        let _ = h.join();
    }
}

/// Memory a cluster's loop keeps between rounds.
#[derive(Default)]
struct Memory {
    restarts: BTreeMap<u32, u32>,
    primary_last_lsn: Option<u64>,
    sync_names: Option<String>,
    sync_standbys: std::collections::BTreeSet<String>,
    last_reason: String,
    /// Last error per cstlb, so an unreachable one is logged once, not every round.
    cstlb_errors: BTreeMap<String, String>,
    /// The primary (db id) whose host was last seen holding the write VIP;
    /// None until checked after this thread starts or after any action.
    write_vip_seen_on: Option<u32>,
    /// When that check last failed (epoch seconds): it is retried only every
    /// VIP_RECHECK_SECS, not every round (an ssh per round and cluster).
    write_vip_failed_at: u64,
    /// The probe sessions kept between rounds (closed with the loop).
    conns: pg::ProbeConns,
    /// Normal standbys answering without streaming from the primary: since when.
    not_streaming_since: BTreeMap<u32, u64>,
    /// The last probe error logged per database.
    probe_errors: BTreeMap<u32, String>,
}

fn cluster_loop(shared: &Arc<Shared>, name: &str, offset: Duration) {
    let mut mem = Memory::default();
    let interval = shared.cfg.probe_interval;
    shared.sleep(offset);
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let cluster = match shared.store.load_cluster(name) {
            Ok(Some(c)) => c,
            Ok(None) => {
                log::info!("Cluster({name}) is no longer in the meta; stop checking it.");
                return;
            }
            Err(e) => {
                log::error!("Cluster({name}): cannot read the meta, not acting: {e}");
                shared.sleep(interval);
                continue;
            }
        };
        // A follower stays warm (it has just loaded the meta) and acts on
        // nothing.
        if !cluster.is_frozen() && shared.gate.may_act() {
            round(shared, name, &cluster, &mut mem);
        }
        let took = started.elapsed();
        if took > interval {
            shared.counters.overruns.fetch_add(1, Ordering::Relaxed);
        }
        shared.sleep(interval.saturating_sub(took));
    }
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

/// Probe again, up to probe_retries times, the databases that failed,
/// except those on a host in `down` (found down since the round began: a
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
            .filter(|d| probes.get(&d.id).is_some_and(|p| !p.ok))
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
        primary_last_lsn: mem.primary_last_lsn,
        sync_names: mem.sync_names.clone(),
        sync_standbys: mem.sync_standbys.clone(),
        not_streaming_since: mem.not_streaming_since.clone(),
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

fn seen_of(p: &DbProbe) -> Seen {
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

fn round(shared: &Arc<Shared>, name: &str, cluster: &Cluster, mem: &mut Memory) {
    let t0 = Instant::now();
    let all: Vec<&Db> = cluster.db_list.iter().collect();
    let ids: Vec<u32> = all.iter().map(|d| d.id).collect();
    mem.conns.retain(&ids);
    // A probe of the primary still unanswered after AHEAD_AFTER starts
    // the checks a failover would wait for: on a dead host they then run
    // beside the probe's timeout instead of after it.
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
    // A failed probe is retried before it counts. Meanwhile the checks the
    // decision will ask for (host, peers, write VIP) already run, unless
    // they were started ahead: they only gather facts, and a retry that
    // succeeds makes them moot. This takes the retry off a failover's
    // critical path.
    let mut early = Facts::default();
    if probes.values().any(|p| !p.ok) {
        let first = facts_of(&probes, mem);
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
                retry_failed(shared, cluster, &mut probes, &mut mem.conns, probing, &down);
            });
        }
        drop(slot);
    }
    for (id, p) in &probes {
        if p.ok {
            mem.restarts.remove(id);
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
    watch_streaming(cluster, &probes, &mut mem.not_streaming_since);
    let mut facts = facts_of(&probes, mem);
    facts.hosts = early.hosts;
    facts.peer_sees_primary = early.peer_sees_primary;
    facts.peers_asked = early.peers_asked;
    facts.write_vip = early.write_vip;

    let probed = t0.elapsed();
    let mut reason = String::new();
    // A calm round ends by bringing cstlb and the write VIP in line; done
    // after the observation is published, which they must not delay.
    let mut reconcile = false;
    for _ in 0..8 {
        let d = ha::decide(cluster, &facts, &shared.params(), crate::now_secs());
        reason = d.reason.clone();
        if !matches!(d.kind, Kind::Nothing | Kind::Gather) && !shared.gate.may_act() {
            log::warn!(
                "Cluster({name}): not acting on '{}': this clupserver no longer leads",
                d.reason
            );
            break;
        }
        match d.kind {
            Kind::Nothing => {
                if d.reason != mem.last_reason {
                    if d.reason.starts_with("no action: primary") {
                        log::info!("Cluster({name}): {}", d.reason);
                    } else {
                        log::warn!("Cluster({name}): {}", d.reason);
                    }
                }
                reconcile = !cluster.is_frozen() && cluster.lock_time <= crate::now_secs();
                break;
            }
            Kind::Gather => {
                if d.reason != mem.last_reason {
                    log::info!("{}", d.reason);
                }
                mem.last_reason = d.reason.clone();
                gather(shared, cluster, &d.plan, t0, &mut facts);
            }
            _ if !unchanged(shared, name, cluster) => {
                // Frozen, locked or edited while this round probed: what was
                // decided may no longer hold. Decide again next round.
                log::info!(
                    "Cluster({name}): the meta changed during this round; not acting on: {}",
                    d.reason
                );
                break;
            }
            Kind::Restart => {
                log::info!("{}", d.reason);
                mem.write_vip_seen_on = None;
                for a in &d.plan {
                    if let Action::RestartDb { id } = a {
                        *mem.restarts.entry(*id).or_insert(0) += 1;
                        if let Some(db) = cluster.db(*id) {
                            match pgctl::start(&shared.ssh, db, &shared.cfg) {
                                // A probe that failed for want of an answer
                                // (an overloaded server or network) finds
                                // it running: pg_ctl leaves it be.
                                Ok(o) if o.stdout.contains("server is already running") => {
                                    log::info!("Database({}) is running: not restarted.", db.addr())
                                }
                                Ok(_) => log::info!("Database({}) restarted.", db.addr()),
                                Err(e) => {
                                    log::error!("Restart of database({}) failed: {e}", db.addr())
                                }
                            }
                        }
                    }
                }
                break;
            }
            _ => {
                act(shared, name, cluster, &d);
                mem.write_vip_seen_on = None;
                // Forget what the old topology taught us.
                if d.kind == Kind::Failover {
                    mem.primary_last_lsn = None;
                    mem.restarts.clear();
                    mem.not_streaming_since.clear();
                }
                break;
            }
        }
    }
    mem.last_reason = reason.clone();
    let primary_ok = reason.starts_with("no action: primary");
    shared
        .observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            name.to_string(),
            Observed {
                probes,
                at: crate::now_secs(),
                last_reason: reason,
                round_ms: t0.elapsed().as_millis() as u64,
            },
        );
    let decided = t0.elapsed();
    if reconcile {
        reconcile_cstlb(shared, name, cluster, &facts, &mut mem.cstlb_errors);
        if primary_ok {
            let now = crate::now_secs();
            if now.saturating_sub(mem.write_vip_failed_at) >= VIP_RECHECK_SECS
                && !reconcile_write_vip(shared, name, cluster, &mut mem.write_vip_seen_on)
            {
                mem.write_vip_failed_at = now;
            }
        }
    }
    let took = t0.elapsed();
    if took > shared.cfg.probe_interval * 2 {
        log::warn!(
            "Cluster({name}): round took {:.1} s, more than twice probe_interval (probes and checks {:.1} s, decision and action {:.1} s, cstlb and write vip upkeep {:.1} s)",
            took.as_secs_f64(),
            probed.as_secs_f64(),
            (decided - probed).as_secs_f64(),
            (took - decided).as_secs_f64()
        );
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
    let added = vip::find_interface(ssh, &primary.host, shared.cfg.network)
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

/// Is the cluster's meta still what this round decided on?
fn unchanged(shared: &Shared, name: &str, cluster: &Cluster) -> bool {
    matches!(shared.store.load(), Ok(doc) if doc.clusters.get(name) == Some(cluster))
}

/// From `via`: who has the cluster's write VIP? With `peer`, also whether
/// `via` reaches it (the same ssh call: one login per standby on a
/// failover's critical path).
fn write_vip_seen(
    shared: &Shared,
    cluster: &Cluster,
    via: &str,
    peer: Option<(&str, u16)>,
) -> (Result<VipSeen, String>, Option<bool>) {
    let v = match vip_of(&cluster.write_vip) {
        Ok(v) => v,
        Err(e) => return (Err(e), None),
    };
    let look = match vip::look(&shared.ssh, via, v, peer) {
        Ok(l) => l,
        Err(e) => return (Err(e.to_string()), None),
    };
    if let Some((ifname, _)) = vip::pick_interface(&look.addrs, shared.cfg.network) {
        shared.remember_ifname(via, &ifname);
    }
    let seen = match vip::answered_from(&shared.ssh, via, v, shared.cfg.network, &look) {
        Ok(None) => Ok(VipSeen::HeldBy(via.to_string())),
        Ok(Some(true)) => Ok(VipSeen::Answered),
        Ok(Some(false)) => Ok(VipSeen::Free),
        Err(e) => Err(e.to_string()),
    };
    (seen, look.peer)
}

/// Run gather actions in parallel and record their answers. A standby
/// asked both about the primary and about the write VIP gets one ssh call.
/// Gather the facts `plan` asks for; `since`: when the round that needs
/// them began.
fn gather(shared: &Shared, cluster: &Cluster, plan: &[Action], since: Instant, facts: &mut Facts) {
    /// One gathered fact.
    enum Answer {
        Host(String, bool),
        Peer(String, Option<bool>),
        Vip(Option<VipSeen>),
    }
    let vip_via = plan.iter().find_map(|a| match a {
        Action::CheckWriteVip { via } => Some(via.as_str()),
        _ => None,
    });
    // The peer question that rides along with the write VIP check.
    let joined = plan.iter().find_map(|a| match a {
        Action::CheckPeer { via, host, port } if Some(via.as_str()) == vip_via => {
            Some((host.as_str(), *port))
        }
        _ => None,
    });
    let peer_failed = |via: &str, host: &str, port: u16, e: &dyn std::fmt::Display| {
        log::warn!("Cannot ask {via} about {host}:{port}: {e}");
    };
    let answers: Vec<Answer> = thread::scope(|s| {
        let hs: Vec<_> = plan
            .iter()
            .map(|a| {
                s.spawn(move || match a {
                    Action::CheckHost { host } => {
                        vec![Answer::Host(
                            host.clone(),
                            shared.host_up_since(host, since),
                        )]
                    }
                    Action::CheckPeer { via, .. } if Some(via.as_str()) == vip_via => vec![],
                    Action::CheckPeer { via, host, port } => {
                        let r = shared.peer_reaches_since(via, host, *port, since);
                        if let Err(e) = &r {
                            peer_failed(via, host, *port, e);
                        }
                        vec![Answer::Peer(via.clone(), r.ok())]
                    }
                    Action::CheckWriteVip { via } => {
                        let (r, peer) = shared.vip_seen_since(cluster, via, joined, since);
                        if let Err(e) = &r {
                            log::warn!("Cannot check from {via} who has the write vip: {e}");
                        }
                        let mut out = vec![Answer::Vip(r.ok())];
                        if let Some((host, port)) = joined {
                            if peer.is_none() {
                                peer_failed(via, host, port, &"no answer");
                            }
                            out.push(Answer::Peer(via.clone(), peer));
                        }
                        out
                    }
                    _ => vec![],
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .collect()
    });
    for a in answers {
        match a {
            Answer::Host(host, up) => {
                facts.hosts.insert(host, up);
            }
            Answer::Peer(via, seen) => {
                facts.peers_asked = true;
                if let Some(b) = seen {
                    facts.peer_sees_primary.insert(via, b);
                }
            }
            Answer::Vip(v) => facts.write_vip = v,
        }
    }
}

/// Run an acting decision as a task, under the cluster lock.
fn act(shared: &Arc<Shared>, name: &str, cluster: &Cluster, d: &Decision) {
    let what = match d.kind {
        Kind::Failover => "failover",
        Kind::StandbyFault => "standby fault",
        Kind::Fence => "fence",
        Kind::Repoint => "repoint",
        Kind::NoCandidate => "no candidate",
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
    t.info(&d.reason);
    let started = Instant::now();
    let ok = run_plan(shared, name, cluster, d, &t);
    let ms = started.elapsed().as_millis() as u64;
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
        (Kind::Failover, Some(db)) if db.is_primary() => {
            format!("Failover primary database({addr})")
        }
        (Kind::StandbyFault, _) => format!("Failover database({addr})"),
        _ => format!("Cluster action on database({addr})"),
    }
}

/// Run the plan step by step. Steps before the promotion abort the plan on
/// failure; after it, every step is tried and failures are logged.
pub fn run_plan(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    d: &Decision,
    t: &TaskHandle,
) -> bool {
    let pre = prefix(cluster, d);
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
    for a in &d.plan {
        if let Action::Repoint { .. } = a {
            if repointed {
                continue;
            }
            repointed = true;
            let to = cluster
                .db(repoints[0].1)
                .map(|d| d.host.clone())
                .unwrap_or_default();
            t.info(&format!(
                "{pre}: change all standby database upper level primary database to host({to})..."
            ));
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
            t.info(&format!(
                "{pre}: change all standby database upper level primary database to host({to}) completed ({} ms).",
                t0.elapsed().as_millis()
            ));
            continue;
        }
        let t0 = Instant::now();
        let res = step(shared, name, cluster, a, &pre, t);
        let ms = t0.elapsed().as_millis();
        match res {
            Ok(()) => {
                if let Action::Promote { .. } = a {
                    promoted = true;
                }
                log::debug!("{pre}: step '{a}' done in {ms} ms");
            }
            Err(e) => {
                t.error(&format!("{pre}: {a} failed after {ms} ms: {e}"));
                let critical = matches!(
                    a,
                    Action::EnsureWriteVipFree { .. }
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
    if d.kind == Kind::Failover {
        if let Some(new) = d.plan.iter().find_map(|a| match a {
            Action::Promote { id } => cluster.db(*id),
            _ => None,
        }) {
            t.info(&format!(
                "{pre}: switch to new host({}) completed.",
                new.host
            ));
        }
    } else {
        t.info(&format!("{pre}: all completed."));
    }
    ok
}

fn db_or_err(cluster: &Cluster, id: u32) -> Result<&Db, String> {
    cluster
        .db(id)
        .ok_or_else(|| format!("db {id} is not in the cluster"))
}

/// One acting step. Gather actions never reach here.
fn step(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    a: &Action,
    pre: &str,
    t: &TaskHandle,
) -> Result<(), String> {
    let cfg = &shared.cfg;
    let ssh = &shared.ssh;
    match a {
        Action::CheckHost { .. }
        | Action::CheckPeer { .. }
        | Action::CheckWriteVip { .. }
        | Action::RestartDb { .. }
        | Action::Repoint { .. } => Ok(()),
        Action::Fence { id } => {
            let db = db_or_err(cluster, *id)?;
            t.info(&format!(
                "{pre}: stop database({}) so that it cannot take writes...",
                db.addr()
            ));
            let _ = vip::delete(ssh, &db.host, vip_of(&cluster.write_vip)?);
            pgctl::stop_fast(ssh, db, cfg)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Action::CstlbDelete { backend } | Action::CstlbAdd { backend } => {
            let add = matches!(a, Action::CstlbAdd { .. });
            let verb = if add { "add host" } else { "remove bad host" };
            t.info(&format!(
                "{pre}: begin {verb}({backend}) {} cstlb ...",
                if add { "to" } else { "from" }
            ));
            cstlb_all(shared, cluster, backend, add, t);
            t.info(&format!(
                "{pre}: {verb}({backend}) {} cstlb finished.",
                if add { "to" } else { "from" }
            ));
            Ok(())
        }
        Action::DeleteWriteVip { host } => {
            t.info(&format!(
                "Switch primary database: begin delete write vip({}) on host({host}) ...",
                cluster.write_vip
            ));
            match vip::delete(ssh, host, vip_of(&cluster.write_vip)?) {
                Ok(()) => t.info(&format!("Switch primary database: delete write vip({}) completed.", cluster.write_vip)),
                Err(e) => t.error(&format!("Switch primary database: delete write vip({}) failed (ignored, host may be gone): {e}", cluster.write_vip)),
            }
            Ok(())
        }
        Action::EnsureWriteVipFree { id } => {
            let db = db_or_err(cluster, *id)?;
            match write_vip_seen(shared, cluster, &db.host, None).0 {
                Ok(VipSeen::Free | VipSeen::HeldBy(_)) => Ok(()),
                Ok(VipSeen::Answered) => Err(format!(
                    "another host still answers ARP for the write vip({}): refusing to promote (split brain guard)",
                    cluster.write_vip
                )),
                Err(e) => Err(format!("cannot check that the write vip is free: {e}")),
            }
        }
        Action::Promote { id } => {
            let db = db_or_err(cluster, *id)?;
            t.info(&format!(
                "{pre}: Promote standby database({}) to primary...",
                db.host
            ));
            pg::promote(ssh, db, cfg).map_err(|e| e.to_string())?;
            t.info(&format!(
                "{pre}: Promote standby database({}) to primary completed.",
                db.host
            ));
            Ok(())
        }
        Action::AddWriteVip { id } => {
            let db = db_or_err(cluster, *id)?;
            let v = vip_of(&cluster.write_vip)?;
            let ifname = shared.ifname(&db.host)?;
            if let Err(e) = vip::add(ssh, &db.host, v, &ifname) {
                // A remembered interface that has gone: ask once more.
                log::warn!("{e}; looking up the interface of host {} again", db.host);
                let (ifname, _) =
                    vip::find_interface(ssh, &db.host, cfg.network).map_err(|e| e.to_string())?;
                shared.remember_ifname(&db.host, &ifname);
                vip::add(ssh, &db.host, v, &ifname).map_err(|e| e.to_string())?;
            }
            t.info(&format!(
                "{pre}: write vip({}) added on host({}).",
                cluster.write_vip, db.host
            ));
            Ok(())
        }
        Action::SetSyncNames { id, names } => {
            let db = db_or_err(cluster, *id)?;
            pg::set_sync_names(db, cfg, names).map_err(|e| e.to_string())?;
            t.info(&format!(
                "{pre}: synchronous_standby_names on database({}) set to '{names}'.",
                db.addr()
            ));
            Ok(())
        }
        Action::MoveReadVip { from, to } => {
            t.info(&format!(
                "{pre}: move read vip({}) from host({from}) to host({to}) ...",
                cluster.read_vip
            ));
            let read_vip = vip_of(&cluster.read_vip)?;
            let _ = vip::delete(ssh, from, read_vip);
            let (ifname, _) =
                vip::find_interface(ssh, to, cfg.network).map_err(|e| e.to_string())?;
            vip::add(ssh, to, read_vip, &ifname).map_err(|e| e.to_string())?;
            let to = to.clone();
            meta_update_cluster(shared, name, |c| {
                c.read_vip_host = to.clone();
                Ok(())
            })
        }
        Action::MetaPrimary { id, old } => {
            t.info(&format!("{pre}: save node state to meta server..."));
            let (id, old) = (*id, *old);
            meta_update_cluster(shared, name, |c| {
                for d in c.db_list.iter_mut() {
                    d.is_primary = u8::from(d.id == id);
                }
                if let Some(o) = c.db_mut(old) {
                    o.state = DB_FAULT;
                }
                Ok(())
            })?;
            t.info(&format!("{pre}: save node state to meta server completed."));
            Ok(())
        }
        Action::MetaDbState { id, state } => {
            t.info(&format!("{pre}: save node state to meta server..."));
            let (id, state) = (*id, *state);
            meta_update_cluster(shared, name, |c| {
                c.db_mut(id).ok_or("db vanished")?.state = state;
                Ok(())
            })?;
            t.info(&format!("{pre}: save node state to meta server completed."));
            Ok(())
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
pub fn cstlb_all(shared: &Shared, cluster: &Cluster, backend: &str, add: bool, t: &TaskHandle) {
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
    parse_pg_version(out.stdout.trim())
        .ok_or_else(|| format!("unexpected PG_VERSION '{}'", out.stdout.trim()))
}

/// `15` -> 150000, `9.6` -> 90600.
pub fn parse_pg_version(s: &str) -> Option<u32> {
    let mut it = s.split('.');
    let major: u32 = it.next()?.parse().ok()?;
    let minor: u32 = it.next().map_or(Some(0), |m| m.parse().ok())?;
    Some(if major >= 10 {
        major * 10000
    } else {
        major * 10000 + minor * 100
    })
}

/// Point standby `id` at `to`: recovery settings by version, then reload,
/// restart or start as the version and state need.
pub fn repoint(shared: &Shared, cluster: &Cluster, id: u32, to: u32) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_answer_serves_those_who_accept_its_age_and_is_asked_once() {
        let checks: ByHost<bool> = ByHost::default();
        let asked = AtomicUsize::new(0);
        let since = Instant::now();
        let ask = || {
            asked.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(50));
            true
        };
        // Eight clusters at once: one asks, the others wait for its answer.
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| assert!(checks.get("h1", |b| b >= since, ask)));
            }
        });
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // A round that began after that check asks again; another host
        // has its own answer.
        let later = Instant::now();
        assert!(!checks.get("h1", |b| b >= later, || false));
        assert!(!checks.get("h1", |b| b >= later, || true));
        assert!(checks.get("h2", |b| b >= since, || true));
        checks.forget("h2");
        assert!(!checks.get("h2", |b| b >= since, || false));
    }

    #[test]
    fn early_gather_slots_are_bounded_and_given_back() {
        let n = Arc::new(AtomicUsize::new(0));
        let held: Vec<_> = (0..EARLY_GATHERS)
            .map(|_| EarlySlot::take(&n).expect("a free slot"))
            .collect();
        assert!(EarlySlot::take(&n).is_none());
        drop(held);
        assert_eq!(n.load(Ordering::Relaxed), 0);
        assert!(EarlySlot::take(&n).is_some());
    }
}
