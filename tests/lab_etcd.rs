//! clupserver on etcd in the lab: a 3-member etcd on mon, mon2 and mon3,
//! clupservers on mon and mon2 campaigning for the leader lease (3 s), the
//! cluster on synchronous replication. Faults are real: a pulled plug on
//! the leading monitor's host during a primary failover, partitions between
//! the leader and etcd, and etcd losing its quorum.

use std::time::{Duration, Instant};

use crate::lab::{ip, Lab, WRITE_VIP};

const LEASE: u32 = 3;

/// The monitor host whose clupserver leads, once one does.
fn leader(lab: &Lab) -> Option<&'static str> {
    let mut leading = ["mon", "mon2"].into_iter().filter(|h| {
        lab.clup_on(h, &["server", "status"])
            .stdout
            .contains("Role: leader (")
    });
    let first = leading.next();
    assert!(leading.next().is_none(), "two clupservers say they lead");
    first
}

fn start_both(lab: &mut Lab) -> (&'static str, &'static str) {
    lab.start_monitor("mon");
    lab.start_monitor("mon2");
    let mut lead = None;
    assert!(
        lab.wait(15, |l| {
            lead = leader(l);
            lead.is_some()
        }),
        "no leader:\nmon: {}\nmon2: {}",
        lab.log_of("mon"),
        lab.log_of("mon2")
    );
    let lead = lead.unwrap();
    let follow = if lead == "mon" { "mon2" } else { "mon" };
    (lead, follow)
}

fn write(lab: &Lab, id: u32) -> bool {
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        &format!("insert into ledger values ({id})"),
    )
    .is_ok()
}

fn primaries(lab: &Lab) -> Vec<&'static str> {
    ["pg01", "pg02", "pg03", "pg04"]
        .into_iter()
        .filter(|h| lab.role(h) == Some(false))
        .collect()
}

