//! Virtual IPs on database hosts: `ip addr` and `arping` over a [`Remote`].
//!
//! Owns: the scripts that add/delete a VIP (idempotent), announce it
//! (gratuitous ARP) and probe for another holder (ARP duplicate address
//! detection), and parsing `ip -o -4 addr show`. Must not: decide where a
//! VIP belongs, or run any of this on the monitor's own interfaces.
//!
//! arping is iputils' (`-U`, `-D`, `-c`, `-w`, `-I`), as on the database
//! hosts the manual describes.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::exec::cmd::CommandError;
use crate::exec::shell::quote;
use crate::exec::ssh::Remote;
use crate::exec::Error;

/// One IPv4 address of an interface, from `ip -o -4 addr show`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub secondary: bool,
}

/// Parse `ip -o -4 addr show` output:
/// `2: eth0    inet 192.168.56.41/24 brd 192.168.56.255 scope global eth0\ ...`.
/// Lines that do not parse are skipped.
pub fn parse_ip_addr(output: &str) -> Vec<IfAddr> {
    let mut out = Vec::new();
    for line in output.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(pos) = f.iter().position(|w| *w == "inet") else {
            continue;
        };
        if pos < 1 {
            continue;
        }
        // `eth0@if12` names a veth's peer; the interface is `eth0`.
        let ifname = f[pos - 1].split('@').next().unwrap_or("").to_string();
        let Some((addr, prefix)) = f.get(pos + 1).and_then(|c| c.split_once('/')) else {
            continue;
        };
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
            continue;
        };
        if prefix > 32 || ifname.is_empty() {
            continue;
        }
        out.push(IfAddr {
            ifname,
            addr,
            prefix,
            secondary: f[pos..].contains(&"secondary"),
        });
    }
    out
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Whether `addr/prefix` and `network` are in the same subnet (the
/// interface's prefix decides, since clup.conf's `network` has none).
pub fn in_network(addr: Ipv4Addr, prefix: u8, network: Ipv4Addr) -> bool {
    let m = mask(prefix);
    u32::from(addr) & m == u32::from(network) & m
}

/// The interface (and its prefix length) whose address lies in `network`,
/// preferring primary addresses over secondary ones and skipping /32s
/// (VIPs themselves).
pub fn pick_interface(addrs: &[IfAddr], network: Ipv4Addr) -> Option<(String, u8)> {
    let fits = |a: &&IfAddr| a.prefix < 32 && in_network(a.addr, a.prefix, network);
    addrs
        .iter()
        .filter(fits)
        .find(|a| !a.secondary)
        .or_else(|| addrs.iter().find(fits))
        .map(|a| (a.ifname.clone(), a.prefix))
}

const LIST_SCRIPT: &str = "ip -o -4 addr show";

fn timeout(remote: &dyn Remote) -> Duration {
    remote.connect_timeout() + Duration::from_secs(10)
}

/// Every IPv4 address of `host`.
/// An answer without a single address (every host has at least
/// 127.0.0.1) is an error, never "the VIP is not here".
pub fn addresses(remote: &dyn Remote, host: &str) -> Result<Vec<IfAddr>, CommandError> {
    let out = remote.run_script(host, LIST_SCRIPT, LIST_SCRIPT, None, timeout(remote))?;
    let addrs = parse_ip_addr(&out.stdout);
    if addrs.is_empty() {
        return Err(no_addresses(remote, host, LIST_SCRIPT, &out.stdout));
    }
    Ok(addrs)
}

fn no_addresses(remote: &dyn Remote, host: &str, label: &str, stdout: &str) -> CommandError {
    CommandError::Io {
        what: remote.describe(host, label),
        err: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "no IPv4 address in the output of ip -o -4 addr show: '{}'",
                stdout.trim().chars().take(120).collect::<String>()
            ),
        ),
    }
}

/// The device of `ip -o -4 route get ADDR` output
/// (`192.168.56.40 dev eth0 src 192.168.56.41 uid 0 \    cache`).
pub fn parse_route_dev(output: &str) -> Option<String> {
    let f: Vec<&str> = output.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "dev")?;
    f.get(i + 1)
        .map(|d| d.split('@').next().unwrap_or(d).to_string())
}

