//! Abuse of the ports, on loopback, bounded in count and time: wrong
//! credentials, a 10 MB body, a slowloris client, clients that announce a
//! body and never send it, 1000 idle connections. Meanwhile `clupadm show`
//! must answer within a few seconds, and afterwards the server runs and has
//! as many descriptors open as before.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{free_port, sample_conf, wait_for, TestHome, SAMPLE_INIT};

const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";
const PASS: &str = "csha_cluster_pass";

fn fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Send raw bytes, read the whole answer (the request says close).
fn raw(port: u16, req: &[u8]) -> String {
    let mut s = connect(port);
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn show_within(h: &TestHome, secs: u64) -> Duration {
    let t = Instant::now();
    let out = h.run(&["adm", "show"]);
    let took = t.elapsed();
    assert_eq!(out.code, 0, "clupadm show failed under abuse: {out:?}");
    assert!(
        took < Duration::from_secs(secs),
        "clupadm show took {took:?} under abuse"
    );
    took
}

fn raise_nofile(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[test]
fn clupserver_survives_abuse() {
    raise_nofile(4096);
    let h = TestHome::new("abuse");
    let port = free_port();
    h.write("conf/clup.conf", &sample_conf(port));
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    assert_eq!(h.run(&["server", "start"]).code, 0);
    let pid = h.read("run/clupserver.pid").trim().to_string();
    show_within(&h, 5);
    let before = fds(&pid);

    // Wrong and missing credentials: 401, nothing echoed.
    for (req, want) in [
        (
            "POST /admin/froze HTTP/1.1\r\nX-Clup-Pass: guess\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string(),
            401,
        ),
        (
            "POST /admin/froze HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                .to_string(),
            401,
        ),
        (
            format!("POST /admin/show?pass={PASS} HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            401,
        ),
        (
            "GET /cluster01/get_lb_host?token=x HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
            401,
        ),
        (
            format!("GET /cluster01/get_lb_host?token={}%ff HTTP/1.1\r\nConnection: close\r\n\r\n", &TOKEN[..10]),
            401,
        ),
        ("GARBAGE\r\n\r\n".into(), 400),
    ] {
        let a = raw(port, req.as_bytes());
        if want != 0 {
            assert_eq!(status_of(&a), want, "{req:?} -> {a}");
        }
        assert!(!a.contains(PASS) && !a.contains(TOKEN), "{a}");
    }

    // Invalid UTF-8 in the request line: refused (400) or closed without an
    // answer (0 here); the server stays up.
    let a = raw(
        port,
        b"GET /cluster01/get_lb_host?token=\xff\xfe HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(matches!(status_of(&a), 0 | 400 | 401), "{a}");
    show_within(&h, 5);

    // A 10 MB body: 413 quickly, before the body is read.
    let t = Instant::now();
    let mut s = connect(port);
    s.write_all(
        format!(
            "POST /admin/show HTTP/1.1\r\nX-Clup-Pass: {PASS}\r\nContent-Length: {}\r\n\r\n",
            10 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    let _ = s.write_all(&vec![b'x'; 256 << 10]);
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let a = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status_of(&a), 413, "{a}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "413 took {:?}",
        t.elapsed()
    );
    drop(s);

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Slowloris: headers one byte per 200 ms, two clients.
    for _ in 0..2 {
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let mut s = connect(port);
            let req = format!(
                "GET /cluster01/get_lb_host?token={TOKEN} HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(200)
            );
            for b in req.bytes() {
                if stop.load(Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    // Clients that announce a body over 1 KiB (tiny_http reads smaller ones
    // itself) and never send it, more of them than HTTP workers: before
    // server.rs handed each request to its own thread, these made
    // `clupadm show` time out.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut s = connect(port);
        s.write_all(
            format!("POST /admin/show HTTP/1.1\r\nX-Clup-Pass: {PASS}\r\nContent-Length: 5000\r\n\r\n{{")
                .as_bytes(),
        )
        .unwrap();
        stalled.push(s);
    }
    // 1000 idle connections.
    let idle: Vec<TcpStream> = (0..1000).map(|_| connect(port)).collect();
    thread::sleep(Duration::from_millis(500));
    let took = show_within(&h, 5);
    let during = fds(&pid);
    eprintln!("abuse: clupadm show took {took:?}; server fds before {before}, during {during}");

    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    drop(idle);
    drop(stalled);
    // Descriptors come back once the clients are gone.
    let settled = wait_for(10, || fds(&pid) <= before + 2);
    let after = fds(&pid);
    eprintln!("abuse: server fds after {after}");
    assert!(settled, "fd leak: {before} before, {after} after");
    show_within(&h, 5);
    assert_eq!(h.run(&["server", "status"]).code, 0);
    assert_eq!(h.run(&["server", "stop"]).code, 0);
}

/// At the descriptor limit accept() fails; the server must come back once
/// descriptors are free again. (tiny_http 0.12's accept thread stopped for
/// good at EMFILE, or panicked, ending the server under panic = "abort";
/// clupserver now serves HTTP with its own accept loop, util::http.)
#[test]
fn clupserver_recovers_from_running_out_of_descriptors() {
    raise_nofile(4096);
    let h = TestHome::new("emfile");
    let port = free_port();
    h.write("conf/clup.conf", &sample_conf(port));
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    assert_eq!(h.run(&["server", "start"]).code, 0);
    let pid: i32 = h.read("run/clupserver.pid").trim().parse().unwrap();
    show_within(&h, 5);
    let open = fds(&pid.to_string()) as u64;
    // Leave the server a few spare descriptors only.
    let lim = libc::rlimit {
        rlim_cur: open + 20,
        rlim_max: 4096,
    };
    // SAFETY: prlimit on a process this test started.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    let conns: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    thread::sleep(Duration::from_millis(500));
    drop(conns);
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: as above.
    unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert!(
        wait_for(10, || h.run(&["adm", "show"]).code == 0),
        "clupserver stopped answering after running out of descriptors:\n{}",
        h.read("logs/clupserver.log")
    );
    assert_eq!(h.run(&["server", "stop"]).code, 0);
}
