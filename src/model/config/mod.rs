//! clup.conf: the one place where every key, its default and its meaning live.
//!
//! The file is `key = value` lines with `#` comments. Parsing is strict: an
//! unknown key, a duplicate, a missing required key or a bad value is an error
//! naming the file, the line and the key, and nothing starts. Secret values are
//! kept in [`Secret`], whose `Debug`/`Display` never show them, and no error
//! message ever echoes a value of a secret key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::model::ssl::{PgSsl, SslMode};

/// A password or token. Printing it shows `******`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The real value, for the one place that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("******")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("******")
    }
}

/// Compare two secrets in time independent of where they first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// What kind of value a key takes; drives validation and the man page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Secret,
    Ipv4,
    /// Whole seconds, at least 1.
    Seconds,
    /// Seconds with up to three decimals (0.5, 1, 2.25), from 0.1 up.
    Timeout,
    Port,
    /// A byte count; accepts kB, MB, GB suffixes (powers of 1024).
    Bytes,
    Count,
    LogLevel,
    MetaStore,
    /// async or block.
    SyncFallback,
    /// on or off.
    OnOff,
    /// Comma-separated `http://host:port` URLs.
    Endpoints,
    /// A libpq sslmode: disable, allow, prefer, require, verify-ca, verify-full.
    SslMode,
}

