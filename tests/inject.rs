//! Shell injection: every value that reaches a remote script (os_user,
//! pgdata, host, interface, repl_app_name, pg_bin_dir, passwords) either is
//! refused by validation or arrives as one literal argument.
//!
//! The executors run against a [`LocalSh`] remote: the script they would
//! send over ssh runs under `sh` here, in a temp dir, with PATH holding only
//! fake commands that record their argv (NUL-separated, one file per call).
//! The values are hostile and bypass validation on purpose (meta.rs would
//! refuse them); the checks: `sh -n` parses every script, a value shows up
//! only as a whole argument (never spliced into a command), no unexpected
//! command ran, no marker file appeared, and no password is in a script,
//! a label or an argv (they go through stdin).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use clup::exec::cmd::{CommandError, Output};
use clup::exec::ssh::Remote;
use clup::exec::{pgctl, recovery, ssh, vip};
use clup::model::config::Config;
use clup::model::meta::Db;

use crate::util::{sample_conf, TestHome};

/// Commands the fakes stand in for; anything else that runs is injected.
const FAKES: &[&str] = &[
    "runuser", "tee", "chmod", "sync", "mv", "rm", "cat", "tail", "ip", "arping", "timeout",
    "bash", "touch", "pg_ctl",
];
const EXPECTED: &[&str] = &[
    "runuser", "tee", "chmod", "sync", "mv", "rm", "cat", "tail", "ip", "arping", "timeout",
];

struct Lab {
    home: TestHome,
    fakebin: PathBuf,
    rec: PathBuf,
    marker: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let home = TestHome::new(&format!("inject-{tag}"));
        let fakebin = home.root.join("fakebin");
        let rec = home.root.join("rec");
        std::fs::create_dir_all(&fakebin).unwrap();
        std::fs::create_dir_all(&rec).unwrap();
        let marker = home.root.join("pwned");
        for name in FAKES {
            write_fake(&fakebin.join(name));
        }
        // `id -un` answers another user, so as_user goes through runuser.
        let id = fakebin.join("id");
        std::fs::write(&id, "#!/bin/sh\necho clupfake\n").unwrap();
        chmod_x(&id);
        Lab {
            home,
            fakebin,
            rec,
            marker,
        }
    }

    /// Recorded calls, as argv lists (argv[0] is the command's base name).
    fn calls(&self) -> Vec<Vec<String>> {
        let mut files: Vec<_> = std::fs::read_dir(&self.rec)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let b = std::fs::read(f).unwrap();
                b.split(|c| *c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .collect()
    }

    fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.rec);
        std::fs::create_dir_all(&self.rec).unwrap();
    }
}

fn chmod_x(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A fake command: records its argv; `runuser ... status` exits 1 so the
/// start path goes on to start; everything else exits 0.
fn write_fake(p: &Path) {
    std::fs::write(
        p,
        "#!/bin/sh\n\
         f=\"$REC/$(/bin/date +%s%N).$$\"\n\
         printf '%s\\0' \"${0##*/}\" \"$@\" > \"$f\"\n\
         for a; do [ \"$a\" = status ] && exit 1; done\n\
         exit 0\n",
    )
    .unwrap();
    chmod_x(p);
}

/// A Remote that runs the script with local `sh` under the fake PATH and
/// remembers what it was given.
struct LocalSh<'a> {
    lab: &'a Lab,
    seen: Mutex<Vec<(String, String, Vec<u8>)>>,
}

