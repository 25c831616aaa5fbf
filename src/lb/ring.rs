//! The backend ring: which backends cstlb spreads connections over, in which
//! order, whether each is healthy, and the round-robin cursor.
//!
//! Pure data. It owns no socket, reads no clock and starts no thread: the
//! health checker, the clupserver refresher, the management API and the proxy
//! workers tell it what they saw and it answers what changed, as text to log.
//!
//! Backends are kept in insertion order and form a ring (the manual's
//! `NextAddress`/`PreAddress`). State codes, as `GET /backend/list` and
//! `GET /backend/stats` show them:
//! - [`STATE_HEALTHY`] 0: in use;
//! - [`STATE_UNHEALTHY`] 1: failed a health check (or a connect): skipped until
//!   it passes [`RISE`] checks in a row;
//! - [`STATE_DELETED`] 2: removed from the ring while proxied connections to it
//!   are still open (only `/backend/stats` shows these; they get no new ones).
//!
//! Reconcile rule (clupserver's list against API deletes): clupserver's list
//! is the truth on each refresh — listed backends are added, unlisted ones
//! removed (also ones added through the API) — except that a backend deleted
//! through the management API stays out ("tombstone") for as long as
//! clupserver keeps listing it. The tombstone ends when the API adds the
//! backend back, or when a refresh no longer lists it (so a later list that
//! names it again brings it back: Fault then repaired). This keeps a backend
//! that clupserver has just removed from coming back through a refresh that
//! raced with clupserver saving the Fault state.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

pub type Addr = SocketAddrV4;

pub const STATE_HEALTHY: u8 = 0;
pub const STATE_UNHEALTHY: u8 = 1;
pub const STATE_DELETED: u8 = 2;

/// Good checks in a row an unhealthy backend needs before it is used again
/// (a restarting PostgreSQL answers the handshake before it takes sessions).
pub const RISE: u32 = 2;
/// Failed checks that take a healthy backend out of use: one, because the
/// check is a bounded TCP connect plus the PostgreSQL SSLRequest handshake,
/// and a client sent to a dead standby waits for its connect timeout.
pub const FALL: u32 = 1;

/// Parse a backend as the management API and clupserver give it: `a.b.c.d:port`.
pub fn parse_backend(s: &str) -> Result<Addr, String> {
    if s.is_empty() {
        return Err("empty backend (expected IPv4:port, e.g. 10.0.0.42:5432)".into());
    }
    if s.len() > 21 {
        return Err("backend too long (expected IPv4:port, e.g. 10.0.0.42:5432)".into());
    }
    let a: Addr = s
        .parse()
        .map_err(|_| "not an IPv4:port address (e.g. 10.0.0.42:5432)".to_string())?;
    if a.port() == 0 {
        return Err("port 0 is not a valid backend port".into());
    }
    if a.ip().is_unspecified() || a.ip().is_broadcast() || a.ip().is_multicast() {
        return Err(format!("{} is not a unicast address", a.ip()));
    }
    // Canonical form only: "010.0.0.1:5432" or "10.0.0.1:05432" would make
    // two names for one backend.
    if a.to_string() != s {
        return Err(format!("not in canonical form (did you mean {a}?)"));
    }
    Ok(a)
}

/// Counters shared between the ring and the proxied connections to one
/// backend; a connection keeps them after its backend left the ring.
#[derive(Debug, Default)]
pub struct Counters {
    /// Proxied sessions open now (counted from the connect attempt).
    pub active: AtomicU64,
    /// Sessions whose backend connect succeeded.
    pub total: AtomicU64,
    pub connect_failures: AtomicU64,
    pub check_failures: AtomicU64,
}

/// Health of one backend: the pure state machine the checker drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Good checks in a row while unhealthy; failed ones while healthy.
    pub streak: u32,
}

impl Health {
    pub const NEW: Health = Health {
        healthy: true,
        streak: 0,
    };
}

