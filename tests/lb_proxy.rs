//! cstlb end to end: the built binary (`clup lb ...`) in front of fake
//! backends on 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::lb_support::*;
use serde_json::json;

const FAST: &[&str] = &["--check-interval", "0.2", "--workers", "2"];

fn spread(lb: &Lb, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let (name, _s) = lb.who();
        *m.entry(name).or_insert(0) += 1;
    }
    m
}

#[test]
fn round_robin_spreads_connections() {
    let (a, b) = (Backend::start("A"), Backend::start("B"));
    let lb = Lb::start(&[&a, &b], FAST);
    let names: Vec<String> = (0..6).map(|_| lb.who().0).collect();
    for w in names.windows(2) {
        assert_ne!(w[0], w[1], "not round robin: {names:?}");
    }
    assert_eq!(
        spread(&lb, 10),
        BTreeMap::from([("A".into(), 5), ("B".into(), 5)])
    );
}

#[test]
fn list_shape_add_delete_and_tokens() {
    let (a, b) = (Backend::start("A"), Backend::start("B"));
    let lb = Lb::start(&[&a, &b], FAST);
    let (aa, ba) = (a.addr(), b.addr());
    assert_eq!(
        lb.list(),
        json!({
            aa.clone(): {"State": 0, "NextAddress": ba.clone(), "PreAddress": ba.clone()},
            ba.clone(): {"State": 0, "NextAddress": aa.clone(), "PreAddress": aa.clone()},
        })
    );
    let before = lb.list();
    // Wrong or missing token: 401 and nothing changes.
    for path in [
        format!("/backend/delete?backend={aa}"),
        format!("/backend/delete?backend={aa}&token=wrong"),
        format!("/backend/delete?backend={aa}&token="),
        "/backend/list".to_string(),
        "/backend/stats?token=x".to_string(),
    ] {
        let (st, body) = lb.get(&path);
        assert_eq!(st, 401, "{path}: {body}");
        assert!(!body.contains(TOKEN));
    }
    let (st, _) = http_get(
        &format!("http://127.0.0.1:{}/backend/delete?backend={aa}", lb.mgr),
        &[("X-Cstlb-Token", "nope")],
    );
    assert_eq!(st, 401);
    assert_eq!(lb.list(), before);
    // Header token works too.
    let (st, _) = http_get(
        &format!("http://127.0.0.1:{}/backend/list", lb.mgr),
        &[("X-Cstlb-Token", TOKEN)],
    );
    assert_eq!(st, 200);
    // Bad backends: 400 with a reason.
    for bad in ["pg01:5432", "127.0.0.1", "127.0.0.1:0", "", "1.2.3.4:5%3Bx"] {
        let (st, body) = lb.get(&format!("/backend/add?backend={bad}&token={TOKEN}"));
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    assert_eq!(lb.list(), before);

    // Delete A: existing session to A goes on; new ones all go to B.
    let mut on_a = loop {
        let (n, s) = lb.who();
        if n == "A" {
            break s;
        }
    };
    let (st, body) = lb.get(&format!("/backend/delete?backend={aa}&token={TOKEN}"));
    assert_eq!(st, 200, "{body}");
    let (st, body) = lb.get(&format!("/backend/delete?backend={aa}&token={TOKEN}"));
    assert_eq!((st, body.contains("not present")), (200, true), "{body}");
    assert_eq!(
        lb.list(),
        json!({ba.clone(): {"State": 0, "NextAddress": ba.clone(), "PreAddress": ba.clone()}})
    );
    let a_before = a.sessions.load(Ordering::SeqCst);
    assert_eq!(spread(&lb, 6), BTreeMap::from([("B".into(), 6)]));
    assert_eq!(a.sessions.load(Ordering::SeqCst), a_before);
    assert!(echo(&mut on_a, b"still here"));
    let (_, stats) = lb.get(&format!("/backend/stats?token={TOKEN}"));
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["data"]["backends"][&aa]["State"], json!(2), "{stats}");
    assert_eq!(
        stats["data"]["backends"][&aa]["active"],
        json!(1),
        "{stats}"
    );

    // Add it back.
    let (st, body) = lb.get(&format!("/backend/add?backend={aa}&token={TOKEN}"));
    assert_eq!((st, body.contains("added")), (200, true), "{body}");
    let (st, body) = lb.get(&format!("/backend/add?backend={aa}&token={TOKEN}"));
    assert_eq!((st, body.contains("already")), (200, true), "{body}");
    assert_eq!(
        spread(&lb, 4),
        BTreeMap::from([("A".into(), 2), ("B".into(), 2)])
    );
    drop(on_a);
}

