//! `GET /metrics`: the meta, the monitor's last observations and its
//! counters in the Prometheus text exposition format (version 0.0.4).
//!
//! [`render`] is a pure function of plain data (no clock, no locks); the
//! router glue ([`serve`]) takes the snapshot. Each metric name gets its
//! `# HELP`/`# TYPE` once, even with no series; a series is never written
//! twice; label values are escaped (`\` `"` newline) as the format requires.
//! Series about a database's probe (reachable, lag, probe duration) appear
//! only once the monitor has observed it (a frozen cluster is not probed).
//!
//! Token: like every program endpoint, /metrics needs `http_token`, given as
//! `Authorization: Bearer <token>` (Prometheus' `authorization` /
//! `bearer_token_file` scrape settings), `X-Clup-Token: <token>`, or
//! `?token=<token>`. A wrong or missing token gets 401 and no data: the
//! series name every host, port and cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::model::meta::{self, Clusters};
use crate::monitor::{Counters, Observed};
use crate::server::api::{self, Ctx, Req, Resp};

/// The Content-Type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value as the exposition format quotes it.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn secs(ms: u64) -> String {
    format!("{}", ms as f64 / 1000.0)
}

/// One metric name with its samples (label set, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, String)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }
    fn add(&mut self, labels: String, value: impl ToString) {
        self.samples.push((labels, value.to_string()));
    }
    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        let mut seen = BTreeSet::new();
        for (l, v) in &self.samples {
            if seen.insert(l) {
                let _ = writeln!(out, "{}{l} {v}", self.name);
            }
        }
    }
}

/// The whole scrape. `now` is epoch seconds (for the cluster lock).
pub fn render(
    clusters: &Clusters,
    observed: &BTreeMap<String, Observed>,
    counters: &Counters,
    now: u64,
) -> String {
    let mut out = String::new();
    let families = std::iter::once(build_family())
        .chain(cluster_families(clusters, observed, now))
        .chain(db_families(clusters, observed))
        .chain(counter_families(counters));
    for f in families {
        f.write(&mut out);
    }
    out
}

/// `clup_build_info`: the version as a label.
fn build_family() -> Family {
    let mut build = Family::new("clup_build_info", "gauge", "clup version, always 1.");
    build.add(labels(&[("version", crate::VERSION)]), 1);
    build
}

/// The per-cluster families, in scrape order: state, frozen, lock and, once
/// observed, the last probe round's time and duration.
fn cluster_families(
    clusters: &Clusters,
    observed: &BTreeMap<String, Observed>,
    now: u64,
) -> [Family; 6] {
    let mut c_state = Family::new(
        "clup_cluster_state",
        "gauge",
        "Cluster state from the meta: 0 Normal, 1 Frozen, 2 Fault.",
    );
    let mut c_frozen = Family::new(
        "clup_cluster_frozen",
        "gauge",
        "1 when the cluster is frozen (the monitor does not probe or act).",
    );
    let mut c_lock = Family::new(
        "clup_cluster_lock_held",
        "gauge",
        "1 while an operation holds the cluster lock.",
    );
    let mut c_at = Family::new(
        "clup_cluster_last_probe_timestamp_seconds",
        "gauge",
        "When the monitor last finished a probe round of the cluster (epoch seconds).",
    );
    let mut c_round = Family::new(
        "clup_cluster_round_duration_seconds",
        "gauge",
        "How long the last probe round of the cluster took, actions included.",
    );
    let mut c_sync = Family::new(
        "clup_sync_degraded",
        "gauge",
        "1 while clup names fewer synchronous standbys than the operator set, because the others do not acknowledge (sync_fallback = async).",
    );
    for (name, c) in clusters {
        let cl = labels(&[("cluster", name)]);
        c_state.add(cl.clone(), c.state);
        c_sync.add(cl.clone(), u8::from(!c.sync_wanted.is_empty()));
        c_frozen.add(cl.clone(), u8::from(c.state == meta::CLUSTER_FROZEN));
        c_lock.add(cl.clone(), u8::from(c.lock_time > now));
        if let Some(o) = observed.get(name) {
            c_at.add(cl.clone(), o.at);
            c_round.add(cl, secs(o.round_ms));
        }
    }
    [c_state, c_frozen, c_lock, c_sync, c_at, c_round]
}