/// One clup.conf key. `default: None` means the key is required.
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// Every key clup.conf accepts. The man page clup.conf(5) is checked against
/// this table by a test, so add a key here and there together.
pub const KEYS: &[Key] = &[
    Key { name: "network", kind: Kind::Ipv4, default: None,
          doc: "Network of the database hosts, e.g. 192.168.0.0. A VIP is added on the interface whose address lies in this network (the prefix length is read from that interface); on a host with no address in it, on the interface that routes to the VIP, with a warning." },
    Key { name: "ha_rpc_pass", kind: Kind::Secret, default: None,
          doc: "Password between clupadm and clupserver." },
    Key { name: "probe_db_name", kind: Kind::Text, default: Some("cs_sys_ha"),
          doc: "Database holding cs_sys_heartbeat, updated on the primary by the write probe." },
    Key { name: "probe_user", kind: Kind::Text, default: None,
          doc: "Database user of the write probe." },
    Key { name: "probe_password", kind: Kind::Secret, default: None,
          doc: "Password of probe_user." },
    Key { name: "ha_db_user", kind: Kind::Text, default: None,
          doc: "Database user for reading status (LSNs, replication views); a superuser if pg_rewind is used." },
    Key { name: "ha_db_pass", kind: Kind::Secret, default: None,
          doc: "Password of ha_db_user." },
    Key { name: "db_repl_user", kind: Kind::Text, default: None,
          doc: "Replication user written into primary_conninfo." },
    Key { name: "db_repl_pass", kind: Kind::Secret, default: None,
          doc: "Password of db_repl_user." },
    Key { name: "probe_interval", kind: Kind::Seconds, default: Some("10"),
          doc: "Seconds between two health checks of every database." },
    Key { name: "lock_ttl", kind: Kind::Seconds, default: Some("30"),
          doc: "Longest time, in seconds, an operation such as a failover holds the cluster lock." },
    Key { name: "http_token", kind: Kind::Secret, default: None,
          doc: "Token required by clupserver's HTTP interface (get_lb_host, health and metrics endpoints)." },
    Key { name: "cstlb_token", kind: Kind::Secret, default: None,
          doc: "Token clupserver presents to the management port of every cstlb." },
    Key { name: "http_listen", kind: Kind::Ipv4, default: Some("0.0.0.0"),
          doc: "Address the HTTP and admin interface listens on." },
    Key { name: "http_port", kind: Kind::Port, default: Some("8080"),
          doc: "Port of the HTTP and admin interface; clupadm connects to it on 127.0.0.1." },
    Key { name: "probe_timeout", kind: Kind::Timeout, default: Some("1"),
          doc: "Seconds a check may wait for an answer before it counts as failed: a database probe (connect plus query), the host check's TCP connect to a host's ssh port and a standby's check that it reaches the primary (at most 1 s); decimals allowed (0.5). On a network that drops packets, more than 1 leaves room for a lost TCP SYN to be sent again." },
    Key { name: "probe_retries", kind: Kind::Count, default: Some("1"),
          doc: "Extra attempts, within the interval, before a failed probe counts; a database whose host failed the host check meanwhile gets none." },
    Key { name: "ssh_connect_timeout", kind: Kind::Timeout, default: Some("3"),
          doc: "Seconds ssh may take to log in to a database host that answers (ssh's own ConnectTimeout, this rounded up to whole seconds), and the DAD probe of a VIP (at most 1 s); decimals allowed (0.5)." },
    Key { name: "ssh_user", kind: Kind::Text, default: Some("root"),
          doc: "User clupserver logs in as on the database hosts." },
    Key { name: "ssh_options", kind: Kind::Text, default: Some(""),
          doc: "Extra ssh options, split on white space (e.g. -i /opt/clup/conf/id_ed25519 -o UserKnownHostsFile=/opt/clup/conf/known_hosts). They come first and win over clup's own (a ConnectTimeout here overrides ssh_connect_timeout)." },
    Key { name: "pg_bin_dir", kind: Kind::Text, default: Some(""),
          doc: "Directory of the PostgreSQL programs on the database hosts, when pg_ctl is not on os_user's PATH. Besides pg_ctl: pg_rewind of the server's major (repair --rewind), pg_basebackup of that major or newer (repair --rebuild), pg_controldata (switch; without it clup reads global/pg_control itself)." },
    Key { name: "pg_sslmode", kind: Kind::SslMode, default: Some("prefer"),
          doc: "TLS to PostgreSQL, with libpq's meanings: disable, allow (plain text, TLS if the server refuses plain text), prefer (TLS if the server offers it, else plain text), require (TLS, certificate not checked unless a root certificate file is given or found: then as verify-ca), verify-ca (TLS, certificate signed by a CA of pg_sslrootcert), verify-full (as verify-ca, and the certificate's subjectAltName names the host clup connects to). For every connection clup makes (probes, status queries, switch, repair) and written as sslmode= into the primary_conninfo of the standbys." },
    Key { name: "pg_sslrootcert", kind: Kind::Text, default: Some(""),
          doc: "PEM file of the CA certificates that sign the servers' certificates (verify-ca, verify-full; with require, makes it verify-ca). Empty: ~/.postgresql/root.crt of the user running clup, as libpq. When set, it is also written as sslrootcert= into primary_conninfo, so the same path must hold the CA file on the database hosts." },
    Key { name: "failover_max_lag", kind: Kind::Bytes, default: Some("16MB"),
          doc: "A standby further behind the primary's last known LSN than this is never promoted; 0 means no limit." },
    Key { name: "restart_tries", kind: Kind::Count, default: Some("3"),
          doc: "How often a database whose host is up is restarted in place before giving up." },
    Key { name: "hung_timeout", kind: Kind::Seconds, default: Some("20"),
          doc: "Seconds a primary may stall (it accepts TCP connections, its host answers ssh, but no new session gets an answer) before it is fenced (kill -9 of the postmaster and its children, over ssh) and failed over. A stalled server is never restarted: it is running. Far longer than a checkpoint or a burst of load delays a login, which takes milliseconds even then." },
    Key { name: "sync_fallback", kind: Kind::SyncFallback, default: Some("async"),
          doc: "When the standbys named in the primary's synchronous_standby_names do not acknowledge for 3 s (down, hung, cut off), every commit waits. async: the primary then names only the standbys that acknowledge (none: asynchronous), loudly logged and shown in /metrics (clup_sync_degraded), and the operator's setting is restored once enough of them acknowledge again. block: commits keep waiting, on purpose, and the log says so." },
    Key { name: "auto_rewind", kind: Kind::OnOff, default: Some("off"),
          doc: "on: a Fault standby that runs (left behind by a failover, its WAL past the new timeline, or back after an outage) is repaired with pg_rewind from the primary (repair --rewind) without an operator, at most every 10 minutes per node. off: it waits for repair." },
    Key { name: "use_slots", kind: Kind::OnOff, default: Some("off"),
          doc: "on: the primary keeps a physical replication slot for each standby (named after its repl_app_name, in [a-z0-9_]) and each standby streams through it (primary_slot_name beside primary_conninfo), so a standby that was stopped or cut off finds the WAL it needs when it comes back. Slots are made on a new primary before the standbys follow it (failover, switch, repair) and checked every few rounds; a failure to make one is logged and never stops a failover. off: clup neither makes nor drops slots (turning it off leaves the existing slots and primary_slot_name settings to the operator)." },
    Key { name: "slot_keep_time", kind: Kind::Seconds, default: Some("1800"),
          doc: "With use_slots: seconds a database may stay Fault before its slot on the primary is dropped (logged as an error), so that a dead standby cannot fill the primary's disk with WAL. It then needs repair --rebuild unless the WAL it needs is still there." },
    Key { name: "max_slot_wal_keep_size", kind: Kind::Bytes, default: Some(""),
          doc: "With use_slots: the primary's max_slot_wal_keep_size (PostgreSQL 13 and later; set with ALTER SYSTEM and a reload, in MB), the most WAL a slot may hold back before PostgreSQL gives it up. Empty: the server's own setting is left alone. On 9.5 to 12 the setting does not exist: logged once." },
    Key { name: "cstlb_timeout", kind: Kind::Seconds, default: Some("2"),
          doc: "Seconds a request to a cstlb management port may take." },
    Key { name: "log_level", kind: Kind::LogLevel, default: Some("info"),
          doc: "debug, info, warn or error." },
    Key { name: "meta_store", kind: Kind::MetaStore, default: Some("file"),
          doc: "Where the cluster meta lives: file (data/meta.json under the home) or etcd (the key <etcd_prefix>/meta in the etcd cluster at etcd_endpoints)." },
    Key { name: "etcd_endpoints", kind: Kind::Endpoints, default: Some(""),
          doc: "The etcd members, as http://host:port separated by commas; required when meta_store is etcd. Each request goes to the member that answered last, then to the others in order." },
    Key { name: "etcd_prefix", kind: Kind::Text, default: Some("/clup"),
          doc: "Prefix of clup's keys in etcd: the meta is <etcd_prefix>/meta, the leader key <etcd_prefix>/leader. Give each clup installation sharing an etcd its own prefix." },
    Key { name: "etcd_timeout", kind: Kind::Seconds, default: Some("2"),
          doc: "Seconds a request to one etcd member may take before the next member is tried (a request that may have been applied is not tried again)." },
    Key { name: "leader_ttl", kind: Kind::Seconds, default: Some("10"),
          doc: "Seconds of the etcd lease behind the leader key: a leader that cannot renew it stops acting before it expires, and another monitor may take over after it expires. At least 3 times etcd_timeout." },
    Key { name: "event_command", kind: Kind::Text, default: Some(""),
          doc: "Shell command run (sh -c, as the user running clupserver) for every event: fault, restart, failover_begin, failover_end, promote, fence, switch, repair, froze, unfroze, cstlb_change, leader_change. The details are in environment variables (CLUP_EVENT, CLUP_EVENT_SEQ, CLUP_CLUSTER, CLUP_DB_ID, CLUP_HOST, CLUP_OLD_PRIMARY, CLUP_NEW_PRIMARY, CLUP_REASON, CLUP_TIME), never on its command line. Hooks run one at a time, in order, on a thread of their own: a slow hook delays later hooks, never a failover. Their output is logged as 'Event hook' lines. Empty: no hook (events are still recorded and served by GET /events)." },
    Key { name: "event_timeout", kind: Kind::Seconds, default: Some("30"),
          doc: "Seconds an event_command may run; then its whole process group is killed and the next event's hook runs." },
];

