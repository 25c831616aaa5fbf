//! The etcd meta store and the leader lease against real etcd processes
//! (Debian's etcd-server, 3.4) on 127.0.0.1: each test starts its own etcd
//! on free ports with a temp data dir and kills it by pid when done. Faults
//! are made by killing members, by a port nobody listens on, and by a
//! listener that takes connections and never answers.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clup::model::meta::parse_clusters;
use clup::store::etcd::{Client, Elected, EtcdStore, FencedStore, Leader};
use clup::store::{update, MetaDoc, MetaStore, StoreError, UpdateError};

use crate::util::{free_port, sample_conf, wait_for, TestHome, SAMPLE_INIT};

const ETCD: &str = "/usr/bin/etcd";
const SEC: Duration = Duration::from_secs(1);

struct Member {
    client_url: String,
    child: Option<Child>,
}

/// An etcd cluster of `n` members on 127.0.0.1, removed on drop.
struct Etcd {
    dir: PathBuf,
    members: Vec<Member>,
}

impl Etcd {
    fn start(tag: &str, n: usize) -> Etcd {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: apt-get install etcd-server (scripts/test does)"
        );
        let dir = std::env::temp_dir().join(format!("clup-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Hold all listeners at once so the 2n ports differ.
        let ls: Vec<TcpListener> = (0..2 * n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(ls);
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let cluster = (0..n)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..n {
            let client_url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).unwrap();
            let mut cmd = Command::new(ETCD);
            cmd.args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer(i)])
                .args(["--initial-advertise-peer-urls", &peer(i)])
                .args(["--initial-cluster", &cluster])
                .args([
                    "--initial-cluster-token",
                    &format!("{tag}-{}", std::process::id()),
                ])
                .args(["--initial-cluster-state", "new"])
                // Fast elections: a test cluster on one host.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            // If this test process dies without dropping us, etcd goes too.
            // SAFETY: prctl only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("spawn etcd");
            members.push(Member {
                client_url,
                child: Some(child),
            });
        }
        let etcd = Etcd { dir, members };
        for i in 0..n {
            let c = Client::new(&[etcd.members[i].client_url.clone()], SEC).unwrap();
            assert!(
                wait_for(20, || c.get(b"/ready").is_ok()),
                "etcd m{i} not ready within 20 s:\n{}",
                etcd.log(i)
            );
        }
        etcd
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
    }

    fn url(&self, i: usize) -> String {
        self.members[i].client_url.clone()
    }

    fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.url(i)).collect()
    }

    fn client(&self, timeout: Duration) -> Arc<Client> {
        Arc::new(Client::new(&self.endpoints(), timeout).unwrap())
    }

    /// Kill member `i` (SIGKILL, by its pid) and reap it.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn doc() -> MetaDoc {
    MetaDoc {
        version: 0,
        clusters: parse_clusters(SAMPLE_INIT).unwrap(),
        ..Default::default()
    }
}

fn set_holder(d: &mut MetaDoc, who: &str) {
    d.clusters.get_mut("cluster01").unwrap().lock_holder = who.to_string();
}

fn holder_of(d: &MetaDoc) -> &str {
    &d.clusters["cluster01"].lock_holder
}

fn won(e: Elected) -> Leader {
    match e {
        Elected::Won(l) => l,
        Elected::Lost(h) => panic!("expected to win, {h:?} leads"),
    }
}

