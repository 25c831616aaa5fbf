//! Running a shell script on a database host over ssh.
//!
//! Owns: the ssh command line ([`Ssh::args`]), its time bounds, and the
//! [`Remote`] trait the other executors run their scripts through (so tests
//! and a lab can run the same scripts another way). Must not: put a secret on
//! any command line (secrets go through the child's stdin, which the remote
//! script reads), run a local shell, or decide anything from what it sees.

use std::time::Duration;

use crate::exec::cmd::{self, CommandError, Output};
use crate::model::config::Config;

/// `out` if the script exited 0, else [`CommandError::Failed`] as `what`.
fn exit_ok(what: String, out: Output) -> Result<Output, CommandError> {
    if out.code != 0 {
        return Err(CommandError::Failed {
            what,
            code: out.code,
            stderr: out.stderr,
            stdout: out.stdout,
        });
    }
    Ok(out)
}

/// Somewhere a POSIX shell script can run: a database host.
pub trait Remote {
    /// Run `script` on `host` with `stdin` fed to it, within `timeout`.
    /// `label` names the action in messages. A non-zero exit is
    /// [`CommandError::Failed`].
    fn run_script(
        &self,
        host: &str,
        label: &str,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError> {
        let out = self.run_script_unchecked(host, label, script, stdin, timeout)?;
        exit_ok(self.describe(host, label), out)
    }

    /// Like [`Remote::run_script`] but any exit code of the script is an
    /// `Ok`. Failing to reach the host is still an error.
    fn run_script_unchecked(
        &self,
        host: &str,
        label: &str,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError>;

    /// `ssh root@10.0.0.2: label`, the `what` of errors.
    fn describe(&self, host: &str, label: &str) -> String;

    /// How long reaching a host may take; executors add it to their own
    /// time bounds.
    fn connect_timeout(&self) -> Duration;

    /// How long a liveness check (a TCP connect from one host to another)
    /// waits for an answer before it counts as none: probe_timeout.
    fn check_timeout(&self) -> Duration {
        self.connect_timeout()
    }
}

/// ssh's exit code when the connection itself failed.
pub const SSH_CONNECT_FAILED: i32 = 255;

/// How to reach database hosts: `ssh -o BatchMode=yes ... user@host -- script`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ssh {
    pub program: String,
    pub user: String,
    pub options: Vec<String>,
    pub connect_timeout: Duration,
    /// How long the TCP host check and a standby's check of the primary
    /// wait for an answer (probe_timeout): the failover's critical path,
    /// where ssh_connect_timeout bounds ssh logins to live hosts.
    pub check_timeout: Duration,
    /// Where ssh keeps its multiplexing sockets (ControlMaster); None = one
    /// connection per call. A login costs 0.5-1 s of key exchange; reusing
    /// the connection makes later calls take milliseconds.
    pub control_dir: Option<std::path::PathBuf>,
}

impl Ssh {
    pub fn from_config(cfg: &Config) -> Ssh {
        Ssh {
            program: "ssh".to_string(),
            user: cfg.ssh_user.clone(),
            options: cfg.ssh_options.clone(),
            connect_timeout: cfg.ssh_connect_timeout,
            check_timeout: cfg.probe_timeout,
            control_dir: None,
        }
    }

    /// Reuse one connection per host through sockets in `dir` (the master
    /// lingers 60 s after its last use; ServerAlive ends it when the host dies).
    pub fn with_control_dir(mut self, dir: &std::path::Path) -> Ssh {
        self.control_dir = Some(dir.to_path_buf());
        self
    }

    /// The arguments of ssh for running `script` on `host`. The script is one
    /// argument after `--`; ssh hands it to the remote login shell (which
    /// must be a POSIX shell: sh, bash, dash, ksh).
    pub fn args(&self, host: &str, script: &str) -> Vec<String> {
        self.args_mux(host, script, true)
    }

