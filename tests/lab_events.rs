//! Event hooks end to end in the lab: a hook that hangs never delays a
//! failover, and the hooks of a failover run afterwards, in order, with the
//! old and new primaries in their environment.

use std::time::{Duration, Instant};

use crate::lab::{ip, Lab, WRITE_VIP};

/// The `CLUP_` blocks the hook wrote, each as (CLUP_EVENT, its variables).
fn hook_blocks(text: &str) -> Vec<(String, String)> {
    text.split("--\n")
        .filter(|b| b.contains("CLUP_EVENT="))
        .map(|b| {
            let ev = b
                .lines()
                .find_map(|l| l.strip_prefix("CLUP_EVENT="))
                .unwrap_or_default()
                .to_string();
            (ev, b.to_string())
        })
        .collect()
}

/// Seconds since the epoch of a clupserver log line's timestamp
/// ("2026-12-06 07:24:28,068 INFO ..."), by date(1).
fn log_time(line: &str) -> f64 {
    let ts = line.get(..23).unwrap_or_default().replace(',', ".");
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &ts, "+%s.%N"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no time in {line:?}"))
}

/// The hook's latency: from the log line that records an event (froze, on
/// a freeze asked by clupadm) to the hook's first command, in ms.
fn hook_latency(lab: &Lab, out: &std::path::Path) {
    for i in 1..=5 {
        for cmd in ["froze", "unfroze"] {
            assert_eq!(lab.adm(&["-q", cmd, "-c", "cluster01"]).code, 0);
            let ran = lab.wait(5, |_| {
                std::fs::read_to_string(out)
                    .unwrap_or_default()
                    .matches(&format!("CLUP_EVENT={cmd}\n"))
                    .count()
                    >= i
            });
            assert!(ran, "no {cmd} hook:\n{}", lab.log());
        }
    }
    let text = std::fs::read_to_string(out).unwrap();
    let log = lab.log();
    let mut lat = Vec::new();
    for b in text.split("--\n").filter(|b| b.contains("CLUP_EVENT=")) {
        let at: f64 = b
            .lines()
            .find_map(|l| l.strip_prefix("HOOK_AT="))
            .and_then(|v| v.parse().ok())
            .expect("HOOK_AT");
        let seq = b
            .lines()
            .find_map(|l| l.strip_prefix("CLUP_EVENT_SEQ="))
            .expect("CLUP_EVENT_SEQ");
        let line = log
            .lines()
            .find(|l| l.contains(&format!(" INFO Event {seq} ")))
            .unwrap_or_else(|| panic!("no log line of event {seq}:\n{log}"));
        lat.push((at - log_time(line)) * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    assert_eq!(lat.len(), 10, "{text}");
    // The log line is written right after the event is queued: a hook can
    // start before it, never long after.
    assert!(lat[0] > -50.0 && lat[9] < 2000.0, "{lat:?}");
    eprintln!(
        "hook latency (event logged -> hook's first command), 10 events: median {:.0} ms, max {:.0} ms",
        lat[5], lat[9]
    );
    let _ = std::fs::remove_file(out);
}

#[test]
fn lab_events_a_hook_sleeping_60_s_never_delays_the_failover() {
    let mut lab = Lab::take(1);
    let out = lab.home.join("hook.out");
    let _ = std::fs::remove_file(&out);
    // Every hook writes its variables; the failover's first one then sleeps
    // 60 s, and is killed after event_timeout (30 s).
    let conf = std::fs::read_to_string(lab.home.join("conf/clup.conf")).unwrap();
    std::fs::write(
        lab.home.join("conf/clup.conf"),
        format!(
            "{conf}\nevent_command = (echo \"HOOK_AT=$(date +%s.%N)\"; env | grep '^CLUP_' | sort; echo --) >> {}; if [ \"$CLUP_EVENT\" = failover_begin ]; then sleep 60; fi\nevent_timeout = 30\n",
            out.display()
        ),
    )
    .unwrap();
    lab.start_server();
    assert!(lab.wait(10, |l| l.log().contains("3 standby(s) ok")));
    hook_latency(&lab, &out);

    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    let back = lab.wait(15, |l| {
        l.sql("cli", WRITE_VIP, "cs_sys_ha", "select 1").is_ok()
            && l.vip_holder(WRITE_VIP).is_some_and(|h| h != "pg01")
    });
    let outage = t0.elapsed();
    assert!(back, "writes not back within 15 s:\n{}", lab.log());
    eprintln!(
        "failover with a sleeping hook: {:.1} s from power-off to the write VIP answering",
        outage.as_secs_f64()
    );
    let new = lab.vip_holder(WRITE_VIP).unwrap();
    let new_addr = format!("{}:5432", ip(&new));
    let old_addr = format!("{}:5432", ip("pg01"));

    // The failover is over and recorded, while its first hook still sleeps:
    // no hook after it has run yet.
    assert!(
        lab.wait(10, |l| l
            .adm(&["-q", "events"])
            .stdout
            .contains(" failover_end cluster01 ")),
        "{}",
        lab.log()
    );
    let listed = lab.adm(&["-q", "events"]).stdout;
    let pos = |kind: &str| listed.find(&format!(" {kind} cluster01 "));
    assert!(pos("failover_begin") < pos("promote") && pos("promote") < pos("failover_end"));
    assert!(
        listed
            .lines()
            .any(|l| l.contains(" failover_end cluster01 ")
                && l.contains(&format!("{old_addr} {new_addr} failover completed"))),
        "{listed}"
    );
    // The task's own measure: far below the hook's 30 s.
    let ms: u64 = listed
        .split("failover completed after ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the failover's duration in failover_end");
    assert!(ms < 10_000, "the failover task took {ms} ms");
    eprintln!("failover task: {ms} ms");
    let seen = hook_blocks(&std::fs::read_to_string(&out).unwrap_or_default());
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "checked too late to tell"
    );
    assert_eq!(
        seen.last().map(|(e, _)| e.as_str()),
        Some("failover_begin"),
        "{seen:?}"
    );
    let begin = &seen.last().unwrap().1;
    assert!(
        begin.contains(&format!("CLUP_OLD_PRIMARY={old_addr}\n")),
        "{begin}"
    );
    assert!(
        begin.contains(&format!("CLUP_NEW_PRIMARY={new_addr}\n")),
        "{begin}"
    );
    assert!(begin.contains("CLUP_CLUSTER=cluster01\n"), "{begin}");

    // After event_timeout the sleeping hook is killed and the others run,
    // in the order of the events.
    assert!(
        lab.wait(60, |_| std::fs::read_to_string(&out)
            .is_ok_and(|t| t.contains("CLUP_EVENT=failover_end"))),
        "{}",
        lab.log()
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let seen = hook_blocks(&text);
    let order: Vec<&str> = seen
        .iter()
        .map(|(e, _)| e.as_str())
        .filter(|e| ["failover_begin", "promote", "failover_end"].contains(e))
        .collect();
    assert_eq!(
        order,
        ["failover_begin", "promote", "failover_end"],
        "{text}"
    );
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CLUP_EVENT_SEQ="))
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let promote = &seen.iter().find(|(e, _)| e == "promote").unwrap().1;
    assert!(
        promote.contains(&format!("CLUP_OLD_PRIMARY={old_addr}\n")),
        "{promote}"
    );
    assert!(
        promote.contains(&format!("CLUP_NEW_PRIMARY={new_addr}\n")),
        "{promote}"
    );
    assert!(
        promote.contains(&format!("CLUP_HOST={}\n", ip(&new))),
        "{promote}"
    );
    assert!(
        seen.iter()
            .any(|(e, b)| e == "fault" && b.contains("CLUP_DB_ID=1\n")),
        "the old primary marked Fault: {text}"
    );
    assert!(
        lab.log()
            .contains("failover_begin] killed after 30 s (event_timeout)"),
        "{}",
        lab.log()
    );
}
