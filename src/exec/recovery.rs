//! A standby's recovery settings: where it streams from.
//!
//! Owns: the text of `primary_conninfo` (libpq quoting) and, with
//! use_slots, of `primary_slot_name`; of `recovery.conf`
//! (PG < 12) and of the lines clup keeps in `postgresql.auto.conf` (PG >= 12,
//! with `standby.signal`), the matching `ALTER SYSTEM` statements, and
//! applying them on a host. Must not: choose the primary, decide whether to
//! restart, or let the replication password reach a command line, a log or
//! an error (files are written from the ssh child's stdin; the masked forms
//! are for messages).
//!
//! Two levels of quoting meet here: the password inside the conninfo string
//! (libpq: `'...'` with `\'` and `\\`), and the conninfo inside a
//! configuration file (`'...'` with `''` and `\\`) or an SQL literal.

use std::time::Duration;

use crate::exec::pgver::{PgVer, RecoveryFile};
use crate::exec::shell::quote;
use crate::exec::ssh::Remote;
use crate::exec::{pg, Error};
use crate::model::config::{Config, PgSsl};
use crate::model::meta::Db;

/// The password shown in messages.
pub const MASK: &str = "******";

/// Settings clup writes; on PG >= 12 other lines of postgresql.auto.conf that
/// set them (or `standby_mode`, which PG >= 12 refuses) are replaced.
/// primary_slot_name is clup's only with use_slots (see [`owned`]).
const OWNED_KEYS: &[&str] = &[
    "primary_conninfo",
    "recovery_target_timeline",
    "standby_mode",
];

/// Is `key` a setting clup replaces, with `slot` (use_slots) or without?
fn owned(key: &str, slot: Option<&str>) -> bool {
    OWNED_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
        || (slot.is_some() && key.eq_ignore_ascii_case("primary_slot_name"))
}

/// The slot a standby streams through: its own (see
/// [`pgver::slot_name`](crate::exec::pgver::slot_name)) with use_slots,
/// else none.
pub fn slot_for(db: &Db, cfg: &Config) -> Option<String> {
    cfg.use_slots
        .then(|| crate::exec::pgver::slot_name(&db.repl_app_name))
}

/// One libpq conninfo value, quoted when needed.
pub fn conninfo_value(v: &str) -> String {
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && c != '\'' && c != '\\');
    if bare {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// `application_name=stb42 user=repl host=10.0.0.1 port=5432
/// password=... sslmode=disable`, as the manual writes it, with clup.conf's
/// pg_sslmode (and pg_sslrootcert, when set) so that replication uses TLS
/// where the servers ask for it.
pub fn conninfo(
    app_name: &str,
    user: &str,
    password: &str,
    host: &str,
    port: u16,
    ssl: &PgSsl,
) -> String {
    format!(
        "application_name={} user={} host={} port={} password={} {}",
        conninfo_value(app_name),
        conninfo_value(user),
        conninfo_value(host),
        port,
        conninfo_value(password),
        ssl.conninfo()
    )
}

/// [`conninfo`] with the password shown as `******`, for messages.
pub fn masked_conninfo(app_name: &str, user: &str, host: &str, port: u16, ssl: &PgSsl) -> String {
    conninfo(app_name, user, MASK, host, port, ssl)
}

/// The conninfo `db` should use to stream from `host:port`.
pub fn conninfo_for(db: &Db, cfg: &Config, host: &str, port: u16) -> String {
    conninfo(
        &db.repl_app_name,
        &cfg.db_repl_user,
        cfg.db_repl_pass.expose(),
        host,
        port,
        &cfg.pg_ssl,
    )
}

/// A string value in postgresql.conf / postgresql.auto.conf / recovery.conf
/// syntax: `'...'` with `'` and `\` doubled, as PostgreSQL writes them.
pub fn conf_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// recovery.conf for PG < 12. clup regenerates the whole file on every
/// switch (custom content is lost, as the manual warns).
pub fn recovery_conf(conninfo: &str, slot: Option<&str>) -> String {
    format!(
        "# Written by clup; regenerated on every switch.\n\
         standby_mode = 'on'\n\
         recovery_target_timeline = 'latest'\n\
         primary_conninfo = {}\n{}",
        conf_value(conninfo),
        slot_line(slot)
    )
}

fn slot_line(slot: Option<&str>) -> String {
    slot.map(|s| format!("primary_slot_name = {}\n", conf_value(s)))
        .unwrap_or_default()
}

/// The lines clup keeps in postgresql.auto.conf (PG >= 12).
pub fn auto_conf_lines(conninfo: &str, slot: Option<&str>) -> String {
    format!(
        "primary_conninfo = {}\nrecovery_target_timeline = 'latest'\n{}",
        conf_value(conninfo),
        slot_line(slot)
    )
}

/// `existing` postgresql.auto.conf with clup's settings replaced by those
/// for `conninfo` (and `slot`); every other line is kept as it was.
pub fn edit_auto_conf(existing: &str, conninfo: &str, slot: Option<&str>) -> String {
    let mut out = String::new();
    if existing.trim().is_empty() {
        out.push_str(
            "# Do not edit this file manually!\n\
             # It will be overwritten by the ALTER SYSTEM command.\n",
        );
    }
    for line in existing.lines() {
        let key: String = line
            .trim_start()
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '=')
            .collect();
        if owned(&key, slot) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&auto_conf_lines(conninfo, slot));
    out
}

