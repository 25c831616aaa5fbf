//! cstlb, the read load balancer: spreads client TCP connections round robin
//! over a cluster's healthy standbys.
//!
//! This module owns the command line, cstlb's defaults (below, with their
//! meaning: the one place for them), the start-up order and the shutdown:
//! signals are blocked before any thread starts and received here with
//! sigwait; SIGTERM/SIGINT stop the accepting, let open sessions drain for up
//! to `--drain-timeout`, then exit 0. It does not copy bytes ([`proxy`]),
//! judge health ([`ring`], fed by [`health`]), talk HTTP to clupserver
//! ([`clup`]) or serve the management API ([`mgmt`]).
//!
//! Tokens never come from the command line (ps shows it): CSTLB_TOKEN (for
//! clupserver) from the environment; the management token from
//! CSTLB_MGR_TOKEN, else `--mgr-token-file`, else clupserver's `cstlb_token`
//! (re-read on every refresh). Without any, the management API refuses all.

pub mod clup;
pub mod health;
pub mod mgmt;
pub mod proxy;
pub mod ring;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use crate::model::config::Secret;
use proxy::Shared;
use ring::{parse_backend, Addr, Ring};

/// Where clients connect (`--listen`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:5433";
/// The management API (`--mgr`), 8082 as in the manual.
pub const DEFAULT_MGR: &str = "0.0.0.0:8082";
/// Seconds between fetches of the backend list from clupserver (`--refresh`).
pub const DEFAULT_REFRESH: f64 = 5.0;
/// Seconds between health checks of each backend (`--check-interval`).
pub const DEFAULT_CHECK_INTERVAL: f64 = 2.0;
/// Seconds allowed for a TCP connect to a backend before the next one is
/// tried (`--connect-timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 1.0;
/// Seconds a session may stay silent both ways; 0 = forever (`--idle-timeout`).
pub const DEFAULT_IDLE_TIMEOUT: f64 = 0.0;
/// Seconds open sessions get to finish after SIGTERM (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: f64 = 10.0;
/// Bounded time for one request to clupserver.
const CLUP_TIMEOUT: Duration = Duration::from_secs(3);
const USAGE: &str = "\
usage: cstlb [options]
    Spreads client connections round robin over healthy PostgreSQL standbys.
    backends (one of):
      --clup URL              clupserver's get_lb_host URL, e.g.
                              http://mon:8080/cluster01/get_lb_host; needs env
                              CSTLB_TOKEN = clupserver's http_token
      --backend H:P           a backend (IPv4:port), repeatable; without --clup
                              the list is static (changed only by the API)
    options:
      --listen HOST:PORT      client address (default 0.0.0.0:5433)
      --mgr HOST:PORT         management API (default 0.0.0.0:8082)
      --mgr-token-file FILE   management token (env CSTLB_MGR_TOKEN wins;
                              default: clupserver's cstlb_token)
      --refresh SECS          clupserver refresh interval (default 5)
      --check-interval SECS   health check interval (default 2)
      --connect-timeout SECS  backend connect timeout (default 1)
      --idle-timeout SECS     close sessions silent this long (default 0 = never)
      --drain-timeout SECS    on SIGTERM, wait this long for sessions (default 10)
      --workers N             proxy threads (default: number of CPUs)
      -l, --log-level LEVEL   debug, info, warn or error (default info)
    cstlb --version | --help
";

#[derive(Debug)]
pub struct Opts {
    pub clup: Option<String>,
    pub backends: Vec<Addr>,
    pub listen: String,
    pub mgr: String,
    pub mgr_token_file: Option<PathBuf>,
    pub refresh: Duration,
    pub check_interval: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub workers: usize,
    pub level: log::LevelFilter,
}

fn secs(v: &str, name: &str, zero_ok: bool) -> Result<Duration, String> {
    let f: f64 = v
        .parse()
        .map_err(|_| format!("--{name}: '{v}' is not a number of seconds"))?;
    let ok = f.is_finite() && (0.0..=86_400.0).contains(&f) && (zero_ok || f >= 0.05);
    if !ok {
        let least = if zero_ok { "0" } else { "0.05" };
        return Err(format!(
            "--{name}: '{v}' must be between {least} and 86400 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(f))
}

/// Parse the command line (without the program name).
pub fn parse_args(args: Vec<OsString>) -> Result<Option<Opts>, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let workers = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut o = Opts {
        clup: None,
        backends: Vec::new(),
        listen: DEFAULT_LISTEN.into(),
        mgr: DEFAULT_MGR.into(),
        mgr_token_file: None,
        refresh: Duration::from_secs_f64(DEFAULT_REFRESH),
        check_interval: Duration::from_secs_f64(DEFAULT_CHECK_INTERVAL),
        connect_timeout: Duration::from_secs_f64(DEFAULT_CONNECT_TIMEOUT),
        idle_timeout: None,
        drain_timeout: Duration::from_secs_f64(DEFAULT_DRAIN_TIMEOUT),
        workers,
        level: log::LevelFilter::Info,
    };
    let err = |e: lexopt::Error| e.to_string();
    while let Some(arg) = p.next().map_err(err)? {
        let val = |p: &mut lexopt::Parser| -> Result<String, String> {
            p.value().map_err(err)?.string().map_err(err)
        };
        match arg {
            Long("clup") => {
                let u = val(&mut p)?;
                if !u.starts_with("http://") {
                    return Err(format!("--clup: '{u}' must be an http:// URL"));
                }
                o.clup = Some(u);
            }
            Long("backend") => {
                let b = val(&mut p)?;
                let a = parse_backend(&b).map_err(|e| format!("--backend '{b}': {e}"))?;
                if !o.backends.contains(&a) {
                    o.backends.push(a);
                }
            }
            Long("listen") => o.listen = val(&mut p)?,
            Long("mgr") => o.mgr = val(&mut p)?,
            Long("mgr-token-file") => o.mgr_token_file = Some(val(&mut p)?.into()),
            Long("refresh") => o.refresh = secs(&val(&mut p)?, "refresh", false)?,
            Long("check-interval") => {
                o.check_interval = secs(&val(&mut p)?, "check-interval", false)?
            }
            Long("connect-timeout") => {
                o.connect_timeout = secs(&val(&mut p)?, "connect-timeout", false)?
            }
            Long("idle-timeout") => {
                let d = secs(&val(&mut p)?, "idle-timeout", true)?;
                o.idle_timeout = (!d.is_zero()).then_some(d);
            }
            Long("drain-timeout") => o.drain_timeout = secs(&val(&mut p)?, "drain-timeout", true)?,
            Long("workers") => {
                let v = val(&mut p)?;
                o.workers = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or(format!("--workers: '{v}' must be 1 to 256"))?;
            }
            Short('l') | Long("log-level") => {
                let v = val(&mut p)?;
                o.level = match v.as_str() {
                    "debug" | "info" | "warn" | "error" => v.parse().map_err(|_| "bad level")?,
                    _ => return Err(format!("invalid log level '{v}'")),
                };
            }
            Long("token") | Long("mgr-token") => {
                return Err(
                    "tokens are not taken on the command line (ps shows it): use env \
                     CSTLB_TOKEN / CSTLB_MGR_TOKEN or --mgr-token-file"
                        .into(),
                )
            }
            Short('h') | Long("help") => return Ok(None),
            Short('V') | Long("version") => {
                println!("cstlb (clup) {}", crate::VERSION);
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    if o.clup.is_none() && o.backends.is_empty() {
        return Err("give --clup URL or at least one --backend H:P".into());
    }
    Ok(Some(o))
}

pub fn main(args: Vec<OsString>) -> ExitCode {
    let o = match parse_args(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cstlb: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let clup_token = std::env::var("CSTLB_TOKEN").ok().filter(|t| !t.is_empty());
    if o.clup.is_some() && clup_token.is_none() {
        eprintln!("cstlb: --clup needs env CSTLB_TOKEN (clupserver's http_token)");
        return ExitCode::from(2);
    }
    let fixed_token = match mgr_token(&o) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cstlb: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = crate::util::logging::init(None, true, o.level) {
        eprintln!("cstlb: cannot start logging: {e}");
        return ExitCode::from(1);
    }
    let sigset = crate::util::signals::block_signals();
    match run(o, clup_token.map(Secret::new), fixed_token, &sigset) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            log::error!("{m}");
            ExitCode::from(1)
        }
    }
}

/// The management token from the environment or the token file, with where
/// it came from (for the log).
fn mgr_token(o: &Opts) -> Result<Option<(Secret, String)>, String> {
    if let Some(t) = std::env::var("CSTLB_MGR_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Ok(Some((Secret::new(t), "env CSTLB_MGR_TOKEN".into())));
    }
    let Some(f) = &o.mgr_token_file else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(f).map_err(|e| format!("--mgr-token-file {}: {e}", f.display()))?;
    let t = text.trim();
    if t.is_empty() || t.contains('\n') {
        return Err(format!(
            "--mgr-token-file {}: must hold one token on one line",
            f.display()
        ));
    }
    Ok(Some((Secret::new(t), format!("file {}", f.display()))))
}

fn resolve(addr: &str, what: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{what} '{addr}': {e}"))?
        .next()
        .ok_or(format!("{what} '{addr}': no address"))
}

/// Let thousands of sessions (two fds each) in: soft fd limit up to the hard one.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            if r.rlim_cur < r.rlim_max {
                r.rlim_cur = r.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
            return r.rlim_cur;
        }
    }
    0
}

/// The two listening sockets, bound before any thread starts.
struct Sockets {
    listen: SocketAddr,
    listener: TcpListener,
    mgr_addr: SocketAddr,
    /// The management API's listener (served by [`crate::util::http`]).
    mgr: TcpListener,
    /// The soft fd limit after raising it (for the log).
    fds: u64,
}

/// The started threads and what stops them.
struct Running {
    /// Dropped to tell the management, health and refresh threads to stop.
    stop_tx: Sender<()>,
    wakers: Vec<proxy::Waker>,
    workers: Vec<JoinHandle<()>>,
    threads: Vec<JoinHandle<()>>,
}

/// cstlb from start to stop: bind, start the threads, wait for SIGTERM or
/// SIGINT, drain.
fn run(
    o: Opts,
    clup_token: Option<Secret>,
    fixed_token: Option<(Secret, String)>,
    sigset: &libc::sigset_t,
) -> Result<(), String> {
    log::info!("{}", crate::banner());
    log::info!("cstlb starting ...");
    let sockets = bind_sockets(&o)?;
    let shared = new_shared(&o);
    let token_from_clup = fixed_token.is_none();
    let mgr_token = fixed_token.as_ref().map(|(t, _)| t.clone());
    log_token_source(
        fixed_token.as_ref().map(|(_, from)| from.as_str()),
        o.clup.is_some(),
    );
    // check_tx lives until run returns: the health thread also stops once
    // every sender is gone.
    let (check_tx, check_rx) = crossbeam_channel::bounded::<()>(1);
    let mgmt = Arc::new(mgmt::Mgmt {
        shared: shared.clone(),
        token: Mutex::new(mgr_token),
        check_now: check_tx.clone(),
    });

    // First list from clupserver before taking clients, if it answers.
    if let (Some(url), Some(tok)) = (&o.clup, &clup_token) {
        refresh_once(url, tok, &shared, &mgmt, token_from_clup, true);
    }

    if mgmt
        .token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none()
        && o.clup.is_some()
    {
        log::warn!(
            "No management token yet (no answer from clupserver): the management API \
             refuses every request until clupserver gives one."
        );
    }

    let running = start_threads(
        &o,
        clup_token,
        &sockets,
        &shared,
        &mgmt,
        check_rx,
        token_from_clup,
    )?;
    log::info!(
        "cstlb listening on {} with {} proxy thread(s), management API on {}, \
         health checks every {} s, fd limit {}.",
        sockets.listen,
        o.workers,
        sockets.mgr_addr,
        o.check_interval.as_secs_f64(),
        sockets.fds
    );

    wait_for_stop(sigset, o.drain_timeout);
    shut_down(&shared, sockets, running);
    log::info!("cstlb stopped.");
    Ok(())
}

/// Raise the fd limit, then bind the client listener and the management API.
fn bind_sockets(o: &Opts) -> Result<Sockets, String> {
    let fds = raise_fd_limit();
    let listen = resolve(&o.listen, "--listen")?;
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    proxy::prepare_listener(&listener).map_err(|e| format!("listener {listen}: {e}"))?;
    let mgr_addr = resolve(&o.mgr, "--mgr")?;
    let mgr = TcpListener::bind(mgr_addr)
        .map_err(|e| format!("cannot listen on {mgr_addr} (management API): {e}"))?;
    Ok(Sockets {
        listen,
        listener,
        mgr_addr,
        mgr,
        fds,
    })
}

/// The state the proxy workers share, its ring holding the `--backend`s.
fn new_shared(o: &Opts) -> Arc<Shared> {
    let shared = Arc::new(Shared {
        ring: Mutex::new(Ring::new()),
        stop: AtomicBool::new(false),
        listening: AtomicUsize::new(o.workers),
        connect_timeout: o.connect_timeout,
        idle_timeout: o.idle_timeout,
        drain_timeout: o.drain_timeout,
    });
    {
        let mut ring = shared.ring.lock().unwrap_or_else(|p| p.into_inner());
        for &b in &o.backends {
            ring.add(b);
        }
    }
    shared
}

/// Log where the management token comes from: `fixed_from` names the
/// environment or file, else clupserver's answers (with `--clup`), else none.
fn log_token_source(fixed_from: Option<&str>, with_clup: bool) {
    match fixed_from {
        Some(from) => log::info!("Management token from {from}."),
        None if with_clup => {
            log::info!("Management token: the cstlb_token of clupserver's answer.")
        }
        None => log::warn!(
            "No management token (set CSTLB_MGR_TOKEN, --mgr-token-file or use --clup): \
             the management API refuses every request."
        ),
    }
}

/// Start a named thread.
fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

/// Start the management API threads, the health checker, the refresh from
/// clupserver (with `--clup`) and the proxy workers, in that order.
fn start_threads(
    o: &Opts,
    clup_token: Option<Secret>,
    sockets: &Sockets,
    shared: &Arc<Shared>,
    mgmt: &Arc<mgmt::Mgmt>,
    check_rx: Receiver<()>,
    token_from_clup: bool,
) -> Result<Running, String> {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let mut threads = Vec::new();
    {
        let mgr = sockets
            .mgr
            .try_clone()
            .map_err(|e| format!("management API: {e}"))?;
        let (m, sh) = (mgmt.clone(), shared.clone());
        // Not joined at shutdown: the process's exit closes the port at
        // once (a cstlb restarted right away must be able to bind it).
        drop(spawn("mgr".into(), move || mgmt::serve(mgr, m, &sh.stop))?);
    }
    {
        let (sh, s, iv) = (shared.clone(), stop_rx.clone(), o.check_interval);
        threads.push(spawn("health".into(), move || {
            health::run(sh, iv, check_rx, s)
        })?);
    }
    if let (Some(url), Some(tok)) = (o.clup.clone(), clup_token) {
        let (sh, m, s, every) = (shared.clone(), mgmt.clone(), stop_rx.clone(), o.refresh);
        threads.push(spawn("refresh".into(), move || {
            refresh_loop(&url, &tok, &sh, &m, token_from_clup, every, &s)
        })?);
    }
    let mut wakers = Vec::new();
    let mut workers = Vec::new();
    for i in 0..o.workers {
        let (w, waker) = proxy::Worker::new(i, sockets.listener.as_raw_fd(), shared.clone())
            .map_err(|e| format!("cannot start proxy worker: {e}"))?;
        wakers.push(waker);
        workers.push(spawn(format!("proxy-{i}"), move || w.run())?);
    }
    Ok(Running {
        stop_tx,
        wakers,
        workers,
        threads,
    })
}

/// Block until SIGTERM or SIGINT (SIGHUP is logged and ignored).
fn wait_for_stop(sigset: &libc::sigset_t, drain_timeout: Duration) {
    loop {
        let sig = crate::util::signals::wait_signal(sigset);
        if sig == libc::SIGHUP {
            log::info!("Received SIGHUP; ignored.");
            continue;
        }
        log::info!(
            "Received signal {sig}: no new connections; draining open sessions (up to {} s) ...",
            drain_timeout.as_secs_f64()
        );
        break;
    }
}

/// Stop accepting, close the listener, stop the other threads and wait for
/// every thread; the workers end once their sessions drained.
fn shut_down(shared: &Shared, sockets: Sockets, running: Running) {
    let Sockets { listener, mgr, .. } = sockets;
    let Running {
        stop_tx,
        wakers,
        workers,
        threads,
    } = running;
    shared.stop.store(true, Ordering::SeqCst);
    for w in &wakers {
        w.wake();
    }
    // Close the listener once no worker polls it, so new clients are
    // refused at once instead of waiting in the backlog.
    let t0 = Instant::now();
    while shared.listening.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(5));
    }
    drop(listener);
    drop(stop_tx);
    // The management thread sees `shared.stop` within half a second.
    drop(mgr);
    for w in workers {
        let _ = w.join();
    }
    for t in threads {
        let _ = t.join();
    }
}

