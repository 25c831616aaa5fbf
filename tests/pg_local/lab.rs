//! A throw-away PostgreSQL 15 replication cluster on 127.0.0.1 for the
//! executor tests: temp dirs owned by `postgres`, free ports, and a Drop
//! guard that resumes, stops and removes everything it started (by pid).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clup::exec::cmd::{self, CommandError, Output};
use clup::exec::ssh::Remote;
use clup::model::config::{Config, Secret};
use clup::model::meta::Db;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER_PASS: &str = "su'per \\pass";
pub const PROBE_PASS: &str = "probe pass'";
/// Every character that has broken a conninfo or a config file somewhere.
pub const REPL_PASS: &str = r#"p'a\ss w"rd$(id)`x`;#"#;

/// Runs "remote" scripts with the local sh: the same scripts ssh would send,
/// against servers on 127.0.0.1. Test-only; the library never runs a local
/// shell.
pub struct LocalSh;

impl Remote for LocalSh {
    fn run_script_unchecked(
        &self,
        host: &str,
        label: &str,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError> {
        assert_eq!(host, "127.0.0.1", "tests only act on 127.0.0.1");
        cmd::run_unchecked(
            &self.describe(host, label),
            "sh",
            &["-c".to_string(), script.to_string()],
            stdin,
            timeout,
        )
    }

    fn describe(&self, host: &str, label: &str) -> String {
        format!("local sh {host}: {label}")
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub fn config(probe_timeout: Duration) -> Config {
    let text = "\
network = 127.0.0.0
ha_rpc_pass = rpc
probe_db_name = cs_sys_ha
probe_user = clup_probe
probe_password = x
ha_db_user = postgres
ha_db_pass = x
db_repl_user = repl
db_repl_pass = x
http_token = t
cstlb_token = t
";
    let mut c = Config::parse(text, Path::new("/test/clup.conf")).expect("test config");
    c.probe_password = Secret::new(PROBE_PASS);
    c.ha_db_pass = Secret::new(SUPERUSER_PASS);
    c.db_repl_pass = Secret::new(REPL_PASS);
    c.probe_timeout = probe_timeout;
    c.pg_bin_dir = String::new();
    c
}

/// Run a PostgreSQL tool as `postgres`, with a password in the environment
/// (never on the command line). Panics with the tool's output on failure.
fn as_postgres(args: &[&str], password: Option<&str>) -> String {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).args(args).current_dir("/");
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?} as postgres: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "PostgreSQL could not be set up: {} failed ({}):\n{text}",
        args[0],
        out.status
    );
    text
}

pub struct Lab {
    pub root: PathBuf,
    pub dbs: Vec<Db>,
    /// Pids this test stopped with SIGSTOP; resumed on drop.
    pub stopped: Vec<i32>,
}

impl Lab {
    /// Make the primary's data directory (initdb) with a few settings.
    pub fn new(ports: &[u16]) -> Lab {
        assert!(
            Path::new(PG_BIN).join("initdb").exists(),
            "PostgreSQL 15 is needed at {PG_BIN}"
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let root =
            std::env::temp_dir().join(format!("clup-exec-it-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        chown_postgres(&root);
        let dbs = ports
            .iter()
            .enumerate()
            .map(|(i, port)| Db {
                id: i as u32 + 1,
                state: 1,
                os_user: "postgres".into(),
                pgdata: root.join(format!("pg{}", i + 1)).display().to_string(),
                is_primary: u8::from(i == 0),
                repl_app_name: format!("stb{:02}", i + 1),
                host: "127.0.0.1".into(),
                switch_host: "127.0.0.1".into(),
                port: *port,
            })
            .collect();
        let lab = Lab {
            root,
            dbs,
            stopped: Vec::new(),
        };
        let pwfile = lab.root.join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASS).unwrap();
        chown_postgres(&pwfile);
        as_postgres(
            &[
                &format!("{PG_BIN}/initdb"),
                "-D",
                &lab.dbs[0].pgdata,
                "-U",
                "postgres",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
            ],
            None,
        );
        std::fs::remove_file(&pwfile).unwrap();
        lab.set_port(0);
        lab
    }

    /// Append our settings (last one wins) to db `i`'s postgresql.conf.
    pub fn set_port(&self, i: usize) {
        let conf = Path::new(&self.dbs[i].pgdata).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\n# clup exec tests\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nmax_connections = 20\nshared_buffers = '16MB'\n\
             fsync = off\nlogging_collector = off\nwal_keep_size = '64MB'\n",
            self.dbs[i].port,
            self.root.display()
        ));
        std::fs::write(&conf, text).unwrap();
    }

    /// pg_basebackup of db 0 into db `i`'s pgdata (no recovery settings:
    /// the test writes them with clup's own code).
    pub fn base_backup(&self, i: usize) {
        as_postgres(
            &[
                &format!("{PG_BIN}/pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                &self.dbs[0].port.to_string(),
                "-U",
                "repl",
                "-D",
                &self.dbs[i].pgdata,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            Some(REPL_PASS),
        );
        self.set_port(i);
    }

    /// The postmaster's pid from postmaster.pid.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        let f = Path::new(&self.dbs[i].pgdata).join("postmaster.pid");
        std::fs::read_to_string(f)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGSTOP db `i`'s postmaster and all its children, remembering them.
    pub fn freeze(&mut self, i: usize) {
        let pm = self.postmaster_pid(i).expect("postmaster running");
        let mut pids = vec![pm];
        pids.extend(children_of(pm));
        for p in pids {
            // SAFETY: signalling processes this test started (postmaster of
            // our temp cluster and its children).
            unsafe { libc::kill(p, libc::SIGSTOP) };
            self.stopped.push(p);
        }
    }

    pub fn thaw(&mut self) {
        for p in self.stopped.drain(..) {
            // SAFETY: as in freeze.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }

    /// A superuser connection to db `i`.
    pub fn sql(&self, i: usize, dbname: &str) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.dbs[i].port)
            .user("postgres")
            .password(SUPERUSER_PASS)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5))
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to db {}: {e}", i + 1))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.thaw();
        for i in 0..self.dbs.len() {
            let Some(pid) = self.postmaster_pid(i) else {
                continue;
            };
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(format!("{PG_BIN}/pg_ctl"))
                .args([
                    "stop",
                    "-D",
                    &self.dbs[i].pgdata,
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "10",
                ])
                .current_dir("/")
                .output();
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                // SAFETY: the postmaster this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn chown_postgres(p: &Path) {
    let out = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(p)
        .output()
        .expect("chown");
    assert!(out.status.success(), "chown {}: {:?}", p.display(), out);
}

pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Direct children of `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state, ppid, ...
        let rest = stat.rsplit(')').next().unwrap_or("");
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Poll `f` until it gives `Some`, or panic with `what` and the last value.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