/// Where the meta lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Etcd,
}

/// The parsed clup.conf.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub network: Ipv4Addr,
    pub ha_rpc_pass: Secret,
    pub probe_db_name: String,
    pub probe_user: String,
    pub probe_password: Secret,
    pub ha_db_user: String,
    pub ha_db_pass: Secret,
    pub db_repl_user: String,
    pub db_repl_pass: Secret,
    pub probe_interval: Duration,
    pub lock_ttl: Duration,
    pub http_token: Secret,
    pub cstlb_token: Secret,
    pub http_listen: Ipv4Addr,
    pub http_port: u16,
    pub probe_timeout: Duration,
    pub probe_retries: u32,
    pub ssh_connect_timeout: Duration,
    pub ssh_user: String,
    pub ssh_options: Vec<String>,
    pub pg_bin_dir: String,
    /// TLS to PostgreSQL (pg_sslmode, pg_sslrootcert).
    pub pg_ssl: PgSsl,
    pub failover_max_lag: u64,
    pub restart_tries: u32,
    pub hung_timeout: Duration,
    /// `sync_fallback = block` (else async).
    pub sync_block: bool,
    pub auto_rewind: bool,
    pub use_slots: bool,
    pub slot_keep_time: Duration,
    /// max_slot_wal_keep_size in bytes; None: leave the server's.
    pub max_slot_wal_keep_size: Option<u64>,
    pub cstlb_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub meta_store: StoreKind,
    /// Checked `http://host:port` URLs; empty unless set.
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub etcd_timeout: Duration,
    pub leader_ttl: Duration,
    /// Empty: no event hook.
    pub event_command: String,
    pub event_timeout: Duration,
}

