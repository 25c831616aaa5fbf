//! A standby left behind by a failover (issue #16), in the asynchronous
//! lab: pg03 is cut off from the monitor only and keeps streaming from
//! pg01 while pg02 and pg04 are cut off from pg01, so pg03 alone receives
//! the last rows; pg01's plug is pulled and clup promotes pg02 (pg03 is
//! Fault and unreachable: no candidate). Once the cut heals, pg03 runs as a
//! standby whose WAL went past the new timeline's fork point, which the
//! test reads from the new primary's timeline history, not from clup.
//! With `auto_rewind = on` clup rewinds it by itself; with it off it stays
//! Fault, a plain repair fails (postgres says the new timeline forked off
//! before its recovery point) and `repair --rewind` brings it back.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::chaos::faults;
use crate::chaos::parse_lsn;
use crate::lab::{ip, Lab, WRITE_VIP};

/// Rows every node has before the fork, and rows only pg01 and pg03 get.
const SHARED_ROWS: u32 = 100;
const FORKED_ROWS: u32 = 100;
/// Rows the new primary takes after the failover.
const NEW_ROWS: u32 = 50;

/// Every fault of [`faults`] undone when the test ends, however it ends
/// (the Lab's own drop heals only the lab's partitions).
struct ClearFaults;

impl Drop for ClearFaults {
    fn drop(&mut self) {
        faults::clear_all();
    }
}

/// One query from cli straight to `host`.
fn on(lab: &Lab, host: &str, q: &str) -> Result<String, String> {
    lab.sql("cli", ip(host), "cs_sys_ha", q)
}

fn count(lab: &Lab, host: &str, filter: &str) -> Option<u32> {
    on(
        lab,
        host,
        &format!("select count(*) from rewind_t where {filter}"),
    )
    .ok()?
    .parse()
    .ok()
}

/// The left-behind situation, up to the healed cut. Returns the new
/// primary's host and the lab (its server running, `conf` appended).
fn left_behind(conf: &str) -> (Lab, ClearFaults, &'static str) {
    let mut lab = Lab::take_opts(1, false);
    faults::clear_all();
    let guard = ClearFaults;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(lab.home.join("conf/clup.conf"))
        .unwrap();
    f.write_all(conf.as_bytes()).unwrap();
    drop(f);
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        "drop table if exists rewind_t; create table rewind_t(id int primary key)",
    )
    .unwrap();
    lab.start_server();
    assert!(
        lab.wait(15, |l| l.log().contains(
            "no action: primary database(10.213.0.41:5432) ok, 3 standby(s) ok"
        )),
        "{}",
        lab.log()
    );
    let insert = |lab: &Lab, from: u32, to: u32| {
        lab.sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            &format!("insert into rewind_t select generate_series({from}, {to})"),
        )
        .unwrap();
    };
    insert(&lab, 1, SHARED_ROWS);
    for h in ["pg02", "pg03", "pg04"] {
        assert!(
            lab.wait(10, |l| count(l, h, "true") == Some(SHARED_ROWS)),
            "{h} did not replay the shared rows"
        );
    }

    // pg03 out of the monitor's sight: it is Fault and no candidate, but
    // it keeps streaming from pg01.
    faults::cut("pg03", &["mon"]);
    assert!(
        lab.wait(30, |l| l.db_state(3).0 == "Fault"),
        "pg03 not Fault once cut off from the monitor:\n{}",
        lab.log()
    );
    // pg02 and pg04 stop receiving; pg03 alone gets the forked rows.
    faults::cut("pg01", &["pg02", "pg04"]);
    insert(&lab, SHARED_ROWS + 1, SHARED_ROWS + FORKED_ROWS);
    let all = SHARED_ROWS + FORKED_ROWS;
    assert!(
        lab.wait(10, |l| count(l, "pg03", "true") == Some(all)),
        "pg03 did not replay the forked rows"
    );
    let lsn = |h: &str| {
        parse_lsn(&on(&lab, h, "select pg_last_wal_receive_lsn()").unwrap())
            .unwrap_or_else(|| panic!("{h}: no received LSN"))
    };
    let (lsn2, lsn3, lsn4) = (lsn("pg02"), lsn("pg03"), lsn("pg04"));
    eprintln!("received before the power-off: pg02 {lsn2}, pg03 {lsn3}, pg04 {lsn4}");
    assert_eq!(count(&lab, "pg02", "true"), Some(SHARED_ROWS));
    assert_eq!(count(&lab, "pg04", "true"), Some(SHARED_ROWS));
    assert!(
        lsn3 > lsn2 && lsn3 > lsn4,
        "pg03 is not ahead of the candidates: pg02 {lsn2}, pg03 {lsn3}, pg04 {lsn4}"
    );

    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    assert!(
        lab.wait(60, |l| {
            l.sql("cli", WRITE_VIP, "cs_sys_ha", "select pg_is_in_recovery()")
                .as_deref()
                == Ok("f")
        }),
        "no failover:\n{}",
        lab.log()
    );
    eprintln!("failover in {:.1} s", t0.elapsed().as_secs_f64());
    let new = lab.vip_holder(WRITE_VIP).expect("write vip held by nobody");
    let new: &'static str = ["pg02", "pg04"]
        .into_iter()
        .find(|h| *h == new)
        .unwrap_or_else(|| panic!("{new} was promoted, not pg02 or pg04"));
    let new_id: u32 = new[2..].parse().unwrap();
    assert!(
        lab.wait(10, |l| l.db_state(new_id) == ("Normal".to_string(), 1)),
        "{}",
        lab.log()
    );

    // The fork point, from the new primary's timeline history: pg03's WAL
    // goes past it.
    let history = on(
        &lab,
        new,
        "select pg_read_file('pg_wal/' || name) from pg_ls_waldir() where name like '%.history' order by name desc limit 1",
    )
    .unwrap();
    let fork = history
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .filter_map(parse_lsn)
        .next_back()
        .unwrap_or_else(|| panic!("no switch point in {new}'s history: {history:?}"));
    eprintln!(
        "fork point {fork}: pg03 is {} bytes past it",
        lsn3 as i128 - fork as i128
    );
    assert!(
        lsn3 > fork,
        "pg03 ({lsn3}) is not past the fork point ({fork}):\n{history}"
    );
    assert_eq!(count(&lab, new, "true"), Some(SHARED_ROWS));
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        &format!(
            "insert into rewind_t select generate_series(1001, {})",
            1000 + NEW_ROWS
        ),
    )
    .unwrap();
    assert_eq!(lab.db_state(3).0, "Fault");

    faults::heal_cuts();
    (lab, guard, new)
}

