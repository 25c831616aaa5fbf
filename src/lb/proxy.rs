//! The proxy: client connections in, backend connections out, bytes copied
//! unchanged both ways.
//!
//! A fixed number of worker threads, each with its own epoll (edge-triggered)
//! and its own table of sessions, share one non-blocking listener registered
//! with EPOLLEXCLUSIVE, so an incoming connection wakes one worker and a
//! session lives on that worker until it ends. No SO_REUSEPORT: a second
//! cstlb started on the same port must fail with "address in use", not
//! silently take half the clients.
//!
//! Bytes are read into a per-worker scratch buffer and written straight to
//! the other side; only what the other side cannot take now is copied into a
//! per-session buffer, and the source is not read again until that drains
//! (backpressure), so idle sessions hold no buffers. EOF on one side becomes
//! `shutdown(SHUT_WR)` on the other once everything before it was written;
//! a session ends when both directions ended, on any socket error, or after
//! the idle timeout.
//!
//! This module picks backends through the shared [`Ring`] but never decides
//! health on its own beyond "this connect failed" (reported to the ring).

use std::io;
use std::net::{SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ring::{Addr, Counters, Ring};

/// Bytes read per `recv`.
const SCRATCH: usize = 64 * 1024;
/// Connections accepted per listener wake-up before serving others.
const ACCEPT_BATCH: usize = 64;
const LISTENER: u64 = u64::MAX;
const WAKER: u64 = u64::MAX - 1;
const EV_RW: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// What every worker shares with the rest of cstlb.
pub struct Shared {
    pub ring: Mutex<Ring>,
    pub stop: AtomicBool,
    /// Workers still polling the listener; the listener is closed at 0.
    pub listening: AtomicUsize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
}

impl Shared {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The message a client gets when no backend can take it: a PostgreSQL
/// ErrorResponse, which psql prints, then EOF.
pub fn refusal_message(text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (code, val) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P03"), // cannot_connect_now
        (b'M', text),
    ] {
        body.push(code);
        body.extend_from_slice(val.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid pointer to an int of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn close(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: fd is owned by the session being torn down.
        unsafe { libc::close(fd) };
    }
}

/// One direction of a session.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written to the other side.
    buf: Vec<u8>,
    off: usize,
    /// The source said EOF.
    eof: bool,
    /// EOF was passed on (`shutdown(SHUT_WR)` on the destination).
    shut: bool,
}

/// Readiness seen for one socket (edge-triggered: kept until EAGAIN).
#[derive(Default, Clone, Copy)]
struct Ready {
    readable: bool,
    writable: bool,
    hup: bool,
}

enum Phase {
    Connecting {
        since: Instant,
        tried: Vec<Addr>,
    },
    Open,
    /// No backend: answering the client with an error (see `refuse`).
    Refusing {
        since: Instant,
        said_n: bool,
    },
}

/// How long a refused client may take to send its startup packet.
const REFUSE_WAIT: Duration = Duration::from_millis(500);

/// SSLRequest (80877103) or GSSENCRequest (80877104).
fn is_encryption_request(b: &[u8]) -> bool {
    b.len() == 8
        && b[..4] == [0, 0, 0, 8]
        && matches!(
            u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            80_877_103 | 80_877_104
        )
}

struct Session {
    client: RawFd,
    backend: RawFd,
    addr: Option<Addr>,
    counters: Option<Arc<Counters>>,
    phase: Phase,
    c: Ready,
    b: Ready,
    c2b: Half,
    b2c: Half,
    last_active: Instant,
}

enum Step {
    Ok,
    Fail,
}

/// Move what can be moved from `src` to `dst` now.
fn transfer(
    src: RawFd,
    dst: RawFd,
    h: &mut Half,
    rs: &mut Ready,
    ws: &mut Ready,
    scratch: &mut [u8],
    moved: &mut bool,
) -> Step {
    loop {
        if h.off < h.buf.len() {
            if !ws.writable {
                return Step::Ok;
            }
            match send(dst, &h.buf[h.off..]) {
                Ok(n) => {
                    *moved = true;
                    h.off += n;
                    if h.off < h.buf.len() {
                        ws.writable = false;
                        return Step::Ok;
                    }
                    h.off = 0;
                    h.buf.clear();
                    if h.buf.capacity() > SCRATCH {
                        h.buf = Vec::new();
                    }
                }
                Err(e) if e == libc::EAGAIN => {
                    ws.writable = false;
                    return Step::Ok;
                }
                Err(_) => return Step::Fail,
            }
        }
        if h.eof {
            if !h.shut {
                // SAFETY: shutdown on a socket we own.
                unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                h.shut = true;
            }
            return Step::Ok;
        }
        if !rs.readable {
            return Step::Ok;
        }
        // SAFETY: recv into our scratch buffer of the given length.
        let n = unsafe {
            libc::recv(
                src,
                scratch.as_mut_ptr() as *mut libc::c_void,
                scratch.len(),
                0,
            )
        };
        if n == 0 {
            h.eof = true;
            continue;
        }
        if n < 0 {
            match errno() {
                libc::EAGAIN => {
                    rs.readable = false;
                    return Step::Ok;
                }
                libc::EINTR => continue,
                _ => return Step::Fail,
            }
        }
        let n = n as usize;
        *moved = true;
        let mut w = 0;
        if ws.writable {
            match send(dst, &scratch[..n]) {
                Ok(k) => w = k,
                Err(e) if e == libc::EAGAIN => {}
                Err(_) => return Step::Fail,
            }
        }
        if w < n {
            ws.writable = false;
            h.buf.extend_from_slice(&scratch[w..n]);
            return Step::Ok;
        }
        // A short read emptied the socket; the next arrival is a new edge.
        // After a hang-up keep reading to see the EOF.
        if n < scratch.len() && !rs.hup {
            rs.readable = false;
            return Step::Ok;
        }
    }
}

fn send(fd: RawFd, b: &[u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: send from a valid slice; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe {
            libc::send(
                fd,
                b.as_ptr() as *const libc::c_void,
                b.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        match errno() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

pub struct Worker {
    id: usize,
    ep: OwnedFd,
    waker: Arc<OwnedFd>,
    listener: RawFd,
    shared: Arc<Shared>,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    freed: Vec<usize>,
    connecting: Vec<usize>,
    live: usize,
    scratch: Vec<u8>,
    accept_paused_until: Option<Instant>,
    listening: bool,
}

fn epoll_add(ep: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl with a valid event struct.
    cvt(unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
}

fn epoll_del(ep: RawFd, fd: RawFd) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: epoll_ctl with a valid event struct.
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, &mut ev) };
}

/// A handle to wake a worker (to tell it to stop accepting).
#[derive(Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: write 8 bytes to an eventfd.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

/// Make the listener non-blocking with a deep backlog (bursts of `-C`
/// clients must not be dropped).
pub fn prepare_listener(l: &TcpListener) -> io::Result<()> {
    l.set_nonblocking(true)?;
    // SAFETY: listen(2) again only changes the backlog of a listening socket.
    cvt(unsafe { libc::listen(l.as_raw_fd(), 4096) })?;
    Ok(())
}

impl Worker {
    pub fn new(id: usize, listener: RawFd, shared: Arc<Shared>) -> io::Result<(Worker, Waker)> {
        // SAFETY: plain syscalls; the fds are wrapped in OwnedFd at once.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let wfd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        let waker = Arc::new(unsafe { OwnedFd::from_raw_fd(wfd) });
        epoll_add(ep.as_raw_fd(), wfd, libc::EPOLLIN as u32, WAKER)?;
        epoll_add(
            ep.as_raw_fd(),
            listener,
            (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            LISTENER,
        )?;
        let w = Worker {
            id,
            ep,
            waker: waker.clone(),
            listener,
            shared,
            sessions: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            connecting: Vec::new(),
            live: 0,
            scratch: vec![0; SCRATCH],
            accept_paused_until: None,
            listening: true,
        };
        Ok((w, Waker(waker)))
    }

    /// Serve until told to stop and drained (or the drain timeout passed).
    pub fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut drain_deadline: Option<Instant> = None;
        let mut last_scan = Instant::now();
        loop {
            let timeout_ms = if !self.connecting.is_empty()
                || self.accept_paused_until.is_some()
                || drain_deadline.is_some()
            {
                50
            } else {
                1000
            };
            // SAFETY: epoll_wait into our event array of the given length.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout_ms,
                )
            };
            let n = if n < 0 { 0 } else { n as usize };
            for ev in &events[..n] {
                let (bits, token) = (ev.events, ev.u64);
                match token {
                    LISTENER => self.accept_all(),
                    WAKER => self.woken(),
                    t => self.event((t >> 1) as usize, t & 1 == 1, bits),
                }
            }
            // Slots closed in this batch are reused only now, so a stale
            // event of the batch can never reach a new session.
            self.free.append(&mut self.freed);
            let now = Instant::now();
            if !self.connecting.is_empty() {
                self.check_connect_timeouts(now);
            }
            if let Some(t) = self.accept_paused_until {
                if now >= t && self.listening {
                    self.accept_paused_until = None;
                    let _ = epoll_add(
                        self.ep.as_raw_fd(),
                        self.listener,
                        (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                        LISTENER,
                    );
                }
            }
            if now.duration_since(last_scan) >= Duration::from_secs(1) {
                last_scan = now;
                if let Some(idle) = self.shared.idle_timeout {
                    self.close_idle(now, idle);
                }
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                if self.listening {
                    self.stop_listening();
                }
                let deadline = *drain_deadline.get_or_insert(now + self.shared.drain_timeout);
                if self.live == 0 {
                    break;
                }
                if now >= deadline {
                    log::warn!(
                        "Worker {}: drain timeout, closing {} open session(s).",
                        self.id,
                        self.live
                    );
                    for i in 0..self.sessions.len() {
                        self.close_session(i);
                    }
                    break;
                }
            }
        }
    }

    fn woken(&mut self) {
        let mut v: u64 = 0;
        // SAFETY: read 8 bytes from the eventfd into v.
        unsafe {
            libc::read(
                self.waker.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
        if self.shared.stop.load(Ordering::SeqCst) && self.listening {
            self.stop_listening();
        }
    }

    fn stop_listening(&mut self) {
        if self.accept_paused_until.take().is_none() {
            epoll_del(self.ep.as_raw_fd(), self.listener);
        }
        self.listening = false;
        self.shared.listening.fetch_sub(1, Ordering::SeqCst);
    }

    fn accept_all(&mut self) {
        if !self.listening || self.shared.stop.load(Ordering::SeqCst) {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            // SAFETY: accept4 without peer address.
            let fd = unsafe {
                libc::accept4(
                    self.listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                match errno() {
                    libc::EAGAIN => return,
                    libc::EINTR | libc::ECONNABORTED | libc::EPERM | libc::EPROTO => continue,
                    e => {
                        // Out of fds or memory: leave clients in the backlog
                        // for a moment instead of spinning on the listener.
                        log::warn!(
                            "Worker {}: accept failed: {}; pausing accepts for 100 ms.",
                            self.id,
                            io::Error::from_raw_os_error(e)
                        );
                        epoll_del(self.ep.as_raw_fd(), self.listener);
                        self.accept_paused_until =
                            Some(Instant::now() + Duration::from_millis(100));
                        return;
                    }
                }
            }
            set_nodelay(fd);
            self.start(fd);
        }
    }

    fn alloc(&mut self, s: Session) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.sessions[i] = Some(s);
                i
            }
            None => {
                self.sessions.push(Some(s));
                self.sessions.len() - 1
            }
        }
    }

    fn start(&mut self, client: RawFd) {
        let now = Instant::now();
        let idx = self.alloc(Session {
            client,
            backend: -1,
            addr: None,
            counters: None,
            phase: Phase::Connecting {
                since: now,
                tried: Vec::new(),
            },
            c: Ready::default(),
            b: Ready::default(),
            c2b: Half::default(),
            b2c: Half::default(),
            last_active: now,
        });
        if epoll_add(self.ep.as_raw_fd(), client, EV_RW, (idx as u64) << 1).is_err() {
            self.close_session(idx);
            return;
        }
        self.connect_next(idx);
    }

    /// Connect the session to the next healthy backend it has not tried;
    /// refuse the client when there is none.
    fn connect_next(&mut self, idx: usize) {
        loop {
            let Some(Some(s)) = self.sessions.get_mut(idx) else {
                return;
            };
            let Phase::Connecting { tried, since } = &mut s.phase else {
                return;
            };
            let picked = self.shared.ring().pick(tried);
            let Some((addr, counters)) = picked else {
                self.refuse(idx);
                return;
            };
            tried.push(addr);
            *since = Instant::now();
            counters.active.fetch_add(1, Ordering::Relaxed);
            s.addr = Some(addr);
            s.counters = Some(counters);
            match connect_nonblocking(addr) {
                Ok((fd, done)) => {
                    s.backend = fd;
                    if epoll_add(self.ep.as_raw_fd(), fd, EV_RW, ((idx as u64) << 1) | 1).is_err() {
                        self.attempt_failed(idx, "epoll_ctl failed");
                        continue;
                    }
                    if done {
                        self.opened(idx);
                    } else {
                        self.connecting.push(idx);
                    }
                    return;
                }
                Err(e) => {
                    self.attempt_failed(idx, &e.to_string());
                    continue;
                }
            }
        }
    }

    /// The current attempt failed: release it and tell the ring.
    fn attempt_failed(&mut self, idx: usize, why: &str) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        close(s.backend);
        s.backend = -1;
        s.b = Ready::default();
        if let Some(c) = s.counters.take() {
            c.active.fetch_sub(1, Ordering::Relaxed);
            c.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(a) = s.addr.take() {
            let msg = self.shared.ring().record_connect_failure(a, why);
            if let Some(m) = msg {
                log::warn!("{m}");
            }
        }
    }

    /// No backend for this client: answer like a PostgreSQL that cannot
    /// take it. An SSLRequest/GSSENCRequest gets `N` first, because libpq
    /// does not show errors sent during that exchange; the error then
    /// answers the startup packet. Bounded by [`REFUSE_WAIT`].
    fn refuse(&mut self, idx: usize) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        s.phase = Phase::Refusing {
            since: Instant::now(),
            said_n: false,
        };
        self.connecting.push(idx);
        self.refuse_step(idx);
    }

    fn refuse_step(&mut self, idx: usize) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        let Phase::Refusing { said_n, .. } = &mut s.phase else {
            return;
        };
        let fd = s.client;
        loop {
            // SAFETY: recv into scratch.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr() as *mut libc::c_void,
                    self.scratch.len(),
                    0,
                )
            };
            if n < 0 && errno() == libc::EAGAIN {
                return;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            let got = &self.scratch[..n as usize];
            if !*said_n && is_encryption_request(got) {
                *said_n = true;
                if send(fd, b"N").is_err() {
                    break;
                }
                continue;
            }
            self.send_refusal(idx);
            return;
        }
        self.close_session(idx);
    }

    fn send_refusal(&mut self, idx: usize) {
        if let Some(Some(s)) = self.sessions.get(idx) {
            let fd = s.client;
            let _ = send(fd, &refusal_message("cstlb: no healthy backend available"));
            // SAFETY: shutdown on the client socket we own.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            // Drain what already arrived so close does not become a reset
            // that could discard the message.
            // SAFETY: recv into scratch.
            unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr() as *mut libc::c_void,
                    self.scratch.len(),
                    0,
                )
            };
            log::debug!("Refused a client: no healthy backend.");
        }
        self.close_session(idx);
    }

    fn opened(&mut self, idx: usize) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        s.phase = Phase::Open;
        s.b.writable = true;
        if let Some(c) = &s.counters {
            c.total.fetch_add(1, Ordering::Relaxed);
        }
        self.pump(idx);
    }

    fn event(&mut self, idx: usize, is_backend: bool, bits: u32) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        let err = bits & libc::EPOLLERR as u32 != 0;
        let hup = bits & (libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0;
        let r = if is_backend { &mut s.b } else { &mut s.c };
        if bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32 != 0 {
            r.readable = true;
        }
        if bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            r.writable = true;
        }
        if hup {
            r.hup = true;
        }
        if let Phase::Refusing { .. } = s.phase {
            if err {
                self.close_session(idx);
            } else if !is_backend {
                self.refuse_step(idx);
            }
            return;
        }
        if let Phase::Connecting { .. } = s.phase {
            if !is_backend {
                if err {
                    self.close_session(idx);
                }
                return;
            }
            if s.backend < 0 {
                return;
            }
            match socket_error(s.backend) {
                0 if !err && bits & libc::EPOLLOUT as u32 != 0 => self.opened(idx),
                0 if !err => {}
                e => {
                    let why = if e == 0 {
                        "connection failed".to_string()
                    } else {
                        io::Error::from_raw_os_error(e).to_string()
                    };
                    self.attempt_failed(idx, &why);
                    self.connect_next(idx);
                }
            }
            return;
        }
        self.pump(idx);
    }

    fn pump(&mut self, idx: usize) {
        let Some(Some(s)) = self.sessions.get_mut(idx) else {
            return;
        };
        let mut moved = false;
        let a = transfer(
            s.client,
            s.backend,
            &mut s.c2b,
            &mut s.c,
            &mut s.b,
            &mut self.scratch,
            &mut moved,
        );
        let b = transfer(
            s.backend,
            s.client,
            &mut s.b2c,
            &mut s.b,
            &mut s.c,
            &mut self.scratch,
            &mut moved,
        );
        if moved && self.shared.idle_timeout.is_some() {
            s.last_active = Instant::now();
        }
        let done = s.c2b.shut && s.b2c.shut;
        if matches!(a, Step::Fail) || matches!(b, Step::Fail) || done {
            self.close_session(idx);
        }
    }

    fn close_session(&mut self, idx: usize) {
        let Some(slot) = self.sessions.get_mut(idx) else {
            return;
        };
        let Some(s) = slot.take() else {
            return;
        };
        close(s.client);
        close(s.backend);
        if let Some(c) = s.counters {
            c.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.live -= 1;
        self.freed.push(idx);
    }

    fn check_connect_timeouts(&mut self, now: Instant) {
        let mut list = std::mem::take(&mut self.connecting);
        // A slot freed and reused while connecting may be listed twice.
        list.sort_unstable();
        list.dedup();
        let limit = self.shared.connect_timeout;
        for idx in list {
            let (refusing, expired) = match self.sessions.get(idx) {
                Some(Some(Session {
                    phase: Phase::Connecting { since, .. },
                    backend,
                    ..
                })) if *backend >= 0 => (false, now.duration_since(*since) >= limit),
                Some(Some(Session {
                    phase: Phase::Refusing { since, .. },
                    ..
                })) => (true, now.duration_since(*since) >= REFUSE_WAIT),
                _ => continue,
            };
            if !expired {
                self.connecting.push(idx);
            } else if refusing {
                self.send_refusal(idx);
            } else {
                self.attempt_failed(idx, "connect timeout");
                self.connect_next(idx);
            }
        }
    }

    fn close_idle(&mut self, now: Instant, idle: Duration) {
        for i in 0..self.sessions.len() {
            let stale = matches!(
                &self.sessions[i],
                Some(s) if matches!(s.phase, Phase::Open) && now.duration_since(s.last_active) >= idle
            );
            if stale {
                log::debug!("Closing a session idle for {} s.", idle.as_secs_f64());
                self.close_session(i);
            }
        }
    }
}

