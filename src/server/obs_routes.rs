//! Router tests of the observability endpoints (/metrics, /<cluster>/primary,
//! /<cluster>/replica, get_lb_host's max_lag), through `api::route` with the
//! api module's own test helpers, with and without a monitor.

use std::sync::Arc;

use crate::exec::pg::DbProbe;
use crate::model::home::Home;
use crate::monitor::{Observed, Shared};
use crate::server::api::tests::{call, ctx, TOKEN};
use crate::server::api::Ctx;

/// A router context whose (never started) monitor saw cluster01 `age`
/// seconds ago: primary 1 at LSN 1000, standby 2 caught up, standby 3 500
/// bytes behind, standby 4 down.
fn observed_ctx(tag: &str, age: u64) -> Ctx {
    let mut c = ctx(tag);
    let home =
        Home::at(std::env::temp_dir().join(format!("clup-obs-{tag}-{}", std::process::id())));
    let shared = Shared::new(c.cfg.clone(), home, c.store.clone());
    let p = |ok: bool, rec: bool, wal: u64, replay: Option<u64>| DbProbe {
        ok,
        in_recovery: ok.then_some(rec),
        wal_lsn: ok.then_some(wal),
        replay_lsn: replay,
        error: if ok { String::new() } else { "refused".into() },
        probe_ms: 5,
        ..Default::default()
    };
    let probes = [
        (1, p(true, false, 1000, None)),
        (2, p(true, true, 1000, Some(1000))),
        (3, p(true, true, 500, Some(500))),
        (4, p(false, false, 0, None)),
    ];
    shared.observed.lock().unwrap().insert(
        "cluster01".into(),
        Observed {
            probes: probes.into_iter().collect(),
            at: crate::now_secs() - age,
            last_reason: String::new(),
            round_ms: 40,
        },
    );
    c.monitor = Some(Arc::new(shared));
    c
}

#[test]
fn metrics_token_rules_and_content_type() {
    let c = ctx("m-tok");
    assert_eq!(call(&c, "GET", "/metrics", &[], "").status, 401);
    assert_eq!(call(&c, "GET", "/metrics?token=nope", &[], "").status, 401);
    let bad = call(
        &c,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer nope")],
        "",
    );
    assert_eq!((bad.status, bad.text), (401, None));
    let bearer = format!("bearer  {TOKEN}");
    for (url, headers) in [
        (format!("/metrics?token={TOKEN}"), vec![]),
        ("/metrics".to_string(), vec![("X-Clup-Token", TOKEN)]),
        (
            "/metrics".to_string(),
            vec![("authorization", bearer.as_str())],
        ),
    ] {
        let r = call(&c, "GET", &url, &headers, "");
        assert_eq!(r.status, 200, "{url} {headers:?}");
        let (ctype, text) = r.text.expect("a text body");
        assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
        // Without a monitor: the meta alone, no probe series.
        assert!(text.contains(
            "clup_db_role{cluster=\"cluster01\",id=\"1\",host=\"192.168.56.41\",port=\"5432\"} 1\n"
        ));
        assert!(text.contains("clup_cluster_frozen{cluster=\"cluster01\"} 0\n"));
        assert!(!text.contains("clup_db_reachable{"));
        assert!(text.contains("clup_failovers_total 0\n"));
    }
}

