//! Health answers for proxies, as Patroni gives them, so HAProxy or
//! keepalived can route without cstlb: `GET /<cluster>/primary` and
//! `GET /<cluster>/replica[?max_lag=BYTES]` answer 200 when the node(s) can
//! take traffic and 503 (with the reason) when not; `get_lb_host` takes the
//! same `max_lag`.
//!
//! The decisions are pure functions of the meta and the monitor's last
//! observation; the router glue at the bottom only reads them. A node is
//! healthy only if the meta says Normal *and* a fresh probe agrees: with no
//! (or a stale) observation the primary/replica endpoints answer 503, because
//! a proxy must not send writes on hope. `get_lb_host` keeps its old answer
//! when nothing was observed (cstlb health-checks its backends itself).
//! Must not: probe anything, or change the meta.

use std::collections::BTreeMap;

use serde_json::json;

use crate::model::meta::{db_state_name, Cluster, Db};
use crate::monitor::Observed;
use crate::server::api::{self, Ctx, Req, Resp};

/// Bytes the standby `db` has still to replay to reach the primary's WAL
/// position in one observation ([`crate::monitor::history::lag_bytes`]).
pub fn lag_bytes(cluster: &Cluster, obs: &Observed, db: &Db) -> Option<u64> {
    crate::monitor::history::lag_bytes(cluster, &obs.probes, db)
}

/// `GET /<cluster>/primary`: 200 with `h:p` when the meta's primary is
/// Normal and its last probe answered out of recovery.
pub fn primary(cluster: &Cluster, obs: Option<&Observed>) -> Resp {
    let Some(db) = cluster.primary() else {
        return Resp::err(503, "no primary in the meta");
    };
    let addr = db.addr();
    if !db.is_normal() {
        return Resp::err(
            503,
            format!("primary {addr} is {}", db_state_name(db.state)),
        );
    }
    let Some(p) = obs.and_then(|o| o.probes.get(&db.id)) else {
        return Resp::err(503, format!("primary {addr} has no recent probe"));
    };
    if !p.ok {
        return Resp::err(503, format!("primary {addr} is unreachable: {}", p.error));
    }
    if p.in_recovery != Some(false) {
        return Resp::err(503, format!("primary {addr} is in recovery"));
    }
    Resp::ok(json!({ "primary": addr }))
}

/// Why standby `db` cannot take reads now, or None when it can.
fn replica_problem(
    cluster: &Cluster,
    obs: Option<&Observed>,
    db: &Db,
    max_lag: Option<u64>,
) -> Option<String> {
    if !db.is_normal() {
        return Some(db_state_name(db.state).to_string());
    }
    let Some(o) = obs else {
        return Some("no recent probe".into());
    };
    let Some(p) = o.probes.get(&db.id) else {
        return Some("no recent probe".into());
    };
    if !p.ok {
        return Some(format!("unreachable: {}", p.error));
    }
    if p.in_recovery != Some(true) {
        return Some("not in recovery".into());
    }
    let max = max_lag?;
    match lag_bytes(cluster, o, db) {
        None => Some("lag unknown".into()),
        Some(l) if l > max => Some(format!("lag {l} bytes over {max}")),
        Some(_) => None,
    }
}

/// `GET /<cluster>/replica[?max_lag=N]`: 200 listing the healthy standbys
/// (Normal, last probe ok and in recovery, lag known and <= max_lag when
/// given), 503 with each standby's reason when there is none.
pub fn replicas(cluster: &Cluster, obs: Option<&Observed>, max_lag: Option<u64>) -> Resp {
    let mut good = Vec::new();
    let mut why = Vec::new();
    for db in cluster.db_list.iter().filter(|d| !d.is_primary()) {
        match replica_problem(cluster, obs, db, max_lag) {
            None => good.push(db.addr()),
            Some(r) => why.push(format!("{}: {r}", db.addr())),
        }
    }
    if good.is_empty() {
        let detail = if why.is_empty() {
            "no standby in the meta".to_string()
        } else {
            why.join("; ")
        };
        return Resp::err(503, format!("no healthy standby ({detail})"));
    }
    Resp::ok(json!({ "replicas": good }))
}

