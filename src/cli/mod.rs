//! clupadm: the operator's tool. It talks to a running clupserver over HTTP
//! (`POST /admin/<command>`, password in a header) except for `init`, which
//! writes the meta store directly, and `log`, which follows the local log.
//!
//! Exit codes (also in clupadm(8)): 0 done; 1 refused or failed; 2 usage or
//! configuration error; 3 clupserver cannot be reached. stdout is what 1.x
//! printed, byte for byte: the banner line first (left out by `-q` and
//! `--json`), then the data, and "Can not connect clupserver: ..." when
//! clupserver cannot be reached; other errors go to stderr.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::model::config::Config;
use crate::model::home::Home;
use crate::model::meta::{self, Clusters};
use crate::model::report::{DelayRow, LsnRow};
use crate::store::{open_store, FileStore, MetaDoc, MetaStore, StoreError, Task};

mod events;
mod text;
pub use text::{delay_text, lsn_text, show_json, show_task_text, show_text, slots_text};

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

/// Every command, with the manual's one-line description, in the manual's order.
pub const COMMANDS: &[(&str, &str)] = &[
    ("init", " initialize cluster"),
    ("show", "list all database."),
    ("get_last_lsn", "get all database lsn."),
    ("repl_delay", "show replication delay."),
    ("log", "display log."),
    ("froze", "froze the HA."),
    ("repair", "repair fault node."),
    ("unfroze", "unfroze the HA."),
    ("switch", "switch primary database to another node"),
    (
        "change_meta",
        "change cluster meta data, it is dangerous, be careful!!!",
    ),
    ("get_meta", "get cluster meta info."),
    ("show_task", "show task information."),
    ("task_log", "show task log."),
];

/// Commands added since 1.x: in `--help` and clupadm(8), not in the
/// manual's usage text (which 1.x scripts may compare).
pub const EXTRA_COMMANDS: &[(&str, &str)] = &[(
    "events",
    "show the events clupserver recorded (state changes); -f follows.",
)];

/// The usage text clupadm prints when called without a command: the
/// manual's, word for word (1.x ran as `clup_adm.py`, and said so).
pub fn usage() -> String {
    let mut s = String::from(
        "usage: clup_adm.py <command> [options]\n    command can be one of the following:\n",
    );
    for (name, desc) in COMMANDS {
        s.push_str(&format!("      {name:<15} : {desc}\n"));
    }
    s
}

/// `clupadm --help`: the usage, then the options common to all commands.
pub fn help() -> String {
    let mut extra = String::new();
    for (name, desc) in EXTRA_COMMANDS {
        extra.push_str(&format!("      {name:<15} : {desc}\n"));
    }
    format!(
        "{}{extra}    common options: -c CLUSTER, --json (machine-readable output, no banner),\n    \
         -q/--quiet (no banner line), -h (help of a command)\n",
        usage().replacen("clup_adm.py", "clupadm", 1)
    )
}

/// Take the global `-q`/`--quiet` out of the arguments, wherever it is.
fn take_quiet(args: Vec<std::ffi::OsString>) -> (bool, Vec<std::ffi::OsString>) {
    let before = args.len();
    let rest: Vec<_> = args
        .into_iter()
        .filter(|a| a != "-q" && a != "--quiet")
        .collect();
    (rest.len() != before, rest)
}

/// A failed command: what to print and how to exit.
pub struct Failure {
    pub code: u8,
    pub msg: String,
}

fn fail(code: u8, msg: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
    }
}

impl From<lexopt::Error> for Failure {
    fn from(e: lexopt::Error) -> Failure {
        fail(EXIT_USAGE, e.to_string())
    }
}