fn socket_error(fd: RawFd) -> i32 {
    let mut e: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int of the right size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut e as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        errno()
    } else {
        e
    }
}

/// Start a non-blocking connect; the bool says it completed already.
fn connect_nonblocking(a: SocketAddrV4) -> io::Result<(RawFd, bool)> {
    // SAFETY: socket/connect with a properly built sockaddr_in.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    set_nodelay(fd);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let r = unsafe {
        libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok((fd, true));
    }
    let e = errno();
    if e == libc::EINPROGRESS {
        return Ok((fd, false));
    }
    close(fd);
    Err(io::Error::from_raw_os_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_requests() {
        assert!(is_encryption_request(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]));
        assert!(is_encryption_request(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]));
        assert!(!is_encryption_request(&[
            0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2e
        ]));
        assert!(!is_encryption_request(&[0, 0, 0, 8, 0x04, 0xd2, 0x16]));
        assert!(!is_encryption_request(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn refusal_is_a_wellformed_error_response() {
        let m = refusal_message("no backend");
        assert_eq!(m[0], b'E');
        let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
        assert_eq!(len + 1, m.len());
        assert_eq!(*m.last().unwrap(), 0);
        let body = String::from_utf8_lossy(&m[5..]);
        assert!(body.contains("SFATAL\0"));
        assert!(body.contains("C57P03\0"));
        assert!(body.contains("Mno backend\0"));
    }
}
