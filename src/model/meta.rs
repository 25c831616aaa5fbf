//! Cluster meta: the clusters, their databases and their states, as init.json
//! describes them and as the meta store keeps them.
//!
//! This module owns the types and their validation. It does no I/O besides
//! reading an init.json file; storing is `store`'s job, deciding is `ha`'s.
//! Validation is field by field so that every error names the cluster, the db
//! id and the field, and every value that later reaches a shell or SQL
//! (os_user, pgdata, host, VIP, repl_app_name) is restricted to characters that
//! need no quoting.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::config::{clip, is_plain_name, is_safe_path};

pub const DB_NORMAL: u8 = 1;
pub const DB_FAULT: u8 = 2;

pub const CLUSTER_NORMAL: u8 = 0;
pub const CLUSTER_FROZEN: u8 = 1;
/// The cluster lost its primary and no standby was safe to promote.
pub const CLUSTER_FAULT: u8 = 2;

/// One database of a cluster, as in init.json's `db_list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Db {
    pub id: u32,
    pub state: u8,
    pub os_user: String,
    pub pgdata: String,
    pub is_primary: u8,
    pub repl_app_name: String,
    pub host: String,
    pub switch_host: String,
    pub port: u16,
}

impl Db {
    /// `host:port`, the name used in logs and by cstlb.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
    pub fn is_primary(&self) -> bool {
        self.is_primary == 1
    }
    pub fn is_normal(&self) -> bool {
        self.state == DB_NORMAL
    }
}

/// One cluster, as in init.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub write_vip: String,
    pub read_vip: String,
    pub cstlb_list: Vec<String>,
    pub state: u8,
    /// Epoch seconds until which the cluster lock is held; 0 when free.
    pub lock_time: u64,
    /// Who holds the lock (e.g. "failover task 12"); empty when free.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lock_holder: String,
    pub read_vip_host: String,
    pub db_list: Vec<Db>,
    /// The primary's synchronous_standby_names as the operator set it,
    /// kept while clup names fewer standbys because the others do not
    /// acknowledge (`sync_fallback = async`); empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sync_wanted: String,
}

impl Cluster {
    pub fn primary(&self) -> Option<&Db> {
        self.db_list.iter().find(|d| d.is_primary())
    }
    pub fn db(&self, id: u32) -> Option<&Db> {
        self.db_list.iter().find(|d| d.id == id)
    }
    pub fn db_mut(&mut self, id: u32) -> Option<&mut Db> {
        self.db_list.iter_mut().find(|d| d.id == id)
    }
    pub fn is_frozen(&self) -> bool {
        self.state == CLUSTER_FROZEN
    }
    /// Normal standbys, in id order: what cstlb should balance over.
    pub fn normal_standbys(&self) -> impl Iterator<Item = &Db> {
        self.db_list
            .iter()
            .filter(|d| !d.is_primary() && d.is_normal())
    }
}

pub fn cluster_state_name(state: u8) -> &'static str {
    match state {
        CLUSTER_NORMAL => "Normal",
        CLUSTER_FROZEN => "Frozen",
        CLUSTER_FAULT => "Fault",
        _ => "Unknown",
    }
}

pub fn db_state_name(state: u8) -> &'static str {
    match state {
        DB_NORMAL => "Normal",
        DB_FAULT => "Fault",
        _ => "Unknown",
    }
}

/// All clusters by name (sorted, so output and files are stable).
pub type Clusters = BTreeMap<String, Cluster>;

/// A validation problem, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaError {
    pub cluster: Option<String>,
    pub db_id: Option<String>,
    pub field: Option<String>,
    pub msg: String,
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(c) = &self.cluster {
            parts.push(format!("cluster '{c}'"));
        }
        if let Some(d) = &self.db_id {
            parts.push(format!("db {d}"));
        }
        if let Some(k) = &self.field {
            parts.push(format!("field '{k}'"));
        }
        if parts.is_empty() {
            f.write_str(&self.msg)
        } else {
            write!(f, "{}: {}", parts.join(", "), self.msg)
        }
    }
}

impl std::error::Error for MetaError {}

struct Ctx<'a> {
    cluster: Option<&'a str>,
    db: Option<String>,
}

