//! clupserver and clupadm on loopback, without the lab: start/stop/status,
//! double start, init, show, froze/unfroze, get_meta/change_meta, wrong
//! password, HTTP tokens, config errors, server not running.

use crate::util::{free_port, sample_conf, wait_for, TestHome, SAMPLE_INIT};

const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";

fn home(tag: &str) -> (TestHome, u16) {
    let h = TestHome::new(tag);
    let port = free_port();
    h.write("conf/clup.conf", &sample_conf(port));
    h.write("conf/init.json", SAMPLE_INIT);
    (h, port)
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap())
}

#[test]
fn multi_call_names_and_version() {
    let out = std::process::Command::new(crate::util::BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("clup {}\n", clup::VERSION)
    );
    // Called as clupadm through a link, with no command: the usage list.
    let dir = TestHome::new("links");
    let link = dir.root.join("clupadm");
    std::os::unix::fs::symlink(crate::util::BIN, &link).unwrap();
    let out = std::process::Command::new(&link)
        .env("CLUP_HOME", &dir.root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // On stdout after the banner line, as the manual shows it.
    let err = String::from_utf8_lossy(&out.stdout);
    assert_eq!(err.lines().next(), Some(clup::banner().as_str()));
    for cmd in [
        "init",
        "show",
        "get_last_lsn",
        "repl_delay",
        "log",
        "froze",
        "repair",
        "unfroze",
        "switch",
        "change_meta",
        "get_meta",
        "show_task",
        "task_log",
    ] {
        assert!(
            err.contains(&format!("      {cmd:<15} : ")),
            "{cmd} missing from usage:\n{err}"
        );
    }
}

#[test]
fn server_not_running_is_exit_3_with_reason() {
    let (h, _) = home("notrunning");
    let out = h.run(&["adm", "show"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        out.stdout,
        format!(
            "{}\nCan not connect clupserver: [Errno 111] Connection refused\n",
            clup::banner()
        )
    );
    let out = h.run(&["adm", "-q", "show"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        out.stdout,
        "Can not connect clupserver: [Errno 111] Connection refused\n"
    );
    let out = h.run(&["server", "status"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .ends_with(" INFO Complete configuration loading.\nProgram is not running.\n"),
        "{}",
        out.stdout
    );
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let (h, _) = home("init");
    let out = h.run(&["adm", "-q", "init"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("Initialized 1 cluster(s)"),
        "{}",
        out.stdout
    );
    let out = h.run(&["adm", "init"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    let out = h.run(&["adm", "init", "--force"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(h.read("data/meta.json").contains("\"version\": 2"));
    // A bad init.json names the cluster, db and field, and changes nothing.
    h.write(
        "bad.json",
        &SAMPLE_INIT.replacen("\"port\": 5432", "\"port\": \"x\"", 1),
    );
    let bad = h.root.join("bad.json");
    let out = h.run(&["adm", "init", "--force", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("cluster 'cluster01', db 1, field 'port'"),
        "{}",
        out.stderr
    );
    assert!(h.read("data/meta.json").contains("\"version\": 2"));
}

#[test]
fn bad_config_stops_start_with_file_line_key() {
    let (h, _) = home("badconf");
    h.run(&["adm", "init"]);
    let conf = h
        .read("conf/clup.conf")
        .replace("probe_interval = 10", "probe_interval = often");
    h.write("conf/clup.conf", &conf);
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("conf/clup.conf:11: key 'probe_interval': invalid value 'often'"),
        "{}",
        out.stderr
    );
    assert_eq!(h.run(&["server", "status"]).code, 1);
}

#[test]
fn start_show_froze_tokens_stop() {
    let (h, port) = home("lifecycle");
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 0, "{out:?}");
    let st = h.run(&["server", "status", "-q"]);
    assert_eq!(st.code, 0);
    let last = st.stdout.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("Program(") && st.stdout.ends_with(") is running.\n"),
        "{}",
        st.stdout
    );

    // Double start is refused and names the running pid.
    let again = h.run(&["server", "start"]);
    assert_eq!(again.code, 1);
    assert_eq!(
        again.stderr.trim(),
        last.replace("is running", "is already running")
    );

    // The cluster starts frozen (its hosts do not exist).
    let show = h.run(&["adm", "show"]);
    assert_eq!(show.code, 0, "{show:?}");
    assert!(
        show.stdout.contains(
            "cluster01       Frozen 127.0.56.40       127.0.56.45       127.0.56.41       "
        ),
        "{}",
        show.stdout
    );
    assert!(show.stdout.contains("cluster01     4 Normal           0 127.0.56.44       5432 127.0.56.44       postgres   /home/postgres/pgdata"));

    let json: serde_json::Value =
        serde_json::from_str(&h.run(&["adm", "show", "--json"]).stdout).unwrap();
    assert_eq!(json["dbs"][0]["state"], "Normal");

    let out = h.run(&["adm", "froze", "-c", "cluster01"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("already frozen"), "{}", out.stderr);
    assert_eq!(h.run(&["adm", "unfroze"]).code, 0);
    let json: serde_json::Value =
        serde_json::from_str(&h.run(&["adm", "show", "--json"]).stdout).unwrap();
    assert_eq!(json["clusters"][0]["state"], "Normal");
    assert_eq!(h.run(&["adm", "froze"]).code, 0);
    assert!(h
        .run(&["adm", "show"])
        .stdout
        .contains("cluster01       Frozen"));

    // get_meta / change_meta round trip; an invalid change is refused.
    let meta = h.run(&["adm", "get_meta", "-q", "-c", "cluster01"]).stdout;
    let bad = meta.replacen("\"is_primary\": 0", "\"is_primary\": 1", 1);
    let out = h.run_stdin(&["adm", "change_meta", "-c", "cluster01"], Some(&bad));
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("exactly one database must have is_primary 1"),
        "{}",
        out.stderr
    );
    let mut good: serde_json::Value = serde_json::from_str(&meta).unwrap();
    good["db_list"][0]["state"] = 2.into();
    let good = good.to_string();
    let out = h.run_stdin(&["adm", "change_meta", "-c", "cluster01"], Some(&good));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(h
        .run(&["adm", "show"])
        .stdout
        .contains("cluster01     1 Fault "));

    // HTTP interface for programs.
    let (s, body) = http_get(port, &format!("/cluster01/get_lb_host?token={TOKEN}"));
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["data"]["backends"],
        serde_json::json!(["127.0.56.42:5432", "127.0.56.43:5432", "127.0.56.44:5432"])
    );
    assert_eq!(http_get(port, "/cluster01/get_lb_host?token=wrong").0, 401);
    assert_eq!(http_get(port, "/cluster01/get_lb_host").0, 401);
    assert_eq!(
        http_get(port, &format!("/nosuch/get_lb_host?token={TOKEN}")).0,
        404
    );
    assert_eq!(http_get(port, "/health").0, 200);

    // Wrong password: a clear refusal.
    let conf = h.read("conf/clup.conf");
    h.write(
        "conf/clup.conf",
        &conf.replace("ha_rpc_pass = csha_cluster_pass", "ha_rpc_pass = guess"),
    );
    let out = h.run(&["adm", "show"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("wrong or missing ha_rpc_pass"),
        "{}",
        out.stderr
    );
    h.write("conf/clup.conf", &conf);

    let out = h.run(&["server", "stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.ends_with("Program stopped.\n"), "{}", out.stdout);
    assert!(wait_for(5, || h.run(&["server", "status"]).code == 1));
    let log = h.read("logs/clupserver.log");
    for line in [
        "INFO Start loading configuration ...",
        "INFO Complete configuration loading.",
        "INFO Start ha checking thread...",
        "INFO Start health checking thread...",
        "INFO Starting web server...",
        "INFO Complete the startup of web server.",
        &format!("INFO Web Server at port {port} ..."),
        "INFO Program stopped.",
    ] {
        assert!(log.contains(line), "log lacks '{line}':\n{log}");
    }
    for secret in ["csha_cluster_pass", TOKEN, "8e722522"] {
        assert!(!log.contains(secret), "secret in log:\n{log}");
    }
}

#[test]
fn secrets_are_not_on_the_command_line_or_in_errors() {
    let (h, _) = home("secrets");
    h.run(&["adm", "init"]);
    assert_eq!(h.run(&["server", "start"]).code, 0);
    let pid = h.read("run/clupserver.pid").trim().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(
        !cmdline.contains("csha_cluster_pass") && !cmdline.contains(TOKEN),
        "{cmdline}"
    );
    assert_eq!(h.run(&["server", "stop"]).code, 0);
}

/// logrotate moves the log away and sends SIGHUP (conf/clupserver.logrotate):
/// clupserver writes on in a new file at the old path, and the moved file
/// keeps every line from before; no line is split between the two.
#[test]
fn sighup_reopens_the_log_after_a_rotation() {
    let (h, _) = home("sighup");
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    assert_eq!(h.run(&["server", "start"]).code, 0);
    let pid: i32 = h.read("run/clupserver.pid").trim().parse().unwrap();
    let log = h.root.join("logs/clupserver.log");
    let moved = h.root.join("logs/clupserver.log.1");
    assert!(wait_for(10, || h
        .read("logs/clupserver.log")
        .contains("Web Server at port")));
    std::fs::rename(&log, &moved).unwrap();
    // Still written to the moved file until the signal.
    // (The sample cluster starts frozen.)
    assert_eq!(h.run(&["adm", "unfroze", "-c", "cluster01"]).code, 0);
    // SAFETY: kill(2) on the server this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        wait_for(10, || h
            .read("logs/clupserver.log")
            .contains("Received SIGHUP: log file reopened")),
        "no new log after SIGHUP; moved one:\n{}",
        std::fs::read_to_string(&moved).unwrap_or_default()
    );
    assert_eq!(h.run(&["adm", "froze", "-c", "cluster01"]).code, 0);
    let old = std::fs::read_to_string(&moved).unwrap();
    assert!(old.contains("Web Server at port"), "{old}");
    assert!(!old.contains("Received SIGHUP"), "{old}");
    for text in [&old, &h.read("logs/clupserver.log")] {
        for line in text.lines() {
            assert!(
                line.len() >= 24 && line.as_bytes()[4] == b'-',
                "a broken line: {line:?}"
            );
        }
    }
    assert_eq!(h.run(&["server", "stop"]).code, 0);
    assert!(h.read("logs/clupserver.log").contains("Program stopped."));
}
