//! The rows of the per-database reports (`get_last_lsn`, `repl_delay`,
//! `show`'s slot list):
//! built by the monitor's operations, carried as JSON by the admin API and
//! printed by clupadm. Plain data: no formatting here (that is the CLI's).

/// One row of `get_last_lsn`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LsnRow {
    pub id: u32,
    pub host: String,
    pub primary: u8,
    pub timeline: Option<u32>,
    pub lsn: Option<String>,
}

/// One row of `repl_delay`; the primary's row has no delays.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DelayRow {
    pub host: String,
    pub primary: u8,
    pub current_lsn: Option<String>,
    pub sent_delay: Option<u64>,
    pub write_delay: Option<u64>,
    pub flush_delay: Option<u64>,
    pub replay_delay: Option<u64>,
    pub is_sync: Option<String>,
    pub state: Option<String>,
}

/// One row of `show`'s slot list (use_slots): a standby's slot on the
/// primary, read when asked.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotRow {
    pub cluster_name: String,
    pub id: u32,
    pub host: String,
    pub slot_name: String,
    /// The primary has the slot.
    pub exists: bool,
    pub active: Option<bool>,
    pub restart_lsn: Option<String>,
    /// WAL the slot holds back on the primary: its current LSN minus the
    /// slot's restart_lsn.
    pub retained_bytes: Option<u64>,
    /// Why the primary's slots could not be read.
    pub error: Option<String>,
}
