//! Does the server take a new session? A probe's kept session can go on
//! answering while the postmaster accepts no new connection (a stopped
//! postmaster, one stuck on a frozen disk): every client that connects
//! anew then fails while the probe says "ok". So beside each probe a new
//! connection is opened and its startup packet sent ([`wire::handshake`]),
//! on a thread of the probe pool and within the probe's own deadline: no
//! extra wait on a dead host.
//!
//! One answered handshake per server serves every probe of it for
//! `fresh` (the probe interval): cluster entries sharing an instance make
//! one, not one each. An unanswered one is never reused.
//!
//! Owns: the handshake's bookkeeping and how its outcome changes a probe.
//! Must not: decide anything about the server (ha does, from `stalled`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::exec::pg::DbProbe;
use crate::exec::pool;
use crate::exec::wire::{self, Deadline, Handshake};

/// When each server (host:port) last answered a handshake, and whether one
/// is in flight now (since when).
#[derive(Default)]
struct Seen {
    answered: Option<Instant>,
    in_flight: Option<Instant>,
    /// The last probe of it got no answer in time: the next one asks anew,
    /// whatever answered before (that answer may predate a power-off).
    timed_out: bool,
}

static SERVERS: Mutex<BTreeMap<String, Seen>> = Mutex::new(BTreeMap::new());

/// A handshake started beside a probe, if one was needed.
pub struct Pending {
    key: String,
    rx: Option<Receiver<Handshake>>,
}

