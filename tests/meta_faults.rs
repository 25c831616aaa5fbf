//! A broken meta.json: `clupserver start` refuses with a message naming the
//! file, for random bytes, a truncated document and valid JSON whose meta
//! is invalid (a hand edit putting shell text into os_user).

use crate::util::{free_port, sample_conf, TestHome, SAMPLE_INIT};

#[test]
fn start_refuses_a_corrupt_meta_naming_the_file() {
    let h = TestHome::new("corruptmeta");
    h.write("conf/clup.conf", &sample_conf(free_port()));
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    let good = h.read("data/meta.json");
    let mut bad_meta: serde_json::Value = serde_json::from_str(&good).unwrap();
    bad_meta["clusters"]["cluster01"]["db_list"][0]["os_user"] = "x;reboot".into();
    for (what, text) in [
        ("random bytes", "\u{1}\u{7f}garbage{{[".to_string()),
        ("truncated", good[..good.len() / 2].to_string()),
        ("invalid meta", bad_meta.to_string()),
    ] {
        h.write("data/meta.json", &text);
        let out = h.run(&["server", "start"]);
        assert_eq!(out.code, 1, "{what}: {out:?}");
        assert!(
            out.stderr.contains("data/meta.json is corrupt"),
            "{what}: {}",
            out.stderr
        );
        assert_eq!(h.run(&["server", "status"]).code, 1, "{what}");
        // Nothing rewrote the file.
        assert_eq!(h.read("data/meta.json"), text, "{what}");
    }
}

/// A mount made for one test, unmounted (and its directory removed) on drop.
struct Mount(std::path::PathBuf);

impl Mount {
    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("clup-mfault-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A full disk: the save fails with the reason, the old meta stays whole and
/// no temp file is left behind. Needs root (mount); tests run as root here.
#[test]
fn full_disk_keeps_the_old_meta() {
    use clup::store::{FileStore, MetaDoc, MetaStore};
    let dir = tmp("full");
    Mount::run(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=64k",
        "clup-test",
        dir.to_str().unwrap(),
    ]);
    let _m = Mount(dir.clone());
    let store = FileStore::new(&dir);
    let clusters = clup::model::meta::parse_clusters(SAMPLE_INIT).unwrap();
    store
        .save(&MetaDoc {
            clusters,
            ..Default::default()
        })
        .unwrap();
    let before = std::fs::read_to_string(dir.join("meta.json")).unwrap();
    // Fill the disk, then try to save a larger document.
    let _ = std::fs::write(dir.join("filler"), vec![b'x'; 60 * 1024]);
    let mut doc = store.load().unwrap();
    doc.tasks = (0..100)
        .map(|i| clup::store::Task {
            id: i,
            name: "x".repeat(100),
            cluster: "cluster01".into(),
            state: "success".into(),
            begin: 0,
            end: 0,
        })
        .collect();
    let e = store.save(&doc).unwrap_err();
    assert!(e.to_string().contains("No space left on device"), "{e}");
    assert!(
        e.to_string().contains("meta.json"),
        "the error names the file: {e}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("meta.json")).unwrap(),
        before
    );
    assert_eq!(store.load().unwrap().version, 1);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
}

/// A read-only data directory: saves fail with the reason, loads still work,
/// and `clupadm froze` through a running server reports the failure.
#[test]
fn read_only_data_dir_refuses_changes_clearly() {
    use clup::store::{FileStore, MetaStore};
    let h = TestHome::new("rodata");
    h.write("conf/clup.conf", &sample_conf(free_port()));
    h.write("conf/init.json", SAMPLE_INIT);
    assert_eq!(h.run(&["adm", "init"]).code, 0);
    let data = h.root.join("data");
    let d = data.to_str().unwrap();
    Mount::run(&["mount", "--bind", d, d]);
    // Unmounted below by path (not by a Mount guard: TestHome removes the dir).
    Mount::run(&["mount", "-o", "remount,ro,bind", d]);
    let store = FileStore::new(&data);
    let doc = store.load().unwrap();
    let e = store.save(&doc).unwrap_err();
    let unmount = || {
        let _ = std::process::Command::new("umount").arg(&data).output();
    };
    if !e.to_string().contains("Read-only file system") {
        unmount();
        panic!("{e}");
    }
    let out = h.run(&["server", "start"]);
    // The server starts (reads work) but cannot change the meta.
    let froze = h.run(&["adm", "unfroze"]);
    let _ = h.run(&["server", "stop"]);
    unmount();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(froze.code, 1, "{froze:?}");
    assert!(
        froze.stderr.contains("Read-only file system"),
        "{}",
        froze.stderr
    );
}
