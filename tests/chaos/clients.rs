//! The clients of a scenario: a writer through the write VIP, a reader
//! through cstlb, and a sampler of who holds the write VIP. Real psql
//! processes inside the lab's `cli` namespace (setns in the child), each
//! with a hard deadline: a client whose server hangs (SIGSTOP, a partition)
//! is killed with SIGKILL, never cancelled — a cancel during the
//! synchronous-replication wait would turn into a local commit reported as
//! success.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{epoch, faults, parse_lsn, CSTLB_HOSTS, DB_HOSTS, PSQL};
use crate::lab::{ip, WRITE_VIP};

/// `prog` run inside lab host `host`'s network namespace only (the root
/// file system stays ours, so our psql runs there).
pub fn in_netns(host: &str, prog: &str) -> Command {
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
pub fn psql_as(user: &str, addr: &str, port: u16, queries: &[&str]) -> Command {
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
pub fn psql(addr: &str, port: u16, queries: &[&str]) -> Command {
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
pub struct Done<T> {
    pub tag: T,
    pub start: f64,
    pub end: f64,
    pub out: Option<String>,
}

pub struct Pool<T> {
    running: Vec<Attempt<T>>,
}

impl<T> Pool<T> {
    pub fn new() -> Pool<T> {
        Pool {
            running: Vec::new(),
        }
    }

    pub fn spawn(&mut self, tag: T, mut cmd: Command, limit: Duration) {
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
    pub fn poll(&mut self) -> Vec<Done<T>> {
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
            let Some(ok) = status else {
                i += 1;
                continue;
            };
            let mut a = self.running.swap_remove(i);
            let mut s = String::new();
            if let Some(mut o) = a.child.stdout.take() {
                let _ = o.read_to_string(&mut s);
            }
            done.push(Done {
                tag: a.tag,
                start: a.start,
                end: epoch(),
                out: ok.then_some(s),
            });
        }
        done
    }

    /// Wait for (or kill at their deadlines) everything still in flight.
    pub fn drain(&mut self) -> Vec<Done<T>> {
        let mut all = Vec::new();
        while !self.running.is_empty() {
            all.extend(self.poll());
            std::thread::sleep(Duration::from_millis(20));
        }
        all
    }
}

/// What the server said about an acknowledged write, from the RETURNING
/// of the insert itself (evaluated just before the commit; psql prints it
/// only once the commit was acknowledged).
#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    /// The lab host whose server took the write.
    pub host: String,
    /// The server's clock as the row was inserted (before the commit).
    pub at: f64,
    pub tl: u32,
    /// WAL insert position after the row (the commit record follows it).
    pub lsn: u64,
}

/// The writer's query: insert `id`, returning who took it, when, on which
/// timeline and where in the WAL.
pub fn write_query(id: u64) -> String {
    format!(
        "insert into ledger values ({id}) returning chaos_host(), \
         extract(epoch from clock_timestamp()), \
         substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8), \
         pg_current_wal_insert_lsn()"
    )
}

pub fn parse_ack(out: &str) -> Option<Ack> {
    let line = out.lines().find(|l| !l.trim().is_empty())?;
    let f: Vec<&str> = line.trim().split('|').collect();
    if f.len() != 4 {
        return None;
    }
    Some(Ack {
        host: f[0].to_string(),
        at: f[1].parse().ok()?,
        tl: u32::from_str_radix(f[2], 16).ok()?,
        lsn: parse_lsn(f[3])?,
    })
}

/// A write through the write VIP: `ack` is Some when COMMIT was acknowledged.
#[derive(Clone, Debug)]
pub struct Write_ {
    pub id: u64,
    pub start: f64,
    pub end: f64,
    pub ack: Option<Ack>,
}

impl Write_ {
    pub fn ok(&self) -> bool {
        self.ack.is_some()
    }
}

/// Who held the write VIP at `t`, and which db hosts were cut off from
/// the clients (a partition with `cli`): a holder cut off answers no
/// client's ARP.
#[derive(Clone, Debug)]
pub struct VipSample {
    pub t: f64,
    pub holders: Vec<&'static str>,
    pub cut_from_cli: Vec<&'static str>,
}

impl VipSample {
    /// Holders a client reaches: those answering ARP for the VIP on cli's link.
    pub fn answering(&self) -> Vec<&'static str> {
        self.holders
            .iter()
            .copied()
            .filter(|h| !self.cut_from_cli.contains(h))
            .collect()
    }
}

#[derive(Default)]
pub struct Record {
    pub writes: Vec<Write_>,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub read_ends: Vec<f64>,
    pub vip: Vec<VipSample>,
}

/// The clients of one scenario, each a thread of its own.
pub struct Clients {
    pub stop: Arc<AtomicBool>,
    pub rec: Arc<Mutex<Record>>,
    pub threads: Vec<JoinHandle<()>>,
}

impl Clients {
    pub fn start() -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let rec = Arc::new(Mutex::new(Record::default()));
        let threads = vec![
            writer(stop.clone(), rec.clone()),
            reader(stop.clone(), rec.clone()),
            vip_sampler(stop.clone(), rec.clone()),
        ];
        Clients { stop, rec, threads }
    }

    pub fn finish(self) -> Record {
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

    pub fn acked(&self) -> usize {
        let r = self.rec.lock().unwrap();
        r.writes.iter().filter(|w| w.ok()).count()
    }
}

/// The writer: a new attempt every 100 ms, each with a new id.
fn writer(s: Arc<AtomicBool>, r: Arc<Mutex<Record>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pool = Pool::new();
        let mut id = 0u64;
        let save = |done: Vec<Done<u64>>| {
            let mut r = r.lock().unwrap();
            for d in done {
                r.writes.push(Write_ {
                    id: d.tag,
                    start: d.start,
                    end: d.end,
                    ack: d.out.as_deref().and_then(parse_ack),
                });
            }
        };
        while !s.load(Ordering::Relaxed) {
            id += 1;
            let q = write_query(id);
            pool.spawn(id, psql(WRITE_VIP, 5432, &[&q]), Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(100));
            save(pool.poll());
        }
        save(pool.drain());
    })
}

/// The reader: through cstlb, alternating between its two hosts.
fn reader(s: Arc<AtomicBool>, r: Arc<Mutex<Record>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
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
    })
}

/// Who holds the write VIP (read from each host's own netns), every 200 ms.
fn vip_sampler(s: Arc<AtomicBool>, r: Arc<Mutex<Record>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let holders = vip_holders();
            let cut = faults::cut_from("cli");
            let sample = VipSample {
                t: epoch(),
                holders,
                cut_from_cli: DB_HOSTS.into_iter().filter(|h| cut.contains(h)).collect(),
            };
            r.lock().unwrap().vip.push(sample);
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// The lab db hosts holding the write VIP, read from each host's own netns.
pub fn vip_holders() -> Vec<&'static str> {
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