/// The per-database families, in scrape order: role and state from the
/// meta, then reachable, lag and probe duration once observed.
fn db_families(clusters: &Clusters, observed: &BTreeMap<String, Observed>) -> [Family; 5] {
    let mut d_role = Family::new(
        "clup_db_role",
        "gauge",
        "1 for the primary, 0 for a standby, from the meta.",
    );
    let mut d_state = Family::new(
        "clup_db_state",
        "gauge",
        "Database state from the meta: 1 Normal, 2 Fault.",
    );
    let mut d_up = Family::new(
        "clup_db_reachable",
        "gauge",
        "1 when the last probe of the database succeeded.",
    );
    let mut d_lag = Family::new(
        "clup_db_lag_bytes",
        "gauge",
        "Standby: the primary's WAL position minus the standby's replay position, last probe.",
    );
    let mut d_dur = Family::new(
        "clup_db_probe_duration_seconds",
        "gauge",
        "How long the last probe of the database took.",
    );
    for (name, c) in clusters {
        let obs = observed.get(name);
        for d in &c.db_list {
            let (id, port) = (d.id.to_string(), d.port.to_string());
            let dl = labels(&[
                ("cluster", name),
                ("id", &id),
                ("host", &d.host),
                ("port", &port),
            ]);
            d_role.add(dl.clone(), u8::from(d.is_primary()));
            d_state.add(dl.clone(), d.state);
            let Some(o) = obs else { continue };
            if let Some(p) = o.probes.get(&d.id) {
                d_up.add(dl.clone(), u8::from(p.ok));
                d_dur.add(dl.clone(), secs(p.probe_ms));
            }
            if let Some(lag) = crate::server::health::lag_bytes(c, o, d) {
                d_lag.add(dl, lag);
            }
        }
    }
    [d_role, d_state, d_up, d_lag, d_dur]
}

/// The monitor's counters and the last failover's duration, in scrape order.
fn counter_families(counters: &Counters) -> [Family; 6] {
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let counter = |name: &'static str, help: &'static str, v: u64| {
        let mut f = Family::new(name, "counter", help);
        f.add(String::new(), v);
        f
    };
    let probe_failures = counter(
        "clup_probe_failures_total",
        "Database probes that failed (after retries).",
        n(&counters.probe_failures),
    );
    let failovers = counter(
        "clup_failovers_total",
        "Failovers completed.",
        n(&counters.failovers),
    );
    let switchovers = counter(
        "clup_switchovers_total",
        "Planned switchovers completed.",
        n(&counters.switchovers),
    );
    let cstlb = counter(
        "clup_cstlb_call_failures_total",
        "Calls to a cstlb management port that failed.",
        n(&counters.cstlb_failures),
    );
    let overruns = counter(
        "clup_probe_overruns_total",
        "Probe rounds that took longer than probe_interval.",
        n(&counters.overruns),
    );
    let mut last_failover = Family::new(
        "clup_last_failover_duration_seconds",
        "gauge",
        "How long the last completed failover took (0 before the first).",
    );
    last_failover.add(String::new(), secs(n(&counters.last_failover_ms)));
    [
        probe_failures,
        failovers,
        switchovers,
        last_failover,
        cstlb,
        overruns,
    ]
}

