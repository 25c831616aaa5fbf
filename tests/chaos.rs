//! The fault matrix: each test is one fault scenario in the lab, run while
//! a writer commits numbered rows through the write VIP (synchronous
//! replication on) and a reader reads through cstlb. Afterwards, once the
//! cluster is healthy again, it checks:
//! - every acknowledged id is on the primary and on every Normal standby;
//! - no two nodes acknowledged writes at overlapping times (each node is
//!   probed from `cli` throughout with a write of its own, stamped with the
//!   server's clock: the lab's hosts share one kernel clock, so the stamps of
//!   different nodes compare);
//! - the meta matches reality: one primary, not in recovery, the write VIP on
//!   it alone, every Normal standby in recovery and streaming from it.
//!
//! Each test appends a row to the table that `scripts/chaos` prints:
//! scenario, acknowledged writes, lost, duplicate primaries, write outage.
//!
//! The clients are real psql processes started inside the lab's `cli`
//! network namespace (setns in the child), each with a hard deadline: a
//! client whose server hangs (SIGSTOP, a partition) is killed with SIGKILL,
//! never cancelled — a cancel during the synchronous-replication wait would
//! turn into a local commit reported as success.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::lab::{ip, Lab, WRITE_VIP};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const DB_HOSTS: [&str; 4] = ["pg01", "pg02", "pg03", "pg04"];
const CSTLB_HOSTS: [&str; 2] = ["pg03", "pg04"];

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `prog` run inside lab host `host`'s network namespace only (the root
/// file system stays ours, so our psql runs there).
fn in_netns(host: &str, prog: &str) -> Command {
    let ns = File::open(format!("/run/netns/clab-{host}"))
        .unwrap_or_else(|e| panic!("open the netns of lab host {host}: {e}"));
    let mut c = Command::new(prog);
    // SAFETY: setns is async-signal-safe; the descriptor lives in the closure.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// A psql from `cli` to `addr:port`, database cs_sys_ha, one -c per query,
/// as the ordinary role `app` (the clients) or `postgres` (the checks).
fn psql_as(user: &str, addr: &str, port: u16, queries: &[&str]) -> Command {
    let mut c = in_netns("cli", PSQL);
    c.args(["-XAtq", "-v", "ON_ERROR_STOP=1"]).arg(format!(
        "host={addr} port={port} user={user} dbname=cs_sys_ha connect_timeout=2"
    ));
    for q in queries {
        c.args(["-c", q]);
    }
    let pass = if user == "app" {
        "app_pass"
    } else {
        "lab_pg_pass"
    };
    c.env("PGPASSWORD", pass)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// A client's psql: as `app`.
fn psql(addr: &str, port: u16, queries: &[&str]) -> Command {
    psql_as("app", addr, port, queries)
}

/// One client attempt in flight: killed with SIGKILL at its deadline.
struct Attempt<T> {
    tag: T,
    start: f64,
    deadline: Instant,
    child: Child,
}

/// A finished attempt: `out` is Some(stdout) when psql exited 0.
struct Done<T> {
    tag: T,
    start: f64,
    end: f64,
    out: Option<String>,
}

struct Pool<T> {
    running: Vec<Attempt<T>>,
}

impl<T> Pool<T> {
    fn new() -> Pool<T> {
        Pool {
            running: Vec::new(),
        }
    }

    fn spawn(&mut self, tag: T, mut cmd: Command, limit: Duration) {
        let start = epoch();
        match cmd.spawn() {
            Ok(child) => self.running.push(Attempt {
                tag,
                start,
                deadline: Instant::now() + limit,
                child,
            }),
            Err(e) => panic!("spawn psql: {e}"),
        }
    }

    /// Reap what has finished; kill what is past its deadline (a killed
    /// attempt counts as not acknowledged).
    fn poll(&mut self) -> Vec<Done<T>> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let a = &mut self.running[i];
            let status = match a.child.try_wait() {
                Ok(Some(s)) => Some(s.success()),
                Ok(None) if Instant::now() >= a.deadline => {
                    let _ = a.child.kill();
                    let _ = a.child.wait();
                    Some(false)
                }
                Ok(None) => None,
                Err(_) => Some(false),
            };
            match status {
                None => i += 1,
                Some(ok) => {
                    let mut a = self.running.swap_remove(i);
                    let end = epoch();
                    let mut s = String::new();
                    if let Some(mut o) = a.child.stdout.take() {
                        let _ = o.read_to_string(&mut s);
                    }
                    done.push(Done {
                        tag: a.tag,
                        start: a.start,
                        end,
                        out: ok.then_some(s),
                    });
                }
            }
        }
        done
    }

    /// Wait for (or kill at their deadlines) everything still in flight.
    fn drain(&mut self) -> Vec<Done<T>> {
        let mut all = Vec::new();
        while !self.running.is_empty() {
            all.extend(self.poll());
            std::thread::sleep(Duration::from_millis(20));
        }
        all
    }
}

