//! One heartbeat write in flight per database.
//!
//! Several cluster entries may name the same PostgreSQL database (many
//! small clusters monitored on shared instances; the monitor benchmark's
//! 500 entries on one primary). Every heartbeat UPDATE of cs_sys_heartbeat
//! waits for the row lock of the one before it, and that lock is held until
//! the earlier commit's WAL flush: the entries' writes of one second queue
//! up one flush after another, and one slow flush holds all of them.
//!
//! So a primary's probe that finds a heartbeat write to its database in
//! flight waits for that write instead of queueing behind it. Its success
//! counts as this probe's: the commit reached the disk after this probe
//! began. A failure does not (it may be that session's own trouble): the
//! probe then writes itself. A write still unfinished at the probe's
//! deadline fails the probe, as its own write, queued behind it, would
//! have; a primary whose WAL disk hangs is still found out.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// The writes in flight, by database key.
static IN_FLIGHT: Mutex<BTreeMap<String, Arc<Flight>>> = Mutex::new(BTreeMap::new());

/// One write's outcome, once known.
#[derive(Default)]
pub struct Flight {
    outcome: Mutex<Option<bool>>,
    done: Condvar,
}

impl Flight {
    /// The outcome (true: written), waiting for it until `until`; None if
    /// the write has not ended by then.
    pub fn wait(&self, until: Instant) -> Option<bool> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        while outcome.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            outcome = self
                .done
                .wait_timeout(outcome, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *outcome
    }
}

/// This probe's part in its database's heartbeat write.
pub enum Turn {
    /// No write in flight: this probe writes, and tells the others.
    Lead(Lead),
    /// Another probe's write is in flight: wait for it.
    Follow(Arc<Flight>),
}

/// The writer's handle. Its outcome is published by [`Lead::finish`], or
/// as a failure if it is dropped first (an error before the write, a
/// panic): nobody waits for a write that will not end.
pub struct Lead {
    key: String,
    flight: Arc<Flight>,
}

impl Lead {
    pub fn finish(self, written: bool) {
        self.publish(written);
    }

    fn publish(&self, written: bool) {
        {
            let mut all = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
            if all
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                all.remove(&self.key);
            }
        }
        let mut outcome = self
            .flight
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if outcome.is_none() {
            *outcome = Some(written);
        }
        self.flight.done.notify_all();
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // After finish() this only finds the outcome already set.
        self.publish(false);
    }
}

/// Lead the write to database `key` or follow the one in flight.
pub fn turn(key: &str) -> Turn {
    let mut all = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = all.get(key) {
        return Turn::Follow(Arc::clone(f));
    }
    let flight = Arc::new(Flight::default());
    all.insert(key.to_string(), Arc::clone(&flight));
    Turn::Lead(Lead {
        key: key.to_string(),
        flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lead(key: &str) -> Lead {
        match turn(key) {
            Turn::Lead(l) => l,
            Turn::Follow(_) => panic!("{key}: a write was already in flight"),
        }
    }

    fn follow(key: &str) -> Arc<Flight> {
        match turn(key) {
            Turn::Follow(f) => f,
            Turn::Lead(_) => panic!("{key}: no write in flight to follow"),
        }
    }

    #[test]
    fn followers_get_the_leaders_outcome() {
        let l = lead("hb-test-a");
        let f1 = follow("hb-test-a");
        let f2 = follow("hb-test-a");
        // Another database has its own write.
        let other = lead("hb-test-b");
        let waiter = std::thread::spawn(move || f1.wait(Instant::now() + Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        l.finish(true);
        assert_eq!(waiter.join().unwrap(), Some(true));
        assert_eq!(f2.wait(Instant::now()), Some(true));
        // Finished writes are not followed: the next probe writes itself.
        let again = lead("hb-test-a");
        again.finish(false);
        other.finish(true);
    }

    #[test]
    fn a_dropped_lead_is_a_failure_and_an_unfinished_one_times_out() {
        let l = lead("hb-test-c");
        let f = follow("hb-test-c");
        let t = Instant::now();
        assert_eq!(f.wait(t + Duration::from_millis(100)), None);
        assert!(t.elapsed() >= Duration::from_millis(100));
        drop(l);
        assert_eq!(f.wait(Instant::now()), Some(false));
        // The failed write left nothing in flight.
        lead("hb-test-c").finish(true);
    }

    #[test]
    fn finish_then_drop_keeps_the_outcome() {
        let l = lead("hb-test-d");
        let f = follow("hb-test-d");
        l.finish(true); // drops the Lead after publishing
        assert_eq!(f.wait(Instant::now()), Some(true));
    }
}