/// The next health after one check; the bool says whether `healthy` flipped.
pub fn next_health(h: Health, ok: bool) -> (Health, bool) {
    match (h.healthy, ok) {
        (true, true) => (Health::NEW, false),
        (true, false) if h.streak + 1 >= FALL => (
            Health {
                healthy: false,
                streak: 0,
            },
            true,
        ),
        (true, false) => (
            Health {
                healthy: true,
                streak: h.streak + 1,
            },
            false,
        ),
        (false, true) if h.streak + 1 >= RISE => (Health::NEW, true),
        (false, true) => (
            Health {
                healthy: false,
                streak: h.streak + 1,
            },
            false,
        ),
        (false, false) => (
            Health {
                healthy: false,
                streak: 0,
            },
            false,
        ),
    }
}

#[derive(Debug)]
struct Backend {
    addr: Addr,
    health: Health,
    counters: Arc<Counters>,
}

/// What `add`/`delete` did, for the API's note.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    AlreadyThere,
    NotThere,
}

#[derive(Debug, Default)]
pub struct Ring {
    backends: Vec<Backend>,
    cursor: usize,
    tombstones: BTreeSet<Addr>,
    /// Removed from the ring with sessions still open: kept for stats.
    retired: Vec<(Addr, Arc<Counters>)>,
}

impl Ring {
    pub fn new() -> Ring {
        Ring::default()
    }

    pub fn addrs(&self) -> Vec<Addr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    pub fn contains(&self, a: Addr) -> bool {
        self.backends.iter().any(|b| b.addr == a)
    }

    pub fn healthy_count(&self) -> usize {
        self.backends.iter().filter(|b| b.health.healthy).count()
    }

    fn push(&mut self, a: Addr) {
        // A backend coming back while old sessions drain keeps its counters.
        let counters = match self.retired.iter().position(|(r, _)| *r == a) {
            Some(i) => self.retired.remove(i).1,
            None => Arc::new(Counters::default()),
        };
        self.backends.push(Backend {
            addr: a,
            health: Health::NEW,
            counters,
        });
    }

    fn remove(&mut self, a: Addr) -> bool {
        let Some(i) = self.backends.iter().position(|b| b.addr == a) else {
            return false;
        };
        let b = self.backends.remove(i);
        if i < self.cursor {
            self.cursor -= 1;
        }
        if b.counters.active.load(Ordering::Relaxed) > 0 {
            self.retired.push((b.addr, b.counters));
        }
        true
    }

    /// Management API add: (re)enable `a`, ending any tombstone.
    pub fn add(&mut self, a: Addr) -> Outcome {
        self.tombstones.remove(&a);
        if self.contains(a) {
            return Outcome::AlreadyThere;
        }
        self.push(a);
        Outcome::Done
    }

    /// Management API delete: no new sessions to `a`; open ones go on.
    pub fn delete(&mut self, a: Addr) -> Outcome {
        self.tombstones.insert(a);
        if self.remove(a) {
            Outcome::Done
        } else {
            Outcome::NotThere
        }
    }

    /// Apply clupserver's list (see the module comment); lines to log.
    pub fn reconcile(&mut self, list: &[Addr]) -> Vec<String> {
        let mut log = Vec::new();
        let listed: BTreeSet<Addr> = list.iter().copied().collect();
        let ended: Vec<Addr> = self.tombstones.difference(&listed).copied().collect();
        for a in ended {
            self.tombstones.remove(&a);
        }
        for a in self.addrs() {
            if !listed.contains(&a) {
                self.remove(a);
                log.push(format!(
                    "Remove backend({a}): clupserver no longer lists it."
                ));
            }
        }
        for &a in list {
            if self.contains(a) {
                continue;
            }
            if self.tombstones.contains(&a) {
                continue;
            }
            self.push(a);
            log.push(format!("Add backend({a}): listed by clupserver."));
        }
        log
    }