#[test]
fn metrics_with_observations() {
    let c = observed_ctx("m-obs", 0);
    let r = call(&c, "GET", "/metrics", &[("X-Clup-Token", TOKEN)], "");
    let text = r.text.unwrap().1;
    for line in [
        "clup_db_reachable{cluster=\"cluster01\",id=\"4\",host=\"192.168.56.44\",port=\"5432\"} 0\n",
        "clup_db_reachable{cluster=\"cluster01\",id=\"1\",host=\"192.168.56.41\",port=\"5432\"} 1\n",
        "clup_db_lag_bytes{cluster=\"cluster01\",id=\"3\",host=\"192.168.56.43\",port=\"5432\"} 500\n",
        "clup_db_probe_duration_seconds{cluster=\"cluster01\",id=\"2\",host=\"192.168.56.42\",port=\"5432\"} 0.005\n",
        "clup_cluster_round_duration_seconds{cluster=\"cluster01\"} 0.04\n",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
}

#[test]
fn primary_and_replica_status_codes() {
    // Without a monitor nothing is known: 503, after the token and cluster.
    let c = ctx("h-none");
    for ep in ["primary", "replica"] {
        assert_eq!(
            call(&c, "GET", &format!("/cluster01/{ep}"), &[], "").status,
            401
        );
        assert_eq!(
            call(&c, "GET", &format!("/nosuch/{ep}"), &[], "").status,
            401
        );
        let r = call(&c, "GET", &format!("/nosuch/{ep}?token={TOKEN}"), &[], "");
        assert_eq!(r.status, 404);
        let r = call(
            &c,
            "GET",
            &format!("/cluster01/{ep}?token={TOKEN}"),
            &[],
            "",
        );
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.body["ok"], false);
    }

    let c = observed_ctx("h-obs", 1);
    let r = call(
        &c,
        "GET",
        "/cluster01/primary",
        &[("X-Clup-Token", TOKEN)],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["primary"], "192.168.56.41:5432");
    assert_eq!(r.text, None);
    let r = call(
        &c,
        "GET",
        &format!("/cluster01/replica?token={TOKEN}"),
        &[],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["data"]["replicas"],
        serde_json::json!(["192.168.56.42:5432", "192.168.56.43:5432"])
    );
    let r = call(
        &c,
        "GET",
        &format!("/cluster01/replica?token={TOKEN}&max_lag=100"),
        &[],
        "",
    );
    assert_eq!(
        r.body["data"]["replicas"],
        serde_json::json!(["192.168.56.42:5432"])
    );
    let r = call(
        &c,
        "GET",
        &format!("/cluster01/replica?token={TOKEN}&max_lag=x"),
        &[],
        "",
    );
    assert_eq!(r.status, 400);

    // A stale observation (the cluster was frozen long ago) routes nothing.
    let c = observed_ctx("h-stale", 3600);
    let r = call(
        &c,
        "GET",
        &format!("/cluster01/primary?token={TOKEN}"),
        &[],
        "",
    );
    assert_eq!(r.status, 503);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("no recent probe"));
}

#[test]
fn get_lb_host_max_lag() {
    let url = |q: &str| format!("/cluster01/get_lb_host?token={TOKEN}{q}");
    let all = serde_json::json!([
        "192.168.56.42:5432",
        "192.168.56.43:5432",
        "192.168.56.44:5432"
    ]);
    // No observation: no filtering.
    let c = ctx("lb-none");
    assert_eq!(
        call(&c, "GET", &url("&max_lag=0"), &[], "").body["data"]["backends"],
        all
    );
    // Standby 3 is 500 bytes behind; 4 is down, its lag unknown: kept.
    let c = observed_ctx("lb-obs", 0);
    assert_eq!(
        call(&c, "GET", &url(""), &[], "").body["data"]["backends"],
        all
    );
    assert_eq!(
        call(&c, "GET", &url("&max_lag=100"), &[], "").body["data"]["backends"],
        serde_json::json!(["192.168.56.42:5432", "192.168.56.44:5432"])
    );
    assert_eq!(
        call(&c, "GET", &url("&max_lag=500"), &[], "").body["data"]["backends"],
        all
    );
    assert_eq!(call(&c, "GET", &url("&max_lag=-1"), &[], "").status, 400);
}

#[test]
fn status_page_and_its_json() {
    let c = observed_ctx("status", 0);
    let r = call(&c, "GET", "/", &[], "");
    assert_eq!(r.status, 200);
    let (ctype, text) = r.text.expect("the page");
    assert_eq!(ctype, "text/html; charset=utf-8");
    assert!(text.starts_with("<!DOCTYPE html>"));
    assert_eq!(call(&c, "GET", "/api/status", &[], "").status, 401);
    assert_eq!(
        call(&c, "GET", "/api/status?token=nope", &[], "").status,
        401
    );
    let r = call(&c, "GET", "/api/status", &[("X-Clup-Token", TOKEN)], "");
    assert_eq!(r.status, 200, "{r:?}");
    let n = &r.body["data"]["clusters"][0]["nodes"];
    assert_eq!(n[0]["role"], "primary");
    assert_eq!(n[2]["lag_bytes"], 500);
    assert_eq!(n[3]["seen"], "down");
    // The monitor was never started: no rounds, no history.
    assert_eq!(n[0]["history"], serde_json::json!([]));
}