impl Remote for LocalSh<'_> {
    fn run_script_unchecked(
        &self,
        host: &str,
        label: &str,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, CommandError> {
        self.seen.lock().unwrap().push((
            label.to_string(),
            script.to_string(),
            stdin.unwrap_or_default().to_vec(),
        ));
        // The script must parse on its own.
        let file = self.lab.home.root.join("script.sh");
        std::fs::write(&file, script).unwrap();
        let n = Command::new("sh").arg("-n").arg(&file).output().unwrap();
        assert!(
            n.status.success(),
            "sh -n refuses the script for {host}:\n{script}\n{}",
            String::from_utf8_lossy(&n.stderr)
        );
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg(script)
            .env_clear()
            .env("PATH", &self.lab.fakebin)
            .env("REC", &self.lab.rec)
            .current_dir(&self.lab.home.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut i = child.stdin.take().unwrap();
            let _ = i.write_all(stdin.unwrap_or_default());
        }
        let out = child.wait_with_output().unwrap();
        assert!(timeout > Duration::ZERO);
        Ok(Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
    fn describe(&self, host: &str, label: &str) -> String {
        format!("local {host}: {label}")
    }
    fn connect_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// Hostile payloads; `M` is replaced by the marker path.
const PAYLOADS: &[&str] = &[
    "$(touch M)",
    "`touch M`",
    ";touch M;",
    "' ; touch M ; '",
    "\" ; touch M ; \"",
    "\ntouch M\n",
    "x&&touch M",
    "|touch M",
    ">M",
    "${IFS}touch${IFS}M",
    "-rf",
    "a b\tc",
    "\\'\\\"$HOME*?[",
];

const REPL_PW: &str = "Rp3-replPW-k7 $(touch /x)";
const HA_PW: &str = "Ha2-haPW-n6";

fn hostile_cfg(lab: &Lab, bin: &str) -> Config {
    let conf = sample_conf(8080)
        .replace(
            "db_repl_pass = postgres",
            &format!("db_repl_pass = {REPL_PW}"),
        )
        .replace("ha_db_pass = postgres", &format!("ha_db_pass = {HA_PW}"));
    let mut cfg = Config::parse(&conf, &lab.home.root.join("clup.conf")).unwrap();
    cfg.pg_bin_dir = bin.to_string();
    cfg
}

/// Check the recorded calls: only expected commands ran, a hostile value
/// appears only as a whole argument from `whole`, nothing touched a marker.
fn check_calls(lab: &Lab, what: &str, payload: &str, whole: &[String]) -> Vec<Vec<String>> {
    let calls = lab.calls();
    assert!(
        !lab.marker.exists(),
        "{what}: injected command ran (marker exists) for {payload:?}"
    );
    for c in &calls {
        let name = c[0].as_str();
        assert!(
            EXPECTED.contains(&name) || name == "pg_ctl",
            "{what}: unexpected command {c:?} ran for payload {payload:?}"
        );
        for a in &c[1..] {
            if a.contains(payload) || (!payload.trim().is_empty() && a.contains(payload.trim())) {
                assert!(
                    whole.contains(a),
                    "{what}: hostile value spliced into an argument {a:?} of {c:?}"
                );
            }
        }
    }
    calls
}

fn has_arg(calls: &[Vec<String>], v: &str) -> bool {
    calls.iter().any(|c| c.iter().skip(1).any(|a| a == v))
}

#[test]
fn hostile_values_arrive_as_one_literal_argument() {
    let lab = Lab::new("values");
    for (i, p) in PAYLOADS.iter().enumerate() {
        let payload = p.replace('M', &lab.marker.display().to_string());
        let user = format!("u{payload}");
        let pgdata = format!("/d{payload}");
        // pg_bin_dir must exist so "$bin/pg_ctl" really runs (the fake).
        let bin_dir = lab
            .home
            .root
            .join(format!("bin{i}"))
            .join(format!("b{payload}"));
        let bin = bin_dir.display().to_string();
        let bin_ok = std::fs::create_dir_all(&bin_dir).is_ok();
        if bin_ok {
            write_fake(&bin_dir.join("pg_ctl"));
        }
        let cfg = hostile_cfg(&lab, if bin_ok { &bin } else { "" });
        let db = Db {
            id: 2,
            state: 1,
            os_user: user.clone(),
            pgdata: pgdata.clone(),
            is_primary: 0,
            repl_app_name: format!("r{payload}"),
            host: format!("h{payload}"),
            switch_host: format!("h{payload}"),
            port: 5432,
        };
        let remote = LocalSh {
            lab: &lab,
            seen: Mutex::new(Vec::new()),
        };
        let pg_ctl = format!("{}/pg_ctl", bin.trim_end_matches('/'));
        let whole: Vec<String> = vec![
            user.clone(),
            pgdata.clone(),
            pg_ctl.clone(),
            format!("{pgdata}/{}", pgctl::START_LOG),
            format!("{pgdata}/postgresql.auto.conf"),
            format!("{pgdata}/postgresql.auto.conf.clup-tmp"),
            format!("{pgdata}/recovery.conf"),
            format!("{pgdata}/recovery.conf.clup-tmp"),
            format!("{pgdata}/standby.signal"),
        ];

        lab.clear();
        let _ = pgctl::start(&remote, &db, &cfg);
        let calls = check_calls(&lab, "pg_ctl start", &payload, &whole);
        assert!(has_arg(&calls, &user), "user not one argument: {calls:?}");
        assert!(
            has_arg(&calls, &pgdata),
            "pgdata not one argument: {calls:?}"
        );
        if bin_ok {
            assert!(has_arg(&calls, &pg_ctl), "bin not one argument: {calls:?}");
        }
        let promote_wait = |r: &dyn clup::exec::Remote, d: &_, c: &_| pgctl::promote(r, d, c, true);
        let promote_no_wait =
            |r: &dyn clup::exec::Remote, d: &_, c: &_| pgctl::promote(r, d, c, false);
        for f in [pgctl::stop_fast, promote_wait, promote_no_wait] {
            lab.clear();
            let _ = f(&remote, &db, &cfg);
            check_calls(&lab, "pg_ctl stop/promote", &payload, &whole);
        }
        lab.clear();
        let _ = pgctl::status(&remote, &db, &cfg);
        check_calls(&lab, "pg_ctl status", &payload, &whole);

        // Recovery files for PG 11 and 16: conninfo goes through stdin.
        for version in [110000, 160000] {
            lab.clear();
            let conninfo = recovery::conninfo_for(&db, &cfg, "127.0.56.41", 5432);
            recovery::write_files(&remote, &db, version, &conninfo, None).unwrap();
            let calls = check_calls(&lab, "recovery files", &payload, &whole);
            assert!(has_arg(&calls, &user), "{calls:?}");
        }

        // VIP scripts: the interface name is the only text value.
        let ifname = format!("e{payload}");
        let vip: std::net::Ipv4Addr = "127.0.56.40".parse().unwrap();
        lab.clear();
        let _ = vip::add(&remote, &db.host, vip, &ifname);
        let _ = vip::held_by_other(&remote, &db.host, &ifname, vip);
        let _ = vip::delete(&remote, &db.host, vip);
        let calls = check_calls(&lab, "vip", &payload, std::slice::from_ref(&ifname));
        assert!(
            has_arg(&calls, &ifname),
            "ifname not one argument: {calls:?}"
        );

        // The peer check: the host must not be spliced into code that a
        // second shell (bash -c) evaluates.
        lab.clear();
        let _ = ssh::peer_reaches(&remote, &db.host, &db.host, 5432);
        let calls = check_calls(&lab, "peer check", &payload, std::slice::from_ref(&db.host));
        assert!(
            has_arg(&calls, &db.host),
            "host not one argument: {calls:?}"
        );

        // No password anywhere but stdin.
        for (label, script, _stdin) in remote.seen.lock().unwrap().iter() {
            for pw in [REPL_PW, HA_PW, "Rp3-replPW"] {
                assert!(!script.contains(pw), "password in a script:\n{script}");
                assert!(!label.contains(pw), "password in a label: {label}");
            }
        }
        for c in lab.calls() {
            assert!(
                !c.iter().any(|a| a.contains("Rp3-replPW")),
                "password in argv {c:?}"
            );
        }
        assert!(
            remote
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|(_, _, stdin)| String::from_utf8_lossy(stdin).contains("Rp3-replPW")),
            "the password never went through stdin"
        );
    }
}

/// The ssh argv: the script is one argument after `--`, the host is part
/// of `user@host` (so it can never be read as an option), no password.
#[test]
fn ssh_argv_keeps_host_and_script_apart() {
    let conf = sample_conf(8080);
    let cfg = Config::parse(&conf, Path::new("clup.conf")).unwrap();
    let s = ssh::Ssh::from_config(&cfg);
    for host in ["-oProxyCommand=touch /tmp/x", "a b", "$(id)"] {
        let a = s.args(host, "echo hi");
        let at = a.iter().position(|x| x == "--").unwrap();
        assert_eq!(a[at - 1], format!("root@{host}"));
        assert_eq!(a[at + 1..], ["echo hi".to_string()]);
        assert!(!a
            .iter()
            .any(|x| x.contains("postgres") && x.contains("pass")));
    }
}

/// Validation is the first wall: none of the payloads passes meta.rs or
/// clup.conf's checks for the fields that reach a shell.
#[test]
fn validation_refuses_every_payload() {
    let init: serde_json::Value = serde_json::from_str(crate::util::SAMPLE_INIT).unwrap();
    // "-rf" is there to test argument positions; "u-rf" is a valid name.
    for p in PAYLOADS.iter().filter(|p| **p != "-rf") {
        for (field, v) in [
            ("os_user", format!("u{p}")),
            ("pgdata", format!("/d{p}")),
            ("repl_app_name", format!("r{p}")),
            ("host", format!("h{p}")),
        ] {
            let mut m = init.clone();
            m["cluster01"]["db_list"][1][field] = serde_json::json!(v);
            let e = clup::model::meta::parse_clusters(&m.to_string()).unwrap_err();
            assert!(e.to_string().contains(field), "{field}={v:?}: {e}");
        }
        for (key, v) in [
            ("pg_bin_dir", format!("/b{p}")),
            ("ssh_user", format!("u{p}")),
        ] {
            let conf = format!("{}{key} = {v}\n", sample_conf(8080));
            let e = Config::parse(&conf, Path::new("clup.conf"));
            // A payload with a newline ends the line early: another error.
            assert!(e.is_err(), "{key}={v:?} accepted");
        }
    }
    // An option-like user name could become an ssh option: refused.
    let conf = format!("{}ssh_user = -oProxyCommand\n", sample_conf(8080));
    assert!(Config::parse(&conf, Path::new("clup.conf")).is_err());
}
