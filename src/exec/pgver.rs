//! What differs between the PostgreSQL majors clup supports (9.5 to 18),
//! in one table keyed by server_version_num.
//!
//! Owns: the names of the WAL functions, of pg_stat_replication's LSN
//! columns and of the WAL directory; whether pg_stat_wal_receiver and
//! pg_control_checkpoint() exist; how a standby is promoted; which
//! recovery settings file a standby reads and whether a new
//! primary_conninfo takes effect on reload; the synchronous_standby_names
//! syntax; the flags clup gives pg_basebackup and pg_rewind and what
//! pg_rewind does by itself; what replication slots take (the reserve
//! argument, max_slot_wal_keep_size); the parsing of server_version and
//! PG_VERSION.
//! Must not: talk to a server or a host. Executors ask it; nothing else in
//! clup compares version numbers.

/// How a standby is promoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promote {
    /// 9.5, 9.6: `pg_ctl promote` returns at once (no `-w` before 10);
    /// then pg_is_in_recovery() is polled, bounded.
    PgCtlThenPoll,
    /// 10, 11: `pg_ctl promote -w -t N`.
    PgCtlWait,
    /// 12 and later: `SELECT pg_promote(wait => true, wait_seconds => N)`.
    Function,
}

/// Where a standby's recovery settings live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryFile {
    /// Before 12: `recovery.conf` (standby_mode, primary_conninfo, ...),
    /// read at start only.
    RecoveryConf,
    /// 12 and later: `standby.signal` + primary_conninfo in
    /// postgresql.auto.conf (ALTER SYSTEM while running).
    StandbySignal,
}

/// One major's differences. Built by [`PgVer::of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgVer {
    /// server_version_num, e.g. 90610, 150004.
    pub num: u32,
    /// pg_current_wal_lsn / pg_current_xlog_location.
    pub current_lsn_fn: &'static str,
    /// pg_last_wal_receive_lsn / pg_last_xlog_receive_location.
    pub receive_lsn_fn: &'static str,
    /// pg_last_wal_replay_lsn / pg_last_xlog_replay_location.
    pub replay_lsn_fn: &'static str,
    /// pg_walfile_name / pg_xlogfile_name.
    pub walfile_name_fn: &'static str,
    /// pg_stat_replication's sent, write, flush and replay LSN columns.
    pub replication_lsn_cols: [&'static str; 4],
    /// `pg_wal` / `pg_xlog`, relative to the data directory.
    pub wal_dir: &'static str,
    /// pg_stat_wal_receiver exists (9.6+); without it the upstream comes
    /// from recovery.conf's primary_conninfo.
    pub wal_receiver_view: bool,
    /// pg_control_checkpoint() exists (9.6+): a standby's timeline.
    pub control_checkpoint_fn: bool,
    pub promote: Promote,
    pub recovery_file: RecoveryFile,
    /// A new primary_conninfo (and primary_slot_name, which goes in the
    /// same file) takes effect on reload (13+).
    pub conninfo_reloads: bool,
    /// synchronous_standby_names takes `FIRST n (...)` and `ANY n (...)`
    /// (10+); 9.6 only has `n (...)` (priority), 9.5 only a plain list.
    pub sync_method_keywords: bool,
    /// `n (a, b)` is understood (9.6+).
    pub sync_num: bool,
    /// The flags clup passes to pg_basebackup for `repair --rebuild`
    /// (besides -h -p -U -D): the same from 9.5 to 18. 9.x has `-X stream`
    /// but not `--wal-method`, nor `-C`/`--slot` creation (10+).
    pub basebackup_flags: &'static str,
    /// The flags clup passes to pg_rewind (besides the password on stdin):
    /// the same from 9.5 to 18 (`-R` is 13+; clup writes the recovery
    /// settings itself).
    pub rewind_flags: &'static str,
    /// pg_rewind brings a target that was not shut down cleanly to a clean
    /// state itself (runs `postgres --single`; 13+). Before 13 it refuses
    /// such a target, so clup does that first.
    pub rewind_recovers_target: bool,
    /// pg_create_physical_replication_slot(name, immediately_reserve)
    /// takes its second argument (9.6+); on 9.5 a new slot reserves WAL
    /// only once a standby connects through it.
    pub slot_reserve_arg: bool,
    /// The max_slot_wal_keep_size setting exists (13+): how much WAL a
    /// slot may hold back before it is invalidated.
    pub slot_wal_keep_size: bool,
}

/// The oldest major clup knows.
pub const OLDEST: u32 = 90500;

