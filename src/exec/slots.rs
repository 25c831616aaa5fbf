//! Physical replication slots on a server (use_slots): list them with the
//! WAL each holds back, create the missing ones, drop given ones, and set
//! max_slot_wal_keep_size where the major has it.
//!
//! Owns: the slot SQL, in the form of the server's major ([`PgVer`]). Must
//! not: choose which slots a cluster wants, or when to drop one (that is
//! the monitor's), or retry. Every call is one bounded session
//! ([`pgadmin::admin`](crate::exec::pgadmin)). Slot names come from
//! [`pgver::slot_name`](crate::exec::pgver::slot_name) and are quoted
//! anyway.

use postgres::Client;

use crate::exec::pg::{parse_lsn, sql_literal, PgError};
use crate::exec::pgadmin::{admin, simple};
use crate::exec::pgstatus::cell;
use crate::exec::pgver::PgVer;
use crate::model::config::Config;
use crate::model::meta::Db;

/// One physical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    /// A WAL sender streams through it now.
    pub active: bool,
    /// The oldest WAL it keeps; None before a slot without reserve (9.5)
    /// was first used.
    pub restart_lsn: Option<u64>,
}

impl Slot {
    /// Bytes of WAL the slot holds back on a server at `current`.
    pub fn retained(&self, current: Option<u64>) -> Option<u64> {
        Some(current?.saturating_sub(self.restart_lsn?))
    }
}

/// What [`list`] read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slots {
    pub version: u32,
    /// The server's WAL position: current on a primary, replayed on a
    /// standby.
    pub current_lsn: Option<u64>,
    pub slots: Vec<Slot>,
}

impl Slots {
    pub fn get(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }
}

fn version(c: &mut Client, what: &str) -> Result<PgVer, PgError> {
    let res = simple(c, what, "SELECT current_setting('server_version_num')")?;
    cell(&res, 0, 0, 0)
        .and_then(|v| v.parse().ok())
        .map(PgVer::of)
        .ok_or_else(|| PgError::new(what, "no server_version_num"))
}

/// `ARRAY['a','b']::text[]`.
fn text_array(names: &[String]) -> String {
    let items: Vec<String> = names.iter().map(|n| sql_literal(n)).collect();
    format!("ARRAY[{}]::text[]", items.join(","))
}

/// The physical slots of `db` and its WAL position, in one session.
pub fn list(db: &Db, cfg: &Config) -> Result<Slots, PgError> {
    admin(db, cfg, "list slots of", cfg.probe_timeout, |c, what| {
        let v = version(c, what)?;
        let sql = format!(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN {}() ELSE {}() END)::text;\
             SELECT slot_name, active, restart_lsn::text FROM pg_replication_slots \
             WHERE slot_type = 'physical' ORDER BY slot_name",
            v.replay_lsn_fn, v.current_lsn_fn
        );
        let res = simple(c, what, &sql)?;
        let slots = res
            .get(1)
            .map(|rows| {
                rows.iter()
                    .map(|r| Slot {
                        name: r.first().cloned().flatten().unwrap_or_default(),
                        active: r.get(1).cloned().flatten().as_deref() == Some("t"),
                        restart_lsn: r.get(2).cloned().flatten().as_deref().and_then(parse_lsn),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Slots {
            version: v.num,
            current_lsn: cell(&res, 0, 0, 0).and_then(parse_lsn),
            slots,
        })
    })
}

/// The statement that creates those of `names` that do not exist yet and
/// names them.
pub fn create_sql(v: &PgVer, names: &[String]) -> String {
    format!(
        "SELECT s.n, {}::text FROM (SELECT n FROM unnest({}) AS n \
         WHERE n NOT IN (SELECT slot_name::text FROM pg_replication_slots)) AS s",
        v.create_slot_sql("s.n"),
        text_array(names)
    )
}

/// Create the physical slots among `names` that `db` does not have yet
/// (reserving WAL at once from 9.6): one statement. Returns those created.
pub fn create_missing(db: &Db, cfg: &Config, names: &[String]) -> Result<Vec<String>, PgError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let names = names.to_vec();
    admin(
        db,
        cfg,
        "create slots on",
        cfg.probe_timeout,
        move |c, what| {
            let v = version(c, what)?;
            let res = simple(c, what, &create_sql(&v, &names))?;
            Ok(first_column(&res))
        },
    )
}

/// The statement that drops those of `names` no WAL sender uses.
pub fn drop_sql(names: &[String]) -> String {
    format!(
        "SELECT slot_name::text, pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_type = 'physical' AND NOT active AND slot_name::text = ANY({})",
        text_array(names)
    )
}

/// Drop the slots among `names` that no WAL sender uses (an active slot
/// cannot be dropped). Returns those dropped.
pub fn drop_inactive(db: &Db, cfg: &Config, names: &[String]) -> Result<Vec<String>, PgError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let sql = drop_sql(names);
    admin(
        db,
        cfg,
        "drop slots on",
        cfg.probe_timeout,
        move |c, what| Ok(first_column(&simple(c, what, &sql)?)),
    )
}

