//! Logs that live for years (issue 17): logrotate's move and SIGHUP, over
//! and over while clupserver fails a primary over, lose no line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lab::{Lab, WRITE_VIP};

/// Move the log away (as logrotate does) and send SIGHUP, inside the
/// monitor's host (its own PID namespace: the pid file holds its pid
/// there), every 100 ms until `stop`; how many rotations.
fn rotate_until(home: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            // Not before the server has opened the new file (its SIGHUP
            // handling takes a moment): no file, no rotation this time.
            let script = format!(
                "cd {home} && [ -s logs/clupserver.log ] || exit 3; mv logs/clupserver.log logs/clupserver.log.{} && kill -HUP $(cat run/clupserver.pid)",
                n + 1
            );
            let out = std::process::Command::new(crate::lab::repo().join("scripts/lab"))
                .args(["exec", "mon", "sh", "-c", &script])
                .output()
                .expect("scripts/lab exec");
            match out.status.code() {
                Some(0) => n += 1,
                Some(3) => {}
                _ => panic!("rotation {}: {out:?}", n + 1),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        n
    })
}

/// The message of a task log line ("2026-12-06 07:21:45:INFO: msg").
fn task_message(line: &str) -> Option<&str> {
    ["INFO: ", "ERROR: ", "WARNING: "]
        .iter()
        .find_map(|k| line.split_once(&format!(":{k}")).map(|(_, m)| m))
}

#[test]
fn lab_logs_rotation_during_failover_loses_no_line() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(
        lab.wait(15, |l| l.log().contains("3 standby(s) ok")),
        "{}",
        lab.log()
    );
    let logs = lab.home.join("logs");
    let stop = Arc::new(AtomicBool::new(false));
    let rotator = rotate_until(lab.home.display().to_string(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    let back = lab.wait(60, |l| {
        l.sql("cli", WRITE_VIP, "cs_sys_ha", "select 1").is_ok()
            && std::fs::read_dir(l.home.join("data/tasks"))
                .map(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .lines()
                            .any(|l| {
                                l.contains("switch to new host(") && l.ends_with(") completed.")
                            })
                    })
                })
                .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let rotations = rotator.join().expect("the rotator panicked");
    eprintln!(
        "{rotations} rotations; failover done {:.1} s after the power-off",
        t0.elapsed().as_secs_f64()
    );
    // The logs in the order they were written: .1, .2, ..., then the live
    // one. Each whole: it begins with a timestamp and ends with a newline,
    // never a line torn between two files.
    let whole = |name: &str, text: &str| {
        let first = text.lines().next().unwrap_or("");
        assert!(
            text.is_empty()
                || (text.ends_with('\n')
                    && first.len() > 24
                    && first.as_bytes()[4] == b'-'
                    && [" INFO ", " WARNING ", " ERROR ", " DEBUG "]
                        .iter()
                        .any(|k| first[23..].starts_with(k))),
            "{name}: a torn line at its start or end:\n{text}"
        );
    };
    let mut union = String::new();
    let mut files_with_failover = 0;
    for n in 1..=rotations {
        let name = format!("clupserver.log.{n}");
        let text =
            std::fs::read_to_string(logs.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        whole(&name, &text);
        if text.contains("Failover primary database(10.213.0.41:5432)") {
            files_with_failover += 1;
        }
        union += &text;
    }
    let live = lab.log();
    whole("clupserver.log", &live);
    union += &live;
    assert!(back, "no failover:\n{union}");
    // The rotations fell in the middle of the failover.
    assert!(
        files_with_failover >= 2,
        "the failover's lines are in {files_with_failover} rotated file(s): rotations too slow to prove anything"
    );
    // Every line of the failover's task log is in the server's logs, in order.
    let task = std::fs::read_dir(lab.home.join("data/tasks"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .find(|t| t.contains("Failover primary database(10.213.0.41:5432)"))
        .expect("the failover's task log");
    let mut at = 0;
    let mut checked = 0;
    for m in task.lines().filter_map(task_message) {
        match union[at..].find(m) {
            Some(i) => at += i + m.len(),
            None => panic!("task line missing from the rotated logs (or out of order): {m:?}"),
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} task lines:\n{task}");
    eprintln!("{checked} failover lines found in order across {files_with_failover} rotated files");
}
