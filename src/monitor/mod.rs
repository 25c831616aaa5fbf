//! The monitor: one thread per cluster that probes every database each
//! `probe_interval`, turns what it saw into [`ha::Facts`], asks
//! [`ha::decide`] what to do, and runs the plan with the executors.
//!
//! It owns the per-cluster memory between rounds (restart counts, the
//! primary's last LSN, its synchronous standbys) and the last observation
//! served to clupadm and the HTTP API. It decides nothing itself: every
//! branch on cluster state is in `ha`.

mod act;
mod checks;
mod decide;
pub mod events;
pub mod history;
mod hooks;
pub mod leader;
pub mod ops;
mod probe;
pub mod slots;
pub mod task;
mod upkeep;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::exec::pg::{self, DbProbe};
use crate::exec::ssh::{self as exssh, Ssh};
use crate::exec::vip;
use crate::ha::{Kind, Params, SyncFallback, VipSeen};
use crate::model::config::Config;
use crate::model::home::Home;
use crate::model::meta::Cluster;
use crate::store::MetaStore;
use act::Acted;
pub use act::{cstlb_all, meta_update_cluster, repoint_db, version_from_files, vip_of};
use checks::write_vip_seen;

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
    /// The last rounds' samples of every database, for the status page.
    pub history: Mutex<history::History>,
    pub counters: Counters,
    /// Whether this clupserver may act (the leader lease with etcd).
    pub gate: Arc<crate::monitor::leader::Gate>,
    /// Where state changes are recorded (GET /events, event_command).
    pub events: Arc<events::Events>,
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
            history: Mutex::new(history::History::new()),
            counters: Counters::default(),
            gate: Arc::new(crate::monitor::leader::Gate::always()),
            events: events::Events::off(),
            ifnames: Mutex::new(BTreeMap::new()),
            early_gathers: Arc::new(AtomicUsize::new(0)),
            last_ahead: Mutex::new(None),
            recent_addrs: ByHost::default(),
            host_checks: ByHost::default(),
            peer_checks: ByHost::default(),
            vip_checks: ByHost::default(),
        }
    }

    /// `host`'s interface for `vip` (the one in `network`, else the one
    /// that routes to `vip`): as seen within the last minute, else asked
    /// for over ssh.
    pub fn ifname(&self, host: &str, vip: std::net::Ipv4Addr) -> Result<String, String> {
        let m = self.ifnames.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, at)) = m.get(host) {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(n.clone());
            }
        }
        drop(m);
        let (n, _) = vip::find_interface(&self.ssh, host, self.cfg.network, vip)
            .map_err(|e| e.to_string())?;
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

    /// As [`Shared::new`], recording events in `events`.
    pub fn with_events(mut self, events: Arc<events::Events>) -> Shared {
        self.events = events;
        self
    }

    /// Record a state change (see [`events::Events::emit`]).
    pub fn emit(&self, e: crate::model::event::NewEvent) {
        self.events.emit(e);
    }

    pub fn params(&self) -> Params {
        Params {
            failover_max_lag: self.cfg.failover_max_lag,
            restart_tries: self.cfg.restart_tries,
            hung_timeout: self.cfg.hung_timeout.as_secs(),
            sync_fallback: if self.cfg.sync_block {
                SyncFallback::Block
            } else {
                SyncFallback::Async
            },
            auto_rewind: self.cfg.auto_rewind,
            use_slots: self.cfg.use_slots,
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
    /// Why the last restart of a database failed (its start log's PANIC
    /// or FATAL line), for the failover that follows the last try.
    restart_why: BTreeMap<u32, String>,
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
    /// Databases whose probes stall (see [`crate::ha::Facts::stalled_since`]).
    stalled_since: BTreeMap<u32, u64>,
    /// Databases whose probes fail: since when.
    failing_since: BTreeMap<u32, u64>,
    /// The standbys acknowledging the primary's WAL, and their flush
    /// positions last round (see [`crate::ha::acknowledgers`]).
    acks: std::collections::BTreeSet<String>,
    last_flush: BTreeMap<String, u64>,
    /// Since when synchronous_standby_names could not be met.
    sync_unmet_since: Option<u64>,
    /// When a rewind of a Fault standby was last started (auto_rewind).
    rewound_at: BTreeMap<u32, u64>,
    /// The replication slots' upkeep (use_slots).
    slots: slots::SlotMemory,
}

impl Memory {
    /// What an action makes the loop forget: after any, whether the write
    /// VIP sits on the primary; after a failover, the old topology.
    fn after(&mut self, acted: &Acted) {
        match acted {
            Acted::Calm | Acted::Held => {}
            Acted::Rewinding(id) => {
                self.rewound_at.insert(*id, crate::now_secs());
            }
            Acted::Restarted(ids) => {
                self.write_vip_seen_on = None;
                for (id, why) in ids {
                    *self.restarts.entry(*id).or_insert(0) += 1;
                    match why {
                        Some(w) => self.restart_why.insert(*id, w.clone()),
                        None => self.restart_why.remove(id),
                    };
                }
            }
            Acted::Ran(kind) => {
                self.write_vip_seen_on = None;
                self.slots.checked_at = 0;
                if *kind == Kind::Failover {
                    self.primary_last_lsn = None;
                    self.restarts.clear();
                    self.restart_why.clear();
                    self.not_streaming_since.clear();
                    self.stalled_since.clear();
                    self.failing_since.clear();
                    self.acks.clear();
                    self.last_flush.clear();
                    self.sync_unmet_since = None;
                }
            }
        }
    }
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

/// One round of a cluster's loop, by phase: probe, decide, act, and on a
/// calm round the upkeep. Each phase hands the next plain data.
fn round(shared: &Arc<Shared>, name: &str, cluster: &Cluster, mem: &mut Memory) {
    let t0 = Instant::now();
    let began = crate::now_secs();
    let probed = probe::probe(shared, name, cluster, mem, t0);
    probe::remember(shared, name, cluster, &probed.probes, mem, began);
    let (probes, mut facts) = probe::facts(probed, mem);
    let probed = t0.elapsed();

    let d = decide::settle(shared, name, cluster, &mut facts, t0, &mut mem.last_reason);
    let acted = act::act_on(shared, name, cluster, &d, &facts);
    mem.after(&acted);
    mem.last_reason = d.reason.clone();
    let primary_ok = d.reason.starts_with("no action: primary");
    publish(shared, name, cluster, probes, d.reason, t0);
    let decided = t0.elapsed();

    // A calm round ends by bringing cstlb and the write VIP in line; done
    // after the observation is published, which they must not delay.
    if acted == Acted::Calm && !cluster.is_frozen() && cluster.lock_time <= crate::now_secs() {
        upkeep::upkeep(shared, name, cluster, &facts, mem, primary_ok);
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

/// Serve what this round saw to clupadm and the HTTP API, and add it to
/// the status page's history.
fn publish(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    probes: BTreeMap<u32, DbProbe>,
    reason: String,
    t0: Instant,
) {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    history::record(
        &mut shared.history.lock().unwrap_or_else(|p| p.into_inner()),
        name,
        cluster,
        &probes,
        at_ms,
    );
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