/// A problem in clup.conf, with enough context to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key '{key}'")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Read and parse a clup.conf file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            msg: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parse clup.conf text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let seen = read_lines(text, path)?;
        let values = with_defaults(seen, path)?;
        for def in KEYS {
            let (line, v) = &values[def.name];
            check_value(def, v).map_err(|m| conf_err(path, *line, Some(def.name), m))?;
        }
        check_together(&values).map_err(|(k, m)| conf_err(path, values[k].0, Some(k), m))?;
        Ok(Config::from_values(&values, path))
    }

    /// The config from checked values: each converted to its type.
    fn from_values(values: &Values, path: &Path) -> Config {
        let get = |k: &str| values[k].1.clone();
        let secs = |k: &str| Duration::from_secs(get(k).parse::<u64>().unwrap_or(1));
        let timeout = |k: &str| parse_timeout(&get(k)).unwrap_or(Duration::from_secs(1));
        let count = |k: &str| get(k).parse::<u32>().unwrap_or(0);
        Config {
            path: path.to_path_buf(),
            network: get("network").parse().expect("checked"),
            ha_rpc_pass: Secret(get("ha_rpc_pass")),
            probe_db_name: get("probe_db_name"),
            probe_user: get("probe_user"),
            probe_password: Secret(get("probe_password")),
            ha_db_user: get("ha_db_user"),
            ha_db_pass: Secret(get("ha_db_pass")),
            db_repl_user: get("db_repl_user"),
            db_repl_pass: Secret(get("db_repl_pass")),
            probe_interval: secs("probe_interval"),
            lock_ttl: secs("lock_ttl"),
            http_token: Secret(get("http_token")),
            cstlb_token: Secret(get("cstlb_token")),
            http_listen: get("http_listen").parse().expect("checked"),
            http_port: get("http_port").parse().expect("checked"),
            probe_timeout: timeout("probe_timeout"),
            probe_retries: count("probe_retries"),
            ssh_connect_timeout: timeout("ssh_connect_timeout"),
            ssh_user: get("ssh_user"),
            ssh_options: get("ssh_options")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            pg_bin_dir: get("pg_bin_dir"),
            pg_ssl: PgSsl {
                mode: get("pg_sslmode").parse().expect("checked"),
                rootcert: get("pg_sslrootcert"),
            },
            failover_max_lag: parse_bytes(&get("failover_max_lag")).expect("checked"),
            restart_tries: count("restart_tries"),
            hung_timeout: secs("hung_timeout"),
            sync_block: get("sync_fallback") == "block",
            auto_rewind: get("auto_rewind") == "on",
            use_slots: get("use_slots") == "on",
            slot_keep_time: secs("slot_keep_time"),
            max_slot_wal_keep_size: parse_bytes(&get("max_slot_wal_keep_size")),
            cstlb_timeout: secs("cstlb_timeout"),
            log_level: get("log_level").parse().expect("checked"),
            meta_store: if get("meta_store") == "etcd" {
                StoreKind::Etcd
            } else {
                StoreKind::File
            },
            etcd_endpoints: match get("etcd_endpoints").as_str() {
                "" => Vec::new(),
                v => parse_endpoints(v).expect("checked"),
            },
            etcd_prefix: get("etcd_prefix"),
            etcd_timeout: secs("etcd_timeout"),
            leader_ttl: secs("leader_ttl"),
            event_command: get("event_command"),
            event_timeout: secs("event_timeout"),
        }
    }
}

