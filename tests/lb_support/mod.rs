//! Shared harness for cstlb's integration tests: fake PostgreSQL-ish
//! backends, a running `clup lb` process, small HTTP and polling helpers.
//! Everything listens on 127.0.0.1 only.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
pub const TOKEN: &str = "mgr-token-8e722522";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t0.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "clup-lb-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fake backend. Per connection: an SSLRequest is answered `N` (like a
/// PostgreSQL without SSL); a first `who\n` is answered with the backend's
/// name; `bye\n` makes it send `bye\n`, half-close its side and count what it
/// still receives; everything else is echoed.
pub struct Backend {
    pub name: String,
    pub port: u16,
    /// Client sessions (not health checks).
    pub sessions: Arc<AtomicUsize>,
    /// Bytes received after `bye\n`, once the peer closed.
    pub after_bye: Arc<Mutex<Option<usize>>>,
    dead: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        // A deep backlog: tests open hundreds of sessions at once.
        // SAFETY: listen(2) again only changes the backlog.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 2048) };
        let port = l.local_addr().unwrap().port();
        let b = Backend {
            name: name.to_string(),
            port,
            sessions: Arc::new(AtomicUsize::new(0)),
            after_bye: Arc::new(Mutex::new(None)),
            dead: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let (nm, sessions, dead, conns, after_bye) = (
            b.name.clone(),
            b.sessions.clone(),
            b.dead.clone(),
            b.conns.clone(),
            b.after_bye.clone(),
        );
        thread::spawn(move || {
            for s in l.incoming() {
                if dead.load(Ordering::SeqCst) {
                    return; // drops the listener: connects are refused
                }
                let Ok(s) = s else { continue };
                if let Ok(c) = s.try_clone() {
                    conns.lock().unwrap().push(c);
                }
                let (nm, sessions, after_bye) = (nm.clone(), sessions.clone(), after_bye.clone());
                thread::spawn(move || serve(s, &nm, &sessions, &after_bye));
            }
        });
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop listening and cut every open connection.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        assert!(
            wait_until(Duration::from_secs(2), || TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_err()),
            "backend {} still accepts",
            self.name
        );
    }
}

fn serve(s: TcpStream, name: &str, sessions: &AtomicUsize, after_bye: &Mutex<Option<usize>>) {
    // kill() holds a clone of the socket: close it for real on the way out.
    let s2 = s.try_clone();
    serve_session(s, name, sessions, after_bye);
    if let Ok(s2) = s2 {
        let _ = s2.shutdown(Shutdown::Both);
    }
}

fn serve_session(
    mut s: TcpStream,
    name: &str,
    sessions: &AtomicUsize,
    after_bye: &Mutex<Option<usize>>,
) {
    let mut first = [0u8; 4];
    if s.read_exact(&mut first).is_err() {
        return;
    }
    if first == SSL_REQUEST[..4] {
        let mut rest = [0u8; 4];
        if s.read_exact(&mut rest).is_err() || rest != SSL_REQUEST[4..] {
            return;
        }
        if s.write_all(b"N").is_err() || s.read_exact(&mut first).is_err() {
            return;
        }
    }
    sessions.fetch_add(1, Ordering::SeqCst);
    let mut pending: Vec<u8> = Vec::new();
    if &first == b"who\n" {
        let _ = s.write_all(format!("{name}\n").as_bytes());
    } else if &first == b"bye\n" {
        let _ = s.write_all(b"bye\n");
        let _ = s.shutdown(Shutdown::Write);
        let mut n = 0;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return,
            }
        }
        *after_bye.lock().unwrap() = Some(n);
        return;
    } else {
        pending.extend_from_slice(&first);
    }
    if s.write_all(&pending).is_err() {
        return;
    }
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// A running `clup lb`; killed when dropped.
pub struct Lb {
    pub child: Child,
    pub port: u16,
    pub mgr: u16,
    pub log: PathBuf,
}

pub struct LbArgs<'a> {
    pub args: Vec<String>,
    pub env: Vec<(&'a str, String)>,
    /// Wait until the management API answers `list` with this token.
    pub wait_token: Option<&'a str>,
}

impl Lb {
    pub fn start(backends: &[&Backend], extra: &[&str]) -> Lb {
        let mut args: Vec<String> = Vec::new();
        for b in backends {
            args.push("--backend".into());
            args.push(b.addr());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let lb = Lb::spawn(LbArgs {
            args,
            env: vec![("CSTLB_MGR_TOKEN", TOKEN.into())],
            wait_token: Some(TOKEN),
        });
        // The start-up probe connection went through a backend and closed:
        // it must not race with the test's own sessions for the ring.
        assert!(
            wait_until(Duration::from_secs(5), || {
                let s = lb.stats();
                let total: u64 = s["backends"]
                    .as_object()
                    .map(|m| m.values().filter_map(|b| b["total"].as_u64()).sum())
                    .unwrap_or(0);
                total >= 1 && lb.active() == 0
            }),
            "start-up probe not settled: {}",
            lb.stats()
        );
        lb
    }

    pub fn spawn(a: LbArgs) -> Lb {
        let port = free_port();
        let mgr = free_port();
        let dir = temp_dir("log");
        let log = dir.join("cstlb.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clup"));
        cmd.arg("lb")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--mgr=127.0.0.1:{mgr}"))
            .args(&a.args)
            .env_remove("CSTLB_MGR_TOKEN")
            .env_remove("CSTLB_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &a.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut lb = Lb {
            child,
            port,
            mgr,
            log,
        };
        let up = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(_)) = lb.child.try_wait() {
                return true;
            }
            let http_ok = match a.wait_token {
                Some(t) => lb.get(&format!("/backend/list?token={t}")).0 == 200,
                None => lb.get("/backend/list").0 != 0,
            };
            http_ok && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up && lb.child.try_wait().unwrap().is_none(),
            "cstlb did not start:\n{}",
            lb.log_text()
        );
        lb
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the management port: (status, body); status 0 = no answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://127.0.0.1:{}{path}", self.mgr), &[])
    }

    pub fn list(&self) -> serde_json::Value {
        let (st, body) = self.get(&format!("/backend/list?token={TOKEN}"));
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// `/backend/stats` data.
    pub fn stats(&self) -> serde_json::Value {
        let (st, body) = self.get(&format!("/backend/stats?token={TOKEN}"));
        assert_eq!(st, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"].clone()
    }

    /// Open proxied sessions over all backends.
    pub fn active(&self) -> u64 {
        let s = self.stats();
        s["backends"]
            .as_object()
            .map(|m| m.values().filter_map(|b| b["active"].as_u64()).sum())
            .unwrap_or(0)
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Open a session and ask which backend serves it; keep it open.
    pub fn who(&self) -> (String, TcpStream) {
        let mut s = self.connect();
        s.write_all(b"who\n").unwrap();
        let mut name = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            name.push(b[0]);
        }
        (String::from_utf8(name).unwrap(), s)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep the log of a failed test for the post-mortem.
        if !thread::panicking() {
            if let Some(d) = self.log.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

pub fn http_get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.call() {
        Ok(mut r) => {
            let st = r.status().as_u16();
            (st, r.body_mut().read_to_string().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Echo round trip on an open session.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).is_ok() && got == msg
}