impl PgVer {
    /// The table row for server_version_num `num` (anything below 9.5 is
    /// treated as 9.5).
    pub fn of(num: u32) -> PgVer {
        let wal = num >= 100000;
        PgVer {
            num,
            current_lsn_fn: if wal {
                "pg_current_wal_lsn"
            } else {
                "pg_current_xlog_location"
            },
            receive_lsn_fn: if wal {
                "pg_last_wal_receive_lsn"
            } else {
                "pg_last_xlog_receive_location"
            },
            replay_lsn_fn: if wal {
                "pg_last_wal_replay_lsn"
            } else {
                "pg_last_xlog_replay_location"
            },
            walfile_name_fn: if wal {
                "pg_walfile_name"
            } else {
                "pg_xlogfile_name"
            },
            replication_lsn_cols: if wal {
                ["sent_lsn", "write_lsn", "flush_lsn", "replay_lsn"]
            } else {
                [
                    "sent_location",
                    "write_location",
                    "flush_location",
                    "replay_location",
                ]
            },
            wal_dir: if wal { "pg_wal" } else { "pg_xlog" },
            wal_receiver_view: num >= 90600,
            control_checkpoint_fn: num >= 90600,
            promote: match num {
                120000.. => Promote::Function,
                100000.. => Promote::PgCtlWait,
                _ => Promote::PgCtlThenPoll,
            },
            recovery_file: if num >= 120000 {
                RecoveryFile::StandbySignal
            } else {
                RecoveryFile::RecoveryConf
            },
            conninfo_reloads: num >= 130000,
            sync_method_keywords: wal,
            sync_num: num >= 90600,
            basebackup_flags: "-X stream --checkpoint=fast",
            rewind_flags: "",
            rewind_recovers_target: num >= 130000,
            slot_reserve_arg: num >= 90600,
            slot_wal_keep_size: num >= 130000,
        }
    }

    /// The major as people write it: `9.6`, `15`.
    pub fn major(&self) -> String {
        if self.num >= 100000 {
            (self.num / 10000).to_string()
        } else {
            format!("{}.{}", self.num / 10000, self.num / 100 % 100)
        }
    }

    /// The SQL that creates physical slot `name` (a plain name, see
    /// [`slot_name`]) reserving WAL at once where the major can (9.6+).
    pub fn create_slot_sql(&self, name_expr: &str) -> String {
        if self.slot_reserve_arg {
            format!("pg_create_physical_replication_slot({name_expr}, true)")
        } else {
            format!("pg_create_physical_replication_slot({name_expr})")
        }
    }

    /// synchronous_standby_names as this major takes it, from clup's form
    /// (`FIRST n (a,b)`, `ANY n (a,b)`, `n (a,b)`, `a,b` or empty): 9.6
    /// drops `FIRST`, 9.5 keeps the list (one synchronous standby). `ANY`
    /// (quorum commit) has no equivalent before 10: an error.
    pub fn sync_names(&self, names: &str) -> Result<String, String> {
        if self.sync_method_keywords {
            return Ok(names.to_string());
        }
        let t = names.trim();
        let upper = t.to_ascii_uppercase();
        if upper.starts_with("ANY ") || upper.starts_with("ANY(") {
            return Err(format!(
                "synchronous_standby_names '{t}': quorum commit (ANY) needs PostgreSQL 10 or later, this server is {}",
                self.major()
            ));
        }
        let rest = if upper.starts_with("FIRST ") {
            t[6..].trim_start()
        } else {
            t
        };
        if self.sync_num {
            return Ok(rest.to_string());
        }
        // 9.5: only a list; `n (a,b)` keeps its list (the first is sync).
        match (rest.find('('), rest.rfind(')')) {
            (Some(a), Some(b)) if a < b => Ok(rest[a + 1..b].trim().to_string()),
            _ => Ok(rest.to_string()),
        }
    }
}

/// The slot clup keeps for a standby: its repl_app_name in lower case with
/// anything but `[a-z0-9_]` turned into `_`, at most 63 bytes (NAMEDATALEN).
pub fn slot_name(repl_app_name: &str) -> String {
    repl_app_name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .take(63)
        .collect()
}

/// server_version_num from the `server_version` a server reports at
/// startup: `9.6.10` -> 90610, `15.4 (Debian 15.4-1.pgdg120+1)` -> 150004,
/// `16beta1` -> 160000, `10.23` -> 100023.
pub fn parse_server_version(s: &str) -> Option<u32> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let mut parts = s[..end].split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let a: u32 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    if major >= 10 {
        return Some(major * 10000 + a);
    }
    let b: u32 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    Some(major * 10000 + a * 100 + b)
}