/// Every option: canonical spelling, other spelling, value name, meaning.
/// clupadm(8) is tested against this table and [`ADM_OPTIONS`].
pub const OPTION_DOCS: &[(&str, &str, &str, &str)] = &[
    ("-c", "--cluster", "CLUSTER", "the cluster; may be left out when the meta holds only one"),
    ("-i", "--id", "ID", "the database id (db_list id)"),
    ("-t", "--task", "TASK_ID", "the task id, as show_task lists it"),
    ("-f", "--file", "FILE", "read from FILE instead of the default (init: conf/init.json; change_meta: standard input)"),
    ("-n", "--lines", "N", "how many lines of the log to show first (default 10)"),
    ("--json", "", "", "print JSON instead of the fixed-width table"),
    ("--force", "", "", "init: replace an existing meta (task records are kept)"),
    ("--rewind", "", "", "repair: run pg_rewind from the current primary first"),
    ("--rebuild", "", "", "repair: rebuild the node with pg_basebackup (the old data directory is moved aside, never deleted)"),
    ("--follow", "", "", "task_log: keep following the log until the task ends; events (also -f): print new events as they come, until interrupted"),
    ("--since", "", "SEQ", "events: only the events numbered above SEQ (default 0: every event kept)"),
    ("--no-follow", "", "", "log, repair, switch: print and return instead of following"),
];

/// The options each command accepts.
pub const ADM_OPTIONS: &[(&str, &[&str])] = &[
    ("init", &["-f", "--force"]),
    ("show", &["-c", "--json"]),
    ("get_last_lsn", &["-c", "--json"]),
    ("repl_delay", &["-c", "--json"]),
    ("log", &["-n", "--no-follow"]),
    ("froze", &["-c"]),
    (
        "repair",
        &["-c", "-i", "--rewind", "--rebuild", "--no-follow"],
    ),
    ("unfroze", &["-c"]),
    ("switch", &["-c", "-i", "--no-follow"]),
    ("change_meta", &["-c", "-f"]),
    ("get_meta", &["-c", "--json"]),
    ("show_task", &["-c", "--json"]),
    ("task_log", &["-t", "--follow"]),
    ("events", &["-c", "--since", "--follow", "--json"]),
];

/// Parsed options; each command reads only its own.
#[derive(Default)]
struct Opts {
    cluster: Option<String>,
    id: Option<u32>,
    task: Option<u64>,
    json: bool,
    file: Option<PathBuf>,
    force: bool,
    lines: Option<usize>,
    rewind: bool,
    rebuild: bool,
    follow: bool,
    no_follow: bool,
    since: Option<u64>,
}

fn number<T: std::str::FromStr>(p: &mut lexopt::Parser, what: &str) -> Result<T, Failure> {
    use lexopt::ValueExt;
    let v: String = p.value()?.string()?;
    v.parse()
        .map_err(|_| fail(EXIT_USAGE, format!("invalid {what} '{v}'")))
}

fn parse_opts(p: &mut lexopt::Parser, cmd: &str) -> Result<Opts, Failure> {
    use lexopt::prelude::*;
    let allowed = ADM_OPTIONS
        .iter()
        .find(|(c, _)| *c == cmd)
        .map_or(&[][..], |(_, o)| *o);
    let mut o = Opts::default();
    while let Some(arg) = p.next()? {
        let name = match &arg {
            Short(c) => format!("-{c}"),
            Long(l) => format!("--{l}"),
            Value(v) => {
                return Err(fail(
                    EXIT_USAGE,
                    format!("unexpected argument '{}'", v.to_string_lossy()),
                ))
            }
        };
        if name == "-h" || name == "--help" {
            return Err(fail(0, help()));
        }
        // As with tail -f: for events, -f follows (it reads no file).
        let name = if cmd == "events" && name == "-f" {
            "--follow".to_string()
        } else {
            name
        };
        let canonical = OPTION_DOCS
            .iter()
            .find(|(c, long, _, _)| *c == name || (!long.is_empty() && *long == name))
            .map(|(c, ..)| *c)
            .filter(|c| allowed.contains(c))
            .ok_or_else(|| fail(EXIT_USAGE, format!("invalid option '{name}' for {cmd}")))?;
        match canonical {
            "-c" => o.cluster = Some(p.value()?.string()?),
            "-i" => o.id = Some(number(p, "database id")?),
            "-t" => o.task = Some(number(p, "task id")?),
            "-f" => o.file = Some(PathBuf::from(p.value()?)),
            "-n" => o.lines = Some(number(p, "line count")?),
            "--json" => o.json = true,
            "--force" => o.force = true,
            "--rewind" => o.rewind = true,
            "--rebuild" => o.rebuild = true,
            "--follow" => o.follow = true,
            "--no-follow" => o.no_follow = true,
            "--since" => o.since = Some(number(p, "sequence number")?),
            _ => unreachable!("every OPTION_DOCS entry is handled"),
        }
    }
    Ok(o)
}

