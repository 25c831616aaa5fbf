//! The event hub: where every place that makes or sees a state change
//! records it ([`Events::emit`]). It numbers the event, keeps it in the
//! ring of recent events served by `GET /events`, logs it, hands it to the
//! hook thread ([`super::hooks`]) and wakes the thread that saves the ring.
//!
//! It must never make the caller wait on a hook or on the disk: emit takes
//! one lock for a push and a channel send. The ring is saved to
//! `data/events.json` (atomically, the last [`RING_SIZE`] events) by a
//! thread of its own and once more at shutdown, so sequence numbers go on
//! after a restart. Hooks of events not yet run when clupserver stops are
//! not run after the restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::thread;

use super::hooks::Hooks;
use crate::ha::{Action, Decision};
use crate::model::config::Config;
use crate::model::event::{Event, EventKind, NewEvent, Ring, RING_SIZE};
use crate::model::meta::{Cluster, Db, CLUSTER_FAULT, DB_FAULT};

/// The file, under the data directory, that keeps the ring.
pub const EVENTS_FILE: &str = "events.json";

pub struct Events {
    ring: Mutex<Ring>,
    /// Where the ring is saved; None: kept in memory only.
    file: Option<PathBuf>,
    /// One save at a time (they share a temp file name).
    saving: Mutex<()>,
    /// Wakes the saver thread (a full channel means a save is due anyway).
    wake: Option<crossbeam_channel::Sender<()>>,
    hooks: Option<Hooks>,
}

impl Events {
    /// Events kept in memory only, with no hook (tests, tools).
    pub fn off() -> Arc<Events> {
        Arc::new(Events {
            ring: Mutex::new(Ring::default()),
            file: None,
            saving: Mutex::new(()),
            wake: None,
            hooks: None,
        })
    }

    /// The hub of a running clupserver: the ring loaded from
    /// `data_dir/events.json`, its saver thread, and the hook thread when
    /// `event_command` is set.
    pub fn start(cfg: &Config, data_dir: &std::path::Path) -> Arc<Events> {
        let file = data_dir.join(EVENTS_FILE);
        let ring = load(&file);
        let hooks = (!cfg.event_command.is_empty()).then(|| {
            log::info!(
                "Event hooks on: event_command runs for each event (at most {} s each).",
                cfg.event_timeout.as_secs()
            );
            Hooks::start(cfg.event_command.clone(), cfg.event_timeout, secrets(cfg))
        });
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let ev = Arc::new(Events {
            ring: Mutex::new(ring),
            file: Some(file),
            saving: Mutex::new(()),
            wake: Some(tx),
            hooks,
        });
        let weak: Weak<Events> = Arc::downgrade(&ev);
        let spawned = thread::Builder::new()
            .name("events-save".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    match weak.upgrade() {
                        Some(ev) => ev.save(),
                        None => return,
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!(
                "cannot start the thread saving events, they are saved at shutdown only: {e}"
            );
        }
        ev
    }

    /// Record `e`: number it, log it, queue its hook. Never blocks on a
    /// hook or the disk.
    pub fn emit(&self, e: NewEvent) -> Event {
        let ev = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let ev = ring.push(e, crate::now_secs());
            // Queued under the ring's lock: hooks run in sequence order
            // even when two threads record events at once.
            if let Some(h) = &self.hooks {
                h.enqueue(ev.clone());
            }
            ev
        };
        log::info!("Event {}", ev.line());
        if let Some(w) = &self.wake {
            let _ = w.try_send(());
        }
        ev
    }

    /// The recorded events with a sequence number above `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Event> {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since(seq)
    }

    /// At shutdown: no more hooks (the running one is killed; queued ones
    /// are never run, here or after a restart), and the ring saved.
    pub fn shutdown(&self) {
        if let Some(h) = &self.hooks {
            let left = h.stop();
            if left > 0 {
                log::warn!(
                    "{left} event hook(s) not run (clupserver stops; they are not run after a restart): GET /events has their events"
                );
            }
        }
        self.save();
    }

    /// Save the ring now (at shutdown; the saver thread calls it too).
    pub fn save(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let _one = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let text = self
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_json();
        if let Err(e) = crate::store::write_atomic(file, text.as_bytes()) {
            log::error!("cannot save the events to {}: {e}", file.display());
        }
    }
}

