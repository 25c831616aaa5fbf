//! The decisions, scenario by scenario, on plain data.

use super::sync::sync_degraded;
use super::*;
use crate::model::meta::{parse_clusters, CLUSTER_FAULT, CLUSTER_FROZEN, SAMPLE_INIT};

const P: Params = Params {
    failover_max_lag: 16 << 20,
    restart_tries: 2,
    hung_timeout: 20,
    sync_fallback: SyncFallback::Async,
    auto_rewind: false,
    use_slots: false,
};

fn cluster() -> Cluster {
    parse_clusters(SAMPLE_INIT)
        .unwrap()
        .remove("cluster01")
        .unwrap()
}

fn ok_primary(lsn: u64) -> Seen {
    Seen {
        ok: true,
        in_recovery: Some(false),
        receive_lsn: Some(lsn),
        ..Default::default()
    }
}

fn ok_standby(recv: u64, replay: u64) -> Seen {
    Seen {
        ok: true,
        in_recovery: Some(true),
        receive_lsn: Some(recv),
        replay_lsn: Some(replay),
        upstream_host: Some("192.168.56.41".into()),
        upstream_status: Some("streaming".into()),
        ..Default::default()
    }
}

fn down() -> Seen {
    Seen::default()
}

/// All healthy, then `edit` applied.
fn facts(edit: impl FnOnce(&mut Facts)) -> Facts {
    let mut f = Facts::default();
    f.seen.insert(1, ok_primary(1000));
    for id in 2..=4 {
        f.seen.insert(id, ok_standby(1000, 1000));
    }
    f.primary_last_lsn = Some(1000);
    edit(&mut f);
    f
}

