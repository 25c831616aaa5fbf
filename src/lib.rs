//! clup: high availability and read/write splitting for PostgreSQL
//! streaming-replication clusters.
//!
//! One binary plays three programs, chosen by the name it is called by:
//! `clupserver` (the monitor, [`server`]), `clupadm` (the operator's tool,
//! [`cli`]) and `cstlb` (the read load balancer, [`lb`]). Decisions are pure
//! ([`ha`]); everything that touches a host, a database or a network peer
//! lives in [`exec`] and only acts.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod etcd;
pub mod exec;
pub mod ha;
pub mod health;
pub mod home;
pub mod lb;
pub mod leader;
pub mod logging;
pub mod meta;
pub mod metrics;
pub mod monitor;
#[cfg(test)]
mod obs_routes;
pub mod ops;
pub mod server;
pub mod store;
pub mod table;
pub mod task;

/// The version printed by `--version` and the start-up banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The first line of the log and of clupadm's output, as in the manual.
pub fn banner() -> String {
    format!("Clup v{VERSION}  Copyright (c) the clup authors. MIT OR Apache-2.0.")
}

/// Seconds since the epoch (the meta's lock and task times).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