    /// The next healthy backend in ring order, not in `exclude`.
    pub fn pick(&mut self, exclude: &[Addr]) -> Option<(Addr, Arc<Counters>)> {
        let n = self.backends.len();
        for i in 0..n {
            let idx = (self.cursor + i) % n;
            let b = &self.backends[idx];
            if b.health.healthy && !exclude.contains(&b.addr) {
                self.cursor = (idx + 1) % n;
                return Some((b.addr, b.counters.clone()));
            }
        }
        None
    }

    /// A health check result; a line to log when the state changed.
    pub fn record_check(&mut self, a: Addr, ok: bool, detail: &str) -> Option<String> {
        let b = self.backends.iter_mut().find(|b| b.addr == a)?;
        if !ok {
            b.counters.check_failures.fetch_add(1, Ordering::Relaxed);
        }
        let (h, flipped) = next_health(b.health, ok);
        b.health = h;
        match (flipped, h.healthy) {
            (true, true) => Some(format!("Backend({a}) is healthy again, back in use.")),
            (true, false) => Some(format!(
                "Backend({a}) failed health check ({detail}), skipped."
            )),
            _ => None,
        }
    }

    /// A proxy connect to `a` failed: take it out of use now rather than at
    /// the next check; the checker brings it back.
    pub fn record_connect_failure(&mut self, a: Addr, detail: &str) -> Option<String> {
        let b = self.backends.iter_mut().find(|b| b.addr == a)?;
        if !b.health.healthy {
            return None;
        }
        b.health = Health {
            healthy: false,
            streak: 0,
        };
        Some(format!(
            "Backend({a}) refused a connection ({detail}), skipped."
        ))
    }

    /// `GET /backend/list`: exactly the manual's shape, in ring order.
    pub fn list_json(&self) -> String {
        let n = self.backends.len();
        let mut out = String::from("{");
        for (i, b) in self.backends.iter().enumerate() {
            let next = self.backends[(i + 1) % n].addr;
            let pre = self.backends[(i + n - 1) % n].addr;
            if i > 0 {
                out.push(',');
            }
            let state = if b.health.healthy {
                STATE_HEALTHY
            } else {
                STATE_UNHEALTHY
            };
            out.push_str(&format!(
                "\"{}\":{{\"State\":{state},\"NextAddress\":\"{next}\",\"PreAddress\":\"{pre}\"}}",
                b.addr
            ));
        }
        out.push('}');
        out
    }

