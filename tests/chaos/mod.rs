//! The fault matrix: each test is one fault scenario in the lab, run while
//! a writer commits numbered rows through the write VIP and a reader reads
//! through cstlb; every scenario runs twice, with synchronous replication
//! (ANY 1 of the standbys: `chaos_sync::*`) and asynchronous
//! (`chaos_async::*`). Afterwards, once the cluster is healthy again, it
//! checks (scenario.rs, judge.rs, detector.rs):
//! - every acknowledged id is on the primary and on every Normal standby,
//!   except, on an asynchronous cluster, writes past the promotion point
//!   within failover_max_lag (counted apart, with their WAL distance);
//! - no write was acknowledged by an old primary after a standby was
//!   promoted, in either mode;
//! - the duplicate-primary detector (each db host asked about its own
//!   server every 100 ms over the local socket) saw a primary, and never
//!   two that clients could write to; never two hosts answering ARP for
//!   the write VIP;
//! - the meta matches reality: one primary, not in recovery, the write VIP
//!   on it alone, every Normal standby in recovery and streaming from it;
//! - the write outage stays within the scenario's own bound.
//!
//! Each test appends a row to the table that `scripts/chaos` prints, one
//! table per mode.

mod clients;
mod detector;
mod disk;
pub(crate) mod faults;
mod gray;
mod judge;
mod matrix;
mod scenario;

use std::time::{SystemTime, UNIX_EPOCH};

pub const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
pub const DB_HOSTS: [&str; 4] = ["pg01", "pg02", "pg03", "pg04"];
pub const CSTLB_HOSTS: [&str; 2] = ["pg03", "pg04"];

/// Synchronous (ANY 1 of the standbys, the lab's `up --sync`) or plain
/// asynchronous streaming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

pub fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// "16/B374D848" -> bytes.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Both tests of a scenario function `fn name(mode: Mode)`:
/// `chaos_sync::name` and `chaos_async::name`. After `; on_demand_async:`,
/// the asynchronous twin is ignored by `cargo test` and run by
/// `scripts/chaos`, which includes the ignored ones: .ci/run (90 min on two
/// cores, each scenario about a minute with the lab's rebuild) runs every
/// synchronous scenario and the asynchronous twins of the primary's power-off
/// and isolation, flapping, a partition healing mid-failover, a hung
/// primary, lagging standbys and the full disks (tests/chaos/disk.rs).
macro_rules! both_modes {
    ($($(#[$m:meta])* $name:ident),* $(,)? $(; on_demand_async: $($od:ident),* $(,)?)?) => {
        pub mod chaos_sync {
            $( $(#[$m])* #[test] fn $name() { super::$name(super::Mode::Sync) } )*
            $($( #[test] fn $od() { super::$od(super::Mode::Sync) } )*)?
        }
        pub mod chaos_async {
            $( $(#[$m])* #[test] fn $name() { super::$name(super::Mode::Async) } )*
            $($(
                #[test]
                #[ignore = "async twin run by scripts/chaos (CI time)"]
                fn $od() { super::$od(super::Mode::Async) }
            )*)?
        }
    };
}
use both_modes;
