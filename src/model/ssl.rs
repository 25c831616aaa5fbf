//! TLS settings for connections to PostgreSQL (clup.conf's pg_sslmode and
//! pg_sslrootcert, documented with the other keys in `config`): libpq's
//! sslmode values and the conninfo text clup writes for standbys.
//! Must not: open files or sockets (`exec::tls` does).

use std::fmt;

use crate::model::config::clip;

/// libpq's sslmode: how much TLS a connection to PostgreSQL asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;
    fn from_str(v: &str) -> Result<SslMode, String> {
        SslMode::ALL
            .into_iter()
            .find(|m| m.as_str() == v)
            .ok_or_else(|| {
                format!(
                    "invalid value '{}': expected disable, allow, prefer, require, verify-ca or verify-full",
                    clip(v)
                )
            })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS settings for connections to PostgreSQL, as clup.conf gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgSsl {
    pub mode: SslMode,
    /// pg_sslrootcert; empty when not set.
    pub rootcert: String,
}

impl Default for PgSsl {
    /// libpq's default: prefer, no root certificate given.
    fn default() -> PgSsl {
        PgSsl {
            mode: SslMode::Prefer,
            rootcert: String::new(),
        }
    }
}

impl PgSsl {
    /// The settings for a libpq conninfo (primary_conninfo):
    /// `sslmode=...` and, when set, `sslrootcert=...` (a safe path: no
    /// quoting needed).
    pub fn conninfo(&self) -> String {
        let mut out = format!("sslmode={}", self.mode);
        if !self.rootcert.is_empty() {
            out.push_str(&format!(" sslrootcert={}", self.rootcert));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Config, SAMPLE};
    use std::path::Path;

    #[test]
    fn sslmode_parses_libpq_spellings_only() {
        for m in SslMode::ALL {
            assert_eq!(m.as_str().parse::<SslMode>(), Ok(m));
        }
        for bad in ["", "Prefer", "verify_full", "verify-none", "on", "true"] {
            let e = bad.parse::<SslMode>().unwrap_err();
            assert!(e.contains("expected disable, allow, prefer"), "{bad}: {e}");
        }
    }

    #[test]
    fn clup_conf_keys_default_to_prefer_and_name_bad_values() {
        let path = Path::new("/opt/clup/conf/clup.conf");
        let c = Config::parse(SAMPLE, path).unwrap();
        assert_eq!(c.pg_ssl, PgSsl::default());
        assert_eq!(c.pg_ssl.mode, SslMode::Prefer);
        let c = Config::parse(
            &format!("{SAMPLE}pg_sslmode = verify-full\npg_sslrootcert = /opt/clup/conf/ca.pem\n"),
            path,
        )
        .unwrap();
        assert_eq!(c.pg_ssl.mode, SslMode::VerifyFull);
        assert_eq!(c.pg_ssl.rootcert, "/opt/clup/conf/ca.pem");
        for (line, want) in [
            ("pg_sslmode = verify", "expected disable, allow, prefer"),
            ("pg_sslmode = ", "expected disable, allow, prefer"),
            ("pg_sslrootcert = ca.pem", "absolute path"),
            ("pg_sslrootcert = /x/$(id)", "absolute path"),
        ] {
            let e = Config::parse(&format!("{SAMPLE}{line}\n"), path).unwrap_err();
            let key = line.split(' ').next().unwrap();
            assert_eq!(e.key.as_deref(), Some(key), "{line}: {e}");
            assert_eq!(e.line, Some(15), "{line}: {e}");
            assert!(e.msg.contains(want), "{line}: {e}");
            assert!(
                e.to_string()
                    .starts_with("/opt/clup/conf/clup.conf:15: key "),
                "{e}"
            );
        }
    }

    #[test]
    fn conninfo_settings() {
        assert_eq!(PgSsl::default().conninfo(), "sslmode=prefer");
        let s = PgSsl {
            mode: SslMode::VerifyCa,
            rootcert: "/etc/clup/ca.pem".into(),
        };
        assert_eq!(
            s.conninfo(),
            "sslmode=verify-ca sslrootcert=/etc/clup/ca.pem"
        );
    }
}
