//! pg_ctl on a database host, run over a [`Remote`] as the database's
//! os_user.
//!
//! Owns: the remote scripts (pure functions, so they are tested without a
//! host) that find pg_ctl and run start / stop -m fast / status / promote.
//! Must not: decide when to start or stop anything.
//!
//! Finding pg_ctl: `pg_bin_dir` from clup.conf when set; otherwise the
//! directory matching the cluster's `PG_VERSION` (`/usr/lib/postgresql/N/bin`,
//! `/usr/pgsql-N/bin`), then `pg_ctl` on the PATH, then any
//! `/usr/lib/postgresql/*/bin` or `/usr/pgsql-*/bin`. The version match comes
//! before PATH because a distribution's pg_ctl on the PATH may be another
//! major version than the cluster's.
//!
//! `start` uses `-l <pgdata>/clup_start.log`: without `-l` the postmaster
//! would inherit the ssh session's stdout and keep it open forever. With
//! logging_collector on, that file only gets the lines written before the
//! collector starts; with it off, it is the server log (as with any `pg_ctl
//! -l`). On failure its last lines are added to the error.

use std::time::Duration;

use crate::exec::cmd::{CommandError, Output};
use crate::exec::shell::quote;
use crate::exec::ssh::Remote;
use crate::model::config::Config;
use crate::model::meta::Db;

/// How long pg_ctl waits (`-t`) for start, stop and promote.
pub const PG_CTL_WAIT: Duration = Duration::from_secs(60);

/// The start log, relative to pgdata.
pub const START_LOG: &str = "clup_start.log";

/// What `pg_ctl status` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Running {
        pid: Option<u32>,
    },
    Stopped,
    /// No (accessible) data directory.
    NoDataDir,
}