/// A write through the write VIP: `ok` means COMMIT was acknowledged.
#[derive(Clone, Debug)]
struct Write_ {
    id: u64,
    start: f64,
    end: f64,
    ok: bool,
}

/// A node probe: the server's clock just after an acknowledged write of its
/// own, or None when it did not take the write.
#[derive(Clone, Debug)]
struct Probe {
    host: &'static str,
    acked_at: Option<f64>,
}

#[derive(Default)]
struct Record {
    writes: Vec<Write_>,
    reads_ok: u64,
    reads_failed: u64,
    read_ends: Vec<f64>,
    probes: Vec<Probe>,
    /// (time, hosts holding the write VIP)
    vip: Vec<(f64, Vec<&'static str>)>,
}

/// The clients of one scenario, each a thread of its own.
struct Clients {
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Record>>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    fn start() -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let rec = Arc::new(Mutex::new(Record::default()));
        let mut threads = Vec::new();

        // The writer: a new attempt every 100 ms, each with a new id.
        let (s, r) = (stop.clone(), rec.clone());
        threads.push(std::thread::spawn(move || {
            let mut pool = Pool::new();
            let mut id = 0u64;
            let save = |done: Vec<Done<u64>>| {
                let mut r = r.lock().unwrap();
                for d in done {
                    r.writes.push(Write_ {
                        id: d.tag,
                        start: d.start,
                        end: d.end,
                        ok: d.out.is_some(),
                    });
                }
            };
            while !s.load(Ordering::Relaxed) {
                id += 1;
                let q = format!("insert into ledger values ({id})");
                pool.spawn(id, psql(WRITE_VIP, 5432, &[&q]), Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(100));
                save(pool.poll());
            }
            save(pool.drain());
        }));

        // The reader: through cstlb, alternating between its two hosts.
        let (s, r) = (stop.clone(), rec.clone());
        threads.push(std::thread::spawn(move || {
            let mut pool = Pool::new();
            let mut n = 0usize;
            let save = |done: Vec<Done<()>>| {
                let mut r = r.lock().unwrap();
                for d in done {
                    if d.out.is_some() {
                        r.reads_ok += 1;
                        r.read_ends.push(d.end);
                    } else {
                        r.reads_failed += 1;
                    }
                }
            };
            while !s.load(Ordering::Relaxed) {
                let host = CSTLB_HOSTS[n % CSTLB_HOSTS.len()];
                n += 1;
                pool.spawn(
                    (),
                    psql(ip(host), 5433, &["select count(*) from ledger"]),
                    Duration::from_secs(3),
                );
                std::thread::sleep(Duration::from_millis(200));
                save(pool.poll());
            }
            save(pool.drain());
        }));

        // One prober per node: is it in recovery, and does it acknowledge
        // a write of its own? (ON_ERROR_STOP: the clock is read only after
        // the insert committed.)
        for host in DB_HOSTS {
            let (s, r) = (stop.clone(), rec.clone());
            threads.push(std::thread::spawn(move || {
                let insert = format!("insert into chaos_probe values ('{host}')");
                while !s.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let mut pool = Pool::new();
                    pool.spawn(
                        (),
                        psql(
                            ip(host),
                            5432,
                            &[
                                "select pg_is_in_recovery()",
                                &insert,
                                "select extract(epoch from clock_timestamp())",
                            ],
                        ),
                        Duration::from_millis(1500),
                    );
                    let d = pool.drain().pop().unwrap();
                    let probe = match d.out {
                        Some(out) => {
                            // line 1: pg_is_in_recovery(), line 2: the clock
                            let at = out
                                .lines()
                                .nth(1)
                                .and_then(|l| l.trim().parse::<f64>().ok());
                            Probe { host, acked_at: at }
                        }
                        None => Probe {
                            host,
                            acked_at: None,
                        },
                    };
                    r.lock().unwrap().probes.push(probe);
                    if let Some(rest) = Duration::from_millis(300).checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            }));
        }

        // Who holds the write VIP, read from each host's own netns.
        let (s, r) = (stop.clone(), rec.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let holders = vip_holders();
                r.lock().unwrap().vip.push((epoch(), holders));
                std::thread::sleep(Duration::from_millis(300));
            }
        }));

        Clients { stop, rec, threads }
    }

    fn finish(self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a chaos client thread panicked");
        }
        Arc::try_unwrap(self.rec)
            .ok()
            .expect("clients still hold the record")
            .into_inner()
            .unwrap()
    }

    fn acked(&self) -> usize {
        self.rec
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|w| w.ok)
            .count()
    }
}