/// Start a handshake with the server of `params` unless one answered within
/// `fresh` or one is in flight.
pub fn start(params: &wire::Params, what: &str, deadline: Deadline, fresh: Duration) -> Pending {
    let key = format!("{}:{}", params.host, params.port);
    let now = Instant::now();
    {
        let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
        let seen = servers.entry(key.clone()).or_default();
        let recent = |t: Option<Instant>, within: Duration| {
            t.is_some_and(|t| now.saturating_duration_since(t) < within)
        };
        if (recent(seen.answered, fresh) && !seen.timed_out)
            || recent(seen.in_flight, deadline.limit)
        {
            return Pending { key, rx: None };
        }
        seen.in_flight = Some(now);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (params, what) = (params.clone(), what.to_string());
    pool::probes().run(move || {
        let _ = tx.send(wire::handshake(&params, &what, deadline));
    });
    Pending { key, rx: Some(rx) }
}

/// The probe `p`, with what the handshake showed: a server that stalls on
/// a new connection is not ok, whatever its kept session said, and is
/// marked `stalled` (its postmaster lives but does not serve); one that
/// refuses new connections while a kept session works is not ok either.
///
/// A server that answers a new session while the probe's own statements
/// got no answer in time (the probe writes: its commit waits on a WAL
/// disk that is frozen or dying) is `stalled` too: the link between them
/// just carried a whole handshake, so it is not the network.
pub fn judge(mut p: DbProbe, pending: Pending, deadline: Deadline) -> DbProbe {
    let timed_out = !p.ok && p.error.contains("no answer within");
    let Some(rx) = pending.rx else {
        // An earlier answer stood for this probe: it tells nothing of a
        // timeout now (the host may have died since); the next probe asks.
        let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
        servers.entry(pending.key).or_default().timed_out = timed_out;
        return p;
    };
    // The handshake ends by the same deadline; a little slack for its thread.
    let outcome = rx
        .recv_deadline(deadline.at + Duration::from_millis(50))
        .ok();
    let mut servers = SERVERS.lock().unwrap_or_else(|e| e.into_inner());
    let seen = servers.entry(pending.key).or_default();
    seen.in_flight = None;
    seen.timed_out = timed_out;
    match outcome {
        Some(Handshake::Answered) => {
            seen.answered = Some(Instant::now());
            p.stalled |= timed_out;
        }
        Some(Handshake::Stalled(why)) => {
            seen.answered = None;
            p.stalled = true;
            if p.ok {
                p.ok = false;
                p.error = why;
            }
        }
        Some(Handshake::Unreachable(why)) => {
            seen.answered = None;
            if p.ok {
                p.ok = false;
                p.error = format!("{why} (a kept session still answers)");
            }
        }
        // No thread could run it: nothing learnt.
        None => {}
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Secret;

    fn params(port: u16) -> wire::Params {
        wire::Params {
            host: "127.0.0.1".to_string(),
            port,
            user: "u".to_string(),
            dbname: "d".to_string(),
            password: Secret::new(""),
            options: String::new(),
            ssl: crate::model::config::PgSsl::default(),
        }
    }

    #[test]
    fn a_stalled_server_fails_a_probe_that_its_kept_session_passed() {
        // Nobody accepts: the kernel's backlog takes the connection.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let deadline = Deadline::after(Duration::from_millis(300));
        let pending = start(&params(port), "probe x", deadline, Duration::from_secs(1));
        let ok = DbProbe {
            ok: true,
            ..DbProbe::default()
        };
        let p = judge(ok, pending, deadline);
        assert!(!p.ok && p.stalled, "{p:?}");
        assert!(p.error.contains("accepts TCP connections"), "{}", p.error);
        // Not answered: the next probe asks again.
        let again = start(
            &params(port),
            "probe x",
            Deadline::after(Duration::from_millis(300)),
            Duration::from_secs(1),
        );
        assert!(again.rx.is_some());
        let _ = judge(
            DbProbe::default(),
            again,
            Deadline::after(Duration::from_millis(300)),
        );
    }

    /// A server whose backend answers the startup packet (an
    /// authentication request) on every new connection.
    fn answering_server() -> u16 {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                // AuthenticationCleartextPassword.
                let _ = c.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
            }
        });
        port
    }

    #[test]
    fn a_server_that_answers_new_sessions_but_not_the_probe_is_stalled() {
        let port = answering_server();
        let timed_out = || DbProbe {
            ok: false,
            error: "probe 127.0.0.1: no answer within 2.0s".to_string(),
            ..DbProbe::default()
        };
        let deadline = Deadline::after(Duration::from_millis(500));
        let pending = start(&params(port), "probe z", deadline, Duration::from_secs(5));
        assert!(pending.rx.is_some());
        let p = judge(timed_out(), pending, deadline);
        assert!(p.stalled, "{p:?}");
        // After a timed-out probe the next one asks anew, even within
        // `fresh` (an earlier answer may predate a power-off): still stalled.
        let deadline = Deadline::after(Duration::from_millis(500));
        let pending = start(&params(port), "probe z", deadline, Duration::from_secs(5));
        assert!(pending.rx.is_some());
        assert!(judge(timed_out(), pending, deadline).stalled);
        // A probe that failed otherwise (refused, an error) is no stall.
        let deadline = Deadline::after(Duration::from_millis(500));
        let pending = start(&params(port), "probe z", deadline, Duration::from_secs(5));
        let refused = DbProbe {
            ok: false,
            error: "probe 127.0.0.1: Connection refused (os error 111)".to_string(),
            ..DbProbe::default()
        };
        assert!(!judge(refused, pending, deadline).stalled);
        // An ok probe stays ok and unstalled.
        let deadline = Deadline::after(Duration::from_millis(500));
        let pending = start(&params(port), "probe z", deadline, Duration::from_secs(5));
        let ok = DbProbe {
            ok: true,
            ..DbProbe::default()
        };
        let p = judge(ok, pending, deadline);
        assert!(p.ok && !p.stalled, "{p:?}");
        // A probe that times out right after an answered handshake (a
        // power-off between them) reuses that answer: not a stall.
        let deadline = Deadline::after(Duration::from_millis(500));
        let pending = start(&params(port), "probe z", deadline, Duration::from_secs(5));
        assert!(pending.rx.is_none());
        assert!(!judge(timed_out(), pending, deadline).stalled);
    }

    #[test]
    fn refused_new_connections_fail_the_probe_but_are_not_a_stall() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let deadline = Deadline::after(Duration::from_millis(300));
        let pending = start(&params(port), "probe y", deadline, Duration::from_secs(1));
        let ok = DbProbe {
            ok: true,
            ..DbProbe::default()
        };
        let p = judge(ok, pending, deadline);
        assert!(!p.ok && !p.stalled, "{p:?}");
        assert!(p.error.contains("kept session"), "{}", p.error);
    }
}
