//! What clup knows about, as plain data: clup.conf ([`config`]), the
//! cluster meta and init.json ([`meta`]), the home's files ([`home`]), the
//! rows of the per-database reports ([`report`]) and the TLS settings for
//! PostgreSQL ([`ssl`]), and the manual's log lines word for word
//! ([`words`]). Parsing and validation live here; no I/O beyond
//! reading the files it is given.

pub mod config;
pub mod event;
pub mod home;
pub mod meta;
pub mod report;
pub mod ssl;
pub mod words;
