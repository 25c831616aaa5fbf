//! Health checks of the backends: a bounded TCP connect, then the first step
//! of the PostgreSQL handshake (an SSLRequest, answered by one byte, `S` or
//! `N`, by any PostgreSQL that is accepting connections). Closing right after
//! that answer is silent on the server side (no "incomplete startup packet"
//! line in its log when it answered `N`).
//!
//! This module only observes; [`Ring::record_check`] decides what a result
//! means.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{select, Receiver};

use super::proxy::Shared;
use super::ring::Addr;

/// SSLRequest: length 8, code 80877103.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Check one backend within `timeout` (per step).
pub fn check(a: Addr, timeout: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(a), timeout)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(&SSL_REQUEST)
        .map_err(|e| format!("send SSLRequest: {e}"))?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) if b[0] == b'S' || b[0] == b'N' => Ok(()),
        Ok(1) => Err(format!(
            "not PostgreSQL: answered 0x{:02x} to SSLRequest",
            b[0]
        )),
        Ok(_) => Err("closed without answering the SSLRequest".into()),
        Err(e) => Err(format!("no answer to SSLRequest: {e}")),
    }
}

/// Check every backend each `interval`, or at once when `now` fires (a
/// backend was added); until `stop` is closed.
pub fn run(shared: Arc<Shared>, interval: Duration, now: Receiver<()>, stop: Receiver<()>) {
    let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(1));
    loop {
        let addrs = shared
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .addrs();
        let results: Vec<(Addr, Result<(), String>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = addrs
                .iter()
                .map(|&a| (a, sc.spawn(move || check(a, timeout))))
                .collect();
            hs.into_iter()
                .map(|(a, h)| (a, h.join().unwrap_or(Err("checker panicked".into()))))
                .collect()
        });
        {
            let mut ring = shared.ring.lock().unwrap_or_else(|p| p.into_inner());
            for (a, r) in &results {
                let detail = r.as_ref().err().map(String::as_str).unwrap_or("");
                match ring.record_check(*a, r.is_ok(), detail) {
                    Some(m) if r.is_ok() => log::info!("{m}"),
                    Some(m) => log::warn!("{m}"),
                    None => {}
                }
            }
        }
        select! {
            recv(stop) -> _ => return,
            recv(now) -> m => if m.is_err() { return },
            default(interval) => {}
        }
    }
}