/// Overlaps between nodes' write-acknowledging intervals. A node's interval
/// runs from its first to its last acknowledged probe write, and ends at
/// any probe it did not acknowledge (or answered as a standby).
fn duplicate_primaries(probes: &[Probe]) -> Vec<String> {
    let mut spans: Vec<(&str, f64, f64)> = Vec::new();
    for host in DB_HOSTS {
        let mut cur: Option<(f64, f64)> = None;
        for p in probes.iter().filter(|p| p.host == host) {
            match (p.acked_at, &mut cur) {
                (Some(t), Some((_, end))) => *end = t,
                (Some(t), None) => cur = Some((t, t)),
                (None, Some(_)) => {
                    let (a, b) = cur.take().unwrap();
                    spans.push((host, a, b));
                }
                (None, None) => {}
            }
        }
        if let Some((a, b)) = cur {
            spans.push((host, a, b));
        }
    }
    let mut dups = Vec::new();
    for (i, x) in spans.iter().enumerate() {
        for y in &spans[i + 1..] {
            if x.0 != y.0 && x.1 <= y.2 && y.1 <= x.2 {
                dups.push(format!(
                    "{} acknowledged writes {:.3}..{:.3} while {} did {:.3}..{:.3}",
                    x.0, x.1, x.2, y.0, y.1, y.2
                ));
            }
        }
    }
    dups
}

/// Longest time between acknowledged writes from `from` on (edges count:
/// the last ack before `from` opens the first gap).
fn longest_gap(writes: &[Write_], from: f64, to: f64) -> f64 {
    let mut ends: Vec<f64> = writes.iter().filter(|w| w.ok).map(|w| w.end).collect();
    ends.sort_by(|a, b| a.partial_cmp(b).unwrap());
    longest_gap_of(&ends, from, to)
}

fn longest_gap_of(ends: &[f64], from: f64, to: f64) -> f64 {
    let mut prev = None;
    let mut max = 0.0f64;
    for &e in ends {
        if e < from {
            prev = Some(e);
            continue;
        }
        let p = prev.unwrap_or(from);
        max = max.max(e - p);
        prev = Some(e);
        if e > to {
            break;
        }
    }
    if let Some(p) = prev {
        if p < to {
            max = max.max(to - p);
        }
    }
    max
}

/// The meta, through `clupadm show --json`: (primary id, host) and the
/// Normal standbys' hosts.
struct MetaView {
    primary: Option<(u64, String)>,
    normal_standbys: Vec<String>,
    states: BTreeMap<u64, String>,
}

fn lab_host(addr: &str) -> &'static str {
    DB_HOSTS
        .into_iter()
        .find(|h| ip(h) == addr)
        .unwrap_or_else(|| panic!("{addr} is no lab db host"))
}

fn meta_view(lab: &Lab) -> MetaView {
    let v = lab.show();
    let dbs = v["dbs"].as_array().cloned().unwrap_or_default();
    let mut primary = None;
    let mut normal_standbys = Vec::new();
    let mut states = BTreeMap::new();
    for d in &dbs {
        let id = d["id"].as_u64().unwrap();
        let host = lab_host(d["host"].as_str().unwrap()).to_string();
        let state = d["state"].as_str().unwrap().to_string();
        if d["primary"] == 1 {
            if primary.is_some() {
                panic!("the meta names two primaries: {v}");
            }
            primary = Some((id, host));
        } else if state == "Normal" {
            normal_standbys.push(host);
        }
        states.insert(id, state);
    }
    MetaView {
        primary,
        normal_standbys,
        states,
    }
}

/// One query from cli straight to a node (no VIP), 3 s at most.
fn node_sql(host: &str, q: &str) -> Result<String, String> {
    let mut pool = Pool::new();
    pool.spawn(
        (),
        psql_as("postgres", ip(host), 5432, &[q]),
        Duration::from_secs(3),
    );
    let d = pool.drain().pop().unwrap();
    d.out
        .map(|s| s.trim().to_string())
        .ok_or_else(|| format!("{host}: '{q}' failed"))
}

/// The lab db hosts holding the write VIP, read from each host's own netns.
fn vip_holders() -> Vec<&'static str> {
    DB_HOSTS
        .into_iter()
        .filter(|h| {
            let o = Command::new("ip")
                .args(["-n", &format!("clab-{h}"), "-o", "-4", "addr", "show"])
                .output();
            o.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {WRITE_VIP}/")))
        })
        .collect()
}

