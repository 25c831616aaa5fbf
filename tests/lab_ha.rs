//! The HA engine end to end in the lab, one test per scenario of the
//! manual (§3.2) and of SPEC.md's "Beyond the manual". clupserver runs in
//! `mon` with probe_interval=1; faults are real: kill -9, pulled plugs,
//! nftables partitions.

use std::time::Instant;

use crate::lab::{ip, Lab, READ_VIP, WRITE_VIP};

fn in_log(lab: &Lab, needle: &str) -> bool {
    lab.log().contains(needle)
}

#[test]
fn lab_ha_db_down_host_up_is_restarted_in_place() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(
        lab.wait(10, |l| in_log(
            l,
            "no action: primary database(10.213.0.41:5432) ok, 3 standby(s) ok"
        )),
        "{}",
        lab.log()
    );

    // A standby...
    lab.kill_postgres("pg04");
    assert!(lab.wait(20, |l| in_log(l, "Host(10.213.0.44) is ok, only database(10.213.0.44:5432) failed, restart database ....")), "{}", lab.log());
    assert!(
        lab.wait(20, |l| l.role("pg04") == Some(true)),
        "pg04 not back:\n{}",
        lab.log()
    );
    // ...and the primary: restarted in place, no failover.
    lab.kill_postgres("pg01");
    assert!(lab.wait(20, |l| in_log(l, "Host(10.213.0.41) is ok, only database(10.213.0.41:5432) failed, restart database ....")), "{}", lab.log());
    assert!(
        lab.wait(20, |l| l.role("pg01") == Some(false)),
        "pg01 not back:\n{}",
        lab.log()
    );
    assert_eq!(lab.db_state(1), ("Normal".to_string(), 1));
    assert_eq!(lab.db_state(4), ("Normal".to_string(), 0));
    assert_eq!(lab.vip_holder(WRITE_VIP).as_deref(), Some("pg01"));
    assert!(!in_log(&lab, "Failover primary"), "{}", lab.log());
}

#[test]
fn lab_ha_standby_host_down_is_fault_and_read_vip_moves() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert_eq!(lab.vip_holder(READ_VIP).as_deref(), Some("pg02"));
    let out = lab.lab(&["poweroff", "pg02"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        lab.wait(30, |l| l.db_state(2).0 == "Fault"),
        "pg02 not Fault:\n{}",
        lab.log()
    );
    assert!(
        in_log(
            &lab,
            "Host(10.213.0.42) is not ok, switch database(10.213.0.42:5432)..."
        ),
        "{}",
        lab.log()
    );
    assert!(
        lab.wait(10, |l| l.vip_holder(READ_VIP).as_deref() == Some("pg03")),
        "read vip:\n{}",
        lab.log()
    );
    let v = lab.show();
    assert_eq!(v["clusters"][0]["read_vip_host"], ip("pg03"));
    // Readers reach a standby through the read VIP.
    assert_eq!(
        lab.sql("cli", READ_VIP, "postgres", "select pg_is_in_recovery()")
            .as_deref(),
        Ok("t")
    );
    // The primary is untouched.
    assert_eq!(lab.db_state(1), ("Normal".to_string(), 1));
}