impl Ctx<'_> {
    /// Names come from the input (a cluster or field name may be anything),
    /// so they are clipped before they reach a message.
    fn err(&self, field: Option<&str>, msg: impl Into<String>) -> MetaError {
        MetaError {
            cluster: self.cluster.map(clip),
            db_id: self.db.as_deref().map(clip),
            field: field.map(clip),
            msg: msg.into(),
        }
    }

    fn field<T: DeserializeOwned>(
        &self,
        obj: &Map<String, Value>,
        name: &str,
        what: &str,
    ) -> Result<T, MetaError> {
        let v = obj
            .get(name)
            .ok_or_else(|| self.err(Some(name), "missing"))?;
        serde_json::from_value(v.clone())
            .map_err(|_| self.err(Some(name), format!("expected {what}, found {}", kind_of(v))))
    }
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.len() <= 40 && !s.chars().any(char::is_control) => {
            format!("the string \"{s}\"")
        }
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

const CLUSTER_FIELDS: &[&str] = &[
    "write_vip",
    "read_vip",
    "cstlb_list",
    "state",
    "lock_time",
    "lock_holder",
    "sync_wanted",
    "read_vip_host",
    "db_list",
];
/// `vip` appears in one of the manual's db_list examples; accepted and ignored.
const DB_FIELDS: &[&str] = &[
    "id",
    "state",
    "os_user",
    "pgdata",
    "is_primary",
    "repl_app_name",
    "host",
    "switch_host",
    "port",
    "vip",
];

/// Parse and validate init.json (or change_meta input) text.
pub fn parse_clusters(text: &str) -> Result<Clusters, MetaError> {
    let top: Value = serde_json::from_str(text).map_err(|e| MetaError {
        cluster: None,
        db_id: None,
        field: None,
        msg: format!("not valid JSON: {e}"),
    })?;
    clusters_from_value(&top)
}