#[test]
fn etcd_meta_round_trip() {
    let etcd = Etcd::start("roundtrip", 1);
    let store = EtcdStore::new(etcd.client(SEC), "/t/");
    assert_eq!(store.key(), "/t/meta");
    let e = store.load().unwrap_err();
    assert!(matches!(e, StoreError::Missing(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "no cluster meta at etcd key /t/meta (run 'clupadm init' first)"
    );
    assert!(!store.exists().unwrap());
    assert_eq!(store.save(&doc()).unwrap(), 1);
    assert!(store.exists().unwrap());
    let mut got = store.load().unwrap();
    assert_eq!(got.version, 1);
    assert_eq!(got.clusters, doc().clusters);
    set_holder(&mut got, "v2");
    assert_eq!(store.save(&got).unwrap(), 2);
    assert_eq!(holder_of(&store.load().unwrap()), "v2");
    assert_eq!(store.describe(), format!("etcd /t/meta at {}", etcd.url(0)));
    // update() works on it like on the file store.
    let (_, d) = update(&store, |d| {
        set_holder(d, "v3");
        Ok(())
    })
    .unwrap();
    assert_eq!(d.version, 3);
    assert_eq!(store.load().unwrap(), d);
}

#[test]
fn etcd_stale_save_is_a_conflict() {
    let etcd = Etcd::start("conflict", 1);
    let store = EtcdStore::new(etcd.client(SEC), "/t");
    store.save(&doc()).unwrap();
    // A second first save (someone else initialized meanwhile).
    match store.save(&doc()) {
        Err(StoreError::Conflict {
            expected: 0,
            found: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut a = store.load().unwrap();
    let mut b = store.load().unwrap();
    set_holder(&mut a, "a");
    set_holder(&mut b, "b");
    assert_eq!(store.save(&a).unwrap(), 2);
    match store.save(&b) {
        Err(StoreError::Conflict {
            expected: 1,
            found: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(holder_of(&store.load().unwrap()), "a");
    // Two threads updating at once: both changes land, none is lost.
    let store = Arc::new(store);
    let go = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (store, go) = (store.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                update(&*store, |d| {
                    d.next_task_id += 1 << i;
                    Ok(())
                })
                .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let d = store.load().unwrap();
    assert_eq!(d.next_task_id, 255);
    assert_eq!(d.version, 10);
}

#[test]
fn etcd_corrupt_meta_is_refused_not_guessed() {
    let etcd = Etcd::start("corrupt", 1);
    let client = etcd.client(SEC);
    let store = EtcdStore::new(client.clone(), "/t");
    store.save(&doc()).unwrap();

    let garbage = b"{\"version\": 3, \"clus";
    client.put(b"/t/meta", garbage, 0).unwrap();
    let e = store.load().unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(..)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("cluster meta etcd key /t/meta is corrupt, refusing to act on it: "),
        "{e}"
    );
    assert!(store.exists().is_err());
    // An update refuses too and leaves the value as it was.
    assert!(update(&store, |_| Ok(())).is_err());
    assert_eq!(client.get(b"/t/meta").unwrap().unwrap().value, garbage);

    // A whole document whose version does not match the key's write count
    // was written by something else (an etcdctl put, say).
    let mut d = doc();
    d.version = 1;
    client
        .put(b"/t/meta", &serde_json::to_vec(&d).unwrap(), 0)
        .unwrap();
    let e = store.load().unwrap_err();
    assert!(
        e.to_string()
            .contains("says version 1 but the key was written 3 times"),
        "{e}"
    );
    // A document breaking an invariant (two primaries).
    let mut d = doc();
    d.version = 4;
    d.clusters.get_mut("cluster01").unwrap().db_list[1].is_primary = 1;
    client
        .put(b"/t/meta", &serde_json::to_vec(&d).unwrap(), 0)
        .unwrap();
    let e = store.load().unwrap_err();
    assert!(e.to_string().contains("exactly one database"), "{e}");

    // Set aside: the bad value moves to a key of its own, never deleted.
    let aside = store.set_aside_corrupt().unwrap();
    assert!(aside.starts_with("/t/meta.corrupt."), "{aside}");
    assert_eq!(
        client.get(aside.as_bytes()).unwrap().unwrap().value,
        serde_json::to_vec(&d).unwrap()
    );
    assert!(matches!(store.load(), Err(StoreError::Missing(_))));
    assert_eq!(store.save(&doc()).unwrap(), 1);
}

#[test]
fn etcd_invalid_doc_is_not_written() {
    let etcd = Etcd::start("invalid", 1);
    let store = EtcdStore::new(etcd.client(SEC), "/t");
    let mut d = doc();
    d.clusters.get_mut("cluster01").unwrap().db_list[1].is_primary = 1;
    let e = store.save(&d).unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    assert!(!store.exists().unwrap());
}

#[test]
fn etcd_campaign_elects_exactly_one_leader() {
    let etcd = Etcd::start("campaign", 1);
    let go = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            // Each monitor has its own client, as separate hosts would.
            let (client, go) = (etcd.client(SEC), go.clone());
            std::thread::spawn(move || {
                let c = clup::store::etcd::Campaign::new(client, "/t", &format!("m{i}"), 5 * SEC);
                go.wait();
                c.try_acquire().unwrap()
            })
        })
        .collect();
    let results: Vec<Elected> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<&Leader> = results
        .iter()
        .filter_map(|r| match r {
            Elected::Won(l) => Some(l),
            Elected::Lost(_) => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let leader = winners[0];
    for r in &results {
        if let Elected::Lost(h) = r {
            assert_eq!(h.id, leader.id());
            assert_eq!(h.lease, leader.lease());
        }
    }
    assert!(leader.may_act_for() > 3 * SEC);
    assert!(leader.keepalive().unwrap());
    // The losers' leases were revoked: only the leader's is left.
    let c = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "x", 5 * SEC);
    let h = c.holder().unwrap().unwrap();
    assert_eq!((h.id.as_str(), h.lease), (leader.id(), leader.lease()));
}

#[test]
fn etcd_resigned_leader_lets_the_other_win() {
    let etcd = Etcd::start("resign", 1);
    let a = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "a", 10 * SEC);
    let b = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "b", 10 * SEC);
    let la = won(a.try_acquire().unwrap());
    match b.try_acquire().unwrap() {
        Elected::Lost(h) => assert_eq!(h.id, "a"),
        Elected::Won(_) => panic!("two leaders"),
    }
    la.resign().unwrap();
    assert_eq!(la.may_act_for(), Duration::ZERO);
    assert!(!la.keepalive().unwrap());
    // No waiting for the TTL: the key went with the lease.
    let lb = won(b.try_acquire().unwrap());
    assert_eq!(lb.id(), "b");
    // Resigning twice, or a lease already gone, is no error.
    la.resign().unwrap();
}

#[test]
fn etcd_expired_lease_lets_the_other_win_after_the_old_leader_stopped_acting() {
    let etcd = Etcd::start("expire", 1);
    let a = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "a", 2 * SEC);
    let b = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "b", 2 * SEC);
    let start = Instant::now();
    let la = won(a.try_acquire().unwrap());
    assert_eq!(la.ttl(), 2 * SEC);
    // `a` stops renewing (a hung monitor); `b` keeps trying.
    let lb = loop {
        match b.try_acquire().unwrap() {
            Elected::Won(l) => break l,
            Elected::Lost(h) => {
                assert_eq!(h.id, "a");
                // While etcd still says `a` leads, `a` may or may not act;
                // once `b` wins below, `a` must long have stopped.
                assert!(start.elapsed() < 10 * SEC, "the lease never expired");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let took = start.elapsed();
    assert!(took >= 2 * SEC - Duration::from_millis(100), "{took:?}");
    // The old leader's own clock said stop before etcd let `b` in.
    assert_eq!(la.may_act_for(), Duration::ZERO);
    assert!(!la.keepalive().unwrap(), "a lease that expired was renewed");
    assert!(lb.may_act_for() > Duration::ZERO);
    println!("lease of 2 s expired and b won after {took:?}");
}

#[test]
fn etcd_stale_leader_fenced_save_fails_and_new_state_is_intact() {
    let etcd = Etcd::start("fenced", 1);
    let client = etcd.client(SEC);
    let store = Arc::new(EtcdStore::new(client.clone(), "/t"));
    let a = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "a", 10 * SEC);
    let b = clup::store::etcd::Campaign::new(etcd.client(SEC), "/t", "b", 10 * SEC);

    let la = Arc::new(won(a.try_acquire().unwrap()));
    assert_eq!(store.save_fenced(&doc(), &la).unwrap(), 1);
    let mut stale = store.load().unwrap();
    set_holder(&mut stale, "from stale a");

    // `a` is cut off; its lease ends behind its back (as at expiry) and
    // `b` is elected and writes.
    client.lease_revoke(la.lease()).unwrap();
    let lb = won(b.try_acquire().unwrap());
    let mut d = store.load().unwrap();
    set_holder(&mut d, "from b");
    assert_eq!(store.save_fenced(&d, &lb).unwrap(), 2);

    // The stale leader's save fails, whatever version it brings.
    let e = store.save_fenced(&stale, &la).unwrap_err();
    assert!(matches!(e, StoreError::NotLeader(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "a is no longer the leader (the leader key is held by 'b'); the save was refused"
    );
    assert_eq!(la.may_act_for(), Duration::ZERO, "a refused save stops a");
    stale.version = 2;
    assert!(matches!(
        store.save_fenced(&stale, &la),
        Err(StoreError::NotLeader(_))
    ));
    // Through the MetaStore a leading monitor is given: no retry loop.
    let fenced_a = FencedStore {
        store: store.clone(),
        leader: la.clone(),
    };
    match update(&fenced_a, |d| {
        set_holder(d, "from stale a");
        Ok(())
    }) {
        Err(UpdateError::Store(StoreError::NotLeader(_))) => {}
        other => panic!("{other:?}"),
    }
    let now = store.load().unwrap();
    assert_eq!((now.version, holder_of(&now)), (2, "from b"));

    // A leader with an old version gets a conflict, not a refusal.
    let mut old = now.clone();
    old.version = 1;
    assert!(matches!(
        store.save_fenced(&old, &lb),
        Err(StoreError::Conflict {
            expected: 1,
            found: 2
        })
    ));

    // Same id, new lease: `a` elected again, the old handle stays fenced
    // out (the compare is on the lease, not only the id).
    lb.resign().unwrap();
    let la2 = won(a.try_acquire().unwrap());
    assert_ne!(la2.lease(), la.lease());
    let e = store.save_fenced(&now, &la).unwrap_err();
    assert!(matches!(e, StoreError::NotLeader(_)), "{e:?}");
    let mut d = store.load().unwrap();
    set_holder(&mut d, "from a2");
    assert_eq!(store.save_fenced(&d, &la2).unwrap(), 3);
    // Nobody leads: refused too.
    la2.resign().unwrap();
    let e = store.save_fenced(&store.load().unwrap(), &la2).unwrap_err();
    assert!(e.to_string().contains("nobody holds the leader key"), "{e}");
    assert_eq!(holder_of(&store.load().unwrap()), "from a2");
}

#[test]
fn etcd_endpoint_failover_from_a_dead_first_endpoint() {
    let etcd = Etcd::start("failover", 1);
    let dead = format!("http://127.0.0.1:{}", free_port());
    // A long timeout: had the dead endpoint been waited for, it would show.
    let client = Arc::new(Client::new(&[dead.clone(), etcd.url(0)], 4 * SEC).unwrap());
    let store = EtcdStore::new(client.clone(), "/t");
    let t = Instant::now();
    assert_eq!(store.save(&doc()).unwrap(), 1);
    assert_eq!(store.load().unwrap().version, 1);
    // A refused connection costs no timeout: writes move on too (it was
    // never sent).
    assert!(t.elapsed() < 2 * SEC, "{:?}", t.elapsed());
    let c = clup::store::etcd::Campaign::new(client, "/t", "a", 5 * SEC);
    let l = won(c.try_acquire().unwrap());
    assert!(l.keepalive().unwrap());
    l.resign().unwrap();
}

#[test]
fn etcd_silent_endpoint_read_moves_on_write_reports_unknown_outcome() {
    let etcd = Etcd::start("silent", 1);
    // Takes connections (the kernel's backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let eps = [silent_url.clone(), etcd.url(0)];
    EtcdStore::new(etcd.client(SEC), "/t").save(&doc()).unwrap();

    // A read is safe to send again: after the timeout, the next endpoint.
    let store = EtcdStore::new(Arc::new(Client::new(&eps, SEC).unwrap()), "/t");
    let t = Instant::now();
    assert_eq!(store.load().unwrap().version, 1);
    let took = t.elapsed();
    assert!(took >= SEC && took < 2 * SEC, "{took:?}");
    // The endpoint that answered is asked first from then on (asking the
    // silent one again would take the whole timeout).
    let t = Instant::now();
    store.load().unwrap();
    assert!(t.elapsed() < SEC * 9 / 10, "{:?}", t.elapsed());

    // A write that was sent and not answered is not sent elsewhere: its
    // outcome is unknown, and the caller is told so within the timeout.
    let store = EtcdStore::new(Arc::new(Client::new(&eps, SEC).unwrap()), "/t");
    let mut d = EtcdStore::new(etcd.client(SEC), "/t").load().unwrap();
    set_holder(&mut d, "never");
    let t = Instant::now();
    let e = store.save(&d).unwrap_err();
    let took = t.elapsed();
    assert!(took < 2 * SEC, "{took:?}");
    assert!(matches!(e, StoreError::Remote(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&silent_url), "{msg}");
    assert!(msg.contains("whether it was applied is unknown"), "{msg}");
    let now = EtcdStore::new(etcd.client(SEC), "/t").load().unwrap();
    assert_eq!((now.version, holder_of(&now)), (1, ""));
    drop(silent);
}

#[test]
fn etcd_unreachable_is_a_clear_error_within_the_timeout() {
    let (p1, p2) = (free_port(), free_port());
    let eps = [
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    ];
    // Refused at once: no timeout is waited (4 s would show).
    let client = Arc::new(Client::new(&eps, 4 * SEC).unwrap());
    let store = EtcdStore::new(client.clone(), "/t");
    let t = Instant::now();
    let e = store.load().unwrap_err();
    assert!(t.elapsed() < 2 * SEC, "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(
        msg.starts_with("meta etcd key /t/meta: no etcd endpoint answered: "),
        "{msg}"
    );
    assert!(msg.contains(&eps[0]) && msg.contains(&eps[1]), "{msg}");
    assert!(store.save(&doc()).is_err());
    let c = clup::store::etcd::Campaign::new(client, "/t", "a", 5 * SEC);
    let e = c.try_acquire().unwrap_err();
    assert!(e.to_string().contains("no etcd endpoint answered"), "{e}");
    assert!(t.elapsed() < 2 * SEC, "{:?}", t.elapsed());
}

#[test]
fn etcd_quorum_loss_fails_writes_within_the_timeout() {
    let mut etcd = Etcd::start("quorum", 3);
    let client = etcd.client(SEC);
    let store = EtcdStore::new(client.clone(), "/t");
    store.save(&doc()).unwrap();
    let c = clup::store::etcd::Campaign::new(client.clone(), "/t", "a", 3 * SEC);
    let leader = won(c.try_acquire().unwrap());
    // One member down: still a quorum, once the two left have elected a
    // leader if the killed one led (a second or two on a loaded machine).
    etcd.kill(0);
    let mut loaded = None;
    assert!(
        wait_for(15, || {
            loaded = store.load().ok();
            loaded.is_some()
        }),
        "two of three members never answered"
    );
    let mut d = loaded.unwrap();
    set_holder(&mut d, "with two of three");
    assert_eq!(store.save_fenced(&d, &leader).unwrap(), 2);
    assert!(leader.keepalive().unwrap());

    // Two down: no quorum. Nothing hangs; every call fails within the
    // endpoints x timeout bound, saying why.
    etcd.kill(1);
    let bound = 3 * SEC + SEC / 2;
    let mut d = store.load().unwrap_or(d);
    set_holder(&mut d, "without quorum");
    let t = Instant::now();
    let e = store.save_fenced(&d, &leader).unwrap_err();
    let took = t.elapsed();
    assert!(took < bound, "{took:?}");
    println!("fenced save without quorum failed after {took:?}: {e}");
    assert!(matches!(e, StoreError::Remote(_)), "{e:?}");
    let t = Instant::now();
    let e = store.load().unwrap_err();
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
    assert!(e.to_string().contains("no etcd endpoint answered"), "{e}");
    let t = Instant::now();
    assert!(leader.keepalive().is_err());
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
    // Renewals fail, so the leader's time runs out by its own clock.
    assert!(leader.may_act_for() < 3 * SEC);
    assert!(
        wait_for(3, || leader.may_act_for() == Duration::ZERO),
        "a leader without quorum kept acting"
    );
}

#[test]
fn etcd_clupadm_init_and_clupserver_use_the_etcd_store() {
    let mut etcd = Etcd::start("cli", 1);
    let h = TestHome::new("etcd-cli");
    let port = free_port();
    h.write(
        "conf/clup.conf",
        &format!(
            "{}meta_store = etcd\netcd_endpoints = {}\netcd_prefix = /cli\n",
            sample_conf(port),
            etcd.url(0)
        ),
    );
    h.write("conf/init.json", SAMPLE_INIT);
    let out = h.run(&["adm", "init"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "into etcd /cli/meta at {} (version 1)",
            etcd.url(0)
        )),
        "{}",
        out.stdout
    );
    assert!(!h.root.join("data/meta.json").exists());
    let out = h.run(&["adm", "init"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);

    // A corrupt meta: refused, then set aside by --force.
    let client = etcd.client(SEC);
    client.put(b"/cli/meta", b"not json", 0).unwrap();
    let out = h.run(&["adm", "init"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("etcd key /cli/meta is corrupt"),
        "{}",
        out.stderr
    );
    let before = clup::now_secs();
    let out = h.run(&["adm", "init", "--force"]);
    assert_eq!(out.code, 0, "{out:?}");
    let aside = (before..=clup::now_secs())
        .find_map(|s| {
            client
                .get(format!("/cli/meta.corrupt.{s}").as_bytes())
                .unwrap()
        })
        .expect("the corrupt meta was set aside");
    assert_eq!(aside.value, b"not json");

    // The server runs on it.
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(h
        .read("logs/clupserver.log")
        .contains("Meta store: etcd /cli/meta"));
    let out = h.run(&["adm", "show"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("cluster01"), "{}", out.stdout);
    assert_eq!(h.run(&["server", "stop"]).code, 0);

    // Without etcd the server does not start, and says why, quickly.
    etcd.kill(0);
    let t = Instant::now();
    let out = h.run(&["server", "start"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("no etcd endpoint answered"),
        "{}",
        out.stderr
    );
    assert!(t.elapsed() < 3 * SEC, "{:?}", t.elapsed());
}

/// Two clupservers on one etcd: exactly one leads; a follower answers reads
/// and clupadm takes a write it refuses to the leader it names; when the
/// leader dies (kill -9) the follower takes over within about one lease.
#[test]
fn etcd_two_clupservers_one_leads_and_the_other_takes_over() {
    let etcd = Etcd::start("lead", 1);
    let conf = |port: u16| {
        format!(
            "{}meta_store = etcd\netcd_endpoints = {}\netcd_prefix = /lead\netcd_timeout = 1\nleader_ttl = 3\n",
            sample_conf(port),
            etcd.url(0)
        )
    };
    let homes: Vec<TestHome> = ["lead-a", "lead-b"]
        .iter()
        .map(|tag| {
            let h = TestHome::new(tag);
            h.write("conf/clup.conf", &conf(free_port()));
            h.write("conf/init.json", SAMPLE_INIT);
            h
        })
        .collect();
    assert_eq!(homes[0].run(&["adm", "init"]).code, 0);
    // Started at once.
    std::thread::scope(|s| {
        for h in &homes {
            s.spawn(move || assert_eq!(h.run(&["server", "start"]).code, 0));
        }
    });
    let log = |h: &TestHome| h.read("logs/clupserver.log");
    assert!(
        wait_for(10, || homes.iter().all(
            |h| log(h).contains("now leads") || log(h).contains("stands by")
        )),
        "a: {}\nb: {}",
        log(&homes[0]),
        log(&homes[1])
    );
    let leaders: Vec<usize> = (0..2)
        .filter(|&i| log(&homes[i]).contains("now leads"))
        .collect();
    assert_eq!(
        leaders.len(),
        1,
        "a: {}\nb: {}",
        log(&homes[0]),
        log(&homes[1])
    );
    let (lead, follow) = (&homes[leaders[0]], &homes[1 - leaders[0]]);

    // Reads from both; a write through the follower is refused, and names
    // the leader; nothing was written.
    for h in &homes {
        let out = h.run(&["adm", "show"]);
        assert_eq!(out.code, 0, "{out:?}");
        // Either one says who leads.
        assert!(out.stdout.contains("\nmonitor: "), "{}", out.stdout);
    }
    let role = |h: &TestHome| h.run(&["server", "status"]).stdout;
    assert!(
        wait_for(5, || role(lead).contains("Role: leader (")),
        "{}",
        role(lead)
    );
    assert!(
        role(follow).contains("Role: follower ("),
        "{}",
        role(follow)
    );
    let v: serde_json::Value =
        serde_json::from_str(&follow.run(&["adm", "show", "--json"]).stdout).unwrap();
    assert!(v["monitor"].as_str().unwrap().contains("; leader: "), "{v}");
    // A write through the follower goes to the leader it names.
    let out = follow.run(&["adm", "unfroze", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("does not lead; the leader is 127.0.0.1:"),
        "{}",
        out.stderr
    );
    let out = follow.run(&["adm", "froze", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    let shown = lead.run(&["adm", "show"]).stdout;
    assert!(shown.contains("Frozen"), "{shown}");

    // The leader dies; the follower takes over within the lease (3 s)
    // plus a campaign retry (1 s) and some slack.
    let pid = lead.read("run/clupserver.pid");
    let t = Instant::now();
    let rc = unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    assert!(
        wait_for(10, || log(follow).contains("now leads")),
        "the follower did not take over:\n{}",
        log(follow)
    );
    println!("takeover after the leader's kill -9: {:?}", t.elapsed());
    // Now it writes.
    let out = follow.run(&["adm", "unfroze", "-c", "cluster01"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(follow.run(&["adm", "froze", "-c", "cluster01"]).code, 0);
    assert_eq!(follow.run(&["server", "stop"]).code, 0);
    // A clean stop gives the lease back.
    let client = etcd.client(SEC);
    assert!(wait_for(5, || client
        .get(b"/lead/leader")
        .unwrap()
        .is_none()));
}
