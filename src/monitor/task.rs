//! Background tasks (failover, switch, repair) and the cluster lock.
//!
//! A task is a record in the meta store plus a log file under data/tasks/
//! with lines in the manual's task format (`2017-12-08 09:20:37:INFO: ...`).
//! Each line is also written to the server log. The cluster lock lives in the
//! cluster's meta (`lock_time`, `lock_holder`), so it survives a restart and
//! expires by itself after `lock_ttl`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::{update, MetaStore, Task, UpdateError};

/// A running task's handle: its id and its log.
pub struct TaskHandle {
    pub id: u64,
    pub name: String,
    pub cluster: String,
    log: Mutex<std::fs::File>,
    pub log_path: PathBuf,
}

pub fn log_path(task_dir: &Path, id: u64) -> PathBuf {
    task_dir.join(format!("{id}.log"))
}

/// Create a task record (state `running`) and its log file.
pub fn begin(
    store: &dyn MetaStore,
    task_dir: &Path,
    cluster: &str,
    name: &str,
) -> Result<TaskHandle, UpdateError> {
    let now = crate::now_secs();
    let ((id, trimmed), _) = update(store, |doc| {
        doc.next_task_id += 1;
        let id = doc.next_task_id;
        doc.tasks.push(Task {
            id,
            name: name.to_string(),
            cluster: cluster.to_string(),
            state: "running".to_string(),
            begin: now,
            end: 0,
        });
        Ok((id, doc.trim_tasks()))
    })?;
    // A trimmed task's log goes with its record (best effort: a log that
    // cannot be removed is only disk space).
    for old in trimmed {
        let _ = std::fs::remove_file(log_path(task_dir, old));
    }
    let path = log_path(task_dir, id);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| UpdateError::Refused(format!("{}: {e}", path.display())))?;
    Ok(TaskHandle {
        id,
        name: name.to_string(),
        cluster: cluster.to_string(),
        log: Mutex::new(file),
        log_path: path,
    })
}

impl TaskHandle {
    fn write(&self, level: &str, msg: &str) {
        let stamp = crate::util::logging::timestamp();
        // The manual's task log stamp: seconds, then ":LEVEL:".
        let line = format!("{}:{level}: {msg}\n", &stamp[..19]);
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(line.as_bytes());
        let _ = f.sync_data();
    }

    pub fn info(&self, msg: &str) {
        log::info!("{msg}");
        self.write("INFO", msg);
    }

    pub fn error(&self, msg: &str) {
        log::error!("{msg}");
        self.write("ERROR", msg);
    }

    /// Record the outcome; the record leaves `running`.
    pub fn finish(&self, store: &dyn MetaStore, ok: bool) {
        let state = if ok { "success" } else { "failed" };
        let id = self.id;
        let res = update(store, |doc| {
            if let Some(t) = doc.tasks.iter_mut().find(|t| t.id == id) {
                t.state = state.to_string();
                t.end = crate::now_secs();
            }
            Ok(())
        });
        if let Err(e) = res {
            log::error!("cannot record the end of task {id}: {e}");
        }
    }
}