#[test]
fn healthy_cluster_does_nothing() {
    let d = decide(&cluster(), &facts(|_| {}), &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(d.plan.is_empty());
    assert_eq!(
        d.reason,
        "no action: primary database(192.168.56.41:5432) ok, 3 standby(s) ok"
    );
}

#[test]
fn frozen_cluster_is_not_acted_on() {
    let mut c = cluster();
    c.state = CLUSTER_FROZEN;
    let d = decide(
        &c,
        &facts(|f| {
            f.seen.insert(1, down());
        }),
        &P,
        0,
    );
    assert_eq!(d.kind, Kind::Nothing);
    assert_eq!(d.reason, "no action: cluster is frozen");
}

#[test]
fn lock_held_means_no_action_until_it_expires() {
    let mut c = cluster();
    c.lock_time = 130;
    c.lock_holder = "switch task 7".into();
    let f = facts(|f| {
        f.seen.insert(1, down());
    });
    let d = decide(&c, &f, &P, 100);
    assert_eq!(d.kind, Kind::Nothing);
    assert_eq!(
        d.reason,
        format!(
            "no action: cluster is locked by switch task 7 until {}",
            crate::util::logging::format_epoch(130)
        )
    );
    // Expired lock: acting again.
    assert_eq!(decide(&c, &f, &P, 131).kind, Kind::Gather);
}

#[test]
fn failed_db_first_checks_its_host() {
    let d = decide(
        &cluster(),
        &facts(|f| {
            f.seen.insert(4, down());
        }),
        &P,
        0,
    );
    assert_eq!(d.kind, Kind::Gather);
    assert_eq!(
        d.plan,
        [Action::CheckHost {
            host: "192.168.56.44".into()
        }]
    );
    assert_eq!(
        d.reason,
        "Find database(192.168.56.44:5432) failed, repair it ...."
    );
}

#[test]
fn db_down_host_up_is_restarted_in_place() {
    for id in [1, 4] {
        let f = facts(|f| {
            f.seen.insert(id, down());
            f.hosts.insert(format!("192.168.56.4{id}"), true);
            // pg_ctl status: not running (the primary's is asked first).
            f.running.insert(id, false);
        });
        let d = decide(&cluster(), &f, &P, 0);
        assert_eq!(d.kind, Kind::Restart, "db {id}");
        assert_eq!(d.plan, [Action::RestartDb { id }]);
        assert_eq!(
            d.reason,
            format!("Host(192.168.56.4{id}) is ok, only database(192.168.56.4{id}:5432) failed, restart database ....")
        );
    }
}

#[test]
fn standby_host_down_is_marked_fault_and_leaves_cstlb() {
    let f = facts(|f| {
        f.seen.insert(4, down());
        f.hosts.insert("192.168.56.44".into(), false);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::StandbyFault);
    assert_eq!(
        d.plan,
        [
            Action::CstlbDelete {
                backend: "192.168.56.44:5432".into()
            },
            Action::MetaDbState {
                id: 4,
                state: DB_FAULT
            },
        ]
    );
    assert_eq!(
        d.reason,
        "Host(192.168.56.44) is not ok, switch database(192.168.56.44:5432)..."
    );
}

#[test]
fn standby_not_streaming_for_long_is_marked_fault() {
    let f = facts(|f| {
        f.seen.insert(
            3,
            Seen {
                upstream_host: None,
                upstream_status: None,
                ..ok_standby(900, 900)
            },
        );
        f.not_streaming_since.insert(3, 100);
    });
    // Not yet: a repoint or a primary restart takes a few seconds.
    let d = decide(&cluster(), &f, &P, 100 + STUCK_STANDBY_SECS - 1);
    assert_eq!(d.kind, Kind::Nothing, "{}", d.reason);
    let d = decide(&cluster(), &f, &P, 100 + STUCK_STANDBY_SECS);
    assert_eq!(d.kind, Kind::StandbyFault, "{}", d.reason);
    assert_eq!(
        d.plan,
        [
            Action::CstlbDelete {
                backend: "192.168.56.43:5432".into()
            },
            Action::MetaDbState {
                id: 3,
                state: DB_FAULT
            },
        ]
    );
    assert!(
        d.reason.contains("has not streamed from the primary"),
        "{}",
        d.reason
    );
}

#[test]
fn standby_fault_moves_read_vip_off_its_host() {
    let mut c = cluster();
    c.read_vip_host = "192.168.56.42".into();
    let f = facts(|f| {
        f.seen.insert(2, down());
        f.hosts.insert("192.168.56.42".into(), false);
    });
    let d = decide(&c, &f, &P, 0);
    assert!(
        d.plan.contains(&Action::MoveReadVip {
            from: "192.168.56.42".into(),
            to: "192.168.56.43".into()
        }),
        "{:?}",
        d.plan
    );
}

#[test]
fn standby_that_will_not_restart_becomes_fault() {
    let f = facts(|f| {
        f.seen.insert(3, down());
        f.hosts.insert("192.168.56.43".into(), true);
        f.restarts.insert(3, 2);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::StandbyFault);
    assert!(
        d.reason
            .starts_with("database(192.168.56.43:5432) did not come back"),
        "{}",
        d.reason
    );
    assert!(!d.reason.contains("the last start said"), "{}", d.reason);
}

#[test]
fn a_failed_restart_says_why_in_the_decision() {
    let panic = "PANIC:  could not write to file \"pg_wal/xlogtemp.81\": No space left on device";
    // A standby on a full disk: Fault, and the reason quotes its start log.
    let f = facts(|f| {
        f.seen.insert(3, down());
        f.hosts.insert("192.168.56.43".into(), true);
        f.restarts.insert(3, 2);
        f.restart_why.insert(3, panic.into());
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::StandbyFault);
    assert!(
        d.reason
            .ends_with(&format!("(the last start said: {panic})")),
        "{}",
        d.reason
    );
    // The primary: failed over after restart_tries, saying why.
    let f = primary_down(|f| {
        f.hosts.insert("192.168.56.41".into(), true);
        f.running.insert(1, false);
        f.restarts.insert(1, 2);
        f.restart_why.insert(1, panic.into());
        peers(f, false);
        f.write_vip = Some(VipSeen::Free);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert!(
        d.reason.contains(&format!(
            "did not come back after 2 restart(s) (the last start said: {panic})"
        )),
        "{}",
        d.reason
    );
}

fn primary_down(edit: impl FnOnce(&mut Facts)) -> Facts {
    facts(|f| {
        f.seen.insert(1, down());
        f.hosts.insert("192.168.56.41".into(), false);
        edit(f);
    })
}

#[test]
fn failed_primary_checks_its_host_and_asks_the_standbys_at_once() {
    let d = decide(
        &cluster(),
        &facts(|f| {
            f.seen.insert(1, down());
        }),
        &P,
        0,
    );
    assert_eq!(d.kind, Kind::Gather);
    assert_eq!(
        d.plan[0],
        Action::CheckHost {
            host: "192.168.56.41".into()
        }
    );
    assert_eq!(d.plan.len(), 5, "{:?}", d.plan);
    assert_eq!(
        d.plan[4],
        Action::CheckWriteVip {
            via: "192.168.56.42".into()
        }
    );
    assert!(d.plan[1..4]
        .iter()
        .all(|a| matches!(a, Action::CheckPeer { host, .. } if host == "192.168.56.41")));
    assert_eq!(
        d.reason,
        "Find database(192.168.56.41:5432) failed, repair it ...."
    );
}

#[test]
fn write_vip_answer_gathered_with_the_peers_decides_the_dad_step() {
    // Free this round: no second check before promoting.
    let free = primary_down(|f| {
        peers(f, false);
        f.write_vip = Some(VipSeen::Free);
    });
    let d = decide(&cluster(), &free, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert!(
        !d.plan
            .iter()
            .any(|a| matches!(a, Action::EnsureWriteVipFree { .. })),
        "{:?}",
        d.plan
    );
    // The other standbys to the candidate, the last look at the old
    // primary, then the promotion.
    assert_eq!(d.plan[0], Action::Repoint { id: 3, to: 2 });
    assert_eq!(d.plan[1], Action::Repoint { id: 4, to: 2 });
    assert_eq!(d.plan[2], Action::ConfirmGone { id: 1, cand: 2 });
    assert_eq!(d.plan[3], Action::Promote { id: 2 });
    // Somebody answers while the old host is down: no failover.
    let taken = primary_down(|f| {
        peers(f, false);
        f.write_vip = Some(VipSeen::Answered);
    });
    let d = decide(&cluster(), &taken, &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(
        d.reason
            .contains("somebody still answers ARP for the write VIP"),
        "{}",
        d.reason
    );
    // On the candidate itself (an unfinished failover had moved it): fine.
    let on_cand = primary_down(|f| {
        peers(f, false);
        f.write_vip = Some(VipSeen::HeldBy("192.168.56.42".into()));
    });
    let d = decide(&cluster(), &on_cand, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert!(
        !d.plan
            .iter()
            .any(|a| matches!(a, Action::EnsureWriteVipFree { .. })),
        "{:?}",
        d.plan
    );
    // On another standby's host: hands off.
    let elsewhere = primary_down(|f| {
        peers(f, false);
        f.write_vip = Some(VipSeen::HeldBy("192.168.56.44".into()));
    });
    let d = decide(&cluster(), &elsewhere, &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(
        d.reason.contains("host 192.168.56.44 still answers ARP"),
        "{}",
        d.reason
    );
    // Old host up (restart failed): delete the VIP there, then check again.
    let up = facts(|f| {
        f.seen.insert(1, down());
        f.hosts.insert("192.168.56.41".into(), true);
        f.running.insert(1, false);
        f.restarts.insert(1, 2);
        peers(f, false);
        f.write_vip = Some(VipSeen::Answered);
    });
    let d = decide(&cluster(), &up, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert_eq!(
        d.plan[0],
        Action::DeleteWriteVip {
            host: "192.168.56.41".into()
        }
    );
    assert_eq!(d.plan[1], Action::EnsureWriteVipFree { id: 2 });
}

#[test]
fn primary_host_down_asks_the_standbys_first() {
    let d = decide(&cluster(), &primary_down(|_| {}), &P, 0);
    assert_eq!(d.kind, Kind::Gather);
    assert_eq!(d.plan.len(), 3);
    assert_eq!(
        d.plan[0],
        Action::CheckPeer {
            via: "192.168.56.42".into(),
            host: "192.168.56.41".into(),
            port: 5432
        }
    );
}

fn peers(f: &mut Facts, seen: bool) {
    f.peers_asked = true;
    for h in ["192.168.56.42", "192.168.56.43", "192.168.56.44"] {
        f.peer_sees_primary.insert(h.into(), seen);
    }
}

#[test]
fn primary_unreachable_from_monitor_only_is_no_failover() {
    let f = primary_down(|f| {
        peers(f, false);
        f.peer_sees_primary.insert("192.168.56.43".into(), true);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(
        d.reason
            .contains("standby host 192.168.56.43 still reaches database(192.168.56.41:5432)"),
        "{}",
        d.reason
    );
}

#[test]
fn without_peer_answers_a_streaming_receiver_blocks_failover() {
    let f = primary_down(|f| {
        f.peers_asked = true;
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(d.reason.contains("still streams from it"), "{}", d.reason);
}

#[test]
fn monitor_isolated_does_nothing() {
    let f = Facts {
        seen: (1..=4).map(|id| (id, down())).collect(),
        hosts: (1..=4)
            .map(|i| (format!("192.168.56.4{i}"), false))
            .collect(),
        ..Default::default()
    };
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(
        d.reason.contains("reaches none of the cluster's hosts"),
        "{}",
        d.reason
    );
    // Before the standby hosts are checked, it asks.
    let mut f2 = f.clone();
    f2.hosts.retain(|h, _| h == "192.168.56.41");
    let d = decide(&cluster(), &f2, &P, 0);
    assert_eq!(d.kind, Kind::Gather);
    assert_eq!(d.plan.len(), 3);
}

#[test]
fn failover_promotes_the_standby_with_most_wal_then_reconfigures() {
    let f = primary_down(|f| {
        peers(f, false);
        f.seen.insert(2, ok_standby(900, 900));
        f.seen.insert(3, ok_standby(1000, 950));
        f.seen.insert(4, ok_standby(1000, 990));
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert_eq!(
        d.plan,
        [
            Action::EnsureWriteVipFree { id: 4 },
            // Off the old primary before the promotion: a returning old
            // primary finds no standby to acknowledge a commit.
            Action::Repoint { id: 2, to: 4 },
            Action::Repoint { id: 3, to: 4 },
            // The last look, right before the promotion.
            Action::ConfirmGone { id: 1, cand: 4 },
            Action::Promote { id: 4 },
            Action::AddWriteVip { id: 4 },
            Action::MetaPrimary { id: 4, old: 1 },
            Action::CstlbDelete {
                backend: "192.168.56.44:5432".into()
            },
            Action::CstlbDelete {
                backend: "192.168.56.41:5432".into()
            },
            Action::MoveReadVip {
                from: "192.168.56.41".into(),
                to: "192.168.56.42".into()
            },
        ]
    );
    assert_eq!(
        d.reason,
        "Host(192.168.56.41) is not ok, switch database(192.168.56.41:5432)...\nFailover primary database(192.168.56.41:5432): switch to new host(192.168.56.44)..."
    );
}

#[test]
fn with_slots_a_failover_makes_the_standbys_slots_on_the_candidate_first() {
    let f = primary_down(|f| {
        peers(f, false);
        f.seen.insert(2, ok_standby(900, 900));
        f.seen.insert(3, ok_standby(1000, 950));
        f.seen.insert(4, ok_standby(1000, 990));
    });
    let slots = Params {
        use_slots: true,
        ..P
    };
    let d = decide(&cluster(), &f, &slots, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert_eq!(
        d.plan[..5],
        [
            Action::EnsureWriteVipFree { id: 4 },
            // On the candidate, before the standbys follow it.
            Action::CreateSlots {
                id: 4,
                for_ids: vec![2, 3]
            },
            Action::Repoint { id: 2, to: 4 },
            Action::Repoint { id: 3, to: 4 },
            Action::ConfirmGone { id: 1, cand: 4 },
        ]
    );
    assert_eq!(d.plan[1].to_string(), "create slots on db 4 for db 2, 3");
    // Everything else is the plan without slots.
    let without = decide(&cluster(), &f, &P, 0);
    let mut rest = d.plan.clone();
    rest.remove(1);
    assert_eq!(rest, without.plan);
    // A cluster of a primary and one standby has no slot to make.
    let mut c = cluster();
    c.db_list.retain(|d| d.id <= 2);
    let d = decide(&c, &primary_down(|f| peers(f, false)), &slots, 0);
    assert_eq!(d.kind, Kind::Failover, "{}", d.reason);
    assert!(
        !d.plan
            .iter()
            .any(|a| matches!(a, Action::CreateSlots { .. })),
        "{:?}",
        d.plan
    );
}

#[test]
fn level_candidates_prefer_sync_then_replay_then_lowest_id() {
    let c = cluster();
    let mut f = primary_down(|f| peers(f, false));
    assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 2);
    f.sync_standbys.insert("stb43".into());
    assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 3);
    f.sync_standbys.clear();
    f.seen.insert(4, ok_standby(1000, 1001));
    assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 4);
}

#[test]
fn restart_that_fails_on_primary_turns_into_failover_with_vip_delete() {
    let f = facts(|f| {
        f.seen.insert(1, down());
        f.hosts.insert("192.168.56.41".into(), true);
        f.running.insert(1, false);
        f.restarts.insert(1, 2);
        peers(f, false);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert_eq!(
        d.plan[0],
        Action::DeleteWriteVip {
            host: "192.168.56.41".into()
        }
    );
    // The old primary is looked at once more right before the promotion.
    let last = d
        .plan
        .iter()
        .position(|a| *a == Action::ConfirmGone { id: 1, cand: 2 });
    let promote = d.plan.iter().position(|a| *a == Action::Promote { id: 2 });
    assert_eq!(last.map(|i| i + 1), promote, "{:?}", d.plan);
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn acknowledgers_are_streaming_standbys_whose_flush_moves_or_caught_up() {
    let rows = |f2: u64, f3: u64, s4: &str| {
        vec![
            ("stb02".to_string(), "streaming".to_string(), Some(f2)),
            ("stb03".to_string(), "streaming".to_string(), Some(f3)),
            ("stb04".to_string(), s4.to_string(), Some(500)),
        ]
    };
    let last: BTreeMap<String, u64> = [
        ("stb02".into(), 100),
        ("stb03".into(), 300),
        ("stb04".into(), 400),
    ]
    .into();
    // stb02 moved; stb03 stood still but has all the primary had last
    // round; stb04 is not streaming.
    let a = acknowledgers(&rows(200, 300, "catchup"), &last, Some(300));
    assert_eq!(a, set(&["stb02", "stb03"]));
    // stb03 stood still behind the primary: hung.
    let a = acknowledgers(&rows(200, 300, "streaming"), &last, Some(900));
    assert_eq!(a, set(&["stb02", "stb04"]));
}

#[test]
fn sync_setting_is_met_by_enough_acknowledging_standbys() {
    let acks = set(&["stb03"]);
    assert!(sync_met("", &acks, None));
    assert!(sync_met("ANY 1 (stb02,stb03)", &acks, None));
    assert!(!sync_met("ANY 2 (stb02,stb03)", &acks, None));
    // FIRST: the chosen one must acknowledge, whoever else does.
    assert!(!sync_met(
        "FIRST 1 (stb02,stb03)",
        &acks,
        Some(&set(&["stb02"]))
    ));
    assert!(sync_met(
        "FIRST 1 (stb02,stb03)",
        &acks,
        Some(&set(&["stb03"]))
    ));
    assert!(!sync_met("1 (stb02,stb03)", &acks, Some(&set(&[]))));
    assert!(sync_met("*", &acks, Some(&set(&["stb03"]))));
    assert!(!sync_met("ANY 1 (stb02,stb04)", &acks, None));
}

/// A synchronous primary nobody acknowledges: after the grace period,
/// only the acknowledging standbys are named (none: asynchronous), the
/// operator's setting is kept in the meta and put back once they
/// acknowledge again; with block, commits wait and the reason says so.
#[test]
fn sync_standbys_that_do_not_acknowledge_are_dropped_then_restored() {
    let unmet = |acks: &[&str], since: u64| {
        facts(|f| {
            f.sync_names = Some("FIRST 1 (stb02,stb03,stb04)".into());
            f.acks = set(acks);
            f.sync_unmet_since = Some(since);
        })
    };
    // Within the grace period: nothing.
    let d = decide(&cluster(), &unmet(&["stb03"], 100), &P, 102);
    assert!(d.reason.starts_with("no action: primary"), "{}", d.reason);
    // Then the acknowledging one alone.
    let d = decide(&cluster(), &unmet(&["stb03"], 100), &P, 106);
    assert_eq!(d.kind, Kind::SyncStandbys, "{d:?}");
    assert_eq!(
        d.plan,
        [
            Action::MetaSyncWanted {
                names: "FIRST 1 (stb02,stb03,stb04)".into()
            },
            Action::SetSyncNames {
                id: 1,
                names: "FIRST 1 (stb03)".into()
            }
        ]
    );
    // Nobody: asynchronous, loudly.
    let d = decide(&cluster(), &unmet(&[], 100), &P, 106);
    assert_eq!(
        d.plan[1],
        Action::SetSyncNames {
            id: 1,
            names: String::new()
        }
    );
    assert!(d.reason.contains("ASYNCHRONOUS"), "{}", d.reason);
    // block: nothing changes, and the reason says why.
    let block = Params {
        sync_fallback: SyncFallback::Block,
        ..P
    };
    let d = decide(&cluster(), &unmet(&[], 100), &block, 106);
    assert_eq!(d.kind, Kind::Nothing);
    assert!(d.reason.contains("sync_fallback = block"), "{}", d.reason);
    // Degraded, and enough acknowledge again: restored.
    let mut c = cluster();
    c.sync_wanted = "FIRST 1 (stb02,stb03,stb04)".into();
    let back = facts(|f| {
        f.sync_names = Some(String::new());
        f.acks = set(&["stb02"]);
    });
    let d = decide(&c, &back, &P, 200);
    assert_eq!(d.kind, Kind::SyncStandbys);
    assert_eq!(
        d.plan,
        [
            Action::SetSyncNames {
                id: 1,
                names: "FIRST 1 (stb02,stb03,stb04)".into()
            },
            Action::MetaSyncWanted {
                names: String::new()
            }
        ]
    );
    // An asynchronous cluster is left alone.
    let plain = facts(|f| f.sync_names = Some(String::new()));
    assert!(decide(&cluster(), &plain, &P, 200)
        .reason
        .starts_with("no action: primary"));
    // The 9.6 form keeps its form.
    assert_eq!(
        sync_degraded("2 (stb02,stb03)", &set(&["stb03"])),
        "1 (stb03)"
    );
}

/// A hung primary (accepts connections, serves none, its host up) is
/// never restarted; after hung_timeout it is killed, then failed over,
/// even though every standby still opens its port (the accepting
/// socket fools that check, and a dead server cannot take writes).
#[test]
fn hung_primary_is_waited_for_then_killed_and_failed_over() {
    let hung = |stalled_at: u64| {
        facts(|f| {
            f.seen.insert(1, down());
            f.hosts.insert("192.168.56.41".into(), true);
            f.stalled_since.insert(1, stalled_at);
            peers(f, true);
        })
    };
    let d = decide(&cluster(), &hung(100), &P, 105);
    assert_eq!(d.kind, Kind::Nothing, "{d:?}");
    assert!(
        d.reason.contains("for 5 s") && d.reason.contains("not restarted"),
        "{}",
        d.reason
    );
    assert!(d.plan.is_empty());

    let d = decide(&cluster(), &hung(100), &P, 120);
    assert_eq!(d.kind, Kind::Failover, "{d:?}");
    assert_eq!(d.plan[0], Action::KillDb { id: 1 });
    assert_eq!(
        d.plan[1],
        Action::DeleteWriteVip {
            host: "192.168.56.41".into()
        }
    );
    let promote = d
        .plan
        .iter()
        .position(|a| matches!(a, Action::Promote { .. }));
    let free = d
        .plan
        .iter()
        .position(|a| matches!(a, Action::EnsureWriteVipFree { .. }));
    assert!(free.unwrap() < promote.unwrap(), "{:?}", d.plan);
    assert!(d.reason.contains("is hung"), "{}", d.reason);

    // A primary that refuses (not stalled): is it running? Asked first.
    let mut f = hung(100);
    f.stalled_since.clear();
    let d = decide(&cluster(), &f, &P, 120);
    assert_eq!(d.kind, Kind::Gather);
    assert_eq!(d.plan, [Action::CheckRunning { id: 1 }]);
    // Not running: restarted, as before.
    f.running.insert(1, false);
    assert_eq!(decide(&cluster(), &f, &P, 120).kind, Kind::Restart);
}

/// A primary whose server runs but does not answer the monitor (a lossy
/// link): never restarted. A standby that reaches it means the monitor
/// alone is cut off; if none does, it is hung: after hung_timeout, killed.
#[test]
fn running_primary_that_does_not_answer_is_never_restarted() {
    let runs = |reached: bool| {
        facts(|f| {
            f.seen.insert(1, down());
            f.hosts.insert("192.168.56.41".into(), true);
            f.running.insert(1, true);
            f.failing_since.insert(1, 100);
            peers(f, reached);
        })
    };
    let d = decide(&cluster(), &runs(true), &P, 200);
    assert_eq!(d.kind, Kind::Nothing, "{d:?}");
    assert!(d.reason.starts_with("no restart:"), "{}", d.reason);
    let d = decide(&cluster(), &runs(false), &P, 110);
    assert_eq!(d.kind, Kind::Nothing, "{d:?}");
    assert!(d.reason.contains("not restarted"), "{}", d.reason);
    let d = decide(&cluster(), &runs(false), &P, 130);
    assert_eq!(d.kind, Kind::Failover, "{d:?}");
    assert_eq!(d.plan[0], Action::KillDb { id: 1 });
}

#[test]
fn candidate_too_far_behind_is_skipped_and_none_left_is_fault() {
    let f = primary_down(|f| {
        peers(f, false);
        f.primary_last_lsn = Some(100 << 20);
        f.seen.insert(2, ok_standby(10 << 20, 10 << 20));
        f.seen.insert(3, ok_standby(90 << 20, 90 << 20));
        f.seen.insert(4, down());
    });
    let c = cluster();
    assert_eq!(choose_candidate(&c, &f, &P).unwrap().id, 3);
    let mut f2 = f.clone();
    f2.seen.insert(3, ok_standby(80 << 20, 80 << 20));
    let d = decide(&c, &f2, &P, 0);
    assert_eq!(d.kind, Kind::NoCandidate);
    assert_eq!(
        d.plan,
        [Action::MetaClusterState {
            state: CLUSTER_FAULT
        }]
    );
    assert!(
        d.reason.contains("NO STANDBY IS SAFE TO PROMOTE"),
        "{}",
        d.reason
    );
    assert!(
        d.reason
            .contains("192.168.56.42:5432 is 94371840 bytes behind"),
        "{}",
        d.reason
    );
    assert!(
        d.reason.contains("192.168.56.44:5432 unreachable"),
        "{}",
        d.reason
    );
    // Limit 0 means no limit.
    let p0 = Params {
        failover_max_lag: 0,
        ..P
    };
    assert_eq!(decide(&c, &f2, &p0, 0).kind, Kind::Failover);
}

#[test]
fn unfinished_failover_is_rolled_forward_never_a_second_promotion() {
    // db 3 was promoted, then the monitor died before saving the meta.
    let f = primary_down(|f| {
        peers(f, false);
        f.seen.insert(
            3,
            Seen {
                in_recovery: Some(false),
                ..ok_standby(900, 900)
            },
        );
        f.seen.insert(4, ok_standby(1000, 1000)); // more WAL, but too late
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert!(
        !d.plan.iter().any(|a| matches!(a, Action::Promote { .. })),
        "{:?}",
        d.plan
    );
    assert!(d.plan.contains(&Action::MetaPrimary { id: 3, old: 1 }));
    assert!(d.plan.contains(&Action::AddWriteVip { id: 3 }));
    assert!(d.plan.contains(&Action::Repoint { id: 4, to: 3 }));
    assert!(
        d.reason
            .contains("already promoted by an unfinished failover"),
        "{}",
        d.reason
    );
    // Two promoted standbys: hands off.
    let f2 = primary_down(|f| {
        peers(f, false);
        f.seen.insert(
            3,
            Seen {
                in_recovery: Some(false),
                ..ok_standby(900, 900)
            },
        );
        f.seen.insert(
            4,
            Seen {
                in_recovery: Some(false),
                ..ok_standby(900, 900)
            },
        );
    });
    let d = decide(&cluster(), &f2, &P, 0);
    assert_eq!(d.kind, Kind::NoCandidate);
    assert!(d.plan.is_empty());
    assert!(
        d.reason.contains("SEVERAL STANDBYS RUN AS PRIMARIES"),
        "{}",
        d.reason
    );
}

#[test]
fn standby_not_in_recovery_is_never_a_candidate() {
    let f = primary_down(|f| {
        peers(f, false);
        for id in 2..=4 {
            f.seen.insert(
                id,
                Seen {
                    in_recovery: Some(false),
                    ..ok_standby(2000, 2000)
                },
            );
        }
    });
    assert_eq!(decide(&cluster(), &f, &P, 0).kind, Kind::NoCandidate);
}

#[test]
fn sync_names_after_failover_name_survivors_then_old_primary() {
    let c = cluster();
    let (old, new) = (c.db(1).unwrap(), c.db(3).unwrap());
    assert_eq!(
        sync_names_after(&c, old, new, Some("ANY 1 (stb42,stb43,stb44)")).as_deref(),
        Some("ANY 1 (stb42,stb44,stb41)")
    );
    assert_eq!(
        sync_names_after(&c, old, new, Some("FIRST 2 (stb42, stb43)")).as_deref(),
        Some("FIRST 2 (stb42,stb44,stb41)")
    );
    assert_eq!(
        sync_names_after(&c, old, new, Some("stb43")).as_deref(),
        Some("FIRST 1 (stb42,stb44,stb41)")
    );
    assert_eq!(sync_names_after(&c, old, new, Some("")), None);
    assert_eq!(sync_names_after(&c, old, new, None), None);
    let mut small = c.clone();
    small.db_list.retain(|d| d.id == 1 || d.id == 3);
    assert_eq!(
        sync_names_after(&small, old, new, Some("ANY 3 (stb42,stb43,stb44)")).as_deref(),
        Some("ANY 1 (stb41)")
    );
    // And the failover plan carries it.
    let f = primary_down(|f| {
        peers(f, false);
        f.sync_names = Some("ANY 1 (stb42,stb43,stb44)".into());
    });
    let d = decide(&c, &f, &P, 0);
    assert!(
        d.plan.contains(&Action::SetSyncNames {
            id: 2,
            names: "ANY 1 (stb43,stb44,stb41)".into()
        }),
        "{:?}",
        d.plan
    );
}

#[test]
fn returning_old_primary_is_fenced() {
    let mut c = cluster();
    c.db_list[0].is_primary = 0;
    c.db_list[0].state = DB_FAULT;
    c.db_list[1].is_primary = 1;
    let f = facts(|f| {
        f.seen.insert(1, ok_primary(5000));
        f.seen.insert(2, ok_primary(6000));
    });
    let d = decide(&c, &f, &P, 0);
    assert_eq!(d.kind, Kind::Fence);
    assert_eq!(d.plan, [Action::Fence { id: 1 }]);
    // Once it is down (or runs as a standby) nothing more is done.
    let f = facts(|f| {
        f.seen.insert(1, down());
        f.seen.insert(2, ok_primary(6000));
        for id in 3..=4 {
            f.seen.insert(
                id,
                Seen {
                    upstream_host: Some("192.168.56.42".into()),
                    ..ok_standby(6000, 6000)
                },
            );
        }
    });
    assert_eq!(decide(&c, &f, &P, 0).kind, Kind::Nothing);
}

#[test]
fn standby_streaming_from_the_wrong_host_is_repointed() {
    let f = facts(|f| {
        f.seen.insert(
            3,
            Seen {
                upstream_host: Some("192.168.56.42".into()),
                ..ok_standby(1000, 1000)
            },
        );
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Repoint);
    assert_eq!(d.plan, [Action::Repoint { id: 3, to: 1 }]);
}

#[test]
fn fault_primary_is_retried_and_recovers_cluster_state() {
    let mut c = cluster();
    c.db_list[0].state = DB_FAULT;
    c.state = CLUSTER_FAULT;
    let f = primary_down(|f| peers(f, false));
    let d = decide(&c, &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover);
    assert_eq!(
        d.plan.last(),
        Some(&Action::MetaClusterState {
            state: crate::model::meta::CLUSTER_NORMAL
        })
    );
    // No candidate and already Fault: nothing more to write.
    let f = primary_down(|f| {
        for id in 2..=4 {
            f.seen.insert(id, down());
        }
    });
    let d = decide(&c, &f, &P, 0);
    assert_eq!(d.kind, Kind::NoCandidate);
    assert!(d.plan.is_empty());
}

/// auto_rewind: a running Fault standby is rewound, not more often than
/// AUTO_REWIND_EVERY_SECS; a stopped one, or with the key off, is left.
#[test]
fn auto_rewind_repairs_a_running_fault_standby_now_and_then() {
    let mut c = cluster();
    c.db_mut(3).unwrap().state = DB_FAULT;
    let f = facts(|_| {});
    let on = Params {
        auto_rewind: true,
        ..P
    };
    assert!(decide(&c, &f, &P, 1000)
        .reason
        .starts_with("no action: primary"));
    let d = decide(&c, &f, &on, 1000);
    assert_eq!(d.kind, Kind::AutoRewind);
    assert_eq!(d.plan, [Action::RewindDb { id: 3 }]);
    let mut tried = f.clone();
    tried.rewound_at.insert(3, 900);
    assert!(decide(&c, &tried, &on, 1000)
        .reason
        .starts_with("no action: primary"));
    assert_eq!(
        decide(&c, &tried, &on, 900 + AUTO_REWIND_EVERY_SECS).kind,
        Kind::AutoRewind
    );
    let mut stopped = f.clone();
    stopped.seen.insert(3, down());
    assert!(decide(&c, &stopped, &on, 1000)
        .reason
        .starts_with("no action: primary"));
}

/// A switch cut short by a monitor restart after its promotion: the old
/// primary is down (stopped by the switch), a standby runs as a primary.
/// It is adopted (no second promotion), never the old one restarted.
#[test]
fn promoted_standby_is_adopted_not_the_old_primary_restarted() {
    let f = facts(|f| {
        f.seen.insert(1, down());
        f.hosts.insert("192.168.56.41".into(), true);
        f.running.insert(1, false);
        f.seen.insert(2, ok_primary(1200));
        peers(f, false);
    });
    let d = decide(&cluster(), &f, &P, 0);
    assert_eq!(d.kind, Kind::Failover, "{d:?}");
    assert!(
        !d.plan
            .iter()
            .any(|a| matches!(a, Action::Promote { .. } | Action::RestartDb { .. })),
        "{:?}",
        d.plan
    );
    assert!(
        d.plan.contains(&Action::MetaPrimary { id: 2, old: 1 }),
        "{:?}",
        d.plan
    );
}