/// The keys set in the text: line and raw value.
type Lines = BTreeMap<&'static str, (usize, String)>;

/// Every key's line (None for a default) and raw value.
type Values = BTreeMap<&'static str, (Option<usize>, String)>;

/// A [`ConfigError`] in `path`.
fn conf_err(path: &Path, line: Option<usize>, key: Option<&str>, msg: String) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line,
        key: key.map(str::to_string),
        msg,
    }
}

/// The `key = value` lines of the text: key -> (line, unquoted value).
/// Refuses a line without '=', an unknown key and a key set twice.
fn read_lines(text: &str, path: &Path) -> Result<Lines, ConfigError> {
    let err = |line: usize, key: Option<&str>, msg: String| conf_err(path, Some(line), key, msg);
    let mut seen = Lines::new();
    for (idx, raw) in text.lines().enumerate() {
        let lineno = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(err(lineno, None, "expected 'key = value'".to_string()));
        };
        let k = k.trim();
        let Some(def) = KEYS.iter().find(|d| d.name == k) else {
            return Err(err(lineno, Some(&clip(k)), "unknown key".to_string()));
        };
        if let Some((first, _)) = seen.get(def.name) {
            return Err(err(
                lineno,
                Some(k),
                format!("duplicate key (first set on line {first})"),
            ));
        }
        seen.insert(def.name, (lineno, unquote(v.trim()).to_string()));
    }
    Ok(seen)
}

/// Every key resolved to (line, value): the value set, else the default;
/// refuses a required key left out.
fn with_defaults(mut seen: Lines, path: &Path) -> Result<Values, ConfigError> {
    let mut values = Values::new();
    for def in KEYS {
        match (seen.remove(def.name), def.default) {
            (Some((line, v)), _) => {
                values.insert(def.name, (Some(line), v));
            }
            (None, Some(d)) => {
                values.insert(def.name, (None, d.to_string()));
            }
            (None, None) => {
                return Err(conf_err(
                    path,
                    None,
                    Some(def.name),
                    "required key is missing".to_string(),
                ))
            }
        }
    }
    Ok(values)
}

/// Rules between keys, each checked after every key alone is valid: the key
/// to blame and why.
fn check_together(values: &Values) -> Result<(), (&'static str, String)> {
    let get = |k: &str| values[k].1.as_str();
    if get("meta_store") != "etcd" {
        return Ok(());
    }
    if get("etcd_endpoints").is_empty() {
        return Err((
            "etcd_endpoints",
            "required when meta_store = etcd (e.g. http://10.0.0.1:2379,http://10.0.0.2:2379)"
                .to_string(),
        ));
    }
    let (ttl, timeout): (u64, u64) = (
        get("leader_ttl").parse().unwrap_or(0),
        get("etcd_timeout").parse().unwrap_or(0),
    );
    if ttl < 3 * timeout {
        return Err((
            "leader_ttl",
            format!(
                "{ttl} s is less than 3 times etcd_timeout ({timeout} s): \
                 a leader could lose its lease while one renewal times out"
            ),
        ));
    }
    Ok(())
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

/// Seconds with up to three decimals ("3", "0.5", "1.25"); no sign, no
/// exponent, no unit.
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 9 || frac.len() > 3 || !digits(whole) || !digits(frac) {
        return None;
    }
    if v.ends_with('.') {
        return None;
    }
    let ms: u64 = format!("{frac:0<3}").parse().ok()?;
    Some(Duration::from_millis(
        whole.parse::<u64>().ok()? * 1000 + ms,
    ))
}

