//! The duplicate-primary detector. One long-lived psql per db host asks
//! that host's own server every 100 ms (`\watch 0.1`) over its local
//! socket, reached through the host's mount namespace
//! (/proc/<host init>/root/run/postgresql), so no partition can blind it:
//! (server clock, in_recovery, timeline, WAL position). A session that
//! breaks (a fence, a restart, a power-off) is opened again 100 ms later.
//! The lab's hosts share one kernel clock, so the samples of different
//! hosts, the writer's acknowledgements and the VIP samples compare.
//!
//! The judgement (pure functions, tested below without a lab):
//! - a primary span is a run of out-of-recovery samples of one host, none
//!   more than 0.5 s apart;
//! - a promotion is a host's first out-of-recovery sample after one in
//!   recovery;
//! - a finding is an overlap of two hosts' primary spans during which both
//!   are within the clients' reach (not cut off from cli) and either holds
//!   the write VIP or acknowledges a write; an old primary cut off from
//!   everyone keeps running until it can be fenced, and is shown only;
//! - a write acknowledged by a host on an older timeline after another
//!   host's promotion was seen is a failure (its insert started after);
//! - two hosts answering ARP for the write VIP on cli's link at once is a
//!   failure;
//! - but an old primary that was cut off from the clients when the new one
//!   was promoted (or up to [`LAST_LOOK`] before), and comes back, has [`FENCE_GRACE`] from when it is
//!   reachable again for clup to fence it: its overlap and double ARP
//!   answers in that time are shown, not judged (nothing can fence a host
//!   nobody reaches); a write it acknowledges is a failure all the same.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::clients::{Ack, VipSample, Write_};
use super::{parse_lsn, DB_HOSTS, PSQL};
use crate::lab::LAB_DIR;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub t: f64,
    pub host: &'static str,
    pub in_recovery: bool,
    pub tl: u32,
    /// A primary's WAL insert position; a standby's received (or replayed) LSN.
    pub lsn: u64,
}

const QUERY: &str = "select extract(epoch from clock_timestamp()), pg_is_in_recovery(), \
case when pg_is_in_recovery() then coalesce((select received_tli from pg_stat_wal_receiver), \
(select timeline_id from pg_control_checkpoint())) \
else ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int end, \
case when pg_is_in_recovery() then coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
else pg_current_wal_insert_lsn() end \\watch 0.1\n";

type Children = Arc<Mutex<(bool, Vec<u32>)>>;

