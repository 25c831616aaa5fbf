//! cstlb in the lab, as the manual deploys it: on two standby hosts, fed by
//! clupserver. Readers connect to cstlb; clupserver removes a dead standby
//! from every cstlb and adds it back after repair.

use crate::lab::{ip, Lab};

const MGR_TOKEN: &str = "lab_cstlb_token";

fn server_of(lab: &Lab, via: &str) -> Result<String, String> {
    lab.sql("cli", ip(via), "postgres", "select inet_server_addr()")
        .map(|s| s.trim_end_matches("/32").to_string())
}

fn through_cstlb(lab: &Lab, host: &str) -> Result<String, String> {
    let conn = format!(
        "host={} port=5433 user=postgres password=lab_pg_pass dbname=postgres connect_timeout=3",
        ip(host)
    );
    let out = lab.exec(
        "cli",
        &["psql", "-XAtq", &conn, "-c", "select inet_server_addr()"],
    );
    if out.code == 0 {
        Ok(out.stdout.trim().trim_end_matches("/32").to_string())
    } else {
        Err(out.stderr)
    }
}

#[test]
fn lab_lb_cstlb_follows_clupserver() {
    let mut lab = Lab::take(1);
    lab.start_server();
    lab.start_cstlb("pg03");
    lab.start_cstlb("pg04");
    let all = |l: &Lab, host: &str| {
        let (code, body) = l.cstlb_list(host, MGR_TOKEN);
        code == "200"
            && ["10.213.0.42:5432", "10.213.0.43:5432", "10.213.0.44:5432"]
                .iter()
                .all(|b| body.contains(&format!("\"{b}\":{{\"State\":0")))
    };
    assert!(
        lab.wait(15, |l| all(l, "pg03") && all(l, "pg04")),
        "{:?}",
        lab.cstlb_list("pg03", MGR_TOKEN)
    );

    // The manual's list shape: a ring.
    let (_, body) = lab.cstlb_list("pg03", MGR_TOKEN);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["10.213.0.42:5432"]["NextAddress"], "10.213.0.43:5432");
    assert_eq!(v["10.213.0.42:5432"]["PreAddress"], "10.213.0.44:5432");
    assert_eq!(lab.cstlb_list("pg03", "wrong").0, "401");
    assert_eq!(lab.cstlb_list("pg03", "").0, "401");

    // Round robin over the three standbys.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(through_cstlb(&lab, "pg03").expect("query through cstlb"));
    }
    assert_eq!(seen.len(), 3, "connections went to {seen:?}");
    assert!(
        !seen.contains("10.213.0.41"),
        "the primary got reads: {seen:?}"
    );

    // A standby's host dies: gone from both cstlbs, readers keep working.
    assert_eq!(lab.lab(&["poweroff", "pg02"]).code, 0);
    assert!(
        lab.wait(20, |l| {
            ["pg03", "pg04"]
                .iter()
                .all(|h| !l.cstlb_list(h, MGR_TOKEN).1.contains("10.213.0.42:5432"))
        }),
        "pg02 still in a cstlb:\n{}",
        lab.log()
    );
    for _ in 0..4 {
        let s = through_cstlb(&lab, "pg04").expect("reads through cstlb after a standby loss");
        assert_ne!(s, "10.213.0.42");
    }

    // Repair brings it back into every cstlb (once the fault is recorded).
    assert!(
        lab.wait(20, |l| l.db_state(2).0 == "Fault"),
        "{}",
        lab.log()
    );
    assert!(lab.wait(20, |l| l.show()["clusters"][0]["locked_by"].is_null()));
    assert_eq!(lab.lab(&["poweron", "pg02"]).code, 0);
    lab.start_postgres("pg02");
    let out = lab.adm_when_unlocked(&["repair", "-c", "cluster01", "-i", "2"]);
    assert_eq!(out.code, 0, "repair: {out:?}\n{}", lab.log());
    assert!(
        lab.wait(15, |l| all(l, "pg03") && all(l, "pg04")),
        "pg02 not back in the cstlbs"
    );
    assert_eq!(server_of(&lab, "pg02").as_deref(), Ok("10.213.0.42"));

    // A cstlb that restarts gets its backends back from clupserver.
    lab.stop_cstlb("pg04");
    lab.start_cstlb("pg04");
    assert!(
        lab.wait(15, |l| all(l, "pg04")),
        "restarted cstlb not refilled"
    );
}