/// Read init.json from a file; errors are prefixed with the file name.
pub fn load_init_json(path: &Path) -> Result<Clusters, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    parse_clusters(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn clusters_from_value(top: &Value) -> Result<Clusters, MetaError> {
    let none = Ctx {
        cluster: None,
        db: None,
    };
    let Value::Object(top) = top else {
        return Err(none.err(None, "expected an object of clusters by name"));
    };
    if top.is_empty() {
        return Err(none.err(None, "no cluster defined"));
    }
    let mut out = Clusters::new();
    for (name, v) in top {
        let ctx = Ctx {
            cluster: Some(name),
            db: None,
        };
        if !is_cluster_name(name) {
            return Err(ctx.err(
                None,
                "invalid cluster name: use 1 to 63 letters, digits, '_', '-' or '.'",
            ));
        }
        let Value::Object(obj) = v else {
            return Err(ctx.err(None, "expected an object"));
        };
        let cluster = parse_cluster(&ctx, obj)?;
        validate_cluster(name, &cluster)?;
        out.insert(name.clone(), cluster);
    }
    Ok(out)
}

fn parse_cluster(ctx: &Ctx, obj: &Map<String, Value>) -> Result<Cluster, MetaError> {
    for k in obj.keys() {
        if !CLUSTER_FIELDS.contains(&k.as_str()) {
            return Err(ctx.err(Some(k), "unknown field"));
        }
    }
    let Some(Value::Array(dbs)) = obj.get("db_list") else {
        return Err(ctx.err(Some("db_list"), "missing or not a list"));
    };
    let mut db_list = Vec::new();
    for (i, v) in dbs.iter().enumerate() {
        let id = v
            .get("id")
            .map(|id| id.to_string())
            .unwrap_or_else(|| format!("#{} (no id)", i + 1));
        let dctx = Ctx {
            cluster: ctx.cluster,
            db: Some(id),
        };
        let Value::Object(o) = v else {
            return Err(dctx.err(None, "expected an object"));
        };
        db_list.push(parse_db(&dctx, o)?);
    }
    Ok(Cluster {
        write_vip: ctx.field(obj, "write_vip", "an IPv4 address string")?,
        read_vip: ctx.field(obj, "read_vip", "an IPv4 address string")?,
        cstlb_list: ctx.field(obj, "cstlb_list", "a list of \"host:port\" strings")?,
        state: ctx.field(obj, "state", "0 (Normal), 1 (Frozen) or 2 (Fault)")?,
        lock_time: if obj.contains_key("lock_time") {
            ctx.field(obj, "lock_time", "a whole number of epoch seconds")?
        } else {
            0
        },
        lock_holder: if obj.contains_key("lock_holder") {
            ctx.field(obj, "lock_holder", "a string")?
        } else {
            String::new()
        },
        read_vip_host: ctx.field(obj, "read_vip_host", "an IPv4 address string")?,
        db_list,
        sync_wanted: if obj.contains_key("sync_wanted") {
            ctx.field(obj, "sync_wanted", "a synchronous_standby_names string")?
        } else {
            String::new()
        },
    })
}

fn parse_db(ctx: &Ctx, o: &Map<String, Value>) -> Result<Db, MetaError> {
    for k in o.keys() {
        if !DB_FIELDS.contains(&k.as_str()) {
            return Err(ctx.err(Some(k), "unknown field"));
        }
    }
    Ok(Db {
        id: ctx.field(o, "id", "a positive whole number")?,
        state: ctx.field(o, "state", "1 (Normal) or 2 (Fault)")?,
        os_user: ctx.field(o, "os_user", "a user name string")?,
        pgdata: ctx.field(o, "pgdata", "an absolute path string")?,
        is_primary: ctx.field(o, "is_primary", "0 or 1")?,
        repl_app_name: ctx.field(o, "repl_app_name", "a name string")?,
        host: ctx.field(o, "host", "an IPv4 address string")?,
        switch_host: ctx.field(o, "switch_host", "an IPv4 address string")?,
        port: ctx.field(o, "port", "a port number from 1 to 65535")?,
    })
}

pub fn is_cluster_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_ipv4(s: &str) -> bool {
    s.parse::<Ipv4Addr>().is_ok()
}

/// `host:port` with an IPv4 host (cstlb management addresses).
pub fn parse_host_port(s: &str) -> Option<(Ipv4Addr, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port: u16 = p.parse().ok().filter(|p| *p > 0)?;
    Some((h.parse().ok()?, port))
}

/// Check a cluster's invariants. Used for init.json, change_meta and before
/// every save, so the store never holds a cluster that breaks them.
pub fn validate_cluster(name: &str, c: &Cluster) -> Result<(), MetaError> {
    let ctx = Ctx {
        cluster: Some(name),
        db: None,
    };
    validate_cluster_fields(&ctx, c)?;
    let mut seen = Seen::default();
    for d in &c.db_list {
        let dctx = Ctx {
            cluster: Some(name),
            db: Some(d.id.to_string()),
        };
        validate_db(&dctx, c, d, &mut seen)?;
    }
    validate_db_roles(&ctx, c)
}

/// The cluster's own fields: VIPs, read_vip_host, cstlb_list, state, and
/// that it lists a database at all.
fn validate_cluster_fields(ctx: &Ctx, c: &Cluster) -> Result<(), MetaError> {
    for (field, v) in [("write_vip", &c.write_vip), ("read_vip", &c.read_vip)] {
        if !is_ipv4(v) {
            return Err(ctx.err(
                Some(field),
                format!("invalid IPv4 address \"{}\"", short(v)),
            ));
        }
    }
    if c.write_vip == c.read_vip {
        return Err(ctx.err(Some("read_vip"), "must differ from write_vip"));
    }
    if !c.read_vip_host.is_empty() && !is_ipv4(&c.read_vip_host) {
        return Err(ctx.err(Some("read_vip_host"), "invalid IPv4 address"));
    }
    for s in &c.cstlb_list {
        if parse_host_port(s).is_none() {
            return Err(ctx.err(
                Some("cstlb_list"),
                format!("invalid entry \"{}\": expected IPv4:port", short(s)),
            ));
        }
    }
    if !matches!(c.state, CLUSTER_NORMAL | CLUSTER_FROZEN | CLUSTER_FAULT) {
        return Err(ctx.err(
            Some("state"),
            "expected 0 (Normal), 1 (Frozen) or 2 (Fault)",
        ));
    }
    if c.db_list.is_empty() {
        return Err(ctx.err(Some("db_list"), "no database listed"));
    }
    Ok(())
}

/// What the databases checked so far use, which the next must not repeat.
#[derive(Default)]
struct Seen<'a> {
    ids: BTreeSet<u32>,
    names: BTreeSet<&'a str>,
    addrs: BTreeSet<(&'a str, u16)>,
}

/// One database's fields, and that its id, repl_app_name and address are
/// not in `seen` (then recorded there). The uniqueness checks sit between
/// the field checks, in the order that decides which error a meta with
/// several faults gets.
fn validate_db<'a>(
    dctx: &Ctx,
    c: &Cluster,
    d: &'a Db,
    seen: &mut Seen<'a>,
) -> Result<(), MetaError> {
    if d.id == 0 {
        return Err(dctx.err(Some("id"), "must be 1 or more"));
    }
    if !seen.ids.insert(d.id) {
        return Err(dctx.err(Some("id"), "duplicate id"));
    }
    if !matches!(d.state, DB_NORMAL | DB_FAULT) {
        return Err(dctx.err(Some("state"), "expected 1 (Normal) or 2 (Fault)"));
    }
    if d.is_primary > 1 {
        return Err(dctx.err(Some("is_primary"), "expected 0 or 1"));
    }
    if !is_os_user(&d.os_user) {
        return Err(dctx.err(
            Some("os_user"),
            "invalid user name: lower-case letters, digits, '_' and '-', starting with a letter or '_'",
        ));
    }
    if !is_safe_path(&d.pgdata) {
        return Err(dctx.err(
            Some("pgdata"),
            "must be an absolute path of letters, digits, '/', '.', '_' and '-'",
        ));
    }
    if !is_repl_name(&d.repl_app_name) {
        return Err(dctx.err(
            Some("repl_app_name"),
            "invalid name: lower-case letters, digits and '_', at most 63",
        ));
    }
    if !seen.names.insert(d.repl_app_name.as_str()) {
        return Err(dctx.err(Some("repl_app_name"), "duplicate repl_app_name"));
    }
    if !is_ipv4(&d.host) {
        return Err(dctx.err(
            Some("host"),
            format!("invalid IPv4 address \"{}\"", short(&d.host)),
        ));
    }
    if !is_ipv4(&d.switch_host) {
        return Err(dctx.err(
            Some("switch_host"),
            format!("invalid IPv4 address \"{}\"", short(&d.switch_host)),
        ));
    }
    if d.port == 0 {
        return Err(dctx.err(Some("port"), "must be from 1 to 65535"));
    }
    if !seen.addrs.insert((d.host.as_str(), d.port)) {
        return Err(dctx.err(Some("host"), format!("{} is listed twice", d.addr())));
    }
    if d.host == c.write_vip || d.host == c.read_vip {
        return Err(dctx.err(Some("host"), "must not be a VIP of the cluster"));
    }
    Ok(())
}