/// The meta matches reality: Ok, or what does not match.
fn consistent(lab: &Lab) -> Result<MetaView, String> {
    let m = meta_view(lab);
    let Some((_, p)) = &m.primary else {
        return Err("the meta names no primary".into());
    };
    if node_sql(p, "select pg_is_in_recovery()")? != "f" {
        return Err(format!("the meta's primary {p} is in recovery"));
    }
    let holders = vip_holders();
    if holders != [p.as_str()] {
        return Err(format!("write VIP held by {holders:?}, the primary is {p}"));
    }
    for s in &m.normal_standbys {
        if node_sql(s, "select pg_is_in_recovery()")? != "t" {
            return Err(format!("Normal standby {s} is not in recovery"));
        }
    }
    // Every Normal standby streams from the primary. A standby that died
    // may keep its walsender (and a row here) until wal_sender_timeout: an
    // extra row is fine for a node the meta does not count as Normal.
    let streaming = node_sql(
        p,
        "select string_agg(host(client_addr), ',') from pg_stat_replication where state = 'streaming'",
    )?;
    let streaming: BTreeSet<&str> = streaming.split(',').filter(|s| !s.is_empty()).collect();
    for s in &m.normal_standbys {
        if !streaming.contains(ip(s)) {
            return Err(format!(
                "Normal standby {s} does not stream from {p} (it streams to {streaming:?})"
            ));
        }
    }
    // No node outside the meta's primary runs as a primary.
    for h in DB_HOSTS {
        if h != p && node_sql(h, "select pg_is_in_recovery()").as_deref() == Ok("f") {
            return Err(format!("{h} runs as a primary besides {p}"));
        }
    }
    Ok(m)
}

/// One scenario: the lab, its clients, and the moment of the fault.
struct Scenario {
    name: &'static str,
    lab: Lab,
    clients: Option<Clients>,
    fault_at: f64,
}

impl Scenario {
    /// Take the lab (sync replication, probe_interval 1), start clupserver
    /// and cstlb on pg03/pg04, wait until healthy, start the clients.
    fn start(name: &'static str) -> Scenario {
        let mut lab = Lab::take_opts(1, true);
        lab.start_server();
        for h in CSTLB_HOSTS {
            lab.start_cstlb(h);
        }
        // The clients log in as an ordinary role, as applications do: the
        // superuser slots (superuser_reserved_connections) stay for clup
        // when hung commits pile up.
        // A fresh ledger: the lab may be reused from the previous scenario.
        for q in [
            "drop table if exists ledger, chaos_probe",
            "do $$ begin if not exists (select from pg_roles where rolname = 'app') then create role app login password 'app_pass'; end if; end $$",
            "create table if not exists ledger(id bigint primary key)",
            "create table if not exists chaos_probe(host text, at timestamptz default clock_timestamp())",
            "grant select, insert on ledger, chaos_probe to app",
        ] {
            lab.sql("cli", WRITE_VIP, "cs_sys_ha", q).unwrap();
        }
        settle(&lab, 30);
        let clients = Clients::start();
        // A scenario without a single fault moment (the 20 switches)
        // measures its outage from here.
        let sc = Scenario {
            name,
            lab,
            clients: Some(clients),
            fault_at: epoch(),
        };
        // Writes flow before the fault.
        assert!(
            sc.wait(10, |s| s.clients.as_ref().unwrap().acked() >= 10),
            "{name}: no writes acknowledged before the fault:\n{}",
            sc.lab.log()
        );
        sc
    }

    fn fault(&mut self) {
        self.fault_at = epoch();
    }

    fn lab_cmd(&self, args: &[&str]) {
        let out = self.lab.lab(args);
        assert_eq!(out.code, 0, "{}: scripts/lab {args:?}: {out:?}", self.name);
    }

    fn wait(&self, secs: u64, mut f: impl FnMut(&Scenario) -> bool) -> bool {
        crate::util::wait_every(secs, 200, || f(self))
    }

    fn in_log(&self, needle: &str) -> bool {
        self.lab.log().contains(needle)
    }

    /// Acknowledged writes that started after the fault (the writer works again).
    fn writes_after(&self, t: f64) -> usize {
        let r = self.clients.as_ref().unwrap().rec.lock().unwrap();
        r.writes.iter().filter(|w| w.ok && w.start >= t).count()
    }

    fn wait_writes_resume(&self, secs: u64) {
        let t = self.fault_at;
        assert!(
            self.wait(secs, |s| s.writes_after(t) >= 3),
            "{}: writes did not resume within {secs}s after the fault:\n{}",
            self.name,
            self.lab.log()
        );
    }

    /// Kill clupserver with SIGKILL (by its pid file) and wait until it is gone.
    fn kill_server(&self) {
        let pid = std::fs::read_to_string(self.lab.home.join("run/clupserver.pid")).unwrap();
        let out = self.lab.exec("mon", &["kill", "-9", pid.trim()]);
        assert_eq!(out.code, 0, "kill -9 clupserver: {out:?}");
        assert!(self
            .lab
            .wait(5, |l| l.clup(&["server", "status"]).code == 1));
    }

