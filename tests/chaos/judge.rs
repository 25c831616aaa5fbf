//! What the table shows and the tests demand of lost writes (pure
//! functions, tested without a lab).
//!
//! An acknowledged id missing on the final primary is allowed only when:
//! - the cluster is asynchronous;
//! - it was acknowledged on a timeline the final primary's history left,
//!   at a WAL position past that switch point (it never reached the
//!   promoted standby);
//! - and the WAL distance of that promotion (the old primary's last
//!   acknowledged position minus the switch point) is within
//!   failover_max_lag.
//!
//! Anything else missing is lost, and fails the scenario: every missing
//! write in sync mode, an id missing on a Normal standby, an id the
//! promoted standby had received. A write acknowledged after a promotion
//! fails the scenario even when it survived (detector.rs).

use std::collections::BTreeSet;
use std::io::Write;

use super::clients::Write_;
use super::{parse_lsn, Mode};

/// A promotion point: the timeline left and the LSN where it was left.
pub type Switch = (u32, u64);

/// The lines of a timeline history file: "parentTLI\tswitchpoint\treason".
pub fn parse_history(text: &str) -> Vec<Switch> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let tl = f.next()?.parse().ok()?;
            let lsn = parse_lsn(f.next()?)?;
            Some((tl, lsn))
        })
        .collect()
}

#[derive(Debug, Default, PartialEq)]
pub struct Losses {
    /// Failures.
    pub lost: BTreeSet<u64>,
    /// Past a promotion point of an asynchronous cluster.
    pub async_lost: BTreeSet<u64>,
    /// The largest WAL distance of a promotion, in bytes.
    pub wal_distance: u64,
}

/// Sort the ids `missing` on the final primary (whose timeline history is
/// `history`) into failures and allowed asynchronous losses.
pub fn classify(
    mode: Mode,
    missing: &BTreeSet<u64>,
    writes: &[Write_],
    history: &[Switch],
) -> Losses {
    let mut l = Losses::default();
    for &(tl, sp) in history {
        let last = writes
            .iter()
            .filter_map(|w| w.ack.as_ref())
            .filter(|a| a.tl == tl)
            .map(|a| a.lsn)
            .max()
            .unwrap_or(0);
        l.wal_distance = l.wal_distance.max(last.saturating_sub(sp));
    }
    for &id in missing {
        let ack = writes
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| w.ack.as_ref());
        let past_switch =
            ack.is_some_and(|a| history.iter().any(|&(tl, sp)| a.tl == tl && a.lsn > sp));
        if mode == Mode::Async && past_switch {
            l.async_lost.insert(id);
        } else {
            l.lost.insert(id);
        }
    }
    l
}

pub const HEADER: &str = "mode  scenario                                        acked  lost  async_lost  wal_dist_B  after_promo  dups  arp2  outage_s  bound_s  read_out  reads ok/all";

/// One row of the table.
#[derive(Debug)]
pub struct Row<'a> {
    pub mode: Mode,
    pub name: &'a str,
    pub acked: usize,
    pub losses: &'a Losses,
    pub after_promo: usize,
    pub dups: usize,
    pub arp2: usize,
    pub outage: f64,
    pub bound: f64,
    pub read_outage: f64,
    pub reads_ok: u64,
    pub reads_all: u64,
}

impl Row<'_> {
    pub fn text(&self) -> String {
        format!(
            "{:<5} {:<46} {:>6} {:>5} {:>11} {:>11} {:>12} {:>5} {:>5} {:>9.2} {:>8.0} {:>9.2} {:>6}/{:<6}",
            self.mode.name(),
            self.name,
            self.acked,
            self.losses.lost.len(),
            self.losses.async_lost.len(),
            self.losses.wal_distance,
            self.after_promo,
            self.dups,
            self.arp2,
            self.outage,
            self.bound,
            self.read_outage,
            self.reads_ok,
            self.reads_all
        )
    }
}

/// Print a row and append it to the table file (`CLUP_CHAOS_OUT`, default
/// /var/tmp/clup-chaos.txt), which scripts/chaos prints at the end.
pub fn report(row: &str) {
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

/// Longest time between acknowledged writes from `from` on (edges count:
/// the last ack before `from` opens the first gap).
pub fn longest_gap(writes: &[Write_], from: f64, to: f64) -> f64 {
    let mut ends: Vec<f64> = writes.iter().filter(|w| w.ok()).map(|w| w.end).collect();
    ends.sort_by(|a, b| a.total_cmp(b));
    longest_gap_of(&ends, from, to)
}

pub fn longest_gap_of(ends: &[f64], from: f64, to: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::clients::{parse_ack, Ack};

    #[test]
    fn chaos_table_helpers() {
        assert_eq!(longest_gap_of(&[1.0, 2.0, 5.0, 5.5], 1.5, 6.0), 3.0);
        assert_eq!(longest_gap_of(&[1.0], 1.5, 6.0), 5.0);
        let h = parse_history("1\t0/5000000\tno recovery target specified\n\n2\t0/6000A8\tx\n");
        assert_eq!(h, vec![(1, 0x5000000), (2, 0x6000a8)]);
        assert_eq!(
            parse_ack("pg02|1700000000.5|00000002|0/6000B0\n"),
            Some(Ack {
                host: "pg02".into(),
                at: 1700000000.5,
                tl: 2,
                lsn: 0x6000b0
            })
        );
        let w = |id, tl, lsn| Write_ {
            id,
            start: 0.0,
            end: 0.0,
            ack: Some(Ack {
                host: "pg01".into(),
                at: 0.0,
                tl,
                lsn,
            }),
        };
        // 2 reached the standby before the switch at 0x100; 3 did not.
        let writes = [w(1, 1, 0x80), w(2, 1, 0xf0), w(3, 1, 0x180), w(4, 2, 0x200)];
        let missing: BTreeSet<u64> = [2, 3].into();
        let a = classify(Mode::Async, &missing, &writes, &[(1, 0x100)]);
        assert_eq!(a.lost, [2].into());
        assert_eq!(a.async_lost, [3].into());
        assert_eq!(a.wal_distance, 0x80);
        let s = classify(Mode::Sync, &missing, &writes, &[(1, 0x100)]);
        assert_eq!(s.lost, missing);
    }
}
