//! The log: `2017-12-08 09:07:40,136 INFO message` lines, as in the manual,
//! to logs/clupserver.log (daemon) or stderr (foreground too).
//!
//! Callers must never pass a secret into a log line; config values that are
//! secrets are [`crate::model::config::Secret`] and print as `******`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Local time as `YYYY-MM-DD HH:MM:SS,mmm`.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (date, time) = local_time(now.as_secs() as i64);
    format!("{date} {time},{:03}", now.subsec_millis())
}

/// Local time as `YYYY-MM-DD HH:MM:SS` for an epoch second.
pub fn format_epoch(secs: u64) -> String {
    let (date, time) = local_time(secs as i64);
    format!("{date} {time}")
}

fn local_time(secs: i64) -> (String, String) {
    // SAFETY: localtime_r writes into the zeroed struct we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // libc marks musl's time_t deprecated (a coming 64-bit change); it is
    // 64-bit on x86_64 under both glibc and musl, which is all we build for.
    #[allow(deprecated)]
    let t = secs as libc::time_t;
    unsafe { libc::localtime_r(&t, &mut tm) };
    (
        format!(
            "{:04}-{:02}-{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday
        ),
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec),
    )
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARNING",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// One formatted log line (without the newline).
pub fn format_line(level: Level, msg: &str) -> String {
    format!("{} {} {}", timestamp(), level_name(level), msg)
}

/// The log file and its path, shared by the logger and [`reopen`]: a line
/// is written whole to the old file or to the new one, never lost between.
static FILE: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

struct Logger {
    stderr: bool,
    level: LevelFilter,
}

impl Log for Logger {
    /// Other crates' records only from warn up: at debug, the postgres
    /// client logs every statement it sends, and ALTER SYSTEM SET
    /// primary_conninfo carries the replication password.
    fn enabled(&self, m: &Metadata) -> bool {
        let ours = m.target() == "clup" || m.target().starts_with("clup::");
        m.level() <= self.level
            && !m.target().starts_with("tiny_http")
            && (ours || m.level() <= Level::Warn)
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut line = format_line(r.level(), &r.args().to_string());
        line.push('\n');
        if let Some((_, f)) = FILE.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
        if self.stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

fn open_log(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Install the global logger: to `file` if given, and to stderr if asked.
pub fn init(file: Option<&Path>, stderr: bool, level: LevelFilter) -> std::io::Result<()> {
    if let Some(p) = file {
        let f = open_log(p)?;
        *FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some((p.to_path_buf(), f));
    }
    let logger = Logger { stderr, level };
    // A second init (tests) keeps the first logger.
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}

/// Open the log file again by its path (SIGHUP, after logrotate moved it
/// away): the lines after this go to the new file. An error keeps the old
/// file open, so nothing is lost.
pub fn reopen() -> std::io::Result<()> {
    let mut file = FILE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((path, f)) = file.as_mut() {
        *f = open_log(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_manual_format() {
        let l = format_line(Level::Info, "Start ha checking thread...");
        // 2017-12-08 09:07:40,136 INFO Start ha checking thread...
        let (stamp, rest) = l.split_at(23);
        assert_eq!(rest, " INFO Start ha checking thread...");
        let b = stamp.as_bytes();
        for (i, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b' '),
            (13, b':'),
            (16, b':'),
            (19, b','),
        ] {
            assert_eq!(b[i], c, "{stamp}");
        }
        assert!(
            stamp.chars().filter(char::is_ascii_digit).count() == 17,
            "{stamp}"
        );
    }

    #[test]
    fn other_crates_log_only_warnings_even_at_debug() {
        let l = Logger {
            stderr: false,
            level: LevelFilter::Debug,
        };
        fn m(target: &str, level: Level) -> Metadata<'_> {
            log::MetadataBuilder::new()
                .target(target)
                .level(level)
                .build()
        }
        assert!(l.enabled(&m("clup::monitor", Level::Debug)));
        assert!(l.enabled(&m("clup", Level::Debug)));
        assert!(!l.enabled(&m("tokio_postgres::query", Level::Debug)));
        assert!(!l.enabled(&m("clupish", Level::Debug)));
        assert!(!l.enabled(&m("ureq::unit", Level::Info)));
        assert!(l.enabled(&m("ureq::unit", Level::Warn)));
        assert!(!l.enabled(&m("clup::monitor", Level::Trace)));
    }
}