/// The router's `GET /metrics`: token (401 first), then the scrape.
pub fn serve(ctx: &Ctx, req: &Req, query: &BTreeMap<String, String>) -> Resp {
    if let Some(r) = api::check_token(ctx, req, query) {
        return r;
    }
    let gate = ctx
        .monitor
        .as_ref()
        .map(|m| &m.gate)
        .filter(|g| g.is_elected());
    let clusters = match api::load(ctx) {
        Ok(c) => c,
        // With etcd down the meta cannot be read, and that is exactly when
        // the leader and etcd families matter: scrape without the clusters.
        Err(_) if gate.is_some() => Clusters::new(),
        Err(r) => return r,
    };
    let observed = crate::server::health::snapshot(ctx);
    let none = Counters::default();
    let counters = ctx.monitor.as_ref().map_or(&none, |m| &m.counters);
    let mut text = render(&clusters, &observed, counters, crate::now_secs());
    // With etcd: whether this clupserver leads, and whether etcd answers.
    if let Some(g) = gate {
        text.push_str(&leader_metrics(g.may_act(), g.etcd_ok()));
    }
    Resp::text(200, CONTENT_TYPE, text)
}

/// The families of a clupserver on etcd.
fn leader_metrics(leading: bool, etcd_ok: bool) -> String {
    let mut out = String::new();
    for (name, help, v) in [
        (
            "clup_leader",
            "1 while this clupserver holds the leader lease and acts (meta_store = etcd).",
            leading,
        ),
        (
            "clup_etcd_reachable",
            "0 when the last call to etcd (campaign or lease renewal) failed: nobody can act.",
            etcd_ok,
        ),
    ] {
        let mut f = Family::new(name, "gauge", help);
        f.add(String::new(), u8::from(v));
        f.write(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::pg::DbProbe;
    use crate::model::meta::parse_clusters;

    /// Two clusters: `c1` (primary 1 observed at LSN 5000, standby 2 at
    /// 4000, standby 3 Fault and down) locked until 200; `c"2` frozen, never
    /// observed.
    fn fixture() -> (Clusters, BTreeMap<String, Observed>, Counters) {
        let db = |id: u32, primary: u8, state: u8| {
            format!(
                r#"{{"id": {id}, "state": {state}, "os_user": "postgres", "pgdata": "/pg",
                    "is_primary": {primary}, "repl_app_name": "stb{id}", "host": "127.0.0.{id}",
                    "switch_host": "127.0.0.{id}", "port": 5432}}"#
            )
        };
        let cluster = |state: u8, lock: u64, dbs: String| {
            format!(
                r#"{{"write_vip": "127.0.1.1", "read_vip": "127.0.1.2", "cstlb_list": [],
                    "state": {state}, "lock_time": {lock}, "read_vip_host": "127.0.0.1",
                    "db_list": [{dbs}]}}"#
            )
        };
        let text = format!(
            r#"{{"c1": {}, "c2": {}}}"#,
            cluster(0, 200, [db(1, 1, 1), db(2, 0, 1), db(3, 0, 2)].join(",")),
            cluster(1, 0, db(1, 1, 1)),
        );
        let mut clusters = parse_clusters(&text).unwrap();
        // Names are validated in the meta; the escaping is tested anyway.
        let c2 = clusters.remove("c2").unwrap();
        clusters.insert("c\"2\\\n".into(), c2);
        let probes = BTreeMap::from([
            (
                1,
                DbProbe {
                    ok: true,
                    in_recovery: Some(false),
                    wal_lsn: Some(5000),
                    probe_ms: 12,
                    ..Default::default()
                },
            ),
            (
                2,
                DbProbe {
                    ok: true,
                    in_recovery: Some(true),
                    replay_lsn: Some(4000),
                    probe_ms: 250,
                    ..Default::default()
                },
            ),
            (
                3,
                DbProbe {
                    ok: false,
                    error: "timeout".into(),
                    probe_ms: 3001,
                    ..Default::default()
                },
            ),
        ]);
        let observed = BTreeMap::from([(
            "c1".to_string(),
            Observed {
                probes,
                at: 150,
                last_reason: String::new(),
                round_ms: 3100,
            },
        )]);
        let counters = Counters::default();
        counters.probe_failures.store(7, Ordering::Relaxed);
        counters.failovers.store(1, Ordering::Relaxed);
        counters.last_failover_ms.store(4250, Ordering::Relaxed);
        (clusters, observed, counters)
    }

    #[test]
    fn leader_families() {
        assert_eq!(
            leader_metrics(true, false),
            "# HELP clup_leader 1 while this clupserver holds the leader lease and acts (meta_store = etcd).\n\
             # TYPE clup_leader gauge\n\
             clup_leader 1\n\
             # HELP clup_etcd_reachable 0 when the last call to etcd (campaign or lease renewal) failed: nobody can act.\n\
             # TYPE clup_etcd_reachable gauge\n\
             clup_etcd_reachable 0\n"
        );
    }

    #[test]
    fn renders_the_fixture_exactly() {
        let (clusters, observed, counters) = fixture();
        let text = render(&clusters, &observed, &counters, 100);
        let v = crate::VERSION;
        let expected = format!(
            r#"# HELP clup_build_info clup version, always 1.
# TYPE clup_build_info gauge
clup_build_info{{version="{v}"}} 1
# HELP clup_cluster_state Cluster state from the meta: 0 Normal, 1 Frozen, 2 Fault.
# TYPE clup_cluster_state gauge
clup_cluster_state{{cluster="c\"2\\\n"}} 1
clup_cluster_state{{cluster="c1"}} 0
# HELP clup_cluster_frozen 1 when the cluster is frozen (the monitor does not probe or act).
# TYPE clup_cluster_frozen gauge
clup_cluster_frozen{{cluster="c\"2\\\n"}} 1
clup_cluster_frozen{{cluster="c1"}} 0
# HELP clup_cluster_lock_held 1 while an operation holds the cluster lock.
# TYPE clup_cluster_lock_held gauge
clup_cluster_lock_held{{cluster="c\"2\\\n"}} 0
clup_cluster_lock_held{{cluster="c1"}} 1
# HELP clup_sync_degraded 1 while clup names fewer synchronous standbys than the operator set, because the others do not acknowledge (sync_fallback = async).
# TYPE clup_sync_degraded gauge
clup_sync_degraded{{cluster="c\"2\\\n"}} 0
clup_sync_degraded{{cluster="c1"}} 0
# HELP clup_cluster_last_probe_timestamp_seconds When the monitor last finished a probe round of the cluster (epoch seconds).
# TYPE clup_cluster_last_probe_timestamp_seconds gauge
clup_cluster_last_probe_timestamp_seconds{{cluster="c1"}} 150
# HELP clup_cluster_round_duration_seconds How long the last probe round of the cluster took, actions included.
# TYPE clup_cluster_round_duration_seconds gauge
clup_cluster_round_duration_seconds{{cluster="c1"}} 3.1
# HELP clup_db_role 1 for the primary, 0 for a standby, from the meta.
# TYPE clup_db_role gauge
clup_db_role{{cluster="c\"2\\\n",id="1",host="127.0.0.1",port="5432"}} 1
clup_db_role{{cluster="c1",id="1",host="127.0.0.1",port="5432"}} 1
clup_db_role{{cluster="c1",id="2",host="127.0.0.2",port="5432"}} 0
clup_db_role{{cluster="c1",id="3",host="127.0.0.3",port="5432"}} 0
# HELP clup_db_state Database state from the meta: 1 Normal, 2 Fault.
# TYPE clup_db_state gauge
clup_db_state{{cluster="c\"2\\\n",id="1",host="127.0.0.1",port="5432"}} 1
clup_db_state{{cluster="c1",id="1",host="127.0.0.1",port="5432"}} 1
clup_db_state{{cluster="c1",id="2",host="127.0.0.2",port="5432"}} 1
clup_db_state{{cluster="c1",id="3",host="127.0.0.3",port="5432"}} 2
# HELP clup_db_reachable 1 when the last probe of the database succeeded.
# TYPE clup_db_reachable gauge
clup_db_reachable{{cluster="c1",id="1",host="127.0.0.1",port="5432"}} 1
clup_db_reachable{{cluster="c1",id="2",host="127.0.0.2",port="5432"}} 1
clup_db_reachable{{cluster="c1",id="3",host="127.0.0.3",port="5432"}} 0
# HELP clup_db_lag_bytes Standby: the primary's WAL position minus the standby's replay position, last probe.
# TYPE clup_db_lag_bytes gauge
clup_db_lag_bytes{{cluster="c1",id="2",host="127.0.0.2",port="5432"}} 1000
# HELP clup_db_probe_duration_seconds How long the last probe of the database took.
# TYPE clup_db_probe_duration_seconds gauge
clup_db_probe_duration_seconds{{cluster="c1",id="1",host="127.0.0.1",port="5432"}} 0.012
clup_db_probe_duration_seconds{{cluster="c1",id="2",host="127.0.0.2",port="5432"}} 0.25
clup_db_probe_duration_seconds{{cluster="c1",id="3",host="127.0.0.3",port="5432"}} 3.001
# HELP clup_probe_failures_total Database probes that failed (after retries).
# TYPE clup_probe_failures_total counter
clup_probe_failures_total 7
# HELP clup_failovers_total Failovers completed.
# TYPE clup_failovers_total counter
clup_failovers_total 1
# HELP clup_switchovers_total Planned switchovers completed.
# TYPE clup_switchovers_total counter
clup_switchovers_total 0
# HELP clup_last_failover_duration_seconds How long the last completed failover took (0 before the first).
# TYPE clup_last_failover_duration_seconds gauge
clup_last_failover_duration_seconds 4.25
# HELP clup_cstlb_call_failures_total Calls to a cstlb management port that failed.
# TYPE clup_cstlb_call_failures_total counter
clup_cstlb_call_failures_total 0
# HELP clup_probe_overruns_total Probe rounds that took longer than probe_interval.
# TYPE clup_probe_overruns_total counter
clup_probe_overruns_total 0
"#
        );
        for (a, b) in text.lines().zip(expected.lines()) {
            assert_eq!(a, b);
        }
        assert_eq!(text, expected);
    }

    #[test]
    fn format_invariants() {
        let (clusters, observed, counters) = fixture();
        let text = render(&clusters, &observed, &counters, 300);
        // HELP and TYPE once per name, every series once, every line parses
        // as `name{labels} value` with a numeric value.
        let mut helps = BTreeSet::new();
        let mut types = BTreeSet::new();
        let mut series = BTreeSet::new();
        for line in text.lines() {
            if let Some(r) = line.strip_prefix("# HELP ") {
                assert!(
                    helps.insert(r.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            } else if let Some(r) = line.strip_prefix("# TYPE ") {
                let mut it = r.split(' ');
                let name = it.next().unwrap().to_string();
                assert!(helps.contains(&name), "TYPE before HELP: {line}");
                assert!(matches!(it.next(), Some("gauge" | "counter")), "{line}");
                assert!(types.insert(name), "{line}");
            } else {
                let (s, v) = line.rsplit_once(' ').unwrap();
                assert!(v.parse::<f64>().is_ok(), "{line}");
                let name = s.split('{').next().unwrap();
                assert!(types.contains(name), "series before TYPE: {line}");
                assert!(series.insert(s.to_string()), "duplicate: {line}");
            }
        }
        assert_eq!(helps, types);
        // The lock expired at 200.
        assert!(text.contains("clup_cluster_lock_held{cluster=\"c1\"} 0\n"));
    }

    #[test]
    fn escaping_and_duplicates() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_label("plain"), "plain");
        let mut f = Family::new("x", "gauge", "h");
        f.add(labels(&[("a", "1")]), 1);
        f.add(labels(&[("a", "1")]), 2);
        let mut out = String::new();
        f.write(&mut out);
        assert_eq!(out, "# HELP x h\n# TYPE x gauge\nx{a=\"1\"} 1\n");
    }
}
