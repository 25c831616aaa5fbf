//! Synchronous replication: which standbys acknowledge the primary's WAL,
//! whether its synchronous_standby_names can be met by them, what to do
//! when it cannot (`sync_fallback`), and the setting after a role change.

use std::collections::{BTreeMap, BTreeSet};

use super::{Action, Decision, Facts, Kind, Params, SyncFallback, SYNC_GRACE_SECS};
use crate::model::meta::{Cluster, Db};

/// The standbys that acknowledge the primary's WAL now, of its
/// pg_stat_replication rows `(application_name, state, flush LSN)`: those
/// streaming whose flush position moved since the last round
/// (`last_flush`), or that have flushed all the primary had then
/// (`last_primary_lsn`). A hung standby keeps its walsender "streaming"
/// for wal_sender_timeout but flushes nothing; a busy one still moves.
pub fn acknowledgers(
    replicas: &[(String, String, Option<u64>)],
    last_flush: &BTreeMap<String, u64>,
    last_primary_lsn: Option<u64>,
) -> BTreeSet<String> {
    replicas
        .iter()
        .filter(|(_, state, _)| state == "streaming")
        .filter(|(name, _, flush)| {
            let Some(flush) = *flush else { return false };
            let moved = last_flush.get(name).is_none_or(|f| flush > *f);
            let caught_up = last_primary_lsn.is_some_and(|l| flush >= l);
            moved || caught_up
        })
        .map(|(name, _, _)| name.clone())
        .collect()
}

/// Can the primary's synchronous_standby_names `names` be met: do enough
/// of the standbys it names acknowledge? `ANY n`: n of them. `FIRST n`
/// (and the plain `n (list)` and `list` forms): the standbys the server
/// chose as synchronous (`chosen`) are n, and all acknowledge; with
/// `chosen` None (not chosen yet, as when restoring), n of the named
/// standbys acknowledge. An empty setting (asynchronous) is always met.
pub fn sync_met(names: &str, acks: &BTreeSet<String>, chosen: Option<&BTreeSet<String>>) -> bool {
    let names = names.trim();
    if names.is_empty() {
        return true;
    }
    let (method, num) = parse_sync_method(names);
    let listed = sync_list(names);
    let named_acks = acks
        .iter()
        .filter(|a| listed.iter().any(|l| l == "*" || l.eq_ignore_ascii_case(a)))
        .count();
    match (method, chosen) {
        ("FIRST", Some(chosen)) => chosen.len() >= num && chosen.iter().all(|c| acks.contains(c)),
        _ => named_acks >= num,
    }
}

