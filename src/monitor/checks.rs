//! Checks that gather facts for a decision and change nothing: is a host
//! up, does a standby still reach the primary, who answers ARP for the
//! write VIP. The probe phase starts them early for a failing primary; the
//! decide phase asks for them when the decision needs them; the act phase
//! asks once more, unshared, right before it promotes.

use std::thread;
use std::time::{Duration, Instant};

use super::Shared;
use crate::exec::ssh::Remote;
use crate::exec::{pgctl, vip};
use crate::ha::{Action, Facts, VipSeen};
use crate::model::meta::Cluster;

/// From `via`: who has the cluster's write VIP? With `peer`, also whether
/// `via` reaches it (the same ssh call: one login per standby on a
/// failover's critical path).
pub(super) fn write_vip_seen(
    shared: &Shared,
    cluster: &Cluster,
    via: &str,
    peer: Option<(&str, u16)>,
) -> (Result<VipSeen, String>, Option<bool>) {
    let wait = shared.ssh.connect_timeout();
    write_vip_seen_within(shared, cluster, via, peer, wait)
}

/// [`write_vip_seen`], its ARP probe bounded by `wait`.
pub(super) fn write_vip_seen_within(
    shared: &Shared,
    cluster: &Cluster,
    via: &str,
    peer: Option<(&str, u16)>,
    wait: Duration,
) -> (Result<VipSeen, String>, Option<bool>) {
    let v = match super::act::vip_of(&cluster.write_vip) {
        Ok(v) => v,
        Err(e) => return (Err(e), None),
    };
    let look = match vip::look_within(&shared.ssh, via, v, peer, wait) {
        Ok(l) => l,
        Err(e) => return (Err(e.to_string()), None),
    };
    let route = look.dad.as_ref().map(|(dev, _)| dev.as_str());
    if let Some((ifname, _, _)) = vip::choose_interface(&look.addrs, shared.cfg.network, route) {
        shared.remember_ifname(via, &ifname);
    }
    let seen = match vip::answered_from(&shared.ssh, via, v, shared.cfg.network, &look) {
        Ok(None) => Ok(VipSeen::HeldBy(via.to_string())),
        Ok(Some(true)) => Ok(VipSeen::Answered),
        Ok(Some(false)) => Ok(VipSeen::Free),
        Err(e) => Err(e.to_string()),
    };
    (seen, look.peer)
}

/// Does db `id`'s server run on its host (`pg_ctl status` over ssh)?
/// None when that cannot be told.
fn runs(shared: &Shared, cluster: &Cluster, id: u32) -> Option<bool> {
    let db = cluster.db(id)?;
    match pgctl::status(&shared.ssh, db, &shared.cfg) {
        Ok(st) => Some(matches!(st, pgctl::Status::Running { .. })),
        Err(e) => {
            log::warn!("Cannot ask whether database({}) runs: {e}", db.addr());
            None
        }
    }
}

/// Run gather actions in parallel and record their answers. A standby
/// asked both about the primary and about the write VIP gets one ssh call.
/// Gather the facts `plan` asks for; `since`: when the round that needs
/// them began.
pub(super) fn gather(
    shared: &Shared,
    cluster: &Cluster,
    plan: &[Action],
    since: Instant,
    facts: &mut Facts,
) {
    /// One gathered fact.
    enum Answer {
        Host(String, bool),
        Running(u32, Option<bool>),
        Peer(String, Option<bool>),
        Vip(Option<VipSeen>),
    }
    let vip_via = plan.iter().find_map(|a| match a {
        Action::CheckWriteVip { via } => Some(via.as_str()),
        _ => None,
    });
    // The peer question that rides along with the write VIP check.
    let joined = plan.iter().find_map(|a| match a {
        Action::CheckPeer { via, host, port } if Some(via.as_str()) == vip_via => {
            Some((host.as_str(), *port))
        }
        _ => None,
    });
    let peer_failed = |via: &str, host: &str, port: u16, e: &dyn std::fmt::Display| {
        log::warn!("Cannot ask {via} about {host}:{port}: {e}");
    };
    let answers: Vec<Answer> = thread::scope(|s| {
        let hs: Vec<_> = plan
            .iter()
            .map(|a| {
                s.spawn(move || match a {
                    Action::CheckHost { host } => {
                        vec![Answer::Host(
                            host.clone(),
                            shared.host_up_since(host, since),
                        )]
                    }
                    Action::CheckRunning { id } => {
                        vec![Answer::Running(*id, runs(shared, cluster, *id))]
                    }
                    Action::CheckPeer { via, .. } if Some(via.as_str()) == vip_via => vec![],
                    Action::CheckPeer { via, host, port } => {
                        let r = shared.peer_reaches_since(via, host, *port, since);
                        if let Err(e) = &r {
                            peer_failed(via, host, *port, e);
                        }
                        vec![Answer::Peer(via.clone(), r.ok())]
                    }
                    Action::CheckWriteVip { via } => {
                        let (r, peer) = shared.vip_seen_since(cluster, via, joined, since);
                        if let Err(e) = &r {
                            log::warn!("Cannot check from {via} who has the write vip: {e}");
                        }
                        let mut out = vec![Answer::Vip(r.ok())];
                        if let Some((host, port)) = joined {
                            if peer.is_none() {
                                peer_failed(via, host, port, &"no answer");
                            }
                            out.push(Answer::Peer(via.clone(), peer));
                        }
                        out
                    }
                    _ => vec![],
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .collect()
    });
    for a in answers {
        match a {
            Answer::Host(host, up) => {
                facts.hosts.insert(host, up);
            }
            Answer::Peer(via, seen) => {
                facts.peers_asked = true;
                if let Some(b) = seen {
                    facts.peer_sees_primary.insert(via, b);
                }
            }
            Answer::Vip(v) => facts.write_vip = v,
            Answer::Running(id, Some(r)) => {
                facts.running.insert(id, r);
            }
            Answer::Running(_, None) => {}
        }
    }
}