fn refresh_once(
    url: &str,
    tok: &Secret,
    shared: &Shared,
    m: &mgmt::Mgmt,
    token_from_clup: bool,
    first: bool,
) -> bool {
    match clup::fetch(url, tok, CLUP_TIMEOUT) {
        Ok(h) => {
            let changes = shared
                .ring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reconcile(&h.backends);
            for c in &changes {
                log::info!("{c}");
            }
            if first {
                log::info!(
                    "clupserver lists {} backend(s) for cluster {}.",
                    h.backends.len(),
                    h.cluster
                );
            }
            if token_from_clup {
                let mut t = m.token.lock().unwrap_or_else(|p| p.into_inner());
                if h.mgr_token.is_some() && *t != h.mgr_token {
                    log::info!("Management token set from clupserver's answer.");
                    *t = h.mgr_token;
                } else if h.mgr_token.is_none() && t.is_some() {
                    log::warn!("clupserver's answer has no cstlb_token; keeping the last one.");
                }
            }
            if !changes.is_empty() {
                let _ = m.check_now.try_send(());
            }
            true
        }
        Err(e) => {
            let n = shared
                .ring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .addrs()
                .len();
            log::warn!("Can not get backends from clupserver: {e}; keeping the current {n}.");
            false
        }
    }
}