/// Check one value against its kind. The message never repeats a secret.
fn check_value(def: &Key, v: &str) -> Result<(), String> {
    match def.kind {
        Kind::Text => check_text(def, v),
        Kind::Secret => {
            if v.is_empty() {
                return Err("must not be empty".to_string());
            }
            if v.chars().any(char::is_control) {
                return Err("must not contain control characters".to_string());
            }
            Ok(())
        }
        Kind::Ipv4 => v
            .parse::<Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| format!("invalid value {}: expected an IPv4 address", shown(def, v))),
        Kind::Seconds => match v.parse::<u64>() {
            Ok(n) if (1..=86_400).contains(&n) => Ok(()),
            _ => Err(format!(
                "invalid value {}: expected whole seconds from 1 to 86400",
                shown(def, v)
            )),
        },
        Kind::Timeout => match parse_timeout(v) {
            Some(d) if d >= Duration::from_millis(100) && d <= Duration::from_secs(86_400) => {
                Ok(())
            }
            _ => Err(format!(
                "invalid value {}: expected seconds from 0.1 to 86400, at most 3 decimals (e.g. 0.5)",
                shown(def, v)
            )),
        },
        Kind::Port => match v.parse::<u16>() {
            Ok(n) if n > 0 => Ok(()),
            _ => Err(format!(
                "invalid value {}: expected a port from 1 to 65535",
                shown(def, v)
            )),
        },
        Kind::Count => match v.parse::<u32>() {
            Ok(n) if n <= 100 => Ok(()),
            _ => Err(format!(
                "invalid value {}: expected a whole number from 0 to 100",
                shown(def, v)
            )),
        },
        Kind::Bytes if v.is_empty() && def.default == Some("") => Ok(()),
        Kind::Bytes => parse_bytes(v).map(|_| ()).ok_or_else(|| {
            format!(
                "invalid value {}: expected a byte count such as 16777216, 512kB, 16MB or 1GB",
                shown(def, v)
            )
        }),
        Kind::LogLevel => match v {
            "debug" | "info" | "warn" | "error" => Ok(()),
            _ => Err(format!(
                "invalid value {}: expected debug, info, warn or error",
                shown(def, v)
            )),
        },
        Kind::MetaStore => match v {
            "file" | "etcd" => Ok(()),
            _ => Err(format!("invalid value {}: expected file or etcd", shown(def, v))),
        },
        Kind::OnOff => match v {
            "on" | "off" => Ok(()),
            _ => Err(format!("invalid value {}: expected on or off", shown(def, v))),
        },
        Kind::SyncFallback => match v {
            "async" | "block" => Ok(()),
            _ => Err(format!("invalid value {}: expected async or block", shown(def, v))),
        },
        Kind::SslMode => v.parse::<SslMode>().map(|_| ()),
        Kind::Endpoints if v.is_empty() => Ok(()),
        Kind::Endpoints => parse_endpoints(v)
            .map(|_| ())
            .map_err(|m| format!("invalid value: {m}")),
    }
}

/// A value as an error message may show it: quoted and clipped, or
/// "(hidden)" for a secret.
fn shown(def: &Key, v: &str) -> String {
    if def.kind == Kind::Secret {
        "(hidden)".to_string()
    } else {
        format!("'{}'", clip(v))
    }
}

