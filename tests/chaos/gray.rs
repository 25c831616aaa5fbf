//! Gray failures (issue 16, part 2): flapping networks, a partition that
//! heals mid-failover, hung servers, lossy and slow links, replication lag
//! on purpose, a hung synchronous standby. Each asserts the product's
//! intended behaviour and its outage bound, whether or not the product
//! does it yet.

use std::time::Duration;

use super::faults::{self, signal_postgres};
use super::scenario::{host_of, meta_primary, meta_view, node_sql, repair, Scenario};
use super::{both_modes, epoch, Mode};
use crate::lab::WRITE_VIP;

both_modes!(
    flapping_primary_cut_from_everyone,
    partition_heals_mid_failover,
    hung_primary_all_processes,
    lag_best_standby_promoted;
    on_demand_async:
    hung_primary_fs_frozen,
    flapping_primary_random_cuts,
    hung_primary_postmaster_only,
    flapping_primary_cut_from_monitor,
    lossy_link_monitor_primary,
    slow_link_monitor_primary,
);

const EVERYONE: [&str; 5] = ["mon", "pg02", "pg03", "pg04", "cli"];

fn sleep(secs: f64) {
    std::thread::sleep(Duration::from_secs_f64(secs));
}

/// Cut pg01 off from `others` for each of `cuts` seconds, `up` seconds
/// back in between.
fn flap(cuts: &[f64], up: f64, others: &[&str]) {
    for &c in cuts {
        faults::cut("pg01", others);
        sleep(c);
        faults::heal_cuts();
        sleep(up);
    }
}

/// After a fault that may or may not have cost a failover: once clup is
/// done, an old primary left behind is repaired as a standby.
fn repair_old_primary_if_replaced(sc: &Scenario) {
    sleep(3.0);
    if meta_primary(&sc.lab) != "pg01" {
        sc.wait_failover_done(30);
        repair(sc, "pg01", &["--rewind"]);
    }
}

fn flapping_primary_cut_from_everyone(mode: Mode) {
    let mut sc = Scenario::start("flapping primary: 8 x (2 s cut off, 4 s back)", mode);
    sc.fault();
    flap(&[2.0; 8], 4.0, &EVERYONE);
    repair_old_primary_if_replaced(&sc);
    sc.finish(None, 10.0);
}

fn flapping_primary_cut_from_monitor(mode: Mode) {
    let mut sc = Scenario::start("flapping primary, monitor only: 8 x (2 s, 4 s)", mode);
    sc.fault();
    flap(&[2.0; 8], 4.0, &["mon"]);
    // The standbys reach the primary all along: no failover.
    assert!(!sc.in_log("to primary..."), "{}", sc.lab.log());
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01", "no failover allowed");
}

fn flapping_primary_random_cuts(mode: Mode) {
    let mut sc = Scenario::start("flapping primary: 8 x (1-3 s cut off, 4 s back)", mode);
    // Durations from a seeded LCG; the seed is printed to replay a run
    // (CLUP_CHAOS_SEED=<seed>).
    let mut x = std::env::var("CLUP_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| epoch().to_bits());
    eprintln!("{}: seed {x}", sc.name);
    let cuts: Vec<f64> = (0..8)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1.0 + ((x >> 33) % 2001) as f64 / 1000.0
        })
        .collect();
    eprintln!("{}: cuts {cuts:.2?}", sc.name);
    sc.fault();
    flap(&cuts, 4.0, &EVERYONE);
    repair_old_primary_if_replaced(&sc);
    sc.finish(None, 10.0);
}

fn partition_heals_mid_failover(mode: Mode) {
    let mut sc = Scenario::start("partition heals in the middle of a failover", mode);
    sc.fault();
    faults::isolate("pg01");
    // The failover has been decided (its first line, the manual's words):
    // the partition heals while it runs.
    sc.wait_log(
        20,
        "Host(10.213.0.41) is not ok, switch database(10.213.0.41:5432)",
    );
    faults::heal_cuts();
    sc.wait_writes_resume(10);
    repair_old_primary_if_replaced(&sc);
    sc.finish(None, 10.0);
}

/// The lab's hung_timeout for the hung-primary scenarios (default 20 s).
const HUNG_TIMEOUT: u64 = 5;

/// After a hung primary thawed: a standby took over, and pg01 was fenced
/// (it answers nobody) within 10 s.
fn assert_failed_over_and_fenced(sc: &Scenario) {
    assert_ne!(
        meta_primary(&sc.lab),
        "pg01",
        "not failed over:\n{}",
        sc.lab.log()
    );
    assert!(
        sc.wait(10, |_| node_sql("pg01", "select pg_is_in_recovery()")
            .is_err()),
        "the thawed old primary was not fenced:\n{}",
        sc.lab.log()
    );
}

