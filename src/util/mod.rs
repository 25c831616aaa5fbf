//! Plumbing that knows nothing of clusters or databases: the log's format,
//! fixed-width tables, URL queries, signals and a small HTTP server. Every other part may use it;
//! it imports nothing from them.

pub mod http;
pub mod logging;
pub mod signals;
pub mod table;
pub mod url;
