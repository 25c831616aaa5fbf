//! Replication slots (use_slots) on PostgreSQL 9.6 and 15: a standby that
//! was stopped while the primary wrote more than its max_wal_size comes
//! back without a rebuild, and after a failover the remaining standbys
//! stream from the new primary through their slots. The same steps without
//! a slot lose the WAL (checked first, on pg04), so the test can fail.

use std::time::Instant;

use crate::lab::{ip, Lab, WRITE_VIP};

/// The names a major gives the WAL functions.
struct Wal {
    switch: &'static str,
    current: &'static str,
    replay: &'static str,
    diff: &'static str,
    keep: &'static str,
}

fn wal(xlog: bool) -> Wal {
    if xlog {
        Wal {
            switch: "pg_switch_xlog()",
            current: "pg_current_xlog_location()",
            replay: "pg_last_xlog_replay_location()",
            diff: "pg_xlog_location_diff",
            keep: "wal_keep_segments",
        }
    } else {
        Wal {
            switch: "pg_switch_wal()",
            current: "pg_current_wal_lsn()",
            replay: "pg_last_wal_replay_lsn()",
            diff: "pg_wal_lsn_diff",
            keep: "wal_keep_size",
        }
    }
}

fn sql(lab: &Lab, host: &str, q: &str) -> String {
    lab.sql("cli", ip(host), "postgres", q)
        .unwrap_or_else(|e| panic!("{host}: {q}: {e}"))
}

fn server_log(lab: &Lab, host: &str) -> String {
    lab.exec(
        host,
        &["cat", "/var/lib/postgresql/pgdata/log/postgresql.log"],
    )
    .stdout
}

/// Write six WAL segments' worth (each switched and checkpointed): more
/// than the primary's max_wal_size of 32MB.
fn burn_wal(lab: &Lab, w: &Wal) {
    sql(lab, "pg01", "create table if not exists burn(x text)");
    for _ in 0..6 {
        sql(
            lab,
            "pg01",
            "insert into burn select repeat('x', 1000) from generate_series(1, 2000)",
        );
        sql(lab, "pg01", &format!("select {}", w.switch));
        sql(lab, "pg01", "checkpoint");
    }
}

/// `name:active` of the primary `host`'s slots, in name order.
fn slots_of(lab: &Lab, host: &str) -> String {
    lab.sql(
        "cli",
        ip(host),
        "postgres",
        "select coalesce(string_agg(slot_name || ':' || active, ',' order by slot_name), '') from pg_replication_slots",
    )
    .unwrap_or_else(|e| e)
}