#[test]
fn killed_backend_is_skipped_and_returns() {
    let (a, b) = (Backend::start("A"), Backend::start("B"));
    let lb = Lb::start(&[&a, &b], FAST);
    a.kill();
    let aa = a.addr();
    assert!(
        wait_until(Duration::from_secs(3), || lb.list()[&aa]["State"]
            == json!(1)),
        "not marked unhealthy: {}\n{}",
        lb.list(),
        lb.log_text()
    );
    assert_eq!(spread(&lb, 5), BTreeMap::from([("B".into(), 5)]));
    let log = lb.log_text();
    assert!(
        log.contains(&format!("Backend({aa}) failed health check")),
        "{log}"
    );
}

#[test]
fn refused_backend_fails_over_to_the_next() {
    // A dead backend that the checker has not caught yet (long interval):
    // the connect is refused and the next one in the ring serves.
    let b = Backend::start("B");
    let dead = format!("127.0.0.1:{}", free_port());
    let lb = Lb::start(&[&b], &["--backend", &dead, "--check-interval", "3600"]);
    assert_eq!(spread(&lb, 4), BTreeMap::from([("B".into(), 4)]));
    assert_eq!(lb.list()[&dead]["State"], json!(1));
}

#[test]
fn no_healthy_backend_is_refused_quickly() {
    let dead = format!("127.0.0.1:{}", free_port());
    let lb = Lb::spawn(LbArgs {
        args: vec![
            "--backend".into(),
            dead,
            "--check-interval".into(),
            "0.2".into(),
        ],
        env: vec![("CSTLB_MGR_TOKEN", TOKEN.into())],
        wait_token: Some(TOKEN),
    });
    // A client that says nothing: EOF within the bounded wait.
    let t0 = Instant::now();
    let mut got = Vec::new();
    let _ = lb.connect().read_to_end(&mut got);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Like libpq: SSLRequest gets 'N', the startup packet an ErrorResponse.
    for _ in 0..3 {
        let t0 = Instant::now();
        let mut s = lb.connect();
        s.write_all(&SSL_REQUEST).unwrap();
        let mut n = [0u8; 1];
        s.read_exact(&mut n).unwrap();
        assert_eq!(&n, b"N");
        s.write_all(b"\0\0\0\x08\0\x03\0\0").unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert_eq!(got.first(), Some(&b'E'), "{got:?}");
        assert!(String::from_utf8_lossy(&got).contains("no healthy backend"));
    }
}

#[test]
fn half_close_both_ways_and_large_transfer() {
    let a = Backend::start("A");
    let lb = Lb::start(&[&a], FAST);
    // Client half-closes: everything sent comes back, then EOF.
    let mut s = lb.connect();
    s.write_all(b"hello, half-closed world").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello, half-closed world");

    // Backend half-closes: the client sees EOF and can still send.
    let mut s = lb.connect();
    s.write_all(b"bye\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye\n");
    let chunk = vec![7u8; 100_000];
    s.write_all(&chunk).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || *a.after_bye.lock().unwrap()
            == Some(100_000)),
        "backend got {:?}",
        a.after_bye.lock().unwrap()
    );

    // 8 MB both ways at once, byte exact.
    let data: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let s = lb.connect();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let d2 = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(data.len());
    (&s).read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "data corrupted");
}

#[test]
fn many_concurrent_sessions_without_fd_leak() {
    let (a, b) = (Backend::start("A"), Backend::start("B"));
    let lb = Lb::start(
        &[&a, &b],
        &["--check-interval", "5", "--connect-timeout", "5"],
    );
    assert!(wait_until(Duration::from_secs(3), || lb.active() == 0));
    let base = lb.open_fds();
    let mut conns = Vec::new();
    for i in 0..400 {
        let mut s = lb.connect();
        s.write_all(format!("{i:06}").as_bytes()).unwrap();
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 6];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, format!("{i:06}").as_bytes());
    }
    // Two fds per session (a few management connections may have closed).
    assert!(
        lb.open_fds() >= base + 780,
        "{} fds, base {base}",
        lb.open_fds()
    );
    assert_eq!(lb.active(), 400, "{}", lb.stats());
    drop(conns);
    assert!(
        wait_until(Duration::from_secs(5), || lb.open_fds() <= base),
        "fds: {} > {base}",
        lb.open_fds()
    );
}

