//! Tests of the probes' pure parts: LSNs, lag, the new-connection checks.

use super::*;

/// The last look's connection attempts: a refused one is an answer at
/// once (not asked again for the whole wait); one that the kernel
/// takes but nobody answers is a stall, found within one attempt.
#[test]
fn accepts_within_asks_again_only_after_a_timeout() {
    let cfg = Config::parse(
        &format!("{}pg_sslmode = disable\n", crate::model::config::SAMPLE),
        std::path::Path::new("/c"),
    )
    .unwrap();
    let db = |port: u16| Db {
        id: 1,
        state: 1,
        os_user: "postgres".into(),
        pgdata: "/x".into(),
        is_primary: 1,
        repl_app_name: "stb01".into(),
        host: "127.0.0.1".into(),
        switch_host: "127.0.0.1".into(),
        port,
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let t = Instant::now();
    let h = accepts_within(
        &db(port),
        &cfg,
        Duration::from_secs(2),
        Duration::from_millis(75),
    );
    assert!(matches!(h, wire::Handshake::Unreachable(_)), "{h:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let backlog = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backlog.local_addr().unwrap().port();
    let t = Instant::now();
    let h = accepts_within(
        &db(port),
        &cfg,
        Duration::from_secs(2),
        Duration::from_millis(75),
    );
    assert!(matches!(h, wire::Handshake::Stalled(_)), "{h:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn the_last_look_lasts_while_the_other_checks_run() {
    use std::sync::atomic::AtomicUsize;
    // Attempts time out (a partition drops the SYNs) until the host
    // comes back at 400 ms, after `within` (150 ms), while the other
    // checks of the look still run: the return is seen.
    let start = Instant::now();
    let back = Duration::from_millis(400);
    let ask = |t: Duration| {
        if start.elapsed() >= back {
            return wire::Handshake::Answered;
        }
        std::thread::sleep(t);
        wire::Handshake::Unreachable("timeout".into())
    };
    let ms = Duration::from_millis;
    let busy = AtomicBool::new(true);
    let h = keep_asking(ask, ms(150), ms(50), &busy, ms(2000));
    assert!(matches!(h, wire::Handshake::Answered), "{h:?}");
    // Nothing else running: it stops after `within`, the return unseen.
    let start = Instant::now();
    let asked = AtomicUsize::new(0);
    let ask = |t: Duration| {
        asked.fetch_add(1, Ordering::Relaxed);
        if start.elapsed() >= back {
            return wire::Handshake::Answered;
        }
        std::thread::sleep(t);
        wire::Handshake::Unreachable("timeout".into())
    };
    let h = keep_asking(ask, ms(150), ms(50), &AtomicBool::new(false), ms(2000));
    assert!(matches!(h, wire::Handshake::Unreachable(_)), "{h:?}");
    assert!((1..=4).contains(&asked.load(Ordering::Relaxed)));
    // Still busy at the cap: it stops there.
    let start = Instant::now();
    let ask = |t: Duration| {
        std::thread::sleep(t);
        wire::Handshake::Unreachable("timeout".into())
    };
    let h = keep_asking(ask, ms(100), ms(50), &AtomicBool::new(true), ms(300));
    assert!(matches!(h, wire::Handshake::Unreachable(_)), "{h:?}");
    let took = start.elapsed();
    assert!(took >= ms(290) && took < ms(450), "{took:?}");
}

#[test]
fn lsn_round_trip() {
    assert_eq!(parse_lsn("0/30E73D0"), Some(0x30E73D0));
    assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
    assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
    assert_eq!(parse_lsn("0/0"), Some(0));
    assert_eq!(format_lsn(0x30E73D0), "0/30E73D0");
    assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    assert_eq!(format_lsn(0), "0/0");
    for s in ["0/30E73D0", "16/B374D848", "1/0", "FFFFFFFF/FFFFFFFF"] {
        assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
    }
    for bad in [
        "",
        "0",
        "/1",
        "1/",
        "0/G",
        "1/2/3",
        "123456789/0",
        "0x1/0",
        "-1/0",
    ] {
        assert_eq!(parse_lsn(bad), None, "{bad}");
    }
    assert_eq!(parse_lsn("0/30e73d0"), Some(0x30E73D0));
}

#[test]
fn literals() {
    assert_eq!(sql_literal("stb02"), "'stb02'");
    assert_eq!(sql_literal(""), "''");
    assert_eq!(sql_literal("it's"), "'it''s'");
    assert_eq!(sql_literal("a\\b'c"), "E'a\\\\b''c'");
    assert_eq!(
        sql_literal("FIRST 1 (stb02, stb03)"),
        "'FIRST 1 (stb02, stb03)'"
    );
}

#[test]
fn probe_serializes() {
    let p = DbProbe {
        ok: true,
        wal_lsn: Some(5),
        ..DbProbe::default()
    };
    let j = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<DbProbe>(&j).unwrap(), p);
}

#[test]
fn too_many_clients_is_alive_other_errors_are_not() {
    let full = PgError {
        what: "probe 10.0.0.1:5432".into(),
        msg: "sorry, too many clients already".into(),
        code: Some("53300".into()),
    };
    let p = failed_probe("probe", DbProbe::default(), full);
    assert!(p.ok);
    assert!(p.error.contains("too many clients"), "{}", p.error);
    for code in [None, Some("57P03".to_string()), Some("28P01".to_string())] {
        let e = PgError {
            what: "probe".into(),
            msg: "no".into(),
            code,
        };
        assert!(!failed_probe("probe", DbProbe::default(), e).ok);
    }
}