/// server_version_num of a data directory's `PG_VERSION` file: `15` ->
/// 150000, `9.6` -> 90600.
pub fn parse_pg_version_file(s: &str) -> Option<u32> {
    let mut it = s.trim().split('.');
    let major: u32 = it.next()?.parse().ok()?;
    let minor: u32 = it.next().map_or(Some(0), |m| m.parse().ok())?;
    if it.next().is_some() {
        return None;
    }
    Some(if major >= 10 {
        major * 10000
    } else {
        major * 10000 + minor * 100
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_by_major() {
        // (num, xlog names, receiver view, promote, recovery.conf, reload, keywords, rewind recovers)
        let rows = [
            (
                90510,
                true,
                false,
                Promote::PgCtlThenPoll,
                true,
                false,
                false,
                false,
            ),
            (
                90610,
                true,
                true,
                Promote::PgCtlThenPoll,
                true,
                false,
                false,
                false,
            ),
            (
                100023,
                false,
                true,
                Promote::PgCtlWait,
                true,
                false,
                true,
                false,
            ),
            (
                110022,
                false,
                true,
                Promote::PgCtlWait,
                true,
                false,
                true,
                false,
            ),
            (
                120022,
                false,
                true,
                Promote::Function,
                false,
                false,
                true,
                false,
            ),
            (
                150018,
                false,
                true,
                Promote::Function,
                false,
                true,
                true,
                true,
            ),
            (
                180004,
                false,
                true,
                Promote::Function,
                false,
                true,
                true,
                true,
            ),
        ];
        for (num, xlog, recv, promote, conf, reload, kw, recovers) in rows {
            let v = PgVer::of(num);
            assert_eq!(
                v.current_lsn_fn == "pg_current_xlog_location",
                xlog,
                "{num}"
            );
            assert_eq!(v.wal_dir == "pg_xlog", xlog, "{num}");
            assert_eq!(v.replication_lsn_cols[0] == "sent_location", xlog, "{num}");
            assert_eq!(v.wal_receiver_view, recv, "{num}");
            assert_eq!(v.control_checkpoint_fn, recv, "{num}");
            assert_eq!(v.promote, promote, "{num}");
            assert_eq!(v.recovery_file == RecoveryFile::RecoveryConf, conf, "{num}");
            assert_eq!(v.conninfo_reloads, reload, "{num}");
            assert_eq!(v.sync_method_keywords, kw, "{num}");
            assert_eq!(v.rewind_recovers_target, recovers, "{num}");
            assert_eq!(v.basebackup_flags, "-X stream --checkpoint=fast");
        }
    }

    #[test]
    fn function_names_by_era() {
        let v = PgVer::of(90610);
        assert_eq!(
            [v.receive_lsn_fn, v.replay_lsn_fn, v.walfile_name_fn],
            [
                "pg_last_xlog_receive_location",
                "pg_last_xlog_replay_location",
                "pg_xlogfile_name"
            ]
        );
        assert_eq!(v.replication_lsn_cols[3], "replay_location");
        let v = PgVer::of(100000);
        assert_eq!(
            [v.receive_lsn_fn, v.replay_lsn_fn, v.walfile_name_fn],
            [
                "pg_last_wal_receive_lsn",
                "pg_last_wal_replay_lsn",
                "pg_walfile_name"
            ]
        );
        assert_eq!(v.replication_lsn_cols[3], "replay_lsn");
        assert_eq!(PgVer::of(90610).major(), "9.6");
        assert_eq!(PgVer::of(90500).major(), "9.5");
        assert_eq!(PgVer::of(150018).major(), "15");
    }

    #[test]
    fn slots_by_major() {
        let (v95, v96, v12, v13) = (
            PgVer::of(90525),
            PgVer::of(90610),
            PgVer::of(120000),
            PgVer::of(130000),
        );
        assert_eq!(
            v95.create_slot_sql("'s'"),
            "pg_create_physical_replication_slot('s')"
        );
        assert_eq!(
            v96.create_slot_sql("'s'"),
            "pg_create_physical_replication_slot('s', true)"
        );
        assert!(!v96.slot_wal_keep_size && !v12.slot_wal_keep_size);
        assert!(v13.slot_wal_keep_size);
        assert_eq!(slot_name("stb42"), "stb42");
        assert_eq!(slot_name("Stb-4.2 x"), "stb_4_2_x");
        assert_eq!(slot_name(&"a".repeat(80)).len(), 63);
    }

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("9.6.10"), Some(90610));
        assert_eq!(parse_server_version("9.5.25"), Some(90525));
        assert_eq!(parse_server_version("10.23"), Some(100023));
        assert_eq!(
            parse_server_version("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(150004)
        );
        assert_eq!(parse_server_version("16beta1"), Some(160000));
        assert_eq!(parse_server_version("18.4"), Some(180004));
        assert_eq!(parse_server_version(""), None);
        assert_eq!(parse_server_version("x"), None);
        assert_eq!(parse_pg_version_file("9.6\n"), Some(90600));
        assert_eq!(parse_pg_version_file("15"), Some(150000));
        assert_eq!(parse_pg_version_file("9.5"), Some(90500));
        assert_eq!(parse_pg_version_file("abc"), None);
        assert_eq!(parse_pg_version_file("1.2.3"), None);
    }

    #[test]
    fn sync_names_by_major() {
        let (v95, v96, v10) = (PgVer::of(90525), PgVer::of(90610), PgVer::of(100023));
        assert_eq!(v10.sync_names("ANY 1 (a,b)").unwrap(), "ANY 1 (a,b)");
        assert_eq!(v96.sync_names("FIRST 1 (a,b)").unwrap(), "1 (a,b)");
        assert_eq!(v96.sync_names("2 (a,b)").unwrap(), "2 (a,b)");
        assert_eq!(v96.sync_names("").unwrap(), "");
        assert!(v96
            .sync_names("ANY 1 (a,b)")
            .unwrap_err()
            .contains("needs PostgreSQL 10"));
        assert_eq!(v95.sync_names("FIRST 1 (a,b)").unwrap(), "a,b");
        assert_eq!(v95.sync_names("a,b").unwrap(), "a,b");
    }
}