/// Where a VIP goes on a host: the interface whose address lies in
/// `network` ([`pick_interface`]); if none does, the interface the host
/// routes the VIP through (`route_dev`, from `ip route get VIP`), with its
/// primary address's prefix. The flag says the fallback was taken.
pub fn choose_interface(
    addrs: &[IfAddr],
    network: Ipv4Addr,
    route_dev: Option<&str>,
) -> Option<(String, u8, bool)> {
    if let Some((n, p)) = pick_interface(addrs, network) {
        return Some((n, p, false));
    }
    let dev = route_dev.filter(|d| *d != "lo")?;
    let on_dev: Vec<&IfAddr> = addrs
        .iter()
        .filter(|a| a.ifname == dev && a.prefix < 32)
        .collect();
    let a = on_dev
        .iter()
        .find(|a| !a.secondary)
        .or_else(|| on_dev.first())?;
    Some((a.ifname.clone(), a.prefix, true))
}

/// Hosts already warned about (see [`find_interface`]): once is enough.
static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The interface of `host` for `vip`, and its prefix length: the one in
/// `network`, else (warning once per host) the one that routes to `vip`,
/// so that a `network` that does not fit the hosts does not fail a
/// failover.
pub fn find_interface(
    remote: &dyn Remote,
    host: &str,
    network: Ipv4Addr,
    vip: Ipv4Addr,
) -> Result<(String, u8), Error> {
    let addrs = addresses(remote, host)?;
    if let Some((n, p)) = pick_interface(&addrs, network) {
        return Ok((n, p));
    }
    let script = format!("ip -o route get {vip}");
    let out = remote.run_script(host, &script, &script, None, timeout(remote))?;
    let dev = parse_route_dev(&out.stdout);
    match choose_interface(&addrs, network, dev.as_deref()) {
        Some((n, p, _)) => {
            let mut w = WARNED.lock().unwrap_or_else(|p| p.into_inner());
            if !w.iter().any(|h| h == host) {
                w.push(host.to_string());
                log::warn!(
                    "host {host} has no interface with an address in network {network} (clup.conf); using {n}, its route to {vip}"
                );
            }
            Ok((n, p))
        }
        None => Err(Error::Other(format!(
            "host {host} has no interface with an address in network {network}, nor a route to {vip} through one"
        ))),
    }
}

/// Whether `host` has `vip` on any interface.
pub fn holds(remote: &dyn Remote, host: &str, vip: Ipv4Addr) -> Result<bool, CommandError> {
    Ok(addresses(remote, host)?.iter().any(|a| a.addr == vip))
}

/// The marker line the add script prints when the announcement failed.
const ARPING_FAILED: &str = "clup-arping-failed";

/// Add `vip/32` on `ifname` (already there = fine), then announce it with
/// one gratuitous ARP. A failed announcement prints a marker line and still
/// exits 0.
pub fn add_script(vip: Ipv4Addr, ifname: &str) -> String {
    format!(
        r#"vip={vip}; dev={dev}
if ! out=$(ip addr add "$vip/32" dev "$dev" 2>&1); then
  case $out in
    *"File exists"*|*"already assigned"*) ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
# Announce in the background: the address is usable now, and waiting for
# arping (about 1 s) would only lengthen the failover.
command -v arping >/dev/null 2>&1 || echo "{marker} arping not found"
(arping -U -c 2 -I "$dev" "$vip" </dev/null >/dev/null 2>&1 &)
exit 0
"#,
        vip = quote(&vip.to_string()),
        dev = quote(ifname),
        marker = ARPING_FAILED,
    )
}