    /// Wait for a log line (polling the file every 20 ms).
    fn wait_log(&self, secs: u64, needle: &str) {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.in_log(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{}: no '{needle}' in the log within {secs}s:\n{}",
            self.name,
            self.lab.log()
        );
    }

    /// Wait until a primary failover task logged its last line.
    fn wait_failover_done(&self, secs: u64) {
        assert!(
            self.wait(secs, |s| s.lab.log().lines().any(|l| l
                .contains("switch to new host(")
                && l.ends_with(") completed."))),
            "{}: the failover did not finish:\n{}",
            self.name,
            self.lab.log()
        );
    }

    fn adm(&self, args: &[&str]) -> crate::util::Out {
        self.lab.adm(args)
    }

    /// Wait until healthy with `standbys` Normal standbys, let the writer
    /// run on for 2 s, stop the clients and check everything. Returns the
    /// final meta view for scenario-specific checks.
    fn finish(self, standbys: usize) -> MetaView {
        self.finish_opt(Some(standbys))
    }

    /// As [`Scenario::finish`]; `None` accepts any number of Normal standbys.
    fn finish_opt(mut self, standbys: Option<usize>) -> MetaView {
        let m = settle(&self.lab, 60);
        if let Some(n) = standbys {
            assert_eq!(
                m.normal_standbys.len(),
                n,
                "{}: Normal standbys {:?}:\n{}",
                self.name,
                m.normal_standbys,
                self.lab.log()
            );
        }
        let t = epoch();
        assert!(
            self.wait(15, |s| s.writes_after(t) >= 5),
            "{}: writes do not flow once healthy:\n{}",
            self.name,
            self.lab.log()
        );
        let end = epoch();
        let rec = self.clients.take().unwrap().finish();

        let acked: BTreeSet<u64> = rec.writes.iter().filter(|w| w.ok).map(|w| w.id).collect();
        // Every acknowledged id on the primary and every Normal standby
        // (a standby gets up to 10 s to replay).
        let mut lost: BTreeSet<u64> = BTreeSet::new();
        let (_, primary) = m.primary.clone().unwrap();
        for h in std::iter::once(&primary).chain(m.normal_standbys.iter()) {
            let deadline = Instant::now() + Duration::from_secs(10);
            let missing: BTreeSet<u64> = loop {
                let have: BTreeSet<u64> = node_sql(h, "select id from ledger")
                    .unwrap_or_else(|e| panic!("{}: read the ledger: {e}", self.name))
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect();
                let missing: BTreeSet<u64> = acked.difference(&have).copied().collect();
                if missing.is_empty() || h == &primary || Instant::now() > deadline {
                    break missing;
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            if !missing.is_empty() {
                eprintln!(
                    "{}: {} acknowledged ids missing on {h}: {:?}",
                    self.name,
                    missing.len(),
                    missing.iter().take(20).collect::<Vec<_>>()
                );
            }
            lost.extend(missing);
        }
        // Two holders happen legitimately while a primary is cut off (the
        // isolated host keeps its address); shown, not judged.
        let doubled = rec.vip.iter().filter(|(_, h)| h.len() > 1).count();
        if doubled > 0 {
            eprintln!(
                "{}: write VIP on two hosts in {doubled} of {} samples",
                self.name,
                rec.vip.len()
            );
        }
        let dups = duplicate_primaries(&rec.probes);
        for d in &dups {
            eprintln!("{}: duplicate primary: {d}", self.name);
        }
        let outage = longest_gap(&rec.writes, self.fault_at, end);
        let mut read_ends = rec.read_ends.clone();
        read_ends.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let read_outage = longest_gap_of(&read_ends, self.fault_at, end);
        let row = format!(
            "{:<44} {:>6} {:>5} {:>5} {:>8.2} {:>8.2} {:>6}/{:<6}",
            self.name,
            acked.len(),
            lost.len(),
            dups.len(),
            outage,
            read_outage,
            rec.reads_ok,
            rec.reads_ok + rec.reads_failed
        );
        report(&row);
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged writes lost:\n{}",
            self.name,
            lost.len(),
            self.lab.log()
        );
        assert!(
            dups.is_empty(),
            "{}: duplicate primaries: {dups:?}\n{}",
            self.name,
            self.lab.log()
        );
        assert!(acked.len() >= 20, "{}: too few writes to judge", self.name);
        m
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(c) = self.clients.take() {
            c.stop.store(true, Ordering::Relaxed);
            for t in c.threads {
                let _ = t.join();
            }
        }
    }
}

/// Wait until the meta matches reality; panic with the last mismatch.
fn settle(lab: &Lab, secs: u64) -> MetaView {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        match consistent(lab) {
            Ok(m) => return m,
            Err(e) if Instant::now() > end => {
                panic!("the cluster did not settle in {secs}s: {e}\n{}", lab.log())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

pub const HEADER: &str =
    "scenario                                     acked  lost  dups  outage_s  read_out  reads ok/all";

/// Print a row and append it to the table file (`CLUP_CHAOS_OUT`, default
/// /var/tmp/clup-chaos.txt), which scripts/chaos prints at the end.
fn report(row: &str) {
    println!("{HEADER}\n{row}");
    let path = std::env::var("CLUP_CHAOS_OUT").unwrap_or_else(|_| "/var/tmp/clup-chaos.txt".into());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{row}");
    }
}

fn host_of(m: &MetaView) -> String {
    m.primary.as_ref().unwrap().1.clone()
}

fn id_of(host: &str) -> u32 {
    DB_HOSTS.iter().position(|h| *h == host).unwrap() as u32 + 1
}

/// The current primary's host according to the meta.
fn meta_primary(lab: &Lab) -> String {
    host_of(&meta_view(lab))
}

fn sigstop_postgres(lab: &Lab, host: &str, sig: &str) {
    let script = format!(
        "p=$(head -1 /var/lib/postgresql/pgdata/postmaster.pid) && kill -{sig} $p && {{ kill -{sig} $(ps -o pid= --ppid $p) 2>/dev/null; true; }}"
    );
    let out = lab.exec(host, &["sh", "-c", &script]);
    // A hung server may have been fenced (killed) meanwhile: nothing to wake.
    let fenced = sig == "CONT" && out.stderr.contains("No such process");
    assert!(
        out.code == 0 || fenced,
        "kill -{sig} postgres on {host}: {out:?}"
    );
}

fn repair(sc: &Scenario, host: &str, how: &[&str]) {
    let id = id_of(host).to_string();
    let mut args = vec!["repair", "-c", "cluster01", "-i", id.as_str()];
    args.extend_from_slice(how);
    let out = sc.lab.adm_when_unlocked(&args);
    assert_eq!(
        out.code,
        0,
        "{}: repair {host}: {out:?}\n{}",
        sc.name,
        sc.lab.log()
    );
}

/// A powered-off standby comes back: power on, start postgres, repair.
fn bring_back_standby(sc: &Scenario, host: &str) {
    sc.lab_cmd(&["poweron", host]);
    sc.lab.start_postgres(host);
    repair(sc, host, &[]);
}

// ---------------------------------------------------------------- scenarios

#[test]
fn chaos_primary_host_power_off() {
    let mut sc = Scenario::start("primary host power-off");
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_writes_resume(30);
    // The old primary comes back (host only) and is repaired as a standby.
    sc.lab_cmd(&["poweron", "pg01"]);
    repair(&sc, "pg01", &["--rewind"]);
    let m = sc.finish(3);
    assert_ne!(host_of(&m), "pg01");
}

#[test]
fn chaos_primary_postgres_kill9() {
    let mut sc = Scenario::start("primary postgres kill -9");
    sc.fault();
    sc.lab.kill_postgres("pg01");
    sc.wait_writes_resume(30);
    let m = sc.finish(3);
    assert_eq!(host_of(&m), "pg01", "restarted in place, no failover");
}

#[test]
fn chaos_primary_postgres_sigstop() {
    let mut sc = Scenario::start("primary postgres SIGSTOP (hung) 20s");
    sc.fault();
    sigstop_postgres(&sc.lab, "pg01", "STOP");
    // Hung for far longer than probe_timeout (2 s).
    std::thread::sleep(Duration::from_secs(20));
    sigstop_postgres(&sc.lab, "pg01", "CONT");
    sc.wait_writes_resume(60);
    // Restarted in place or failed over: either way nothing is lost and the
    // woken old processes never acknowledge a write beside a new primary.
    sc.finish_opt(None);
}

#[test]
fn chaos_standby_host_power_off() {
    let mut sc = Scenario::start("standby host power-off");
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg02"]);
    assert!(
        sc.wait(30, |s| meta_view(&s.lab).states.get(&2).map(String::as_str)
            == Some("Fault")),
        "pg02 not Fault:\n{}",
        sc.lab.log()
    );
    bring_back_standby(&sc, "pg02");
    let m = sc.finish(3);
    assert_eq!(host_of(&m), "pg01");
}

#[test]
fn chaos_all_standbys_down_then_one_back() {
    let mut sc = Scenario::start("all standbys down, then one back");
    sc.fault();
    for h in ["pg02", "pg03", "pg04"] {
        sc.lab_cmd(&["poweroff", h]);
    }
    assert!(
        sc.wait(40, |s| {
            let st = meta_view(&s.lab).states;
            (2..=4).all(|i| st.get(&i).map(String::as_str) == Some("Fault"))
        }),
        "standbys not Fault:\n{}",
        sc.lab.log()
    );
    bring_back_standby(&sc, "pg02");
    sc.wait_writes_resume(30);
    let m = sc.finish(1);
    assert_eq!(host_of(&m), "pg01");
}

#[test]
fn chaos_partition_mon_from_primary_only() {
    let mut sc = Scenario::start("partition mon <-> primary only");
    sc.fault();
    sc.lab_cmd(&["partition", "mon", "pg01"]);
    std::thread::sleep(Duration::from_secs(15));
    sc.lab_cmd(&["heal"]);
    assert!(!sc.in_log("to primary..."), "{}", sc.lab.log());
    let m = sc.finish(3);
    assert_eq!(host_of(&m), "pg01", "no failover allowed");
}

#[test]
fn chaos_primary_isolated_from_everyone() {
    let mut sc = Scenario::start("primary isolated from everyone");
    sc.fault();
    for h in ["mon", "pg02", "pg03", "pg04", "cli"] {
        sc.lab_cmd(&["partition", "pg01", h]);
    }
    sc.wait_writes_resume(40);
    assert!(
        sc.wait(10, |s| meta_primary(&s.lab) != "pg01"),
        "the meta still names pg01:\n{}",
        sc.lab.log()
    );
    // Back on the network: the old primary is fenced, never writable.
    sc.lab_cmd(&["heal"]);
    assert!(
        sc.wait(30, |_| node_sql("pg01", "select pg_is_in_recovery()")
            .is_err()),
        "the returning old primary was not fenced:\n{}",
        sc.lab.log()
    );
    repair(&sc, "pg01", &["--rewind"]);
    sc.finish(3);
}

#[test]
fn chaos_mon_isolated_from_all_db_hosts() {
    let mut sc = Scenario::start("mon isolated from all db hosts");
    sc.fault();
    for h in DB_HOSTS {
        sc.lab_cmd(&["partition", "mon", h]);
    }
    std::thread::sleep(Duration::from_secs(15));
    sc.lab_cmd(&["heal"]);
    let m = sc.finish(3);
    assert_eq!(host_of(&m), "pg01", "no action allowed");
    assert!(m.states.values().all(|s| s == "Normal"), "{:?}", m.states);
}

/// Power off the primary, kill -9 clupserver when `needle` is logged,
/// restart it: the failover completes with exactly one promotion.
fn server_killed_during_failover(name: &'static str, needle: &str) {
    let mut sc = Scenario::start(name);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_log(40, needle);
    sc.kill_server();
    sc.lab.clup(&["server", "start"]);
    sc.wait_writes_resume(40);
    let promoted: Vec<&str> = ["pg02", "pg03", "pg04"]
        .into_iter()
        .filter(|h| node_sql(h, "select pg_is_in_recovery()").as_deref() == Ok("f"))
        .collect();
    assert_eq!(
        promoted.len(),
        1,
        "{name}: promoted {promoted:?}:\n{}",
        sc.lab.log()
    );
    sc.finish(2);
}

#[test]
fn chaos_server_killed_at_failover_detection() {
    server_killed_during_failover(
        "clupserver kill -9 at failover detection",
        "Find database(10.213.0.41:5432) failed",
    );
}

#[test]
fn chaos_server_killed_at_failover_promotion() {
    server_killed_during_failover("clupserver kill -9 during promotion", "to primary...");
}

#[test]
fn chaos_server_killed_after_failover_promotion() {
    server_killed_during_failover(
        "clupserver kill -9 after promotion",
        "to primary completed.",
    );
}

/// A switch to pg02 under load, with clupserver killed when `needle` is
/// logged; restarted, it leaves one primary and loses nothing.
fn server_killed_during_switch(name: &'static str, needle: &'static str) {
    let mut sc = Scenario::start(name);
    sc.fault();
    let home = sc.lab.home.clone();
    let bin = home.join("bin/clup");
    // The switch runs in the background; clupadm may fail when the server dies.
    let switch = std::thread::spawn(move || {
        Command::new(env!("CARGO_MANIFEST_DIR").to_string() + "/scripts/lab")
            .args(["exec", "mon", "env"])
            .arg(format!("CLUP_HOME={}", home.display()))
            .arg(bin)
            .args(["adm", "switch", "-c", "cluster01", "-i", "2"])
            .output()
    });
    sc.wait_log(30, needle);
    sc.kill_server();
    let _ = switch.join();
    sc.lab.clup(&["server", "start"]);
    sc.wait_writes_resume(60);
    sc.finish_opt(None);
}

#[test]
fn chaos_server_killed_at_switch_demote() {
    server_killed_during_switch(
        "clupserver kill -9 during switch (demote)",
        "stop old primary database(10.213.0.41:5432) cleanly...",
    );
}

#[test]
fn chaos_server_killed_at_switch_promote() {
    server_killed_during_switch(
        "clupserver kill -9 during switch (promote)",
        "Promote standby database(10.213.0.42) to primary...",
    );
}

#[test]
fn chaos_new_primary_power_off_during_repair_of_old() {
    let mut sc = Scenario::start("new primary power-off during repair of old");
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_writes_resume(30);
    sc.wait_failover_done(30);
    let first = meta_primary(&sc.lab);
    assert_ne!(first, "pg01");
    sc.lab_cmd(&["poweron", "pg01"]);
    // Repair the old primary in the background and pull the new one's plug
    // while it runs.
    let home = sc.lab.home.clone();
    let bin = home.join("bin/clup");
    let rep = std::thread::spawn(move || {
        Command::new(env!("CARGO_MANIFEST_DIR").to_string() + "/scripts/lab")
            .args(["exec", "mon", "env"])
            .arg(format!("CLUP_HOME={}", home.display()))
            .arg(bin)
            .args(["adm", "repair", "-c", "cluster01", "-i", "1", "--rewind"])
            .output()
            .unwrap()
    });
    sc.wait_log(30, "Repair(cluster=cluster01, dbid=1)");
    let t = epoch();
    sc.lab_cmd(&["poweroff", &first]);
    let rep = rep.join().unwrap();
    eprintln!(
        "repair while {first} died: rc={:?}\n{}",
        rep.status.code(),
        String::from_utf8_lossy(&rep.stdout)
    );
    assert!(
        sc.wait(60, |s| s.writes_after(t) >= 3),
        "writes did not resume after the second failover:\n{}",
        sc.lab.log()
    );
    let second = meta_primary(&sc.lab);
    assert!(second != first && second != "pg01", "{second}");
    // pg01 is repaired now if the repair failed the first time.
    if meta_view(&sc.lab).states.get(&1).map(String::as_str) != Some("Normal") {
        repair(&sc, "pg01", &["--rewind"]);
    }
    sc.finish(2);
}

#[test]
fn chaos_switch_back_and_forth_20_times() {
    let sc = Scenario::start("switch back and forth x20");
    for i in 0..20 {
        let (to, host) = if i % 2 == 0 {
            ("2", "pg02")
        } else {
            ("1", "pg01")
        };
        let out = sc.adm(&["switch", "-c", "cluster01", "-i", to]);
        assert_eq!(
            out.code,
            0,
            "switch {i} to {host}: {out:?}\n{}",
            sc.lab.log()
        );
        settle(&sc.lab, 30);
        assert_eq!(meta_primary(&sc.lab), host);
    }
    let m = sc.finish(3);
    assert_eq!(host_of(&m), "pg01");
}

#[test]
fn chaos_cstlb_killed_and_restarted() {
    let mut sc = Scenario::start("cstlb killed and restarted");
    sc.fault();
    let out = sc
        .lab
        .exec("pg03", &["sh", "-c", "kill -9 $(cat /run/cstlb.pid)"]);
    assert_eq!(out.code, 0, "{out:?}");
    std::thread::sleep(Duration::from_secs(3));
    sc.lab.stop_cstlb("pg03");
    sc.lab.start_cstlb("pg03");
    let t = epoch();
    assert!(
        sc.wait(20, |s| {
            let r = s.clients.as_ref().unwrap().rec.lock().unwrap();
            r.read_ends.iter().filter(|&&e| e > t).count() >= 10
        }),
        "reads do not flow after the cstlb restart"
    );
    sc.finish(3);
}

#[test]
fn chaos_cstlb_host_power_off() {
    let mut sc = Scenario::start("cstlb host power-off");
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg04"]);
    assert!(
        sc.wait(30, |s| meta_view(&s.lab).states.get(&4).map(String::as_str)
            == Some("Fault")),
        "pg04 not Fault:\n{}",
        sc.lab.log()
    );
    sc.finish(2);
}

#[test]
fn chaos_table_helpers() {
    // Overlap detection and gaps, without a lab.
    let p = |host, t: Option<f64>| Probe { host, acked_at: t };
    let clean = [
        p("pg01", Some(1.0)),
        p("pg01", Some(2.0)),
        p("pg01", None),
        p("pg02", None),
        p("pg02", Some(2.5)),
        p("pg02", Some(3.0)),
    ];
    assert!(duplicate_primaries(&clean).is_empty());
    let split = [
        p("pg01", Some(1.0)),
        p("pg01", Some(3.0)),
        p("pg02", Some(2.0)),
    ];
    assert_eq!(duplicate_primaries(&split).len(), 1);
    assert_eq!(longest_gap_of(&[1.0, 2.0, 5.0, 5.5], 1.5, 6.0), 3.0);
    assert_eq!(longest_gap_of(&[1.0], 1.5, 6.0), 5.0);
}