/// What `get_lb_host` hands cstlb: the Normal standbys, less those whose
/// observed lag is over `max_lag`. A standby whose lag is unknown stays, and
/// without an observation nothing is filtered (cstlb checks backends itself).
pub fn lb_backends(cluster: &Cluster, obs: Option<&Observed>, max_lag: Option<u64>) -> Vec<String> {
    cluster
        .normal_standbys()
        .filter(|d| match (obs, max_lag) {
            (Some(o), Some(max)) => lag_bytes(cluster, o, d).is_none_or(|l| l <= max),
            _ => true,
        })
        .map(Db::addr)
        .collect()
}

// ---- router glue ----

/// The monitor's observations; empty without a monitor (router tests).
pub fn snapshot(ctx: &Ctx) -> BTreeMap<String, Observed> {
    match &ctx.monitor {
        Some(m) => m.observed.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        None => BTreeMap::new(),
    }
}

/// The cluster's observation if it is recent enough to route by: at most
/// three probe intervals (and at least 10 s) old. A frozen cluster is not
/// probed, so its observation goes stale and the endpoints answer 503.
pub fn fresh_observation(ctx: &Ctx, cluster: &str, now: u64) -> Option<Observed> {
    let max_age = (3 * ctx.cfg.probe_interval.as_secs()).max(10);
    snapshot(ctx)
        .remove(cluster)
        .filter(|o| o.at + max_age >= now)
}

/// `max_lag=BYTES` from the query; Err(400) when it is not a number.
pub fn max_lag(query: &BTreeMap<String, String>) -> Result<Option<u64>, Resp> {
    match query.get("max_lag") {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| {
                Resp::err(400, format!("max_lag must be a number of bytes, not '{v}'"))
            })
        }
    }
}

/// get_lb_host's backends for `cluster`, honouring `max_lag`.
pub fn lb_backends_for(
    ctx: &Ctx,
    query: &BTreeMap<String, String>,
    name: &str,
    cluster: &Cluster,
) -> Result<Vec<String>, Resp> {
    let max = max_lag(query)?;
    let obs = fresh_observation(ctx, name, crate::now_secs());
    Ok(lb_backends(cluster, obs.as_ref(), max))
}