/// A failover's begin event: the old primary (the decision's subject) and
/// the standby the plan promotes.
pub(super) fn failover_begin(name: &str, cluster: &Cluster, d: &Decision) -> NewEvent {
    let old = d.subject.and_then(|id| cluster.db(id));
    let new = d.plan.iter().find_map(|a| match a {
        Action::Promote { id } | Action::AddWriteVip { id } => cluster.db(*id),
        _ => None,
    });
    let mut e = NewEvent::new(EventKind::FailoverBegin, name).primaries(
        &old.map(Db::addr).unwrap_or_default(),
        &new.map(Db::addr).unwrap_or_default(),
    );
    if let Some(o) = old {
        e = e.db(o.id, &o.host);
    }
    e
}

/// The event a step of a plan for cluster `name` makes once it
/// succeeded, if any: fences, promotions and what the meta marks Fault.
/// `cluster` is the meta the plan was decided on; `reason` the decision's.
pub(super) fn of_step(name: &str, cluster: &Cluster, reason: &str, a: &Action) -> Option<NewEvent> {
    let about = |kind, id: u32| {
        let host = cluster.db(id).map(|d| d.host.clone()).unwrap_or_default();
        NewEvent::new(kind, name).db(id, &host)
    };
    let addr = |id: u32| cluster.db(id).map(Db::addr).unwrap_or_default();
    Some(match a {
        Action::Fence { id } => about(EventKind::Fence, *id)
            .reason("stopped (fast) and its write vip taken away so that it cannot take writes"),
        Action::KillDb { id } => about(EventKind::Fence, *id).reason(
            "killed (kill -9 of its postmaster and children) so that it cannot take writes",
        ),
        Action::Promote { id } => about(EventKind::Promote, *id)
            .primaries(
                &cluster.primary().map(Db::addr).unwrap_or_default(),
                &addr(*id),
            )
            .reason(reason),
        Action::MetaPrimary { id, old } => about(EventKind::Fault, *old)
            .primaries(&addr(*old), &addr(*id))
            .reason(&format!(
                "marked Fault: database({}) is the primary now",
                addr(*id)
            )),
        Action::MetaDbState { id, state } if *state == DB_FAULT => {
            about(EventKind::Fault, *id).reason(reason)
        }
        Action::MetaClusterState { state } if *state == CLUSTER_FAULT => {
            NewEvent::new(EventKind::Fault, name)
                .reason(&format!("cluster marked Fault: {}", reason))
        }
        _ => return None,
    })
}

/// The ring saved in `file`; an empty one when there is none. A file that
/// cannot be read is set aside (never deleted) and the ring starts empty.
fn load(file: &std::path::Path) -> Ring {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ring::default(),
        Err(e) => {
            log::error!("cannot read {}: {e}; events start afresh", file.display());
            return Ring::default();
        }
    };
    match Ring::from_json(&text) {
        Ok(r) => {
            log::info!(
                "Loaded {} events (of the last {RING_SIZE}) from {}; the next is number {}.",
                r.events.len(),
                file.display(),
                r.next_seq.max(1)
            );
            r
        }
        Err(e) => {
            let aside = file.with_extension(format!("json.bad-{}", crate::now_secs()));
            let _ = std::fs::rename(file, &aside);
            log::error!(
                "{} is not a saved event ring ({e}); set aside as {}, events start afresh",
                file.display(),
                aside.display()
            );
            Ring::default()
        }
    }
}

