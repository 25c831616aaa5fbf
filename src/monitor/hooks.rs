//! The event hook runner: one thread that runs `event_command` for each
//! event, one after the other in the order they were recorded, each with a
//! bounded time (its whole process group is killed at `event_timeout`).
//!
//! It owns the queue between the places that record events and that
//! thread, and the logging of what a hook printed. It must never make
//! anyone wait: [`Hooks::enqueue`] only puts the event on an unbounded
//! channel, so a hook that hangs delays later hooks, never a failover.
//! At shutdown the running hook is killed and queued ones are dropped: they
//! are not run after a restart either.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::exec::cmd::{self, CommandError};
use crate::model::event::Event;

/// A queue this long (events waiting for their hook) is logged as a warning.
pub const BACKLOG_WARN: usize = 1000;

/// At most this many lines of each of a hook's streams are logged.
const MAX_LINES: usize = 50;

/// The feeding end of the hook thread.
pub(super) struct Hooks {
    tx: crossbeam_channel::Sender<Event>,
    backlog: Arc<AtomicUsize>,
    /// The running hook's process group (0: none), killed at shutdown.
    running: Arc<AtomicI32>,
    /// Set at shutdown: queued hooks are no longer run.
    stopping: Arc<AtomicBool>,
}

impl Hooks {
    /// Start the hook thread for `command` (run with `sh -c`). `secrets`
    /// are replaced by `******` in the hook's logged output.
    pub fn start(command: String, timeout: Duration, secrets: Vec<String>) -> Hooks {
        let (tx, rx) = crossbeam_channel::unbounded::<Event>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicI32::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (left, run, stop) = (backlog.clone(), running.clone(), stopping.clone());
        let spawned = thread::Builder::new()
            .name("event-hooks".into())
            .spawn(move || {
                for ev in rx {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    for (level, line) in run_one(&command, timeout, &secrets, &ev, Some(&run)) {
                        log::log!(level, "{line}");
                    }
                    left.fetch_sub(1, Ordering::AcqRel);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the event hook thread, no event_command will run: {e}");
        }
        Hooks {
            tx,
            backlog,
            running,
            stopping,
        }
    }

    /// At shutdown: run no more hooks and kill the running one's process
    /// group. Returns how many events were left without their hook.
    pub fn stop(&self) -> usize {
        self.stopping.store(true, Ordering::Release);
        let pgid = self.running.swap(0, Ordering::AcqRel);
        if pgid > 0 {
            cmd::kill_group(pgid);
        }
        self.backlog.load(Ordering::Acquire)
    }

    /// Queue `ev` for its hook; never blocks.
    pub fn enqueue(&self, ev: Event) {
        let waiting = self.backlog.fetch_add(1, Ordering::AcqRel) + 1;
        if waiting % BACKLOG_WARN == 0 {
            log::warn!(
                "{waiting} events wait for their event_command hook (the hook is slower than the events come): none is dropped while clupserver runs"
            );
        }
        if self.tx.send(ev).is_err() {
            self.backlog.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Events queued and not yet through their hook.
    #[cfg(test)]
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Acquire)
    }
}

/// Run the hook for `ev` and say how it went: the lines to log, each
/// with its level, all beginning `Event hook[SEQ EVENT]`.
pub(super) fn run_one(
    command: &str,
    timeout: Duration,
    secrets: &[String],
    ev: &Event,
    running: Option<&AtomicI32>,
) -> Vec<(log::Level, String)> {
    let pre = format!("Event hook[{} {}]", ev.seq, ev.event);
    let args = ["-c".to_string(), command.to_string()];
    let t0 = Instant::now();
    let res = cmd::run_unchecked_env(
        "event_command",
        "sh",
        &args,
        &ev.env(),
        None,
        timeout,
        running,
    );
    let took = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    let stream = |name: &str, text: &str, out: &mut Vec<(log::Level, String)>| {
        let lines: Vec<&str> = text.lines().collect();
        for l in lines.iter().take(MAX_LINES) {
            out.push((
                log::Level::Info,
                format!("{pre} {name}: {}", redact(l, secrets)),
            ));
        }
        if lines.len() > MAX_LINES {
            out.push((
                log::Level::Info,
                format!("{pre} {name}: ... {} more lines", lines.len() - MAX_LINES),
            ));
        }
    };
    match res {
        Ok(o) => {
            stream("stdout", &o.stdout, &mut out);
            stream("stderr", &o.stderr, &mut out);
            let level = if o.code == 0 {
                log::Level::Info
            } else {
                log::Level::Warn
            };
            out.push((level, format!("{pre} exited {} after {took:.1} s", o.code)));
        }
        Err(CommandError::Timeout { stderr, .. }) => {
            stream("stderr", &stderr, &mut out);
            out.push((
                log::Level::Warn,
                format!(
                    "{pre} killed after {} s (event_timeout), with its process group",
                    timeout.as_secs_f64()
                ),
            ));
        }
        Err(e) => out.push((log::Level::Error, format!("{pre} cannot run: {e}"))),
    }
    out
}

/// `line` with every secret in it replaced by `******`.
fn redact(line: &str, secrets: &[String]) -> String {
    let mut s = line.to_string();
    for secret in secrets.iter().filter(|x| !x.is_empty()) {
        s = s.replace(secret.as_str(), "******");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{EventKind, NewEvent, Ring};

    fn event(seq: u64) -> Event {
        let mut r = Ring {
            next_seq: seq,
            ..Ring::default()
        };
        r.push(
            NewEvent::new(EventKind::Promote, "cluster01")
                .db(2, "10.213.0.12")
                .primaries("10.213.0.11:5432", "10.213.0.12:5432"),
            0,
        )
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("clup-hooks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_hook_sees_its_event_in_the_environment_and_its_output_is_logged() {
        let lines = run_one(
            "echo \"$CLUP_EVENT $CLUP_EVENT_SEQ $CLUP_OLD_PRIMARY>$CLUP_NEW_PRIMARY\"; echo token=s3cret-tok >&2; exit 3",
            Duration::from_secs(5),
            &["s3cret-tok".to_string()],
            &event(7),
            None,
        );
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            text[..2],
            [
                "Event hook[7 promote] stdout: promote 7 10.213.0.11:5432>10.213.0.12:5432",
                "Event hook[7 promote] stderr: token=******",
            ],
            "{lines:?}"
        );
        let (level, last) = lines.last().unwrap();
        assert_eq!(*level, log::Level::Warn);
        assert!(
            last.starts_with("Event hook[7 promote] exited 3 after "),
            "{last}"
        );
    }

    #[test]
    fn the_timeout_kills_a_sleeping_hook_and_its_children() {
        let dir = temp("timeout");
        let pidfile = dir.join("pid");
        let cmd = format!(
            "sleep 30 & echo $! > {}; echo waiting >&2; wait",
            pidfile.display()
        );
        let t0 = Instant::now();
        let lines = run_one(&cmd, Duration::from_secs(1), &[], &event(1), None);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let (level, last) = lines.last().unwrap();
        assert_eq!(*level, log::Level::Warn);
        assert!(last.contains("killed after 1 s (event_timeout)"), "{last}");
        assert!(
            lines.iter().any(|(_, l)| l.ends_with("stderr: waiting")),
            "{lines:?}"
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was in the hook's process group: gone too
        // (reaped by init, so allow it a moment).
        let gone = (0..50).any(|_| {
            thread::sleep(Duration::from_millis(20));
            // SAFETY: signal 0 only asks whether the process exists.
            let missing = unsafe { libc::kill(pid, 0) != 0 };
            missing
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        });
        assert!(gone, "sleep {pid} outlived the hook's timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stopping_kills_the_running_hook_and_runs_no_more() {
        let dir = temp("stop");
        let file = dir.join("seen");
        let cmd = format!("echo \"$CLUP_EVENT_SEQ\" >> {}; sleep 30", file.display());
        let hooks = Hooks::start(cmd, Duration::from_secs(60), vec![]);
        for seq in 1..=3 {
            hooks.enqueue(event(seq));
        }
        assert!((0..250).any(|_| {
            thread::sleep(Duration::from_millis(20));
            hooks.running.load(Ordering::Acquire) > 0
                && std::fs::read_to_string(&file).is_ok_and(|t| t == "1\n")
        }));
        let t0 = Instant::now();
        assert_eq!(hooks.stop(), 3);
        // The killed hook ends at once; the two queued ones never run.
        assert!((0..250).any(|_| {
            thread::sleep(Duration::from_millis(20));
            hooks.backlog() == 2
        }));
        assert!(t0.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(300));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hooks_run_in_order_and_enqueueing_never_waits_for_them() {
        let dir = temp("order");
        let file = dir.join("seen");
        // The first hook is slow: the others queue behind it, in order.
        let cmd = format!(
            "[ \"$CLUP_EVENT_SEQ\" = 1 ] && sleep 1; echo \"$CLUP_EVENT_SEQ\" >> {}",
            file.display()
        );
        let hooks = Hooks::start(cmd, Duration::from_secs(10), vec![]);
        let t0 = Instant::now();
        for seq in 1..=20 {
            hooks.enqueue(event(seq));
        }
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "enqueue waited {:?}",
            t0.elapsed()
        );
        assert!(hooks.backlog() > 0);
        let end = Instant::now() + Duration::from_secs(20);
        let seen = loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if text.lines().count() >= 20 || Instant::now() > end {
                break text;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let got: Vec<u64> = seen.lines().map(|l| l.parse().unwrap()).collect();
        assert_eq!(got, (1..=20).collect::<Vec<u64>>());
        assert!((0..100).any(|_| {
            thread::sleep(Duration::from_millis(10));
            hooks.backlog() == 0
        }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