#[test]
fn lab_etcd_leader_host_dies_during_primary_failover() {
    let mut lab = Lab::take_etcd(1, LEASE);
    let (lead, follow) = start_both(&mut lab);
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        "drop table if exists ledger; create table ledger(id int primary key)",
    )
    .unwrap();
    let mut acked = Vec::new();
    for id in 1..=50 {
        if write(&lab, id) {
            acked.push(id);
        }
    }
    assert_eq!(acked.len(), 50);
    assert!(lab.wait(10, |l| l.log_of(lead).contains("3 standby(s) ok")));

    // The primary's host dies; when the leader has begun the failover
    // (it is promoting), the leader's host dies too (its etcd member with
    // it: two of three remain). The follower must finish the failover
    // without a second promotion.
    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    assert!(
        lab.wait(30, |l| l.log_of(lead).contains("to primary...")),
        "the leader did not start the failover:\n{}",
        lab.log_of(lead)
    );
    let t_lead = Instant::now();
    assert_eq!(lab.lab(&["poweroff", lead]).code, 0);
    let mut took_over = None;
    let mut back = None;
    let mut id = 1000;
    while t0.elapsed() < Duration::from_secs(90) && back.is_none() {
        if took_over.is_none() && lab.log_of(follow).contains("now leads") {
            took_over = Some(t_lead.elapsed());
        }
        id += 1;
        if write(&lab, id) {
            acked.push(id);
            back = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let back = back.unwrap_or_else(|| panic!("writes never came back:\n{}", lab.log_of(follow)));
    let took_over = took_over.or_else(|| {
        lab.log_of(follow)
            .contains("now leads")
            .then(|| t_lead.elapsed())
    });
    println!(
        "primary host power-off, then the leading monitor's host mid-failover: {follow} leads {took_over:?} after the leader died; first write {back:?} after the primary died"
    );
    assert!(took_over.is_some(), "{}", lab.log_of(follow));
    // Exactly one promotion, and nothing acknowledged was lost.
    assert!(lab.wait(20, |l| primaries(l).len() == 1));
    let p = primaries(&lab);
    assert_eq!(p.len(), 1, "{p:?}");
    let rows: Vec<u32> = lab
        .sql("cli", ip(p[0]), "cs_sys_ha", "select id from ledger")
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let lost: Vec<&u32> = acked.iter().filter(|i| !rows.contains(i)).collect();
    assert!(lost.is_empty(), "lost {lost:?}");
    // The promotion the dead leader began is the only one: the follower
    // rolls it forward or makes it, never a second.
    let promotions = lab.log_of(lead).matches("to primary completed.").count()
        + lab.log_of(follow).matches("to primary completed.").count();
    assert!(
        promotions <= 1,
        "{promotions} promotions:\n{}\n{}",
        lab.log_of(lead),
        lab.log_of(follow)
    );
}

#[test]
fn lab_etcd_leader_cut_off_from_etcd_stops_acting_and_the_follower_leads() {
    let mut lab = Lab::take_etcd(1, LEASE);
    let (lead, follow) = start_both(&mut lab);
    // The leader loses etcd: cut from the other two members (its own member
    // is then a minority) and from the follower's host.
    let others: Vec<&str> = ["mon", "mon2", "mon3"]
        .into_iter()
        .filter(|h| *h != lead)
        .collect();
    let t0 = Instant::now();
    for o in &others {
        assert_eq!(lab.lab(&["partition", lead, o]).code, 0);
    }
    assert!(
        lab.wait(20, |l| l.log_of(lead).contains("lost the leader lease")),
        "{}",
        lab.log_of(lead)
    );
    let stopped = t0.elapsed();
    assert!(
        lab.wait(20, |l| l.log_of(follow).contains("now leads")),
        "{}",
        lab.log_of(follow)
    );
    println!(
        "leader cut from etcd: it stopped acting after {stopped:?}, {follow} leads after {:?}",
        t0.elapsed()
    );
    // The new leader acts: a standby's postgres killed is restarted.
    lab.kill_postgres("pg04");
    assert!(
        lab.wait(30, |l| l.role("pg04") == Some(true)),
        "{}",
        lab.log_of(follow)
    );
    assert!(lab.log_of(follow).contains("restart database"));
    assert!(!lab
        .log_of(lead)
        .contains("Database(10.213.0.44:5432) restarted."));
    // The new leader's events: its role change, then the restart.
    let events = |l: &Lab| l.clup_on(follow, &["adm", "-q", "events"]).stdout;
    assert!(
        lab.wait(10, |l| events(l)
            .contains(" restart cluster01 4 10.213.0.44 ")),
        "{}",
        events(&lab)
    );
    let listed = events(&lab);
    let led = listed
        .lines()
        .position(|l| l.contains(" leader_change - - ") && l.contains("is now leader ("));
    let restarted = listed
        .lines()
        .position(|l| l.contains(" restart cluster01 4 "));
    assert!(led.is_some() && led < restarted, "{listed}");
    lab.lab(&["heal"]);
}

#[test]
fn lab_etcd_quorum_loss_means_no_action_and_the_databases_untouched() {
    let mut lab = Lab::take_etcd(1, LEASE);
    let (lead, follow) = start_both(&mut lab);
    // Two of the three members die: no quorum.
    lab.kill_etcd("mon2");
    lab.kill_etcd("mon3");
    assert!(
        lab.wait(20, |l| l.log_of(lead).contains("lost the leader lease")),
        "{}",
        lab.log_of(lead)
    );
    // The metrics say so.
    let metrics = |h: &str| {
        let url = format!("http://{}:8080/metrics", ip(h));
        lab.exec(
            "cli",
            &[
                "curl",
                "-s",
                "-m",
                "5",
                "-H",
                "X-Clup-Token: lab_http_token",
                &url,
            ],
        )
        .stdout
    };
    assert!(
        lab.wait(10, |_| {
            let m = metrics(lead);
            m.contains("\nclup_leader 0\n") && m.contains("\nclup_etcd_reachable 0\n")
        }),
        "{}",
        metrics(lead)
    );
    // A standby's postgres dies: nobody may act, so it stays down, and the
    // primary keeps taking writes all along.
    lab.kill_postgres("pg04");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(lab.role("pg04"), None, "somebody acted without etcd");
    assert_eq!(lab.role("pg01"), Some(false));
    assert!(lab.sql("cli", WRITE_VIP, "cs_sys_ha", "select 1").is_ok());
    for h in [lead, follow] {
        assert!(
            !lab.log_of(h).contains("restart database"),
            "{h} acted:\n{}",
            lab.log_of(h)
        );
    }
    // etcd comes back (the members restart on their data): work resumes.
    for h in ["mon2", "mon3"] {
        let out = lab.exec(
            h,
            &[
                "sh",
                "-c",
                &format!(
                    "cd / && setsid /usr/bin/etcd --name {h} --data-dir /var/tmp/clup-lab/etcd/{h} --listen-client-urls http://{a}:2379 --advertise-client-urls http://{a}:2379 --listen-peer-urls http://{a}:2380 --initial-advertise-peer-urls http://{a}:2380 </dev/null >>/var/tmp/clup-lab/etcd/{h}.log 2>&1 & echo $! > /run/etcd.pid",
                    a = ip(h)
                ),
            ],
        );
        assert_eq!(out.code, 0, "{out:?}");
    }
    let t = Instant::now();
    assert!(
        lab.wait(60, |l| l.role("pg04") == Some(true)),
        "work did not resume:\nmon: {}\nmon2: {}",
        lab.log_of("mon"),
        lab.log_of("mon2")
    );
    println!("etcd quorum back: pg04 restarted after {:?}", t.elapsed());
}
