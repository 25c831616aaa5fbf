//! A full disk (issue 16, part 2): pg_wal on a small filesystem of its own
//! (a tmpfs in the lab) fills up under writes.
//! - On the primary, postgres PANICs and will not start again (its end of
//!   recovery needs a new WAL segment): after restart_tries, clup fails
//!   over, and its log says why (the start log's PANIC line).
//! - On a standby, its walreceiver cannot write: the node goes Fault and
//!   leaves the cstlbs; the primary and the writes go on.

use super::faults::{self, SmallWalFs};
use super::scenario::{meta_primary, repair, Scenario};
use super::{both_modes, Mode};
use crate::lab::WRITE_VIP;

both_modes!(
    primary_wal_disk_full,
    standby_wal_disk_full;
    on_demand_async:
);

/// Room for this much WAL on the small filesystem, above what it held.
const HEADROOM_MB: u64 = 48;

/// About 9 MB of WAL on the primary, through the write VIP.
const BURST: &str = "insert into bulk select repeat('x', 1000) from generate_series(1, 8000)";

/// Bursts until one fails (the primary is gone) or `max` went through;
/// how many went through.
fn bursts(sc: &Scenario, max: u32) -> u32 {
    for n in 0..max {
        if let Err(e) = sc.lab.sql("cli", WRITE_VIP, "cs_sys_ha", BURST) {
            eprintln!("{}: burst {} failed: {e}", sc.name, n + 1);
            return n;
        }
    }
    max
}

fn primary_wal_disk_full(mode: Mode) {
    let mut fs: Option<SmallWalFs> = None;
    let mut sc = Scenario::start_with("primary's pg_wal disk fills up", mode, "", |lab| {
        fs = Some(faults::wal_on_small_fs(lab, "pg01", HEADROOM_MB));
    });
    let n = bursts(&sc, 20);
    assert!(n < 20, "{}: 20 bursts and pg_wal never filled", sc.name);
    sc.fault();
    sc.wait_writes_resume(20);
    sc.wait_failover_done(30);
    assert_ne!(
        meta_primary(&sc.lab),
        "pg01",
        "not failed over:\n{}",
        sc.lab.log()
    );
    let log = sc.lab.log();
    let why = log
        .lines()
        .find(|l| l.contains("did not come back after 2 restart(s) (the last start said:"))
        .unwrap_or_else(|| panic!("{}: no failover reason with the start log:\n{log}", sc.name));
    assert!(why.contains("No space left on device"), "{why}");
    eprintln!("{}: {why}", sc.name);
    // The old primary comes back as a standby, rebuilt (pg_wal on its own
    // disk again), and the small filesystem goes.
    repair(&sc, "pg01", &["--rebuild"]);
    drop(fs);
    sc.finish(Some(3), 20.0);
}

fn standby_wal_disk_full(mode: Mode) {
    let mut fs: Option<SmallWalFs> = None;
    let mut sc = Scenario::start_with("a standby's pg_wal disk fills up", mode, "", |lab| {
        fs = Some(faults::wal_on_small_fs(lab, "pg03", HEADROOM_MB));
    });
    sc.fault();
    let n = bursts(&sc, 10);
    assert_eq!(n, 10, "{}: the primary failed:\n{}", sc.name, sc.lab.log());
    let fault = sc.wait(60, |s| s.lab.db_state(3).0 == "Fault");
    assert!(fault, "{}: pg03 not Fault:\n{}", sc.name, sc.lab.log());
    let out = |s: &Scenario| {
        ["pg03", "pg04"].iter().all(|h| {
            let (code, body) = s.lab.cstlb_list(h, "lab_cstlb_token");
            code == "200" && !body.contains("\"10.213.0.43:5432\"")
        })
    };
    assert!(
        sc.wait(10, out),
        "{}: pg03 still in a cstlb:\n{}",
        sc.name,
        sc.lab.log()
    );
    assert_eq!(meta_primary(&sc.lab), "pg01", "{}", sc.lab.log());
    repair(&sc, "pg03", &["--rebuild"]);
    drop(fs);
    sc.finish(Some(3), 3.0);
}
