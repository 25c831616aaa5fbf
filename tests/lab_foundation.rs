//! Foundation end to end in the lab: clupserver runs in `mon`, clupadm talks
//! to it there, cli reaches its HTTP interface over the lab network.

use crate::lab::{Lab, HTTP_TOKEN, MON};

fn curl(lab: &Lab, path: &str) -> (String, String) {
    let url = format!("http://{MON}:8080{path}");
    let out = lab.exec(
        "cli",
        &["curl", "-s", "-m", "5", "-w", "\n%{http_code}", &url],
    );
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
    (code.to_string(), body.to_string())
}

#[test]
fn lab_foundation_server_in_mon() {
    let mut lab = Lab::take(2);

    // Not running yet: clupadm says so and exits 3.
    let out = lab.adm(&["show"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout.contains("Can not connect clupserver"),
        "{}",
        out.stdout
    );

    lab.start_server();
    let out = lab.clup(&["server", "start"]);
    assert_eq!(out.code, 1, "double start: {out:?}");
    assert!(out.stderr.contains("is already running"), "{}", out.stderr);
    let st = lab.clup(&["server", "status"]);
    assert_eq!(st.code, 0);
    assert!(st.stdout.contains(") is running."), "{}", st.stdout);

    let show = lab.adm(&["show"]);
    assert_eq!(show.code, 0, "{show:?}");
    assert!(show.stdout.contains("cluster01       Normal 10.213.0.40       10.213.0.45       10.213.0.42       ['10.213.0.43:8082', '10.213.0.44:8082']"), "{}", show.stdout);
    assert!(show.stdout.contains("cluster01     1 Normal           1 10.213.0.41       5432 10.213.0.41       postgres   /var/lib/postgresql/pgdata"), "{}", show.stdout);

    assert_eq!(lab.adm(&["froze", "-c", "cluster01"]).code, 0);
    assert!(lab.adm(&["show"]).stdout.contains("cluster01       Frozen"));
    assert_eq!(lab.adm(&["unfroze", "-c", "cluster01"]).code, 0);
    assert!(lab.adm(&["show"]).stdout.contains("cluster01       Normal"));

    // The HTTP interface from another host of the lab.
    let (code, body) = curl(&lab, &format!("/cluster01/get_lb_host?token={HTTP_TOKEN}"));
    assert_eq!(code, "200", "{body}");
    assert!(
        body.contains("[\"10.213.0.42:5432\",\"10.213.0.43:5432\",\"10.213.0.44:5432\"]"),
        "{body}"
    );
    assert_eq!(curl(&lab, "/cluster01/get_lb_host?token=wrong").0, "401");
    assert_eq!(curl(&lab, "/cluster01/get_lb_host").0, "401");
    assert_eq!(
        curl(&lab, &format!("/nosuch/get_lb_host?token={HTTP_TOKEN}")).0,
        "404"
    );

    // Wrong password from clupadm.
    let conf_path = lab.home.join("conf/clup.conf");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    std::fs::write(
        &conf_path,
        conf.replace("ha_rpc_pass = lab_rpc_pass", "ha_rpc_pass = nope"),
    )
    .unwrap();
    let out = lab.adm(&["show"]);
    std::fs::write(&conf_path, &conf).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("wrong or missing ha_rpc_pass"),
        "{}",
        out.stderr
    );

    let out = lab.clup(&["server", "stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.ends_with("Program stopped.\n"), "{}", out.stdout);
    assert_eq!(lab.clup(&["server", "status"]).code, 1);
    let log = lab.log();
    assert!(log.contains("INFO Web Server at port 8080 ..."), "{log}");
    for secret in ["lab_pg_pass", "lab_rpc_pass", HTTP_TOKEN, "lab_cstlb_token"] {
        assert!(
            !log.contains(secret),
            "secret '{secret}' in the log:\n{log}"
        );
    }
}