/// Take the cluster lock for `holder` until now + ttl. Refused, naming the
/// holder, while someone else holds an unexpired lock.
pub fn lock(
    store: &dyn MetaStore,
    cluster: &str,
    holder: &str,
    ttl_secs: u64,
) -> Result<(), String> {
    let now = crate::now_secs();
    update(store, |doc| {
        let c = doc
            .clusters
            .get_mut(cluster)
            .ok_or_else(|| format!("no cluster named '{cluster}'"))?;
        if c.lock_time > now && c.lock_holder != holder {
            return Err(format!(
                "cluster '{cluster}' is locked by {} (the lock lapses in {} s at the latest); try again when it is done",
                if c.lock_holder.is_empty() {
                    "another operation"
                } else {
                    &c.lock_holder
                },
                c.lock_time - now
            ));
        }
        c.lock_time = now + ttl_secs;
        c.lock_holder = holder.to_string();
        Ok(())
    })
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Release the lock if `holder` still has it.
pub fn unlock(store: &dyn MetaStore, cluster: &str, holder: &str) {
    let res = update(store, |doc| {
        if let Some(c) = doc.clusters.get_mut(cluster) {
            if c.lock_holder == holder {
                c.lock_time = 0;
                c.lock_holder.clear();
            }
        }
        Ok(())
    });
    if let Err(e) = res {
        log::error!("cannot release the lock of cluster {cluster}: {e}");
    }
}

/// Mark tasks left `running` by a previous server life as `interrupted`.
/// Returns them, so the caller can log and re-examine their clusters.
pub fn mark_interrupted(store: &dyn MetaStore) -> Vec<Task> {
    let res = update(store, |doc| {
        let mut found = Vec::new();
        for t in doc.tasks.iter_mut().filter(|t| t.state == "running") {
            t.state = "interrupted".to_string();
            t.end = crate::now_secs();
            found.push(t.clone());
        }
        Ok(found)
    });
    match res {
        Ok((found, _)) => found,
        Err(e) => {
            log::error!("cannot check for interrupted tasks: {e}");
            Vec::new()
        }
    }
}

/// Release every cluster lock: called at start-up, where the pid file
/// guarantees this is the only clupserver, so any lock left in the meta
/// belonged to a previous life of it (killed in the middle of a task).
pub fn release_stale_locks(store: &dyn MetaStore) {
    let res = update(store, |doc| {
        let mut released = Vec::new();
        for (name, c) in doc.clusters.iter_mut() {
            if c.lock_time != 0 || !c.lock_holder.is_empty() {
                released.push(format!("{name} (held by {})", c.lock_holder));
                c.lock_time = 0;
                c.lock_holder.clear();
            }
        }
        Ok(released)
    });
    match res {
        Ok((released, _)) => {
            for r in released {
                log::warn!("Released the lock of cluster {r}, left by a previous clupserver.");
            }
        }
        Err(e) => log::error!("cannot release stale cluster locks: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};
    use crate::store::{FileStore, MetaDoc};

    fn store(tag: &str) -> (FileStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("clup-task-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tasks")).unwrap();
        let s = FileStore::new(&dir);
        s.save(&MetaDoc {
            clusters: parse_clusters(SAMPLE_INIT).unwrap(),
            ..Default::default()
        })
        .unwrap();
        (s, dir)
    }

    /// Beyond KEEP_TASKS finished tasks, the oldest records go, and their
    /// logs with them; a running task's log stays.
    #[test]
    fn trimmed_tasks_take_their_logs_with_them() {
        let (s, dir) = store("trim");
        let task_dir = dir.join("tasks");
        update(&s, |doc| {
            for id in 1..=(crate::store::KEEP_TASKS as u64) {
                doc.tasks.push(crate::store::Task {
                    id,
                    name: "t".into(),
                    cluster: "cluster01".into(),
                    state: "success".into(),
                    begin: 0,
                    end: 0,
                });
            }
            doc.next_task_id = crate::store::KEEP_TASKS as u64;
            Ok(())
        })
        .unwrap();
        for id in [1, 2] {
            std::fs::write(log_path(&task_dir, id), "x\n").unwrap();
        }
        let t = begin(&s, &task_dir, "cluster01", "new").unwrap();
        // 200 finished and one running: nothing trimmed yet.
        assert!(log_path(&task_dir, 1).exists());
        t.finish(&s, true);
        // 201 finished: the next task trims task 1, and its log; 2 stays.
        let next = begin(&s, &task_dir, "cluster01", "next").unwrap();
        assert!(!log_path(&task_dir, 1).exists(), "trimmed with its record");
        assert!(log_path(&task_dir, 2).exists());
        assert!(log_path(&task_dir, t.id).exists());
        assert!(log_path(&task_dir, next.id).exists());
    }

    #[test]
    fn lock_is_exclusive_and_released() {
        let (s, _) = store("lock");
        lock(&s, "cluster01", "switch task 1", 30).unwrap();
        let e = lock(&s, "cluster01", "repair task 2", 30).unwrap_err();
        assert!(
            e.starts_with("cluster 'cluster01' is locked by switch task 1 (the lock lapses in ")
                && e.ends_with(" s at the latest); try again when it is done"),
            "{e}"
        );
        // The holder may renew.
        lock(&s, "cluster01", "switch task 1", 30).unwrap();
        unlock(&s, "cluster01", "repair task 2"); // not the holder: no effect
        assert!(lock(&s, "cluster01", "repair task 2", 30).is_err());
        unlock(&s, "cluster01", "switch task 1");
        lock(&s, "cluster01", "repair task 2", 30).unwrap();
        assert!(lock(&s, "nosuch", "x", 1)
            .unwrap_err()
            .contains("no cluster named"));
    }

    #[test]
    fn task_lifecycle_and_log_format() {
        let (s, dir) = store("task");
        let t = begin(
            &s,
            &dir.join("tasks"),
            "cluster01",
            "repair cluster01(dbid=4)",
        )
        .unwrap();
        assert_eq!(t.id, 1);
        t.info("Repair(cluster=cluster01, dbid=4): begin...");
        t.error("Repair(cluster=cluster01, dbid=4): failed.");
        let text = std::fs::read_to_string(&t.log_path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            &lines[0][19..],
            ":INFO: Repair(cluster=cluster01, dbid=4): begin..."
        );
        assert_eq!(
            &lines[1][19..],
            ":ERROR: Repair(cluster=cluster01, dbid=4): failed."
        );
        assert_eq!(s.load().unwrap().tasks[0].state, "running");
        t.finish(&s, true);
        assert_eq!(s.load().unwrap().tasks[0].state, "success");
        let t2 = begin(&s, &dir.join("tasks"), "cluster01", "switch").unwrap();
        assert_eq!(t2.id, 2);
        let found = mark_interrupted(&s);
        assert_eq!(found.iter().map(|t| t.id).collect::<Vec<_>>(), [2]);
        assert_eq!(s.load().unwrap().tasks[1].state, "interrupted");
        lock(&s, "cluster01", "failover of cluster cluster01", 300).unwrap();
        release_stale_locks(&s);
        let c = &s.load().unwrap().clusters["cluster01"];
        assert_eq!((c.lock_time, c.lock_holder.as_str()), (0, ""));
    }
}