/// Across the databases: exactly one primary, and read_vip_host (if set) is
/// one of their hosts.
fn validate_db_roles(ctx: &Ctx, c: &Cluster) -> Result<(), MetaError> {
    let primaries = c.db_list.iter().filter(|d| d.is_primary()).count();
    if primaries != 1 {
        return Err(ctx.err(
            Some("is_primary"),
            format!("exactly one database must have is_primary 1, found {primaries}"),
        ));
    }
    if !c.read_vip_host.is_empty() && !c.db_list.iter().any(|d| d.host == c.read_vip_host) {
        return Err(ctx.err(
            Some("read_vip_host"),
            format!(
                "{} is not the host of any database of the cluster",
                c.read_vip_host
            ),
        ));
    }
    Ok(())
}

fn short(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).take(40).collect();
    clean
}

fn is_os_user(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 32
        && is_plain_name(s)
        && s.chars().all(|c| !c.is_ascii_uppercase())
}

fn is_repl_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
pub(crate) const SAMPLE_INIT: &str = r#"{
    "cluster01": {
        "write_vip": "192.168.56.40",
        "read_vip": "192.168.56.45",
        "cstlb_list": ["192.168.56.43:8082", "192.168.56.44:8082"],
        "state": 0,
        "lock_time": 0,
        "read_vip_host": "192.168.56.41",
        "db_list": [
            {"id": 1, "state": 1, "os_user": "postgres", "pgdata": "/home/postgres/pgdata",
             "is_primary": 1, "repl_app_name": "stb41", "host": "192.168.56.41",
             "switch_host": "192.168.56.41", "port": 5432},
            {"id": 2, "state": 1, "os_user": "postgres", "pgdata": "/home/postgres/pgdata",
             "is_primary": 0, "repl_app_name": "stb42", "host": "192.168.56.42",
             "switch_host": "192.168.56.42", "port": 5432},
            {"id": 3, "state": 1, "os_user": "postgres", "pgdata": "/home/postgres/pgdata",
             "is_primary": 0, "repl_app_name": "stb43", "host": "192.168.56.43",
             "switch_host": "192.168.56.43", "port": 5432},
            {"id": 4, "state": 1, "os_user": "postgres", "pgdata": "/home/postgres/pgdata",
             "is_primary": 0, "repl_app_name": "stb44", "host": "192.168.56.44",
             "switch_host": "192.168.56.44", "port": 5432}
        ]
    }
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl Fn(&mut Value)) -> Result<Clusters, MetaError> {
        let mut v: Value = serde_json::from_str(SAMPLE_INIT).unwrap();
        edit(&mut v);
        clusters_from_value(&v)
    }

    fn db(v: &mut Value, i: usize) -> &mut Value {
        &mut v["cluster01"]["db_list"][i]
    }

    #[test]
    fn manual_sample_is_valid() {
        let c = parse_clusters(SAMPLE_INIT).unwrap();
        let c1 = &c["cluster01"];
        assert_eq!(c1.db_list.len(), 4);
        assert_eq!(c1.primary().unwrap().id, 1);
        assert_eq!(
            c1.normal_standbys().map(|d| d.id).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(c1.db(3).unwrap().addr(), "192.168.56.43:5432");
    }

    #[test]
    fn legacy_vip_field_is_accepted() {
        with(|v| db(v, 1)["vip"] = "192.168.0.45".into()).unwrap();
    }

    #[test]
    fn errors_name_cluster_db_and_field() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| db(v, 1)["port"] = "5432x".into()),
             "cluster 'cluster01', db 2, field 'port': expected a port number from 1 to 65535, found the string \"5432x\""),
            (Box::new(|v| db(v, 2)["id"] = 2.into()),
             "cluster 'cluster01', db 2, field 'id': duplicate id"),
            (Box::new(|v| db(v, 3)["repl_app_name"] = "stb42".into()),
             "cluster 'cluster01', db 4, field 'repl_app_name': duplicate repl_app_name"),
            (Box::new(|v| db(v, 1)["is_primary"] = 1.into()),
             "cluster 'cluster01', field 'is_primary': exactly one database must have is_primary 1, found 2"),
            (Box::new(|v| db(v, 0)["is_primary"] = 0.into()),
             "cluster 'cluster01', field 'is_primary': exactly one database must have is_primary 1, found 0"),
            (Box::new(|v| db(v, 1)["pgdata"] = "pgdata".into()),
             "cluster 'cluster01', db 2, field 'pgdata': must be an absolute path of letters, digits, '/', '.', '_' and '-'"),
            (Box::new(|v| db(v, 1)["pgdata"] = "/data/$(reboot)".into()),
             "cluster 'cluster01', db 2, field 'pgdata': must be an absolute path of letters, digits, '/', '.', '_' and '-'"),
            (Box::new(|v| db(v, 1)["os_user"] = "postgres;id".into()),
             "cluster 'cluster01', db 2, field 'os_user': invalid user name: lower-case letters, digits, '_' and '-', starting with a letter or '_'"),
            (Box::new(|v| db(v, 1)["host"] = "10.0.0.1`id`".into()),
             "cluster 'cluster01', db 2, field 'host': invalid IPv4 address \"10.0.0.1`id`\""),
            (Box::new(|v| db(v, 1)["prot"] = 5432.into()),
             "cluster 'cluster01', db 2, field 'prot': unknown field"),
            (Box::new(|v| { db(v, 1).as_object_mut().unwrap().remove("switch_host"); }),
             "cluster 'cluster01', db 2, field 'switch_host': missing"),
            (Box::new(|v| v["cluster01"]["write_vip"] = "192.168.56.45".into()),
             "cluster 'cluster01', field 'read_vip': must differ from write_vip"),
            (Box::new(|v| v["cluster01"]["cstlb_list"][0] = "pg03".into()),
             "cluster 'cluster01', field 'cstlb_list': invalid entry \"pg03\": expected IPv4:port"),
            (Box::new(|v| v["cluster01"]["read_vip_host"] = "192.168.56.99".into()),
             "cluster 'cluster01', field 'read_vip_host': 192.168.56.99 is not the host of any database of the cluster"),
            (Box::new(|v| db(v, 2)["host"] = "192.168.56.42".into()),
             "cluster 'cluster01', db 3, field 'host': 192.168.56.42:5432 is listed twice"),
            (Box::new(|v| db(v, 2)["state"] = 3.into()),
             "cluster 'cluster01', db 3, field 'state': expected 1 (Normal) or 2 (Fault)"),
            (Box::new(|v| db(v, 2)["repl_app_name"] = "stb 43\n".into()),
             "cluster 'cluster01', db 3, field 'repl_app_name': invalid name: lower-case letters, digits and '_', at most 63"),
        ];
        for (edit, want) in cases {
            let e = with(edit).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn top_level_shape_errors() {
        assert!(parse_clusters("[]")
            .unwrap_err()
            .msg
            .contains("expected an object"));
        assert!(parse_clusters("{}").unwrap_err().msg.contains("no cluster"));
        assert!(parse_clusters("{\"a\":")
            .unwrap_err()
            .msg
            .contains("not valid JSON"));
        let e = parse_clusters(&SAMPLE_INIT.replace("\"cluster01\"", "\"bad name\"")).unwrap_err();
        assert_eq!(e.cluster.as_deref(), Some("bad name"));
    }

    #[test]
    fn round_trips_through_serde() {
        let c = parse_clusters(SAMPLE_INIT).unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(parse_clusters(&text).unwrap(), c);
    }
}
