//! Harness for end-to-end tests in the namespace lab (scripts/lab): one lab
//! for the whole test binary, used by one test at a time. `Lab::take()`
//! brings it to its starting state (pg01 primary, pg02..pg04 streaming) and
//! lays out a fresh clup home for `mon`. A lab that cannot be built fails the
//! test with the reason; it never passes silently. `Lab::take_version` builds
//! it from another PostgreSQL major (scripts/pg-dist) and, when done, puts
//! the usual lab (Debian's 15) back before it lets the lab go.

// Some helpers serve only the HA lab tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::util::Out;

static LAB: Mutex<()> = Mutex::new(());

/// Held while a test uses the lab, so that two processes (two test runs, a
/// benchmark under `flock`) never share it: `flock /var/tmp/clup-lab.lock CMD`.
pub const LAB_LOCK: &str = "/var/tmp/clup-lab.lock";

/// Take the cross-process lab lock (blocking) and keep it while the file lives.
fn lab_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LAB_LOCK)
        .expect("open the lab lock file");
    // SAFETY: flock on a descriptor we own; released when the file is dropped.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {LAB_LOCK}: {}",
        std::io::Error::last_os_error()
    );
    f
}

pub const LAB_DIR: &str = "/var/tmp/clup-lab";
pub const WRITE_VIP: &str = "10.213.0.40";
pub const READ_VIP: &str = "10.213.0.45";
pub const MON: &str = "10.213.0.9";
pub const HTTP_TOKEN: &str = "lab_http_token";

