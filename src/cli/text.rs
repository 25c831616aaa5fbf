//! clupadm's fixed-width tables and JSON, in the manual's layout (which
//! 1.x scripts parse byte for byte). Pure: rows in, text out.

use serde_json::{json, Value};

use crate::model::meta::{self, Cluster, Clusters};
use crate::model::report::{DelayRow, LsnRow, SlotRow};
use crate::store::Task;
use crate::util::table::{self, col, Align};

/// `clupadm show` in the manual's layout.
pub fn show_text(clusters: &Clusters) -> String {
    let mut out = table::title("cluster list", '=');
    let cols = [
        col("cluster_name", 12, Align::Left),
        col("state", 9, Align::Right),
        col("write_vip", 17, Align::Left),
        col("read_vip", 17, Align::Left),
        col("read_vip_host", 17, Align::Left),
        col("cstlb_list", 40, Align::Left),
    ];
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|(name, c)| {
            vec![
                name.clone(),
                meta::cluster_state_name(c.state).to_string(),
                c.write_vip.clone(),
                c.read_vip.clone(),
                c.read_vip_host.clone(),
                table::py_list(&c.cstlb_list),
            ]
        })
        .collect();
    out.push_str(&table::render(&cols, &rows));
    out.push('\n');
    out.push_str(&table::title("db list", '='));
    let cols = [
        col("cluster_name", 12, Align::Left),
        col("id", 2, Align::Right),
        col("state", 10, Align::Left),
        col("primary", 7, Align::Right),
        col("host", 17, Align::Left),
        col("port", 4, Align::Left),
        col("switch_to", 17, Align::Left),
        col("os_user", 10, Align::Left),
        col("pgdata", 30, Align::Left),
    ];
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .flat_map(|(name, c)| c.db_list.iter().map(move |d| (name, d)))
        .map(|(name, d)| {
            vec![
                name.clone(),
                d.id.to_string(),
                meta::db_state_name(d.state).to_string(),
                d.is_primary.to_string(),
                d.host.clone(),
                d.port.to_string(),
                d.switch_host.clone(),
                d.os_user.clone(),
                d.pgdata.clone(),
            ]
        })
        .collect();
    out.push_str(&table::render(&cols, &rows));
    out
}

/// `clupadm show`'s extra section with use_slots: each standby's slot on
/// its primary and the WAL it holds back there (N/A: no such slot, or the
/// primary did not answer: then the reason follows the table).
pub fn slots_text(rows: &[SlotRow]) -> String {
    let mut out = table::title("slot list", '=');
    let cols = [
        col("cluster_name", 12, Align::Left),
        col("id", 2, Align::Right),
        col("host", 17, Align::Left),
        col("slot_name", 20, Align::Left),
        col("active", 6, Align::Left),
        col("restart_lsn", 16, Align::Right),
        col("retained_bytes", 14, Align::Right),
    ];
    let na = |o: Option<String>| o.unwrap_or_else(|| "N/A".to_string());
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.cluster_name.clone(),
                r.id.to_string(),
                r.host.clone(),
                if r.exists {
                    r.slot_name.clone()
                } else {
                    format!("{} (none)", r.slot_name)
                },
                na(r.active.map(|a| if a { "yes" } else { "no" }.to_string())),
                na(r.restart_lsn.clone()),
                na(r.retained_bytes.map(|b| b.to_string())),
            ]
        })
        .collect();
    out.push_str(&table::render(&cols, &table_rows));
    let mut errors: Vec<String> = rows
        .iter()
        .filter_map(|r| Some(format!("{}: {}\n", r.cluster_name, r.error.as_ref()?)))
        .collect();
    errors.dedup();
    errors.iter().for_each(|e| out.push_str(e));
    out
}

/// `clupadm show --json`: the same facts, state names spelled out, with
/// etcd which clupserver leads (`monitor`), and with use_slots the
/// standbys' slots (`slots`).
pub fn show_json(clusters: &Clusters, monitor: Option<&str>, slots: Option<&[SlotRow]>) -> String {
    let cl: Vec<Value> = clusters
        .iter()
        .map(|(name, c): (&String, &Cluster)| {
            json!({
                "cluster_name": name,
                "state": meta::cluster_state_name(c.state),
                "write_vip": c.write_vip,
                "read_vip": c.read_vip,
                "read_vip_host": c.read_vip_host,
                "cstlb_list": c.cstlb_list,
                "locked_by": if c.lock_time > crate::now_secs() { json!(c.lock_holder) } else { Value::Null },
            })
        })
        .collect();
    let dbs: Vec<Value> = clusters
        .iter()
        .flat_map(|(name, c)| c.db_list.iter().map(move |d| (name, d)))
        .map(|(name, d)| {
            json!({
                "cluster_name": name,
                "id": d.id,
                "state": meta::db_state_name(d.state),
                "primary": d.is_primary,
                "host": d.host,
                "port": d.port,
                "switch_to": d.switch_host,
                "os_user": d.os_user,
                "pgdata": d.pgdata,
                "repl_app_name": d.repl_app_name,
            })
        })
        .collect();
    let mut v = match monitor {
        None => json!({"clusters": cl, "dbs": dbs}),
        Some(m) => json!({"clusters": cl, "dbs": dbs, "monitor": m}),
    };
    if let Some(s) = slots {
        v["slots"] = json!(s);
    }
    format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
}

