//! One integration-test binary (as ripgrep and xsv do): a small harness in
//! `util`, then one module per area. Tests that need the namespace lab live in
//! `lab_*` modules; they fail with the reason when the lab cannot be built.

mod lab;
mod lb_support;
mod util;

mod abuse;
mod chaos;
mod cli_server;
mod compat;
mod etcd_store;
mod events;
mod fuzz;
mod inject;
mod lab_etcd;
mod lab_events;
mod lab_foundation;
mod lab_ha;
mod lab_lb;
mod lab_logs;
mod lab_rewind;
mod lab_slots;
mod lab_status;
mod lab_tls;
mod lab_versions;
mod lb_postgres;
mod lb_proxy;
mod meta_faults;
mod metrics_server;
mod pg_local;
mod ship;
mod status_page;
mod store_crash;
