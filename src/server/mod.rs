//! clupserver: `start [-f] [-l LEVEL]`, `stop`, `status`.
//!
//! `start` checks everything it can while still attached to the terminal
//! (config, meta, pid lock), then double-forks; the terminal waits until the
//! daemon reports that its web server listens, so a failed start is a
//! non-zero exit with the reason, not a silent death. Signals are blocked
//! before any thread starts and received by the main thread with sigwait.

pub mod api;
pub mod daemon;
pub mod health;
pub mod metrics;
#[cfg(test)]
mod obs_routes;
pub mod status;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::model::config::Config;
use crate::model::home::Home;
use crate::monitor::{self, Shared};
use crate::store::MetaStore;
use crate::util::{http, signals};
use api::{Ctx, Req, MAX_BODY};
use daemon::Ready;

const USAGE: &str = "\
usage: clupserver <command> [options]
    command can be one of the following:
      start           : start the monitor (daemonizes)
          -f              stay in the foreground, log to stderr too
          -l LEVEL        log level: debug, info, warn or error
      stop            : stop the running monitor gracefully
      status          : tell whether the monitor is running (and, with
                        etcd, whether it leads)
    -q, --quiet       : stop, status: leave out the banner line
    clupserver --version | --help
";

pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let mut cmd: Option<String> = None;
    let mut foreground = false;
    let mut quiet = false;
    let mut level: Option<log::LevelFilter> = None;
    let res: Result<(), lexopt::Error> = (|| {
        while let Some(arg) = p.next()? {
            match arg {
                Short('f') | Long("foreground") => foreground = true,
                Short('q') | Long("quiet") => quiet = true,
                Short('l') | Long("log-level") => {
                    let v: String = p.value()?.string()?;
                    level = Some(match v.as_str() {
                        "debug" | "info" | "warn" | "error" => v.parse().expect("valid level"),
                        _ => return Err(format!("invalid log level '{v}'").into()),
                    });
                }
                Short('h') | Long("help") => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                Short('V') | Long("version") => {
                    println!("clup {}", crate::VERSION);
                    std::process::exit(0);
                }
                Value(v) if cmd.is_none() => cmd = Some(v.string()?),
                _ => return Err(arg.unexpected()),
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        eprintln!("clupserver: {e}\n{USAGE}");
        return ExitCode::from(2);
    }
    let home = Home::discover();
    match cmd.as_deref() {
        Some("start") => start(&home, foreground, level),
        Some("stop") => {
            preamble(&home, quiet);
            stop(&home)
        }
        Some("status") => {
            preamble(&home, quiet);
            status(&home)
        }
        Some(other) => {
            eprintln!("clupserver: unknown command '{other}'\n{USAGE}");
            ExitCode::from(2)
        }
        None => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// What 1.x's clupserver printed on stdout before `status` and `stop`: the
/// banner and the configuration loading, as log lines (`-q`: no banner).
/// A configuration that does not load is reported and does not keep
/// anyone from stopping or asking about a running server.
fn preamble(home: &Home, quiet: bool) {
    use crate::util::logging::format_line;
    use log::Level::Info;
    if !quiet {
        println!("{}", format_line(Info, &crate::banner()));
    }
    println!("{}", format_line(Info, "Start loading configuration ..."));
    match Config::load(&home.conf_file()) {
        Ok(_) => println!("{}", format_line(Info, "Complete configuration loading.")),
        Err(e) => eprintln!("clupserver: {e}"),
    }
}

fn status(home: &Home) -> ExitCode {
    match daemon::running_pid(&home.pid_file()) {
        Some(pid) => {
            println!("Program({pid}) is running.");
            // With etcd, whether it leads (written by its campaign thread).
            if let Ok(role) =
                std::fs::read_to_string(home.run_dir().join(crate::monitor::leader::ROLE_FILE))
            {
                println!("Role: {}", role.trim());
            }
            ExitCode::SUCCESS
        }
        None => {
            println!("Program is not running.");
            ExitCode::from(1)
        }
    }
}

/// How long `stop` waits for a graceful exit before giving up: the
/// manual's 20 s, more than the server's own [`STOP_GRACE`].
const STOP_WAIT_SECS: u64 = 20;

/// What `stop` prints every second while it waits: the manual's words,
/// with the whole wait.
pub fn stop_wait_line() -> String {
    format!("Wait {STOP_WAIT_SECS} second for program stopped...")
}

fn stop(home: &Home) -> ExitCode {
    let Some(pid) = daemon::running_pid(&home.pid_file()) else {
        println!("Program is not running.");
        return ExitCode::SUCCESS;
    };
    if !signals::signal(pid, libc::SIGTERM) {
        println!("Program stopped.");
        return ExitCode::SUCCESS;
    }
    for i in 0..STOP_WAIT_SECS * 10 {
        thread::sleep(Duration::from_millis(100));
        if daemon::running_pid(&home.pid_file()).is_none() {
            println!("Program stopped.");
            return ExitCode::SUCCESS;
        }
        if i % 10 == 9 {
            println!("{}", stop_wait_line());
        }
    }
    eprintln!("clupserver: program({pid}) did not stop within {STOP_WAIT_SECS} s");
    ExitCode::from(1)
}

fn start(home: &Home, foreground: bool, level: Option<log::LevelFilter>) -> ExitCode {
    // Everything that can fail for a reason the operator can fix is checked
    // here, before detaching, so the reason reaches the terminal.
    let cfg = match Config::load(&home.conf_file()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clupserver: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = home.ensure_dirs() {
        eprintln!("clupserver: {e}");
        return ExitCode::from(1);
    }
    if let Some(pid) = daemon::running_pid(&home.pid_file()) {
        eprintln!("Program({pid}) is already running.");
        return ExitCode::from(1);
    }
    let (store, gate) = match crate::monitor::leader::open(&cfg, home) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clupserver: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = store.load() {
        eprintln!("clupserver: {e}");
        return ExitCode::from(1);
    }
    let mut ready = if foreground {
        Ready::none()
    } else {
        match daemon::daemonize(&home.log_file()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("clupserver: cannot daemonize: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let _pid_lock = match daemon::lock_pid_file(&home.pid_file()) {
        Ok(l) => l,
        Err(m) => {
            ready.fail(&m);
            eprintln!("{m}");
            return ExitCode::from(1);
        }
    };
    let level = level.unwrap_or(cfg.log_level);
    if let Err(e) = crate::util::logging::init(Some(&home.log_file()), foreground, level) {
        ready.fail(&format!("clupserver: cannot open log: {e}"));
        return ExitCode::from(1);
    }
    let files = daemon::raise_fd_limit();
    log::debug!("open files limit: {files}");
    let sigset = signals::block_signals();
    match run(home, cfg, store, gate, &mut ready, &sigset) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            log::error!("{m}");
            ready.fail(&format!("clupserver: {m}"));
            ExitCode::from(1)
        }
    }
}

fn run(
    home: &Home,
    cfg: Config,
    store: Arc<dyn MetaStore>,
    gate: Arc<crate::monitor::leader::Gate>,
    ready: &mut Ready,
    sigset: &libc::sigset_t,
) -> Result<(), String> {
    log::info!("{}", crate::banner());
    log::info!("Start loading configuration ...");
    log::info!("Complete configuration loading.");
    log::info!("========== clup for PostgreSQL starting ==========");
    log::info!("Meta store: {}", store.describe());
    let stop = Arc::new(AtomicBool::new(false));

    // The lease is given back only after the probe threads stopped acting.
    let lead_stop = Arc::new(AtomicBool::new(false));
    let events = crate::monitor::events::Events::start(&cfg, &home.data_dir());
    let leader_thread = crate::monitor::leader::start(
        gate.clone(),
        lead_stop.clone(),
        home.run_dir(),
        events.clone(),
    );
    let monitor = Arc::new(
        Shared::new(cfg.clone(), home.clone(), store.clone())
            .with_gate(gate)
            .with_events(events.clone()),
    );
    log::info!("Start ha checking thread... ");
    let supervisor = monitor::start(&monitor);
    log::info!("Start health checking thread... ");
    log::info!("Complete the startup of health checking thread.");

    log::info!("Starting web server...");
    let addr = (cfg.http_listen, cfg.http_port);
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on {}:{}: {e}", addr.0, addr.1))?;
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        store: store.clone(),
        task_dir: home.task_dir(),
        monitor: Some(monitor.clone()),
    });
    let handler: Arc<http::Handler> = Arc::new(move |req| handle(req, &ctx));
    let web_stop = stop.clone();
    let web = thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || http::serve(listener, handler, MAX_BODY, &web_stop))
        .map_err(|e| format!("cannot start web server thread: {e}"))?;
    log::info!("Complete the startup of web server.");
    log::info!("Web Server at port {} ...", cfg.http_port);
    ready.ok();

    loop {
        let sig = signals::wait_signal(sigset);
        if sig == libc::SIGHUP {
            // logrotate's postrotate: the log was moved away.
            match crate::util::logging::reopen() {
                Ok(()) => {
                    log::info!("Received SIGHUP: log file reopened (restart to reload clup.conf).")
                }
                Err(e) => log::error!(
                    "Received SIGHUP: cannot reopen the log file, still writing the old one: {e}"
                ),
            }
            continue;
        }
        log::info!("Received signal {sig}, stopping ...");
        break;
    }
    stop.store(true, Ordering::SeqCst);
    monitor.stop.store(true, Ordering::SeqCst);
    // Let probe rounds and running steps finish, but not forever: an
    // overloaded server (or a step stuck on a dead host) must still stop. A
    // task cut short is marked interrupted and finished at the next start.
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    thread::spawn(move || {
        let _ = supervisor.join();
        lead_stop.store(true, Ordering::SeqCst);
        if let Some(l) = leader_thread {
            let _ = l.join();
        }
        let _ = web.join();
        let _ = done_tx.send(());
    });
    if done_rx.recv_timeout(STOP_GRACE).is_err() {
        log::warn!(
            "Some threads did not finish within {} s; stopping anyway (an interrupted task is finished at the next start).",
            STOP_GRACE.as_secs()
        );
    }
    // Numbers go on after a restart; hooks still queued are not run.
    events.shutdown();
    log::info!("Program stopped.");
    Ok(())
}

/// How long a stopping server waits for its threads.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Route one request; JSON answers unless the route answers text (e.g.
/// /metrics).
fn handle(req: http::Request, ctx: &Ctx) -> http::Response {
    let header = |name: &str| req.header(name);
    let resp = api::route(
        ctx,
        &Req {
            method: &req.method,
            url: &req.url,
            header: &header,
            body: &req.body,
        },
    );
    let (ctype, text) = resp
        .text
        .unwrap_or_else(|| ("application/json", resp.body.to_string()));
    http::Response::new(resp.status, ctype, text)
}