pub struct Detector {
    samples: Arc<Mutex<Vec<Sample>>>,
    /// (stopped, pids of the psql sessions): a thread registers its child
    /// under this lock only while not stopped.
    children: Children,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Detector {
    pub fn start() -> Detector {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let children: Children = Arc::new(Mutex::new((false, Vec::new())));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = DB_HOSTS
            .into_iter()
            .map(|h| watch_host(h, samples.clone(), children.clone(), stop.clone()))
            .collect();
        Detector {
            samples,
            children,
            threads,
            stop,
        }
    }

    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn finish(mut self) -> Vec<Sample> {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        {
            let mut c = self.children.lock().unwrap();
            c.0 = true;
            for pid in c.1.drain(..) {
                // SAFETY: our own child, not yet reaped (its thread waits for it).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        self.halt();
    }
}

fn watch_host(
    host: &'static str,
    samples: Arc<Mutex<Vec<Sample>>>,
    children: Children,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let pid_file = format!("{LAB_DIR}/hosts/{host}/init.pid");
        while !stop.load(Ordering::Relaxed) {
            let init = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let mut cmd = Command::new(PSQL);
            cmd.args(["-XAtq", "-F", " ", "-U", "postgres", "-d", "postgres", "-h"])
                .arg(format!("/proc/{}/root/run/postgresql", init.trim()))
                .env("PGCONNECT_TIMEOUT", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut child = {
                let mut c = children.lock().unwrap();
                if c.0 {
                    return;
                }
                let Ok(child) = cmd.spawn() else {
                    drop(c);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                c.1.push(child.id());
                child
            };
            if let Some(mut i) = child.stdin.take() {
                let _ = i.write_all(QUERY.as_bytes());
            }
            let out = BufReader::new(child.stdout.take().unwrap());
            for line in out.lines().map_while(Result::ok) {
                if let Some(s) = parse_sample(host, &line) {
                    samples.lock().unwrap().push(s);
                }
            }
            let _ = child.wait();
            children.lock().unwrap().1.retain(|p| *p != child.id());
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn parse_sample(host: &'static str, line: &str) -> Option<Sample> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 4 {
        return None;
    }
    Some(Sample {
        t: f[0].parse().ok()?,
        host,
        in_recovery: f[1] == "t",
        tl: f[2].parse().ok()?,
        lsn: parse_lsn(f[3])?,
    })
}

/// A run of one host's out-of-recovery samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub host: &'static str,
    pub from: f64,
    pub to: f64,
    pub tl: u32,
}

/// Samples further apart than this end a span (the host stopped answering).
const SPAN_GAP: f64 = 0.5;

fn by_host<'a>(samples: &'a [Sample], host: &str) -> Vec<&'a Sample> {
    let mut v: Vec<&Sample> = samples.iter().filter(|s| s.host == host).collect();
    v.sort_by(|a, b| a.t.total_cmp(&b.t));
    v
}

pub fn primary_spans(samples: &[Sample]) -> Vec<Span> {
    let mut spans = Vec::new();
    for host in DB_HOSTS {
        let mut cur: Option<Span> = None;
        for s in by_host(samples, host) {
            let extends = cur
                .as_ref()
                .is_some_and(|c| !s.in_recovery && s.t - c.to <= SPAN_GAP);
            if extends {
                let c = cur.as_mut().unwrap();
                c.to = s.t;
                c.tl = c.tl.max(s.tl);
                continue;
            }
            spans.extend(cur.take());
            if !s.in_recovery {
                cur = Some(Span {
                    host,
                    from: s.t,
                    to: s.t,
                    tl: s.tl,
                });
            }
        }
        spans.extend(cur);
    }
    spans
}

/// A host seen out of recovery right after being seen in recovery.
#[derive(Clone, Debug, PartialEq)]
pub struct Promotion {
    pub host: &'static str,
    pub at: f64,
    pub tl: u32,
}

pub fn promotions(samples: &[Sample]) -> Vec<Promotion> {
    let mut out = Vec::new();
    for host in DB_HOSTS {
        let mut prev: Option<&Sample> = None;
        for s in by_host(samples, host) {
            if !s.in_recovery && prev.is_some_and(|p| p.in_recovery) {
                out.push(Promotion {
                    host,
                    at: s.t,
                    tl: s.tl,
                });
            }
            prev = Some(s);
        }
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    out
}

/// Writes acknowledged by a host on an older timeline after another
/// host's promotion was seen.
pub fn acks_after_promotion(writes: &[Write_], proms: &[Promotion]) -> Vec<String> {
    let mut out = Vec::new();
    for w in writes {
        let Some(a) = &w.ack else { continue };
        if let Some(p) = proms
            .iter()
            .find(|p| p.host != a.host && p.tl > a.tl && a.at > p.at)
        {
            out.push(format!(
                "write {} acknowledged by {} (timeline {}) at {:.3}, {:.3} s after {} was promoted (timeline {})",
                w.id,
                a.host,
                a.tl,
                a.at,
                a.at - p.at,
                p.host,
                p.tl
            ));
        }
    }
    out
}

/// The VIP sample in force at `t` (the last one taken at or before it).
fn vip_at(vip: &[VipSample], t: f64) -> Option<&VipSample> {
    vip.iter().take_while(|v| v.t <= t).last()
}

fn reachable(v: &VipSample, host: &str) -> bool {
    !v.cut_from_cli.contains(&host)
}

/// How long clup may take to fence an old primary that comes back onto
/// the clients' network after a promotion decided while it was cut off
/// from everyone: its next round sees it (probe_interval 1 s here) and the
/// fence takes the write VIP off it first. Nothing can fence a host that
/// nobody reaches; from when it is reachable again, this is clup's bound.
/// A write it acknowledges meanwhile is still a failure
/// ([`acks_after_promotion`]).
pub const FENCE_GRACE: f64 = 2.0;

/// How long before a promotion clup's last look at the old primary can be
/// (the look, the promotion itself): an old primary cut off from the
/// clients then may come back between the look and the promotion.
pub const LAST_LOOK: f64 = 1.0;

/// A returning old primary's grace: host, from when it was reachable
/// again, until when it may still hold the write VIP.
pub type Grace = (&'static str, f64, f64);

/// The graces of old primaries that were cut off from the clients when a
/// newer timeline's primary appeared beside them, and came back.
pub fn returning(spans: &[Span], vip: &[VipSample]) -> Vec<Grace> {
    let mut out = Vec::new();
    for (i, x) in spans.iter().enumerate() {
        for y in &spans[i + 1..] {
            let (a, b) = (x.from.max(y.from), x.to.min(y.to));
            if x.host == y.host || a > b || x.tl == y.tl {
                continue;
            }
            let old = if x.tl < y.tl { x } else { y };
            // Cut off at the promotion, or within LAST_LOOK before it (when
            // clup looked at it for the last time).
            let cut_at = vip
                .iter()
                .rev()
                .filter(|v| v.t >= a - LAST_LOOK && v.t <= a && !reachable(v, old.host))
                .map(|v| v.t)
                .next();
            let Some(cut_at) = cut_at else {
                continue;
            };
            if let Some(v) = vip.iter().find(|v| v.t > cut_at && reachable(v, old.host)) {
                out.push((old.host, v.t, v.t + FENCE_GRACE));
            }
        }
    }
    out
}

fn in_grace(graces: &[Grace], host: &str, t: f64) -> bool {
    graces
        .iter()
        .any(|(h, from, until)| *h == host && t >= *from && t <= *until)
}

/// Overlaps of two primary spans that clients could write to both of;
/// the rest of the overlaps come back as `shown`. A returning old primary
/// within its [`FENCE_GRACE`] is shown, with the time it took, unless it
/// acknowledged a write.
pub fn duplicate_primaries(
    spans: &[Span],
    vip: &[VipSample],
    acks: &[&Ack],
) -> (Vec<String>, Vec<String>) {
    let graces = returning(spans, vip);
    let graced = |v: &VipSample| v.holders.iter().any(|h| in_grace(&graces, h, v.t));
    let (mut found, mut shown) = (Vec::new(), Vec::new());
    for (i, x) in spans.iter().enumerate() {
        for y in &spans[i + 1..] {
            let (a, b) = (x.from.max(y.from), x.to.min(y.to));
            if x.host == y.host || a > b {
                continue;
            }
            let old = if x.tl < y.tl { x.host } else { y.host };
            let both = |v: &VipSample| reachable(v, x.host) && reachable(v, y.host);
            let mut why = None;
            for v in vip.iter().filter(|v| v.t >= a && v.t <= b && !graced(v)) {
                if both(v) && v.holders.iter().any(|h| *h == x.host || *h == y.host) {
                    why = Some(format!("the write VIP on {:?} at {:.3}", v.holders, v.t));
                    break;
                }
            }
            if why.is_none() {
                why = acks
                    .iter()
                    .find(|k| {
                        (k.host == x.host || k.host == y.host)
                            && k.at >= a
                            && k.at <= b
                            && (k.host == old || !in_grace(&graces, old, k.at))
                            && vip_at(vip, k.at).is_none_or(both)
                    })
                    .map(|k| format!("{} acknowledged a write at {:.3}", k.host, k.at));
            }
            let text = format!(
                "{} (tl {}) and {} (tl {}) both out of recovery {a:.3}..{b:.3} ({:.2} s)",
                x.host,
                x.tl,
                y.host,
                y.tl,
                b - a
            );
            match why {
                Some(w) => found.push(format!("{text}: {w}")),
                None => shown.push(text),
            }
        }
    }
    for (h, from, _) in &graces {
        shown.push(format!(
            "{h} came back as an old primary at {from:.3}: fenced within FENCE_GRACE ({FENCE_GRACE} s) or judged above"
        ));
    }
    (found, shown)
}

/// VIP samples with two hosts answering ARP for the write VIP on cli's
/// link, but for a returning old primary within its grace (see
/// [`returning`]).
pub fn double_arp(vip: &[VipSample], graces: &[Grace]) -> Vec<String> {
    vip.iter()
        .filter(|v| {
            v.answering()
                .iter()
                .filter(|h| !in_grace(graces, h, v.t))
                .count()
                > 1
        })
        .map(|v| format!("{:?} answer for the write VIP at {:.3}", v.answering(), v.t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, host: &'static str, in_recovery: bool, tl: u32) -> Sample {
        Sample {
            t,
            host,
            in_recovery,
            tl,
            lsn: 0,
        }
    }

    fn v(t: f64, holders: &[&'static str], cut: &[&'static str]) -> VipSample {
        VipSample {
            t,
            holders: holders.to_vec(),
            cut_from_cli: cut.to_vec(),
        }
    }

    #[test]
    fn chaos_detector_judgement() {
        assert_eq!(
            parse_sample("pg01", "1700000000.25 f 2 0/3000060"),
            Some(s(1700000000.25, "pg01", false, 2)).map(|mut x| {
                x.lsn = 0x3000060;
                x
            })
        );
        // pg01 primary until 2.0, silent (cut off) until 6.0, then back;
        // pg02 promoted at 3.0.
        let mut samples: Vec<Sample> = (0..=20)
            .map(|i| s(i as f64 / 10.0, "pg01", false, 1))
            .collect();
        samples.extend((60..=62).map(|i| s(i as f64 / 10.0, "pg01", false, 1)));
        samples.extend((0..30).map(|i| s(i as f64 / 10.0, "pg02", true, 1)));
        samples.extend((30..=70).map(|i| s(i as f64 / 10.0, "pg02", false, 2)));
        let spans = primary_spans(&samples);
        assert_eq!(spans.len(), 3, "{spans:?}");
        let proms = promotions(&samples);
        assert_eq!(
            proms,
            vec![Promotion {
                host: "pg02",
                at: 3.0,
                tl: 2
            }]
        );
        // While pg01 was cut off from cli there is nothing to judge.
        let cut = [v(6.0, &["pg01", "pg02"], &["pg01"]), v(6.3, &["pg02"], &[])];
        let (found, shown) = duplicate_primaries(&spans, &cut, &[]);
        assert!(found.is_empty(), "{found:?}");
        // The overlap, and pg01's return (at 6.3) with its grace.
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(double_arp(&cut, &[]).is_empty());
        // Back on the network with the VIP, never seen cut off: a finding,
        // twice over.
        let back = [v(6.1, &["pg01", "pg02"], &[])];
        assert_eq!(duplicate_primaries(&spans, &back, &[]).0.len(), 1);
        assert_eq!(double_arp(&back, &returning(&spans, &back)).len(), 1);
        // Cut off when pg02 was promoted, back at 6.1 with the VIP: clup
        // has FENCE_GRACE to take it off; within it, shown; past it, a
        // finding (pg01's span ends at 6.2 here, so stretch it).
        let returned = [
            v(6.0, &["pg01", "pg02"], &["pg01"]),
            v(6.1, &["pg01", "pg02"], &[]),
        ];
        let graces = returning(&spans, &returned);
        assert_eq!(graces, vec![("pg01", 6.1, 6.1 + FENCE_GRACE)]);
        let (found, shown) = duplicate_primaries(&spans, &returned, &[]);
        assert!(found.is_empty(), "{found:?}");
        assert!(shown.iter().any(|s| s.contains("came back")), "{shown:?}");
        assert!(double_arp(&returned, &graces).is_empty());
        // Cut off until just before the promotion (the last look saw it
        // gone), back before it: a returning old primary all the same.
        let before = [
            v(2.6, &["pg01"], &["pg01"]),
            v(2.9, &["pg01"], &[]),
            v(3.5, &["pg01", "pg02"], &[]),
        ];
        let early = returning(&spans, &before);
        assert_eq!(early, vec![]);
        let mut again: Vec<Sample> = (0..=40)
            .map(|i| s(i as f64 / 10.0, "pg01", false, 1))
            .collect();
        again.extend((0..30).map(|i| s(i as f64 / 10.0, "pg02", true, 1)));
        again.extend((30..=70).map(|i| s(i as f64 / 10.0, "pg02", false, 2)));
        let again_spans = primary_spans(&again);
        let graces = returning(&again_spans, &before);
        assert_eq!(graces, vec![("pg01", 2.9, 2.9 + FENCE_GRACE)]);
        assert!(duplicate_primaries(&again_spans, &before, &[]).0.is_empty());
        assert!(double_arp(&before, &graces).is_empty());
        // Cut off only long before the promotion: no grace.
        let long_ago = [
            v(1.0, &["pg01"], &["pg01"]),
            v(1.5, &["pg01"], &[]),
            v(3.5, &["pg01", "pg02"], &[]),
        ];
        assert!(returning(&again_spans, &long_ago).is_empty());
        assert_eq!(duplicate_primaries(&again_spans, &long_ago, &[]).0.len(), 1);
        let mut long: Vec<Sample> = samples.clone();
        long.extend((63..=95).map(|i| s(i as f64 / 10.0, "pg01", false, 1)));
        long.extend((71..=95).map(|i| s(i as f64 / 10.0, "pg02", false, 2)));
        let long_spans = primary_spans(&long);
        let late = [
            v(6.0, &["pg01", "pg02"], &["pg01"]),
            v(6.1, &["pg01", "pg02"], &[]),
            v(9.0, &["pg01", "pg02"], &[]),
        ];
        assert_eq!(duplicate_primaries(&long_spans, &late, &[]).0.len(), 1);
        assert_eq!(double_arp(&late, &returning(&long_spans, &late)).len(), 1);
        // An acknowledgement by the old timeline after the promotion.
        let ack = |host: &str, at, tl| Write_ {
            id: 7,
            start: at,
            end: at,
            ack: Some(Ack {
                host: host.into(),
                at,
                tl,
                lsn: 0,
            }),
        };
        let w = [
            ack("pg01", 6.1, 1),
            ack("pg01", 2.9, 1),
            ack("pg02", 6.1, 2),
        ];
        assert_eq!(acks_after_promotion(&w, &proms).len(), 1);
        let acks: Vec<&Ack> = w.iter().filter_map(|w| w.ack.as_ref()).collect();
        let (found, _) = duplicate_primaries(&spans, &[v(5.9, &["pg02"], &[])], &acks);
        assert_eq!(found.len(), 1, "{found:?}");
    }
}
