//! Process plumbing for clupserver: the pid file lock, the double fork, and
//! signals as events.
//!
//! All of this must run before any thread starts (the HTTP server and postgres
//! clients start threads, and fork only copies the calling thread). The pid
//! file is held with `flock` for the daemon's whole life, so "is it running"
//! is answered by the kernel, not by a pid that may have been reused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;

/// The pid file, locked by the running server for its lifetime.
pub struct PidLock {
    _file: File,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Unlock explicitly: a child forked meanwhile (ssh, pg_ctl) shares
        // the open file description until it execs, and closing our
        // descriptor alone would leave the lock held through that copy.
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self._file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Take the pid file lock and write our pid. Fails with the holder's pid if
/// another server runs.
pub fn lock_pid_file(path: &Path) -> Result<PidLock, String> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        return Err(format!("Program({}) is already running.", s.trim()));
    }
    f.set_len(0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{}", std::process::id()).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = f.sync_all();
    Ok(PidLock { _file: f })
}

/// The pid of the running server, if the pid file is locked by one.
pub fn running_pid(path: &Path) -> Option<i32> {
    let mut f = File::open(path).ok()?;
    // SAFETY: flock on a descriptor we own; released when f closes.
    let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        return None;
    }
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Raise the soft limit of open files to the hard limit: the server takes
/// all the room the system allows for connections (and survives running
/// out of it: see [`crate::util::http`]).
pub fn raise_fd_limit() -> u64 {
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur as u64;
            }
        }
        r.rlim_cur as u64
    }
}

/// The daemon's end of the start-up pipe: tell the waiting parent how it went.
pub struct Ready {
    pipe: Option<File>,
}

impl Ready {
    /// A no-op notifier, for foreground runs.
    pub fn none() -> Ready {
        Ready { pipe: None }
    }

    /// Start-up succeeded: the parent prints nothing more and exits 0.
    pub fn ok(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"OK\n");
        }
    }

    /// Start-up failed: the parent prints `msg` and exits 1.
    pub fn fail(&mut self, msg: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(format!("ERR {msg}\n").as_bytes());
        }
    }
}

/// Double fork and setsid. Returns only in the daemon (grandchild); the
/// original process waits for the daemon's start-up report and exits with 0
/// (started) or 1 (failed, message on stderr). `stderr_to` receives the
/// daemon's stderr (panics), e.g. the log file.
pub fn daemonize(stderr_to: &Path) -> std::io::Result<Ready> {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls on descriptors we own, in a single-threaded process.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (rd, wr) = (fds[0], fds[1]);
        match libc::fork() {
            -1 => return Err(std::io::Error::last_os_error()),
            0 => {}
            child => {
                libc::close(wr);
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                let mut r = File::from_raw_fd(rd);
                let mut msg = String::new();
                let _ = r.read_to_string(&mut msg);
                if msg.starts_with("OK") {
                    std::process::exit(0);
                }
                let msg = msg.strip_prefix("ERR ").unwrap_or(&msg).trim();
                if msg.is_empty() {
                    eprintln!("clupserver: the daemon exited during start-up; see the log");
                } else {
                    eprintln!("{msg}");
                }
                std::process::exit(1);
            }
        }
        libc::close(rd);
        if libc::setsid() == -1 {
            libc::_exit(1);
        }
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {}
            _ => libc::_exit(0),
        }
        let _ = libc::chdir(c"/".as_ptr());
        libc::umask(0o022);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
        if let Ok(f) = OpenOptions::new().create(true).append(true).open(stderr_to) {
            libc::dup2(f.as_raw_fd(), 2);
        }
        Ok(Ready {
            pipe: Some(File::from_raw_fd(wr)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lock_is_exclusive_and_visible() {
        let dir = std::env::temp_dir().join(format!("clup-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("clupserver.pid");
        let _ = std::fs::remove_file(&p);
        assert_eq!(running_pid(&p), None);
        let lock = lock_pid_file(&p).unwrap();
        assert_eq!(running_pid(&p), Some(std::process::id() as i32));
        let e = lock_pid_file(&p).err().unwrap();
        assert_eq!(
            e,
            format!("Program({}) is already running.", std::process::id())
        );
        drop(lock);
        assert_eq!(running_pid(&p), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
