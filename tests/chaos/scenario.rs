//! One scenario: the lab in the scenario's mode, its clients, the
//! detector, the moment of the fault, and the checks at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::clients::{psql_as, vip_holders, Ack, Clients, Pool, Record};
use super::detector::{self, Detector, Sample};
use super::judge::{self, Losses, Row};
use super::{epoch, faults, Mode, CSTLB_HOSTS, DB_HOSTS};
use crate::lab::{ip, Lab, WRITE_VIP};

/// The meta, through `clupadm show --json`: (primary id, host) and the
/// Normal standbys' hosts.
pub struct MetaView {
    pub primary: Option<(u64, String)>,
    pub normal_standbys: Vec<String>,
    pub states: BTreeMap<u64, String>,
}

fn lab_host(addr: &str) -> &'static str {
    DB_HOSTS
        .into_iter()
        .find(|h| ip(h) == addr)
        .unwrap_or_else(|| panic!("{addr} is no lab db host"))
}

pub fn meta_view(lab: &Lab) -> MetaView {
    let v = lab.show();
    let dbs = v["dbs"].as_array().cloned().unwrap_or_default();
    let mut m = MetaView {
        primary: None,
        normal_standbys: Vec::new(),
        states: BTreeMap::new(),
    };
    for d in &dbs {
        let id = d["id"].as_u64().unwrap();
        let host = lab_host(d["host"].as_str().unwrap()).to_string();
        let state = d["state"].as_str().unwrap().to_string();
        if d["primary"] == 1 {
            assert!(m.primary.is_none(), "the meta names two primaries: {v}");
            m.primary = Some((id, host));
        } else if state == "Normal" {
            m.normal_standbys.push(host);
        }
        m.states.insert(id, state);
    }
    m
}

