//! exec::wire against a real PostgreSQL 15 on 127.0.0.1: each
//! authentication method, errors, a hung server, a restarted one.

use std::time::{Duration, Instant};

use clup::config::Secret;
use clup::exec::pg;
use clup::exec::pgctl;
use clup::exec::wire::{Client, Params};

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
