//! The classic scenarios: crashes, partitions, clupserver killed in the
//! middle of an operation, switchovers, cstlb. Each bound is the write
//! outage the scenario allows at probe_interval 1 (lab timeouts 2 s).

use std::process::Command;
use std::time::Duration;

use super::scenario::{
    bring_back_standby, host_of, meta_primary, meta_view, node_sql, repair, settle, Scenario,
};
use super::{both_modes, epoch, Mode, DB_HOSTS};

both_modes!(
    primary_host_power_off,
    primary_isolated_from_everyone;
    on_demand_async:
    primary_postgres_kill9,
    partition_mon_from_primary_only,
    server_killed_at_failover_detection,
    server_killed_at_failover_promotion,
    server_killed_after_failover_promotion,
    all_standbys_down_then_one_back,
    standby_host_power_off,
    mon_isolated_from_all_db_hosts,
    server_killed_at_switch_demote,
    server_killed_at_switch_promote,
    new_primary_power_off_during_repair_of_old,
    switch_back_and_forth_10_times,
    cstlb_killed_and_restarted,
    cstlb_host_power_off,
);

fn primary_host_power_off(mode: Mode) {
    let mut sc = Scenario::start("primary host power-off", mode);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_writes_resume(10);
    // The old primary comes back (host only) and is repaired as a standby.
    sc.lab_cmd(&["poweron", "pg01"]);
    repair(&sc, "pg01", &["--rewind"]);
    let m = sc.finish(Some(3), 10.0);
    assert_ne!(host_of(&m), "pg01");
}

fn primary_postgres_kill9(mode: Mode) {
    let mut sc = Scenario::start("primary postgres kill -9", mode);
    sc.fault();
    sc.lab.kill_postgres("pg01");
    sc.wait_writes_resume(10);
    let m = sc.finish(Some(3), 10.0);
    assert_eq!(host_of(&m), "pg01", "restarted in place, no failover");
}

fn standby_host_power_off(mode: Mode) {
    let mut sc = Scenario::start("standby host power-off", mode);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg02"]);
    assert!(
        sc.wait(30, |s| meta_view(&s.lab).states.get(&2).map(String::as_str)
            == Some("Fault")),
        "pg02 not Fault:\n{}",
        sc.lab.log()
    );
    bring_back_standby(&sc, "pg02");
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01");
}

fn all_standbys_down_then_one_back(mode: Mode) {
    let mut sc = Scenario::start("all standbys down, then one back", mode);
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
    // Synchronous: commits wait until a standby is back (the lab's policy
    // today); asynchronous: the primary never stops taking writes.
    let bound = if mode == Mode::Sync { 60.0 } else { 3.0 };
    let m = sc.finish(Some(1), bound);
    assert_eq!(host_of(&m), "pg01");
}

fn partition_mon_from_primary_only(mode: Mode) {
    let mut sc = Scenario::start("partition mon <-> primary only", mode);
    sc.fault();
    sc.lab_cmd(&["partition", "mon", "pg01"]);
    std::thread::sleep(Duration::from_secs(15));
    sc.lab_cmd(&["heal"]);
    assert!(!sc.in_log("to primary..."), "{}", sc.lab.log());
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01", "no failover allowed");
}

/// The write outage allowed when the primary's host falls silent.
const ISOLATED_BOUND: u64 = 12;

fn primary_isolated_from_everyone(mode: Mode) {
    let mut sc = Scenario::start("primary isolated from everyone", mode);
    sc.fault();
    for h in ["mon", "pg02", "pg03", "pg04", "cli"] {
        sc.lab_cmd(&["partition", "pg01", h]);
    }
    // Longer than a power-off's 10 s: a silent host is found out by the
    // lab's timeouts (probe_timeout 2, its retry, ssh_connect_timeout 2),
    // where a powered-off one refuses at once.
    sc.wait_writes_resume(ISOLATED_BOUND);
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
    sc.finish(Some(3), ISOLATED_BOUND as f64);
}

fn mon_isolated_from_all_db_hosts(mode: Mode) {
    let mut sc = Scenario::start("mon isolated from all db hosts", mode);
    sc.fault();
    for h in DB_HOSTS {
        sc.lab_cmd(&["partition", "mon", h]);
    }
    std::thread::sleep(Duration::from_secs(15));
    sc.lab_cmd(&["heal"]);
    let m = sc.finish(Some(3), 3.0);
    assert_eq!(host_of(&m), "pg01", "no action allowed");
    assert!(m.states.values().all(|s| s == "Normal"), "{:?}", m.states);
}