pub fn main(args: Vec<std::ffi::OsString>) -> ExitCode {
    let (quiet, args) = take_quiet(args);
    // The manual's banner heads every command, as the first line of stdout
    // (1.x scripts skip it with `tail -n +2`); JSON and -q go without it.
    let banner = !quiet && !args.iter().any(|a| a == "--json");
    let mut p = lexopt::Parser::from_args(args);
    let cmd = match p.next() {
        Ok(Some(lexopt::Arg::Value(v))) => v.to_string_lossy().into_owned(),
        Ok(Some(lexopt::Arg::Long("version") | lexopt::Arg::Short('V'))) => {
            println!("clup {}", crate::VERSION);
            return ExitCode::SUCCESS;
        }
        Ok(Some(lexopt::Arg::Long("help") | lexopt::Arg::Short('h'))) => {
            return emit(&with_banner(banner, &help()));
        }
        _ => {
            let _ = emit(&with_banner(banner, &usage()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if banner && emit(&with_banner(true, "")) != ExitCode::SUCCESS {
        return ExitCode::from(EXIT_FAILED);
    }
    let home = Home::discover();
    match run(&home, &cmd, &mut p) {
        Ok(out) => emit(&out),
        Err(f) if f.code == 0 => emit(&f.msg),
        // As 1.x printed it, on stdout: "Can not connect clupserver: [Errno 111] Connection refused".
        Err(f) if f.code == EXIT_UNREACHABLE => {
            let _ = emit(&format!("{}\n", f.msg.trim_end()));
            ExitCode::from(f.code)
        }
        Err(f) => {
            let _ = std::io::stdout().flush();
            eprintln!("clupadm: {}", f.msg.trim_end());
            ExitCode::from(f.code)
        }
    }
}

/// `text` after the banner line, when there is to be one.
fn with_banner(banner: bool, text: &str) -> String {
    if banner {
        format!("{}\n{text}", crate::banner())
    } else {
        text.to_string()
    }
}

/// Print to stdout; a closed pipe (`clupadm show | head -1`) is not an error.
fn emit(s: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clupadm: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Parse the command's options and run it; the text to print on success.
fn run(home: &Home, cmd: &str, p: &mut lexopt::Parser) -> Result<String, Failure> {
    match cmd {
        "init" => cmd_init(home, parse_opts(p, cmd)?),
        "log" => cmd_log(home, parse_opts(p, cmd)?),
        "show" => cmd_show(home, parse_opts(p, cmd)?),
        "get_meta" => cmd_get_meta(home, parse_opts(p, cmd)?),
        "change_meta" => cmd_change_meta(home, parse_opts(p, cmd)?),
        "froze" | "unfroze" => cmd_froze(home, cmd, parse_opts(p, cmd)?),
        "show_task" => cmd_show_task(home, parse_opts(p, cmd)?),
        "task_log" => cmd_task_log(home, parse_opts(p, cmd)?),
        "get_last_lsn" => cmd_get_last_lsn(home, parse_opts(p, cmd)?),
        "repl_delay" => cmd_repl_delay(home, parse_opts(p, cmd)?),
        "switch" | "repair" => cmd_switch_or_repair(home, cmd, parse_opts(p, cmd)?),
        "events" => events::cmd_events(home, parse_opts(p, cmd)?),
        other => Err(fail(
            EXIT_USAGE,
            format!("unknown command '{other}'\n{}", usage()),
        )),
    }
}

/// `init`: write the meta from init.json (or `-f`) into the store.
fn cmd_init(home: &Home, o: Opts) -> Result<String, Failure> {
    init(home, o.file.unwrap_or_else(|| home.init_json()), o.force)
}

/// `log`: print the last lines of clupserver's log, then follow it.
fn cmd_log(home: &Home, o: Opts) -> Result<String, Failure> {
    follow_log(&home.log_file(), o.lines.unwrap_or(10), !o.no_follow)?;
    Ok(String::new())
}

/// `show`: the databases of one cluster or all, as the manual's table or JSON.
fn cmd_show(home: &Home, o: Opts) -> Result<String, Failure> {
    let d = call(home, "show", json!({ "cluster": o.cluster }))?;
    let clusters: Clusters = field_of(&d, "clusters")?;
    // With etcd: which clupserver leads (absent with the file store,
    // where the manual's layout is left as it is).
    let monitor = d["monitor"].as_str();
    // With use_slots: the standbys' slots (absent otherwise, where the
    // manual's layout is left as it is).
    let slots: Option<Vec<crate::model::report::SlotRow>> = match d.get("slots") {
        Some(_) => Some(field_of(&d, "slots")?),
        None => None,
    };
    let text = || {
        let mut out = show_text(&clusters);
        if let Some(s) = &slots {
            out.push('\n');
            out.push_str(&slots_text(s));
        }
        out
    };
    Ok(match (o.json, monitor) {
        (true, m) => show_json(&clusters, m, slots.as_deref()),
        (false, None) => text(),
        (false, Some(m)) => format!("{}\nmonitor: {m}\n", text()),
    })
}

/// `get_meta`: the meta of one cluster or all, as pretty JSON.
fn cmd_get_meta(home: &Home, o: Opts) -> Result<String, Failure> {
    let clusters = fetch_clusters(home, o.cluster.as_deref(), "get_meta")?;
    let v = match &o.cluster {
        Some(c) => json!(clusters.get(c)),
        None => json!(clusters),
    };
    Ok(format!(
        "{}\n",
        serde_json::to_string_pretty(&v).expect("json")
    ))
}

/// `change_meta`: send a cluster's new meta, read from `-f` or stdin.
fn cmd_change_meta(home: &Home, o: Opts) -> Result<String, Failure> {
    let cluster = o
        .cluster
        .ok_or_else(|| fail(EXIT_USAGE, "change_meta needs -c CLUSTER"))?;
    let text = read_input(o.file.as_deref())?;
    let new: Value = serde_json::from_str(&text)
        .map_err(|e| fail(EXIT_USAGE, format!("the new meta is not valid JSON: {e}")))?;
    call(
        home,
        "change_meta",
        json!({"cluster": cluster, "meta": new}),
    )?;
    Ok(format!("Cluster({cluster}) meta changed.\n"))
}

/// `froze` and `unfroze` (`cmd`): change the cluster's state.
fn cmd_froze(home: &Home, cmd: &str, o: Opts) -> Result<String, Failure> {
    let d = call(home, cmd, json!({"cluster": o.cluster}))?;
    Ok(format!(
        "Cluster({}) {}.\n",
        d["cluster"].as_str().unwrap_or("?"),
        if cmd == "froze" { "frozen" } else { "unfrozen" }
    ))
}

/// `show_task`: the task records, as a table or JSON.
fn cmd_show_task(home: &Home, o: Opts) -> Result<String, Failure> {
    let d = call(home, "show_task", json!({ "cluster": o.cluster }))?;
    let tasks: Vec<Task> = field_of(&d, "tasks")?;
    Ok(if o.json {
        pretty(&json!({ "tasks": tasks }))
    } else {
        show_task_text(&tasks)
    })
}

/// `task_log`: a task's log, followed with `--follow`.
fn cmd_task_log(home: &Home, o: Opts) -> Result<String, Failure> {
    let id = o
        .task
        .ok_or_else(|| fail(EXIT_USAGE, "task_log needs -t TASK_ID"))?;
    follow_task(home, id, o.follow)
}

/// `get_last_lsn`: every database's LSN, as the manual's table or JSON.
fn cmd_get_last_lsn(home: &Home, o: Opts) -> Result<String, Failure> {
    let d = call(home, "get_last_lsn", json!({ "cluster": o.cluster }))?;
    let rows: Vec<LsnRow> = field_of(&d, "rows")?;
    Ok(if o.json { pretty(&d) } else { lsn_text(&rows) })
}

/// `repl_delay`: every standby's delay, as the manual's table or JSON.
fn cmd_repl_delay(home: &Home, o: Opts) -> Result<String, Failure> {
    let d = call(home, "repl_delay", json!({ "cluster": o.cluster }))?;
    let rows: Vec<DelayRow> = field_of(&d, "rows")?;
    Ok(if o.json {
        pretty(&d)
    } else {
        delay_text(&rows)
    })
}

/// `switch` and `repair` (`cmd`): start the task, print its id and follow
/// its log unless `--no-follow`.
fn cmd_switch_or_repair(home: &Home, cmd: &str, o: Opts) -> Result<String, Failure> {
    let id =
        o.id.ok_or_else(|| fail(EXIT_USAGE, format!("{cmd} needs -i ID")))?;
    if o.rewind && o.rebuild {
        return Err(fail(EXIT_USAGE, "choose one of --rewind and --rebuild"));
    }
    let mode = if o.rewind {
        "rewind"
    } else if o.rebuild {
        "rebuild"
    } else {
        "plain"
    };
    let d = call(
        home,
        cmd,
        json!({ "cluster": o.cluster, "id": id, "mode": mode }),
    )?;
    let task = d["task_id"].as_u64().unwrap_or(0);
    println!(
        "taskid={task}, task_name={}",
        d["task_name"].as_str().unwrap_or("")
    );
    if o.no_follow {
        return Ok(String::new());
    }
    follow_task(home, task, true)
}

fn read_input(file: Option<&Path>) -> Result<String, Failure> {
    let mut s = String::new();
    match file {
        None => std::io::stdin().read_to_string(&mut s).map(|_| ()),
        Some(p) if p == Path::new("-") => std::io::stdin().read_to_string(&mut s).map(|_| ()),
        Some(p) => std::fs::read_to_string(p).map(|t| s = t),
    }
    .map_err(|e| fail(EXIT_USAGE, format!("cannot read the new meta: {e}")))?;
    Ok(s)
}

fn init(home: &Home, file: PathBuf, force: bool) -> Result<String, Failure> {
    let clusters = meta::load_init_json(&file).map_err(|m| fail(EXIT_USAGE, m))?;
    home.ensure_dirs()
        .map_err(|e| fail(EXIT_FAILED, e.to_string()))?;
    let store = init_store(home)?;
    let base = match store.load() {
        Ok(existing) if !force => {
            return Err(fail(
                EXIT_FAILED,
                format!(
                    "cluster meta already exists ({}, version {}); use --force to overwrite it",
                    store.describe(),
                    existing.version
                ),
            ))
        }
        Ok(existing) => existing,
        Err(StoreError::Missing(_)) => MetaDoc::default(),
        Err(e @ StoreError::Corrupt(..)) if !force => {
            return Err(fail(EXIT_FAILED, format!("{e}; use --force to replace it")))
        }
        Err(StoreError::Corrupt(..)) => {
            // Replacing a corrupt meta: keep it aside, never delete it.
            store
                .set_aside_corrupt()
                .map_err(|e| fail(EXIT_FAILED, e.to_string()))?;
            MetaDoc::default()
        }
        Err(e) => return Err(fail(EXIT_FAILED, e.to_string())),
    };
    let n = clusters.len();
    let doc = MetaDoc { clusters, ..base };
    let v = store
        .save(&doc)
        .map_err(|e| fail(EXIT_FAILED, e.to_string()))?;
    Ok(format!(
        "Initialized {n} cluster(s) from {} into {} (version {v}).\n",
        file.display(),
        store.describe()
    ))
}

/// The store init writes: the one clup.conf names, or the file store when
/// there is no clup.conf yet (meta_store's default).
fn init_store(home: &Home) -> Result<Arc<dyn MetaStore>, Failure> {
    let conf = home.conf_file();
    if !conf.exists() {
        return Ok(Arc::new(FileStore::new(&home.data_dir())));
    }
    let cfg = Config::load(&conf).map_err(|e| fail(EXIT_USAGE, e.to_string()))?;
    open_store(&cfg, home).map_err(|m| fail(EXIT_USAGE, m))
}

/// POST an admin command to the local clupserver; the `data` of its answer.
pub fn call(home: &Home, cmd: &str, args: Value) -> Result<Value, Failure> {
    let cfg = Config::load(&home.conf_file()).map_err(|e| fail(EXIT_USAGE, e.to_string()))?;
    call_with(&cfg, cmd, args)
}

pub fn call_with(cfg: &Config, cmd: &str, args: Value) -> Result<Value, Failure> {
    let local = format!("127.0.0.1:{}", cfg.http_port);
    match post(cfg, &local, cmd, &args)? {
        Posted::Done(v) => Ok(v),
        // A follower (meta_store = etcd): ask the leader it names, once.
        Posted::Leader(leader, msg) => {
            eprintln!("clupadm: {msg}; asking it");
            match post(cfg, &leader, cmd, &args)? {
                Posted::Done(v) => Ok(v),
                Posted::Leader(_, msg) => Err(fail(EXIT_FAILED, msg)),
            }
        }
    }
}

/// What one clupserver answered.
enum Posted {
    Done(Value),
    /// It does not lead: the leader's `host:port`, and its message.
    Leader(String, String),
}

fn post(cfg: &Config, addr: &str, cmd: &str, args: &Value) -> Result<Posted, Failure> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(3)))
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{addr}/admin/{cmd}");
    let mut resp = agent
        .post(&url)
        .header("X-Clup-Pass", cfg.ha_rpc_pass.expose())
        .content_type("application/json")
        .send(args.to_string())
        .map_err(|e| {
            fail(
                EXIT_UNREACHABLE,
                format!("Can not connect clupserver: {}", reason(&e)),
            )
        })?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!("Can not connect clupserver: {}", reason(&e)),
        )
    })?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == 200 && v["ok"] == json!(true) {
        return Ok(Posted::Done(v["data"].clone()));
    }
    let msg = v["error"].as_str().unwrap_or("no reason given").to_string();
    if let (421, Some(leader)) = (status, v["leader"].as_str()) {
        return Ok(Posted::Leader(leader.to_string(), msg));
    }
    Err(match status {
        401 => fail(
            EXIT_FAILED,
            format!("clupserver refused: {msg} (check ha_rpc_pass in clup.conf)"),
        ),
        400 => fail(EXIT_USAGE, msg),
        _ => fail(EXIT_FAILED, msg),
    })
}

