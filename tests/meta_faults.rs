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
