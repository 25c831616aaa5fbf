//! Running a shell script on a database host over ssh.
//!
//! Owns: the ssh command line ([`Ssh::args`]), its time bounds, and the
//! [`Remote`] trait the other executors run their scripts through (so tests
//! and a lab can run the same scripts another way). Must not: put a secret on
//! any command line (secrets go through the child's stdin, which the remote
//! script reads), run a local shell, or decide anything from what it sees.

use std::time::Duration;

use crate::config::Config;
use crate::exec::cmd::{self, CommandError, Output};

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
        if out.code != 0 {
            return Err(CommandError::Failed {
                what: self.describe(host, label),
                code: out.code,
                stderr: out.stderr,
                stdout: out.stdout,
            });
        }
        Ok(out)
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
}

impl Ssh {
    pub fn from_config(cfg: &Config) -> Ssh {
        Ssh {
            program: "ssh".to_string(),
            user: cfg.ssh_user.clone(),
            options: cfg.ssh_options.clone(),
            connect_timeout: cfg.ssh_connect_timeout,
        }
    }

    /// The arguments of ssh for running `script` on `host`. The script is one
    /// argument after `--`; ssh hands it to the remote login shell (which
    /// must be a POSIX shell: sh, bash, dash, ksh).
    pub fn args(&self, host: &str, script: &str) -> Vec<String> {
        let secs = self.connect_timeout.as_secs().max(1);
        let mut a: Vec<String> = [
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
        .map(|s| s.to_string())
        .collect();
        a.extend(self.options.iter().cloned());
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
    pub fn check_host(&self, host: &str) -> Result<(), CommandError> {
        let timeout = self.connect_timeout + Duration::from_secs(2);
        self.run_script(host, "true", "true", None, timeout)
            .map(|_| ())
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
        let what = self.describe(host, label);
        let out = cmd::run_unchecked(
            &what,
            &self.program,
            &self.args(host, script),
            stdin,
            timeout,
        )?;
        if out.code == SSH_CONNECT_FAILED {
            // The script never ran (or ssh lost the connection): that is not
            // an answer of the script.
            return Err(CommandError::Failed {
                what,
                code: out.code,
                stderr: out.stderr,
                stdout: out.stdout,
            });
        }
        Ok(out)
    }

    fn describe(&self, host: &str, label: &str) -> String {
        format!("ssh {}@{}: {}", self.user, host, label)
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
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

    fn ssh() -> Ssh {
        Ssh {
            program: "ssh".into(),
            user: "root".into(),
            options: vec!["-i".into(), "/opt/clup/conf/id_ed25519".into()],
            connect_timeout: Duration::from_secs(3),
        }
    }

    #[test]
    fn command_line_shape() {
        let a = ssh().args("10.0.0.2", "pg_ctl status\nexit 0");
        assert_eq!(
            a.join(" "),
            "-T -o BatchMode=yes -o ConnectTimeout=3 -o ServerAliveInterval=2 \
             -o ServerAliveCountMax=2 -o LogLevel=ERROR -i /opt/clup/conf/id_ed25519 \
             root@10.0.0.2 -- pg_ctl status\nexit 0"
        );
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
}