#[test]
fn lab_ha_primary_power_off_fails_over_without_losing_commits() {
    let mut lab = Lab::take_opts(1, true);
    lab.start_server();
    // A lab left up by another user (a chaos test, a benchmark) may still
    // hold a ledger of theirs: start from an empty one.
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        "drop table if exists ledger; create table ledger(id int primary key)",
    )
    .unwrap();
    let mut acked = Vec::new();
    for id in 1..=200 {
        if lab
            .sql(
                "cli",
                WRITE_VIP,
                "cs_sys_ha",
                &format!("insert into ledger values ({id})"),
            )
            .is_ok()
        {
            acked.push(id);
        }
    }
    assert_eq!(acked.len(), 200);
    assert!(lab.wait(10, |l| in_log(l, "3 standby(s) ok")));

    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    let back = lab.wait(60, |l| {
        l.sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            "insert into ledger values (100000)",
        )
        .is_ok()
    });
    let outage = t0.elapsed();
    assert!(
        back,
        "write VIP never accepted writes again:\n{}",
        lab.log()
    );
    eprintln!(
        "failover: power-off to first write through the write VIP: {:.1} s",
        outage.as_secs_f64()
    );

    let new = lab.vip_holder(WRITE_VIP).expect("write vip held by nobody");
    assert_ne!(new, "pg01");
    assert_eq!(lab.role(&new), Some(false), "{new} is not a primary");
    let count = lab
        .sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            "select count(*) from ledger where id <= 200",
        )
        .unwrap();
    assert_eq!(count, "200", "acknowledged commits lost");
    // The meta is saved right after the VIP moves: give it a moment.
    assert!(
        lab.wait(10, |l| l.db_state(1) == ("Fault".to_string(), 0)),
        "{}",
        lab.log()
    );
    let new_id: u32 = new[2..].parse().unwrap();
    assert_eq!(lab.db_state(new_id), ("Normal".to_string(), 1));
    assert!(
        in_log(&lab, "Failover primary database(10.213.0.41:5432)"),
        "{}",
        lab.log()
    );
    // The other standbys follow the new primary.
    assert!(
        lab.wait(30, |l| {
            l.sql(
                "cli",
                WRITE_VIP,
                "postgres",
                "select count(*) from pg_stat_replication where state = 'streaming'",
            )
            .as_deref()
                == Ok("2")
        }),
        "standbys not repointed:\n{}",
        lab.log()
    );
    // Sync names name the survivors, so commits keep being acknowledged.
    let names = lab
        .sql(
            "cli",
            WRITE_VIP,
            "postgres",
            "show synchronous_standby_names",
        )
        .unwrap();
    assert!(
        names.starts_with("ANY 1 (") && names.contains("stb01"),
        "{names}"
    );

    // The old primary comes back on its own as a primary: it is fenced.
    assert_eq!(lab.lab(&["poweron", "pg01"]).code, 0);
    lab.start_postgres("pg01");
    assert!(
        lab.wait(20, |l| l.role("pg01").is_none()),
        "old primary not fenced:\n{}",
        lab.log()
    );
    assert!(in_log(&lab, "fencing it"), "{}", lab.log());
    assert_ne!(lab.vip_holder(WRITE_VIP).as_deref(), Some("pg01"));
    assert_eq!(lab.db_state(1).0, "Fault");

    // repair --rewind brings it back as a streaming standby of the new primary.
    let out = lab.adm_when_unlocked(&["repair", "-c", "cluster01", "-i", "1", "--rewind"]);
    assert_eq!(out.code, 0, "repair --rewind: {out:?}\n{}", lab.log());
    assert!(
        out.stdout.lines().any(|l| l.starts_with("taskid=")),
        "{}",
        out.stdout
    );
    assert_eq!(lab.db_state(1), ("Normal".to_string(), 0));
    assert!(lab.wait(20, |l| l.role("pg01") == Some(true)));
    assert!(
        lab.wait(30, |l| {
            l.sql(
                "cli",
                WRITE_VIP,
                "postgres",
                "select count(*) from pg_stat_replication where state = 'streaming'",
            )
            .as_deref()
                == Ok("3")
        }),
        "pg01 not streaming after repair"
    );
}

#[test]
fn lab_ha_monitor_cut_from_primary_only_is_no_failover() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(lab.wait(10, |l| in_log(l, "3 standby(s) ok")));
    assert_eq!(lab.lab(&["partition", "mon", "pg01"]).code, 0);
    assert!(
        lab.wait(20, |l| in_log(
            l,
            "still reaches database(10.213.0.41:5432)"
        )),
        "{}",
        lab.log()
    );
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(lab.vip_holder(WRITE_VIP).as_deref(), Some("pg01"));
    assert_eq!(lab.role("pg01"), Some(false));
    for h in ["pg02", "pg03", "pg04"] {
        assert_eq!(lab.role(h), Some(true), "{h} was promoted");
    }
    assert!(!in_log(&lab, "Failover primary"), "{}", lab.log());
    // Healed: the primary is seen ok again. (Not "the log ends with it":
    // the round that sees it may end with a "round took" warning when a
    // session stuck in TCP retransmission made its first probe time out.)
    let ok = "primary database(10.213.0.41:5432) ok, 3 standby(s) ok";
    let before = lab.log().matches(ok).count();
    assert_eq!(lab.lab(&["heal"]).code, 0);
    assert!(
        lab.wait(15, |l| l.log().matches(ok).count() > before),
        "{}",
        lab.log()
    );
}

#[test]
fn lab_ha_frozen_cluster_is_left_alone() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert_eq!(lab.adm(&["froze", "-c", "cluster01"]).code, 0);
    lab.kill_postgres("pg03");
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(lab.role("pg03"), None, "a frozen cluster was acted on");
    assert_eq!(lab.adm(&["unfroze", "-c", "cluster01"]).code, 0);
    assert!(
        lab.wait(20, |l| l.role("pg03") == Some(true)),
        "not restarted after unfroze:\n{}",
        lab.log()
    );
}