/// Every secret of clup.conf, kept out of the hooks' logged output.
fn secrets(cfg: &Config) -> Vec<String> {
    [
        &cfg.ha_rpc_pass,
        &cfg.probe_password,
        &cfg.ha_db_pass,
        &cfg.db_repl_pass,
        &cfg.http_token,
        &cfg.cstlb_token,
    ]
    .iter()
    .map(|s| s.expose().to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::EventKind;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "network = 127.0.0.0\nha_rpc_pass = rpc-pass-1\nprobe_user = p\nprobe_password = x1\n\
             ha_db_user = u\nha_db_pass = x2\ndb_repl_user = r\ndb_repl_pass = x3\n\
             http_token = tok-4\ncstlb_token = tok-5\n{extra}"
        );
        Config::parse(&text, std::path::Path::new("/t/clup.conf")).unwrap()
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("clup-events-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn numbers_go_on_after_a_reload_and_since_filters() {
        let dir = temp("reload");
        let ev = Events::start(&cfg(""), &dir);
        for _ in 0..3 {
            ev.emit(NewEvent::new(EventKind::Froze, "cluster01"));
        }
        ev.save();
        drop(ev);
        // Its saver thread may be saving still (it ends after that save):
        // one hub per file, as in clupserver.
        thread::sleep(std::time::Duration::from_millis(300));
        let again = Events::start(&cfg(""), &dir);
        let seqs = |v: Vec<Event>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(again.since(0)), [1, 2, 3]);
        let e = again.emit(NewEvent::new(EventKind::Unfroze, "cluster01"));
        assert_eq!(e.seq, 4);
        assert_eq!(seqs(again.since(2)), [3, 4]);
        assert_eq!(again.since(2)[1].event, "unfroze");
        // The saver thread writes without being asked.
        let saved = (0..100).any(|_| {
            thread::sleep(std::time::Duration::from_millis(20));
            std::fs::read_to_string(dir.join(EVENTS_FILE))
                .ok()
                .and_then(|t| Ring::from_json(&t).ok())
                .is_some_and(|r| r.next_seq == 5)
        });
        assert!(saved);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failover_plan_maps_to_its_events() {
        let clusters =
            crate::model::meta::parse_clusters(include_str!("../../tests/data/init.json")).unwrap();
        let c = &clusters["cluster01"];
        let d = Decision {
            kind: crate::ha::Kind::Failover,
            plan: vec![
                Action::Promote { id: 2 },
                Action::MetaPrimary { id: 2, old: 1 },
            ],
            reason: "primary down\nswitch".to_string(),
            subject: Some(1),
        };
        let begin = failover_begin("cluster01", c, &d);
        assert_eq!(begin.kind, EventKind::FailoverBegin);
        assert_eq!(begin.db_id, Some(1));
        assert_eq!(
            (begin.old_primary.as_str(), begin.new_primary.as_str()),
            ("127.0.56.41:5432", "127.0.56.42:5432")
        );
        let promote = of_step("cluster01", c, "primary down", &d.plan[0]).unwrap();
        assert_eq!(promote.kind, EventKind::Promote);
        assert_eq!(
            (promote.db_id, promote.host.as_str()),
            (Some(2), "127.0.56.42")
        );
        assert_eq!(promote.old_primary, "127.0.56.41:5432");
        assert_eq!(promote.reason, "primary down");
        let fault = of_step("cluster01", c, "", &d.plan[1]).unwrap();
        assert_eq!((fault.kind, fault.db_id), (EventKind::Fault, Some(1)));
        let fence = of_step("cluster01", c, "", &Action::KillDb { id: 1 }).unwrap();
        assert_eq!(
            (fence.kind, fence.host.as_str()),
            (EventKind::Fence, "127.0.56.41")
        );
        let standby_fault = Action::MetaDbState {
            id: 3,
            state: DB_FAULT,
        };
        assert_eq!(
            of_step("cluster01", c, "down", &standby_fault).map(|e| (e.kind, e.db_id)),
            Some((EventKind::Fault, Some(3)))
        );
        let normal = Action::MetaDbState {
            id: 3,
            state: crate::model::meta::DB_NORMAL,
        };
        assert!(of_step("cluster01", c, "", &normal).is_none());
        assert!(of_step("cluster01", c, "", &Action::AddWriteVip { id: 2 }).is_none());
    }

    #[test]
    fn a_bad_events_file_is_set_aside_not_lost() {
        let dir = temp("bad");
        std::fs::write(dir.join(EVENTS_FILE), "{ not json").unwrap();
        let ev = Events::start(&cfg(""), &dir);
        assert_eq!(ev.emit(NewEvent::new(EventKind::Fault, "c")).seq, 1);
        let aside = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.json.bad-")
            });
        assert!(aside);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn emitted_events_reach_the_hook_with_their_numbers() {
        let dir = temp("hook");
        let out = dir.join("out");
        let c = cfg(&format!(
            "event_command = echo \"$CLUP_EVENT_SEQ $CLUP_EVENT $CLUP_CLUSTER\" >> {}\nevent_timeout = 5\n",
            out.display()
        ));
        assert_eq!(secrets(&c).len(), 6);
        let ev = Events::start(&c, &dir);
        ev.emit(NewEvent::new(EventKind::Froze, "cluster01"));
        ev.emit(NewEvent::new(EventKind::Unfroze, "cluster01"));
        let want = "1 froze cluster01\n2 unfroze cluster01\n";
        let ok = (0..200).any(|_| {
            thread::sleep(std::time::Duration::from_millis(20));
            std::fs::read_to_string(&out).is_ok_and(|t| t == want)
        });
        assert!(ok, "{:?}", std::fs::read_to_string(&out));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
