//! Tests of clup.conf parsing: keys, values, defaults, errors.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/opt/clup/conf/clup.conf"))
}

#[test]
fn manual_sample_parses_with_defaults() {
    let c = parse(SAMPLE).unwrap();
    assert_eq!(c.network, Ipv4Addr::new(192, 168, 0, 0));
    assert_eq!(c.probe_interval, Duration::from_secs(10));
    assert_eq!(c.lock_ttl, Duration::from_secs(30));
    assert_eq!(c.http_port, 8080);
    assert_eq!(c.ssh_user, "root");
    assert_eq!(c.failover_max_lag, 16 << 20);
    assert_eq!(c.probe_retries, 1);
    assert_eq!(c.ha_rpc_pass.expose(), "csha_cluster_pass");
    assert!(c.ssh_options.is_empty());
    assert!(!c.use_slots);
    assert_eq!(c.slot_keep_time, Duration::from_secs(1800));
    assert_eq!(c.max_slot_wal_keep_size, None);
    let c = parse(&format!(
        "{SAMPLE}use_slots = on\nslot_keep_time = 60\nmax_slot_wal_keep_size = 10GB\n"
    ))
    .unwrap();
    assert!(c.use_slots);
    assert_eq!(c.slot_keep_time, Duration::from_secs(60));
    assert_eq!(c.max_slot_wal_keep_size, Some(10 << 30));
    let e = parse(&format!("{SAMPLE}max_slot_wal_keep_size = 10 parsecs\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("max_slot_wal_keep_size"));
}

#[test]
fn debug_output_hides_secrets() {
    let c = parse(SAMPLE).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("csha_cluster_pass"), "{dbg}");
    assert!(!dbg.contains("540cd628"), "{dbg}");
    assert!(dbg.contains("******"));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = parse(&format!("{SAMPLE}\nprobe_intervall = 5\n")).unwrap_err();
    assert_eq!(e.line, Some(16));
    assert_eq!(e.key.as_deref(), Some("probe_intervall"));
    assert_eq!(
        e.to_string(),
        "/opt/clup/conf/clup.conf:16: key 'probe_intervall': unknown key"
    );
}

#[test]
fn timeouts_take_decimal_seconds() {
    let c = parse(&format!(
        "{SAMPLE}probe_timeout = 0.5\nssh_connect_timeout = 1.25\n"
    ))
    .unwrap();
    assert_eq!(c.probe_timeout, Duration::from_millis(500));
    assert_eq!(c.ssh_connect_timeout, Duration::from_millis(1250));
    let c = parse(SAMPLE).unwrap();
    assert_eq!(c.probe_timeout, Duration::from_secs(1));
    assert_eq!(c.ssh_connect_timeout, Duration::from_secs(3));
    for (v, want) in [
        ("2", Some(2000)),
        ("0.1", Some(100)),
        ("10.05", Some(10_050)),
    ] {
        assert_eq!(parse_timeout(v), want.map(Duration::from_millis), "{v}");
    }
    for bad in [
        "", ".5", "1.", "0.0005", "-1", "1e3", "1,5", "1s", "0.05", "0",
    ] {
        let e = parse(&format!("{SAMPLE}probe_timeout = {bad}\n"));
        assert!(e.is_err(), "probe_timeout = '{bad}' was accepted");
        if let Err(e) = e {
            assert_eq!(e.key.as_deref(), Some("probe_timeout"), "{bad}: {e}");
        }
    }
}

#[test]
fn duplicate_key_is_an_error() {
    let e = parse(&format!("{SAMPLE}lock_ttl = 40\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("lock_ttl"));
    assert!(
        e.msg.contains("duplicate key (first set on line 12)"),
        "{e}"
    );
}

#[test]
fn missing_required_key() {
    let text = SAMPLE.replace("cstlb_token = 8e722522-d733-11e7-93e8-60f81dd129c2\n", "");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cstlb_token"));
    assert_eq!(e.line, None);
    assert!(e.to_string().ends_with("required key is missing"), "{e}");
}

#[test]
fn bad_values_are_named() {
    for (line, key) in [
        ("probe_interval = ten", "probe_interval"),
        ("probe_interval = 0", "probe_interval"),
        ("http_port = 70000", "http_port"),
        ("log_level = loud", "log_level"),
        ("failover_max_lag = 5XB", "failover_max_lag"),
        ("probe_user = a;rm -rf /", "probe_user"),
        ("pg_bin_dir = usr/bin", "pg_bin_dir"),
        ("pg_bin_dir = /usr/$(id)/bin", "pg_bin_dir"),
    ] {
        let text = SAMPLE
            .lines()
            .filter(|l| !l.starts_with(key))
            .collect::<Vec<_>>()
            .join("\n");
        let e = parse(&format!("{text}\n{line}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{line}: {e}");
        assert!(e.line.is_some(), "{line}: {e}");
    }
    let e = parse(&SAMPLE.replace("network=192.168.0.0", "network=192.168.0")).unwrap_err();
    assert_eq!(e.line, Some(2));
    assert!(e.msg.contains("expected an IPv4 address"), "{e}");
}

#[test]
fn secret_values_never_appear_in_errors() {
    let text = SAMPLE.replace(
        "ha_rpc_pass = csha_cluster_pass",
        "ha_rpc_pass = secret\u{7}bell",
    );
    let e = parse(&text).unwrap_err();
    assert!(!e.to_string().contains("secret"), "{e}");
    assert_eq!(e.key.as_deref(), Some("ha_rpc_pass"));
}

#[test]
fn line_without_equals() {
    let e = parse(&format!("{SAMPLE}just words\n")).unwrap_err();
    assert_eq!(e.line, Some(15));
    assert!(e.msg.contains("expected 'key = value'"));
}

#[test]
fn quoted_values_and_ssh_options() {
    let c = parse(&format!(
        "{SAMPLE}ssh_options = \"-i /k -o ConnectionAttempts=1\"\nfailover_max_lag = 1GB\n"
    ))
    .unwrap();
    assert_eq!(c.ssh_options, ["-i", "/k", "-o", "ConnectionAttempts=1"]);
    assert_eq!(c.failover_max_lag, 1 << 30);
}

#[test]
fn bytes_and_constant_time_eq() {
    assert_eq!(parse_bytes("512kB"), Some(512 * 1024));
    assert_eq!(parse_bytes("0"), Some(0));
    assert_eq!(parse_bytes("MB"), None);
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
    assert!(!constant_time_eq(b"", b"a"));
    assert!(constant_time_eq(b"", b""));
}

#[test]
fn etcd_keys_default_to_the_file_store() {
    let c = parse(SAMPLE).unwrap();
    assert_eq!(c.meta_store, StoreKind::File);
    assert!(c.etcd_endpoints.is_empty());
    assert_eq!(c.etcd_prefix, "/clup");
    assert_eq!(c.etcd_timeout, Duration::from_secs(2));
    assert_eq!(c.leader_ttl, Duration::from_secs(10));
}

#[test]
fn etcd_store_parses() {
    let c = parse(&format!(
        "{SAMPLE}meta_store = etcd\n\
         etcd_endpoints = http://10.0.0.1:2379, http://etcd-2.example:2379/\n\
         etcd_prefix = /clup/prod-1\nleader_ttl = 6\n"
    ))
    .unwrap();
    assert_eq!(c.meta_store, StoreKind::Etcd);
    assert_eq!(
        c.etcd_endpoints,
        ["http://10.0.0.1:2379", "http://etcd-2.example:2379"]
    );
    assert_eq!(c.etcd_prefix, "/clup/prod-1");
    assert_eq!(c.leader_ttl, Duration::from_secs(6));
}

#[test]
fn bad_etcd_values_name_the_key() {
    for (extra, key, want) in [
        (
            "meta_store = zookeeper",
            "meta_store",
            "expected file or etcd",
        ),
        (
            "etcd_endpoints = 10.0.0.1:2379",
            "etcd_endpoints",
            "not an http:// URL",
        ),
        (
            "etcd_endpoints = https://h:2379",
            "etcd_endpoints",
            "https is not supported",
        ),
        ("etcd_endpoints = http://h", "etcd_endpoints", "has no port"),
        (
            "etcd_endpoints = http://h:0",
            "etcd_endpoints",
            "no valid port",
        ),
        (
            "etcd_endpoints = http://u:pw@h:2379",
            "etcd_endpoints",
            "user@ is not supported",
        ),
        (
            "etcd_endpoints = http://h_1:2379",
            "etcd_endpoints",
            "no valid host",
        ),
        (
            "etcd_endpoints = http://h:2379/v3",
            "etcd_endpoints",
            "no valid port",
        ),
        (
            "etcd_endpoints = http://h:1,,http://g:2",
            "etcd_endpoints",
            "empty endpoint",
        ),
        (
            "etcd_endpoints = http://h:1,http://h:1",
            "etcd_endpoints",
            "listed twice",
        ),
        ("etcd_prefix = clup", "etcd_prefix", "must start with '/'"),
        (
            "etcd_prefix = /clup//x",
            "etcd_prefix",
            "must start with '/'",
        ),
        (
            "etcd_prefix = /clup x",
            "etcd_prefix",
            "must start with '/'",
        ),
        ("leader_ttl = 0", "leader_ttl", "whole seconds"),
    ] {
        let e = parse(&format!("{SAMPLE}{extra}\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}");
        assert_eq!(e.line, Some(15), "{extra}: {e}");
        assert!(e.msg.contains(want), "{extra}: {e}");
    }
    // Rules between keys.
    let e = parse(&format!("{SAMPLE}meta_store = etcd\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("etcd_endpoints"));
    assert!(e.msg.contains("required when meta_store = etcd"), "{e}");
    let e = parse(&format!(
        "{SAMPLE}meta_store = etcd\netcd_endpoints = http://h:2379\nleader_ttl = 5\n"
    ))
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("leader_ttl"));
    assert_eq!(e.line, Some(17));
    assert!(
        e.msg.contains("less than 3 times etcd_timeout (2 s)"),
        "{e}"
    );
    // Without meta_store = etcd the etcd keys are only checked alone.
    parse(&format!("{SAMPLE}leader_ttl = 1\n")).unwrap();
}

#[test]
fn every_key_has_docs_and_valid_default() {
    for k in KEYS {
        assert!(!k.doc.is_empty(), "{}", k.name);
        if let Some(d) = k.default {
            if k.kind != Kind::Text {
                check_value(k, d).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            }
        }
    }
}
