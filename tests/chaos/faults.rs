//! Faults the lab's own commands do not make: cuts at the bridge in one
//! nft call (fast enough for a 1 s flap), random loss and rate limits
//! (nftables inside a host's netns), a slow link (htb + tbf: this kernel
//! has no netem), and SIGSTOP of postgres. All of them stay inside the
//! lab's namespaces, live in tables and qdiscs of our own (`chaos`), and
//! are removed by [`clear_all`] when a scenario ends, whatever happened.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::DB_HOSTS;
use crate::lab::{ip, Lab, LAB_DIR};

/// Our cuts (pairs of hosts), besides the lab's partitions file.
static CUTS: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

const ALL_HOSTS: [&str; 6] = ["mon", "pg01", "pg02", "pg03", "pg04", "cli"];

/// The db hosts cut off from `host` now: our cuts and the lab's partitions.
pub fn cut_from(host: &str) -> Vec<&'static str> {
    let lab = std::fs::read_to_string(format!("{LAB_DIR}/partitions")).unwrap_or_default();
    let ours = CUTS.lock().unwrap().clone();
    DB_HOSTS
        .into_iter()
        .filter(|h| {
            let key = |a: &str, b: &str| {
                let mut v = [a, b];
                v.sort();
                format!("{}-{}", v[0], v[1])
            };
            lab.lines().any(|l| l.trim() == key(h, host))
                || ours.contains(&(h.to_string(), host.to_string()))
                || ours.contains(&(host.to_string(), h.to_string()))
        })
        .collect()
}

fn nft(ns: &str, script: &str) {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft in {ns}:\n{script}");
}

