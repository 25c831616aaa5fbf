//! The probe's status query and its parsing into a [`DbProbe`], for every
//! major from 9.5: the SQL is built from the [`PgVer`] table (WAL function
//! names, pg_stat_replication's columns, whether pg_stat_wal_receiver and
//! pg_control_checkpoint() exist), once per distinct table row.
//!
//! Owns: the status SQL text, the parsing of its answer, libpq conninfo
//! parsing. Must not: talk to a server (exec::pg runs the SQL).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::exec::pg::{parse_lsn, DbProbe, Replica, Upstream};
use crate::exec::pgver::PgVer;

/// Rows of each statement, as text.
pub(crate) type Results = Vec<Vec<Vec<Option<String>>>>;

/// How many statements [`status_sql`] has.
pub(crate) const STATUS_STATEMENTS: usize = 3;

/// Everything the probe reads, for any role, in one round trip: the views
/// come back as JSON so their columns may differ by version. The WAL
/// senders are read as pg_stat_replication would show them, without it:
/// the view asks pg_stat_get_activity() for every backend (and each of
/// those looks its process up among all of them); here it is asked for the
/// senders' pids only, and not at all where no sender runs. The same
/// columns are hidden from a login without pg_read_all_stats. Prepared
/// once per session (the SQL of the session's server version): planning
/// these costs the server several times what running them does.
///
/// Built once per distinct row of the table (a handful), then shared.
pub(crate) fn status_sql(v: &PgVer) -> &'static [String; STATUS_STATEMENTS] {
    static BUILT: Mutex<Vec<(PgVer, &'static [String; STATUS_STATEMENTS])>> =
        Mutex::new(Vec::new());
    let key = PgVer { num: 0, ..*v };
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, sql)) = built.iter().find(|(k, _)| *k == key) {
        return sql;
    }
    let sql: &'static [String; STATUS_STATEMENTS] = Box::leak(Box::new(build_status_sql(v)));
    built.push((key, sql));
    sql
}

fn build_status_sql(v: &PgVer) -> [String; STATUS_STATEMENTS] {
    let (current, receive, replay, walfile) = (
        v.current_lsn_fn,
        v.receive_lsn_fn,
        v.replay_lsn_fn,
        v.walfile_name_fn,
    );
    // A standby's timeline: its last checkpoint's (the receiver's, read
    // below, wins when there is one); 9.5 has neither.
    let standby_tli = if v.control_checkpoint_fn {
        "(SELECT timeline_id FROM pg_control_checkpoint())"
    } else {
        "NULL::int4"
    };
    let receiver = if v.wal_receiver_view {
        "SELECT to_jsonb(w) FROM pg_stat_wal_receiver w".to_string()
    } else {
        // recovery.conf is readable by a superuser only: otherwise the
        // upstream stays unknown. Whether the receiver streams cannot be
        // read on 9.5.
        "SELECT jsonb_build_object('status', 'unknown', 'recovery_conf', \
 CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
 THEN pg_read_file('recovery.conf', 0, 65536, true) END) WHERE pg_is_in_recovery()"
            .to_string()
    };
    [
        format!(
            "SELECT current_setting('server_version_num'), pg_is_in_recovery(), \
 (CASE WHEN pg_is_in_recovery() THEN {receive}() ELSE {current}() END)::text, \
 (CASE WHEN pg_is_in_recovery() THEN {replay}() END)::text, \
 CASE WHEN pg_is_in_recovery() THEN {standby_tli} \
  ELSE ('x' || substr({walfile}({current}()), 1, 8))::bit(32)::int4 END, \
 current_setting('synchronous_standby_names')"
        ),
        "SELECT to_jsonb(s) || jsonb_build_object('application_name', a.application_name, \
 'client_addr', a.client_addr) \
 FROM pg_stat_get_wal_senders() s, LATERAL pg_stat_get_activity(s.pid) a \
 ORDER BY a.application_name, s.pid"
            .to_string(),
        receiver,
    ]
}

pub(crate) fn cell(res: &Results, stmt: usize, row: usize, col: usize) -> Option<&str> {
    res.get(stmt)?.get(row)?.get(col)?.as_deref()
}

