//! Operator-requested operations that run as background tasks: `switch`
//! (planned switchover with zero data loss) and `repair` (bring a Fault
//! node back, optionally with pg_rewind or pg_basebackup), plus the live
//! reports `get_last_lsn` and `repl_delay`.
//!
//! A task takes the cluster lock before it starts (so a refusal reaches the
//! operator at once), renews it while it runs, and goes on when clupadm
//! goes away. Every step is written to the task log in the manual's words.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::exec::pg::{self, format_lsn, DbProbe};
use crate::model::meta::{Cluster, Db};
use crate::model::report::{DelayRow, LsnRow};
use crate::monitor::task::{self, TaskHandle};
use crate::monitor::Shared;

mod repair;
mod switch;

pub use repair::{start_repair, RepairMode};
pub use switch::start_switch;

/// Keeps the cluster lock renewed (every lock_ttl/3) until dropped.
struct LockKeeper {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl LockKeeper {
    fn start(shared: &Arc<Shared>, cluster: &str, holder: &str) -> LockKeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c, h, st) = (
            shared.clone(),
            cluster.to_string(),
            holder.to_string(),
            stop.clone(),
        );
        let ttl = shared.cfg.lock_ttl;
        let handle = thread::spawn(move || {
            let mut last = Instant::now();
            while !st.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= ttl / 3 {
                    if let Err(e) = task::lock(&*s.store, &c, &h, ttl.as_secs()) {
                        log::error!("cannot renew the lock of cluster {c}: {e}");
                    }
                    last = Instant::now();
                }
            }
        });
        LockKeeper {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for LockKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn cluster_of(shared: &Shared, name: &str) -> Result<Cluster, String> {
    let doc = shared.store.load().map_err(|e| e.to_string())?;
    doc.clusters
        .get(name)
        .cloned()
        .ok_or_else(|| format!("no cluster named '{name}'"))
}

/// Take the lock, create the task, run `body` on its own thread.
fn spawn_task(
    shared: &Arc<Shared>,
    cluster: &str,
    task_name: String,
    body: impl FnOnce(&Arc<Shared>, &TaskHandle) -> Result<(), String> + Send + 'static,
) -> Result<(u64, String), String> {
    let holder = format!("task '{task_name}'");
    task::lock(
        &*shared.store,
        cluster,
        &holder,
        shared.cfg.lock_ttl.as_secs(),
    )?;
    let t = match task::begin(&*shared.store, &shared.home.task_dir(), cluster, &task_name) {
        Ok(t) => t,
        Err(e) => {
            task::unlock(&*shared.store, cluster, &holder);
            return Err(e.to_string());
        }
    };
    let id = t.id;
    let (s, c) = (shared.clone(), cluster.to_string());
    thread::Builder::new()
        .name(format!("task-{id}"))
        .spawn(move || {
            let keeper = LockKeeper::start(&s, &c, &holder);
            let res = body(&s, &t);
            if let Err(e) = &res {
                t.error(e);
            }
            drop(keeper);
            task::unlock(&*s.store, &c, &holder);
            t.finish(&*s.store, res.is_ok());
        })
        .map_err(|e| format!("cannot start the task thread: {e}"))?;
    Ok((id, task_name))
}

// ---------------------------------------------------------------- switch

fn probe_cluster(shared: &Shared, c: &Cluster) -> Vec<(Db, DbProbe)> {
    thread::scope(|s| {
        let hs: Vec<_> = c
            .db_list
            .iter()
            .map(|d| s.spawn(move || (d.clone(), pg::probe(d, &shared.cfg, false))))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// `get_last_lsn`: timeline and LSN of every database, read now.
pub fn last_lsn(shared: &Shared, c: &Cluster) -> Vec<LsnRow> {
    probe_cluster(shared, c)
        .into_iter()
        .map(|(d, p)| LsnRow {
            id: d.id,
            host: d.host.clone(),
            primary: d.is_primary,
            timeline: p.timeline,
            lsn: p.wal_lsn.or(p.replay_lsn).map(format_lsn),
        })
        .collect()
}

/// `repl_delay`: each standby's delays in bytes behind the primary, from
/// the primary's pg_stat_replication, read now.
pub fn repl_delay(shared: &Shared, c: &Cluster) -> Vec<DelayRow> {
    let primary_probe = c.primary().map(|p| pg::probe(p, &shared.cfg, false));
    let current = primary_probe.as_ref().and_then(|p| p.wal_lsn);
    c.db_list
        .iter()
        .map(|d| {
            let none = DelayRow {
                host: d.host.clone(),
                primary: d.is_primary,
                current_lsn: None,
                sent_delay: None,
                write_delay: None,
                flush_delay: None,
                replay_delay: None,
                is_sync: None,
                state: None,
            };
            if d.is_primary() {
                return none;
            }
            let r = primary_probe.as_ref().and_then(|p| {
                p.replicas
                    .iter()
                    .find(|r| r.application_name == d.repl_app_name)
            });
            let Some(r) = r else {
                return DelayRow {
                    state: Some("down".into()),
                    ..none
                };
            };
            let delay = |x: Option<u64>| current.zip(x).map(|(c, x)| c.saturating_sub(x));
            DelayRow {
                current_lsn: current.map(format_lsn),
                sent_delay: delay(r.sent_lsn),
                write_delay: delay(r.write_lsn),
                flush_delay: delay(r.flush_lsn),
                replay_delay: delay(r.replay_lsn),
                is_sync: Some(r.sync_state.clone()),
                state: Some(if r.state == "streaming" {
                    "normal".into()
                } else {
                    r.state.clone()
                }),
                ..none
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::repair::{instructions, need_tool};
    use super::switch::{checkpoint_script, parse_checkpoint, PG_CONTROL_TAG};
    use super::*;
    use crate::model::config::{Config, SAMPLE};
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    /// pg_controldata's line, or the raw bytes of pg_control as PG 10, 11,
    /// 16 and 18 wrote them (taken from initdb'd, cleanly stopped clusters).
    #[test]
    fn checkpoint_from_pg_controldata_or_pg_control() {
        let out = "pg_control version number:            1300\n\
                   Latest checkpoint location:           0/3000028\n";
        assert_eq!(parse_checkpoint(out), Ok(0x300_0028));
        let raw = |hex: &str| format!("{PG_CONTROL_TAG}{hex}\n");
        for (hex, lsn) in [
            (
                "ffd4dcd1ec37086bea030000cbce050c0100000000000000ed37086b000000002800000300000000",
                0x300_0028,
            ),
            (
                "34a5c805ee37086b4c0400009b5c070c0100000000000000ef37086b000000002800000300000000",
                0x300_0028,
            ),
            (
                "5b866a66f337086b14050000fff50e0c0100000000000000f437086b00000000c8de4d0100000000",
                0x14D_DEC8,
            ),
            (
                "b936c42df537086b080700003300120c0100000000000000f537086b0000000040b3740100000000",
                0x174_B340,
            ),
        ] {
            assert_eq!(parse_checkpoint(&raw(hex)), Ok(lsn), "{hex}");
        }
        // Not cleanly shut down (state 6, in production): an error.
        let e = parse_checkpoint(&raw(
            "b936c42df537086b080700003300120c0600000000000000f537086b0000000040b3740100000000",
        ))
        .unwrap_err();
        assert!(e.contains("not shut down cleanly (state 6)"), "{e}");
        // Another layout (or byte order): an error, not a wrong LSN.
        let e = parse_checkpoint(&raw(
            "b936c42df537086b000007083300120c0100000000000000f537086b0000000040b3740100000000",
        ))
        .unwrap_err();
        assert!(e.contains("unknown pg_control version"), "{e}");
        // A short or unreadable file.
        assert!(parse_checkpoint(&raw("b936c42d")).is_err());
        assert!(parse_checkpoint(&raw("")).is_err());
        assert!(parse_checkpoint(&raw(&"zz".repeat(40))).is_err());
        assert!(parse_checkpoint("pg_controldata: error: could not open file\n").is_err());
    }

    /// The script, run by the local sh: a bin dir without pg_controldata
    /// reads pg_control's bytes, one with it runs it.
    #[test]
    fn checkpoint_script_runs_in_sh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("clup-ckpt-{}", std::process::id()));
        let (bin, pgdata) = (dir.join("bin"), dir.join("pgdata"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(pgdata.join("global")).unwrap();
        let mut control = vec![0u8; 8192];
        control[8..12].copy_from_slice(&1800u32.to_le_bytes());
        control[16..20].copy_from_slice(&1u32.to_le_bytes());
        control[32..40].copy_from_slice(&0x1_0174_B340u64.to_le_bytes());
        std::fs::write(pgdata.join("global/pg_control"), control).unwrap();
        let text = format!("{SAMPLE}pg_bin_dir = {}\n", bin.display());
        let cfg = Config::parse(&text, std::path::Path::new("/c")).unwrap();
        let mut db = parse_clusters(SAMPLE_INIT).unwrap()["cluster01"].db_list[0].clone();
        db.pgdata = pgdata.display().to_string();
        let me = crate::exec::cmd::run("id", &["-un".into()], None, Duration::from_secs(5))
            .unwrap()
            .stdout;
        db.os_user = me.trim().to_string();
        let run = || {
            let out = crate::exec::cmd::run(
                "sh",
                &["-c".into(), checkpoint_script(&db, &cfg)],
                None,
                Duration::from_secs(5),
            )
            .unwrap();
            parse_checkpoint(&out.stdout)
        };
        assert_eq!(run(), Ok(0x1_0174_B340));
        let fake = bin.join("pg_controldata");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'Latest checkpoint location:           2/ABC'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(run(), Ok(0x2_0000_0ABC));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A repair script stops at once when its tool is missing.
    #[test]
    fn need_tool_stops_the_script() {
        let script = format!(
            "bin=/nonexistent\n{}echo moved",
            need_tool("pg_basebackup", "x")
        );
        let out = crate::exec::cmd::run("sh", &["-c".into(), script], None, Duration::from_secs(5));
        match out {
            Err(crate::exec::cmd::CommandError::Failed {
                code,
                stderr,
                stdout,
                ..
            }) => {
                assert_eq!(code, 127);
                assert!(stdout.is_empty(), "{stdout}");
                assert!(
                    stderr.contains("clup: no pg_basebackup in /nonexistent"),
                    "{stderr}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// The manual's advice (§3.2.3) when a node cannot follow the primary:
    /// the pg_basebackup command and the recovery settings, password masked.
    #[test]
    fn repair_instructions_mask_the_password() {
        let cfg = Config::parse(SAMPLE, std::path::Path::new("clup.conf")).unwrap();
        let c = parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap();
        let text = instructions(&cfg, c.db(2).unwrap(), c.db(1).unwrap());
        assert!(text.contains("pg_basebackup -D /home/postgres/pgdata -Upostgres -h 192.168.56.41 -p 5432 -X stream"), "{text}");
        assert!(
            text.contains("standby_mode = 'on'\nrecovery_target_timeline = 'latest'\n"),
            "{text}"
        );
        assert!(text.contains("primary_conninfo = 'application_name=stb42 user=postgres host=192.168.56.41 port=5432 password=****** sslmode=prefer'"), "{text}");
        assert!(text.contains("pg_rewind"), "{text}");
        assert!(!text.contains("password=postgres"), "{text}");
    }
}