pub fn ip(host: &str) -> &'static str {
    match host {
        "pg01" => "10.213.0.41",
        "pg02" => "10.213.0.42",
        "pg03" => "10.213.0.43",
        "pg04" => "10.213.0.44",
        "mon" => MON,
        "mon2" => "10.213.0.10",
        "mon3" => "10.213.0.11",
        "cli" => "10.213.0.50",
        _ => panic!("no lab host {host}"),
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Lab {
    _guard: MutexGuard<'static, ()>,
    _lock: std::fs::File,
    pub home: PathBuf,
    server_started: bool,
    cstlb_hosts: Vec<String>,
    /// The lab's PostgreSQL bin dir (PG_BIN of `$LAB_DIR/env`).
    pub pg_bin: String,
    /// Built with `--pg MAJOR`: the default lab is rebuilt on drop.
    pub major: Option<&'static str>,
    /// With etcd: the monitor hosts whose clupserver (own home) was started.
    monitors: Vec<String>,
    /// With etcd: the hosts running an etcd member.
    etcd_hosts: Vec<String>,
}

impl Lab {
    /// Take the lab, bring it to its starting state, lay out a fresh home
    /// with `probe_interval` and run `clupadm init`.
    pub fn take(probe_interval: u32) -> Lab {
        Lab::take_opts(probe_interval, false)
    }

    /// As [`Lab::take`], with synchronous replication (ANY 1 of the standbys).
    pub fn take_opts(probe_interval: u32, sync: bool) -> Lab {
        Lab::take_with(probe_interval, sync, None)
    }

    /// As [`Lab::take_opts`], with PostgreSQL `major` (`9.6`, `10`..`18`)
    /// from scripts/pg-dist (`scripts/lab up --pg MAJOR`).
    pub fn take_version(probe_interval: u32, sync: bool, major: &'static str) -> Lab {
        Lab::take_with(probe_interval, sync, Some(major))
    }

    fn take_with(probe_interval: u32, sync: bool, major: Option<&'static str>) -> Lab {
        let guard = LAB.lock().unwrap_or_else(|p| p.into_inner());
        let waited = Instant::now();
        let lock = lab_lock();
        if waited.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "waited {:.1} s for {LAB_LOCK} (another lab user)",
                waited.elapsed().as_secs_f64()
            );
        }
        let mut up = Command::new(repo().join("scripts/lab"));
        up.arg("up");
        if sync {
            up.arg("--sync");
        }
        if let Some(m) = major {
            up.arg(format!("--pg={m}"));
        }
        let up = up.output().expect("run scripts/lab");
        assert!(
            up.status.success(),
            "the lab could not be built:\n{}\n{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        let home = PathBuf::from(format!("{LAB_DIR}/mon-home"));
        // A server left running from this home (a demo, a failed test) is
        // stopped before its home is laid out anew.
        if home.join("bin/clup").exists() {
            let _ = Command::new(repo().join("scripts/lab"))
                .args(["exec", "mon", "env"])
                .arg(format!("CLUP_HOME={}", home.display()))
                .arg(home.join("bin/clup"))
                .args(["server", "stop"])
                .output();
        }
        // Likewise a cstlb left running on a db host (by the demo), by its pid.
        for h in ["pg01", "pg02", "pg03", "pg04"] {
            let _ = Command::new(repo().join("scripts/lab"))
                .args(["exec", h, "sh", "-c"])
                .arg("[ -f /run/cstlb.pid ] && kill $(cat /run/cstlb.pid); rm -f /run/cstlb.pid")
                .output();
        }
        lay_out_home(&home, probe_interval);
        let env = std::fs::read_to_string(format!("{LAB_DIR}/env")).unwrap_or_default();
        let pg_bin = env
            .lines()
            .find_map(|l| l.strip_prefix("PG_BIN="))
            .expect("PG_BIN in the lab's env")
            .to_string();
        let lab = Lab {
            _guard: guard,
            _lock: lock,
            home,
            server_started: false,
            cstlb_hosts: Vec::new(),
            pg_bin,
            major,
            monitors: Vec::new(),
            etcd_hosts: Vec::new(),
        };
        let init = lab.adm(&["init"]);
        assert_eq!(init.code, 0, "clupadm init in the lab: {init:?}");
        lab
    }

    /// Run a command on a lab host.
    pub fn exec(&self, host: &str, args: &[&str]) -> Out {
        self.exec_stdin(host, args, None)
    }

    pub fn exec_stdin(&self, host: &str, args: &[&str], stdin: Option<&str>) -> Out {
        use std::io::Write;
        let mut c = Command::new(repo().join("scripts/lab"));
        c.arg("exec").arg(host).args(args);
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap().into()
    }

    pub fn lab(&self, args: &[&str]) -> Out {
        Command::new(repo().join("scripts/lab"))
            .args(args)
            .output()
            .unwrap()
            .into()
    }

    /// `clup <args>` on mon with this home.
    pub fn clup(&self, args: &[&str]) -> Out {
        let home = format!("CLUP_HOME={}", self.home.display());
        let bin = self.home.join("bin/clup");
        let mut all = vec!["env", home.as_str(), bin.to_str().unwrap()];
        all.extend_from_slice(args);
        self.exec("mon", &all)
    }

    pub fn adm(&self, args: &[&str]) -> Out {
        let mut all = vec!["adm"];
        all.extend_from_slice(args);
        self.clup(&all)
    }

    /// `clupadm <args>`, retried for up to 60 s while the cluster is locked
    /// by an action the server is still finishing (a failover's read VIP and
    /// cstlb steps, a fence's stop): what an operator does on "is locked by".
    pub fn adm_when_unlocked(&self, args: &[&str]) -> Out {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.adm(args);
            if out.code == 0 || !out.stderr.contains("is locked by") || Instant::now() > end {
                return out;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn start_server(&mut self) {
        let out = self.clup(&["server", "start"]);
        assert_eq!(out.code, 0, "clupserver start in mon: {out:?}");
        self.server_started = true;
    }

    /// psql from `host` (default cli) to `target` with the lab's password;
    /// returns trimmed stdout, or the error.
    pub fn sql(&self, from: &str, target: &str, db: &str, query: &str) -> Result<String, String> {
        let conn = format!(
            "host={target} port=5432 user=postgres password=lab_pg_pass dbname={db} connect_timeout=2"
        );
        let out = self.exec(from, &["psql", "-XAtq", &conn, "-c", query]);
        if out.code == 0 {
            Ok(out.stdout.trim().to_string())
        } else {
            Err(out.stderr.trim().to_string())
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("logs/clupserver.log")).unwrap_or_default()
    }

    /// Which lab db host holds `vip` on its eth0 (None if nobody).
    pub fn vip_holder(&self, vip: &str) -> Option<String> {
        for h in ["pg01", "pg02", "pg03", "pg04"] {
            let out = self.exec(h, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
            if out.stdout.contains(&format!(" {vip}/32")) {
                return Some(h.to_string());
            }
        }
        None
    }

    /// Start cstlb on a db host as the manual does (CSTLB_TOKEN = http_token,
    /// --clup = clupserver's get_lb_host), in the background; its pid goes to
    /// the host's own /run and it is ended by that pid when the lab is dropped.
    pub fn start_cstlb(&mut self, host: &str) {
        let bin = self.home.join("bin/clup");
        let script = format!(
            "CSTLB_TOKEN={HTTP_TOKEN} setsid {} lb --clup=http://{MON}:8080/cluster01/get_lb_host --refresh 1 --check-interval 1 </dev/null >/var/log/cstlb.log 2>&1 & echo $! > /run/cstlb.pid",
            bin.display()
        );
        let out = self.exec(host, &["sh", "-c", &script]);
        assert_eq!(out.code, 0, "start cstlb on {host}: {out:?}");
        self.cstlb_hosts.push(host.to_string());
    }

    pub fn stop_cstlb(&mut self, host: &str) {
        let _ = self.exec(
            host,
            &[
                "sh",
                "-c",
                "[ -f /run/cstlb.pid ] && kill $(cat /run/cstlb.pid); rm -f /run/cstlb.pid",
            ],
        );
        self.cstlb_hosts.retain(|h| h != host);
    }

    /// `GET /backend/list` of the cstlb on `host`, from cli.
    pub fn cstlb_list(&self, host: &str, token: &str) -> (String, String) {
        let url = format!("http://{}:8082/backend/list?token={token}", ip(host));
        let out = self.exec(
            "cli",
            &["curl", "-s", "-m", "3", "-w", "\n%{http_code}", &url],
        );
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    }

    /// Start postgres on a db host by hand, as an operator would after a reboot.
    pub fn start_postgres(&self, host: &str) {
        let log = "/var/lib/postgresql/pgdata/server.log";
        let out = self.pg_ctl(host, &["start", "-w", "-l", log]);
        assert_eq!(out.code, 0, "start postgres on {host}: {out:?}");
    }

    /// Stop postgres on a db host by hand (fast, waiting), as an operator.
    pub fn stop_postgres(&self, host: &str) {
        let out = self.pg_ctl(host, &["-m", "fast", "-w", "stop"]);
        assert_eq!(out.code, 0, "pg_ctl stop on {host}: {out:?}");
    }

    /// The lab's pg_ctl on `host`'s data directory, as postgres.
    pub fn pg_ctl(&self, host: &str, args: &[&str]) -> Out {
        let pg_ctl = format!("{}/pg_ctl", self.pg_bin);
        let mut all = vec![
            "runuser",
            "-u",
            "postgres",
            "--",
            &pg_ctl,
            "-D",
            "/var/lib/postgresql/pgdata",
        ];
        all.extend_from_slice(args);
        self.exec(host, &all)
    }

    /// kill -9 the postmaster of a db host and its children, by pid.
    pub fn kill_postgres(&self, host: &str) {
        let out = self.exec(
            host,
            &["sh", "-c", "p=$(head -1 /var/lib/postgresql/pgdata/postmaster.pid) && c=$(ps -o pid= --ppid $p); kill -9 $p $c 2>/dev/null; sleep 0.2; ! kill -0 $p 2>/dev/null"],
        );
        assert_eq!(out.code, 0, "kill postgres on {host}: {out:?}");
    }

    /// Is postgres on `host` answering, and is it in recovery?
    pub fn role(&self, host: &str) -> Option<bool> {
        self.sql("cli", ip(host), "postgres", "select pg_is_in_recovery()")
            .ok()
            .map(|s| s == "t")
    }

    /// The parsed `clupadm show --json`.
    pub fn show(&self) -> serde_json::Value {
        let out = self.adm(&["show", "--json"]);
        assert_eq!(out.code, 0, "show --json: {out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// `(state, primary)` of db `id` from `clupadm show --json`.
    pub fn db_state(&self, id: u32) -> (String, u64) {
        let v = self.show();
        let d = v["dbs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()
            .clone();
        (
            d["state"].as_str().unwrap().to_string(),
            d["primary"].as_u64().unwrap(),
        )
    }

    /// Poll `f` every 200 ms for up to `secs`.
    pub fn wait(&self, secs: u64, mut f: impl FnMut(&Lab) -> bool) -> bool {
        crate::util::wait_every(secs, 200, || f(self))
    }
}

/// A fresh clup home at `home` for a lab monitor (scripts/lab-home).
fn lay_out_home(home: &std::path::Path, probe_interval: u32) {
    let _ = std::fs::remove_dir_all(home);
    let mk = Command::new(repo().join("scripts/lab-home"))
        .arg(home)
        .args([
            "--bin",
            &crate::util::lab_bin(),
            "--probe-interval",
            &probe_interval.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        mk.status.success(),
        "lab-home {}: {}",
        home.display(),
        String::from_utf8_lossy(&mk.stderr)
    );
}

/// The monitor hosts of the etcd lab; each runs an etcd member.
pub const MONITORS: [&str; 3] = ["mon", "mon2", "mon3"];

/// The lab's etcd client URLs.
pub fn etcd_endpoints() -> String {
    MONITORS
        .iter()
        .map(|h| format!("http://{}:2379", ip(h)))
        .collect::<Vec<_>>()
        .join(",")
}

impl Lab {
    /// [`Lab::take_opts`] with synchronous replication, then a 3-member etcd
    /// on mon, mon2 and mon3, every monitor's home (mon's, and
    /// `$LAB_DIR/<host>-home` for the others) on `meta_store = etcd` with
    /// `leader_ttl`, and the meta initialized in etcd. No server started.
    pub fn take_etcd(probe_interval: u32, leader_ttl: u32) -> Lab {
        let mut lab = Lab::take_opts(probe_interval, true);
        let cluster = MONITORS
            .iter()
            .map(|h| format!("{h}=http://{}:2380", ip(h)))
            .collect::<Vec<_>>()
            .join(",");
        for h in MONITORS {
            let dir = format!("{LAB_DIR}/etcd/{h}");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let a = ip(h);
            let script = format!(
                "setsid /usr/bin/etcd --name {h} --data-dir {dir} \
                 --listen-client-urls http://{a}:2379 --advertise-client-urls http://{a}:2379 \
                 --listen-peer-urls http://{a}:2380 --initial-advertise-peer-urls http://{a}:2380 \
                 --initial-cluster {cluster} --initial-cluster-state new --initial-cluster-token clup-lab \
                 </dev/null >{dir}.log 2>&1 & echo $! > /run/etcd.pid"
            );
            let out = lab.exec(h, &["sh", "-c", &script]);
            assert_eq!(out.code, 0, "start etcd on {h}: {out:?}");
            lab.etcd_hosts.push(h.to_string());
        }
        assert!(
            lab.wait(20, |l| l
                .exec(
                    "mon",
                    &["curl", "-s", "-m", "1", "http://10.213.0.9:2379/health"]
                )
                .stdout
                .contains("\"health\":\"true\"")),
            "the lab's etcd did not become healthy"
        );
        let extra = format!(
            "meta_store = etcd\netcd_endpoints = {}\netcd_prefix = /clup-lab\netcd_timeout = 1\nleader_ttl = {leader_ttl}\n",
            etcd_endpoints()
        );
        for h in MONITORS {
            let home = lab.home_of(h);
            if h != "mon" {
                lay_out_home(&home, probe_interval);
            }
            let conf = home.join("conf/clup.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(&extra);
            std::fs::write(&conf, text).unwrap();
        }
        let init = lab.adm(&["init"]);
        assert_eq!(init.code, 0, "clupadm init into etcd: {init:?}");
        lab
    }

    /// The clup home of a monitor host.
    pub fn home_of(&self, host: &str) -> PathBuf {
        if host == "mon" {
            self.home.clone()
        } else {
            PathBuf::from(format!("{LAB_DIR}/{host}-home"))
        }
    }

    /// `clup <args>` on monitor `host` with its own home.
    pub fn clup_on(&self, host: &str, args: &[&str]) -> Out {
        let home = self.home_of(host);
        let env = format!("CLUP_HOME={}", home.display());
        let bin = home.join("bin/clup");
        let mut all = vec!["env", env.as_str(), bin.to_str().unwrap()];
        all.extend_from_slice(args);
        self.exec(host, &all)
    }

    /// Start the clupserver of monitor `host`.
    pub fn start_monitor(&mut self, host: &str) {
        let out = self.clup_on(host, &["server", "start"]);
        assert_eq!(out.code, 0, "clupserver start in {host}: {out:?}");
        if host == "mon" {
            self.server_started = true;
        } else {
            self.monitors.push(host.to_string());
        }
    }

    /// The clupserver log of monitor `host`.
    pub fn log_of(&self, host: &str) -> String {
        std::fs::read_to_string(self.home_of(host).join("logs/clupserver.log")).unwrap_or_default()
    }

    /// Kill the etcd member on `host` (by its pid file).
    pub fn kill_etcd(&self, host: &str) {
        let _ = self.exec(
            host,
            &[
                "sh",
                "-c",
                "[ -f /run/etcd.pid ] && kill -9 $(cat /run/etcd.pid)",
            ],
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in self.monitors.clone() {
            let _ = self.clup_on(&h, &["server", "stop"]);
        }
        for h in self.etcd_hosts.clone() {
            self.kill_etcd(&h);
        }
        for h in self.cstlb_hosts.clone() {
            self.stop_cstlb(&h);
        }
        if self.server_started {
            let _ = self.clup(&["server", "stop"]);
        }
        // Leave no partition behind for the next test.
        let _ = self.lab(&["heal"]);
        // Another major: the next user (another test, another process,
        // whose scripts/lab may keep the recorded version) gets the usual lab.
        if self.major.is_some() {
            let out = self.lab(&["up"]);
            if out.code != 0 {
                eprintln!("could not put the default lab back: {out:?}");
            }
        }
    }
}
