//! TLS to PostgreSQL in the lab: every server with `ssl = on`, certificates
//! from a lab-made CA (openssl), pg_hba.conf with hostssl lines only (the
//! replication lines too), clup with pg_sslmode = verify-full. A plain-text
//! connection is refused there, so each check below fails if clup (probes,
//! admin calls, the primary_conninfo it writes) does not use TLS.
//! The lab is torn down at the end (the next test rebuilds it as usual).

use std::path::Path;
use std::process::Command;

use crate::lab::{ip, Lab, LAB_DIR, WRITE_VIP};

const DB_HOSTS: [&str; 4] = ["pg01", "pg02", "pg03", "pg04"];

fn tls_dir() -> String {
    format!("{LAB_DIR}/tls")
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.crt`, `<name>.key`) in the lab's tls dir.
fn make_ca(name: &str) {
    let d = tls_dir();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout {name}.key -out {name}.crt -days 2 -subj /CN={name} 2>/dev/null && chmod 0644 {name}.crt"
    ));
}

/// A server certificate for `host`, its address as subjectAltName, signed
/// by the CA `ca`, installed as server.crt/server.key in its data dir.
fn make_server_cert(host: &str, ca: &str) {
    let d = tls_dir();
    let pgdata = format!("{LAB_DIR}/hosts/{host}/pgdata");
    sh(&format!(
        "cd {d} && printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\nextendedKeyUsage=serverAuth\\n' >{host}.ext && \
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
           -keyout {host}.key -out {host}.csr -subj /CN={host} 2>/dev/null && \
         openssl x509 -req -in {host}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial \
           -out {host}.crt -days 2 -extfile {host}.ext 2>/dev/null && \
         install -m 0644 -o postgres -g postgres {host}.crt {pgdata}/server.crt && \
         install -m 0600 -o postgres -g postgres {host}.key {pgdata}/server.key",
        ip = ip(host)
    ));
}

const HBA: &str = "# clup lab pg_hba.conf, TLS only (lab_tls)\n\
local   all          all                    trust\n\
local   replication  all                    trust\n\
hostssl all          all   127.0.0.1/32     scram-sha-256\n\
hostssl all          all   10.213.0.0/24    scram-sha-256\n\
hostssl replication  all   10.213.0.0/24    scram-sha-256\n";

/// psql on `host` over its Unix socket (trust), as the lab's own checks do.
fn local_sql(lab: &Lab, host: &str, sql: &str) -> String {
    let psql = format!("{}/psql", lab.pg_bin);
    let out = lab.exec(
        host,
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            &psql,
            "-XAtq",
            "-h",
            "/run/postgresql",
            "-d",
            "postgres",
            "-c",
            sql,
        ],
    );
    assert_eq!(out.code, 0, "{host}: {sql}: {out:?}");
    out.stdout.trim().to_string()
}

/// Switch the lab's servers to TLS only; the standbys stream over TLS
/// (verify-full) before this returns.
fn enable_tls(lab: &Lab) {
    let d = tls_dir();
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    sh(&format!("chmod 0755 {d}"));
    make_ca("ca");
    make_ca("wrong-ca");
    for h in DB_HOSTS {
        make_server_cert(h, "ca");
        let pgdata = format!("{LAB_DIR}/hosts/{h}/pgdata");
        let conf = Path::new(&pgdata).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\n# lab_tls\nssl = on\n");
        std::fs::write(&conf, text).unwrap();
        std::fs::write(Path::new(&pgdata).join("pg_hba.conf"), HBA).unwrap();
    }
    for h in &DB_HOSTS[1..] {
        let n = &h[2..];
        local_sql(
            lab,
            h,
            &format!(
                "alter system set primary_conninfo = 'application_name=stb{n} user=postgres \
                 password=lab_pg_pass host={} port=5432 sslmode=verify-full sslrootcert={d}/ca.crt'",
                ip("pg01")
            ),
        );
    }
    for h in DB_HOSTS {
        assert_eq!(local_sql(lab, h, "select pg_reload_conf()"), "t");
    }
    assert!(
        lab.wait(10, |l| DB_HOSTS
            .iter()
            .all(|h| local_sql(l, h, "show ssl") == "on")),
        "ssl not on everywhere"
    );
    // The walsenders that started in plain text go; their standbys come
    // back over TLS.
    local_sql(
        lab,
        "pg01",
        "select pg_terminate_backend(pid) from pg_stat_replication",
    );
    assert!(
        lab.wait(30, |l| tls_walsenders(l, "pg01") == 3),
        "the standbys do not stream over TLS: {}",
        local_sql(
            lab,
            "pg01",
            "select application_name, state, ssl from pg_stat_replication join pg_stat_ssl using (pid)"
        )
    );
    // The premise: plain text is refused.
    let e = lab
        .exec(
            "cli",
            &[
                "psql",
                "-XAtq",
                &format!(
                    "host={} user=postgres password=lab_pg_pass dbname=postgres sslmode=disable connect_timeout=2",
                    ip("pg01")
                ),
                "-c",
                "select 1",
            ],
        )
        .stderr;
    assert!(e.contains("no encryption"), "plain text not refused: {e}");
}

/// Streaming walsenders of `host` whose connection is TLS.
fn tls_walsenders(lab: &Lab, host: &str) -> usize {
    local_sql(
        lab,
        host,
        "select count(*) from pg_stat_replication r join pg_stat_ssl s using (pid) \
         where r.state = 'streaming' and s.ssl",
    )
    .parse()
    .unwrap_or(0)
}

/// Tears the lab down when dropped (before [`Lab`] lets it go): the next
/// test builds it anew, without TLS.
struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab"))
            .arg("down")
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("lab_tls: scripts/lab down failed: {out:?}");
        }
    }
}

fn set_ssl_conf(lab: &Lab, ca: &str) {
    let conf = lab.home.join("conf/clup.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let mut text: String = text
        .lines()
        .filter(|l| !l.starts_with("pg_ssl"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!(
        "pg_sslmode = verify-full\npg_sslrootcert = {}/{ca}.crt\n",
        tls_dir()
    ));
    std::fs::write(&conf, text).unwrap();
}

#[test]
fn lab_tls_hostssl_only_cluster_is_monitored_and_fails_over_over_tls() {
    let mut lab = Lab::take_opts(1, true);
    let _teardown = Teardown;
    enable_tls(&lab);
    set_ssl_conf(&lab, "ca");
    lab.start_server();
    assert!(
        lab.wait(20, |l| l.log().contains(
            "no action: primary database(10.213.0.41:5432) ok, 3 standby(s) ok"
        )),
        "{}",
        lab.log()
    );
    let v = lab.show();
    for d in v["dbs"].as_array().unwrap() {
        assert_eq!(d["state"], "Normal", "{d}");
    }

    // Failover under a synchronous writer: nothing acknowledged is lost.
    lab.sql(
        "cli",
        WRITE_VIP,
        "cs_sys_ha",
        "drop table if exists ledger; create table ledger(id int primary key)",
    )
    .unwrap();
    let acked = (1..=100)
        .filter(|id| {
            lab.sql(
                "cli",
                WRITE_VIP,
                "cs_sys_ha",
                &format!("insert into ledger values ({id})"),
            )
            .is_ok()
        })
        .count();
    assert_eq!(acked, 100);
    assert_eq!(lab.lab(&["poweroff", "pg01"]).code, 0);
    assert!(
        lab.wait(60, |l| l
            .sql(
                "cli",
                WRITE_VIP,
                "cs_sys_ha",
                "insert into ledger values (100000)"
            )
            .is_ok()),
        "write VIP never accepted writes again:\n{}",
        lab.log()
    );
    let new = lab.vip_holder(WRITE_VIP).expect("write vip held by nobody");
    assert_ne!(new, "pg01");
    assert_eq!(
        lab.sql(
            "cli",
            WRITE_VIP,
            "cs_sys_ha",
            "select count(*) from ledger where id <= 100"
        )
        .as_deref(),
        Ok("100"),
        "acknowledged commits lost"
    );
    // The other standbys follow the new primary with the primary_conninfo
    // clup wrote: over TLS, verified.
    assert!(
        lab.wait(30, |l| tls_walsenders(l, &new) == 2),
        "standbys not streaming over TLS from {new}:\n{}\n{}",
        local_sql(
            &lab,
            &new,
            "select application_name, state, ssl from pg_stat_replication join pg_stat_ssl using (pid)"
        ),
        lab.log()
    );
    let other = DB_HOSTS
        .iter()
        .find(|h| **h != "pg01" && **h != new)
        .unwrap();
    let conninfo = local_sql(&lab, other, "show primary_conninfo");
    assert!(
        conninfo.contains(&format!("host={} port=5432", ip(&new)))
            && conninfo.contains(&format!(
                "sslmode=verify-full sslrootcert={}/ca.crt",
                tls_dir()
            )),
        "{conninfo}"
    );
    assert!(!lab.log().contains("lab_pg_pass"), "a password in the log");

    // The wrong CA: every probe fails, and says where and why.
    assert_eq!(lab.clup(&["server", "stop"]).code, 0);
    set_ssl_conf(&lab, "wrong-ca");
    let _ = std::fs::remove_file(lab.home.join("logs/clupserver.log"));
    lab.start_server();
    let want = format!(
        "{}:5432: TLS: certificate signed by an unknown authority (pg_sslrootcert={}/wrong-ca.crt)",
        ip(&new),
        tls_dir()
    );
    assert!(
        lab.wait(20, |l| l.log().contains(&want)),
        "no '{want}' in:\n{}",
        lab.log()
    );
}