/// `GET /<cluster>/primary` and `GET /<cluster>/replica`: the token first
/// (401 before anything else), then the cluster (404), then the answer.
pub fn route(
    ctx: &Ctx,
    req: &Req,
    query: &BTreeMap<String, String>,
    name: &str,
    what: &str,
) -> Resp {
    if let Some(r) = api::check_token(ctx, req, query) {
        return r;
    }
    let clusters = match api::load(ctx) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(c) = clusters.get(name) else {
        return Resp::err(404, format!("no cluster named '{name}'"));
    };
    let obs = fresh_observation(ctx, name, crate::now_secs());
    match what {
        "primary" => primary(c, obs.as_ref()),
        _ => match max_lag(query) {
            Ok(max) => replicas(c, obs.as_ref(), max),
            Err(r) => r,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::pg::{DbProbe, Replica};
    use crate::model::meta::{parse_clusters, DB_FAULT, SAMPLE_INIT};

    /// The manual's cluster01: db 1 primary, dbs 2..4 standbys.
    fn cluster() -> Cluster {
        parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap()
    }

    fn primary_probe(lsn: u64) -> DbProbe {
        DbProbe {
            ok: true,
            in_recovery: Some(false),
            wal_lsn: Some(lsn),
            ..Default::default()
        }
    }

    fn standby_probe(replay: u64) -> DbProbe {
        DbProbe {
            ok: true,
            in_recovery: Some(true),
            wal_lsn: Some(replay),
            replay_lsn: Some(replay),
            ..Default::default()
        }
    }

    fn down() -> DbProbe {
        DbProbe {
            ok: false,
            error: "connection refused".into(),
            ..Default::default()
        }
    }

    fn obs(probes: Vec<(u32, DbProbe)>) -> Observed {
        Observed {
            probes: probes.into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn primary_ok_down_fault_and_unobserved() {
        let c = cluster();
        let o = obs(vec![(1, primary_probe(1000))]);
        let r = primary(&c, Some(&o));
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            json!({"ok": true, "data": {"primary": "192.168.56.41:5432"}})
        );

        let r = primary(&c, Some(&obs(vec![(1, down())])));
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body["error"],
            "primary 192.168.56.41:5432 is unreachable: connection refused"
        );

        let mut rec = primary_probe(1000);
        rec.in_recovery = Some(true);
        assert_eq!(primary(&c, Some(&obs(vec![(1, rec)]))).status, 503);

        let r = primary(&c, None);
        assert_eq!(r.status, 503);
        assert!(r.body["error"]
            .as_str()
            .unwrap()
            .contains("no recent probe"));

        let mut f = c.clone();
        f.db_mut(1).unwrap().state = DB_FAULT;
        let r = primary(&f, Some(&o));
        assert_eq!(r.body["error"], "primary 192.168.56.41:5432 is Fault");
    }

    #[test]
    fn lag_from_standby_probe_or_replication_row() {
        let c = cluster();
        let mut p = primary_probe(1000);
        p.replicas = vec![Replica {
            application_name: "stb43".into(),
            replay_lsn: Some(700),
            ..Default::default()
        }];
        let o = obs(vec![(1, p), (2, standby_probe(900)), (3, down())]);
        assert_eq!(lag_bytes(&c, &o, c.db(2).unwrap()), Some(100));
        assert_eq!(lag_bytes(&c, &o, c.db(3).unwrap()), Some(300));
        assert_eq!(lag_bytes(&c, &o, c.db(4).unwrap()), None);
        assert_eq!(lag_bytes(&c, &o, c.db(1).unwrap()), None);
        // A standby a little ahead of the primary's earlier reading: 0.
        let o = obs(vec![(1, primary_probe(1000)), (2, standby_probe(1010))]);
        assert_eq!(lag_bytes(&c, &o, c.db(2).unwrap()), Some(0));
        // Primary unreachable: unknown.
        let o = obs(vec![(1, down()), (2, standby_probe(900))]);
        assert_eq!(lag_bytes(&c, &o, c.db(2).unwrap()), None);
    }

    #[test]
    fn replicas_healthy_lag_filter_and_none() {
        let c = cluster();
        let o = obs(vec![
            (1, primary_probe(1000)),
            (2, standby_probe(1000)),
            (3, standby_probe(200)),
            (4, down()),
        ]);
        let r = replicas(&c, Some(&o), None);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body["data"]["replicas"],
            json!(["192.168.56.42:5432", "192.168.56.43:5432"])
        );
        let r = replicas(&c, Some(&o), Some(500));
        assert_eq!(r.body["data"]["replicas"], json!(["192.168.56.42:5432"]));
        assert_eq!(
            replicas(&c, Some(&o), Some(800)).body["data"]["replicas"]
                .as_array()
                .unwrap()
                .len(),
            2
        );

        // None healthy: 503 naming each standby's reason.
        let o = obs(vec![
            (1, primary_probe(1000)),
            (2, down()),
            (3, primary_probe(5)),
        ]);
        let r = replicas(&c, Some(&o), None);
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body["error"],
            "no healthy standby (192.168.56.42:5432: unreachable: connection refused; \
             192.168.56.43:5432: not in recovery; 192.168.56.44:5432: no recent probe)"
        );
        assert_eq!(replicas(&c, None, None).status, 503);
        // Lag asked for but unknown (primary down): not healthy.
        let o = obs(vec![(1, down()), (2, standby_probe(1000))]);
        assert_eq!(replicas(&c, Some(&o), None).status, 200);
        assert_eq!(replicas(&c, Some(&o), Some(10)).status, 503);
        // A Fault standby is never listed.
        let mut f = c.clone();
        f.db_mut(2).unwrap().state = DB_FAULT;
        let o = obs(vec![(1, primary_probe(1000)), (2, standby_probe(1000))]);
        assert_eq!(replicas(&f, Some(&o), None).status, 503);
    }

    #[test]
    fn lb_backends_filter_only_known_lag() {
        let c = cluster();
        let o = obs(vec![
            (1, primary_probe(1000)),
            (2, standby_probe(1000)),
            (3, standby_probe(200)),
            (4, down()),
        ]);
        let all = [
            "192.168.56.42:5432",
            "192.168.56.43:5432",
            "192.168.56.44:5432",
        ];
        assert_eq!(lb_backends(&c, Some(&o), None), all);
        assert_eq!(lb_backends(&c, None, Some(0)), all);
        assert_eq!(
            lb_backends(&c, Some(&o), Some(500)),
            ["192.168.56.42:5432", "192.168.56.44:5432"]
        );
    }

    #[test]
    fn max_lag_parsing() {
        let q = |v: &str| BTreeMap::from([("max_lag".to_string(), v.to_string())]);
        assert_eq!(max_lag(&BTreeMap::new()), Ok(None));
        assert_eq!(max_lag(&q("1048576")), Ok(Some(1048576)));
        assert_eq!(max_lag(&q("1MB")).unwrap_err().status, 400);
    }
}