fn refresh_loop(
    url: &str,
    tok: &Secret,
    shared: &Shared,
    m: &mgmt::Mgmt,
    token_from_clup: bool,
    every: Duration,
    stop: &Receiver<()>,
) {
    loop {
        select! {
            recv(stop) -> _ => return,
            default(every) => {}
        }
        refresh_once(url, tok, shared, m, token_from_clup, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_line() {
        let o = parse_args(args(&[
            "--backend",
            "127.0.0.1:5432",
            "--backend=127.0.0.2:5432",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(o.backends.len(), 2);
        assert_eq!(o.listen, DEFAULT_LISTEN);
        assert_eq!(o.mgr, DEFAULT_MGR);
        assert_eq!(o.refresh, Duration::from_secs(5));
        assert_eq!(o.check_interval, Duration::from_secs(2));
        assert_eq!(o.idle_timeout, None);
        assert_eq!(o.drain_timeout, Duration::from_secs(10));
        let o = parse_args(args(&[
            "--clup=http://127.0.0.1:8080/c/get_lb_host",
            "--check-interval",
            "0.5",
            "--idle-timeout",
            "30",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(o.check_interval, Duration::from_millis(500));
        assert_eq!(o.idle_timeout, Some(Duration::from_secs(30)));
        assert!(parse_args(args(&["--help"])).unwrap().is_none());
        for bad in [
            &[][..],
            &["--backend", "pg01:5432"],
            &["--backend", "10.0.0.1:5432", "--token", "x"],
            &["--clup", "https://x/c/get_lb_host"],
            &["--backend", "10.0.0.1:5432", "--refresh", "0"],
            &["--backend", "10.0.0.1:5432", "--workers", "0"],
            &["--backend", "10.0.0.1:5432", "--idle-timeout", "-1"],
            &["--backend", "10.0.0.1:5432", "--check-interval", "NaN"],
            &["--backend", "10.0.0.1:5432", "extra"],
        ] {
            assert!(parse_args(args(bad)).is_err(), "{bad:?}");
        }
    }
}