fn slots_on(major: Option<&'static str>) {
    let t0 = Instant::now();
    let xlog = major == Some("9.6");
    let w = wal(xlog);
    let mut lab = match major {
        Some(m) => Lab::take_version(1, false, m),
        None => Lab::take(1),
    };
    let name = major.unwrap_or("15");
    // Little WAL is kept without a slot.
    for q in [
        "alter system set max_wal_size = '32MB'".to_string(),
        "alter system set min_wal_size = '32MB'".to_string(),
        format!("alter system set {} = 0", w.keep),
        "select pg_reload_conf()".to_string(),
    ] {
        sql(&lab, "pg01", &q);
    }

    // Without a slot: pg04, stopped while the WAL is written, cannot
    // catch up when it starts again.
    lab.stop_postgres("pg04");
    burn_wal(&lab, &w);
    lab.start_postgres("pg04");
    assert!(
        lab.wait(30, |l| server_log(l, "pg04")
            .contains("has already been removed")),
        "pg{name}: without a slot pg04 still found its WAL: the test would prove nothing\n{}",
        server_log(&lab, "pg04")
    );
    eprintln!(
        "pg{name}: without a slot the WAL is gone ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    // With use_slots: pg02 and pg03 stream through their slots.
    let conf = lab.home.join("conf/clup.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("use_slots = on\nslot_keep_time = 5\nmax_slot_wal_keep_size = 1GB\n");
    std::fs::write(&conf, text).unwrap();
    lab.start_server();
    assert!(
        lab.wait(60, |l| {
            let s = slots_of(l, "pg01");
            s.contains("stb02:true") && s.contains("stb03:true")
        }),
        "pg{name}: slots on pg01: {}\n{}",
        slots_of(&lab, "pg01"),
        lab.log()
    );
    if xlog {
        assert!(
            lab.log()
                .contains("max_slot_wal_keep_size does not exist on PostgreSQL 9.6"),
            "{}",
            lab.log()
        );
    } else {
        assert_eq!(sql(&lab, "pg01", "show max_slot_wal_keep_size"), "1GB");
    }
    eprintln!(
        "pg{name}: standbys stream through their slots ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    // pg02 stopped (the cluster frozen, so that clup does not start it)
    // while more than max_wal_size is written: its slot keeps the WAL.
    assert_eq!(lab.adm(&["froze", "-c", "cluster01"]).code, 0);
    lab.stop_postgres("pg02");
    burn_wal(&lab, &w);
    let target = sql(&lab, "pg01", &format!("select {}", w.current));
    let held: u64 = sql(
        &lab,
        "pg01",
        &format!(
            "select {}({}, restart_lsn)::bigint from pg_replication_slots where slot_name = 'stb02'",
            w.diff, w.current
        ),
    )
    .parse()
    .unwrap();
    assert!(held > 32 << 20, "pg{name}: stb02 holds {held} bytes");
    // clupadm show lists it, with the WAL it holds back.
    let show = lab.show();
    let row = show["slots"]
        .as_array()
        .expect("show --json has slots")
        .iter()
        .find(|r| r["slot_name"] == "stb02")
        .unwrap_or_else(|| panic!("no stb02 in {show}"))
        .clone();
    assert_eq!(row["active"], false, "{row}");
    assert!(row["retained_bytes"].as_u64().unwrap() >= held, "{row}");
    let text = lab.adm(&["show"]).stdout;
    assert!(text.contains("slot list"), "{text}");
    lab.start_postgres("pg02");
    let caught_up = format!("select {}({}, '{target}') >= 0", w.diff, w.replay);
    assert!(
        lab.wait(60, |l| l
            .sql("cli", ip("pg02"), "postgres", &caught_up)
            .as_deref()
            == Ok("t")),
        "pg{name}: pg02 did not catch up to {target}:\n{}",
        server_log(&lab, "pg02")
    );
    assert!(!server_log(&lab, "pg02").contains("has already been removed"));
    assert_eq!(lab.adm(&["unfroze", "-c", "cluster01"]).code, 0);
    eprintln!(
        "pg{name}: pg02 caught up through its slot ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    // pg04, Fault for longer than slot_keep_time, loses its slot.
    assert!(
        lab.wait(90, |l| l.log().contains("DROPPED replication slot stb04")),
        "pg{name}: stb04 not dropped; slots {}\n{}",
        slots_of(&lab, "pg01"),
        lab.log()
    );
    assert!(!slots_of(&lab, "pg01").contains("stb04"));

    // Failover: the remaining standby streams from the new primary
    // through its slot, made there before it was repointed.
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    assert!(
        lab.wait(60, |l| l.vip_holder(WRITE_VIP).is_some_and(|h| h != "pg01")),
        "{}",
        lab.log()
    );
    let new = lab.vip_holder(WRITE_VIP).unwrap();
    let other = if new == "pg02" { "pg03" } else { "pg02" };
    let slot = format!("stb{}:true", &other[2..]);
    assert!(
        lab.wait(60, |l| slots_of(l, &new).contains(&slot)),
        "pg{name}: slots on the new primary {new}: {}\n{}",
        slots_of(&lab, &new),
        lab.log()
    );
    assert!(
        lab.log().contains(&format!(
            "replication slots (stb{}) created on database({}:5432)",
            &other[2..],
            ip(&new)
        )),
        "{}",
        lab.log()
    );
    eprintln!(
        "pg{name}: after the failover {other} streams through its slot on {new} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn lab_slots_pg96_keep_wal_for_a_stopped_standby_and_follow_a_failover() {
    slots_on(Some("9.6"));
}

#[test]
fn lab_slots_pg15_keep_wal_for_a_stopped_standby_and_follow_a_failover() {
    slots_on(None);
}
