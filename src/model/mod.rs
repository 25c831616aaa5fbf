//! What clup knows about, as plain data: clup.conf ([`config`]), the
//! cluster meta and init.json ([`meta`]), the home's files ([`home`]) and
//! the rows of the per-database reports ([`report`]). Parsing and
//! validation live here; no I/O beyond reading the files it is given.

pub mod config;
pub mod home;
pub mod meta;
pub mod report;