#[test]
fn management_port_survives_garbage() {
    let a = Backend::start("A");
    let lb = Lb::start(&[&a], FAST);
    for junk in [
        b"\x00\x01\x02\xff\xfe garbage\r\n\r\n".to_vec(),
        b"GET /backend/list?token="
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'x', 200_000))
            .chain(*b" HTTP/1.1\r\n\r\n")
            .collect(),
        b"GET /backend/add?backend=%%%%&token=zz HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", lb.mgr)) {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(&junk);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
    let (st, body) = lb.get(&format!(
        "/backend/list?token={TOKEN}&x={}",
        "y".repeat(10_000)
    ));
    assert_eq!(st, 414, "{body}");
    assert_eq!(lb.list()[a.addr()]["State"], json!(0));
    assert_eq!(lb.who().0, "A");
}

/// A stand-in for clupserver's `GET /<cluster>/get_lb_host`.
struct FakeClup {
    port: u16,
    backends: Arc<Mutex<Vec<String>>>,
    up: Arc<std::sync::atomic::AtomicBool>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

fn fake_clup(http_token: &'static str, mgr_token: &'static str, list: Vec<String>) -> FakeClup {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let backends = Arc::new(Mutex::new(list));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (bl, upc, hc) = (backends.clone(), up.clone(), hits.clone());
    thread::spawn(move || {
        for req in server.incoming_requests() {
            hc.fetch_add(1, Ordering::SeqCst);
            let tok_ok = req
                .headers()
                .iter()
                .any(|h| h.field.equiv("X-Clup-Token") && h.value.as_str() == http_token);
            let (st, body) = if !upc.load(Ordering::SeqCst) {
                (503, json!({"ok": false, "error": "down for the test"}))
            } else if req.url() != "/cluster01/get_lb_host" {
                (404, json!({"ok": false, "error": "no such cluster"}))
            } else if !tok_ok {
                (401, json!({"ok": false, "error": "wrong token"}))
            } else {
                let l = bl.lock().unwrap().clone();
                (
                    200,
                    json!({"ok": true, "data": {"cluster": "cluster01", "backends": l, "cstlb_token": mgr_token}}),
                )
            };
            let _ = req
                .respond(tiny_http::Response::from_string(body.to_string()).with_status_code(st));
        }
    });
    FakeClup {
        port,
        backends,
        up,
        hits,
    }
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn clupserver_drives_the_backend_set() {
    let (a, b) = (Backend::start("A"), Backend::start("B"));
    let (aa, ba) = (a.addr(), b.addr());
    let clup = fake_clup("http-tok", TOKEN, vec![aa.clone(), ba.clone()]);
    let lb = Lb::spawn(LbArgs {
        args: vec![
            format!(
                "--clup=http://127.0.0.1:{}/cluster01/get_lb_host",
                clup.port
            ),
            "--refresh".into(),
            "0.2".into(),
            "--check-interval".into(),
            "0.2".into(),
        ],
        env: vec![("CSTLB_TOKEN", "http-tok".into())],
        wait_token: Some(TOKEN), // only known from clupserver's answer
    });
    let mut sorted = keys(&lb.list());
    sorted.sort();
    let mut want = vec![aa.clone(), ba.clone()];
    want.sort();
    assert_eq!(sorted, want);
    assert!(!lb.log_text().contains(TOKEN) && !lb.log_text().contains("http-tok"));

    // clupserver drops A: gone at the next refresh.
    *clup.backends.lock().unwrap() = vec![ba.clone()];
    assert!(wait_until(Duration::from_secs(3), || keys(&lb.list()) == [ba.clone()]));
    // ...and lists it again: back.
    *clup.backends.lock().unwrap() = vec![ba.clone(), aa.clone()];
    assert!(wait_until(Duration::from_secs(3), || keys(&lb.list())
        .len()
        == 2));

    // An API delete sticks while clupserver still lists the backend.
    let (st, _) = lb.get(&format!("/backend/delete?backend={aa}&token={TOKEN}"));
    assert_eq!(st, 200);
    let seen = clup.hits.load(Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(5), || clup
        .hits
        .load(Ordering::SeqCst)
        >= seen + 3));
    assert_eq!(keys(&lb.list()), std::slice::from_ref(&ba));
    assert_eq!(spread(&lb, 3), BTreeMap::from([("B".into(), 3)]));
    // Until the API adds it back.
    lb.get(&format!("/backend/add?backend={aa}&token={TOKEN}"));
    assert_eq!(keys(&lb.list()).len(), 2);

    // clupserver unreachable: the set is kept and the failure logged.
    clup.up.store(false, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(3), || lb
        .log_text()
        .contains("Can not get backends from clupserver: HTTP 503")));
    assert_eq!(keys(&lb.list()).len(), 2);
}