/// Shell lines that set `user`, `pgdata`, `bin`, define `as_user` and find
/// pg_ctl (see the module comment).
pub fn prelude(db: &Db, cfg: &Config) -> String {
    format!(
        r#"user={user}; pgdata={pgdata}; bin={bin}
cd / || exit 1
as_user() {{ if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }}
if [ -z "$bin" ]; then
  v=$(cat "$pgdata/PG_VERSION" 2>/dev/null)
  for d in "/usr/lib/postgresql/$v/bin" "/usr/pgsql-$v/bin"; do
    if [ -n "$v" ] && [ -x "$d/pg_ctl" ]; then bin=$d; break; fi
  done
fi
if [ -z "$bin" ] && p=$(command -v pg_ctl 2>/dev/null); then bin=${{p%/*}}; fi
if [ -z "$bin" ]; then
  for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
    if [ -x "$d/pg_ctl" ]; then bin=$d; fi
  done
fi
if [ -z "$bin" ]; then echo "clup: pg_ctl not found on this host; set pg_bin_dir in clup.conf" >&2; exit 127; fi
"#,
        user = quote(&db.os_user),
        pgdata = quote(&db.pgdata),
        bin = quote(cfg.pg_bin_dir.trim_end_matches('/')),
    )
}

/// Start the server and wait until it accepts connections; a running server
/// is left alone.
pub fn start_script(db: &Db, cfg: &Config, wait: Duration) -> String {
    format!(
        r#"{prelude}if as_user "$bin/pg_ctl" status -D "$pgdata" >/dev/null 2>&1; then echo "server is already running"; exit 0; fi
as_user "$bin/pg_ctl" start -D "$pgdata" -w -t {t} -l "$pgdata/{log}" </dev/null
rc=$?
if [ $rc -ne 0 ]; then {{ {tails}; }} >&2; fi
exit $rc
"#,
        prelude = prelude(db, cfg),
        t = wait.as_secs().max(1),
        log = START_LOG,
        tails = LOG_TAILS.replace("@N@", "20"),
    )
}

/// Shell lines that print the last @N@ lines of the start log and of the
/// newest file in the server's default log directories (`log` from 10,
/// `pg_log` before): with logging_collector on, the start log holds only
/// a line that says where the log went.
const LOG_TAILS: &str = r#"echo "--- last lines of $pgdata/clup_start.log:"; tail -n @N@ "$pgdata/clup_start.log"
f=$(ls -t "$pgdata"/log/* "$pgdata"/pg_log/* 2>/dev/null | head -n 1)
if [ -n "$f" ]; then echo "--- last lines of $f (but 'the database system is ...' said to clients):"
  grep -v 'FATAL:  the database system is' "$f" | tail -n @N@
  echo "--- its last PANIC and FATAL lines:"; grep -E 'PANIC:|FATAL:' "$f" | grep -v 'the database system is' | tail -n 5; fi"#;

/// `pg_ctl stop -m fast -w`; a stopped server is left alone.
pub fn stop_fast_script(db: &Db, cfg: &Config, wait: Duration) -> String {
    format!(
        r#"{prelude}as_user "$bin/pg_ctl" status -D "$pgdata" >/dev/null 2>&1
if [ $? -eq 3 ]; then echo "server is not running"; exit 0; fi
as_user "$bin/pg_ctl" stop -D "$pgdata" -m fast -w -t {t}
"#,
        prelude = prelude(db, cfg),
        t = wait.as_secs().max(1),
    )
}

/// `pg_ctl status`; its exit code is the answer (0, 3 or 4).
pub fn status_script(db: &Db, cfg: &Config) -> String {
    format!(
        "{}as_user \"$bin/pg_ctl\" status -D \"$pgdata\"\n",
        prelude(db, cfg)
    )
}

/// `pg_ctl promote -w -t N` with `wait`, else `pg_ctl promote` (before
/// PostgreSQL 10, pg_ctl cannot wait for a promotion).
pub fn promote_script(db: &Db, cfg: &Config, wait: Option<Duration>) -> String {
    let w = wait.map_or(String::new(), |w| format!(" -w -t {}", w.as_secs().max(1)));
    format!(
        "{}as_user \"$bin/pg_ctl\" promote -D \"$pgdata\"{w}\n",
        prelude(db, cfg),
    )
}

/// Kill the server for certain, for a fence: SIGKILL to the postmaster
/// named by postmaster.pid (only if it is a postgres process of os_user:
/// a stale pid file may name somebody else's process) and to its children
/// at once (a SIGSTOPped server dies too: SIGKILL needs no cooperation),
/// then wait up to 5 s until they are all gone and nothing listens on the
/// port. Exits 1, saying what is left, if that cannot be confirmed.
pub fn kill_script(db: &Db) -> String {
    format!(
        r#"user={user}; pgdata={pgdata}; port={port}
cd / || exit 1
pid=$(head -n 1 "$pgdata/postmaster.pid" 2>/dev/null)
case "$pid" in ''|*[!0-9]*) pid= ;; esac
kids=
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
  comm=$(ps -o comm= -p "$pid" 2>/dev/null); owner=$(ps -o user= -p "$pid" 2>/dev/null)
  case "$comm" in
    postgres|postmaster) ;;
    *) echo "clup: pid $pid of $pgdata/postmaster.pid is '$comm', not postgres: not killed" >&2; pid= ;;
  esac
  if [ -n "$pid" ] && [ "$owner" != "$user" ]; then
    echo "clup: pid $pid runs as '$owner', not $user: not killed" >&2; pid=
  fi
fi
if [ -n "$pid" ]; then
  kids=$(ps -o pid= --ppid "$pid" 2>/dev/null)
  kill -9 "$pid" $kids 2>/dev/null
  echo "killed postmaster $pid and $(echo $kids | wc -w) child process(es)"
else
  echo "no postmaster of $pgdata runs"
fi
# A child stuck in uninterruptible I/O (a frozen or dying disk) with
# SIGKILL pending never runs again: it dies the moment its I/O returns,
# before it could answer anyone. After 0.3 s such children no longer
# hold the fence; the postmaster itself must be gone.
doomed_p() {{
  case "$2" in D*) ;; *) return 1 ;; esac
  for m in $(awk '/^(ShdPnd|SigPnd):/ {{print $2}}' "/proc/$1/status" 2>/dev/null); do
    [ $(( 0x$m & 0x100 )) -ne 0 ] && return 0
  done
  return 1
}}
i=0; alive=; doomed=
list=$(echo $pid $kids | tr ' ' ',')
while [ -n "$list" ] && [ $i -lt 50 ]; do
  alive=; doomed=
  # One ps for all of them (a killed server may leave hundreds of backends).
  for ps_line in $(ps -o pid=,stat= -p "$list" 2>/dev/null | awk '{{print $1 ":" $2}}'); do
    p=${{ps_line%%:*}}; st=${{ps_line#*:}}
    # A zombie is gone for good; it only waits to be reaped.
    case "$st" in Z*) continue ;; esac
    if [ $i -ge 3 ] && [ "$p" != "$pid" ] && doomed_p "$p" "$st"; then doomed="$doomed $p($st)"; continue; fi
    alive="$alive $p($st)"
  done
  [ -z "$alive" ] && break
  sleep 0.1; i=$((i+1))
done
if [ -n "$alive" ]; then echo "clup: still alive 5 s after kill -9:$alive (D: stuck in uninterruptible I/O)" >&2; exit 1; fi
[ -z "$doomed" ] || echo "stuck in uninterruptible I/O with SIGKILL pending (they die when it returns, never to run again):$doomed"
if command -v ss >/dev/null 2>&1 && ss -ltn 2>/dev/null | awk '{{print $4}}' | grep -q "[:.]$port\$"; then
  echo "clup: something still listens on port $port" >&2; exit 1
fi
exit 0
"#,
        user = quote(&db.os_user),
        pgdata = quote(&db.pgdata),
        port = db.port,
    )
}

fn budget(remote: &dyn Remote, wait: Duration) -> Duration {
    remote.connect_timeout() + wait + Duration::from_secs(10)
}

/// The line that says why a start failed, from its error (which carries
/// the last lines of the start log): the first PANIC, else the first
/// FATAL (but "the database system is starting up" and its kin, said to
/// clients), else the last line; at most 200 characters.
pub fn start_failure_why(error: &str) -> String {
    let lines: Vec<&str> = error
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Clients turned away while it starts or stops say nothing of why.
    let fatal = |l: &&&str| l.contains("FATAL:") && !l.contains("the database system is ");
    let pick = lines
        .iter()
        .find(|l| l.contains("PANIC:"))
        .or_else(|| lines.iter().find(fatal))
        .or(lines.last())
        .copied()
        .unwrap_or("");
    pick.chars().take(200).collect()
}

/// The last `n` lines of the server's start log ([`START_LOG`]) and of its
/// newest log file (see [`LOG_TAILS`]), for an
/// error that must say why a server does what it does; empty when they
/// cannot be read.
pub fn start_log_tail(remote: &dyn Remote, db: &Db, cfg: &Config, n: u32) -> String {
    let script = format!(
        "{}{}\n",
        prelude(db, cfg),
        LOG_TAILS.replace("@N@", &n.to_string())
    );
    remote
        .run_script(
            &db.host,
            &format!("tail {START_LOG} {}", db.pgdata),
            &script,
            None,
            remote.connect_timeout() + Duration::from_secs(10),
        )
        .map(|o| o.stdout)
        .unwrap_or_default()
}

pub fn start(remote: &dyn Remote, db: &Db, cfg: &Config) -> Result<Output, CommandError> {
    remote.run_script(
        &db.host,
        &format!("pg_ctl start {}", db.pgdata),
        &start_script(db, cfg, PG_CTL_WAIT),
        None,
        budget(remote, PG_CTL_WAIT),
    )
}

pub fn stop_fast(remote: &dyn Remote, db: &Db, cfg: &Config) -> Result<Output, CommandError> {
    remote.run_script(
        &db.host,
        &format!("pg_ctl stop -m fast {}", db.pgdata),
        &stop_fast_script(db, cfg, PG_CTL_WAIT),
        None,
        budget(remote, PG_CTL_WAIT),
    )
}

/// [`kill_script`] on the database's host.
pub fn kill(remote: &dyn Remote, db: &Db) -> Result<Output, CommandError> {
    remote.run_script(
        &db.host,
        &format!("kill -9 postgres {}", db.pgdata),
        &kill_script(db),
        None,
        remote.connect_timeout() + Duration::from_secs(10),
    )
}

/// `pg_ctl promote`, waiting for the promotion (`wait`, PostgreSQL 10+) or
/// not (the caller then watches for it).
pub fn promote(
    remote: &dyn Remote,
    db: &Db,
    cfg: &Config,
    wait: bool,
) -> Result<Output, CommandError> {
    remote.run_script(
        &db.host,
        &format!("pg_ctl promote {}", db.pgdata),
        &promote_script(db, cfg, wait.then_some(PG_CTL_WAIT)),
        None,
        budget(remote, PG_CTL_WAIT),
    )
}

pub fn status(remote: &dyn Remote, db: &Db, cfg: &Config) -> Result<Status, CommandError> {
    let label = format!("pg_ctl status {}", db.pgdata);
    let out = remote.run_script_unchecked(
        &db.host,
        &label,
        &status_script(db, cfg),
        None,
        budget(remote, Duration::from_secs(5)),
    )?;
    match out.code {
        0 => Ok(Status::Running {
            pid: parse_status_pid(&out.stdout),
        }),
        3 => Ok(Status::Stopped),
        4 => Ok(Status::NoDataDir),
        code => Err(CommandError::Failed {
            what: remote.describe(&db.host, &label),
            code,
            stderr: out.stderr,
            stdout: out.stdout,
        }),
    }
}

/// The pid in `pg_ctl: server is running (PID: 1234)`.
fn parse_status_pid(stdout: &str) -> Option<u32> {
    let rest = &stdout[stdout.find("(PID: ")? + 6..];
    rest[..rest.find(')')?].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cmd;
    use std::path::Path;

    pub(crate) fn db() -> Db {
        Db {
            id: 2,
            state: 1,
            os_user: "postgres".into(),
            pgdata: "/home/postgres/pgdata".into(),
            is_primary: 0,
            repl_app_name: "stb42".into(),
            host: "192.168.56.42".into(),
            switch_host: "192.168.56.42".into(),
            port: 5432,
        }
    }

    fn cfg(bin: &str) -> Config {
        let text = format!("{}pg_bin_dir = {bin}\n", crate::model::config::SAMPLE);
        Config::parse(&text, Path::new("/c")).unwrap()
    }

    #[test]
    fn scripts_quote_and_use_pg_ctl() {
        let s = start_script(&db(), &cfg("/usr/pgsql-15/bin/"), PG_CTL_WAIT);
        assert!(
            s.starts_with("user=postgres; pgdata=/home/postgres/pgdata; bin=/usr/pgsql-15/bin\n"),
            "{s}"
        );
        assert!(s.contains(r#"as_user "$bin/pg_ctl" start -D "$pgdata" -w -t 60 -l "$pgdata/clup_start.log" </dev/null"#), "{s}");
        let s = stop_fast_script(&db(), &cfg("/usr/pgsql-15/bin"), Duration::from_secs(30));
        assert!(s.contains(r#"stop -D "$pgdata" -m fast -w -t 30"#), "{s}");
        let s = promote_script(&db(), &cfg("/x"), Some(PG_CTL_WAIT));
        assert!(
            s.ends_with("as_user \"$bin/pg_ctl\" promote -D \"$pgdata\" -w -t 60\n"),
            "{s}"
        );
        let s = promote_script(&db(), &cfg("/x"), None);
        assert!(
            s.ends_with("as_user \"$bin/pg_ctl\" promote -D \"$pgdata\"\n"),
            "{s}"
        );
        // Defence in depth: even a value meta.rs would reject stays one word.
        let mut d = db();
        d.pgdata = "/data/$(reboot)".into();
        let s = status_script(&d, &cfg("/x"));
        assert!(
            s.starts_with("user=postgres; pgdata='/data/$(reboot)'; bin=/x\n"),
            "{s}"
        );
    }

    #[test]
    fn status_pid() {
        assert_eq!(
            parse_status_pid("pg_ctl: server is running (PID: 4242)\n/usr/lib/postgresql/15/bin/postgres \"-D\" \"/x\"\n"),
            Some(4242)
        );
        assert_eq!(parse_status_pid("pg_ctl: no server running\n"), None);
    }

    /// The prelude's pg_ctl discovery, run by the local sh against a fake
    /// layout (a temp dir standing in for /usr/lib/postgresql is not
    /// possible, so this checks pg_bin_dir and PATH lookup and the error).
    #[test]
    fn discovery_runs_in_sh() {
        let dir = std::env::temp_dir().join(format!("clup-pgctl-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let fake = bin.join("pg_ctl");
        std::fs::write(&fake, "#!/bin/sh\necho \"fake pg_ctl $*\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = cmd::run("id", &["-un".into()], None, Duration::from_secs(5))
            .unwrap()
            .stdout
            .trim()
            .to_string();
        let mut d = db();
        d.os_user = me;
        d.pgdata = dir.join("nodata").display().to_string();
        let run = |script: String, path: &str| {
            cmd::run(
                "env",
                &[format!("PATH={path}"), "sh".into(), "-c".into(), script],
                None,
                Duration::from_secs(5),
            )
        };
        // pg_bin_dir given.
        let out = run(
            status_script(&d, &cfg(&bin.display().to_string())),
            "/usr/bin:/bin",
        )
        .unwrap();
        assert_eq!(out.stdout, format!("fake pg_ctl status -D {}\n", d.pgdata));
        // Empty pg_bin_dir: found on PATH (no PG_VERSION to match).
        let empty = Config {
            pg_bin_dir: String::new(),
            ..cfg("/x")
        };
        let path = format!("{}:/usr/bin:/bin", bin.display());
        let out = run(promote_script(&d, &empty, Some(PG_CTL_WAIT)), &path).unwrap();
        assert!(out.stdout.starts_with("fake pg_ctl promote -D "), "{out:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The fence's kill, run by the local sh against a fake server: a copy
    /// of sh named `postgres`, stopped (SIGSTOP, as a hung server) with two
    /// children. All three must be gone after it; a pid file naming a
    /// process that is not postgres must leave that process alone.
    #[test]
    fn kill_script_kills_a_stopped_postmaster_and_its_children_only() {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("clup-kill-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("postgres");
        std::fs::copy("/bin/sh", &fake).unwrap();
        let mut child = std::process::Command::new(&fake)
            .args(["-c", "sleep 300 & sleep 300 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::fs::write(
            dir.join("postmaster.pid"),
            format!("{pid}\n{}\n", dir.display()),
        )
        .unwrap();
        let kids = || {
            let out = cmd::run(
                "ps",
                &["-o".into(), "pid=".into(), "--ppid".into(), pid.to_string()],
                None,
                Duration::from_secs(5),
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
            out.split_whitespace().count()
        };
        let t0 = std::time::Instant::now();
        while kids() < 2 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(kids(), 2, "the fake postmaster's children");
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let me = cmd::run("id", &["-un".into()], None, Duration::from_secs(5))
            .unwrap()
            .stdout
            .trim()
            .to_string();
        let mut d = db();
        d.os_user = me;
        d.pgdata = dir.display().to_string();
        d.port = 1; // nothing listens there
        let run = |d: &Db| {
            cmd::run(
                "sh",
                &["-c".into(), kill_script(d)],
                None,
                Duration::from_secs(10),
            )
        };
        let out = run(&d).unwrap();
        assert!(
            out.stdout
                .contains(&format!("killed postmaster {pid} and 2 child")),
            "{out:?}"
        );
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        let t0 = std::time::Instant::now();
        while kids() > 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its children are gone too (reparented, maybe not reaped yet: a
        // zombie is gone for good).
        let left = cmd::run(
            "ps",
            &[
                "-o".into(),
                "pid=,stat=".into(),
                "-g".into(),
                pid.to_string(),
            ],
            None,
            Duration::from_secs(5),
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
        let alive: Vec<&str> = left
            .lines()
            .filter(|l| !l.trim_end().ends_with('Z') && !l.contains(" Z"))
            .collect();
        assert!(alive.is_empty(), "children left: {left}");

        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A stale pid file naming another process of the same user: refused,
    /// that process lives.
    #[test]
    fn kill_script_leaves_a_process_that_is_not_postgres_alone() {
        let dir = std::env::temp_dir().join(format!("clup-kill-other-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = cmd::run("id", &["-un".into()], None, Duration::from_secs(5))
            .unwrap()
            .stdout
            .trim()
            .to_string();
        let mut d = db();
        d.os_user = me;
        d.pgdata = dir.display().to_string();
        d.port = 1;
        let run = |d: &Db| {
            cmd::run(
                "sh",
                &["-c".into(), kill_script(d)],
                None,
                Duration::from_secs(10),
            )
        };
        let mut other = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        std::fs::write(dir.join("postmaster.pid"), format!("{}\n", other.id())).unwrap();
        let out = run(&d).unwrap();
        assert!(out.stderr.contains("not postgres: not killed"), "{out:?}");
        assert!(
            other.try_wait().unwrap().is_none(),
            "an unrelated process was killed"
        );
        other.kill().unwrap();
        let _ = other.wait();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_start_says_why() {
        let err = "pg_ctl start /var/lib/postgresql/pgdata on pg01: exit status 1
waiting for server to start.... stopped waiting
--- last lines of /var/lib/postgresql/pgdata/clup_start.log:
2026-12-06 07:00:01 UTC [81] LOG:  database system was interrupted; last known up at 07:00:00
2026-12-06 07:00:01 UTC [81] FATAL:  the database system is starting up
2026-12-06 07:00:01 UTC [81] PANIC:  could not write to file \"pg_wal/xlogtemp.81\": No space left on device
2026-12-06 07:00:01 UTC [80] LOG:  startup process (PID 81) was terminated by signal 6: Aborted";
        assert_eq!(
            start_failure_why(err),
            "2026-12-06 07:00:01 UTC [81] PANIC:  could not write to file \"pg_wal/xlogtemp.81\": No space left on device"
        );
        let fatal = "--- last lines:\nLOG: x\nFATAL:  data directory \"/d\" has invalid permissions\nLOG: y";
        assert_eq!(
            start_failure_why(fatal),
            "FATAL:  data directory \"/d\" has invalid permissions"
        );
        assert_eq!(
            start_failure_why("ssh: connect to host pg01 port 22: No route to host\n"),
            "ssh: connect to host pg01 port 22: No route to host"
        );
        assert_eq!(start_failure_why(""), "");
        let probes = "LOG:  database system was interrupted\nFATAL:  the database system is starting up\nFATAL:  could not open file \"global/pg_filenode.map\": Permission denied\nFATAL:  the database system is starting up";
        assert_eq!(
            start_failure_why(probes),
            "FATAL:  could not open file \"global/pg_filenode.map\": Permission denied"
        );
        assert_eq!(start_failure_why(&"x".repeat(500)).len(), 200);
    }
}
