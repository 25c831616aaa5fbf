//! Running one local program with a bounded time, and its errors.
//!
//! Owns: spawning a child in its own process group, feeding its stdin,
//! collecting stdout/stderr, killing the whole group on timeout, and the
//! [`CommandError`] every executor reports. Must not: use a local shell, log
//! or keep stdin (it carries secrets), or put anything but the caller's
//! `what` into messages.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished child printed, and its exit code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// The exit code; `128 + signal` when a signal ended the child, as a
    /// shell reports it.
    pub code: i32,
}

/// Why a command did not succeed. `what` names the command for messages
/// (e.g. `ssh root@10.0.0.2: pg_ctl start`) and never holds a secret.
#[derive(Debug)]
pub enum CommandError {
    /// It could not be started, or talking to it failed.
    Io { what: String, err: std::io::Error },
    /// It ran longer than allowed; its process group was killed. `stderr` is
    /// what it printed until then.
    Timeout {
        what: String,
        after: Duration,
        stderr: String,
    },
    /// It exited non-zero.
    Failed {
        what: String,
        code: i32,
        stderr: String,
        stdout: String,
    },
}

impl CommandError {
    pub fn what(&self) -> &str {
        match self {
            CommandError::Io { what, .. }
            | CommandError::Timeout { what, .. }
            | CommandError::Failed { what, .. } => what,
        }
    }

    /// The full stderr (empty for `Io`).
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Io { .. } => "",
            CommandError::Timeout { stderr, .. } | CommandError::Failed { stderr, .. } => stderr,
        }
    }

    /// The exit code, for `Failed`.
    pub fn code(&self) -> Option<i32> {
        match self {
            CommandError::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, CommandError::Timeout { .. })
    }
}

/// Lines and bytes of a command's output shown in a message. The full text
/// stays in the error value.
pub const SHOWN_LINES: usize = 20;
pub const SHOWN_BYTES: usize = 2048;

