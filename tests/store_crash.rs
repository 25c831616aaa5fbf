//! The meta store under kill -9: a writer process saves continuously and is
//! killed at random moments; every reload must give a whole document (old or
//! new, never a mix), with versions that never go backwards.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clup::model::meta::parse_clusters;
use clup::store::{FileStore, MetaDoc, MetaStore, StoreError, Task};

const CHILD_ENV: &str = "CLUP_TEST_STORE_WRITER";

/// Each saved document is stamped with the version it will have, in several
/// places, so a torn write would show as a mismatch.
fn stamp(doc: &mut MetaDoc) {
    let next = doc.version + 1;
    let c = doc.clusters.get_mut("cluster01").unwrap();
    c.lock_holder = format!("writer v{next}");
    c.lock_time = next;
    doc.next_task_id = next;
    doc.tasks = (0..150)
        .map(|i| Task {
            id: i,
            name: format!("task {i} of v{next} {}", "x".repeat(200)),
            cluster: "cluster01".into(),
            state: "success".into(),
            begin: next,
            end: next,
        })
        .collect();
}

fn check(doc: &MetaDoc) {
    let v = doc.version;
    let c = &doc.clusters["cluster01"];
    assert_eq!(
        c.lock_holder,
        format!("writer v{v}"),
        "torn document at v{v}"
    );
    assert_eq!(c.lock_time, v);
    assert_eq!(doc.next_task_id, v);
    assert_eq!(doc.tasks.len(), 150);
    assert!(doc
        .tasks
        .iter()
        .all(|t| t.begin == v && t.name.contains(&format!("of v{v} "))));
}

/// Not a test on its own: the writer body, run when the parent re-executes
/// this test binary with CHILD_ENV set.
#[test]
fn store_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return; // run as a normal test: nothing to do
    };
    let store = FileStore::new(Path::new(&dir));
    loop {
        let mut doc = match store.load() {
            Ok(d) => d,
            Err(StoreError::Missing(_)) => MetaDoc {
                clusters: parse_clusters(crate::util::SAMPLE_INIT).unwrap(),
                ..Default::default()
            },
            Err(e) => panic!("writer cannot load: {e}"),
        };
        stamp(&mut doc);
        store.save(&doc).unwrap();
    }
}

#[test]
fn kill_9_during_saves_never_leaves_a_torn_meta() {
    let dir = std::env::temp_dir().join(format!("clup-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let store = FileStore::new(&dir);
    let mut last = 0;
    let mut mid_write = 0;
    let mut rounds = 0u64;
    // At least 40 kills, and on until 5 of them landed mid-write (bounded).
    while rounds < 40 || (mid_write < 5 && rounds < 400) {
        rounds += 1;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store_crash::store_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill only once the writer is saving, at a different moment each round.
        let started = std::time::Instant::now();
        while store.load().map_or(0, |d| d.version) <= last
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros((rounds * 3701) % 9000));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp.")
            })
            .count();
        if leftovers > 0 {
            mid_write += 1;
        }
        match store.load() {
            Ok(doc) => {
                check(&doc);
                assert!(
                    doc.version >= last,
                    "version went back from {last} to {}",
                    doc.version
                );
                last = doc.version;
            }
            Err(StoreError::Missing(_)) if last == 0 => {}
            Err(e) => panic!("round {rounds}: {e}"),
        }
    }
    // The test only means something if the writer really got going and was
    // caught in the middle of writes.
    assert!(last > 40, "the writer saved only {last} versions");
    assert!(
        mid_write >= 5,
        "only {mid_write} of {rounds} kills landed mid-write"
    );
    eprintln!("store crash test: {last} versions written, {mid_write}/{rounds} kills mid-write");
    // The next save sweeps what the killed writers left.
    let doc = store.load().unwrap();
    store.save(&doc).unwrap();
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(left.is_empty(), "stale temp files: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
