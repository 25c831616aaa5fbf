//! The status page: `GET /` serves one self-contained HTML page (embedded
//! in the binary, nothing fetched from elsewhere) and `GET /api/status` the
//! JSON it polls every second: every cluster's nodes with their role, state,
//! lag and the monitor's last [`KEEP`](crate::monitor::history::KEEP)
//! samples, where the VIPs are, cstlb and the last tasks.
//!
//! [`render`] is a pure function of plain data; [`serve`] takes the
//! snapshot (the meta from the store, the monitor's observations and
//! history). Must not: probe anything or change anything; the page is
//! read-only. The JSON needs `http_token` as every program endpoint does;
//! the page itself holds no data and needs none.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};

use crate::model::meta::{self, Cluster, Clusters, Db};
use crate::monitor::history::{self, History, Sample, Seen};
use crate::monitor::Observed;
use crate::server::api::{self, Ctx, Req, Resp};
use crate::store::Task;

/// The page, HTML with its CSS and script inline.
pub const PAGE: &str = include_str!("page/status.html");

/// The page's Content-Type.
pub const PAGE_TYPE: &str = "text/html; charset=utf-8";

/// How many of the newest tasks the JSON lists.
pub const LAST_TASKS: usize = 10;

/// Everything the JSON is made of.
pub struct View<'a> {
    pub clusters: &'a Clusters,
    pub observed: &'a BTreeMap<String, Observed>,
    pub history: &'a History,
    pub tasks: &'a [Task],
    /// Epoch milliseconds.
    pub now_ms: u64,
    pub probe_interval_ms: u64,
    /// With etcd: this clupserver's role (`leader`/`follower`).
    pub monitor_role: Option<String>,
}

/// The JSON of `GET /api/status` (inside the usual `{"ok", "data"}`).
pub fn render(v: &View) -> Value {
    let no_rings = BTreeMap::new();
    let clusters: Vec<Value> = v
        .clusters
        .iter()
        .map(|(name, c)| {
            let rings = v.history.get(name).unwrap_or(&no_rings);
            cluster_json(name, c, v.observed.get(name), rings, v.now_ms / 1000)
        })
        .collect();
    let mut tasks: Vec<&Task> = v.tasks.iter().collect();
    tasks.sort_by_key(|t| std::cmp::Reverse(t.id));
    tasks.truncate(LAST_TASKS);
    json!({
        "version": crate::VERSION,
        "now_ms": v.now_ms,
        "probe_interval_ms": v.probe_interval_ms,
        "keep": history::KEEP,
        "monitor": v.monitor_role,
        "clusters": clusters,
        "tasks": tasks,
    })
}

fn cluster_json(
    name: &str,
    c: &Cluster,
    obs: Option<&Observed>,
    rings: &BTreeMap<u32, VecDeque<Sample>>,
    now: u64,
) -> Value {
    let empty = VecDeque::new();
    let nodes: Vec<Value> = c
        .db_list
        .iter()
        .map(|d| node_json(c, d, obs, rings.get(&d.id).unwrap_or(&empty)))
        .collect();
    let locked = c.lock_time > now;
    json!({
        "name": name,
        "state": meta::cluster_state_name(c.state),
        "locked_by": locked.then_some(if c.lock_holder.is_empty() {
            "an operation"
        } else {
            c.lock_holder.as_str()
        }),
        // Where clup put the VIPs, by the meta: the write VIP on the
        // primary's host, the read VIP on read_vip_host.
        "write_vip": c.write_vip,
        "write_vip_on": c.primary().map(|p| p.host.as_str()),
        "read_vip": c.read_vip,
        "read_vip_on": (!c.read_vip_host.is_empty()).then_some(c.read_vip_host.as_str()),
        "cstlb": c.cstlb_list,
        "backends": crate::server::health::lb_backends(c, obs, None),
        "observed_at": obs.map(|o| o.at),
        "reason": obs.map(|o| o.last_reason.as_str()),
        "round_ms": obs.map(|o| o.round_ms),
        "nodes": nodes,
    })
}