#[test]
fn lab_ha_switch_and_back() {
    let mut lab = Lab::take(1);
    lab.start_server();
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        "create table if not exists sw(id int)",
    )
    .unwrap();
    for (target, host) in [(3u32, "pg03"), (1, "pg01")] {
        let out = lab.adm(&["switch", "-c", "cluster01", "-i", &target.to_string()]);
        assert_eq!(out.code, 0, "switch to {target}: {out:?}\n{}", lab.log());
        assert!(
            out.stdout.lines().any(|l| l.starts_with("taskid=")),
            "{}",
            out.stdout
        );
        assert_eq!(lab.vip_holder(WRITE_VIP).as_deref(), Some(host));
        assert_eq!(lab.role(host), Some(false));
        assert_eq!(lab.db_state(target), ("Normal".to_string(), 1));
        lab.sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            &format!("insert into sw values ({target})"),
        )
        .unwrap();
        assert!(
            lab.wait(30, |l| {
                l.sql(
                    "cli",
                    WRITE_VIP,
                    "postgres",
                    "select count(*) from pg_stat_replication where state = 'streaming'",
                )
                .as_deref()
                    == Ok("3")
            }),
            "not all standbys follow {host}:\n{}",
            lab.log()
        );
    }
    let n = lab
        .sql("cli", WRITE_VIP, "cs_sys_ha", "select count(*) from sw")
        .unwrap();
    assert_eq!(n, "2");
    // Refused: a target that is the primary already, or not in the cluster.
    assert_eq!(lab.adm(&["switch", "-c", "cluster01", "-i", "1"]).code, 1);
    assert_eq!(lab.adm(&["switch", "-c", "cluster01", "-i", "9"]).code, 1);
}

#[test]
fn lab_ha_clupserver_killed_after_promotion_finishes_without_second_promotion() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(lab.wait(10, |l| in_log(l, "3 standby(s) ok")));
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    // Kill clupserver right after the promotion, before the meta is saved.
    assert!(
        lab.wait(40, |l| in_log(l, "to primary completed.")),
        "no promotion:\n{}",
        lab.log()
    );
    let pid = std::fs::read_to_string(lab.home.join("run/clupserver.pid")).unwrap();
    assert_eq!(lab.exec("mon", &["kill", "-9", pid.trim()]).code, 0);
    assert!(lab.wait(5, |l| l.clup(&["server", "status"]).code == 1));
    // Whatever the meta says now, the restarted server brings the cluster to
    // one primary with the write VIP on it, and never promotes a second node.
    lab.start_server();
    let promoted = |l: &Lab| {
        ["pg02", "pg03", "pg04"]
            .iter()
            .filter(|h| l.role(h) == Some(false))
            .count()
    };
    assert!(
        lab.wait(40, |l| {
            let v = l.show();
            let primaries: Vec<&serde_json::Value> = v["dbs"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["primary"] == 1 && d["state"] == "Normal")
                .collect();
            primaries.len() == 1
                && primaries[0]["host"] != ip("pg01")
                && l.vip_holder(WRITE_VIP).as_deref().map(ip) == primaries[0]["host"].as_str()
        }),
        "cluster not consistent after restart:\n{}",
        lab.log()
    );
    assert_eq!(
        promoted(&lab),
        1,
        "more than one promoted standby:\n{}",
        lab.log()
    );
    assert!(
        lab.sql("cli", WRITE_VIP, "cs_sys_ha", "select 1").is_ok(),
        "write VIP does not answer"
    );
    // The kill may land before the task ends (then the restarted server
    // finishes it) or just after: the meta is saved a few ms after the
    // promotion now that the standbys are repointed before it.
    assert!(
        in_log(&lab, "was interrupted by a restart of clupserver")
            || lab
                .log()
                .lines()
                .any(|l| l.contains("switch to new host(") && l.ends_with("completed.")),
        "{}",
        lab.log()
    );
}