/// pg03 is a standby again, streaming from `new`, with the new primary's
/// rows and none of the forked ones.
fn assert_follows(lab: &Lab, new: &str) {
    assert_eq!(lab.db_state(3), ("Normal".to_string(), 0));
    assert!(
        lab.wait(30, |l| on(
            l,
            new,
            "select count(*) from pg_stat_replication where client_addr = '10.213.0.43' and state = 'streaming'"
        )
        .as_deref()
            == Ok("1")),
        "pg03 does not stream from {new}:\n{}",
        lab.log()
    );
    assert_eq!(lab.role("pg03"), Some(true), "pg03 is not in recovery");
    let want = SHARED_ROWS + NEW_ROWS;
    assert!(
        lab.wait(10, |l| count(l, "pg03", "true") == Some(want)),
        "pg03 has {:?} rows, the new primary {want}",
        count(lab, "pg03", "true")
    );
    assert_eq!(count(lab, "pg03", "id > 1000"), Some(NEW_ROWS));
    assert_eq!(
        count(lab, "pg03", &format!("id > {SHARED_ROWS} and id <= 1000")),
        Some(0),
        "the forked rows survived the rewind"
    );
}

#[test]
fn lab_rewind_left_behind_standby_is_rewound_with_auto_rewind_on() {
    let (lab, _faults, new) = left_behind("auto_rewind = on\n");
    let healed = Instant::now();
    let rewinding =
        "database(10.213.0.43:5432) is Fault but runs as a standby: rewinding it from the primary";
    assert!(
        lab.wait(30, |l| l.log().contains(rewinding)),
        "no auto rewind of pg03:\n{}",
        lab.log()
    );
    assert!(
        lab.wait(90, |l| l.db_state(3).0 == "Normal"),
        "pg03 not Normal 90 s after the heal:\n{}",
        lab.log()
    );
    eprintln!(
        "pg03 Normal {:.1} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    for l in lab.log().lines().filter(|l| l.contains("rewind")) {
        eprintln!("{l}");
    }
    assert!(
        lab.log()
            .contains("Repair(cluster=cluster01, host=10.213.0.43): pg_rewind completed"),
        "{}",
        lab.log()
    );
    assert_follows(&lab, new);
}

#[test]
fn lab_rewind_left_behind_standby_waits_for_repair_with_auto_rewind_off() {
    let (lab, _faults, new) = left_behind("");
    // Seen running again, and left alone.
    assert!(
        lab.wait(20, |l| l.role("pg03") == Some(true)),
        "pg03 not answering after the heal"
    );
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(lab.db_state(3).0, "Fault");
    assert!(
        !lab.log().contains("rewinding it from the primary"),
        "{}",
        lab.log()
    );
    // A plain repair cannot make it follow: postgres itself says why (its
    // line names the timelines; clup's advice says "timeline M").
    let plain = lab.adm_when_unlocked(&["repair", "-c", "cluster01", "-i", "3"]);
    assert_ne!(plain.code, 0, "plain repair of a forked standby: {plain:?}");
    let said = format!("{}{}", plain.stdout, plain.stderr);
    assert!(
        said.contains(
            "forked off current database system timeline 1 before current recovery point"
        ),
        "{said}"
    );
    assert_eq!(lab.db_state(3).0, "Fault");

    let out = lab.adm_when_unlocked(&["repair", "-c", "cluster01", "-i", "3", "--rewind"]);
    assert_eq!(out.code, 0, "repair --rewind: {out:?}\n{}", lab.log());
    assert_follows(&lab, new);
}