/// The ALTER SYSTEM statements that set the same as [`auto_conf_lines`].
pub fn alter_system_sql(conninfo: &str, slot: Option<&str>) -> Vec<String> {
    let mut v = vec![
        format!(
            "ALTER SYSTEM SET primary_conninfo = {}",
            pg::sql_literal(conninfo)
        ),
        "ALTER SYSTEM SET recovery_target_timeline = 'latest'".to_string(),
    ];
    if let Some(s) = slot {
        v.push(format!(
            "ALTER SYSTEM SET primary_slot_name = {}",
            pg::sql_literal(s)
        ));
    }
    v
}

/// A remote script that replaces `path` atomically with its stdin, as
/// `os_user`, mode 0600 (written to `path.clup-tmp`, synced, renamed).
pub fn write_file_script(os_user: &str, path: &str) -> String {
    format!(
        r#"user={user}; dst={dst}; tmp={tmp}
umask 077
cd / || exit 1
as_user() {{ if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }}
rm -f "$tmp" || exit 1
as_user tee "$tmp" >/dev/null || exit 1
as_user chmod 600 "$tmp" || exit 1
sync "$tmp" 2>/dev/null || sync
as_user mv -f "$tmp" "$dst"
"#,
        user = quote(os_user),
        dst = quote(path),
        tmp = quote(&format!("{path}.clup-tmp")),
    )
}

/// A remote script that prints `path`, or nothing when it does not exist.
pub fn read_file_script(path: &str) -> String {
    format!("f={}\nif [ -e \"$f\" ]; then cat \"$f\"; fi\n", quote(path))
}

/// A remote script that creates an empty `path` as `os_user` (mode 0600)
/// if it is missing.
pub fn touch_script(os_user: &str, path: &str) -> String {
    format!(
        r#"user={user}; f={f}
umask 077
cd / || exit 1
as_user() {{ if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }}
as_user touch "$f"
"#,
        user = quote(os_user),
        f = quote(path),
    )
}

/// How new recovery settings took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Written to files on a stopped server: used at its next start.
    Written,
    /// Set with ALTER SYSTEM on a running PG >= 13 standby and reloaded: the
    /// WAL receiver reconnects to the new primary by itself.
    Reloaded,
    /// Stored, but the running server only uses them after a restart
    /// (PG 12 and below).
    NeedsRestart,
}

fn file_timeout(remote: &dyn Remote) -> Duration {
    remote.connect_timeout() + Duration::from_secs(20)
}

/// Point standby `db` (server_version_num `version`; `running`: it runs as
/// a standby now) at the primary `host:port`.
/// - PG >= 13 running: ALTER SYSTEM + pg_reload_conf() -> `Reloaded`.
/// - PG 12 running: ALTER SYSTEM -> `NeedsRestart`.
/// - PG >= 12 stopped: postgresql.auto.conf rewritten + standby.signal ->
///   `Written`.
/// - PG < 12: recovery.conf rewritten -> `Written`, or `NeedsRestart` when
///   running.
pub fn repoint(
    remote: &dyn Remote,
    db: &Db,
    cfg: &Config,
    version: u32,
    running: bool,
    host: &str,
    port: u16,
) -> Result<Applied, Error> {
    let conninfo = conninfo_for(db, cfg, host, port);
    let shown = masked_conninfo(
        &db.repl_app_name,
        &cfg.db_repl_user,
        host,
        port,
        &cfg.pg_ssl,
    );
    let v = PgVer::of(version);
    let slot = slot_for(db, cfg);
    let slot = slot.as_deref();
    let shown = match slot {
        Some(s) => format!("{shown}', primary_slot_name = '{s}"),
        None => shown,
    };
    if v.recovery_file == RecoveryFile::StandbySignal && running {
        pg::alter_system(
            db,
            cfg,
            "set primary_conninfo on",
            alter_system_sql(&conninfo, slot),
        )?;
        log::info!("database({}): primary_conninfo = '{shown}'", db.addr());
        return Ok(if v.conninfo_reloads {
            Applied::Reloaded
        } else {
            Applied::NeedsRestart
        });
    }
    write_files(remote, db, version, &conninfo, slot)?;
    log::info!(
        "database({}): wrote recovery settings, primary_conninfo = '{shown}'",
        db.addr()
    );
    Ok(if running {
        Applied::NeedsRestart
    } else {
        Applied::Written
    })
}