fn first_column(res: &crate::exec::pgstatus::Results) -> Vec<String> {
    res.first()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r.first().cloned().flatten())
                .collect()
        })
        .unwrap_or_default()
}

/// What [`set_wal_keep_size`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepSize {
    /// The major has no max_slot_wal_keep_size (before 13).
    Missing(String),
    /// It was already that many MB.
    Already(u64),
    /// Set to that many MB (ALTER SYSTEM, reload).
    Set(u64),
}

/// `bytes` in whole MB, rounded up (the setting's unit).
pub fn keep_size_mb(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Set max_slot_wal_keep_size to `bytes` (rounded up to MB) on `db`, where
/// its major has it, unless it is that already.
pub fn set_wal_keep_size(db: &Db, cfg: &Config, bytes: u64) -> Result<KeepSize, PgError> {
    let mb = keep_size_mb(bytes);
    admin(
        db,
        cfg,
        "set max_slot_wal_keep_size on",
        cfg.probe_timeout,
        move |c, what| {
            let v = version(c, what)?;
            if !v.slot_wal_keep_size {
                return Ok(KeepSize::Missing(v.major()));
            }
            // pg_settings gives it in its unit, MB.
            let res = simple(
                c,
                what,
                "SELECT setting FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            )?;
            if cell(&res, 0, 0, 0) == Some(mb.to_string().as_str()) {
                return Ok(KeepSize::Already(mb));
            }
            simple(
                c,
                what,
                &format!("ALTER SYSTEM SET max_slot_wal_keep_size = '{mb}MB'"),
            )?;
            simple(c, what, "SELECT pg_reload_conf()")?;
            Ok(KeepSize::Set(mb))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_by_major() {
        let names = vec!["stb2".to_string(), "stb3".to_string()];
        assert_eq!(
            create_sql(&PgVer::of(90610), &names),
            "SELECT s.n, pg_create_physical_replication_slot(s.n, true)::text FROM \
             (SELECT n FROM unnest(ARRAY['stb2','stb3']::text[]) AS n \
             WHERE n NOT IN (SELECT slot_name::text FROM pg_replication_slots)) AS s"
        );
        assert!(create_sql(&PgVer::of(90525), &names)
            .contains("pg_create_physical_replication_slot(s.n)::text"));
        let d = drop_sql(&["it's".to_string()]);
        assert!(d.ends_with("= ANY(ARRAY['it''s']::text[])"), "{d}");
        assert!(d.contains("NOT active"));
    }

    #[test]
    fn retained_and_sizes() {
        let s = Slot {
            name: "a".into(),
            active: false,
            restart_lsn: Some(0x1_0000_0000),
        };
        assert_eq!(s.retained(Some(0x1_0100_0000)), Some(16 << 20));
        assert_eq!(s.retained(Some(5)), Some(0));
        assert_eq!(s.retained(None), None);
        let unused = Slot {
            restart_lsn: None,
            ..s
        };
        assert_eq!(unused.retained(Some(9)), None);
        assert_eq!(keep_size_mb(10 << 30), 10240);
        assert_eq!(keep_size_mb(1), 1);
        assert_eq!(keep_size_mb(3 << 20), 3);
    }
}