/// One query from cli straight to a node (no VIP), 3 s at most.
pub fn node_sql(host: &str, q: &str) -> Result<String, String> {
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

/// Wait until the meta matches reality; panic with the last mismatch.
pub fn settle(lab: &Lab, secs: u64) -> MetaView {
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

/// The lab's failover_max_lag (16MB unless the scenario's conf says so).
fn max_lag_of(conf: &str) -> u64 {
    conf.lines()
        .find_map(|l| l.trim().strip_prefix("failover_max_lag"))
        .and_then(|v| v.trim_start_matches([' ', '=']).trim().strip_suffix("MB"))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(16 << 20, |n| n << 20)
}

pub struct Scenario {
    pub name: &'static str,
    pub mode: Mode,
    pub lab: Lab,
    pub clients: Option<Clients>,
    pub detector: Option<Detector>,
    pub fault_at: f64,
    max_lag: u64,
}

/// Done once per scenario, as postgres through the write VIP: a fresh
/// ledger, the clients' role, `chaos_host()` (the host's own name, read
/// by the server from its UTS namespace), and the lab's own
/// synchronous_standby_names (a value clup or a scenario left with ALTER
/// SYSTEM is reset).
const SETUP: [&str; 8] = [
    "drop table if exists ledger, chaos_probe, bulk",
    "do $$ begin if not exists (select from pg_roles where rolname = 'app') then create role app login password 'app_pass'; end if; end $$",
    "create table ledger(id bigint primary key)",
    "create table bulk(pad text)",
    "create or replace function chaos_host() returns text language sql security definer as $$ select btrim(pg_read_file('/proc/sys/kernel/hostname'), E'\\n') $$",
    "grant select, insert on ledger to app",
    "alter system reset synchronous_standby_names",
    "select pg_reload_conf()",
];

impl Scenario {
    /// Take the lab (probe_interval 1, replication per `mode`), start
    /// clupserver and cstlb on pg03/pg04, wait until healthy, start the
    /// detector and the clients.
    pub fn start(name: &'static str, mode: Mode) -> Scenario {
        Scenario::start_conf(name, mode, "")
    }

    /// As [`Scenario::start`], with `conf` appended to clup.conf.
    pub fn start_conf(name: &'static str, mode: Mode, conf: &str) -> Scenario {
        Scenario::start_with(name, mode, conf, |_| {})
    }

    /// [`Scenario::start_conf`], with `prepare` run on the lab before
    /// clupserver starts (a db host laid out differently, say).
    pub fn start_with(
        name: &'static str,
        mode: Mode,
        conf: &str,
        prepare: impl FnOnce(&Lab),
    ) -> Scenario {
        let mut lab = Lab::take_opts(1, mode == Mode::Sync);
        faults::clear_all();
        if !conf.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(lab.home.join("conf/clup.conf"))
                .unwrap();
            f.write_all(conf.as_bytes()).unwrap();
        }
        for q in SETUP {
            lab.sql("cli", WRITE_VIP, "cs_sys_ha", q)
                .unwrap_or_else(|e| panic!("{name}: {q}: {e}"));
        }
        prepare(&lab);
        lab.start_server();
        for h in CSTLB_HOSTS {
            lab.start_cstlb(h);
        }
        settle(&lab, 30);
        let detector = Detector::start();
        let clients = Clients::start();
        // A scenario without a single fault moment (the 20 switches)
        // measures its outage from here.
        let sc = Scenario {
            name,
            mode,
            lab,
            clients: Some(clients),
            detector: Some(detector),
            fault_at: epoch(),
            max_lag: max_lag_of(conf),
        };
        assert!(
            sc.wait(10, |s| s.clients.as_ref().unwrap().acked() >= 10),
            "{name}: no writes acknowledged before the fault:\n{}",
            sc.lab.log()
        );
        sc
    }

    pub fn fault(&mut self) {
        self.fault_at = epoch();
    }

    pub fn lab_cmd(&self, args: &[&str]) {
        let out = self.lab.lab(args);
        assert_eq!(out.code, 0, "{}: scripts/lab {args:?}: {out:?}", self.name);
    }

    pub fn wait(&self, secs: u64, mut f: impl FnMut(&Scenario) -> bool) -> bool {
        crate::util::wait_every(secs, 200, || f(self))
    }

    pub fn in_log(&self, needle: &str) -> bool {
        self.lab.log().contains(needle)
    }

    /// Acknowledged writes that started after `t`.
    pub fn writes_after(&self, t: f64) -> usize {
        let r = self.clients.as_ref().unwrap().rec.lock().unwrap();
        r.writes.iter().filter(|w| w.ok() && w.start >= t).count()
    }

    /// Writes flow again within `secs` of the fault (3 acknowledged
    /// writes started after it).
    pub fn wait_writes_resume(&self, secs: u64) {
        let t = self.fault_at;
        assert!(
            self.wait(secs, |s| s.writes_after(t) >= 3),
            "{} ({}): writes did not resume within {secs}s after the fault:\n{}",
            self.name,
            self.mode.name(),
            self.lab.log()
        );
    }

    /// The detector's samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.detector.as_ref().unwrap().snapshot()
    }

    /// Kill clupserver with SIGKILL (by its pid file) and wait until it is gone.
    pub fn kill_server(&self) {
        let pid = std::fs::read_to_string(self.lab.home.join("run/clupserver.pid")).unwrap();
        let out = self.lab.exec("mon", &["kill", "-9", pid.trim()]);
        assert_eq!(out.code, 0, "kill -9 clupserver: {out:?}");
        assert!(self
            .lab
            .wait(5, |l| l.clup(&["server", "status"]).code == 1));
    }

    /// Wait for a log line (polling the file every 20 ms).
    pub fn wait_log(&self, secs: u64, needle: &str) {
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
    pub fn wait_failover_done(&self, secs: u64) {
        assert!(
            self.wait(secs, |s| s.lab.log().lines().any(|l| l
                .contains("switch to new host(")
                && l.ends_with(") completed."))),
            "{}: the failover did not finish:\n{}",
            self.name,
            self.lab.log()
        );
    }

    pub fn adm(&self, args: &[&str]) -> crate::util::Out {
        self.lab.adm(args)
    }

    /// Wait until healthy (with `standbys` Normal standbys when Some), let
    /// the writer run on, stop the clients and the detector and check
    /// everything, the write outage against `bound` seconds included.
    /// Returns the final meta view for scenario-specific checks.
    pub fn finish(mut self, standbys: Option<usize>, bound: f64) -> MetaView {
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
        let samples = self.detector.take().unwrap().finish();
        self.judge(&m, &rec, &samples, end, bound);
        m
    }

    /// Acknowledged ids missing on the primary, and on the Normal standbys
    /// (a standby gets up to 10 s to replay).
    fn missing(&self, m: &MetaView, acked: &BTreeSet<u64>) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let (_, primary) = m.primary.clone().unwrap();
        let read = |h: &str| -> BTreeSet<u64> {
            let have: BTreeSet<u64> = node_sql(h, "select id from ledger")
                .unwrap_or_else(|e| panic!("{}: read the ledger: {e}", self.name))
                .lines()
                .filter_map(|l| l.parse().ok())
                .collect();
            acked.difference(&have).copied().collect()
        };
        let on_primary = read(&primary);
        let mut on_standbys = BTreeSet::new();
        for h in &m.normal_standbys {
            let deadline = Instant::now() + Duration::from_secs(10);
            let missing = loop {
                let missing: BTreeSet<u64> = read(h).difference(&on_primary).copied().collect();
                if missing.is_empty() || Instant::now() > deadline {
                    break missing;
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            if !missing.is_empty() {
                eprintln!(
                    "{}: {} acknowledged ids missing on standby {h}: {:?}",
                    self.name,
                    missing.len(),
                    missing.iter().take(20).collect::<Vec<_>>()
                );
            }
            on_standbys.extend(missing);
        }
        (on_primary, on_standbys)
    }

    /// The final primary's timeline history (empty on timeline 1).
    fn history(&self, primary: &str) -> Vec<judge::Switch> {
        let q = "select case when substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) = '00000001' then '' \
                 else pg_read_file('pg_wal/' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) || '.history') end";
        let text =
            node_sql(primary, q).unwrap_or_else(|e| panic!("{}: timeline history: {e}", self.name));
        judge::parse_history(&text)
    }

    fn judge(&self, m: &MetaView, rec: &Record, samples: &[Sample], end: f64, bound: f64) {
        let acked: BTreeSet<u64> = rec.writes.iter().filter(|w| w.ok()).map(|w| w.id).collect();
        let (on_primary, on_standbys) = self.missing(m, &acked);
        let history = self.history(&m.primary.as_ref().unwrap().1);
        let mut losses: Losses = judge::classify(self.mode, &on_primary, &rec.writes, &history);
        losses.lost.extend(on_standbys);
        let spans = detector::primary_spans(samples);
        let proms = detector::promotions(samples);
        let after = detector::acks_after_promotion(&rec.writes, &proms);
        let acks: Vec<&Ack> = rec.writes.iter().filter_map(|w| w.ack.as_ref()).collect();
        let (dups, shown) = detector::duplicate_primaries(&spans, &rec.vip, &acks);
        let arp2 = detector::double_arp(&rec.vip, &detector::returning(&spans, &rec.vip));
        let name = format!("{} ({})", self.name, self.mode.name());
        print_findings(
            &name,
            [&after, &dups, &arp2, &shown],
            &proms,
            &losses,
            &history,
        );
        let outage = judge::longest_gap(&rec.writes, self.fault_at, end);
        let mut read_ends = rec.read_ends.clone();
        read_ends.sort_by(|a, b| a.total_cmp(b));
        let row = Row {
            mode: self.mode,
            name: self.name,
            acked: acked.len(),
            losses: &losses,
            after_promo: after.len(),
            dups: dups.len(),
            arp2: arp2.len(),
            outage,
            bound,
            read_outage: judge::longest_gap_of(&read_ends, self.fault_at, end),
            reads_ok: rec.reads_ok,
            reads_all: rec.reads_ok + rec.reads_failed,
        };
        judge::report(&row.text());
        let log = || self.lab.log();
        assert!(
            samples.iter().any(|s| !s.in_recovery),
            "{name}: the detector saw no primary at all"
        );
        assert!(
            losses.lost.is_empty(),
            "{name}: {} acknowledged writes lost:\n{}",
            losses.lost.len(),
            log()
        );
        assert!(
            losses.async_lost.is_empty() || losses.wal_distance <= self.max_lag,
            "{name}: {} writes lost {} bytes past the promotion point, beyond failover_max_lag {}:\n{}",
            losses.async_lost.len(),
            losses.wal_distance,
            self.max_lag,
            log()
        );
        assert!(
            after.is_empty(),
            "{name}: writes acknowledged after a promotion: {after:?}\n{}",
            log()
        );
        assert!(
            dups.is_empty(),
            "{name}: duplicate primaries: {dups:?}\n{}",
            log()
        );
        assert!(
            arp2.is_empty(),
            "{name}: two hosts answered for the write VIP: {arp2:?}\n{}",
            log()
        );
        assert!(acked.len() >= 20, "{name}: too few writes to judge");
        assert!(
            outage <= bound,
            "{name}: write outage {outage:.2} s, bound {bound} s:\n{}",
            log()
        );
    }
}

/// What the judgement found, on stderr (the test's output on failure).
fn print_findings(
    name: &str,
    lists: [&Vec<String>; 4],
    proms: &[detector::Promotion],
    losses: &Losses,
    history: &[judge::Switch],
) {
    for (what, list) in [
        ("after promotion", lists[0]),
        ("duplicate primary", lists[1]),
        ("two ARP answers", lists[2]),
    ] {
        for x in list.iter().take(10) {
            eprintln!("{name}: {what}: {x}");
        }
    }
    for x in lists[3] {
        eprintln!("{name}: shown, not judged (cut off from the clients): {x}");
    }
    for p in proms {
        eprintln!(
            "{name}: promotion seen: {} to timeline {} at {:.3}",
            p.host, p.tl, p.at
        );
    }
    if !losses.lost.is_empty() || !losses.async_lost.is_empty() {
        eprintln!(
            "{name}: lost {:?}, async past the promotion point {:?}, WAL distance {} B, history {history:x?}",
            losses.lost.iter().take(20).collect::<Vec<_>>(),
            losses.async_lost.iter().take(20).collect::<Vec<_>>(),
            losses.wal_distance
        );
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
        self.detector.take();
        faults::clear_all();
        // A server left frozen by a failed scenario is thawed.
        for h in DB_HOSTS {
            let _ = self.lab.exec(h, &["sh", "-c", "p=$(head -1 /var/lib/postgresql/pgdata/postmaster.pid 2>/dev/null) && kill -CONT $p $(ps -o pid= --ppid $p) 2>/dev/null; true"]);
        }
    }
}

pub fn host_of(m: &MetaView) -> String {
    m.primary.as_ref().unwrap().1.clone()
}

pub fn id_of(host: &str) -> u32 {
    DB_HOSTS.iter().position(|h| *h == host).unwrap() as u32 + 1
}

/// The current primary's host according to the meta.
pub fn meta_primary(lab: &Lab) -> String {
    host_of(&meta_view(lab))
}

pub fn repair(sc: &Scenario, host: &str, how: &[&str]) {
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
pub fn bring_back_standby(sc: &Scenario, host: &str) {
    sc.lab_cmd(&["poweron", host]);
    sc.lab.start_postgres(host);
    repair(sc, host, &[]);
}