fn run_quiet(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Cut `host` off from each of `others` at the bridge (frames both ways,
/// ARP included), in one nft call.
pub fn cut(host: &str, others: &[&str]) {
    let mut s = String::from(
        "add table bridge chaos\nadd chain bridge chaos forward { type filter hook forward priority -20; policy accept; }\n",
    );
    let mut cuts = CUTS.lock().unwrap();
    for o in others {
        s +=
            &format!("add rule bridge chaos forward iifname \"v-{host}\" oifname \"v-{o}\" drop\n");
        s +=
            &format!("add rule bridge chaos forward iifname \"v-{o}\" oifname \"v-{host}\" drop\n");
        cuts.insert((host.to_string(), o.to_string()));
    }
    nft("clab-br", &s);
}

/// Cut `host` off from every other lab host.
pub fn isolate(host: &str) {
    let others: Vec<&str> = ALL_HOSTS.into_iter().filter(|h| *h != host).collect();
    cut(host, &others);
}

/// Remove every cut made by [`cut`].
pub fn heal_cuts() {
    run_quiet(&[
        "ip", "netns", "exec", "clab-br", "nft", "delete", "table", "bridge", "chaos",
    ]);
    CUTS.lock().unwrap().clear();
}

/// In `host`'s netns, drop `pct`% of the packets to and from `peer`.
pub fn lossy(host: &str, peer: &str, pct: u32) {
    let p = ip(peer);
    nft(
        &format!("clab-{host}"),
        &format!(
            "add table inet chaos
add chain inet chaos input {{ type filter hook input priority -20; policy accept; }}
add chain inet chaos output {{ type filter hook output priority -20; policy accept; }}
add rule inet chaos input ip saddr {p} numgen random mod 100 < {pct} drop
add rule inet chaos output ip daddr {p} numgen random mod 100 < {pct} drop
"
        ),
    );
}

/// In `host`'s netns, drop what `from` sends beyond `kbytes` a second.
pub fn rate_limit_from(host: &str, from: &str, kbytes: u32) {
    let p = ip(from);
    nft(
        &format!("clab-{host}"),
        &format!(
            "add table inet chaos
add chain inet chaos input {{ type filter hook input priority -20; policy accept; }}
add rule inet chaos input ip saddr {p} limit rate over {kbytes} kbytes/second drop
"
        ),
    );
}

/// What `host` sends to `peer` goes through a tbf of `kbit` with a queue
/// of up to `latency_ms` (htb sorts that traffic into the slow class).
pub fn slow_link(host: &str, peer: &str, kbit: u32, latency_ms: u32) {
    let ns = format!("clab-{host}");
    let tc = |args: &str| {
        let mut all = vec!["ip", "netns", "exec", &ns, "tc"];
        all.extend(args.split_whitespace());
        assert!(run_quiet(&all), "tc {args} in {ns}");
    };
    tc("qdisc add dev eth0 root handle 1: htb default 10 r2q 100000");
    tc("class add dev eth0 parent 1: classid 1:10 htb rate 10gbit");
    tc("class add dev eth0 parent 1: classid 1:20 htb rate 10gbit");
    tc(&format!(
        "qdisc add dev eth0 parent 1:20 handle 20: tbf rate {kbit}kbit burst 4kb latency {latency_ms}ms"
    ));
    tc(&format!(
        "filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst {}/32 flowid 1:20",
        ip(peer)
    ));
}

/// Undo every fault of this module in every host (best effort: a host
/// that is powered off has nothing left to undo).
pub fn clear_all() {
    heal_cuts();
    for h in ALL_HOSTS {
        let ns = format!("clab-{h}");
        run_quiet(&[
            "ip", "netns", "exec", &ns, "nft", "delete", "table", "inet", "chaos",
        ]);
        run_quiet(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", "del", "dev", "eth0", "root",
        ]);
    }
}

/// kill -SIG every postgres process of `host` (the postmaster and its
/// children), or with `postmaster_only` the postmaster alone. CONT of a
/// server that is gone (fenced) is no error.
pub fn signal_postgres(lab: &Lab, host: &str, sig: &str, postmaster_only: bool) {
    let children = if postmaster_only {
        ""
    } else {
        " && { kill -SIG $(ps -o pid= --ppid $p) 2>/dev/null; true; }"
    };
    let script =
        format!("p=$(head -1 /var/lib/postgresql/pgdata/postmaster.pid) && kill -SIG $p{children}")
            .replace("SIG", sig);
    let out = lab.exec(host, &["sh", "-c", &script]);
    assert!(
        out.code == 0 || sig == "CONT",
        "kill -{sig} postgres on {host}: {out:?}"
    );
}

/// Where a scenario puts a db host's pg_wal: a tmpfs of its own.
const WAL_FS: &str = "/var/lib/postgresql/walfs";

/// A db host's pg_wal on a small filesystem of its own, as sites put it on
/// a volume of its own: more WAL than it holds fills the disk. Undone
/// when dropped, whatever happened (see [`wal_on_small_fs`]).
pub struct SmallWalFs {
    host: &'static str,
    /// An ext4 image on a loop device ([`wal_on_loop_fs`]), else a tmpfs.
    loop_dev: Option<(String, String)>,
}

/// Move `host`'s pg_wal onto a tmpfs `headroom_mb` larger than what it
/// holds now: postgres is stopped (fast) for the move and started again.
/// Run before clupserver starts ([`super::scenario::Scenario::start_with`]).
pub fn wal_on_small_fs(lab: &Lab, host: &'static str, headroom_mb: u64) -> SmallWalFs {
    let mount =
        format!("mount -t tmpfs -o size=$((used + {headroom_mb}))m,mode=0700 clup-walfs {WAL_FS}");
    move_wal(lab, host, &mount);
    SmallWalFs {
        host,
        loop_dev: None,
    }
}

/// `host`'s pg_wal on an ext4 filesystem of its own, on a loop device
/// (a 1 GB sparse image under the lab's directory): one that `fsfreeze`
/// can freeze, as a dying disk or a snapshot tool does.
pub fn wal_on_loop_fs(lab: &Lab, host: &'static str) -> SmallWalFs {
    let img = format!("{LAB_DIR}/walfs-{host}.img");
    let sh = |c: &str| {
        let o = Command::new("sh").args(["-c", c]).output().expect("sh");
        assert!(o.status.success(), "{c}: {o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    sh(&format!(
        "rm -f {img} && truncate -s 1G {img} && mkfs.ext4 -q -F {img}"
    ));
    let dev = sh(&format!("losetup -f --show {img}"));
    move_wal(lab, host, &format!("mount {dev} {WAL_FS}"));
    SmallWalFs {
        host,
        loop_dev: Some((dev, img)),
    }
}

/// Stop postgres on `host`, mount a filesystem at WAL_FS (`mount`, with
/// `$used`, the MB pg_wal holds now), move pg_wal there and start again.
fn move_wal(lab: &Lab, host: &str, mount: &str) {
    let script = format!(
        r#"set -e
cd /var/lib/postgresql/pgdata
runuser -u postgres -- {bin}/pg_ctl -D . stop -m fast -w >/dev/null
used=$(du -sm pg_wal | cut -f1)
mkdir -p {WAL_FS}
{mount}
cp -a pg_wal/. {WAL_FS}/
chown postgres:postgres {WAL_FS}
chmod 0700 {WAL_FS}
rm -rf pg_wal
ln -s {WAL_FS} pg_wal
echo "pg_wal on a filesystem of its own ($used MB used): $(df -m {WAL_FS} | tail -n 1)"
"#,
        bin = lab.pg_bin
    );
    let out = lab.exec(host, &["sh", "-c", &script]);
    assert_eq!(
        out.code, 0,
        "pg_wal onto a fs of its own on {host}: {out:?}"
    );
    eprintln!("{host}: {}", out.stdout.trim());
    lab.start_postgres(host);
}

impl SmallWalFs {
    /// fsfreeze the filesystem (freeze) or thaw it.
    pub fn freeze(&self, lab: &Lab, freeze: bool) {
        let flag = if freeze { "-f" } else { "-u" };
        let out = lab.exec(self.host, &["fsfreeze", flag, WAL_FS]);
        assert_eq!(out.code, 0, "fsfreeze {flag} on {}: {out:?}", self.host);
    }
}

impl Drop for SmallWalFs {
    /// pg_wal back on the host's own disk (postgres killed first if it
    /// still runs on the small one), and the tmpfs unmounted.
    fn drop(&mut self) {
        let script = format!(
            r#"fsfreeze -u {WAL_FS} 2>/dev/null
cd /var/lib/postgresql/pgdata || exit 0
if [ -L pg_wal ]; then
  p=$(head -1 postmaster.pid 2>/dev/null) && kill -9 $p 2>/dev/null && sleep 0.3
  rm pg_wal && mkdir -m 0700 pg_wal && cp -a {WAL_FS}/. pg_wal/ && chown postgres:postgres pg_wal
fi
mountpoint -q {WAL_FS} && umount -l {WAL_FS}
true
"#
        );
        let _ = Command::new(crate::lab::repo().join("scripts/lab"))
            .args(["exec", self.host, "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some((dev, img)) = &self.loop_dev {
            let _ = Command::new("sh")
                .args(["-c", &format!("losetup -d {dev}; rm -f {img}")])
                .status();
        }
    }
}
