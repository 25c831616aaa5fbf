//! The round's second phase: ask [`ha::decide`] what to do with the facts
//! the probes gave, and while it asks for more facts (a host check, the
//! standbys' view of the primary, who holds the write VIP), gather them and
//! ask again. Ends with a decision to act on, or to leave alone.
//!
//! Every branch on cluster state is in `ha`; this only feeds it.

use std::time::Instant;

use super::checks::gather;
use super::Shared;
use crate::ha::{self, Decision, Facts, Kind};
use crate::model::meta::Cluster;

/// How many times one round may gather more facts and decide again.
const MAX_GATHERS: usize = 8;

/// Decide, gathering what the decision asks for, until it names an action
/// or nothing to do. `facts` keeps what was gathered (the upkeep and the
/// observation use it); `last_reason`, the loop's last logged reason, keeps
/// a reason from being logged every round. `since`: when the round began
/// (a shared check begun since then is as good as one of our own).
pub(super) fn settle(
    shared: &Shared,
    name: &str,
    cluster: &Cluster,
    facts: &mut Facts,
    since: Instant,
    last_reason: &mut String,
) -> Decision {
    let mut gathers = 0;
    loop {
        let d = ha::decide(cluster, facts, &shared.params(), crate::now_secs());
        if d.kind != Kind::Gather {
            break log_calm(name, d, last_reason);
        }
        if d.reason != *last_reason {
            log::info!("{}", d.reason);
        }
        *last_reason = d.reason.clone();
        gather(shared, cluster, &d.plan, since, facts);
        gathers += 1;
        if gathers == MAX_GATHERS {
            break d;
        }
    }
}

/// A decision to do nothing is logged when its reason changes: at info
/// while the primary is fine, as a warning otherwise.
fn log_calm(name: &str, d: Decision, last_reason: &str) -> Decision {
    if d.kind == Kind::Nothing && d.reason != last_reason {
        if d.reason.starts_with("no action: primary") {
            log::info!("Cluster({name}): {}", d.reason);
        } else {
            log::warn!("Cluster({name}): {}", d.reason);
        }
    }
    d
}