/// Remove `vip` from every interface that has it (with any prefix); absent
/// = fine.
pub fn delete_script(vip: Ipv4Addr) -> String {
    format!(
        r#"vip={vip}
ip -o -4 addr show | while read -r _ dev _ cidr _; do
  case $cidr in
    "$vip"/*) ip addr del "$cidr" dev "${{dev%@*}}" || exit 1 ;;
  esac
done
"#,
        vip = quote(&vip.to_string()),
    )
}

/// Duplicate address detection: exit 0 = nobody answered, 1 = somebody has
/// `vip`, anything else = arping could not ask.
pub fn dad_script(ifname: &str, vip: Ipv4Addr, wait: Duration) -> String {
    // timeout's 124 (no answer within the wait) means free, as arping's 0.
    format!(
        "timeout {} arping -D -c 1 -w 1 -I {} {}\nrc=$?; [ $rc = 124 ] && rc=0; exit $rc\n",
        crate::exec::shell::short_wait(wait),
        quote(ifname),
        quote(&vip.to_string())
    )
}

/// What one ssh call to a host saw: its addresses, the duplicate-address
/// probe for a VIP on the interface that routes to it, and optionally
/// whether it reaches a peer's port. See [`look`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Look {
    pub addrs: Vec<IfAddr>,
    /// The interface probed and whether another host answered for the VIP;
    /// None when no probe ran (the host routes the VIP to itself, or no
    /// route) or arping failed.
    pub dad: Option<(String, bool)>,
    /// `Some(reached)` when a peer was asked about.
    pub peer: Option<bool>,
}

/// Script for [`look`]. The peer check runs in the background beside the
/// DAD probe, so the whole takes one wait, not two.
pub fn look_script(vip: Ipv4Addr, peer: Option<(&str, u16)>, wait: Duration) -> String {
    let w = crate::exec::shell::short_wait(wait);
    let mut s = format!("vip={}\n", quote(&vip.to_string()));
    if let Some((host, port)) = peer {
        s.push_str(&format!(
            "{{ if timeout {w} bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' clup-peer {} {} 2>/dev/null; then echo 'clup-peer open'; else echo 'clup-peer closed'; fi; }} &\n",
            quote(host),
            quote(&port.to_string())
        ));
    }
    s.push_str(&format!(
        r#"dev=$(ip -o route get "$vip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
case $dev in
  ''|lo) ;;
  *) timeout {w} arping -D -c 1 -w 1 -I "$dev" "$vip" >/dev/null 2>&1; rc=$?
     [ $rc = 124 ] && rc=0
     echo "clup-dad $dev $rc" ;;
esac
ip -o -4 addr show
wait
"#
    ));
    s
}

/// Parse what [`look_script`] printed.
pub fn parse_look(out: &str) -> Look {
    let mut look = Look {
        addrs: parse_ip_addr(out),
        ..Look::default()
    };
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["clup-peer", "open"] => look.peer = Some(true),
            ["clup-peer", "closed"] => look.peer = Some(false),
            ["clup-dad", dev, "0"] => look.dad = Some((dev.to_string(), false)),
            ["clup-dad", dev, "1"] => look.dad = Some((dev.to_string(), true)),
            _ => {}
        }
    }
    look
}

/// From `host`, in one ssh call: its addresses, whether another machine
/// answers ARP for `vip`, and, if `peer` is given, whether `host` can open
/// a TCP connection to it. The probes wait min(ssh_connect_timeout, 1 s).
pub fn look(
    remote: &dyn Remote,
    host: &str,
    vip: Ipv4Addr,
    peer: Option<(&str, u16)>,
) -> Result<Look, CommandError> {
    look_within(remote, host, vip, peer, remote.connect_timeout())
}

/// [`look`], its ARP probe and peer check bounded by `wait` (at most 1 s):
/// the last look before a promotion waits no longer than its own budget
/// (an ARP answer on a LAN takes milliseconds).
pub fn look_within(
    remote: &dyn Remote,
    host: &str,
    vip: Ipv4Addr,
    peer: Option<(&str, u16)>,
    wait: Duration,
) -> Result<Look, CommandError> {
    let label = match peer {
        Some((h, p)) => format!("who has {vip}, can {h}:{p} be reached from here"),
        None => format!("who has {vip}"),
    };
    let script = look_script(vip, peer, wait);
    let out = remote.run_script(host, &label, &script, None, timeout(remote))?;
    let look = parse_look(&out.stdout);
    if look.addrs.is_empty() {
        return Err(no_addresses(remote, host, &label, &out.stdout));
    }
    Ok(look)
}

/// Who has `vip`, seen from `host` by [`look`]: `Ok(Some(true))` another
/// machine answers ARP for it, `Ok(Some(false))` nobody does, `Ok(None)`
/// `host` holds it itself. The probe must have run on the interface in
/// `network` (or, if none is, on the route to the VIP); if the route
/// pointed elsewhere, it is run again there.
pub fn answered_from(
    remote: &dyn Remote,
    host: &str,
    vip: Ipv4Addr,
    network: Ipv4Addr,
    look: &Look,
) -> Result<Option<bool>, Error> {
    if look.addrs.iter().any(|a| a.addr == vip) {
        return Ok(None);
    }
    // Not in network: the interface the probe took, the route to the VIP.
    let route = look.dad.as_ref().map(|(dev, _)| dev.as_str());
    let (ifname, _, _) = choose_interface(&look.addrs, network, route).ok_or_else(|| {
        Error::Other(format!(
            "host {host} has no interface with an address in network {network}, nor a route to {vip} through one"
        ))
    })?;
    match &look.dad {
        Some((dev, answered)) if *dev == ifname => Ok(Some(*answered)),
        _ => held_by_other(remote, host, &ifname, vip).map(Some),
    }
}

/// Put `vip` on `host`'s `ifname` and announce it. An announcement that
/// fails is logged, not an error: the address is up.
pub fn add(remote: &dyn Remote, host: &str, vip: Ipv4Addr, ifname: &str) -> Result<(), Error> {
    let out = remote.run_script(
        host,
        &format!("ip addr add {vip}/32 dev {ifname}"),
        &add_script(vip, ifname),
        None,
        timeout(remote),
    )?;
    if let Some(line) = out.stdout.lines().find(|l| l.starts_with(ARPING_FAILED)) {
        log::warn!(
            "host {host}: vip {vip} added on {ifname}, but arping -U failed: {}",
            line[ARPING_FAILED.len()..].trim()
        );
    }
    Ok(())
}

/// Remove `vip` from `host`, wherever it is.
pub fn delete(remote: &dyn Remote, host: &str, vip: Ipv4Addr) -> Result<(), Error> {
    remote.run_script(
        host,
        &format!("ip addr del {vip}"),
        &delete_script(vip),
        None,
        timeout(remote),
    )?;
    Ok(())
}

/// Ask, from `via_host` (which must not hold `vip` itself), whether any
/// machine on `ifname`'s link answers ARP for `vip`.
pub fn held_by_other(
    remote: &dyn Remote,
    via_host: &str,
    ifname: &str,
    vip: Ipv4Addr,
) -> Result<bool, Error> {
    let label = format!("arping -D {vip} on {ifname}");
    let out = remote.run_script_unchecked(
        via_host,
        &label,
        &dad_script(ifname, vip, remote.connect_timeout()),
        None,
        timeout(remote) + Duration::from_secs(2),
    )?;
    match out.code {
        0 => Ok(false),
        1 => Ok(true),
        code => Err(CommandError::Failed {
            what: remote.describe(via_host, &label),
            code,
            stderr: out.stderr,
            stdout: out.stdout,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cmd::{self, Output};
    use std::path::PathBuf;

    const SAMPLE: &str = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global dynamic eth0\\       valid_lft 86066sec preferred_lft 86066sec
3: eth1    inet 192.168.56.41/24 brd 192.168.56.255 scope global eth1\\       valid_lft forever preferred_lft forever
3: eth1    inet 192.168.56.40/32 scope global eth1\\       valid_lft forever preferred_lft forever
3: eth1    inet 192.168.56.45/24 scope global secondary eth1\\       valid_lft forever preferred_lft forever
7: veth1@if6    inet 172.20.0.2/16 brd 172.20.255.255 scope global veth1\\       valid_lft forever preferred_lft forever
garbage line
8: bad    inet 300.1.1.1/24 scope global bad
";

    #[test]
    fn parses_ip_addr_output() {
        let a = parse_ip_addr(SAMPLE);
        assert_eq!(a.len(), 6);
        assert_eq!(
            a[2],
            IfAddr {
                ifname: "eth1".into(),
                addr: Ipv4Addr::new(192, 168, 56, 41),
                prefix: 24,
                secondary: false
            }
        );
        assert!(a[4].secondary);
        assert_eq!(a[5].ifname, "veth1");
        assert!(parse_ip_addr("").is_empty());
    }

    #[test]
    fn picks_the_interface_in_the_network() {
        let a = parse_ip_addr(SAMPLE);
        let net = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            pick_interface(&a, net("192.168.56.0")),
            Some(("eth1".into(), 24))
        );
        // Any address in the subnet names it, as clup.conf's network may.
        assert_eq!(
            pick_interface(&a, net("192.168.56.77")),
            Some(("eth1".into(), 24))
        );
        assert_eq!(
            pick_interface(&a, net("10.0.2.0")),
            Some(("eth0".into(), 24))
        );
        assert_eq!(
            pick_interface(&a, net("172.20.9.9")),
            Some(("veth1".into(), 16))
        );
        assert_eq!(pick_interface(&a, net("192.168.57.0")), None);
        // Only a secondary address in the network: still usable.
        let only_secondary =
            parse_ip_addr("3: eth1    inet 192.168.9.45/24 scope global secondary eth1\\ x\n");
        assert_eq!(
            pick_interface(&only_secondary, net("192.168.9.0")),
            Some(("eth1".into(), 24))
        );
        // A lone /32 (a VIP) does not make an interface part of a network.
        let vip_only = parse_ip_addr("3: eth1    inet 192.168.9.40/32 scope global eth1\n");
        assert_eq!(pick_interface(&vip_only, net("192.168.9.40")), None);
        assert!(in_network(net("10.1.2.3"), 0, net("192.168.0.0")));
        assert!(!in_network(net("10.1.2.3"), 32, net("10.1.2.4")));
    }

    #[test]
    fn scripts_quote_values() {
        let s = add_script(Ipv4Addr::new(192, 168, 56, 40), "eth1");
        assert!(s.starts_with("vip=192.168.56.40; dev=eth1\n"), "{s}");
        let s = add_script(Ipv4Addr::new(192, 168, 56, 40), "eth1;reboot");
        assert!(
            s.starts_with("vip=192.168.56.40; dev='eth1;reboot'\n"),
            "{s}"
        );
        assert_eq!(
            dad_script("eth1", Ipv4Addr::new(10, 0, 0, 9), Duration::from_secs(3)),
            "timeout 1 arping -D -c 1 -w 1 -I eth1 10.0.0.9\nrc=$?; [ $rc = 124 ] && rc=0; exit $rc\n"
        );
    }

    /// Runs scripts with the local sh, with fake `ip` and `arping` first on
    /// the PATH: they print canned output and log their arguments, so the
    /// scripts' logic runs for real and no interface is touched.
    struct FakeHost {
        dir: PathBuf,
    }

    impl FakeHost {
        fn new(name: &str, ip_list: &str, add_result: &str, arping_rc: i32) -> FakeHost {
            use std::os::unix::fs::PermissionsExt;
            let dir = std::env::temp_dir().join(format!("clup-vip-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("list"), ip_list).unwrap();
            let log = dir.join("calls").display().to_string();
            let list = dir.join("list").display().to_string();
            std::fs::write(
                dir.join("route"),
                "192.168.56.50 dev eth1 src 192.168.56.41 uid 0 \\    cache \n",
            )
            .unwrap();
            let route = dir.join("route").display().to_string();
            let ip = format!(
                "#!/bin/sh\necho \"ip $*\" >> {log}\n\
                 case \"$1 $2\" in\n\
                 '-o -4') cat {list} ;;\n\
                 'addr add') {add_result} ;;\n\
                 'addr del') exit 0 ;;\n\
                 '-o route') cat {route} ;;\n\
                 esac\n"
            );
            // 99: arping that never ends (nobody answers, no deadline).
            let arping = format!(
                "#!/bin/sh\necho \"arping $*\" >> {log}\necho 'arping says hi' >&2\n[ {arping_rc} = 99 ] && exec sleep 10\nexit {arping_rc}\n"
            );
            for (n, body) in [("ip", ip), ("arping", arping)] {
                let p = dir.join(n);
                std::fs::write(&p, body).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            FakeHost { dir }
        }

        fn calls(&self) -> String {
            std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default()
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Remote for FakeHost {
        fn run_script_unchecked(
            &self,
            host: &str,
            _label: &str,
            script: &str,
            stdin: Option<&[u8]>,
            timeout: Duration,
        ) -> Result<Output, CommandError> {
            assert_eq!(host, "fakehost");
            let path = format!("PATH={}:/usr/bin:/bin", self.dir.display());
            cmd::run_unchecked(
                "fake",
                "env",
                &[path, "sh".into(), "-c".into(), script.into()],
                stdin,
                timeout,
            )
        }
        fn describe(&self, host: &str, label: &str) -> String {
            format!("fake {host}: {label}")
        }
        fn connect_timeout(&self) -> Duration {
            Duration::from_secs(1)
        }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 40);

    #[test]
    fn add_is_idempotent_and_arping_failure_is_not_fatal() {
        let h = FakeHost::new("add", SAMPLE, "exit 0", 0);
        add(&h, "fakehost", VIP, "eth1").unwrap();
        // The announcement runs in the background: wait for it to be recorded.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !h.calls().contains("arping") && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            h.calls(),
            "ip addr add 192.168.56.40/32 dev eth1\narping -U -c 2 -I eth1 192.168.56.40\n"
        );
        let h = FakeHost::new(
            "add2",
            SAMPLE,
            "echo 'RTNETLINK answers: File exists' >&2; exit 2",
            2,
        );
        add(&h, "fakehost", VIP, "eth1").unwrap();
        let h = FakeHost::new(
            "add3",
            SAMPLE,
            "echo 'Cannot find device \"eth9\"' >&2; exit 1",
            0,
        );
        let e = add(&h, "fakehost", VIP, "eth9").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("fake fakehost: ip addr add 192.168.56.40/32 dev eth9: exited with code 1:\nCannot find device"),
            "{e}"
        );
        assert!(!h.calls().contains("arping"));
    }

    #[test]
    fn delete_removes_every_copy_and_absent_is_fine() {
        let h = FakeHost::new("del", SAMPLE, "exit 0", 0);
        delete(&h, "fakehost", VIP).unwrap();
        assert_eq!(
            h.calls(),
            "ip -o -4 addr show\nip addr del 192.168.56.40/32 dev eth1\n"
        );
        let h = FakeHost::new("del2", SAMPLE, "exit 0", 0);
        delete(&h, "fakehost", Ipv4Addr::new(172, 20, 0, 2)).unwrap();
        assert!(
            h.calls().ends_with("ip addr del 172.20.0.2/16 dev veth1\n"),
            "{}",
            h.calls()
        );
        let h = FakeHost::new("del3", SAMPLE, "exit 0", 0);
        delete(&h, "fakehost", Ipv4Addr::new(192, 168, 56, 4)).unwrap();
        assert_eq!(h.calls(), "ip -o -4 addr show\n");
    }

    #[test]
    fn holds_and_find_interface() {
        let h = FakeHost::new("holds", SAMPLE, "exit 0", 0);
        assert!(holds(&h, "fakehost", VIP).unwrap());
        assert!(!holds(&h, "fakehost", Ipv4Addr::new(192, 168, 56, 4)).unwrap());
        assert_eq!(
            find_interface(&h, "fakehost", Ipv4Addr::new(192, 168, 56, 0), VIP).unwrap(),
            ("eth1".to_string(), 24)
        );
        assert!(!h.calls().contains("route get"), "{}", h.calls());
        // No address in network: the interface that routes to the VIP.
        assert_eq!(
            find_interface(&h, "fakehost", Ipv4Addr::new(10, 9, 9, 0), VIP).unwrap(),
            ("eth1".to_string(), 24)
        );
        assert!(
            h.calls().contains("ip -o route get 192.168.56.40"),
            "{}",
            h.calls()
        );
        // Nothing routes it through an interface with an address.
        let lo = FakeHost::new(
            "holds-lo",
            "1: lo    inet 127.0.0.1/8 scope host lo\n",
            "exit 0",
            0,
        );
        let e = find_interface(&lo, "fakehost", Ipv4Addr::new(10, 9, 9, 0), VIP).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host fakehost has no interface with an address in network 10.9.9.0, nor a route to 192.168.56.40 through one"
        );
    }

    #[test]
    fn the_vip_goes_on_the_network_interface_else_on_its_route() {
        let addrs = parse_ip_addr(SAMPLE);
        let net = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // In network: that interface, whatever the route says.
        assert_eq!(
            choose_interface(&addrs, net("192.168.56.0"), Some("eth0")),
            Some(("eth1".to_string(), 24, false))
        );
        // Not in network (the manual's sample 192.168.0.0 with hosts in
        // 192.168.56.x): the routed interface, with its prefix.
        assert_eq!(
            choose_interface(&addrs, net("192.168.0.0"), Some("eth1")),
            Some(("eth1".to_string(), 24, true))
        );
        assert_eq!(
            choose_interface(&addrs, net("192.168.0.0"), Some("veth1")),
            Some(("veth1".to_string(), 16, true))
        );
        // No route, a route through lo, or through a device without an
        // address: no interface.
        assert_eq!(choose_interface(&addrs, net("192.168.0.0"), None), None);
        assert_eq!(
            choose_interface(&addrs, net("192.168.0.0"), Some("lo")),
            None
        );
        assert_eq!(
            choose_interface(&addrs, net("192.168.0.0"), Some("eth9")),
            None
        );
        assert_eq!(
            parse_route_dev("192.168.56.40 dev eth1 src 192.168.56.41 uid 0 \\    cache \n"),
            Some("eth1".to_string())
        );
        assert_eq!(
            parse_route_dev("10.0.0.1 via 10.0.2.2 dev veth1@if6 src 10.0.2.15"),
            Some("veth1".to_string())
        );
        assert_eq!(
            parse_route_dev("RTNETLINK answers: Network is unreachable"),
            None
        );
    }

    #[test]
    fn duplicate_detection_reads_arping_exit_code() {
        let free = FakeHost::new("dad0", SAMPLE, "exit 0", 0);
        assert!(!held_by_other(&free, "fakehost", "eth1", VIP).unwrap());
        assert!(free
            .calls()
            .contains("arping -D -c 1 -w 1 -I eth1 192.168.56.40"));
        let taken = FakeHost::new("dad1", SAMPLE, "exit 0", 1);
        assert!(held_by_other(&taken, "fakehost", "eth1", VIP).unwrap());
        let broken = FakeHost::new("dad2", SAMPLE, "exit 0", 2);
        let e = held_by_other(&broken, "fakehost", "eth1", VIP).unwrap_err();
        assert!(e.to_string().contains("arping says hi"), "{e}");
    }

    const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 50);
    const NET: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 0);

    #[test]
    fn look_probes_the_routed_interface_in_one_call() {
        let free = FakeHost::new("look0", SAMPLE, "exit 0", 0);
        let l = look(&free, "fakehost", OTHER_VIP, None).unwrap();
        assert_eq!(l.dad, Some(("eth1".to_string(), false)));
        assert_eq!(l.peer, None);
        assert_eq!(l.addrs, parse_ip_addr(SAMPLE));
        assert_eq!(
            answered_from(&free, "fakehost", OTHER_VIP, NET, &l).unwrap(),
            Some(false)
        );
        assert_eq!(
            free.calls().matches("arping").count(),
            1,
            "{}",
            free.calls()
        );

        let taken = FakeHost::new("look1", SAMPLE, "exit 0", 1);
        let l = look(&taken, "fakehost", OTHER_VIP, None).unwrap();
        assert_eq!(
            answered_from(&taken, "fakehost", OTHER_VIP, NET, &l).unwrap(),
            Some(true)
        );

        // The host has the VIP itself: no probe, and "held here".
        let held = FakeHost::new("look2", SAMPLE, "exit 0", 1);
        std::fs::write(
            held.dir.join("route"),
            "local 192.168.56.40 dev lo table local src 192.168.56.40 uid 0\n",
        )
        .unwrap();
        let l = look(&held, "fakehost", VIP, None).unwrap();
        assert_eq!(l.dad, None);
        assert_eq!(
            answered_from(&held, "fakehost", VIP, NET, &l).unwrap(),
            None
        );
        assert!(!held.calls().contains("arping"), "{}", held.calls());

        // Routed out of another interface than the network's: probed again on eth1.
        let odd = FakeHost::new("look3", SAMPLE, "exit 0", 0);
        std::fs::write(
            odd.dir.join("route"),
            "192.168.56.50 via 10.0.0.1 dev veth1 src 172.20.0.2\n",
        )
        .unwrap();
        let l = look(&odd, "fakehost", OTHER_VIP, None).unwrap();
        assert_eq!(l.dad, Some(("veth1".to_string(), false)));
        assert_eq!(
            answered_from(&odd, "fakehost", OTHER_VIP, NET, &l).unwrap(),
            Some(false)
        );
        assert!(
            odd.calls()
                .contains("arping -D -c 1 -w 1 -I eth1 192.168.56.50"),
            "{}",
            odd.calls()
        );

        // No interface in network: the probe on the route (veth1) answers.
        let before = odd.calls().matches("arping").count();
        assert_eq!(
            answered_from(&odd, "fakehost", OTHER_VIP, Ipv4Addr::new(10, 9, 9, 0), &l).unwrap(),
            Some(false)
        );
        assert_eq!(odd.calls().matches("arping").count(), before);
        // Nor a route through an interface with an address: an error.
        let none = Look {
            addrs: parse_ip_addr("1: lo    inet 127.0.0.1/8 scope host lo\n"),
            dad: None,
            peer: None,
        };
        let e = answered_from(
            &odd,
            "fakehost",
            OTHER_VIP,
            Ipv4Addr::new(10, 9, 9, 0),
            &none,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("no interface with an address in network 10.9.9.0, nor a route"),
            "{e}"
        );
    }

    #[test]
    fn look_asks_the_peer_beside_the_probe_and_bounds_a_silent_arping() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap().port();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // arping never returns: the wait (1 s here) ends it, and that means free.
        let h = FakeHost::new("look4", SAMPLE, "exit 0", 99);
        let started = std::time::Instant::now();
        let got = look(&h, "fakehost", OTHER_VIP, Some(("127.0.0.1", open))).unwrap();
        let took = started.elapsed();
        assert_eq!(got.peer, Some(true));
        assert_eq!(got.dad, Some(("eth1".to_string(), false)));
        assert!(took < Duration::from_millis(2500), "took {took:?}");
        let got = look(&h, "fakehost", OTHER_VIP, Some(("127.0.0.1", closed))).unwrap();
        assert_eq!(got.peer, Some(false));
        assert!(look_script(
            OTHER_VIP,
            Some(("10.0.0.1;reboot", 5432)),
            Duration::from_millis(400)
        )
        .contains(
            "timeout 0.4 bash -c 'exec 3<>\"/dev/tcp/$1/$2\"' clup-peer '10.0.0.1;reboot' 5432"
        ));
        drop(l);
    }

    #[test]
    fn an_answer_without_addresses_is_an_error_not_an_absent_vip() {
        let h = FakeHost::new("empty", "", "exit 0", 0);
        let e = holds(&h, "fakehost", VIP).unwrap_err();
        assert!(
            e.to_string().contains("no IPv4 address in the output"),
            "{e}"
        );
        let e = look(&h, "fakehost", VIP, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("fake fakehost: who has 192.168.56.40: no IPv4 address"),
            "{e}"
        );
    }
}
