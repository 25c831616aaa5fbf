//! exec::wire against a real PostgreSQL 15 on 127.0.0.1: each
//! authentication method, errors, a hung server, a restarted one.

use std::time::{Duration, Instant};

use clup::exec::pg;
use clup::exec::pgctl;
use clup::exec::wire::{Client, Params};
use clup::model::config::Secret;

use super::lab::{self, Lab, LocalSh};

const T: Duration = Duration::from_secs(2);

fn params(lab: &Lab, user: &str, password: &str) -> Params {
    Params {
        host: "127.0.0.1".into(),
        port: lab.dbs[0].port,
        user: user.into(),
        dbname: "postgres".into(),
        password: Secret::new(password),
        options: "-c statement_timeout=2000 -c synchronous_commit=local".into(),
        ssl: Default::default(),
    }
}

/// One server with a login per authentication method (pg_hba lines by user).
fn server() -> Lab {
    let cfg = lab::config(T);
    let lab = Lab::new(&lab::free_ports(1));
    let hba = std::path::Path::new(&lab.dbs[0].pgdata).join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all u_trust 127.0.0.1/32 trust\n\
             host all u_md5 127.0.0.1/32 md5\n\
             host all u_clear 127.0.0.1/32 password\n{text}"
        ),
    )
    .unwrap();
    pgctl::start(&LocalSh, &lab.dbs[0], &cfg).expect("start");
    let mut c = lab.sql(0, "postgres");
    c.batch_execute(&format!(
        "CREATE ROLE u_scram LOGIN PASSWORD {p}; CREATE ROLE u_trust LOGIN; \
         CREATE ROLE u_clear LOGIN PASSWORD {p}; \
         SET password_encryption = 'md5'; CREATE ROLE u_md5 LOGIN PASSWORD {p};",
        p = pg::sql_literal(lab::PROBE_PASS)
    ))
    .unwrap();
    lab
}

fn check_session(c: &mut Client) {
    let r = c
        .simple_query(
            "SELECT current_user, NULL::text, current_setting('application_name'); \
             SELECT current_setting('synchronous_commit'), current_setting('statement_timeout'); \
             SELECT 1 WHERE false",
            T,
        )
        .unwrap();
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r[0].rows[0][1], None);
    assert_eq!(r[0].rows[0][2].as_deref(), Some("clup"));
    assert_eq!(r[1].rows[0][0].as_deref(), Some("local"));
    assert_eq!(r[1].rows[0][1].as_deref(), Some("2s"));
    assert!(r[2].rows.is_empty());
    assert_eq!(r[2].count(), 0);
    assert!(c.backend_pid() > 0);
}