/// Why clupserver could not be reached, worded as 1.x (Python) worded
/// it: `[Errno 111] Connection refused`.
fn reason(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(io) => io_reason(io),
        other => other.to_string(),
    }
}

/// An I/O error as Python prints an OSError: `[Errno N] text`, without
/// Rust's ` (os error N)` suffix.
pub fn io_reason(io: &std::io::Error) -> String {
    let text = io.to_string();
    match io.raw_os_error() {
        Some(n) => {
            let suffix = format!(" (os error {n})");
            format!(
                "[Errno {n}] {}",
                text.strip_suffix(&suffix).unwrap_or(&text)
            )
        }
        None => text,
    }
}

/// `d[key]` of clupserver's answer as `T`.
fn field_of<T: serde::de::DeserializeOwned>(d: &Value, key: &str) -> Result<T, Failure> {
    serde_json::from_value(d[key].clone()).map_err(|e| {
        fail(
            EXIT_FAILED,
            format!("unexpected answer from clupserver: {e}"),
        )
    })
}

fn pretty(v: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).expect("json"))
}

fn fetch_clusters(home: &Home, cluster: Option<&str>, cmd: &str) -> Result<Clusters, Failure> {
    let d = call(home, cmd, json!({ "cluster": cluster }))?;
    field_of(&d, "clusters")
}

