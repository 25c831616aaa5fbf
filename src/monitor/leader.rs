//! Which clupserver acts: with `meta_store = etcd` every clupserver
//! campaigns for the leader lease (etcd::Campaign) and only the holder
//! probes-and-acts and writes the meta; the others load the meta each round
//! and stand by. With the file store there is one clupserver and it always
//! acts.
//!
//! Owns: the [`Gate`] (am I leading, and who is) with its campaign thread,
//! and [`GatedStore`], the meta store every writer in this process uses: a
//! save is fenced on the lease (a stale leader's save fails in etcd), and a
//! follower's save is refused here with the leader's name.
//!
//! Must not: decide anything about clusters. A leader that cannot renew stops
//! acting by its own clock before the lease can expire on etcd's side
//! (`Leader::may_act_for`), so even a hung campaign thread cannot leave two
//! actors. Losing etcd never touches the databases: nobody acts, loudly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::model::config::{Config, StoreKind};
use crate::model::event::{EventKind, NewEvent};
use crate::model::home::Home;
use crate::store::etcd::{self, Campaign, Elected, EtcdStore, Leader};
use crate::store::{open_store, MetaDoc, MetaStore, StoreError};

/// What this process knows about leadership.
#[derive(Default)]
struct State {
    leader: Option<Arc<Leader>>,
    /// Who holds the key when we do not (None: nobody, or unknown).
    other: Option<String>,
    /// The last etcd error of the campaign, logged once per change.
    error: Option<String>,
}

pub struct Gate {
    /// None: the file store, always acting.
    campaign: Option<Campaign>,
    ttl: Duration,
    id: String,
    state: Mutex<State>,
}