#[test]
fn wrong_clup_token_keeps_the_static_set_and_api_closed() {
    let a = Backend::start("A");
    let clup = fake_clup("http-tok", TOKEN, vec![]);
    let lb = Lb::spawn(LbArgs {
        args: vec![
            format!(
                "--clup=http://127.0.0.1:{}/cluster01/get_lb_host",
                clup.port
            ),
            "--backend".into(),
            a.addr(),
            "--refresh".into(),
            "0.2".into(),
        ],
        env: vec![("CSTLB_TOKEN", "not-the-token".into())],
        wait_token: None,
    });
    assert!(wait_until(Duration::from_secs(3), || lb
        .log_text()
        .contains("HTTP 401: wrong token")));
    // No management token from anywhere: everything is 401.
    assert_eq!(lb.get(&format!("/backend/list?token={TOKEN}")).0, 401);
    assert_eq!(lb.get("/backend/list?token=").0, 401);
    assert!(lb.log_text().contains("the management API refuses"));
    // Clients are still served from --backend.
    assert_eq!(lb.who().0, "A");
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let a = Backend::start("A");
    let mut lb = Lb::start(&[&a], &["--drain-timeout", "10"]);
    let (_, mut s) = lb.who();
    lb.signal(libc::SIGTERM);
    // New clients are refused promptly.
    assert!(
        wait_until(Duration::from_secs(3), || TcpStream::connect((
            "127.0.0.1",
            lb.port
        ))
        .is_err()),
        "still accepting"
    );
    // The open session keeps working while draining.
    assert!(echo(&mut s, b"draining"));
    assert!(lb.child.try_wait().unwrap().is_none());
    drop(s);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(5), || {
        status = lb.child.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(status.unwrap().code(), Some(0), "{}", lb.log_text());
    assert!(lb.log_text().contains("cstlb stopped."));
}

#[test]
fn drain_timeout_cuts_sessions_and_exits_zero() {
    let a = Backend::start("A");
    let mut lb = Lb::start(&[&a], &["--drain-timeout", "0.5"]);
    let (_, mut s) = lb.who();
    let t0 = Instant::now();
    lb.signal(libc::SIGINT);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(5), || {
        status = lb.child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(t0.elapsed() >= Duration::from_millis(400));
    assert_eq!(status.unwrap().code(), Some(0));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("session not cut at the drain timeout: {other:?}"),
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["lb"],
        vec!["lb", "--backend", "pg01:5432"],
        vec!["lb", "--backend", "127.0.0.1:5432", "--token", "secret"],
        vec!["lb", "--clup", "http://127.0.0.1:1/c/get_lb_host"], // no CSTLB_TOKEN
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clup"))
            .args(&args)
            .env_remove("CSTLB_TOKEN")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("cstlb: "));
    }
}

#[test]
fn idle_sessions_are_closed_after_the_idle_timeout() {
    let a = Backend::start("A");
    let lb = Lb::start(&[&a], &["--idle-timeout", "0.5"]);
    let (_, mut quiet) = lb.who();
    let (_, mut busy) = lb.who();
    let t0 = Instant::now();
    // The busy one keeps talking for 2 s and stays open.
    while t0.elapsed() < Duration::from_secs(2) {
        assert!(echo(&mut busy, b"ping"), "busy session cut");
        thread::sleep(Duration::from_millis(100));
    }
    // The quiet one was closed (the check runs once a second): EOF or
    // reset, not a read timeout.
    let mut b = [0u8; 1];
    match quiet.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("quiet session still open: {other:?}"),
    }
    assert!(echo(&mut busy, b"still"));
}
