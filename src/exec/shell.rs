//! Quoting values into POSIX shell scripts that run on database hosts.
//!
//! Owns: [`quote`], [`short_wait`]. Every value interpolated into a remote script goes
//! through it, even values meta.rs already restricted (defence in depth).
//! Must not: run anything.

use std::time::Duration;

/// `s` as one POSIX shell word. Words made only of characters no shell treats
/// specially are left bare (readable scripts); anything else is wrapped in
/// single quotes, with each `'` written as `'\''`. The empty string is `''`.
/// A NUL byte cannot be passed to a shell at all and is dropped.
pub fn quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("'\\''"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `d`, at most 1 s, as seconds for `timeout(1)`: "1", "0.5", "0.25".
/// For waits on the LAN where an answer takes milliseconds or never comes.
pub fn short_wait(d: Duration) -> String {
    let ms = d.min(Duration::from_secs(1)).as_millis().max(10);
    if ms % 1000 == 0 {
        (ms / 1000).to_string()
    } else {
        format!("{}.{:03}", ms / 1000, ms % 1000)
            .trim_end_matches('0')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cmd;
    use std::time::Duration;

    /// What `sh` makes of the quoted word: printf '%s' prints it back.
    fn through_sh(word: &str) -> String {
        let script = format!("printf '%s|' {}", quote(word));
        cmd::run(
            "sh",
            &["-c".to_string(), script],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .stdout
    }

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(quote("postgres"), "postgres");
        assert_eq!(quote("/home/postgres/pgdata"), "/home/postgres/pgdata");
        assert_eq!(quote("10.0.0.1/32"), "10.0.0.1/32");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn hostile_values_are_one_word_through_sh() {
        for v in [
            "a;reboot",
            "$(touch /tmp/clup-pwned)",
            "`id`",
            "'",
            "''",
            "\"",
            "a'b\"c",
            "line1\nline2",
            "  spaces  ",
            "\\",
            "*",
            "~root",
            "-n",
            "a\tb",
            "$HOME",
            "!x",
            "#comment",
            "",
        ] {
            assert_eq!(through_sh(v), format!("{v}|"), "value {v:?}");
        }
        assert!(!std::path::Path::new("/tmp/clup-pwned").exists());
    }

    #[test]
    fn nul_is_dropped() {
        assert_eq!(quote("a\0b"), "'ab'");
    }

    #[test]
    fn short_waits_are_seconds_for_timeout() {
        use std::time::Duration;
        for (ms, want) in [
            (3000, "1"),
            (1000, "1"),
            (500, "0.5"),
            (250, "0.25"),
            (1, "0.01"),
            (120, "0.12"),
        ] {
            assert_eq!(short_wait(Duration::from_millis(ms)), want, "{ms}");
        }
    }
}