    /// As [`Ssh::args`]; `mux == false` opens a connection of its own even
    /// when a master connection exists (ControlPath=none).
    fn args_mux(&self, host: &str, script: &str, mux: bool) -> Vec<String> {
        // ssh takes whole seconds: round up.
        let secs = self.connect_timeout.as_millis().div_ceil(1000).max(1);
        // ssh keeps the first value of an option: the operator's
        // ssh_options come first so they can override our defaults.
        let mut a: Vec<String> = self.options.clone();
        if !mux {
            a.push("-o".into());
            a.push("ControlPath=none".into());
        } else if let Some(dir) = &self.control_dir {
            a.push("-o".into());
            a.push("ControlMaster=auto".into());
            a.push("-o".into());
            a.push(format!("ControlPath={}/ssh-%C", dir.display()));
            a.push("-o".into());
            a.push("ControlPersist=60".into());
        }
        a.extend(
            [
                "-T",
                "-o",
                "BatchMode=yes",
                "-o",
                &format!("ConnectTimeout={secs}"),
                "-o",
                "ServerAliveInterval=2",
                "-o",
                "ServerAliveCountMax=2",
                "-o",
                "LogLevel=ERROR",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a.push(format!("{}@{}", self.user, host));
        a.push("--".to_string());
        a.push(script.to_string());
        a
    }

    /// Run `script` on `host`; a non-zero exit is an error. The label in
    /// messages is the script's first line.
    pub fn run(&self, host: &str, script: &str, timeout: Duration) -> Result<Output, CommandError> {
        let label = first_line(script);
        self.run_script(host, &label, script, None, timeout)
    }

    /// Whether `host` accepts our ssh login and runs `true`; a dead host
    /// answers false within about the connect timeout.
    pub fn host_up(&self, host: &str) -> bool {
        match self.check_host(host) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("{e}");
                false
            }
        }
    }

    /// [`Ssh::host_up`] with the reason when it is not.
    ///
    /// Always a fresh connection, never the master's: a master connection
    /// to a host that just died still looks established, and a command sent
    /// through it waits for ServerAlive (seconds) or for our whole timeout,
    /// where a new TCP connect fails within ConnectTimeout. This check is
    /// on the failover's critical path.
    ///
    /// First a plain TCP connect to where ssh would connect, bounded by
    /// probe_timeout with millisecond precision (ssh's own ConnectTimeout
    /// counts whole seconds): a host that does not answer at all is down
    /// without waiting for ssh. A host that answers, even with a refusal,
    /// goes on to the ssh login (bounded by ssh_connect_timeout).
    pub fn check_host(&self, host: &str) -> Result<(), CommandError> {
        if let Some(addr) = self.endpoint(host) {
            if let Err(err) = std::net::TcpStream::connect_timeout(&addr, self.check_timeout) {
                use std::io::ErrorKind::*;
                if !matches!(err.kind(), ConnectionRefused | ConnectionReset) {
                    return Err(CommandError::Io {
                        what: self.describe(host, &format!("connect to {addr}")),
                        err: std::io::Error::new(
                            err.kind(),
                            format!(
                                "{err} (probe_timeout {} s)",
                                self.check_timeout.as_secs_f64()
                            ),
                        ),
                    });
                }
            }
        }
        let timeout = self.connect_timeout + Duration::from_secs(2);
        let args = self.args_mux(host, "true", false);
        let out = self.run_args(host, "true", &args, None, timeout)?;
        exit_ok(self.describe(host, "true"), out).map(|_| ())
    }

    /// Where ssh connects for `host`: HostName and Port as `ssh -G` resolves
    /// them through ssh_config and ssh_options. None when ssh goes through
    /// a proxy, or when that cannot be told (then only ssh itself checks).
    fn endpoint(&self, host: &str) -> Option<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        let mut args: Vec<String> = self.options.clone();
        args.push("-G".into());
        args.push(format!("{}@{}", self.user, host));
        let out = cmd::run(&self.program, &args, None, Duration::from_secs(2)).ok()?;
        let (name, port) = endpoint_of(&out.stdout)?;
        (name.as_str(), port).to_socket_addrs().ok()?.next()
    }