impl Gate {
    /// A gate that is always open (one clupserver, file store).
    pub fn always() -> Gate {
        Gate {
            campaign: None,
            ttl: Duration::ZERO,
            id: String::new(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether monitors are elected (etcd) rather than alone (file store).
    pub fn is_elected(&self) -> bool {
        self.campaign.is_some()
    }

    /// When this clupserver does not lead: who does (its `host:port`), if
    /// known. None when it leads or with the file store.
    pub fn not_leading(&self) -> Option<Option<String>> {
        if self.may_act() {
            return None;
        }
        Some(self.state().other.clone())
    }

    /// This clupserver's name in the leader key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the last call to etcd (campaign or renewal) worked.
    pub fn etcd_ok(&self) -> bool {
        self.state().error.is_none()
    }

    /// Whether this clupserver may probe-and-act now.
    pub fn may_act(&self) -> bool {
        self.campaign.is_none() || self.leader().is_some()
    }

    /// The lease, while it is still safely ours.
    fn leader(&self) -> Option<Arc<Leader>> {
        self.state()
            .leader
            .clone()
            .filter(|l| !l.may_act_for().is_zero())
    }

    /// "leader", or "follower (leader: X)": for logs, status and show.
    pub fn role(&self) -> String {
        if self.campaign.is_none() {
            return "leader (file store: the only monitor)".to_string();
        }
        if self.leader().is_some() {
            return format!("leader ({})", self.id);
        }
        match &self.state().other {
            Some(o) => format!("follower ({}; leader: {o})", self.id),
            None => format!("follower ({}; no leader)", self.id),
        }
    }

    /// One step of the campaign: renew the lease we hold, or try to take
    /// it. Returns how long to wait before the next step.
    pub fn step(&self) -> Duration {
        let Some(c) = &self.campaign else {
            return Duration::from_secs(3600);
        };
        let held = self.state().leader.clone();
        if let Some(l) = held {
            match l.keepalive() {
                Ok(true) => self.state().error = None,
                Ok(false) => return self.lose("the lease is gone"),
                Err(e) => self.note_error(&format!("cannot renew the leader lease: {e}")),
            }
            if l.may_act_for().is_zero() {
                return self.lose("no renewal in time");
            }
            return l.keepalive_every();
        }
        // A follower asks often (one small read): when the lease expires it
        // should take over at once, not up to a third of a lease later.
        let retry = (self.ttl / 10).max(Duration::from_millis(200));
        match c.try_acquire() {
            Ok(Elected::Won(l)) => {
                log::warn!(
                    "clupserver {} now leads (lease {} s): it probes and acts",
                    self.id,
                    l.ttl().as_secs()
                );
                let mut st = self.state();
                st.leader = Some(Arc::new(l));
                st.other = None;
                st.error = None;
                Duration::ZERO
            }
            Ok(Elected::Lost(h)) => {
                let mut st = self.state();
                if st.other.as_deref() != Some(h.id.as_str()) {
                    log::info!("clupserver {} stands by: {} leads", self.id, h.id);
                }
                st.other = Some(h.id);
                st.error = None;
                retry
            }
            Err(e) => {
                self.state().other = None;
                self.note_error(&format!(
                    "cannot reach etcd, nobody can lead (the databases are left as they are): {e}"
                ));
                retry
            }
        }
    }

    /// Stop acting: the lease is gone or could not be renewed in time.
    fn lose(&self, why: &str) -> Duration {
        log::error!(
            "clupserver {} lost the leader lease ({why}): it stops acting now; the databases are left as they are",
            self.id
        );
        self.state().leader = None;
        Duration::ZERO
    }

    fn note_error(&self, m: &str) {
        let mut st = self.state();
        if st.error.as_deref() != Some(m) {
            log::error!("clupserver {}: {m}", self.id);
            st.error = Some(m.to_string());
        }
    }

    /// Give the lease back (clean stop), so a follower takes over at once.
    pub fn resign(&self) {
        if let Some(l) = self.state().leader.take() {
            if let Err(e) = l.resign() {
                log::warn!("clupserver {}: resigning the lease: {e}", self.id);
            }
        }
    }
}

/// The meta store of a process with a gate: saves fenced on the lease.
pub struct GatedStore {
    store: Arc<EtcdStore>,
    gate: Arc<Gate>,
}

impl MetaStore for GatedStore {
    fn load(&self) -> Result<MetaDoc, StoreError> {
        self.store.load()
    }
    fn save(&self, doc: &MetaDoc) -> Result<u64, StoreError> {
        match self.gate.leader() {
            Some(l) => self.store.save_fenced(doc, &l),
            None => Err(StoreError::NotLeader(format!(
                "clupserver {} does not lead, so it changes nothing; {}",
                self.gate.id,
                match &self.gate.state().other {
                    Some(o) => format!("ask the leader, {o}"),
                    None => "no clupserver leads now".to_string(),
                }
            ))),
        }
    }
    fn exists(&self) -> Result<bool, StoreError> {
        self.store.exists()
    }
    fn set_aside_corrupt(&self) -> Result<String, StoreError> {
        self.store.set_aside_corrupt()
    }
    fn describe(&self) -> String {
        format!(
            "{} (writes fenced on the leader lease)",
            self.store.describe()
        )
    }
}

/// This clupserver's name in the leader key, which is also where clupadm
/// reaches it: `http_listen:http_port`, or the host name when it listens
/// on every address.
fn my_id(cfg: &Config) -> String {
    if !cfg.http_listen.is_unspecified() {
        return format!("{}:{}", cfg.http_listen, cfg.http_port);
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "unknown-host".to_string()
    };
    format!("{host}:{}", cfg.http_port)
}

/// The store and gate of a clupserver: the file store with an open gate, or
/// etcd with a campaign.
pub fn open(cfg: &Config, home: &Home) -> Result<(Arc<dyn MetaStore>, Arc<Gate>), String> {
    if cfg.meta_store != StoreKind::Etcd {
        return Ok((open_store(cfg, home)?, Arc::new(Gate::always())));
    }
    let client = Arc::new(etcd::Client::new(&cfg.etcd_endpoints, cfg.etcd_timeout)?);
    let store = Arc::new(EtcdStore::new(client.clone(), &cfg.etcd_prefix));
    let id = my_id(cfg);
    let gate = Arc::new(Gate {
        campaign: Some(Campaign::new(client, &cfg.etcd_prefix, &id, cfg.leader_ttl)),
        ttl: cfg.leader_ttl,
        id,
        state: Mutex::new(State::default()),
    });
    let gated = GatedStore {
        store,
        gate: gate.clone(),
    };
    Ok((Arc::new(gated), gate))
}

/// The file under the run directory where a clupserver with etcd keeps its
/// role for `clupserver status`.
pub const ROLE_FILE: &str = "role";

/// Run the campaign until `stop`, then resign. The role is written to
/// `run_dir/role` whenever it changes (and removed at the end).
pub fn start(
    gate: Arc<Gate>,
    stop: Arc<AtomicBool>,
    run_dir: std::path::PathBuf,
    events: Arc<crate::monitor::events::Events>,
) -> Option<thread::JoinHandle<()>> {
    gate.campaign.as_ref()?;
    let role_file = run_dir.join(ROLE_FILE);
    let h = thread::Builder::new()
        .name("leader".into())
        .spawn(move || {
            let mut shown = String::new();
            while !stop.load(Ordering::Relaxed) {
                let wait = gate.step();
                let role = gate.role();
                if role != shown {
                    if let Err(e) = crate::store::write_atomic(&role_file, role.as_bytes()) {
                        log::warn!("cannot write {}: {e}", role_file.display());
                    }
                    events.emit(
                        NewEvent::new(EventKind::LeaderChange, "")
                            .host(gate.id())
                            .reason(&format!("this clupserver is now {role}")),
                    );
                    shown = role;
                }
                let end = std::time::Instant::now() + wait;
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            gate.resign();
            let _ = std::fs::remove_file(&role_file);
        })
        .expect("spawn the leader thread");
    Some(h)
}