/// A [`Kind::Text`] value: set if required, no control characters, and the
/// form its key needs (a plain name, an etcd prefix, an absolute path).
fn check_text(def: &Key, v: &str) -> Result<(), String> {
    if def.default.is_none() && v.is_empty() {
        return Err("must not be empty".to_string());
    }
    if v.chars().any(char::is_control) {
        return Err("must not contain control characters".to_string());
    }
    if matches!(
        def.name,
        "probe_db_name" | "probe_user" | "ha_db_user" | "db_repl_user" | "ssh_user"
    ) && !is_plain_name(v)
    {
        return Err(format!(
            "invalid value {}: use letters, digits, '_' and '-' only",
            shown(def, v)
        ));
    }
    if def.name == "etcd_prefix" && (!is_safe_path(v) || v.contains("//")) {
        return Err(format!(
            "invalid value {}: must start with '/' and hold letters, digits, '/', '.', '_' and '-' only",
            shown(def, v)
        ));
    }
    if matches!(def.name, "pg_bin_dir" | "pg_sslrootcert") && !v.is_empty() && !is_safe_path(v) {
        return Err(format!(
            "invalid value {}: must be an absolute path of letters, digits, '/', '.', '_' and '-'",
            shown(def, v)
        ));
    }
    Ok(())
}

/// `16777216`, `512kB`, `16MB`, `1GB` (powers of 1024, as PostgreSQL counts).
pub fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Names that go into SQL identifiers or shell words: no quoting needed.
/// Outside text as it may appear in an error message: control characters
/// escaped (they could rewrite an operator's terminal) and at most 60
/// characters kept, so a hostile 1 MB name gives a short message.
pub fn clip(v: &str) -> String {
    let mut out = String::new();
    for (i, c) in v.chars().enumerate() {
        if i == 60 {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Letters, digits, '_' and '-', not starting with '-' (such a name, e.g.
/// ssh_user, could be read as a command option).
pub fn is_plain_name(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with('-')
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// An absolute path with no character a shell would treat specially.
pub fn is_safe_path(v: &str) -> bool {
    v.starts_with('/')
        && !v.contains("..")
        && v.len() <= 1024
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
}

#[cfg(test)]
pub(crate) const SAMPLE: &str = "\
# format: key = value
network=192.168.0.0
ha_rpc_pass = csha_cluster_pass
probe_db_name = cs_sys_ha
probe_user = postgres
probe_password = postgres
ha_db_user = postgres
ha_db_pass = postgres
db_repl_user = postgres
db_repl_pass = postgres
probe_interval = 10
lock_ttl = 30
http_token = 540cd628-d74e-11e7-992e-60f81dd129c2
cstlb_token = 8e722522-d733-11e7-93e8-60f81dd129c2
";

// ---------------------------------------------------------------- etcd endpoints

/// Check one endpoint as clup.conf gives it: `http://host:port`, nothing
/// more (no user, no path: there is nothing secret in an endpoint and
/// nothing to hide when it is shown). Returns it without a trailing `/`.
pub fn parse_endpoint(v: &str) -> Result<String, String> {
    if v.contains('@') {
        // Probably user:password@host: never echoed.
        return Err(
            "an endpoint with user@ is not supported (clup uses no etcd authentication)"
                .to_string(),
        );
    }
    let shown = clip(v);
    let Some(rest) = v.strip_prefix("http://") else {
        return Err(format!(
            "'{shown}' is not an http:// URL (https is not supported)"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("'{shown}' has no port (http://host:port)"));
    };
    let host_ok = if let Some(h) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        h.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && !host.starts_with('-')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    if !host_ok {
        return Err(format!("'{shown}' has no valid host (http://host:port)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{rest}")),
        _ => Err(format!(
            "'{shown}' has no valid port (http://host:port, port 1 to 65535)"
        )),
    }
}

/// A comma-separated list of endpoints; at least one, no duplicates.
pub fn parse_endpoints(v: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for part in v.split(',').map(str::trim) {
        if part.is_empty() {
            return Err("empty endpoint in the list (http://h1:2379,http://h2:2379)".to_string());
        }
        let e = parse_endpoint(part)?;
        if out.contains(&e) {
            return Err(format!("endpoint {e} is listed twice"));
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