#[test]
fn wire_client_authenticates_queries_and_fails_cleanly() {
    let mut lab = server();
    for user in ["u_scram", "u_md5", "u_clear", "u_trust", "postgres"] {
        eprintln!("== login as {user}");
        let pw = if user == "postgres" {
            lab::SUPERUSER_PASS
        } else {
            lab::PROBE_PASS
        };
        let mut c = Client::connect(&params(&lab, user, pw), "test", T)
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        check_session(&mut c);
        let r = c.simple_query("SELECT current_user", T).unwrap();
        assert_eq!(r[0].rows[0][0].as_deref(), Some(user));
    }

    eprintln!("== wrong passwords: the server's error, never the password");
    for user in ["u_scram", "u_md5", "u_clear"] {
        let wrong = "Wr0ng-s3cret";
        let e = Client::connect(&params(&lab, user, wrong), "test", T)
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert_eq!(e.code.as_deref(), Some("28P01"), "{e}");
        assert!(e.msg.contains("password authentication failed"), "{e}");
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(wrong), "{shown}");
        assert!(!shown.contains(lab::PROBE_PASS), "{shown}");
    }
    let e = Client::connect(&params(&lab, "u_scram", ""), "test", T)
        .err()
        .unwrap();
    assert!(e.msg.contains("none is set"), "{e}");

    eprintln!("== SQL errors keep the session; the next query works");
    let mut c = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T).unwrap();
    let e = c
        .simple_query("SELECT 1; SELECT * FROM nowhere; SELECT 2", T)
        .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("42P01"), "{e}");
    assert!(e.msg.starts_with("ERROR: "), "{e}");
    assert!(!c.is_broken());
    let r = c
        .simple_query(
            "CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1), (2); UPDATE t SET x = x",
            T,
        )
        .unwrap();
    assert_eq!(r[1].tag, "INSERT 0 2");
    assert_eq!(r[2].count(), 2);
    let e = c
        .simple_query("SET LOCAL statement_timeout = 300; SELECT pg_sleep(5)", T)
        .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("57014"), "statement_timeout: {e}");
    assert!(!c.is_broken());

    eprintln!("== a database that does not exist: 3D000");
    let mut p = params(&lab, "u_scram", lab::PROBE_PASS);
    p.dbname = "nope".into();
    let e = Client::connect(&p, "test", T).err().unwrap();
    assert_eq!(e.code.as_deref(), Some("3D000"), "{e}");

    eprintln!("== a stopped (SIGSTOP) server: connect and query give up at the deadline");
    let mut held = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T).unwrap();
    lab.freeze(0);
    let started = Instant::now();
    let e = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T)
        .err()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= T && took < T + Duration::from_millis(300),
        "{took:?}"
    );
    assert!(e.msg.contains("no answer within 2.0s"), "{e}");
    let started = Instant::now();
    let e = held.simple_query("SELECT 1", T).unwrap_err();
    assert!(started.elapsed() < T + Duration::from_millis(300));
    assert!(e.msg.contains("no answer"), "{e}");
    assert!(held.is_broken(), "a timed-out session is never reused");
    lab.thaw();
    let e = held.simple_query("SELECT 1", T).unwrap_err();
    assert!(e.msg.contains("broken"), "{e}");

    eprintln!("== a killed server: the session reports it; a new one works after restart");
    let cfg = lab::config(T);
    let mut c = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T).unwrap();
    pgctl::stop_fast(&LocalSh, &lab.dbs[0], &cfg).unwrap();
    let e = c.simple_query("SELECT 1", T).unwrap_err();
    assert!(c.is_broken());
    eprintln!("   after stop: {e}");
    let e = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T)
        .err()
        .unwrap();
    assert!(e.msg.contains("error connecting to server"), "{e}");
    pgctl::start(&LocalSh, &lab.dbs[0], &cfg).unwrap();
    let mut c = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T).unwrap();
    check_session(&mut c);
}