/// `clupadm get_last_lsn` in the manual's layout.
pub fn lsn_text(rows: &[LsnRow]) -> String {
    let mut out = table::title("db list", '-');
    let cols = [
        col("id", 2, Align::Right),
        col("host", 17, Align::Left),
        col("primary", 7, Align::Right),
        col("timeline", 8, Align::Right),
        col("lsn", 16, Align::Right),
    ];
    let na = |o: Option<String>| o.unwrap_or_else(|| "N/A".to_string());
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.host.clone(),
                r.primary.to_string(),
                na(r.timeline.map(|t| t.to_string())),
                na(r.lsn.clone()),
            ]
        })
        .collect();
    out.push_str(&table::render(&cols, &rows));
    out
}

/// `clupadm repl_delay` in the manual's layout.
pub fn delay_text(rows: &[DelayRow]) -> String {
    let cols = [
        col("host", 17, Align::Left),
        col("primary", 7, Align::Left),
        col("current_lsn", 11, Align::Right),
        col("sent_delay", 12, Align::Right),
        col("write_delay", 12, Align::Right),
        col("flush_delay", 12, Align::Right),
        col("replay_delay", 12, Align::Right),
        col("is_sync", 12, Align::Right),
        col("state", 12, Align::Right),
    ];
    let na = |o: Option<String>| o.unwrap_or_else(|| "N/A".to_string());
    let num = |o: Option<u64>| na(o.map(|n| n.to_string()));
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.host.clone(),
                r.primary.to_string(),
                na(r.current_lsn.clone()),
                num(r.sent_delay),
                num(r.write_delay),
                num(r.flush_delay),
                num(r.replay_delay),
                na(r.is_sync.clone()),
                na(r.state.clone()),
            ]
        })
        .collect();
    table::render(&cols, &rows)
}