/// Fill `p` from the three result sets of [`status_sql`] for `v`.
pub(crate) fn fill_status(res: &Results, v: &PgVer, p: &mut DbProbe) -> Result<(), String> {
    if res.len() != 3 || res[0].len() != 1 {
        return Err("unexpected answer to the status query".to_string());
    }
    p.version = cell(res, 0, 0, 0).and_then(|v| v.parse().ok());
    p.in_recovery = cell(res, 0, 0, 1).map(|v| v == "t");
    p.wal_lsn = cell(res, 0, 0, 2).and_then(parse_lsn);
    p.replay_lsn = cell(res, 0, 0, 3).and_then(parse_lsn);
    p.timeline = cell(res, 0, 0, 4).and_then(|v| v.parse().ok());
    p.sync_names = cell(res, 0, 0, 5).map(str::to_string);
    p.replicas = res[1]
        .iter()
        .filter_map(|row| row.first()?.as_deref())
        .filter_map(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .map(|j| replica_from_json(&j, v))
        .collect();
    p.upstream = res[2]
        .first()
        .and_then(|row| row.first()?.as_deref())
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .map(|j| upstream_from_json(&j));
    if let Some(up) = &p.upstream {
        // The receiver's timeline is current; the checkpoint's may lag.
        if up.timeline.is_some() {
            p.timeline = up.timeline;
        }
    }
    Ok(())
}

fn jstr(j: &serde_json::Value, k: &str) -> Option<String> {
    j.get(k)?.as_str().map(str::to_string)
}

fn jlsn(j: &serde_json::Value, k: &str) -> Option<u64> {
    parse_lsn(j.get(k)?.as_str()?)
}

fn replica_from_json(j: &serde_json::Value, v: &PgVer) -> Replica {
    let [sent, write, flush, replay] = v.replication_lsn_cols;
    Replica {
        application_name: jstr(j, "application_name").unwrap_or_default(),
        client_addr: jstr(j, "client_addr").map(|a| a.trim_end_matches("/32").to_string()),
        state: jstr(j, "state").unwrap_or_default(),
        sync_state: jstr(j, "sync_state").unwrap_or_default(),
        sent_lsn: jlsn(j, sent),
        write_lsn: jlsn(j, write),
        flush_lsn: jlsn(j, flush),
        replay_lsn: jlsn(j, replay),
    }
}

fn upstream_from_json(j: &serde_json::Value) -> Upstream {
    // 9.5 has no pg_stat_wal_receiver: primary_conninfo from recovery.conf.
    let conninfo = jstr(j, "conninfo")
        .or_else(|| jstr(j, "recovery_conf").and_then(|t| recovery_conf_conninfo(&t)))
        .unwrap_or_default();
    let from_conninfo = parse_conninfo(&conninfo);
    let sender_host = jstr(j, "sender_host").or_else(|| from_conninfo.get("host").cloned());
    let sender_port = j
        .get("sender_port")
        .and_then(|v| v.as_u64())
        .and_then(|v| u16::try_from(v).ok())
        .or_else(|| from_conninfo.get("port").and_then(|v| v.parse().ok()));
    Upstream {
        status: jstr(j, "status").unwrap_or_default(),
        sender_host,
        sender_port,
        timeline: j
            .get("received_tli")
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .filter(|t| *t > 0),
        latest_end_lsn: jlsn(j, "latest_end_lsn").or_else(|| jlsn(j, "latest_end_location")),
    }
}

/// The primary_conninfo value in a recovery.conf's text (the last one wins,
/// as for the server), its postgresql.conf quoting undone.
fn recovery_conf_conninfo(text: &str) -> Option<String> {
    let v = text.lines().rev().find_map(|l| {
        let (k, v) = l.trim().split_once('=')?;
        (k.trim() == "primary_conninfo").then(|| v.trim())
    })?;
    let Some(inner) = v.strip_prefix('\'') else {
        return Some(v.split_whitespace().next().unwrap_or("").to_string());
    };
    let mut out = String::new();
    let mut it = inner.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\\' => match it.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(o) => out.push(o),
                None => {}
            },
            '\'' if it.peek() == Some(&'\'') => {
                it.next();
                out.push('\'');
            }
            '\'' => break,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `key=value key='quoted \' value'` (libpq conninfo) into a map.
pub fn parse_conninfo(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '\'' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    val.extend(chars.next());
                } else {
                    val.push(c);
                }
            }
        }
        out.insert(key, val);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_parsing() {
        let m = parse_conninfo(
            "user=repl passfile=/x channel_binding=prefer dbname=replication host=10.0.0.1 port=5432 application_name=stb02 password='a\\'b c' sslmode=disable",
        );
        assert_eq!(m["host"], "10.0.0.1");
        assert_eq!(m["port"], "5432");
        assert_eq!(m["password"], "a'b c");
        assert_eq!(m["sslmode"], "disable");
        assert!(parse_conninfo("").is_empty());
        assert_eq!(parse_conninfo("host = h port=1")["host"], "h");
    }

    fn rows(v: &[&[Option<&str>]]) -> Vec<Vec<Option<String>>> {
        v.iter()
            .map(|r| r.iter().map(|c| c.map(str::to_string)).collect())
            .collect()
    }

    #[test]
    fn status_of_a_primary() {
        let res = vec![
            rows(&[&[
                Some("150004"),
                Some("f"),
                Some("0/3000148"),
                None,
                Some("1"),
                Some("stb02"),
            ]]),
            rows(&[&[Some(
                r#"{"pid": 77, "application_name": "stb02", "client_addr": "127.0.0.1", "state": "streaming", "sync_state": "sync", "sent_lsn": "0/3000148", "write_lsn": "0/3000148", "flush_lsn": "0/3000148", "replay_lsn": "0/3000110"}"#,
            )]]),
            vec![],
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &PgVer::of(150004), &mut p).unwrap();
        assert_eq!(p.version, Some(150004));
        assert_eq!(p.in_recovery, Some(false));
        assert_eq!(p.wal_lsn, Some(0x3000148));
        assert_eq!(p.timeline, Some(1));
        assert_eq!(p.sync_names.as_deref(), Some("stb02"));
        assert_eq!(p.upstream, None);
        assert_eq!(
            p.replicas,
            [Replica {
                application_name: "stb02".into(),
                client_addr: Some("127.0.0.1".into()),
                state: "streaming".into(),
                sync_state: "sync".into(),
                sent_lsn: Some(0x3000148),
                write_lsn: Some(0x3000148),
                flush_lsn: Some(0x3000148),
                replay_lsn: Some(0x3000110),
            }]
        );
    }

    #[test]
    fn status_of_a_pg10_standby_reads_conninfo() {
        let res = vec![
            rows(&[&[
                Some("100023"),
                Some("t"),
                Some("0/5000000"),
                Some("0/4FFFF00"),
                Some("1"),
                Some(""),
            ]]),
            vec![],
            rows(&[&[Some(
                r#"{"pid": 9, "status": "streaming", "received_tli": 2, "latest_end_lsn": "0/5000100", "conninfo": "user=repl password=******** dbname=replication host=10.0.0.1 port=5433 application_name=stb02 sslmode=disable"}"#,
            )]]),
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &PgVer::of(100023), &mut p).unwrap();
        assert_eq!(p.in_recovery, Some(true));
        assert_eq!(p.replay_lsn, Some(0x4FFFF00));
        // received_tli wins over the checkpoint's timeline.
        assert_eq!(p.timeline, Some(2));
        assert_eq!(
            p.upstream,
            Some(Upstream {
                status: "streaming".into(),
                sender_host: Some("10.0.0.1".into()),
                sender_port: Some(5433),
                timeline: Some(2),
                // The primary's end of WAL as of its last message.
                latest_end_lsn: Some(0x5000100),
            })
        );
        assert!(fill_status(&vec![vec![]], &PgVer::of(100023), &mut p).is_err());
    }
    #[test]
    fn status_sql_by_major() {
        let old_names = [
            "pg_current_xlog_location",
            "pg_last_xlog_receive_location",
            "pg_last_xlog_replay_location",
            "pg_xlogfile_name",
        ];
        let new_names = [
            "pg_current_wal_lsn",
            "pg_last_wal_receive_lsn",
            "pg_last_wal_replay_lsn",
            "pg_walfile_name",
        ];
        for num in [90525, 90610, 100023, 110022, 120022, 150018, 180004] {
            let sql = status_sql(&PgVer::of(num)).join(";\n");
            let (want, not) = if num < 100000 {
                (old_names, new_names)
            } else {
                (new_names, old_names)
            };
            for n in want {
                assert!(sql.contains(&format!("{n}(")), "{num}: no {n} in {sql}");
            }
            for n in not {
                assert!(!sql.contains(n), "{num}: {n} in {sql}");
            }
            assert_eq!(sql.contains("pg_stat_wal_receiver"), num >= 90600, "{num}");
            assert_eq!(
                sql.contains("pg_control_checkpoint()"),
                num >= 90600,
                "{num}"
            );
            assert_eq!(sql.contains("recovery.conf"), num < 90600, "{num}");
        }
        // One text per table row, shared by the minor versions.
        assert!(std::ptr::eq(
            status_sql(&PgVer::of(90610)),
            status_sql(&PgVer::of(90622))
        ));
        assert!(!std::ptr::eq(
            status_sql(&PgVer::of(90610)),
            status_sql(&PgVer::of(100023))
        ));
    }

    #[test]
    fn status_of_a_pg96_primary_reads_location_columns() {
        let res = vec![
            rows(&[&[
                Some("90610"),
                Some("f"),
                Some("0/3000148"),
                None,
                Some("2"),
                Some("1 (stb02,stb03)"),
            ]]),
            rows(&[&[Some(
                r#"{"pid": 77, "application_name": "stb02", "client_addr": "10.213.0.42/32", "state": "streaming", "sync_state": "sync", "sent_location": "0/3000148", "write_location": "0/3000140", "flush_location": "0/3000130", "replay_location": "0/3000110"}"#,
            )]]),
            vec![],
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &PgVer::of(90610), &mut p).unwrap();
        assert_eq!(p.version, Some(90610));
        assert_eq!(p.timeline, Some(2));
        assert_eq!(
            p.replicas,
            [Replica {
                application_name: "stb02".into(),
                client_addr: Some("10.213.0.42".into()),
                state: "streaming".into(),
                sync_state: "sync".into(),
                sent_lsn: Some(0x3000148),
                write_lsn: Some(0x3000140),
                flush_lsn: Some(0x3000130),
                replay_lsn: Some(0x3000110),
            }]
        );
    }

    #[test]
    fn status_of_a_pg95_standby_reads_recovery_conf() {
        let conf = "standby_mode = 'on'\nprimary_conninfo = 'application_name=stb02 user=repl password=''p\\\\''w'' host=10.0.0.1 port=5433 sslmode=disable'\nrecovery_target_timeline = 'latest'\n";
        let j = serde_json::json!({"status": "unknown", "recovery_conf": conf}).to_string();
        let res = vec![
            rows(&[&[
                Some("90525"),
                Some("t"),
                Some("0/5000000"),
                Some("0/4FFFF00"),
                None,
                Some(""),
            ]]),
            vec![],
            rows(&[&[Some(j.as_str())]]),
        ];
        let mut p = DbProbe::default();
        fill_status(&res, &PgVer::of(90525), &mut p).unwrap();
        assert_eq!(p.timeline, None);
        assert_eq!(
            p.upstream,
            Some(Upstream {
                status: "unknown".into(),
                sender_host: Some("10.0.0.1".into()),
                sender_port: Some(5433),
                timeline: None,
                latest_end_lsn: None,
            })
        );
        assert_eq!(
            recovery_conf_conninfo("primary_conninfo = 'host=h password=''a\\\\b'''\n").unwrap(),
            "host=h password='a\\b'"
        );
        assert_eq!(recovery_conf_conninfo("standby_mode = on\n"), None);
    }
}