/// Print a task's log; with `follow`, keep printing until the task ends.
/// Fails (exit 1) when the task ended in failure.
pub fn follow_task(home: &Home, id: u64, follow: bool) -> Result<String, Failure> {
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let d = call(home, "task_log", json!({ "task": id, "offset": offset }))?;
        let text = d["text"].as_str().unwrap_or("");
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(String::new());
        }
        offset = d["offset"].as_u64().unwrap_or(offset);
        if d["more"] == json!(true) {
            continue;
        }
        let state = d["task"]["state"].as_str().unwrap_or("").to_string();
        if !follow || state != "running" {
            return match state.as_str() {
                "failed" | "interrupted" if follow => {
                    Err(fail(EXIT_FAILED, format!("task {id} {state}")))
                }
                _ => Ok(String::new()),
            };
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Print the last `lines` lines of the log, then follow it like `tail -f`
/// (surviving truncation and replacement) until interrupted.
fn follow_log(path: &Path, lines: usize, follow: bool) -> Result<(), Failure> {
    let open = || std::fs::File::open(path);
    let mut f = open().map_err(|e| fail(EXIT_FAILED, format!("{}: {e}", path.display())))?;
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| fail(EXIT_FAILED, format!("{}: {e}", path.display())))?;
    let all: Vec<&str> = text.lines().collect();
    let mut out = std::io::stdout().lock();
    if follow && writeln!(out, "tail -f {}", path.display()).is_err() {
        return Ok(());
    }
    for l in &all[all.len().saturating_sub(lines)..] {
        if writeln!(out, "{l}").is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    if !follow {
        return Ok(());
    }
    let mut pos = text.len() as u64;
    let mut buf = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Truncated or replaced: start over from its beginning.
            if let Ok(nf) = open() {
                f = nf;
            }
            pos = 0;
        }
        if f.seek(SeekFrom::Start(pos)).is_err() {
            continue;
        }
        buf.clear();
        if let Ok(n) = f.read_to_end(&mut buf) {
            pos += n as u64;
            if n > 0 && (out.write_all(&buf).is_err() || out.flush().is_err()) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_tables_agree() {
        for (cmd, _) in COMMANDS.iter().chain(EXTRA_COMMANDS) {
            assert!(
                ADM_OPTIONS.iter().any(|(c, _)| c == cmd),
                "{cmd} has no options entry"
            );
        }
        for (cmd, opts) in ADM_OPTIONS {
            assert!(
                COMMANDS.iter().chain(EXTRA_COMMANDS).any(|(c, _)| c == cmd),
                "{cmd}"
            );
            for o in *opts {
                assert!(
                    OPTION_DOCS.iter().any(|(c, ..)| c == o),
                    "{cmd} {o} undocumented"
                );
            }
        }
    }

    #[test]
    fn usage_lists_all_13_commands() {
        let u = usage();
        assert_eq!(COMMANDS.len(), 13);
        for (name, _) in COMMANDS {
            assert!(u.contains(&format!("      {name:<15} : ")), "{name}");
        }
        assert!(u.contains(
            "      change_meta     : change cluster meta data, it is dangerous, be careful!!!"
        ));
    }
}