/// Write the recovery settings files for `conninfo` (and `slot`) into
/// db's pgdata.
pub fn write_files(
    remote: &dyn Remote,
    db: &Db,
    version: u32,
    conninfo: &str,
    slot: Option<&str>,
) -> Result<(), Error> {
    let t = file_timeout(remote);
    if PgVer::of(version).recovery_file == RecoveryFile::RecoveryConf {
        let path = format!("{}/recovery.conf", db.pgdata);
        remote.run_script(
            &db.host,
            &format!("write {path}"),
            &write_file_script(&db.os_user, &path),
            Some(recovery_conf(conninfo, slot).as_bytes()),
            t,
        )?;
        return Ok(());
    }
    let path = format!("{}/postgresql.auto.conf", db.pgdata);
    let existing = remote
        .run_script(
            &db.host,
            &format!("read {path}"),
            &read_file_script(&path),
            None,
            t,
        )?
        .stdout;
    remote.run_script(
        &db.host,
        &format!("write {path}"),
        &write_file_script(&db.os_user, &path),
        Some(edit_auto_conf(&existing, conninfo, slot).as_bytes()),
        t,
    )?;
    let signal = format!("{}/standby.signal", db.pgdata);
    remote.run_script(
        &db.host,
        &format!("touch {signal}"),
        &touch_script(&db.os_user, &signal),
        None,
        t,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::SslMode;

    const DISABLE: PgSsl = PgSsl {
        mode: SslMode::Disable,
        rootcert: String::new(),
    };
    use crate::exec::cmd;

    const HOSTILE: &str = r#"p'a\ss w"rd$(id)`x`;"#;

    /// Undo libpq conninfo quoting of one value (what libpq does).
    fn unquote_conninfo(v: &str) -> String {
        crate::exec::pg::parse_conninfo(&format!("k={v}"))["k"].clone()
    }

    /// Undo postgresql.conf string quoting (what the GUC lexer does).
    fn unquote_conf(v: &str) -> String {
        let inner = &v[1..v.len() - 1];
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
                '\'' => {
                    assert_eq!(it.next(), Some('\''), "lone quote in {v}");
                    out.push('\'');
                }
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn conninfo_quoting() {
        assert_eq!(
            conninfo("stb42", "repl", "secret", "192.168.56.41", 5432, &DISABLE),
            "application_name=stb42 user=repl host=192.168.56.41 port=5432 password=secret sslmode=disable"
        );
        let c = conninfo("stb42", "repl", HOSTILE, "10.0.0.1", 5433, &DISABLE);
        assert_eq!(
            c,
            r#"application_name=stb42 user=repl host=10.0.0.1 port=5433 password='p\'a\\ss w"rd$(id)`x`;' sslmode=disable"#
        );
        assert_eq!(crate::exec::pg::parse_conninfo(&c)["password"], HOSTILE);
        for v in ["", "a b", "'", "\\", "x'\\'y", "=;"] {
            assert_eq!(unquote_conninfo(&conninfo_value(v)), v, "{v:?}");
        }
        assert_eq!(
            masked_conninfo("stb42", "repl", "10.0.0.1", 5432, &DISABLE),
            "application_name=stb42 user=repl host=10.0.0.1 port=5432 password=****** sslmode=disable"
        );
        let tls = PgSsl {
            mode: SslMode::VerifyFull,
            rootcert: "/etc/clup/ca.pem".into(),
        };
        let c = conninfo("stb42", "repl", "pw", "10.0.0.1", 5432, &tls);
        assert!(
            c.ends_with(" password=pw sslmode=verify-full sslrootcert=/etc/clup/ca.pem"),
            "{c}"
        );
        let parsed = crate::exec::pg::parse_conninfo(&c);
        assert_eq!(parsed["sslmode"], "verify-full");
        assert_eq!(parsed["sslrootcert"], "/etc/clup/ca.pem");
    }

    #[test]
    fn recovery_conf_for_pg11() {
        let c = conninfo("stb42", "repl", HOSTILE, "10.0.0.1", 5432, &DISABLE);
        let text = recovery_conf(&c, None);
        assert_eq!(
            text,
            "# Written by clup; regenerated on every switch.\n\
             standby_mode = 'on'\n\
             recovery_target_timeline = 'latest'\n\
             primary_conninfo = 'application_name=stb42 user=repl host=10.0.0.1 port=5432 \
             password=''p\\\\''a\\\\\\\\ss w\"rd$(id)`x`;'' sslmode=disable'\n"
        );
        assert_eq!(
            recovery_conf(&c, Some("stb42")),
            format!("{text}primary_slot_name = 'stb42'\n")
        );
        let line = text.lines().last().unwrap();
        let value = line.strip_prefix("primary_conninfo = ").unwrap();
        assert_eq!(unquote_conf(value), c);
        assert_eq!(
            crate::exec::pg::parse_conninfo(&unquote_conf(value))["password"],
            HOSTILE
        );
    }

    #[test]
    fn auto_conf_for_pg12_and_15() {
        let c = conninfo("stb02", "repl", HOSTILE, "127.0.0.1", 5433, &DISABLE);
        let existing = "# Do not edit this file manually!\n\
                        # It will be overwritten by the ALTER SYSTEM command.\n\
                        max_connections = '50'\n\
                        primary_conninfo = 'user=old password=old host=x'\n\
                        Recovery_Target_Timeline = 'current'\n\
                        standby_mode = 'on'\n\
                        primary_slot_name = 'slot2'\n";
        let new = edit_auto_conf(existing, &c, None);
        assert_eq!(
            new,
            format!(
                "# Do not edit this file manually!\n\
                 # It will be overwritten by the ALTER SYSTEM command.\n\
                 max_connections = '50'\n\
                 primary_slot_name = 'slot2'\n\
                 primary_conninfo = {}\n\
                 recovery_target_timeline = 'latest'\n",
                conf_value(&c)
            )
        );
        assert!(!new.contains("old"));
        // Idempotent.
        assert_eq!(edit_auto_conf(&new, &c, None), new);
        assert!(edit_auto_conf("", &c, None).starts_with("# Do not edit"));
        // With use_slots, clup's slot replaces the one set before.
        let slotted = edit_auto_conf(existing, &c, Some("stb02"));
        assert!(!slotted.contains("slot2"), "{slotted}");
        assert!(
            slotted.ends_with("recovery_target_timeline = 'latest'\nprimary_slot_name = 'stb02'\n"),
            "{slotted}"
        );
        assert_eq!(edit_auto_conf(&slotted, &c, Some("stb02")), slotted);
    }

    #[test]
    fn alter_system_statements() {
        let c = conninfo("stb02", "repl", HOSTILE, "127.0.0.1", 5433, &DISABLE);
        let sql = alter_system_sql(&c, None);
        assert_eq!(sql.len(), 2);
        assert_eq!(
            sql[0],
            format!(
                "ALTER SYSTEM SET primary_conninfo = E'{}'",
                c.replace('\'', "''").replace('\\', "\\\\")
            )
        );
        assert!(
            sql[0].contains(r#"password=''p\\''a\\\\ss w"rd$(id)`x`;'' sslmode"#),
            "{}",
            sql[0]
        );
        assert_eq!(
            sql[1],
            "ALTER SYSTEM SET recovery_target_timeline = 'latest'"
        );
        let plain = alter_system_sql(&conninfo("s", "r", "pw", "h", 1, &DISABLE), Some("s"));
        assert_eq!(plain[2], "ALTER SYSTEM SET primary_slot_name = 's'");
        assert_eq!(
            plain[0],
            "ALTER SYSTEM SET primary_conninfo = 'application_name=s user=r host=h port=1 password=pw sslmode=disable'"
        );
    }

    fn sh(script: &str, stdin: Option<&[u8]>) -> cmd::Output {
        cmd::run(
            "sh",
            &["-c".to_string(), script.to_string()],
            stdin,
            Duration::from_secs(10),
        )
        .unwrap()
    }

    /// The write/read/touch scripts, run by the local sh in a temp dir as
    /// the current user: atomic replace, mode 0600, content from stdin.
    #[test]
    fn file_scripts_run_in_sh() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("clup-recovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = sh("id -un", None).stdout.trim().to_string();
        let path = dir.join("postgresql.auto.conf").display().to_string();

        assert_eq!(sh(&read_file_script(&path), None).stdout, "");
        std::fs::write(&path, "max_connections = '50'\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let existing = sh(&read_file_script(&path), None).stdout;
        assert_eq!(existing, "max_connections = '50'\n");

        let c = conninfo("stb02", "repl", HOSTILE, "127.0.0.1", 5433, &DISABLE);
        let content = edit_auto_conf(&existing, &c, None);
        let script = write_file_script(&me, &path);
        // No secret in the script: it travels on stdin.
        assert!(!script.contains("rd$(id)"));
        sh(&script, Some(content.as_bytes()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!Path::new(&format!("{path}.clup-tmp")).exists());

        let signal = dir.join("standby.signal").display().to_string();
        sh(&touch_script(&me, &signal), None);
        let meta = std::fs::metadata(&signal).unwrap();
        assert_eq!(meta.len(), 0);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use std::path::Path;
}