/// Freeze pg01's postgres (all of it, or the postmaster only) for 60 s:
/// it is fenced and failed over within hung_timeout + 5 s, nothing is
/// lost, and once thawed there is one primary.
fn hung_primary(name: &'static str, mode: Mode, postmaster_only: bool) {
    let conf = format!("hung_timeout = {HUNG_TIMEOUT}\n");
    let mut sc = Scenario::start_conf(name, mode, &conf);
    sc.fault();
    signal_postgres(&sc.lab, "pg01", "STOP", postmaster_only);
    sc.wait_writes_resume(HUNG_TIMEOUT + 5);
    let left = 60.0 - (epoch() - sc.fault_at);
    sleep(left.max(0.0));
    signal_postgres(&sc.lab, "pg01", "CONT", postmaster_only);
    assert_failed_over_and_fenced(&sc);
    repair(&sc, "pg01", &["--rewind"]);
    sc.finish(Some(3), (HUNG_TIMEOUT + 5) as f64);
}

/// pg01's pg_wal on a filesystem of its own, frozen (fsfreeze) for 30 s:
/// its backends hang in uninterruptible I/O, the write probe never
/// finishes, and after hung_timeout the fence kills it (the postmaster
/// dies; its children, stuck with SIGKILL pending, die at the thaw) and a
/// standby is promoted; after the thaw, one primary.
fn hung_primary_fs_frozen(mode: Mode) {
    let conf = format!("hung_timeout = {HUNG_TIMEOUT}\n");
    let mut fs = None;
    let mut sc = Scenario::start_with(
        "hung primary: its pg_wal fs frozen 30 s",
        mode,
        &conf,
        |lab| {
            fs = Some(faults::wal_on_loop_fs(lab, "pg01"));
        },
    );
    let fs = fs.expect("the loop fs");
    sc.fault();
    fs.freeze(&sc.lab, true);
    let resumed = sc.wait(HUNG_TIMEOUT + 5, |s| s.writes_after(s.fault_at) >= 3);
    let left = 30.0 - (epoch() - sc.fault_at);
    sleep(left.max(0.0));
    fs.freeze(&sc.lab, false);
    assert!(
        resumed,
        "writes did not resume within {} s:\n{}",
        HUNG_TIMEOUT + 5,
        sc.lab.log()
    );
    assert_failed_over_and_fenced(&sc);
    repair(&sc, "pg01", &["--rebuild"]);
    drop(fs);
    sc.finish(Some(3), (HUNG_TIMEOUT + 5) as f64);
}

fn hung_primary_all_processes(mode: Mode) {
    hung_primary("hung primary: SIGSTOP all postgres 60 s", mode, false);
}

fn hung_primary_postmaster_only(mode: Mode) {
    hung_primary("hung primary: SIGSTOP postmaster only 60 s", mode, true);
}

/// A degraded link between monitor and primary: no failover, no restart.
fn degraded_link(sc: &mut Scenario, hold: f64, make: impl FnOnce()) {
    sc.fault();
    make();
    sleep(hold);
    faults::clear_all();
    let log = sc.lab.log();
    for bad in [
        "to primary...",
        "restart database",
        "Switch primary database",
    ] {
        assert!(
            !log.contains(bad),
            "{}: '{bad}' on a degraded link:\n{log}",
            sc.name
        );
    }
}

fn lossy_link_monitor_primary(mode: Mode) {
    let mut sc = Scenario::start("30% loss between monitor and primary, 20 s", mode);
    degraded_link(&mut sc, 20.0, || faults::lossy("pg01", "mon", 30));
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01");
}

fn slow_link_monitor_primary(mode: Mode) {
    let mut sc = Scenario::start("64 kbit tbf between monitor and primary, 20 s", mode);
    degraded_link(&mut sc, 20.0, || {
        faults::slow_link("pg01", "mon", 64, 800);
        faults::slow_link("mon", "pg01", 64, 800);
    });
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01");
}

/// A burst of ~9 MB of WAL on pg01, as postgres through the write VIP.
fn burst(sc: &Scenario, rows: u32) {
    let q = format!("insert into bulk select repeat('x', 1000) from generate_series(1, {rows})");
    sc.lab
        .sql("cli", WRITE_VIP, "cs_sys_ha", &q)
        .unwrap_or_else(|e| panic!("{}: burst: {e}", sc.name));
}