/// `clupadm show_task`: one line per task, newest last.
pub fn show_task_text(tasks: &[Task]) -> String {
    let cols = [
        col("task_id", 7, Align::Right),
        col("state", 11, Align::Left),
        col("cluster_name", 12, Align::Left),
        col("begin_time", 19, Align::Left),
        col("end_time", 19, Align::Left),
        col("task_name", 30, Align::Left),
    ];
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.state.clone(),
                t.cluster.clone(),
                crate::util::logging::format_epoch(t.begin),
                if t.end == 0 {
                    String::new()
                } else {
                    crate::util::logging::format_epoch(t.end)
                },
                t.name.clone(),
            ]
        })
        .collect();
    table::render(&cols, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    /// The manual's `clupadm show` after pg04 failed (§3.2.2), with the
    /// trailing spaces it really has on every line but the last ones.
    #[test]
    fn show_matches_manual_layout() {
        let mut c = parse_clusters(SAMPLE_INIT).unwrap();
        let c1 = c.get_mut("cluster01").unwrap();
        c1.cstlb_list = vec!["192.168.56.41:8082".into(), "192.168.56.42:8082".into()];
        c1.db_list[0].is_primary = 0;
        c1.db_list[1].is_primary = 1;
        c1.db_list[3].state = meta::DB_FAULT;
        let want = "                   cluster list
==================================================
cluster_name   state       write_vip          read_vip       read_vip_host                  cstlb_list               
------------ --------- ----------------- ----------------- ----------------- ----------------------------------------
cluster01       Normal 192.168.56.40     192.168.56.45     192.168.56.41     ['192.168.56.41:8082', '192.168.56.42:8082']

                   db list
==================================================
cluster_name id   state    primary        host       port     switch_to      os_user               pgdata            
------------ -- ---------- ------- ----------------- ---- ----------------- ---------- ------------------------------
cluster01     1 Normal           0 192.168.56.41     5432 192.168.56.41     postgres   /home/postgres/pgdata         
cluster01     2 Normal           1 192.168.56.42     5432 192.168.56.42     postgres   /home/postgres/pgdata         
cluster01     3 Normal           0 192.168.56.43     5432 192.168.56.43     postgres   /home/postgres/pgdata         
cluster01     4 Fault            0 192.168.56.44     5432 192.168.56.44     postgres   /home/postgres/pgdata         
";
        assert_eq!(show_text(&c), want);
    }

    #[test]
    fn show_json_is_parseable_with_names() {
        let c = parse_clusters(SAMPLE_INIT).unwrap();
        let v: Value = serde_json::from_str(&show_json(&c, None, None)).unwrap();
        assert_eq!(v["clusters"][0]["state"], "Normal");
        assert_eq!(v["dbs"].as_array().unwrap().len(), 4);
        assert_eq!(v["dbs"][0]["primary"], 1);
        assert_eq!(v["dbs"][3]["host"], "192.168.56.44");
        assert!(v.get("slots").is_none());
        let rows = slot_rows();
        let v: Value = serde_json::from_str(&show_json(&c, None, Some(&rows))).unwrap();
        assert_eq!(v["slots"][0]["slot_name"], "stb42");
        assert_eq!(v["slots"][0]["retained_bytes"], 16777216);
        assert_eq!(v["slots"][1]["exists"], false);
    }

    fn slot_rows() -> Vec<SlotRow> {
        vec![
            SlotRow {
                cluster_name: "cluster01".into(),
                id: 2,
                host: "192.168.56.42".into(),
                slot_name: "stb42".into(),
                exists: true,
                active: Some(true),
                restart_lsn: Some("0/3000000".into()),
                retained_bytes: Some(16 << 20),
                error: None,
            },
            SlotRow {
                cluster_name: "cluster01".into(),
                id: 4,
                host: "192.168.56.44".into(),
                slot_name: "stb44".into(),
                exists: false,
                active: None,
                restart_lsn: None,
                retained_bytes: None,
                error: None,
            },
        ]
    }

    #[test]
    fn slot_list_shows_each_standby_slot_and_its_wal() {
        let want = "                   slot list
==================================================
cluster_name id        host            slot_name       active   restart_lsn    retained_bytes
------------ -- ----------------- -------------------- ------ ---------------- --------------
cluster01     2 192.168.56.42     stb42                yes           0/3000000       16777216
cluster01     4 192.168.56.44     stb44 (none)         N/A                 N/A            N/A
";
        assert_eq!(slots_text(&slot_rows()), want);
        let mut failed = slot_rows();
        for r in &mut failed {
            r.error = Some("connection refused".into());
        }
        assert!(slots_text(&failed).ends_with("N/A\ncluster01: connection refused\n"));
    }

    /// The manual's get_last_lsn and repl_delay outputs (§3.1.2), whose
    /// trailing spaces are kept.
    #[test]
    fn lsn_and_delay_match_manual_layout() {
        let rows: Vec<LsnRow> = (1..=4)
            .map(|id| LsnRow {
                id,
                host: format!("192.168.56.4{id}"),
                primary: u8::from(id == 2),
                timeline: Some(9),
                lsn: Some("0/30E73D0".into()),
            })
            .collect();
        let want = "                   db list
--------------------------------------------------
id        host       primary timeline       lsn       
-- ----------------- ------- -------- ----------------
 1 192.168.56.41           0        9        0/30E73D0
 2 192.168.56.42           1        9        0/30E73D0
 3 192.168.56.43           0        9        0/30E73D0
 4 192.168.56.44           0        9        0/30E73D0
";
        assert_eq!(lsn_text(&rows), want);

        let standby = |id: u32| DelayRow {
            host: format!("192.168.56.4{id}"),
            primary: 0,
            current_lsn: Some("0/30E8038".into()),
            sent_delay: Some(0),
            write_delay: Some(0),
            flush_delay: Some(0),
            replay_delay: Some(152),
            is_sync: Some("async".into()),
            state: Some("normal".into()),
        };
        let primary = DelayRow {
            host: "192.168.56.42".into(),
            primary: 1,
            current_lsn: None,
            sent_delay: None,
            write_delay: None,
            flush_delay: None,
            replay_delay: None,
            is_sync: None,
            state: None,
        };
        let want = "       host       primary current_lsn  sent_delay  write_delay  flush_delay  replay_delay   is_sync       state    
----------------- ------- ----------- ------------ ------------ ------------ ------------ ------------ ------------
192.168.56.41     0         0/30E8038            0            0            0          152        async       normal
192.168.56.42     1               N/A          N/A          N/A          N/A          N/A          N/A          N/A
192.168.56.43     0         0/30E8038            0            0            0          152        async       normal
192.168.56.44     0         0/30E8038            0            0            0          152        async       normal
";
        assert_eq!(
            delay_text(&[standby(1), primary, standby(3), standby(4)]),
            want
        );
    }
}