/// Power off the primary, kill -9 clupserver when `needle` is logged,
/// restart it: the failover completes with exactly one promotion.
fn server_killed_during_failover(name: &'static str, mode: Mode, needle: &str) {
    let mut sc = Scenario::start(name, mode);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_log(40, needle);
    sc.kill_server();
    sc.lab.clup(&["server", "start"]);
    sc.wait_writes_resume(20);
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
    sc.finish(Some(2), 15.0);
}

fn server_killed_at_failover_detection(mode: Mode) {
    server_killed_during_failover(
        "clupserver kill -9 at failover detection",
        mode,
        "Find database(10.213.0.41:5432) failed",
    );
}

fn server_killed_at_failover_promotion(mode: Mode) {
    server_killed_during_failover("clupserver kill -9 during promotion", mode, "to primary...");
}

fn server_killed_after_failover_promotion(mode: Mode) {
    server_killed_during_failover(
        "clupserver kill -9 after promotion",
        mode,
        "to primary completed.",
    );
}

/// `clupadm <args>` on mon in the background (clupadm may fail when the
/// server dies under it).
fn adm_in_background(
    sc: &Scenario,
    args: &'static [&'static str],
) -> std::thread::JoinHandle<std::process::Output> {
    let home = sc.lab.home.clone();
    let bin = home.join("bin/clup");
    std::thread::spawn(move || {
        Command::new(env!("CARGO_MANIFEST_DIR").to_string() + "/scripts/lab")
            .args(["exec", "mon", "env"])
            .arg(format!("CLUP_HOME={}", home.display()))
            .arg(bin)
            .arg("adm")
            .args(args)
            .output()
            .unwrap()
    })
}

/// A switch to pg02 under load, with clupserver killed when `needle` is
/// logged; restarted, it leaves one primary and loses nothing.
fn server_killed_during_switch(name: &'static str, mode: Mode, needle: &'static str) {
    let mut sc = Scenario::start(name, mode);
    sc.fault();
    let switch = adm_in_background(&sc, &["switch", "-c", "cluster01", "-i", "2"]);
    sc.wait_log(30, needle);
    sc.kill_server();
    let _ = switch.join();
    sc.lab.clup(&["server", "start"]);
    sc.wait_writes_resume(20);
    sc.finish(None, 10.0);
}

fn server_killed_at_switch_demote(mode: Mode) {
    server_killed_during_switch(
        "clupserver kill -9 during switch (demote)",
        mode,
        "stop old primary database(10.213.0.41:5432) cleanly...",
    );
}

fn server_killed_at_switch_promote(mode: Mode) {
    server_killed_during_switch(
        "clupserver kill -9 during switch (promote)",
        mode,
        "Promote standby database(10.213.0.42) to primary...",
    );
}

fn new_primary_power_off_during_repair_of_old(mode: Mode) {
    let mut sc = Scenario::start("new primary power-off during repair of old", mode);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg01"]);
    sc.wait_writes_resume(10);
    sc.wait_failover_done(30);
    let first = meta_primary(&sc.lab);
    assert_ne!(first, "pg01");
    sc.lab_cmd(&["poweron", "pg01"]);
    // Repair the old primary in the background and pull the new one's plug
    // while it runs.
    let rep = adm_in_background(&sc, &["repair", "-c", "cluster01", "-i", "1", "--rewind"]);
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
        sc.wait(15, |s| s.writes_after(t) >= 3),
        "writes did not resume after the second failover:\n{}",
        sc.lab.log()
    );
    let second = meta_primary(&sc.lab);
    assert!(second != first && second != "pg01", "{second}");
    // pg01 is repaired now if the repair failed the first time.
    if meta_view(&sc.lab).states.get(&1).map(String::as_str) != Some("Normal") {
        repair(&sc, "pg01", &["--rewind"]);
    }
    sc.finish(Some(2), 15.0);
}

fn switch_back_and_forth_10_times(mode: Mode) {
    let sc = Scenario::start("switch back and forth x10", mode);
    for i in 0..10 {
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
    let m = sc.finish(Some(3), 5.0);
    assert_eq!(host_of(&m), "pg01");
}

fn cstlb_killed_and_restarted(mode: Mode) {
    let mut sc = Scenario::start("cstlb killed and restarted", mode);
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
    sc.finish(Some(3), 3.0);
}

fn cstlb_host_power_off(mode: Mode) {
    let mut sc = Scenario::start("cstlb host power-off", mode);
    sc.fault();
    sc.lab_cmd(&["poweroff", "pg04"]);
    assert!(
        sc.wait(30, |s| meta_view(&s.lab).states.get(&4).map(String::as_str)
            == Some("Fault")),
        "pg04 not Fault:\n{}",
        sc.lab.log()
    );
    sc.finish(Some(2), 3.0);
}
