//! The status page from a real clupserver on loopback: `GET /` is the
//! self-contained HTML page, `GET /api/status` needs the token and carries the monitor's history of the fake
//! 127.0.56.x hosts (refused at once, so every sample says down).

use crate::util::{free_port, http_get as get, sample_conf, wait_for, TestHome, SAMPLE_INIT};

const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";

/// The URLs in `src="..."`/`href="..."` attributes and every `scheme://`
/// of the page: none may lead off the server.
fn external_refs(page: &str) -> Vec<String> {
    let lower = page.to_ascii_lowercase();
    let mut bad = Vec::new();
    for attr in ["src=", "href=", "action="] {
        for (i, _) in lower.match_indices(attr) {
            let v = lower[i + attr.len()..].trim_start_matches(['"', '\'']);
            if v.starts_with("//") || v.contains("://") && v.find("://") < v.find(['"', '\'']) {
                bad.push(lower[i..(i + 60).min(lower.len())].to_string());
            }
        }
    }
    for scheme in ["http://", "https://", "url(", "@import"] {
        if let Some(i) = lower.find(scheme) {
            bad.push(lower[i.saturating_sub(20)..(i + 40).min(lower.len())].to_string());
        }
    }
    bad
}

#[test]
fn status_page_and_json_on_loopback() {
    let h = TestHome::new("statuspage");
    let port = free_port();
    h.write(
        "conf/clup.conf",
        &sample_conf(port).replace("probe_interval = 10", "probe_interval = 1"),
    );
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 0, "{out:?}");

    // The page: HTML, no token needed, nothing from elsewhere.
    let (s, ctype, page) = get(port, "/", None);
    assert_eq!((s, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("<title>clup status</title>"), "{page}");
    assert_eq!(external_refs(&page), Vec::<String>::new());
    // The check above catches what it is meant to.
    assert_eq!(
        external_refs("<script src=\"//cdn.example/x.js\"></script>").len(),
        1
    );

    // The JSON: the token as header or query, else 401 without data.
    let (s, ctype, body) = get(port, "/api/status", None);
    assert_eq!((s, ctype.as_str()), (401, "application/json"));
    assert!(!body.contains("127.0.56"), "{body}");
    assert_eq!(
        get(port, "/api/status", Some(("X-Clup-Token", "wrong"))).0,
        401
    );
    let status = || {
        let (s, _, b) = get(port, "/api/status", Some(("X-Clup-Token", TOKEN)));
        assert_eq!(s, 200, "{b}");
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["data"].clone()
    };
    let v = status();
    let c = &v["clusters"][0];
    assert_eq!(c["name"], "cluster01");
    assert_eq!(c["state"], "Frozen");
    assert_eq!(c["nodes"][0]["addr"], "127.0.56.41:5432");
    assert_eq!(c["nodes"][0]["role"], "primary");
    assert_eq!(c["nodes"][1]["role"], "standby");

    // Unfrozen, the monitor probes every second and the history grows.
    assert_eq!(h.run(&["adm", "unfroze"]).code, 0);
    let mut v = serde_json::Value::Null;
    let grew = wait_for(15, || {
        v = status();
        v["clusters"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["history"].as_array().is_some_and(|h| h.len() >= 2))
    });
    assert!(grew, "no history after 15 s: {v}");
    let n = &v["clusters"][0]["nodes"][1];
    assert_eq!(n["seen"], "down", "{n}");
    assert_eq!(n["history"][0][1], "D", "{n}");
    let (t0, t1) = (
        n["history"][0][0].as_u64().unwrap(),
        n["history"][1][0].as_u64().unwrap(),
    );
    assert!(t1 > t0, "{n}");
    let _ = h.run(&["adm", "froze"]);
    assert_eq!(h.run(&["server", "stop"]).code, 0);

    // An empty http_token is refused by the configuration, so the page's
    // login (asked only on a 401) is always there.
    let conf = sample_conf(port).replace(&format!("http_token = {TOKEN}"), "http_token =");
    h.write("conf/clup.conf", &conf);
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("'http_token': must not be empty"),
        "{out:?}"
    );
}
