//! Executors: everything that touches a database host, a database or a
//! network peer (ssh, pg_ctl, ip/arping, PostgreSQL connections, cstlb's
//! management port).
//!
//! Executors act and report; they never decide. Each call has a bounded time
//! (ssh ConnectTimeout, postgres connect/statement timeouts, HTTP timeouts,
//! children killed on timeout), and no secret ever reaches a command line, a
//! log line or an error message.

use std::fmt;

pub mod accepts;
pub mod cmd;
pub mod cstlb;
pub mod heartbeat;
pub mod pg;
pub mod pgadmin;
pub mod pgctl;
pub mod pgstatus;
pub mod pgver;
pub mod pool;
pub mod recovery;
pub mod shell;
pub mod slots;
pub mod ssh;
pub mod tls;
pub mod vip;
pub mod wire;

pub use cmd::{CommandError, Output};
pub use ssh::{Remote, Ssh};

/// Any executor failure.
#[derive(Debug)]
pub enum Error {
    /// A local or remote command failed.
    Command(CommandError),
    /// A PostgreSQL connection or statement failed.
    Pg(pg::PgError),
    /// A cstlb management request failed.
    Cstlb(cstlb::CstlbError),
    /// A command ran but its answer was not usable (e.g. no interface in
    /// `network`).
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Command(e) => e.fmt(f),
            Error::Pg(e) => e.fmt(f),
            Error::Cstlb(e) => e.fmt(f),
            Error::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Error {}

impl From<CommandError> for Error {
    fn from(e: CommandError) -> Error {
        Error::Command(e)
    }
}

impl From<pg::PgError> for Error {
    fn from(e: pg::PgError) -> Error {
        Error::Pg(e)
    }
}

impl From<cstlb::CstlbError> for Error {
    fn from(e: cstlb::CstlbError) -> Error {
        Error::Cstlb(e)
    }
}
