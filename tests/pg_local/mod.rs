//! Executors against real PostgreSQL 15 servers on 127.0.0.1: probes,
//! pg_ctl scripts, recovery settings (files and ALTER SYSTEM), promotion,
//! synchronous_standby_names, and probes of stopped and hanging servers.
//! If PostgreSQL cannot be set up the test fails with the reason.

mod lab;
mod wire;

use std::time::{Duration, Instant};

use clup::exec::pg::{self, DbProbe};
use clup::exec::{pgctl, recovery};
use lab::{wait_for, Lab, LocalSh};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

fn streaming_replica(p: &DbProbe, app: &str) -> bool {
    p.replicas
        .iter()
        .any(|r| r.application_name == app && r.state == "streaming")
}

#[test]
fn replication_cluster_end_to_end() {
    let cfg = lab::config(PROBE_TIMEOUT);
    let ports = lab::free_ports(3);
    let mut lab = Lab::new(&ports);
    let (db1, db2, db3) = (lab.dbs[0].clone(), lab.dbs[1].clone(), lab.dbs[2].clone());

    eprintln!("== start the primary with pgctl::start (pg_ctl found through PG_VERSION)");
    pgctl::start(&LocalSh, &db1, &cfg).expect("start primary");
    assert!(matches!(
        pgctl::status(&LocalSh, &db1, &cfg).unwrap(),
        pgctl::Status::Running { pid: Some(_) }
    ));
    // Starting a running server is fine.
    let out = pgctl::start(&LocalSh, &db1, &cfg).unwrap();
    assert!(out.stdout.contains("already running"), "{out:?}");

    {
        let mut c = lab.sql(0, "postgres");
        c.batch_execute(&format!(
            "CREATE ROLE repl REPLICATION LOGIN PASSWORD {}; \
             CREATE ROLE clup_probe LOGIN PASSWORD {};",
            pg::sql_literal(lab::REPL_PASS),
            pg::sql_literal(lab::PROBE_PASS)
        ))
        .unwrap();
        c.batch_execute("CREATE DATABASE cs_sys_ha").unwrap();
        let mut c = lab.sql(0, "cs_sys_ha");
        c.batch_execute(
            "CREATE TABLE cs_sys_heartbeat(hb_time TIMESTAMP); \
             INSERT INTO cs_sys_heartbeat VALUES (now()); \
             GRANT SELECT, UPDATE, INSERT ON cs_sys_heartbeat TO clup_probe;",
        )
        .unwrap();
    }

    eprintln!("== two standbys: pg_basebackup, recovery settings written by clup (files)");
    for i in [1, 2] {
        lab.base_backup(i);
        let applied = recovery::repoint(
            &LocalSh,
            &lab.dbs[i],
            &cfg,
            150000,
            false,
            "127.0.0.1",
            db1.port,
        )
        .unwrap();
        assert_eq!(applied, recovery::Applied::Written);
        let dir = std::path::Path::new(&lab.dbs[i].pgdata);
        assert!(dir.join("standby.signal").exists());
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
        assert!(
            auto.contains("recovery_target_timeline = 'latest'"),
            "{auto}"
        );
        pgctl::start(&LocalSh, &lab.dbs[i], &cfg).expect("start standby");
    }
    // Streaming proves the hostile password survived the conninfo and the
    // config file quoting.
    let p1 = wait_for("stb02 and stb03 streaming", Duration::from_secs(30), || {
        let p = pg::probe(&db1, &cfg, true);
        if streaming_replica(&p, "stb02") && streaming_replica(&p, "stb03") {
            Ok(p)
        } else {
            Err(format!("{p:#?}"))
        }
    });

    eprintln!("== probe the primary");
    assert!(p1.ok, "{p1:#?}");
    assert_eq!(p1.error, "");
    assert_eq!(p1.in_recovery, Some(false));
    assert_eq!(p1.timeline, Some(1));
    assert!(p1.version.unwrap() >= 150000 && p1.version.unwrap() < 160000);
    assert_eq!(p1.sync_names.as_deref(), Some(""));
    let lsn1 = p1.wal_lsn.expect("primary lsn");
    assert_eq!(p1.upstream, None);
    let r = p1
        .replicas
        .iter()
        .find(|r| r.application_name == "stb02")
        .unwrap();
    assert_eq!(r.sync_state, "async");
    assert_eq!(r.client_addr.as_deref(), Some("127.0.0.1"));
    assert!(r.sent_lsn.is_some() && r.replay_lsn.is_some(), "{r:?}");
    let cur = pg::current_lsn(&db1, &cfg).unwrap();
    assert!(cur >= lsn1);
    assert_eq!(pg::parse_lsn(&pg::format_lsn(cur)), Some(cur));

    eprintln!("== probe a standby");
    let p2 = wait_for(
        "standby replayed the heartbeat",
        Duration::from_secs(10),
        || {
            let p = pg::probe(&db2, &cfg, false);
            if p.ok && p.replay_lsn >= Some(lsn1) {
                Ok(p)
            } else {
                Err(format!("{p:#?}"))
            }
        },
    );
    assert_eq!(p2.in_recovery, Some(true));
    assert_eq!(p2.timeline, Some(1));
    let up = p2.upstream.clone().expect("wal receiver");
    assert_eq!(up.status, "streaming");
    assert_eq!(up.sender_host.as_deref(), Some("127.0.0.1"));
    assert_eq!(up.sender_port, Some(db1.port));
    assert!(p2.wal_lsn >= Some(lsn1), "{p2:#?}");
    assert!(p2.heartbeat_age_ms.is_some(), "{p2:#?}");
    assert!(p2.replicas.is_empty());

    // A standby probed as primary: the write fails, the status is still read.
    let wrong = pg::probe(&db2, &cfg, true);
    assert!(!wrong.ok);
    assert!(wrong.error.contains("read-only"), "{}", wrong.error);
    assert_eq!(wrong.in_recovery, Some(true));

    eprintln!("== probe cost");
    for (db, primary) in [(&db1, true), (&db2, false)] {
        let started = Instant::now();
        let cpu0 = cpu_time();
        for _ in 0..5 {
            assert!(pg::probe(db, &cfg, primary).ok);
        }
        let each = started.elapsed() / 5;
        let cpu = (cpu_time() - cpu0) / 5;
        // A figure, not an assertion: speed is for the benchmarks.
        eprintln!(
            "   probe of {} (primary: {primary}) on new sessions: {each:?}, {cpu:?} CPU",
            db.addr()
        );
        let mut conns = pg::ProbeConns::default();
        let cpu0 = cpu_time();
        let started = Instant::now();
        for _ in 0..50 {
            assert!(pg::probe_many(&[(db, primary)], &cfg, &mut conns)[&db.id].ok);
        }
        eprintln!(
            "   on a kept session: {:?} per probe, {:?} CPU of this process",
            started.elapsed() / 50,
            (cpu_time() - cpu0) / 50
        );
    }

    eprintln!("== synchronous_standby_names");
    pg::set_sync_names(&db1, &cfg, "FIRST 1 (stb02)").unwrap();
    let p = wait_for("stb02 sync", Duration::from_secs(10), || {
        let p = pg::probe(&db1, &cfg, true);
        let sync = p
            .replicas
            .iter()
            .any(|r| r.application_name == "stb02" && r.sync_state == "sync");
        if sync {
            Ok(p)
        } else {
            Err(format!("{p:#?}"))
        }
    });
    assert!(p.ok);
    assert_eq!(p.sync_names.as_deref(), Some("FIRST 1 (stb02)"));
    pg::set_sync_names(&db1, &cfg, "").unwrap();
    wait_for("sync names cleared", Duration::from_secs(10), || {
        let p = pg::probe(&db1, &cfg, true);
        if p.sync_names.as_deref() == Some("") {
            Ok(())
        } else {
            Err(format!("{p:#?}"))
        }
    });

    eprintln!("== probe of a hanging server (SIGSTOP) fails within the timeout");
    let mut conns = pg::ProbeConns::default();
    let all = [(&db1, true), (&db2, false), (&db3, false)];
    let before = pg::probe_many(&all, &cfg, &mut conns);
    assert!(before.values().all(|p| p.ok), "{before:#?}");
    lab.freeze(0);
    let started = Instant::now();
    let round = pg::probe_many(&all, &cfg, &mut conns);
    let took = started.elapsed();
    let hung = round[&db1.id].clone();
    assert!(!hung.ok);
    assert!(
        took < PROBE_TIMEOUT + Duration::from_millis(300),
        "took {took:?}"
    );
    assert!(
        hung.error.contains("no answer within 2.0s"),
        "{}",
        hung.error
    );
    // The standbys answered in the same round, at once.
    for db in [&db2, &db3] {
        let p = &round[&db.id];
        assert!(p.ok && p.probe_ms < 1000, "{p:#?}");
    }
    // Nothing is left running: the next probe waits its own timeout again.
    let started = Instant::now();
    let again = pg::probe(&db1, &cfg, true);
    assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_millis(300));
    assert!(again.error.contains("no answer"), "{}", again.error);
    assert_eq!(pg::hanging_calls(), 0);
    lab.thaw();
    let back = pg::probe(&db1, &cfg, true);
    assert!(back.ok, "{back:#?}");

    eprintln!("== promote stb02 (pg_promote)");
    let started = Instant::now();
    pg::promote(&LocalSh, &db2, &cfg).unwrap();
    eprintln!("   promoted in {:?}", started.elapsed());
    let p2 = pg::probe(&db2, &cfg, true);
    assert!(p2.ok, "{p2:#?}");
    assert_eq!(p2.in_recovery, Some(false));
    assert_eq!(p2.timeline, Some(2));
    // Promoting a primary again is a no-op.
    pg::promote(&LocalSh, &db2, &cfg).unwrap();

    eprintln!("== repoint stb03 to the new primary online (ALTER SYSTEM + reload)");
    let applied =
        recovery::repoint(&LocalSh, &db3, &cfg, 150000, true, "127.0.0.1", db2.port).unwrap();
    assert_eq!(applied, recovery::Applied::Reloaded);
    let p3 = wait_for(
        "stb03 follows stb02 on timeline 2",
        Duration::from_secs(30),
        || {
            let p = pg::probe(&db3, &cfg, false);
            let up = p.upstream.clone().unwrap_or_default();
            if p.ok
                && up.status == "streaming"
                && up.sender_port == Some(db2.port)
                && p.timeline == Some(2)
            {
                Ok(p)
            } else {
                Err(format!("{p:#?}"))
            }
        },
    );
    assert_eq!(p3.in_recovery, Some(true));
    let np = wait_for("new primary lists stb03", Duration::from_secs(10), || {
        let p = pg::probe(&db2, &cfg, true);
        if streaming_replica(&p, "stb03") {
            Ok(p)
        } else {
            Err(format!("{p:#?}"))
        }
    });
    assert!(np.ok);
    {
        let mut c = lab.sql(2, "postgres");
        let shown: String = c.query_one("SHOW primary_conninfo", &[]).unwrap().get(0);
        assert_eq!(
            pg::parse_conninfo(&shown)["password"],
            lab::REPL_PASS,
            "the password went through the SQL literal intact"
        );
    }

    eprintln!("== promote stb03 with pg_ctl promote (the PG < 12 path)");
    pgctl::promote(&LocalSh, &db3, &cfg, true).unwrap();
    let p3 = pg::probe(&db3, &cfg, true);
    assert!(p3.ok, "{p3:#?}");
    assert_eq!(p3.in_recovery, Some(false));
    assert_eq!(p3.timeline, Some(3));

    eprintln!("== stop the old primary; probing it fails fast");
    pgctl::stop_fast(&LocalSh, &db1, &cfg).unwrap();
    assert_eq!(
        pgctl::status(&LocalSh, &db1, &cfg).unwrap(),
        pgctl::Status::Stopped
    );
    let out = pgctl::stop_fast(&LocalSh, &db1, &cfg).unwrap();
    assert!(out.stdout.contains("not running"), "{out:?}");
    let started = Instant::now();
    let down = pg::probe(&db1, &cfg, true);
    assert!(!down.ok);
    assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_millis(500));
    assert!(
        down.error.starts_with(&format!("probe {}: ", db1.addr())),
        "{}",
        down.error
    );
    let mut gone = db1.clone();
    gone.pgdata = format!("{}-missing", db1.pgdata);
    assert_eq!(
        pgctl::status(&LocalSh, &gone, &cfg).unwrap(),
        pgctl::Status::NoDataDir
    );

    eprintln!("== no secret in any error seen");
    for e in [&wrong.error, &hung.error, &again.error, &down.error] {
        for s in [lab::REPL_PASS, lab::SUPERUSER_PASS, lab::PROBE_PASS] {
            assert!(!e.contains(s), "{e}");
        }
    }
    drop(lab);
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills a local struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