/// The end of `text`, at most [`SHOWN_LINES`] lines and [`SHOWN_BYTES`]
/// bytes, trimmed, with a note of what was left out.
pub fn tail(text: &str) -> String {
    let text = text.trim();
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(SHOWN_LINES);
    let mut out = lines[skip..].join("\n");
    let mut cut = skip > 0;
    if out.len() > SHOWN_BYTES {
        let mut start = out.len() - SHOWN_BYTES;
        while !out.is_char_boundary(start) {
            start += 1;
        }
        out = out[start..].to_string();
        cut = true;
    }
    if cut {
        format!("...\n{out}")
    } else {
        out
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Io { what, err } => write!(f, "{what}: {err}"),
            CommandError::Timeout {
                what,
                after,
                stderr,
            } => {
                write!(f, "{what}: timed out after {:.1}s", after.as_secs_f64())?;
                let t = tail(stderr);
                if !t.is_empty() {
                    write!(f, ":\n{t}")?;
                }
                Ok(())
            }
            CommandError::Failed {
                what,
                code,
                stderr,
                stdout,
            } => {
                write!(f, "{what}: exited with code {code}")?;
                // Some tools (pg_ctl) explain failures on stdout only.
                let t = if stderr.trim().is_empty() {
                    tail(stdout)
                } else {
                    tail(stderr)
                };
                if !t.is_empty() {
                    write!(f, ":\n{t}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CommandError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CommandError::Io { err, .. } => Some(err),
            _ => None,
        }
    }
}

/// Output beyond this many bytes per stream is read and dropped, so a
/// runaway child cannot fill memory.
const MAX_CAPTURE: usize = 8 << 20;

/// How long to wait for the output pipes to close after the child exited; a
/// daemon it started may keep them open forever.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Run `program args...` (no shell), feed it `stdin` (then close it) and wait
/// at most `timeout`. The child leads its own process group; on timeout the
/// whole group gets SIGKILL and the child is reaped. A non-zero exit is
/// [`CommandError::Failed`].
pub fn run(
    program: &str,
    args: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, CommandError> {
    let what = describe(program, args);
    run_as(&what, program, args, stdin, timeout)
}

/// [`run`] with the description used in messages given by the caller (for
/// commands whose arguments are long or not meant for logs).
pub fn run_as(
    what: &str,
    program: &str,
    args: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, CommandError> {
    let out = run_unchecked(what, program, args, stdin, timeout)?;
    if out.code != 0 {
        return Err(CommandError::Failed {
            what: what.to_string(),
            code: out.code,
            stderr: out.stderr,
            stdout: out.stdout,
        });
    }
    Ok(out)
}

/// Like [`run_as`] but any exit code is an `Ok(Output)`; for commands whose
/// exit code carries an answer (`pg_ctl status`, `arping -D`).
pub fn run_unchecked(
    what: &str,
    program: &str,
    args: &[String],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, CommandError> {
    run_unchecked_env(what, program, args, &[], stdin, timeout, None)
}

/// [`run_unchecked`] with these variables added to the environment (the
/// way to hand a child details without putting them on its command line,
/// where `ps` shows them). While the child runs, its process group is in
/// `running` (0 otherwise), so that another thread can kill it early.
pub fn run_unchecked_env(
    what: &str,
    program: &str,
    args: &[String],
    env: &[(&str, String)],
    stdin: Option<&[u8]>,
    timeout: Duration,
    running: Option<&AtomicI32>,
) -> Result<Output, CommandError> {
    let started = Instant::now();
    let io = |err| CommandError::Io {
        what: what.to_string(),
        err,
    };
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(io)?;
    let pgid = child.id() as libc::pid_t;
    if let Some(r) = running {
        r.store(pgid, Ordering::Release);
    }

    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // A thread, so a child that does not read cannot block us; a child
        // that exits early closes the pipe and the write fails harmlessly.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());

    let deadline = started + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait().map_err(io)? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => {
                thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    };
    if let Some(r) = running {
        r.store(0, Ordering::Release);
    }
    let Some(status) = status else {
        kill_group(pgid);
        let _ = child.wait();
        let _ = stdout.finish(Instant::now() + PIPE_GRACE);
        let err = stderr.finish(Instant::now() + PIPE_GRACE);
        log::debug!("{what}: killed after {:?}", started.elapsed());
        return Err(CommandError::Timeout {
            what: what.to_string(),
            after: timeout,
            stderr: err,
        });
    };
    let grace = Instant::now() + PIPE_GRACE;
    let out = Output {
        stdout: stdout.finish(grace),
        stderr: stderr.finish(grace),
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    };
    log::debug!("{what}: exit {} after {:?}", out.code, started.elapsed());
    Ok(out)
}

/// SIGKILL to process group `pgid` (a child started here leads its own).
pub fn kill_group(pgid: libc::pid_t) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals the process group we
        // created for this child (process_group(0) makes pgid == pid).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// `program arg1 arg2`, shortened, for messages of [`run`].
fn describe(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        if s.len() > 120 {
            s.push_str(" ...");
            break;
        }
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// One output pipe read by a thread into a shared buffer, so what was read
/// is available even if the pipe never closes.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Option<crossbeam_channel::Receiver<()>>,
}

impl Capture {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let Some(mut pipe) = pipe else {
            return Capture { buf, done: None };
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let shared = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut b = shared.lock().unwrap_or_else(|e| e.into_inner());
                        let room = MAX_CAPTURE.saturating_sub(b.len());
                        b.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
            let _ = tx.send(());
        });
        Capture {
            buf,
            done: Some(rx),
        }
    }

    /// Wait until the pipe closed or `until`, then take what was read.
    fn finish(self, until: Instant) -> String {
        if let Some(rx) = &self.done {
            let _ = rx.recv_deadline(until);
        }
        let b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&b).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn captures_output_and_code() {
        let out = run("printf", &s(&["a%sb", "-"]), None, Duration::from_secs(5)).unwrap();
        assert_eq!(out.stdout, "a-b");
        assert_eq!(out.code, 0);
        let e = run("false", &[], None, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.code(), Some(1));
        assert_eq!(e.to_string(), "false: exited with code 1");
    }

    #[test]
    fn stdin_is_fed_and_closed() {
        let out = run("cat", &[], Some(b"secret\nline2"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.stdout, "secret\nline2");
        // A child that never reads its stdin does not block us.
        let big = vec![b'x'; 1 << 20];
        let out = run("true", &[], Some(&big), Duration::from_secs(5)).unwrap();
        assert_eq!(out.code, 0);
    }

    #[test]
    fn missing_program_is_io_error() {
        let e = run("/nonexistent/prog", &[], None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CommandError::Io { .. }), "{e:?}");
        assert!(e.to_string().starts_with("/nonexistent/prog: "), "{e}");
    }

    fn alive(pid: i32) -> bool {
        // A zombie still has /proc/<pid>; count it as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            }
            Err(_) => false,
        }
    }

    #[test]
    fn timeout_kills_the_whole_process_group() {
        let started = Instant::now();
        // The parent shell prints the pid of its background sleep, then
        // waits; both must die.
        let e = run_as(
            "sleeper",
            "sh",
            &s(&["-c", "sleep 30 & echo $! >&2; echo started >&2; wait"]),
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let CommandError::Timeout {
            what,
            after,
            stderr,
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(what, "sleeper");
        assert_eq!(*after, Duration::from_millis(300));
        let pid: i32 = stderr.lines().next().unwrap().trim().parse().unwrap();
        assert!(stderr.contains("started"));
        let gone_by = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < gone_by {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "sleep {pid} survived the timeout");
        assert!(
            e.to_string().starts_with("sleeper: timed out after 0.3s"),
            "{e}"
        );
    }

    #[test]
    fn background_child_holding_the_pipe_does_not_block() {
        let started = Instant::now();
        let out = run(
            "sh",
            &s(&["-c", "sleep 3 & echo done"]),
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout.trim(), "done");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn failed_shows_trimmed_stderr_but_keeps_all() {
        let script = "i=1; while [ $i -le 50 ]; do echo line$i >&2; i=$((i+1)); done; exit 3";
        let e = run_as(
            "noisy",
            "sh",
            &s(&["-c", script]),
            None,
            Duration::from_secs(5),
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("noisy: exited with code 3:\n...\nline31\n"),
            "{shown}"
        );
        assert!(shown.ends_with("line50"), "{shown}");
        assert!(!shown.contains("line30\n"), "{shown}");
        assert!(e.stderr().contains("line1\n"));
        assert_eq!(e.stderr().lines().count(), 50);

        // Long lines: at most SHOWN_BYTES bytes shown, on a char boundary.
        let long = "é".repeat(3000);
        let e = CommandError::Failed {
            what: "w".into(),
            code: 1,
            stderr: long.clone(),
            stdout: String::new(),
        };
        let shown = e.to_string();
        assert!(shown.len() < SHOWN_BYTES + 40, "{}", shown.len());
        assert!(shown.ends_with('é'));

        // pg_ctl style: the reason only on stdout.
        let e = CommandError::Failed {
            what: "pg_ctl".into(),
            code: 1,
            stderr: " \n".into(),
            stdout: "waiting for server to start.... stopped waiting\n".into(),
        };
        assert_eq!(
            e.to_string(),
            "pg_ctl: exited with code 1:\nwaiting for server to start.... stopped waiting"
        );
    }

    #[test]
    fn signal_exit_code() {
        let e = run(
            "sh",
            &s(&["-c", "kill -9 $$"]),
            None,
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert_eq!(e.code(), Some(128 + 9));
    }
}
