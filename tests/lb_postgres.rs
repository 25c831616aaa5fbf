//! cstlb in front of a real PostgreSQL 15 on 127.0.0.1: a temporary cluster
//! (initdb as `postgres` via runuser), psql and a postgres client through
//! the proxy, and psql's view of a refusal once the server is gone. If the
//! cluster cannot be set up the test fails with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::lb_support::*;
use serde_json::json;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_postgres(bin: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--", &format!("{PG_BIN}/{bin}")]);
    c
}

/// A temporary PostgreSQL; stopped and removed when dropped.
struct Pg {
    dir: PathBuf,
    port: u16,
}

impl Pg {
    fn start() -> Pg {
        let dir = temp_dir("pg");
        run(
            Command::new("chown").args(["postgres:", dir.to_str().unwrap()]),
            "chown the temp dir to postgres",
        );
        let pg = Pg {
            dir,
            port: free_port(),
        };
        let data = pg.data();
        run(
            as_postgres("initdb").args(["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"]),
            "initdb",
        );
        run(
            as_postgres("pg_ctl").args([
                "-D",
                &data,
                "-l",
                &format!("{}/pg.log", pg.dir.display()),
                "-w",
                "-t",
                "60",
                "-o",
                &format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                    pg.port,
                    pg.dir.display()
                ),
                "start",
            ]),
            "pg_ctl start",
        );
        pg
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.display())
    }

    fn stop(&self) {
        let _ = as_postgres("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
        if self.dir.starts_with(std::env::temp_dir()) && Path::new(&self.dir).exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn real_postgres_through_cstlb() {
    let pg = Pg::start();
    let backend = format!("127.0.0.1:{}", pg.port);
    let lb = Lb::spawn(LbArgs {
        args: vec![
            "--backend".into(),
            backend.clone(),
            "--check-interval".into(),
            "0.3".into(),
        ],
        env: vec![("CSTLB_MGR_TOKEN", TOKEN.into())],
        wait_token: Some(TOKEN),
    });
    // The SSLRequest health check passes against the real server.
    assert!(
        wait_until(Duration::from_secs(3), || {
            let s = lb.stats();
            s["backends"][&backend]["State"] == json!(0)
                && s["backends"][&backend]["check_failures"] == json!(0)
        }),
        "{}\n{}",
        lb.stats(),
        lb.log_text()
    );

    let psql = |sql: &str| {
        Command::new(format!("{PG_BIN}/psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &lb.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGSSLMODE", "prefer")
            .output()
            .expect("run psql")
    };
    let out = psql("select inet_server_port(), 40 + 2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}|42", pg.port)
    );

    // A client library, and a result big enough to take many reads.
    let mut c = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            lb.port
        ),
        postgres::NoTls,
    )
    .expect("connect through cstlb");
    let rows = c
        .query(
            "select i, md5(i::text) from generate_series(1, 200000) i",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 200_000);
    let last: String = rows[199_999].get(1);
    let want: String = c.query_one("select md5('200000')", &[]).unwrap().get(0);
    assert_eq!(last, want);
    drop(c);

    // Server gone: marked unhealthy, and psql prints cstlb's refusal.
    pg.stop();
    assert!(
        wait_until(Duration::from_secs(3), || lb.list()[&backend]["State"]
            == json!(1)),
        "{}",
        lb.log_text()
    );
    let out = psql("select 1");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no healthy backend available"), "{err}");
}