    /// Run ssh with `args`; exit 255 (ssh's own failure: the script never
    /// ran, or the connection was lost) is an error, any other code is the
    /// script's answer.
    fn run_args(
        &self,
        host: &str,
        label: &str,
        args: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError> {
        let what = self.describe(host, label);
        let out = cmd::run_unchecked(&what, &self.program, args, stdin, timeout)?;
        if out.code == SSH_CONNECT_FAILED {
            return Err(CommandError::Failed {
                what,
                code: out.code,
                stderr: out.stderr,
                stdout: out.stdout,
            });
        }
        Ok(out)
    }
}

impl Remote for Ssh {
    fn run_script_unchecked(
        &self,
        host: &str,
        label: &str,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError> {
        let args = self.args(host, script);
        let Some(dir) = &self.control_dir else {
            return self.run_args(host, label, &args, stdin, timeout);
        };
        // Many threads calling a host with no master connection yet would
        // each log in (ControlMaster=auto lets only one become the master):
        // a storm of key exchanges when many clusters share hosts. The
        // first call opens the master while the others wait for it.
        let key = format!("{}|{}@{}", dir.display(), self.user, host);
        let lock = (!masters::warm(&key)).then(|| masters::lock_of(&key));
        // Waiting is bounded: behind a host that does not answer, each
        // call would otherwise queue for the one before it.
        let _held = lock
            .as_ref()
            .and_then(|l| masters::hold(l, self.connect_timeout + Duration::from_secs(1)));
        let out = self.run_args(host, label, &args, stdin, timeout);
        match &out {
            Ok(_) => masters::mark(&key, true),
            Err(_) => masters::mark(&key, false),
        }
        out
    }

    fn describe(&self, host: &str, label: &str) -> String {
        format!("ssh {}@{}: {}", self.user, host, label)
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn check_timeout(&self) -> Duration {
        self.check_timeout
    }
}

/// Which hosts have a master connection (as far as this process knows),
/// and one lock per host held while the first call opens it.
mod masters {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
    use std::time::{Duration, Instant};

    /// A master lingers 60 s after its last use (ControlPersist=60); one
    /// used within this long is still there unless its host went away.
    const FRESH: Duration = Duration::from_secs(50);

    /// Per host: when a call last succeeded, and the opening lock.
    type Table = Mutex<BTreeMap<String, (Option<Instant>, Arc<Mutex<()>>)>>;

    fn table() -> &'static Table {
        static T: OnceLock<Table> = OnceLock::new();
        T.get_or_init(|| Mutex::new(BTreeMap::new()))
    }

    fn entry<R>(key: &str, f: impl FnOnce(&mut (Option<Instant>, Arc<Mutex<()>>)) -> R) -> R {
        let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
        f(t.entry(key.to_string())
            .or_insert_with(|| (None, Arc::new(Mutex::new(())))))
    }

    pub fn warm(key: &str) -> bool {
        entry(key, |e| e.0.is_some_and(|at| at.elapsed() < FRESH))
    }

    pub fn lock_of(key: &str) -> Arc<Mutex<()>> {
        entry(key, |e| e.1.clone())
    }

    /// The lock, or None once `limit` has passed without it.
    pub fn hold(lock: &Mutex<()>, limit: Duration) -> Option<MutexGuard<'_, ()>> {
        let end = Instant::now() + limit;
        loop {
            match lock.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
    }

    pub fn mark(key: &str, ok: bool) {
        entry(key, |e| e.0 = ok.then(Instant::now));
    }
}

/// Script for [`peer_reaches`]: prints `open` or `closed`, exits 0 either way.
/// The host and port go to the inner `bash -c` as positional parameters,
/// never into its program text: that text is evaluated a second time by
/// bash, so quoting for the outer shell alone would not protect it.
/// The connect waits `wait`, at most 1 s (a live host on the LAN answers
/// in milliseconds).
pub fn peer_script(host: &str, port: u16, wait: Duration) -> String {
    use crate::exec::shell::{quote, short_wait};
    format!(
        "if timeout {} bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' clup-peer {} {} 2>/dev/null; then echo open; else echo closed; fi",
        short_wait(wait),
        quote(host),
        quote(&port.to_string())
    )
}

/// From `via`, can a TCP connection to `host:port` be opened? The split-brain
/// guard asks the standbys this about the primary before any failover.
/// An error means `via` could not be asked (not that the port is closed).
pub fn peer_reaches(
    remote: &dyn Remote,
    via: &str,
    host: &str,
    port: u16,
) -> Result<bool, CommandError> {
    let label = format!("can {host}:{port} be reached from here");
    let out = remote.run_script(
        via,
        &label,
        &peer_script(host, port, remote.check_timeout()),
        None,
        remote.connect_timeout() + remote.check_timeout() + Duration::from_secs(4),
    )?;
    match out.stdout.trim() {
        "open" => Ok(true),
        "closed" => Ok(false),
        other => Err(CommandError::Failed {
            what: remote.describe(via, &label),
            code: out.code,
            stderr: format!(
                "unexpected answer '{}'",
                other.chars().take(80).collect::<String>()
            ),
            stdout: String::new(),
        }),
    }
}

/// HostName and Port from `ssh -G` output; None when a ProxyCommand or
/// ProxyJump is in the way (a TCP connect to the host says nothing then).
pub fn endpoint_of(ssh_g: &str) -> Option<(String, u16)> {
    let (mut name, mut port) = (None, None);
    for line in ssh_g.lines() {
        let Some((k, v)) = line.split_once(' ') else {
            continue;
        };
        match k {
            "hostname" => name = Some(v.trim().to_string()),
            "port" => port = v.trim().parse::<u16>().ok(),
            "proxycommand" | "proxyjump" if v.trim() != "none" => return None,
            _ => {}
        }
    }
    Some((name?, port?))
}

/// The first non-empty line of a script, shortened: a label for messages.
/// Scripts never contain secrets, so this is safe to show.
pub fn first_line(script: &str) -> String {
    let line = script
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if line.chars().count() > 60 {
        let short: String = line.chars().take(57).collect();
        format!("{short}...")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn peer_script_opens_and_reports_closed_ports() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap().port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for (port, want) in [(open, "open"), (closed, "closed")] {
            let out = std::process::Command::new("sh")
                .args([
                    "-c",
                    &peer_script("127.0.0.1", port, Duration::from_secs(3)),
                ])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
            assert!(out.status.success());
        }
        assert!(peer_script("10.0.0.1", 5432, Duration::from_millis(300))
            .starts_with("if timeout 0.3 bash"));
        assert!(peer_script("10.0.0.1;reboot", 5432, Duration::from_secs(3)).starts_with(
            "if timeout 1 bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' clup-peer '10.0.0.1;reboot' 5432"
        ));
    }

    fn ssh() -> Ssh {
        Ssh {
            program: "ssh".into(),
            user: "root".into(),
            options: vec!["-i".into(), "/opt/clup/conf/id_ed25519".into()],
            connect_timeout: Duration::from_secs(3),
            check_timeout: Duration::from_secs(3),
            control_dir: None,
        }
    }

    #[test]
    fn command_line_shape() {
        let a = ssh().args("10.0.0.2", "pg_ctl status\nexit 0");
        // The operator's options first: ssh keeps the first value it sees.
        assert_eq!(
            a.join(" "),
            "-i /opt/clup/conf/id_ed25519 -T -o BatchMode=yes -o ConnectTimeout=3 \
             -o ServerAliveInterval=2 -o ServerAliveCountMax=2 -o LogLevel=ERROR \
             root@10.0.0.2 -- pg_ctl status\nexit 0"
        );
        let m = ssh()
            .with_control_dir(std::path::Path::new("/opt/clup/run"))
            .args("h", "true");
        assert_eq!(
            m[2..8].join(" "),
            "-o ControlMaster=auto -o ControlPath=/opt/clup/run/ssh-%C -o ControlPersist=60"
        );
        // The host check never rides on a master connection.
        let f = ssh()
            .with_control_dir(std::path::Path::new("/opt/clup/run"))
            .args_mux("h", "true", false);
        assert!(f.join(" ").contains("-o ControlPath=none"), "{f:?}");
        assert!(!f.join(" ").contains("ControlMaster"), "{f:?}");
        // The script is exactly one argument, the last.
        assert_eq!(a.last().unwrap(), "pg_ctl status\nexit 0");
        assert_eq!(a[a.len() - 2], "--");
    }

    #[test]
    fn labels() {
        assert_eq!(first_line("\n  set -e\nfoo"), "set -e");
        assert_eq!(first_line(&"x".repeat(100)).len(), 60);
        assert_eq!(
            ssh().describe("10.0.0.2", "pg_ctl start"),
            "ssh root@10.0.0.2: pg_ctl start"
        );
    }

    /// The real ssh client against a local port that refuses: fails fast
    /// with ssh's connection error, as host_up must (127.0.0.1 only).
    #[test]
    fn unreachable_host_is_down_quickly() {
        if cmd::run("ssh", &["-V".into()], None, Duration::from_secs(5)).is_err() {
            panic!("the ssh client is needed for this test");
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = Ssh {
            options: vec!["-p".into(), port.to_string()],
            connect_timeout: Duration::from_secs(1),
            ..ssh()
        };
        let started = Instant::now();
        assert!(!s.host_up("127.0.0.1"));
        let e = s.check_host("127.0.0.1").unwrap_err();
        assert_eq!(e.code(), Some(SSH_CONNECT_FAILED), "{e}");
        assert!(
            e.to_string()
                .starts_with("ssh root@127.0.0.1: true: exited with code 255"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A peer that accepts TCP but never speaks ssh: ConnectTimeout and
    /// our own bound still end it.
    #[test]
    fn silent_peer_is_down_within_the_connect_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let keep = std::thread::spawn(move || {
            let conn = l.accept();
            std::thread::sleep(Duration::from_secs(6));
            drop(conn);
        });
        let s = Ssh {
            options: vec!["-p".into(), port.to_string()],
            connect_timeout: Duration::from_secs(1),
            ..ssh()
        };
        let started = Instant::now();
        assert!(!s.host_up("127.0.0.1"));
        let took = started.elapsed();
        assert!(took < Duration::from_millis(3500), "took {took:?}");
        drop(keep);
    }

    #[test]
    fn endpoint_is_what_ssh_g_resolves() {
        let g = "user root\nhostname 10.0.0.7\nport 2222\nproxycommand none\nconnecttimeout 3\n";
        assert_eq!(endpoint_of(g), Some(("10.0.0.7".to_string(), 2222)));
        assert_eq!(
            endpoint_of("hostname a\nport 22\nproxyjump bastion\n"),
            None
        );
        assert_eq!(
            endpoint_of("hostname a\nproxycommand nc %h %p\nport 22\n"),
            None
        );
        assert_eq!(endpoint_of("port 22\n"), None);
    }

    /// A host whose TCP stack drops the SYN (here: a listener whose accept
    /// queue is full) is down after probe_timeout, below ssh's
    /// one-second ConnectTimeout floor, and ssh itself never runs.
    #[test]
    fn silent_host_is_down_after_a_subsecond_connect_timeout() {
        // SAFETY: plain socket calls on a descriptor this test owns.
        let (fd, port) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let mut a: libc::sockaddr_in = std::mem::zeroed();
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, &a as *const _ as *const libc::sockaddr, len),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            let mut b: libc::sockaddr_in = std::mem::zeroed();
            let mut blen = len;
            libc::getsockname(fd, &mut b as *mut _ as *mut libc::sockaddr, &mut blen);
            (fd, u16::from_be(b.sin_port))
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        // Fill the accept queue: later SYNs are dropped.
        let mut held = Vec::new();
        while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            held.push(c);
            assert!(held.len() < 64, "the accept queue never filled");
        }
        let s = Ssh {
            options: vec!["-p".into(), port.to_string()],
            check_timeout: Duration::from_millis(300),
            ..ssh()
        };
        let started = Instant::now();
        let e = s.check_host("127.0.0.1").unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(900), "took {took:?}: {e}");
        assert!(took >= Duration::from_millis(250), "took {took:?}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("ssh root@127.0.0.1: connect to 127.0.0.1:{port}")),
            "{e}"
        );
        assert!(e.to_string().contains("probe_timeout 0.3 s"), "{e}");
        drop(held);
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn the_first_call_to_a_cold_host_opens_the_master_alone() {
        let key = "test-dir|root@10.0.0.1";
        assert!(!masters::warm(key));
        let lock = masters::lock_of(key);
        let held = masters::hold(&lock, Duration::from_millis(10)).unwrap();
        // Another caller waits, but not for ever.
        let started = Instant::now();
        assert!(masters::hold(&lock, Duration::from_millis(100)).is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
        masters::mark(key, true);
        drop(held);
        assert!(masters::warm(key));
        assert!(masters::hold(&lock, Duration::from_millis(10)).is_some());
        masters::mark(key, false);
        assert!(!masters::warm(key));
    }
}
