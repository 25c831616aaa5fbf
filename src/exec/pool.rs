//! Threads kept for the probes' parallel work.
//!
//! A cluster's round probes its databases in parallel, each one a job of a
//! few milliseconds (up to probe_timeout when a host is gone). Starting a
//! thread for each and ending it after cost more CPU than the probe itself
//! (stack mapping and unmapping, the TLB flushes that go with it, malloc's
//! per-thread caches): at 500 clusters, more than half of clupserver's CPU.
//! Here a job goes to a thread left waiting by an earlier one, and a new
//! thread starts only when none is waiting, so no job ever queues behind
//! another: a probe blocked on a dead host holds its own thread, as before.
//! A thread left without work for [`IDLE_EXIT`] ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

/// How long a thread without work stays.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    name: &'static str,
    /// The threads waiting for a job, the last to become idle on top: it
    /// gets the next job, so threads beyond what the load needs stay idle
    /// and end.
    idle: Mutex<Vec<(usize, Sender<Job>)>>,
    /// Threads alive, for the tests.
    alive: AtomicUsize,
    /// Threads started, to name each one's place in `idle`.
    started: AtomicUsize,
    idle_exit: Duration,
}

impl Pool {
    pub fn new(name: &'static str, idle_exit: Duration) -> Pool {
        Pool {
            name,
            idle: Mutex::new(Vec::new()),
            alive: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            idle_exit,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(usize, Sender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `job` on a waiting thread, or on a new one if none waits. A
    /// thread that cannot be started runs nothing: the job is dropped
    /// unrun (its result channel then tells its caller) and the error is
    /// logged.
    pub fn run(&'static self, job: impl FnOnce() + Send + 'static) {
        let waiting = self.idle().pop();
        if let Some((_, tx)) = waiting {
            // Cannot fail: a thread taken off `idle` waits for this job.
            let _ = tx.send(Box::new(job));
            return;
        }
        self.alive.fetch_add(1, Ordering::AcqRel);
        let me = self.started.fetch_add(1, Ordering::AcqRel);
        let started = thread::Builder::new()
            .name(self.name.to_string())
            .spawn(move || {
                call(job);
                self.serve(me);
            });
        if let Err(e) = started {
            self.alive.fetch_sub(1, Ordering::AcqRel);
            log::error!("cannot start a {} thread: {e}", self.name);
        }
    }

    /// Wait for jobs until none comes for `idle_exit`.
    fn serve(&self, me: usize) {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(1);
        loop {
            self.idle().push((me, tx.clone()));
            let job = match rx.recv_timeout(self.idle_exit) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    let mut idle = self.idle();
                    match idle.iter().position(|(id, _)| *id == me) {
                        Some(i) => {
                            idle.remove(i);
                            self.alive.fetch_sub(1, Ordering::AcqRel);
                            return;
                        }
                        // Taken off `idle` just now: the job is on its way.
                        None => {
                            drop(idle);
                            match rx.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            call(job);
        }
    }

    /// Threads alive (running a job or waiting for one).
    pub fn threads(&self) -> usize {
        self.alive.load(Ordering::Acquire)
    }
}

/// Run a job; a panic in it (a bug) is logged by the panic hook and, in a
/// build that unwinds (tests; the release build aborts on a panic), leaves
/// the thread serving.
fn call(job: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
}

/// The probes' pool.
pub fn probes() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new("probe", IDLE_EXIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::time::Instant;

    fn pool(idle_exit: Duration) -> &'static Pool {
        Box::leak(Box::new(Pool::new("test-pool", idle_exit)))
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < end, "{what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Four jobs that all block until all four run: only possible if each
    /// got a thread of its own. Returns their threads.
    fn four_at_once(p: &'static Pool) -> Vec<thread::ThreadId> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let all = Arc::new(Barrier::new(4));
        for _ in 0..4 {
            let (all, tx) = (Arc::clone(&all), tx.clone());
            p.run(move || {
                all.wait();
                tx.send(thread::current().id()).unwrap();
            });
        }
        (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect()
    }

    #[test]
    fn threads_are_reused_and_jobs_never_wait_for_each_other() {
        let p = pool(Duration::from_secs(30));
        let first = four_at_once(p);
        assert_eq!(p.threads(), 4);
        wait_for("four threads waiting", || p.idle().len() == 4);
        // Later jobs run on the same threads.
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..30 {
            let tx = tx.clone();
            p.run(move || tx.send(thread::current().id()).unwrap());
            let id = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert!(first.contains(&id), "job {i} ran on a new thread");
            wait_for("the thread back", || p.idle().len() == 4);
        }
        assert_eq!(p.threads(), 4);
        // Four at once again: still no new thread.
        let again = four_at_once(p);
        assert!(again.iter().all(|t| first.contains(t)));
        assert_eq!(p.threads(), 4);
    }

    #[test]
    fn threads_beyond_the_load_end() {
        let p = pool(Duration::from_millis(300));
        four_at_once(p);
        wait_for("four threads waiting", || p.idle().len() == 4);
        // One job at a time, more often than the idle limit: one thread
        // serves them all and the three others end.
        let (tx, rx) = crossbeam_channel::unbounded();
        let end = Instant::now() + Duration::from_secs(5);
        while p.threads() > 1 {
            assert!(Instant::now() < end, "{} threads left", p.threads());
            let tx = tx.clone();
            p.run(move || tx.send(()).unwrap());
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
            thread::sleep(Duration::from_millis(20));
        }
        // Without work the last one ends too, and a new job still runs.
        wait_for("all idle threads ended", || p.threads() == 0);
        p.run(move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(p.threads(), 1);
    }
}
