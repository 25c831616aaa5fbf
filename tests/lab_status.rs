//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`) runs inside the lab's client namespace, opens clupserver's
//! page on mon with the token in the URL fragment, and its rendered DOM must
//! show pg01 as the primary; after pg01 is powered off, the new primary and
//! pg01's fall in the history strip. Screenshots of both go to the lab dir
//! (and to docs/ with `CLUP_UPDATE_DOCS=1`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::lab::{ip, Lab, HTTP_TOKEN, LAB_DIR, MON};

/// Chromium's flags: headless, no sandbox (root), and none of its own
/// traffic (the lab has no way out anyway).
const CHROMIUM: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
];

fn page_url() -> String {
    format!("http://{MON}:8080/#token={HTTP_TOKEN}")
}

/// Run Chromium in the lab's cli namespace with `args` and the page's URL;
/// stdout (the DOM for --dump-dom).
fn chromium(args: &[&str], budget_ms: u32) -> String {
    let profile = PathBuf::from(format!("{LAB_DIR}/chromium-home"));
    std::fs::create_dir_all(&profile).unwrap();
    let budget = format!("--virtual-time-budget={budget_ms}");
    let out = Command::new("ip")
        .args(["netns", "exec", "clab-cli", "env"])
        .arg(format!("HOME={}", profile.display()))
        .args(["timeout", "60", "chromium"])
        .args(CHROMIUM)
        .arg(format!(
            "--user-data-dir={}",
            profile.join("data").display()
        ))
        .arg(&budget)
        .args(args)
        .arg(page_url())
        .output()
        .expect("run chromium (apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node rows of a dumped DOM: (host:port, role, state, the row's HTML).
fn node_rows(dom: &str) -> Vec<(String, String, String, String)> {
    let attr = |tag: &str, name: &str| {
        let key = format!("{name}=\"");
        let i = tag.find(&key)? + key.len();
        Some(tag[i..i + tag[i..].find('"')?].to_string())
    };
    dom.split("<tr class=\"node\"")
        .skip(1)
        .filter_map(|chunk| {
            let tag = &chunk[..chunk.find('>')?];
            let row = &chunk[..chunk.find("</tr>")?];
            Some((
                attr(tag, "data-addr")?,
                attr(tag, "data-role")?,
                attr(tag, "data-state")?,
                row.to_string(),
            ))
        })
        .collect()
}

fn primaries(rows: &[(String, String, String, String)]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.1 == "primary")
        .map(|r| r.0.clone())
        .collect()
}

/// A screenshot of the page into the lab dir (and docs/ on request);
/// returns its size.
fn screenshot(name: &str) -> u64 {
    let file = format!("{LAB_DIR}/{name}");
    let _ = std::fs::remove_file(&file);
    chromium(
        &[&format!("--screenshot={file}"), "--window-size=1280,900"],
        5000,
    );
    let png = std::fs::read(&file).expect("no screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{file} is no PNG");
    if std::env::var("CLUP_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name);
        std::fs::write(&docs, &png).unwrap();
    }
    png.len() as u64
}

// The history strip's colours (status.html): a round that saw the node
// as primary, as standby, or down.
const PRIMARY: &str = "fill=\"#3b6fd8\"";
const STANDBY: &str = "fill=\"#3aa35c\"";
const DOWN: &str = "fill=\"#d93a2f\"";

#[test]
fn lab_status_page_shows_a_failover() {
    let mut lab = Lab::take(1);
    lab.start_server();
    assert!(
        lab.wait(15, |l| l.log().contains("3 standby(s) ok")),
        "{}",
        lab.log()
    );
    // Some rounds of history, so the strips have something to show.
    std::thread::sleep(std::time::Duration::from_secs(15));

    let pg01 = format!("{}:5432", ip("pg01"));
    let dom = chromium(&["--dump-dom"], 5000);
    assert!(
        dom.contains("data-updated="),
        "the page never rendered:\n{dom}"
    );
    // The token left the address bar and no login was asked for.
    assert!(dom.contains("<section id=\"login\" hidden"), "{dom}");
    // Without a /events route (404) its panel stays hidden; with one it
    // shows what that route answers.
    let events = lab.exec(
        "cli",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("X-Clup-Token: {HTTP_TOKEN}"),
            &format!("http://{MON}:8080/events?since=0"),
        ],
    );
    if events.stdout.trim() == "404" {
        assert!(dom.contains("<section id=\"events\" hidden"), "{dom}");
    }
    let rows = node_rows(&dom);
    assert_eq!(rows.len(), 4, "{dom}");
    assert_eq!(primaries(&rows), vec![pg01.clone()], "{dom}");
    for (addr, role, state, row) in &rows {
        assert_eq!(state, "Normal", "{addr}");
        let seen = if role == "primary" { PRIMARY } else { STANDBY };
        assert!(row.contains(seen), "{addr}'s history is not {seen}:\n{row}");
        assert!(!row.contains(DOWN), "{addr} seen down:\n{row}");
    }
    assert!(
        dom.contains("write VIP 10.213.0.40 on 10.213.0.41"),
        "{dom}"
    );
    let before = screenshot("status-before.png");

    let t0 = Instant::now();
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    let mut dom = String::new();
    let mut shown: Option<f64> = None;
    let moved = lab.wait(60, |_| {
        dom = chromium(&["--dump-dom"], 2000);
        let rows = node_rows(&dom);
        let p = primaries(&rows);
        if p.len() != 1 || p[0] == pg01 {
            return false;
        }
        shown.get_or_insert(t0.elapsed().as_secs_f64());
        // The round that saw pg01 down publishes after its failover, and the
        // new primary is seen as one from the next round on.
        let has = |addr: &str, fill: &str| rows.iter().any(|r| r.0 == addr && r.3.contains(fill));
        has(&pg01, DOWN) && has(&p[0], PRIMARY)
    });
    assert!(moved, "no new primary on the page:\n{dom}\n{}", lab.log());
    eprintln!(
        "status page: power-off to a new primary on the page {:.1} s, with its history {:.1} s",
        shown.unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    );
    // The meta agrees, and the page shows the history of the failover:
    // pg01 went from primary to down, the new primary from standby.
    let v = lab.show();
    let meta_primary = v["dbs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["primary"] == 1)
        .map(|d| format!("{}:{}", d["host"].as_str().unwrap(), d["port"]))
        .unwrap();
    let rows = node_rows(&dom);
    let new = primaries(&rows).remove(0);
    assert_eq!(new, meta_primary, "{v}");
    let row = |addr: &str| rows.iter().find(|r| r.0 == addr).unwrap().clone();
    let old = row(&pg01);
    assert_eq!(old.1, "standby", "{}", old.3);
    assert!(
        old.3.contains(PRIMARY) && old.3.contains(DOWN),
        "pg01's history shows no fall:\n{}",
        old.3
    );
    let promoted = row(&new).3;
    assert!(
        promoted.contains(STANDBY) && promoted.contains(PRIMARY),
        "{new}'s history shows no promotion (yet?):\n{promoted}"
    );
    // Let the history show some rounds of the new primary.
    std::thread::sleep(std::time::Duration::from_secs(8));
    let after = screenshot("status-after.png");
    eprintln!("screenshots: before {before} bytes, after {after} bytes");
    assert!(before < 400_000 && after < 400_000);
}