fn curl_mon(lab: &Lab, path: &str) -> (String, String) {
    let url = format!("http://{}:8080{path}", crate::lab::MON);
    let out = lab.exec(
        "cli",
        &[
            "curl",
            "-s",
            "-m",
            "5",
            "-H",
            "X-Clup-Token: lab_http_token",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

fn metric(body: &str, series: &str) -> Option<String> {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

#[test]
fn lab_ha_reports_metrics_health_and_tasks_follow_a_fault() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(lab.wait(10, |l| in_log(l, "3 standby(s) ok")));

    // get_last_lsn and repl_delay read the databases now.
    let out = lab.adm(&["get_last_lsn", "-q", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[2],
        "id        host       primary timeline       lsn       "
    );
    assert!(
        lines[4].starts_with(" 1 10.213.0.41             1 "),
        "{}",
        out.stdout
    );
    assert_eq!(lines.len(), 8, "{}", out.stdout);
    // One timeline for all (which one depends on the lab's history: a lab
    // reused after switchovers is past timeline 1).
    let timelines: Vec<&str> = lines[4..8]
        .iter()
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?"))
        .collect();
    assert!(
        timelines
            .iter()
            .all(|t| *t == timelines[0] && t.parse::<u32>().is_ok()),
        "{}",
        out.stdout
    );
    let out = lab.adm(&["repl_delay", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("10.213.0.41       1               N/A"),
        "{}",
        out.stdout
    );
    for h in ["10.213.0.42", "10.213.0.43", "10.213.0.44"] {
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(h))
            .unwrap_or_else(|| panic!("{h}:\n{}", out.stdout));
        assert!(row.ends_with("       async       normal"), "{row}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&lab.adm(&["repl_delay", "--json"]).stdout).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 4);

    // Metrics and the proxy-facing health endpoints, before the fault.
    let (code, body) = curl_mon(&lab, "/metrics");
    assert_eq!(code, "200");
    let s2 = r#"clup_db_state{cluster="cluster01",id="2",host="10.213.0.42",port="5432"}"#;
    let r2 = r#"clup_db_reachable{cluster="cluster01",id="2",host="10.213.0.42",port="5432"}"#;
    assert_eq!(metric(&body, s2).as_deref(), Some("1"), "{body}");
    assert_eq!(metric(&body, r2).as_deref(), Some("1"), "{body}");
    let (code, body) = curl_mon(&lab, "/cluster01/primary");
    assert_eq!(
        (code.as_str(), body.contains("10.213.0.41:5432")),
        ("200", true),
        "{body}"
    );
    let (code, body) = curl_mon(&lab, "/cluster01/replica");
    assert_eq!(code, "200");
    assert!(body.contains("10.213.0.42:5432"), "{body}");

    // A standby host dies: the metrics and the health endpoints follow.
    assert_eq!(lab.lab(&["poweroff", "pg02"]).code, 0);
    assert!(
        lab.wait(30, |l| l.db_state(2).0 == "Fault"),
        "{}",
        lab.log()
    );
    assert!(lab.wait(10, |l| {
        let (_, body) = curl_mon(l, "/metrics");
        metric(&body, s2).as_deref() == Some("2") && metric(&body, r2).as_deref() == Some("0")
    }));
    let (_, body) = curl_mon(&lab, "/cluster01/replica");
    assert!(!body.contains("10.213.0.42:5432"), "{body}");
    assert!(body.contains("10.213.0.43:5432"), "{body}");

    // The standby fault ran as a task: show_task lists it, task_log shows it.
    let out = lab.adm(&["show_task", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains("standby fault cluster01"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(row.contains("success"), "{row}");
    let id = row.split_whitespace().next().unwrap().to_string();
    let out = lab.adm(&["task_log", "-t", &id]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains(":INFO: Failover database(10.213.0.42:5432): all commpleted."),
        "{}",
        out.stdout
    );

    // repair --rebuild: a fresh copy from the primary, the old directory kept.
    assert_eq!(lab.lab(&["poweron", "pg02"]).code, 0);
    let out = lab.adm_when_unlocked(&["repair", "-c", "cluster01", "-i", "2", "--rebuild"]);
    assert_eq!(out.code, 0, "repair --rebuild: {out:?}\n{}", lab.log());
    assert!(
        out.stdout.contains("pg_basebackup completed"),
        "{}",
        out.stdout
    );
    assert_eq!(lab.db_state(2), ("Normal".to_string(), 0));
    let kept = lab.exec(
        "pg02",
        &[
            "sh",
            "-c",
            "ls /var/lib/postgresql/pgdata/clup-old-*/PG_VERSION",
        ], // pgdata is a mount point in the lab
    );
    assert_eq!(kept.code, 0, "old data directory not kept: {kept:?}");
    assert!(lab.wait(20, |l| l.role("pg02") == Some(true)));
    let (_, body) = curl_mon(&lab, "/cluster01/replica");
    assert!(
        lab.wait(10, |l| curl_mon(l, "/cluster01/replica")
            .1
            .contains("10.213.0.42:5432")),
        "{body}"
    );
    let _ = lab.exec(
        "pg02",
        &["sh", "-c", "rm -rf /var/lib/postgresql/pgdata/clup-old-*"],
    );

    // clupadm log shows the server log.
    let out = lab.adm(&["log", "-q", "-n", "5", "--no-follow"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.lines().count(), 5, "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .all(|l| l.len() > 24 && &l[19..20] == ","),
        "{}",
        out.stdout
    );
}