fn node_json(c: &Cluster, d: &Db, obs: Option<&Observed>, ring: &VecDeque<Sample>) -> Value {
    let last = obs.and_then(|o| history::sample(c, &o.probes, d, 0));
    let error = obs
        .and_then(|o| o.probes.get(&d.id))
        .filter(|p| !p.ok)
        .map(|p| p.error.as_str());
    json!({
        "id": d.id,
        "addr": d.addr(),
        "host": d.host,
        "port": d.port,
        "role": if d.is_primary() { "primary" } else { "standby" },
        "state": meta::db_state_name(d.state),
        "seen": last.map(|s| match s.1 {
            Seen::Primary => "primary",
            Seen::Standby => "standby",
            Seen::Down => "down",
        }),
        "error": error,
        "lag_bytes": last.and_then(|s| s.2),
        "lag_s": last.and_then(|s| s.3),
        "history": ring,
    })
}

/// `GET /`: the page.
pub fn page() -> Resp {
    Resp::text(200, PAGE_TYPE, PAGE.to_string())
}

/// `GET /api/status`: the token (401), then the snapshot.
pub fn serve(ctx: &Ctx, req: &Req, query: &BTreeMap<String, String>) -> Resp {
    if let Some(r) = api::check_token(ctx, req, query) {
        return r;
    }
    let doc = match ctx.store.load() {
        Ok(d) => d,
        Err(e) => return Resp::err(500, e.to_string()),
    };
    let observed = crate::server::health::snapshot(ctx);
    let history = match &ctx.monitor {
        Some(m) => m.history.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        None => History::new(),
    };
    let monitor_role = ctx
        .monitor
        .as_ref()
        .map(|m| &m.gate)
        .filter(|g| g.is_elected())
        .map(|g| g.role());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Resp::ok(render(&View {
        clusters: &doc.clusters,
        observed: &observed,
        history: &history,
        tasks: &doc.tasks,
        now_ms,
        probe_interval_ms: ctx.cfg.probe_interval.as_millis() as u64,
        monitor_role,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::pg::DbProbe;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    fn probe(ok: bool, rec: bool, wal: u64, replay: Option<u64>) -> DbProbe {
        DbProbe {
            ok,
            in_recovery: ok.then_some(rec),
            wal_lsn: ok.then_some(wal),
            replay_lsn: replay,
            heartbeat_age_ms: rec.then_some(800),
            error: if ok { String::new() } else { "refused".into() },
            ..Default::default()
        }
    }

    fn task(id: u64, state: &str) -> Task {
        Task {
            id,
            name: format!("task {id}"),
            cluster: "cluster01".into(),
            state: state.into(),
            begin: 100 + id,
            end: 0,
        }
    }

    /// The sample cluster after a failover to 2 (1 Fault, down), observed
    /// at 1_000 s; two rounds of history, the first before the failover.
    #[test]
    fn status_json_from_plain_data() {
        let mut clusters = parse_clusters(SAMPLE_INIT).unwrap();
        let c = clusters.get_mut("cluster01").unwrap();
        let before = c.clone();
        c.db_mut(1).unwrap().is_primary = 0;
        c.db_mut(1).unwrap().state = meta::DB_FAULT;
        c.db_mut(2).unwrap().is_primary = 1;
        c.read_vip_host = "192.168.56.43".into();
        c.lock_time = 1_500;
        c.lock_holder = "failover task 12".into();
        let earlier: BTreeMap<u32, DbProbe> = [
            (1, probe(true, false, 900, None)),
            (2, probe(true, true, 900, Some(900))),
        ]
        .into_iter()
        .collect();
        let now: BTreeMap<u32, DbProbe> = [
            (1, probe(false, false, 0, None)),
            (2, probe(true, false, 2000, None)),
            (3, probe(true, true, 1800, Some(1700))),
        ]
        .into_iter()
        .collect();
        let mut history = History::new();
        history::record(&mut history, "cluster01", &before, &earlier, 999_000);
        history::record(&mut history, "cluster01", c, &now, 1_000_000);
        let observed: BTreeMap<String, Observed> = [(
            "cluster01".to_string(),
            Observed {
                probes: now,
                at: 1_000,
                last_reason: "no action: primary ok".into(),
                round_ms: 12,
            },
        )]
        .into_iter()
        .collect();
        let tasks: Vec<Task> = (1..=12).map(|i| task(i, "success")).collect();
        let v = render(&View {
            clusters: &clusters,
            observed: &observed,
            history: &history,
            tasks: &tasks,
            now_ms: 1_000_400,
            probe_interval_ms: 1000,
            monitor_role: None,
        });
        let c = &v["clusters"][0];
        assert_eq!(c["name"], "cluster01");
        assert_eq!(c["state"], "Normal");
        assert_eq!(c["locked_by"], "failover task 12");
        assert_eq!(c["write_vip_on"], "192.168.56.42");
        assert_eq!(c["read_vip_on"], "192.168.56.43");
        assert_eq!(
            c["cstlb"],
            json!(["192.168.56.43:8082", "192.168.56.44:8082"])
        );
        assert_eq!(
            c["backends"],
            json!(["192.168.56.43:5432", "192.168.56.44:5432"])
        );
        assert_eq!(c["reason"], "no action: primary ok");
        let n = |i: usize| &c["nodes"][i];
        assert_eq!(
            (&n(0)["role"], &n(0)["state"], &n(0)["seen"], &n(0)["error"]),
            (
                &json!("standby"),
                &json!("Fault"),
                &json!("down"),
                &json!("refused")
            )
        );
        assert_eq!(
            n(0)["history"],
            json!([[999_000, "P", null, null], [1_000_000, "D", null, null]])
        );
        assert_eq!(
            (&n(1)["role"], &n(1)["seen"]),
            (&json!("primary"), &json!("primary"))
        );
        assert_eq!(n(1)["history"][0], json!([999_000, "S", 0, 0.8]));
        assert_eq!(
            (&n(2)["lag_bytes"], &n(2)["lag_s"]),
            (&json!(300), &json!(0.8))
        );
        assert_eq!(n(2)["addr"], "192.168.56.43:5432");
        // Database 4 was not probed: no observation, no history.
        assert_eq!(
            (&n(3)["seen"], &n(3)["history"]),
            (&Value::Null, &json!([]))
        );
        // The ten newest tasks, newest first.
        let ids: Vec<u64> = v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (3..=12).rev().collect::<Vec<_>>());
        assert_eq!(v["keep"], history::KEEP);
        assert_eq!(v["monitor"], Value::Null);
    }

    #[test]
    fn a_cluster_never_observed_has_its_meta_only() {
        let clusters = parse_clusters(SAMPLE_INIT).unwrap();
        let v = render(&View {
            clusters: &clusters,
            observed: &BTreeMap::new(),
            history: &History::new(),
            tasks: &[],
            now_ms: 5,
            probe_interval_ms: 10_000,
            monitor_role: Some("leader".into()),
        });
        let c = &v["clusters"][0];
        assert_eq!(c["observed_at"], Value::Null);
        assert_eq!(c["locked_by"], Value::Null);
        assert_eq!(c["nodes"][0]["role"], "primary");
        assert_eq!(c["nodes"][0]["lag_bytes"], Value::Null);
        assert_eq!(c["nodes"].as_array().unwrap().len(), 4);
        assert_eq!(v["monitor"], "leader");
        assert_eq!(v["tasks"], json!([]));
    }

    #[test]
    fn the_page_is_self_contained() {
        let lower = PAGE.to_ascii_lowercase();
        for bad in [
            "http://",
            "https://",
            "src=\"//",
            "href=\"//",
            "@import",
            "url(",
        ] {
            assert!(!lower.contains(bad), "the page has {bad}");
        }
        assert!(PAGE.contains("/api/status") && PAGE.contains("/events?since=0"));
        assert!(PAGE.contains("X-Clup-Token"));
    }
}
