//! The monitor's recent observations of each database, for the status page:
//! a ring of the last [`KEEP`] samples per database, one per probe round.
//!
//! Fed only from a round's own probe results (after the probe phase, with
//! the round's meta); the HTTP server reads it and never probes. Pure data:
//! no clock (the caller gives the time), no I/O.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::exec::pg::DbProbe;
use crate::model::meta::{Cluster, Db};

/// Samples kept per database: two minutes at a 1 s probe interval.
pub const KEEP: usize = 120;

/// How a database answered in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Seen {
    /// Answered out of recovery.
    #[serde(rename = "P")]
    Primary,
    /// Answered in recovery.
    #[serde(rename = "S")]
    Standby,
    /// Did not answer.
    #[serde(rename = "D")]
    Down,
}

/// One round's view of one database, serialized as a compact tuple
/// `[time ms, "P"|"S"|"D", lag bytes, lag s]` (the page polls every second).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample(
    /// When the round observed it (epoch milliseconds).
    pub u64,
    pub Seen,
    /// Standby: bytes still to replay (see [`lag_bytes`]).
    pub Option<u64>,
    /// Standby: age of the last heartbeat it replayed, in seconds.
    pub Option<f64>,
);

/// Each cluster's databases' rings, by cluster name and database id.
pub type History = BTreeMap<String, BTreeMap<u32, VecDeque<Sample>>>;

/// Bytes the standby `db` has still to replay to reach the primary's WAL
/// position: the primary's wal_lsn minus the standby's replay lsn (or, if
/// its own probe has none, the primary's pg_stat_replication row for it).
/// None for the primary and when either side is unknown.
pub fn lag_bytes(cluster: &Cluster, probes: &BTreeMap<u32, DbProbe>, db: &Db) -> Option<u64> {
    if db.is_primary() {
        return None;
    }
    let primary = cluster.primary()?;
    let pp = probes
        .get(&primary.id)
        .filter(|p| p.ok && p.in_recovery != Some(true))?;
    let head = pp.wal_lsn?;
    let replay = probes
        .get(&db.id)
        .filter(|p| p.ok)
        .and_then(|p| p.replay_lsn)
        .or_else(|| {
            pp.replicas
                .iter()
                .find(|r| r.application_name == db.repl_app_name)
                .and_then(|r| r.replay_lsn)
        })?;
    // The two probes run in parallel: a standby may look a little ahead.
    Some(head.saturating_sub(replay))
}

/// The sample of `db` from one round's probes, taken at `at_ms`.
pub fn sample(
    cluster: &Cluster,
    probes: &BTreeMap<u32, DbProbe>,
    db: &Db,
    at_ms: u64,
) -> Option<Sample> {
    let p = probes.get(&db.id)?;
    let seen = match (p.ok, p.in_recovery) {
        (false, _) => Seen::Down,
        (true, Some(true)) => Seen::Standby,
        (true, _) => Seen::Primary,
    };
    let lag_s = (seen == Seen::Standby)
        .then_some(p.heartbeat_age_ms)
        .flatten()
        .map(|ms| ms as f64 / 1000.0);
    Some(Sample(at_ms, seen, lag_bytes(cluster, probes, db), lag_s))
}

/// Add one round of `cluster` (named `name`) to `history`: a sample per
/// probed database, the oldest dropped past [`KEEP`]; databases no longer
/// in the meta are forgotten.
pub fn record(
    history: &mut History,
    name: &str,
    cluster: &Cluster,
    probes: &BTreeMap<u32, DbProbe>,
    at_ms: u64,
) {
    let rings = history.entry(name.to_string()).or_default();
    rings.retain(|id, _| cluster.db(*id).is_some());
    for db in &cluster.db_list {
        if let Some(s) = sample(cluster, probes, db, at_ms) {
            let ring = rings.entry(db.id).or_default();
            if ring.len() == KEEP {
                ring.pop_front();
            }
            ring.push_back(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};

    fn probe(ok: bool, rec: bool, wal: u64, replay: Option<u64>, hb: Option<u64>) -> DbProbe {
        DbProbe {
            ok,
            in_recovery: ok.then_some(rec),
            wal_lsn: ok.then_some(wal),
            replay_lsn: replay,
            heartbeat_age_ms: hb,
            ..Default::default()
        }
    }

    #[test]
    fn samples_say_role_lag_and_heartbeat_age() {
        let c = parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap();
        let probes: BTreeMap<u32, DbProbe> = [
            (1, probe(true, false, 5000, None, None)),
            (2, probe(true, true, 4000, Some(3000), Some(1500))),
            (3, probe(false, false, 0, None, None)),
        ]
        .into_iter()
        .collect();
        let s = |id| sample(&c, &probes, c.db(id).unwrap(), 7);
        assert_eq!(s(1), Some(Sample(7, Seen::Primary, None, None)));
        assert_eq!(s(2), Some(Sample(7, Seen::Standby, Some(2000), Some(1.5))));
        assert_eq!(s(3), Some(Sample(7, Seen::Down, None, None)));
        // Not probed this round: no sample.
        assert_eq!(s(4), None);
        assert_eq!(
            serde_json::to_string(&s(2).unwrap()).unwrap(),
            "[7,\"S\",2000,1.5]"
        );
    }

    #[test]
    fn the_ring_keeps_the_last_samples_of_databases_in_the_meta() {
        let mut c = parse_clusters(SAMPLE_INIT)
            .unwrap()
            .remove("cluster01")
            .unwrap();
        let probes: BTreeMap<u32, DbProbe> = (1..=4)
            .map(|id| (id, probe(true, id != 1, 100, Some(100 - id as u64), None)))
            .collect();
        let mut h = History::new();
        for t in 0..(KEEP as u64 + 5) {
            record(&mut h, "cluster01", &c, &probes, t);
        }
        let ring = &h["cluster01"][&3];
        assert_eq!(ring.len(), KEEP);
        assert_eq!(ring.front().unwrap().0, 5);
        assert_eq!(ring.back().unwrap().0, KEEP as u64 + 4);
        assert_eq!(ring.back().unwrap().2, Some(3));
        // Database 4 leaves the meta: its ring goes with it.
        c.db_list.retain(|d| d.id != 4);
        record(&mut h, "cluster01", &c, &probes, 1000);
        assert_eq!(
            h["cluster01"].keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(h["cluster01"][&1].back().unwrap().0, 1000);
    }
}