/// The standby names of a synchronous_standby_names value.
fn sync_list(names: &str) -> Vec<String> {
    let inner = match (names.find('('), names.rfind(')')) {
        (Some(a), Some(b)) if a < b => &names[a + 1..b],
        _ => names,
    };
    inner
        .split(',')
        .map(|n| n.trim().trim_matches('"').to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The setting that names only the standbys in `acks` (in the order the
/// operator listed them), in the operator's own syntax, asking for no more
/// of them than acknowledge; empty (asynchronous) when none does.
pub(super) fn sync_degraded(wanted: &str, acks: &BTreeSet<String>) -> String {
    let (method, num) = parse_sync_method(wanted);
    let listed = sync_list(wanted);
    let mut keep: Vec<&String> = Vec::new();
    for l in &listed {
        for a in acks
            .iter()
            .filter(|a| l == "*" || l.eq_ignore_ascii_case(a))
        {
            if !keep.contains(&a) {
                keep.push(a);
            }
        }
    }
    if keep.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = keep.iter().map(|s| s.as_str()).collect();
    sync_setting(wanted, method, num.min(names.len()), &names)
}

/// A synchronous_standby_names value in the style of `like`: with the
/// method keyword only when `like` has one (9.6 knows only `n (list)`).
fn sync_setting(like: &str, method: &str, n: usize, names: &[&str]) -> String {
    let upper = like.trim().to_ascii_uppercase();
    if upper.starts_with("ANY ") || upper.starts_with("FIRST ") {
        format!("{method} {n} ({})", names.join(","))
    } else {
        format!("{n} ({})", names.join(","))
    }
}

/// Synchronous replication that nobody acknowledges is an outage nobody
/// chose: every commit waits. After [`SYNC_GRACE_SECS`] of that, with
/// `sync_fallback = async`, the primary names only the standbys that
/// acknowledge (none: asynchronous) and the operator's setting is kept in
/// the meta; it is put back once enough standbys acknowledge again. With
/// `block`, commits keep waiting, and the reason says so every time it
/// changes. `None`: nothing to do.
pub(super) fn sync_upkeep(
    cluster: &Cluster,
    primary: &Db,
    facts: &Facts,
    p: &Params,
    now: u64,
) -> Option<Decision> {
    let current = facts.sync_names.as_deref()?.trim().to_string();
    let wanted = if cluster.sync_wanted.is_empty() {
        current.clone()
    } else {
        cluster.sync_wanted.clone()
    };
    if wanted.is_empty() {
        return None;
    }
    let decision = |plan: Vec<Action>, reason: String| Decision {
        kind: Kind::SyncStandbys,
        plan,
        reason,
        subject: Some(primary.id),
    };
    if current != wanted && sync_met(&wanted, &facts.acks, None) {
        return Some(decision(
            vec![
                Action::SetSyncNames {
                    id: primary.id,
                    names: wanted.clone(),
                },
                Action::MetaSyncWanted {
                    names: String::new(),
                },
            ],
            format!(
                "synchronous standbys acknowledge again: synchronous_standby_names of database({}) restored to '{wanted}'",
                primary.addr()
            ),
        ));
    }
    let since = facts.sync_unmet_since?;
    let waited = now.saturating_sub(since);
    if current.is_empty() || waited < SYNC_GRACE_SECS {
        return None;
    }
    let acks: Vec<&str> = facts.acks.iter().map(String::as_str).collect();
    let head = format!(
        "SYNCHRONOUS STANDBYS DO NOT ACKNOWLEDGE: database({}) has synchronous_standby_names '{current}' but for {waited} s only [{}] acknowledged, so commits wait",
        primary.addr(),
        acks.join(",")
    );
    if p.sync_fallback == SyncFallback::Block {
        return Some(Decision::nothing(format!(
            "{head}; left so on purpose (sync_fallback = block)"
        )));
    }
    let names = sync_degraded(&wanted, &facts.acks);
    if names == current {
        return None;
    }
    let mut plan = Vec::new();
    if cluster.sync_wanted.is_empty() {
        plan.push(Action::MetaSyncWanted {
            names: wanted.clone(),
        });
    }
    plan.push(Action::SetSyncNames {
        id: primary.id,
        names: names.clone(),
    });
    let now_what = if names.is_empty() {
        "ASYNCHRONOUS until a standby acknowledges again".to_string()
    } else {
        format!("'{names}'")
    };
    Some(decision(
        plan,
        format!("{head}; synchronous_standby_names set to {now_what} (sync_fallback = async; '{wanted}' is restored then)"),
    ))
}

/// synchronous_standby_names after `new` becomes the primary: the same
/// method and count, naming the surviving standbys and then the old primary
/// (which may come back as a standby), so commits neither block forever
/// while a standby can acknowledge them nor get acknowledged by nobody.
/// `None` when the cluster does not use synchronous replication.
pub fn sync_names_after(
    cluster: &Cluster,
    old: &Db,
    new: &Db,
    current: Option<&str>,
) -> Option<String> {
    let current = current?.trim();
    if current.is_empty() {
        return None;
    }
    let (method, num) = parse_sync_method(current);
    let mut names: Vec<&str> = cluster
        .normal_standbys()
        .filter(|d| d.id != new.id)
        .map(|d| d.repl_app_name.as_str())
        .collect();
    names.push(old.repl_app_name.as_str());
    let n = num.clamp(1, names.len().max(1));
    Some(format!("{method} {n} ({})", names.join(",")))
}

/// `ANY 2 (a,b)` -> ("ANY", 2); `FIRST 1 (a)`, `2 (a,b)` and `a,b` -> ("FIRST", n).
fn parse_sync_method(s: &str) -> (&'static str, usize) {
    let upper = s.to_ascii_uppercase();
    let (method, rest) = if let Some(r) = upper.strip_prefix("ANY ") {
        ("ANY", r)
    } else if let Some(r) = upper.strip_prefix("FIRST ") {
        ("FIRST", r)
    } else {
        ("FIRST", upper.as_str())
    };
    let num = rest
        .split_whitespace()
        .next()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1);
    (method, num)
}