/// The standby the detector saw with the most WAL, and each one's LSN.
fn most_wal(sc: &Scenario) -> (String, Vec<(String, u64)>) {
    let samples = sc.samples();
    let mut last: Vec<(String, u64)> = ["pg02", "pg03", "pg04"]
        .into_iter()
        .filter_map(|h| {
            let s = samples
                .iter()
                .rev()
                .find(|s| s.host == h && s.in_recovery)?;
            Some((h.to_string(), s.lsn))
        })
        .collect();
    last.sort_by_key(|(_, l)| std::cmp::Reverse(*l));
    (last[0].0.clone(), last)
}

fn lag_best_standby_promoted(mode: Mode) {
    let mut sc = Scenario::start("lagging standbys: the one with most WAL promoted", mode);
    faults::rate_limit_from("pg02", "pg01", 64);
    faults::rate_limit_from("pg03", "pg01", 64);
    burst(&sc, 8000);
    sleep(2.0);
    let (best, lsns) = most_wal(&sc);
    eprintln!("{}: WAL received before the crash: {lsns:x?}", sc.name);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_writes_resume(10);
    sc.wait_failover_done(30);
    assert_eq!(
        meta_primary(&sc.lab),
        best,
        "not the standby with the most WAL:\n{}",
        sc.lab.log()
    );
    faults::clear_all();
    sc.lab_cmd(&["poweron", "pg01"]);
    repair(&sc, "pg01", &["--rewind"]);
    sc.finish(Some(3), 10.0);
}

pub mod chaos_async_only {
    use super::*;

    /// Every standby throttled far behind a burst the monitor has seen:
    /// failover_max_lag (4MB here) refuses them all; the primary's host
    /// comes back, its server is restarted, nothing is lost.
    #[test]
    fn standbys_beyond_max_lag_refused() {
        let mut sc = Scenario::start_conf(
            "standbys beyond failover_max_lag: refused",
            Mode::Async,
            "failover_max_lag = 4MB\n",
        );
        for h in ["pg02", "pg03", "pg04"] {
            faults::rate_limit_from(h, "pg01", 32);
        }
        burst(&sc, 12000);
        sleep(3.0);
        eprintln!(
            "{}: WAL received before the crash: {:x?}",
            sc.name,
            most_wal(&sc).1
        );
        sc.fault();
        sc.lab_cmd(&["poweroff", "pg01"]);
        sleep(15.0);
        let promoted: Vec<_> = super::super::detector::promotions(&sc.samples());
        assert!(
            promoted.is_empty(),
            "promoted beyond failover_max_lag: {promoted:?}\n{}",
            sc.lab.log()
        );
        assert_eq!(meta_primary(&sc.lab), "pg01");
        sc.lab_cmd(&["poweron", "pg01"]);
        faults::clear_all();
        sc.wait_writes_resume(45);
        let m = sc.finish(Some(3), 45.0);
        assert_eq!(host_of(&m), "pg01");
    }
}

pub mod chaos_sync_only {
    use super::*;

    /// FIRST 1 (stb02, ...) and stb02 frozen: commits hang until clup
    /// names a healthy synchronous standby; bound 10 s, nothing lost.
    #[test]
    fn sync_standby_hangs_first_1() {
        let mut sc = Scenario::start("synchronous standby hangs (FIRST 1)", Mode::Sync);
        for q in [
            "alter system set synchronous_standby_names = 'FIRST 1 (stb02,stb03,stb04)'",
            "select pg_reload_conf()",
        ] {
            sc.lab.sql("cli", WRITE_VIP, "cs_sys_ha", q).unwrap();
        }
        sleep(2.0);
        let names = sc.lab.sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            "show synchronous_standby_names",
        );
        eprintln!(
            "{}: synchronous_standby_names before the fault: {names:?}",
            sc.name
        );
        sc.fault();
        signal_postgres(&sc.lab, "pg02", "STOP", false);
        // The bound: sync_fallback's 3 s after the flush stood still for a
        // round (probe_timeout 2 in the lab), two rounds, the rewrite.
        sc.wait_writes_resume(12);
        sleep(20.0 - (epoch() - sc.fault_at));
        signal_postgres(&sc.lab, "pg02", "CONT", false);
        if meta_view(&sc.lab).states.get(&2).map(String::as_str) != Some("Normal") {
            repair(&sc, "pg02", &[]);
        }
        sc.finish(Some(3), 12.0);
    }
}