#[test]
fn statements_are_prepared_once_per_session() {
    let lab = server();
    let mut c = Client::connect(&params(&lab, "u_scram", lab::PROBE_PASS), "test", T).unwrap();
    let names = |r: &clup::exec::wire::QueryResult| -> Vec<String> {
        r.rows.iter().filter_map(|row| row[0].clone()).collect()
    };
    let stmts = [
        "SELECT current_user, NULL::text",
        "SELECT 1 WHERE false",
        "SELECT name FROM pg_prepared_statements ORDER BY name",
    ];
    for round in 0..3 {
        let r = c.prepared_query(&stmts, T).unwrap();
        assert_eq!(r.len(), 3, "round {round}: {r:?}");
        assert_eq!(r[0].rows[0][0].as_deref(), Some("u_scram"));
        assert_eq!(r[0].rows[0][1], None);
        assert!(r[1].rows.is_empty());
        assert_eq!(r[1].count(), 0);
        // Parsed in the first round only: the same three every time.
        assert_eq!(names(&r[2]), ["clup0", "clup1", "clup2"], "round {round}");
    }

    eprintln!("== an error stops the batch; what was parsed before it stays");
    let bad = ["SELECT 1", "SELECT x FROM nowhere", "SELECT 2"];
    let e = c.prepared_query(&bad, T).unwrap_err();
    assert_eq!(e.code.as_deref(), Some("42P01"), "{e}");
    assert!(!c.is_broken());
    c.simple_query(
        "CREATE TEMP TABLE nowhere(x int); INSERT INTO nowhere VALUES (5)",
        T,
    )
    .unwrap();
    let r = c.prepared_query(&bad, T).unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].rows[0][0].as_deref(), Some("5"));
    let r = c
        .prepared_query(
            &["SELECT name FROM pg_prepared_statements ORDER BY name"],
            T,
        )
        .unwrap();
    assert_eq!(
        names(&r[0]),
        ["clup0", "clup1", "clup2", "clup3", "clup4", "clup5"],
        "SELECT 1 kept from the failed batch, the other two added after"
    );
    // Writes run and commit as in a simple query.
    let r = c
        .prepared_query(
            &["UPDATE nowhere SET x = x + 1", "SELECT x FROM nowhere"],
            T,
        )
        .unwrap();
    assert_eq!(r[0].count(), 1);
    assert_eq!(r[1].rows[0][0].as_deref(), Some("6"));

    eprintln!("== a slow answer is owed, not a lost session");
    let pid = c.backend_pid();
    let e = c
        .prepared_query(
            &["SELECT pg_sleep(1)", "SELECT 'late'"],
            Duration::from_millis(300),
        )
        .unwrap_err();
    assert!(e.msg.contains("no answer within 0.3s"), "{e}");
    assert!(!c.is_broken() && c.owes_answer());
    // Still sleeping: the next batch waits for it, and gives up again.
    let e = c
        .prepared_query(&["SELECT 'next'"], Duration::from_millis(200))
        .unwrap_err();
    assert!(e.msg.contains("no answer within 0.2s"), "{e}");
    assert!(!c.is_broken() && c.owes_answer());
    // Given the time: the late answer is read and dropped, then the new
    // batch runs, on the same session.
    let r = c.prepared_query(&["SELECT 'next'"], T).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].rows[0][0].as_deref(), Some("next"));
    assert!(!c.owes_answer());
    assert_eq!(c.backend_pid(), pid);
    // A deadline already past sends nothing and breaks nothing.
    let e = c.prepared_query(&["SELECT 1"], Duration::ZERO).unwrap_err();
    assert!(e.msg.contains("no answer"), "{e}");
    assert!(!c.is_broken() && !c.owes_answer());
    let r = c
        .prepared_query(
            &["SELECT name FROM pg_prepared_statements ORDER BY name"],
            T,
        )
        .unwrap();
    assert_eq!(
        r[0].rows.len(),
        10,
        "clup0..9: the owed batch's two counted: {r:?}"
    );
}

