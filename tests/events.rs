//! Events on loopback, without the lab: clupserver records froze and
//! unfroze, runs event_command with the details in its environment, serves
//! GET /events?since=N with http_token, and clupadm events prints them
//! (once, as JSON, and following); the numbers go on after a restart.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::util::{free_port, sample_conf, wait_for, TestHome, BIN, SAMPLE_INIT};

const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";

fn get(port: u16, path: &str, token: Option<&str>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        req = req.header("X-Clup-Token", t);
    }
    let mut r = req.call().unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The events served now with a number above `since`.
fn events(port: u16, since: u64) -> Vec<Value> {
    let (s, v) = get(port, &format!("/events?since={since}"), Some(TOKEN));
    assert_eq!(s, 200, "{v}");
    v["data"]["events"].as_array().cloned().unwrap_or_default()
}

/// The number of the last served event of `kind`.
fn seq_of(list: &[Value], kind: &str) -> Option<u64> {
    list.iter()
        .rev()
        .find(|e| e["event"] == kind)
        .and_then(|e| e["seq"].as_u64())
}

#[test]
fn events_are_served_hooked_followed_and_numbered_across_a_restart() {
    let h = TestHome::new("events");
    let port = free_port();
    let hook_out = h.root.join("hook.out");
    // The hook writes its CLUP_ variables, one block per event, and prints
    // a line (logged) that holds a secret, which the log must not show.
    let conf = format!(
        "{}event_command = (env | grep '^CLUP_' | sort; echo --) >> {}; echo \"hook ran $CLUP_EVENT_SEQ {TOKEN}\"\nevent_timeout = 5\n",
        sample_conf(port),
        hook_out.display()
    );
    h.write("conf/clup.conf", &conf);
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    assert_eq!(h.run(&["server", "start"]).code, 0);

    // The sample cluster starts frozen.
    assert_eq!(h.run(&["adm", "unfroze", "-c", "cluster01"]).code, 0);
    assert_eq!(h.run(&["adm", "froze", "-c", "cluster01"]).code, 0);
    let all = events(port, 0);
    let unfroze = seq_of(&all, "unfroze").expect("an unfroze event");
    let froze = seq_of(&all, "froze").expect("a froze event");
    assert!(unfroze < froze, "{all:?}");
    let e = all.iter().find(|e| e["seq"] == unfroze).unwrap();
    assert_eq!(e["cluster"], "cluster01");
    assert_eq!(e["db_id"], Value::Null);
    assert_eq!(e["reason"], "unfrozen by clupadm unfroze");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");

    // since filters; the token is required; since must be a number.
    let later: Vec<u64> = events(port, unfroze)
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(later.iter().all(|s| *s > unfroze) && later.contains(&froze));
    assert_eq!(get(port, "/events", None).0, 401);
    assert_eq!(get(port, "/events", Some("wrong")).0, 401);
    assert_eq!(get(port, "/events?since=x", Some(TOKEN)).0, 400);

    // The hook saw each event in its environment, in order.
    assert!(
        wait_for(10, || h.read("hook.out").matches("--\n").count() >= 2),
        "{}",
        h.read("hook.out")
    );
    let blocks = h.read("hook.out");
    let first = blocks.split("--\n").next().unwrap();
    for want in [
        "CLUP_CLUSTER=cluster01\n".to_string(),
        "CLUP_DB_ID=\n".to_string(),
        "CLUP_EVENT=unfroze\n".to_string(),
        format!("CLUP_EVENT_SEQ={unfroze}\n"),
        "CLUP_NEW_PRIMARY=\n".to_string(),
        "CLUP_REASON=unfrozen by clupadm unfroze\n".to_string(),
    ] {
        assert!(first.contains(&want), "hook env lacks {want:?}:\n{first}");
    }
    assert!(first.contains("CLUP_TIME=20"), "{first}");
    assert!(blocks.find("CLUP_EVENT=unfroze") < blocks.find("CLUP_EVENT=froze\n"));
    assert!(wait_for(10, || h
        .read("logs/clupserver.log")
        .contains(&format!("Event hook[{froze} froze] exited 0"))));
    let log = h.read("logs/clupserver.log");
    assert!(
        log.contains(&format!(
            "Event hook[{unfroze} unfroze] stdout: hook ran {unfroze} ******"
        )),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the token reached the log");

    // clupadm events: the fixed layout, --since, --json.
    let out = h.run(&["adm", "-q", "events", "--since", &(unfroze - 1).to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    let first_line = out.stdout.lines().next().unwrap_or_default();
    let f: Vec<&str> = first_line.splitn(9, ' ').collect();
    assert_eq!(f.len(), 9, "{first_line}");
    assert_eq!(f[0], unfroze.to_string());
    assert_eq!(&f[2..8], ["unfroze", "cluster01", "-", "-", "-", "-"]);
    assert_eq!(f[8], "unfrozen by clupadm unfroze");
    let out = h.run(&["adm", "events", "--json", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    let kinds: Vec<String> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].to_string())
        .collect();
    assert!(kinds.contains(&"\"froze\"".to_string()), "{kinds:?}");
    let out = h.run(&["adm", "-q", "events", "-c", "nosuch"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));

    // -f prints what comes next, as it comes.
    let mut child = Command::new(BIN)
        .args(["adm", "-q", "events", "-f", "--since", &froze.to_string()])
        .env("CLUP_HOME", &h.root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(h.run(&["adm", "unfroze"]).code, 0);
    // (A round of the unfrozen cluster may record events of its own.)
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let mut line = None;
    while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(std::time::Instant::now())) {
        if l.contains(" unfroze cluster01 ") {
            line = Some(l);
            break;
        }
    }
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let line = line.expect("clupadm events -f printed the new event");
    let newest: u64 = line.split(' ').next().unwrap().parse().unwrap();
    assert!(newest > froze);
    assert_eq!(h.run(&["adm", "froze"]).code, 0);

    // A restart: the numbers go on from the saved ring, none given twice.
    let before = events(port, 0);
    let last = before.last().and_then(|e| e["seq"].as_u64()).unwrap();
    assert_eq!(h.run(&["server", "stop"]).code, 0);
    assert!(h.read("data/events.json").contains("\"unfroze\""));
    assert_eq!(h.run(&["server", "start"]).code, 0);
    assert_eq!(events(port, 0)[..before.len()], before[..]);
    assert_eq!(h.run(&["adm", "unfroze"]).code, 0);
    assert_eq!(h.run(&["adm", "froze"]).code, 0);
    let all = events(port, 0);
    let after = seq_of(&all, "unfroze").expect("unfroze after the restart");
    assert!(after > last, "{after} after {last}");
    let seqs: Vec<u64> = all.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(h.run(&["server", "stop"]).code, 0);
}