    /// `GET /backend/stats`: ring members, then retired ones still draining.
    pub fn stats_json(&mut self) -> Value {
        self.retired
            .retain(|(_, c)| c.active.load(Ordering::Relaxed) > 0);
        let one = |state: u8, healthy: bool, c: &Counters| {
            let cf = c.connect_failures.load(Ordering::Relaxed);
            let hf = c.check_failures.load(Ordering::Relaxed);
            json!({
                "State": state,
                "healthy": healthy,
                "active": c.active.load(Ordering::Relaxed),
                "total": c.total.load(Ordering::Relaxed),
                "failures": cf + hf,
                "connect_failures": cf,
                "check_failures": hf,
            })
        };
        let mut m = Map::new();
        for b in &self.backends {
            let state = if b.health.healthy {
                STATE_HEALTHY
            } else {
                STATE_UNHEALTHY
            };
            m.insert(
                b.addr.to_string(),
                one(state, b.health.healthy, &b.counters),
            );
        }
        for (a, c) in &self.retired {
            m.insert(a.to_string(), one(STATE_DELETED, false, c));
        }
        let deleted: Vec<String> = self.tombstones.iter().map(|a| a.to_string()).collect();
        json!({"backends": m, "deleted_via_api": deleted})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Addr {
        parse_backend(s).unwrap()
    }

    fn ring(list: &[&str]) -> Ring {
        let mut r = Ring::new();
        for s in list {
            assert_eq!(r.add(a(s)), Outcome::Done);
        }
        r
    }

    #[test]
    fn list_has_the_manuals_shape() {
        let mut r = ring(&[
            "192.168.56.41:5432",
            "192.168.56.43:5432",
            "192.168.56.44:5432",
        ]);
        assert_eq!(
            r.list_json(),
            r#"{"192.168.56.41:5432":{"State":0,"NextAddress":"192.168.56.43:5432","PreAddress":"192.168.56.44:5432"},"192.168.56.43:5432":{"State":0,"NextAddress":"192.168.56.44:5432","PreAddress":"192.168.56.41:5432"},"192.168.56.44:5432":{"State":0,"NextAddress":"192.168.56.41:5432","PreAddress":"192.168.56.43:5432"}}"#
        );
        assert_eq!(r.delete(a("192.168.56.44:5432")), Outcome::Done);
        assert_eq!(
            r.list_json(),
            r#"{"192.168.56.41:5432":{"State":0,"NextAddress":"192.168.56.43:5432","PreAddress":"192.168.56.43:5432"},"192.168.56.43:5432":{"State":0,"NextAddress":"192.168.56.41:5432","PreAddress":"192.168.56.41:5432"}}"#
        );
        // Added back: it goes to the end of the ring, as in the manual.
        assert_eq!(r.add(a("192.168.56.44:5432")), Outcome::Done);
        assert!(r.list_json().starts_with(
            r#"{"192.168.56.41:5432":{"State":0,"NextAddress":"192.168.56.43:5432","PreAddress":"192.168.56.44:5432"}"#
        ));
    }

    #[test]
    fn single_backend_points_to_itself_and_empty_is_empty() {
        let mut r = ring(&["10.0.0.1:5432"]);
        assert_eq!(
            r.list_json(),
            r#"{"10.0.0.1:5432":{"State":0,"NextAddress":"10.0.0.1:5432","PreAddress":"10.0.0.1:5432"}}"#
        );
        r.delete(a("10.0.0.1:5432"));
        assert_eq!(r.list_json(), "{}");
        let v: Value = serde_json::from_str(&r.list_json()).unwrap();
        assert_eq!(v, json!({}));
    }

    #[test]
    fn add_and_delete_are_idempotent() {
        let mut r = ring(&["10.0.0.1:5432"]);
        assert_eq!(r.add(a("10.0.0.1:5432")), Outcome::AlreadyThere);
        assert_eq!(r.delete(a("10.0.0.2:5432")), Outcome::NotThere);
        assert_eq!(r.delete(a("10.0.0.1:5432")), Outcome::Done);
        assert_eq!(r.delete(a("10.0.0.1:5432")), Outcome::NotThere);
        assert!(r.addrs().is_empty());
    }

    #[test]
    fn round_robin_skips_unhealthy_and_excluded() {
        let mut r = ring(&["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
        let picks: Vec<String> = (0..6).map(|_| r.pick(&[]).unwrap().0.to_string()).collect();
        assert_eq!(
            picks,
            [
                "10.0.0.1:1",
                "10.0.0.2:1",
                "10.0.0.3:1",
                "10.0.0.1:1",
                "10.0.0.2:1",
                "10.0.0.3:1"
            ]
        );
        assert!(r.record_check(a("10.0.0.2:1"), false, "refused").is_some());
        let picks: Vec<String> = (0..4).map(|_| r.pick(&[]).unwrap().0.to_string()).collect();
        assert_eq!(
            picks,
            ["10.0.0.1:1", "10.0.0.3:1", "10.0.0.1:1", "10.0.0.3:1"]
        );
        assert_eq!(r.pick(&[a("10.0.0.1:1")]).unwrap().0, a("10.0.0.3:1"));
        assert!(r.pick(&[a("10.0.0.1:1"), a("10.0.0.3:1")]).is_none());
        assert!(r.list_json().contains(r#""10.0.0.2:1":{"State":1,"#));
    }

    #[test]
    fn health_transitions() {
        // Healthy -> unhealthy after FALL failures; back after RISE successes.
        let mut h = Health::NEW;
        let mut flips = Vec::new();
        for ok in [true, false, false, true, false, true, true, true] {
            let (n, f) = next_health(h, ok);
            h = n;
            flips.push((h.healthy, f));
        }
        assert_eq!(
            flips,
            [
                (true, false),
                (false, true),
                (false, false),
                (false, false),
                (false, false),
                (false, false),
                (true, true),
                (true, false)
            ]
        );
        let mut r = ring(&["10.0.0.1:1"]);
        let x = a("10.0.0.1:1");
        assert!(r.record_connect_failure(x, "refused").is_some());
        assert!(r.record_connect_failure(x, "refused").is_none());
        assert!(r.pick(&[]).is_none());
        assert!(r.record_check(x, true, "").is_none());
        assert_eq!(
            r.record_check(x, true, "").as_deref(),
            Some("Backend(10.0.0.1:1) is healthy again, back in use.")
        );
        assert_eq!(r.pick(&[]).unwrap().0, x);
        // Unknown backends are ignored.
        assert!(r.record_check(a("10.9.9.9:1"), false, "").is_none());
    }

    #[test]
    fn reconcile_follows_clupserver_but_honours_api_deletes() {
        let (x, y, z) = (a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1"));
        let mut r = Ring::new();
        assert_eq!(r.reconcile(&[x, y]).len(), 2);
        assert_eq!(r.addrs(), [x, y]);
        // API delete sticks while clupserver still lists it.
        r.delete(y);
        assert!(r.reconcile(&[x, y]).is_empty());
        assert_eq!(r.addrs(), [x]);
        // API add not listed by clupserver: removed at the next refresh.
        r.add(z);
        assert_eq!(r.addrs(), [x, z]);
        assert_eq!(
            r.reconcile(&[x, y]),
            ["Remove backend(10.0.0.3:1): clupserver no longer lists it."]
        );
        assert_eq!(r.addrs(), [x]);
        // clupserver drops y (Fault) and lists it again (repaired): back.
        r.reconcile(&[x]);
        assert_eq!(r.addrs(), [x]);
        r.reconcile(&[x, y]);
        assert_eq!(r.addrs(), [x, y]);
        // API add ends a tombstone at once.
        r.delete(x);
        r.add(x);
        r.reconcile(&[x, y]);
        assert_eq!(r.addrs(), [y, x]);
        // Existing order is kept; new ones go to the end in list order.
        r.reconcile(&[z, x, y]);
        assert_eq!(r.addrs(), [y, x, z]);
        assert_eq!(r.reconcile(&[]).len(), 3);
        assert!(r.addrs().is_empty());
    }

    #[test]
    fn deleted_backend_with_open_sessions_shows_in_stats() {
        let mut r = ring(&["10.0.0.1:1", "10.0.0.2:1"]);
        let (addr, c) = r.pick(&[]).unwrap();
        c.active.fetch_add(1, Ordering::Relaxed);
        r.delete(addr);
        let s = r.stats_json();
        assert_eq!(
            s["backends"][addr.to_string()]["State"],
            json!(STATE_DELETED)
        );
        assert_eq!(s["backends"][addr.to_string()]["active"], json!(1));
        assert_eq!(s["deleted_via_api"], json!([addr.to_string()]));
        c.active.fetch_sub(1, Ordering::Relaxed);
        let s = r.stats_json();
        assert!(s["backends"].get(addr.to_string()).is_none());
        assert_eq!(s["backends"]["10.0.0.2:1"]["State"], json!(0));
    }

    #[test]
    fn backend_parsing() {
        assert_eq!(a("10.213.0.42:5432").port(), 5432);
        for bad in [
            "",
            "10.213.0.42",
            "10.213.0.42:",
            "10.213.0.42:0",
            "10.213.0.42:65536",
            "host:5432",
            "[::1]:5432",
            "10.213.0.42:5432 ",
            "010.213.0.42:5432",
            "10.213.0.42:05432",
            "0.0.0.0:5432",
            "255.255.255.255:5432",
            "224.0.0.1:5432",
            "10.213.0.42:5432/x",
            "1.2.3.4:5;rm -rf /",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad:?} accepted");
        }
        let long = "1".repeat(10_000);
        assert!(parse_backend(&long).is_err());
    }
}
