//! /metrics from a real clupserver on loopback: the token rules, the text
//! content type, and series that follow the meta (froze/unfroze) and the
//! monitor's probes of the fake 127.0.56.x hosts (refused at once).

use crate::util::{free_port, http_get as get, sample_conf, wait_for, TestHome, SAMPLE_INIT};

const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";

#[test]
fn metrics_scrape_follows_meta_and_probes() {
    let h = TestHome::new("metrics");
    let port = free_port();
    // Probe every second so the unfrozen cluster is observed quickly.
    h.write(
        "conf/clup.conf",
        &sample_conf(port).replace("probe_interval = 10", "probe_interval = 1"),
    );
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 0, "{out:?}");

    // No or wrong token: 401, JSON, no series.
    let (s, ctype, body) = get(port, "/metrics", None);
    assert_eq!((s, ctype.as_str()), (401, "application/json"));
    assert!(!body.contains("clup_"), "{body}");
    assert_eq!(get(port, "/metrics?token=wrong", None).0, 401);
    assert_eq!(
        get(port, "/metrics", Some(("Authorization", "Bearer wrong"))).0,
        401
    );

    let bearer = format!("Bearer {TOKEN}");
    let (s, ctype, body) = get(port, "/metrics", Some(("Authorization", &bearer)));
    assert_eq!(s, 200, "{body}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "# TYPE clup_cluster_frozen gauge",
        "clup_cluster_frozen{cluster=\"cluster01\"} 1",
        "clup_cluster_state{cluster=\"cluster01\"} 1",
        "clup_db_role{cluster=\"cluster01\",id=\"1\",host=\"127.0.56.41\",port=\"5432\"} 1",
        "clup_db_state{cluster=\"cluster01\",id=\"2\",host=\"127.0.56.42\",port=\"5432\"} 1",
        &format!("clup_build_info{{version=\"{}\"}} 1", clup::VERSION),
        "clup_failovers_total 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no '{line}' in\n{body}");
    }
    // Frozen: never probed, so no probe series yet.
    assert!(!body.contains("clup_db_reachable{"), "{body}");
    assert_eq!(
        get(port, &format!("/cluster01/primary?token={TOKEN}"), None).0,
        503
    );

    assert_eq!(h.run(&["adm", "unfroze"]).code, 0);
    let scrape = || get(port, &format!("/metrics?token={TOKEN}"), None).2;
    let reachable0 = |b: &str, id: u32| {
        b.lines().any(|l| {
            l == format!(
                "clup_db_reachable{{cluster=\"cluster01\",id=\"{id}\",host=\"127.0.56.4{id}\",port=\"5432\"}} 0"
            )
        })
    };
    let mut body = String::new();
    let seen = wait_for(15, || {
        body = scrape();
        (1..=4).all(|id| reachable0(&body, id))
    });
    assert!(seen, "fake hosts not reported unreachable:\n{body}");
    assert!(
        body.lines()
            .any(|l| l == "clup_cluster_frozen{cluster=\"cluster01\"} 0"),
        "{body}"
    );
    let failures = body
        .lines()
        .find_map(|l| l.strip_prefix("clup_probe_failures_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 4, "{body}");
    // The primary is unreachable: proxies are told so.
    let (s, _, b) = get(port, "/cluster01/primary", Some(("X-Clup-Token", TOKEN)));
    assert_eq!(s, 503, "{b}");
    assert_eq!(
        get(port, &format!("/cluster01/replica?token={TOKEN}"), None).0,
        503
    );

    // Freeze again so the monitor stops before the home goes away.
    let _ = h.run(&["adm", "froze"]);
    assert_eq!(h.run(&["server", "stop"]).code, 0);
}