#[test]
fn probe_sessions_are_kept_replaced_and_bounded() {
    let cfg = lab::config(T);
    let mut lab = server();
    {
        let mut c = lab.sql(0, "postgres");
        c.batch_execute(&format!(
            "CREATE ROLE clup_probe LOGIN PASSWORD {}",
            pg::sql_literal(lab::PROBE_PASS)
        ))
        .unwrap();
        c.batch_execute("CREATE DATABASE cs_sys_ha").unwrap();
        lab.sql(0, "cs_sys_ha")
            .batch_execute(
                "CREATE TABLE cs_sys_heartbeat(hb_time TIMESTAMP); \
                 GRANT SELECT, UPDATE, INSERT ON cs_sys_heartbeat TO clup_probe;",
            )
            .unwrap();
    }
    let db = lab.dbs[0].clone();
    let clup_sessions = || -> i64 {
        lab.sql(0, "postgres")
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'clup'",
                &[],
            )
            .unwrap()
            .get(0)
    };

    eprintln!("== a probe session is reused across rounds");
    let mut conns = pg::ProbeConns::default();
    let first = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(first[&db.id].ok, "{:#?}", first[&db.id]);
    // probe_user and ha_db_user differ: a writer and a reader session.
    let pids = conns.backend_pids(db.id);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for _ in 0..5 {
        let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
        assert!(
            p[&db.id].ok && p[&db.id].error.is_empty(),
            "{:#?}",
            p[&db.id]
        );
        assert_eq!(conns.backend_pids(db.id), pids);
    }
    assert_eq!(clup_sessions(), 2);
    // As a standby (role changed): one reader; the writer is closed.
    let p = pg::probe_many(&[(&db, false)], &cfg, &mut conns);
    assert!(p[&db.id].ok);
    assert_eq!(conns.backend_pids(db.id).len(), 1);
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(p[&db.id].ok);
    let pids = conns.backend_pids(db.id);

    eprintln!("== one login for both: status and heartbeat write in one session");
    let mut one = cfg.clone();
    one.ha_db_user = one.probe_user.clone();
    one.ha_db_pass = one.probe_password.clone();
    let mut c1 = pg::ProbeConns::default();
    let hb_rows = || -> i64 {
        lab.sql(0, "cs_sys_ha")
            .query_one("SELECT count(*) FROM cs_sys_heartbeat", &[])
            .unwrap()
            .get(0)
    };
    lab.sql(0, "cs_sys_ha")
        .batch_execute("DELETE FROM cs_sys_heartbeat")
        .unwrap();
    for _ in 0..3 {
        let p = pg::probe_many(&[(&db, true)], &one, &mut c1);
        assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
        assert_eq!(p[&db.id].in_recovery, Some(false));
        assert_eq!(c1.backend_pids(db.id).len(), 1);
        // An UPDATE of no row adds the row, once.
        assert_eq!(hb_rows(), 1);
    }
    lab.sql(0, "cs_sys_ha")
        .batch_execute("REVOKE UPDATE ON cs_sys_heartbeat FROM clup_probe")
        .unwrap();
    let p = pg::probe_many(&[(&db, true)], &one, &mut c1);
    let p1 = &p[&db.id];
    assert!(!p1.ok, "{p1:#?}");
    assert!(
        p1.error.contains("heartbeat write") && p1.error.contains("permission denied"),
        "{}",
        p1.error
    );
    // The status was read all the same, and the session is kept.
    assert_eq!(p1.in_recovery, Some(false), "{p1:#?}");
    assert_eq!(c1.backend_pids(db.id).len(), 1);
    lab.sql(0, "cs_sys_ha")
        .batch_execute("GRANT UPDATE ON cs_sys_heartbeat TO clup_probe")
        .unwrap();
    let p = pg::probe_many(&[(&db, true)], &one, &mut c1);
    assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
    drop(c1);

    eprintln!("== restarted between rounds: the dead session is replaced, no failure");
    pgctl::stop_fast(&LocalSh, &db, &cfg).unwrap();
    pgctl::start(&LocalSh, &db, &cfg).unwrap();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
    let new_pids = conns.backend_pids(db.id);
    assert_eq!(new_pids.len(), 2);
    assert!(
        new_pids.iter().all(|p| !pids.contains(p)),
        "{pids:?} {new_pids:?}"
    );

    eprintln!("== killed: the probe fails fast; back: sessions are opened again");
    pgctl::stop_fast(&LocalSh, &db, &cfg).unwrap();
    let started = Instant::now();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(!p[&db.id].ok);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(conns.is_empty());
    pgctl::start(&LocalSh, &db, &cfg).unwrap();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
    assert_eq!(conns.len(), 2);

    eprintln!("== a server that accepts but never answers does not hold up the others");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut hung = db.clone();
    hung.id = 99;
    hung.port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let p = pg::probe_many(&[(&hung, true), (&db, true)], &cfg, &mut conns);
    let took = started.elapsed();
    assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
    assert!(!p[&99].ok);
    assert!(
        p[&99].error.contains("no answer within 2.0s"),
        "{}",
        p[&99].error
    );
    assert!(
        took >= T && took < T + Duration::from_millis(300),
        "{took:?}"
    );
    assert!(p[&db.id].probe_ms < 1000, "{:#?}", p[&db.id]);

    eprintln!("== a late probe is reported once, at its time; one on time never");
    let calls = std::sync::Mutex::new(Vec::new());
    let started_late = Instant::now();
    let note = || calls.lock().unwrap().push(started_late.elapsed());
    let late = pg::Late {
        id: 99,
        after: Duration::from_millis(400),
        then: &note,
    };
    let p = pg::probe_watching(&[(&hung, true), (&db, true)], &cfg, &mut conns, Some(late));
    assert!(p[&db.id].ok && !p[&99].ok);
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0] >= Duration::from_millis(400) && seen[0] < Duration::from_millis(700),
        "{seen:?}"
    );
    // Watched alone, the late one is probed off the calling thread.
    calls.lock().unwrap().clear();
    let late = pg::Late {
        id: 99,
        after: Duration::from_millis(200),
        then: &note,
    };
    pg::probe_watching(&[(&hung, true)], &cfg, &mut conns, Some(late));
    assert_eq!(calls.lock().unwrap().len(), 1);
    calls.lock().unwrap().clear();
    let late = pg::Late {
        id: db.id,
        after: Duration::from_millis(400),
        then: &note,
    };
    let p = pg::probe_watching(&[(&hung, true), (&db, true)], &cfg, &mut conns, Some(late));
    assert!(p[&db.id].ok);
    assert!(calls.lock().unwrap().is_empty());
    // Not when the others are slow too: that is not the watched one's
    // trouble.
    let mut hung2 = hung.clone();
    hung2.id = 98;
    let late = pg::Late {
        id: 99,
        after: Duration::from_millis(400),
        then: &note,
    };
    pg::probe_watching(
        &[(&hung, true), (&hung2, false)],
        &cfg,
        &mut conns,
        Some(late),
    );
    assert!(calls.lock().unwrap().is_empty());

    eprintln!("== SIGSTOP: bounded by probe_timeout, sessions dropped; resumed: back");
    lab.freeze(0);
    let started = Instant::now();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    let took = started.elapsed();
    assert!(!p[&db.id].ok);
    assert!(took < T + Duration::from_millis(300), "{took:?}");
    // Kept, their answers owed: a slow server costs no new sessions.
    let pids = conns.backend_pids(db.id);
    assert_eq!(pids.len(), 2, "{pids:?}");
    let again = Instant::now();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(!p[&db.id].ok);
    assert!(again.elapsed() < T + Duration::from_millis(300));
    lab.thaw();
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(p[&db.id].ok, "{:#?}", p[&db.id]);
    assert_eq!(conns.backend_pids(db.id), pids);

    eprintln!("== too many clients: a kept session still probes; a new one counts as alive");
    let mut filler = Vec::new();
    let full = loop {
        match Client::connect(&params(&lab, "postgres", lab::SUPERUSER_PASS), "fill", T) {
            Ok(c) => filler.push(c),
            Err(e) => break e,
        }
        assert!(filler.len() < 50, "the server never filled up");
    };
    assert_eq!(full.code.as_deref(), Some("53300"), "{full}");
    let p = pg::probe_many(&[(&db, true)], &cfg, &mut conns);
    assert!(
        p[&db.id].ok && p[&db.id].error.is_empty(),
        "{:#?}",
        p[&db.id]
    );
    let fresh = pg::probe(&db, &cfg, true);
    assert!(fresh.ok, "{fresh:#?}");
    assert!(fresh.error.contains("too many clients"), "{}", fresh.error);
    drop(filler);

    eprintln!("== no secret in any error seen");
    for e in [&p[&db.id].error, &fresh.error] {
        assert!(!e.contains(lab::PROBE_PASS) && !e.contains(lab::SUPERUSER_PASS));
    }
}
