//! A minimal PostgreSQL protocol-3 client for the probes: startup,
//! authentication (trust, cleartext, md5, SCRAM-SHA-256 without channel
//! binding), simple queries with text results, statements prepared once
//! per session and run again without parameters (extended protocol, text
//! results), Terminate on drop; TLS as libpq's sslmode says (the
//! negotiation and the stream are [`tls`]'s). No parameters, no COPY.
//!
//! Owns: the message codec (pure functions, tested without sockets) and a
//! connection over a blocking TCP socket whose every call takes one
//! [`Deadline`]: before each connect, read and write the socket's timeout
//! is set to what is left of it, so a login or a query ends by the deadline
//! whatever the server does, and a server that accepts the TCP connection
//! but never answers (SIGSTOP) costs the caller its deadline and nothing
//! more. No threads, no runtime: parallelism is the caller's business
//! (`pg::probe_many` runs one scoped thread per database).
//!
//! Must not: log or put a password (or anything derived from one) in an
//! error; reuse a connection after an I/O or protocol error, or after a
//! simple query timed out (it is "broken" and only good for dropping);
//! decide what a result means. A prepared batch that timed out is the
//! exception: its answer is owed and read before the next batch, so a
//! slow server costs the caller its deadline but not its session (a new
//! one, for the server, is a process and a login).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use postgres_protocol::authentication::{md5_hash, sasl};

use crate::exec::pg::PgError;
use crate::exec::pgver::parse_server_version;
use crate::exec::tls::{self, Failure, NegotiateError, Start, Stream};
use crate::model::config::{PgSsl, Secret};

mod codec;
pub use codec::*;

// ---------------------------------------------------------------- deadline

/// One bound for a whole piece of work (a login, a query, a probe round):
/// every socket operation under it gets what is left of it, so the work
/// ends by `at` whatever the server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    /// The whole allowance, for the error message.
    pub limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + limit,
            limit,
        }
    }

    /// What is left; a TimedOut error once nothing is (a zero socket
    /// timeout would mean "wait forever").
    pub fn remaining(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

// ---------------------------------------------------------------- connection

/// Where and as whom to connect. `options` is the startup `options` value
/// (`-c name=value ...`).
#[derive(Clone, PartialEq, Eq)]
pub struct Params {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Secret,
    pub options: String,
    /// pg_sslmode and pg_sslrootcert.
    pub ssl: PgSsl,
}

impl Params {
    /// Is `c` a session for these parameters (same server, login, database
    /// and settings)?
    pub fn same_session(&self, other: &Params) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.user == other.user
            && self.dbname == other.dbname
            && self.options == other.options
            && self.ssl == other.ssl
            && self.password.expose() == other.password.expose()
    }
}

/// An open session. Broken (and then only good for dropping) after a
/// timeout, an I/O error, a protocol error or a FATAL error.
pub struct Conn {
    stream: Stream,
    inbuf: Vec<u8>,
    start: usize,
    params: Params,
    broken: bool,
    /// The backend's process id (BackendKeyData).
    pid: i32,
    /// server_version_num, from the `server_version` the server reports
    /// at startup (ParameterStatus): no query needed to learn it.
    server_version: Option<u32>,
    /// The statements prepared on this session: `clup<i>` is the i-th.
    prepared: Vec<String>,
    /// A batch whose answer did not come by its deadline, still owed.
    owed: Option<Owed>,
    /// The last read ended by the deadline (not by the server).
    read_timed_out: bool,
}

/// What is still to be read of a batch that timed out: the statements it
/// prepared, and what had come of its answer.
struct Owed {
    new: Vec<String>,
    collect: Collect,
}

fn err(what: &str, msg: impl Into<String>) -> PgError {
    PgError {
        what: what.to_string(),
        msg: msg.into(),
        code: None,
    }
}

fn server_err(what: &str, f: Fields) -> PgError {
    PgError {
        what: what.to_string(),
        msg: format!("{}: {}", f.severity, f.message),
        code: Some(f.code).filter(|c| !c.is_empty()),
    }
}

fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    // A name: resolved by the system, blocking and outside the deadline
    // (clup's metas use addresses).
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the host"))
}

impl Conn {
    /// Connect and log in, all by `deadline`, with TLS as `p.ssl` says:
    /// a second attempt on a new connection where libpq makes one
    /// ([`tls::retry`]).
    pub fn connect(p: &Params, what: &str, deadline: Deadline) -> Result<Conn, PgError> {
        let mut how = tls::start(p.ssl.mode);
        loop {
            match Conn::attempt(p, what, how, deadline) {
                Ok(c) => return Ok(c),
                Err((e, Some(next))) if deadline.remaining().is_ok() => {
                    log::debug!("{what}: {}; trying again with {next:?}", e.msg);
                    how = next;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// One connection and login; on failure, the error and the start of a
    /// second attempt if libpq would make one.
    fn attempt(
        p: &Params,
        what: &str,
        how: Start,
        deadline: Deadline,
    ) -> Result<Conn, (PgError, Option<Start>)> {
        let mut c = Conn::open(p, what, how, deadline)?;
        let used_tls = c.stream.is_tls();
        match c.login(what, deadline) {
            Ok(()) => {
                c.broken = false;
                Ok(c)
            }
            Err(e) => {
                // An error the server sent (it has a SQLSTATE): refused.
                let failure = if e.code.is_some() {
                    Failure::Refused
                } else {
                    Failure::Other
                };
                Err((e, tls::retry(p.ssl.mode, used_tls, failure)))
            }
        }
    }

    /// The connection, TLS negotiated as `how` says, before the startup
    /// packet (broken until logged in).
    fn open(
        p: &Params,
        what: &str,
        how: Start,
        deadline: Deadline,
    ) -> Result<Conn, (PgError, Option<Start>)> {
        let connecting = |e: io::Error| err(what, format!("error connecting to server: {e}"));
        let io_err = |e: io::Error| {
            if is_timeout(&e) {
                timed_out(what, deadline.limit)
            } else {
                connecting(e)
            }
        };
        let addr = resolve(&p.host, p.port).map_err(|e| (connecting(e), None))?;
        let left = deadline
            .remaining()
            .map_err(|_| (timed_out(what, deadline.limit), None))?;
        let tcp = TcpStream::connect_timeout(&addr, left).map_err(|e| (io_err(e), None))?;
        let _ = tcp.set_nodelay(true);
        let stream = tls::negotiate(tcp, &p.ssl, &p.host, how, deadline).map_err(|e| match e {
            NegotiateError::Io(e) => (io_err(e), None),
            NegotiateError::Refused(m) => (err(what, m), None),
            NegotiateError::Handshake(m) => (
                err(what, m),
                tls::retry(p.ssl.mode, true, Failure::Handshake),
            ),
        })?;
        Ok(Conn::on(stream, p))
    }

    /// A connection on `stream`, nothing sent yet (broken until logged in).
    fn on(stream: Stream, p: &Params) -> Conn {
        Conn {
            stream,
            inbuf: Vec::with_capacity(8192),
            start: 0,
            params: p.clone(),
            broken: true,
            pid: 0,
            server_version: None,
            prepared: Vec::new(),
            owed: None,
            read_timed_out: false,
        }
    }

    fn startup_packet(&self) -> Vec<u8> {
        let p = &self.params;
        let mut params = vec![
            ("user", p.user.as_str()),
            ("database", p.dbname.as_str()),
            ("application_name", "clup"),
            ("client_encoding", "UTF8"),
        ];
        if !p.options.is_empty() {
            params.push(("options", p.options.as_str()));
        }
        startup(&params)
    }

    fn login(&mut self, what: &str, deadline: Deadline) -> Result<(), PgError> {
        let p = self.params.clone();
        let packet = self.startup_packet();
        self.send(what, &packet, deadline)?;
        let pw = p.password.expose().as_bytes();
        let need_pw = || {
            if pw.is_empty() {
                Err(err(what, "the server asks for a password and none is set"))
            } else {
                Ok(())
            }
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match self.recv(what, deadline)? {
                Backend::Auth(Auth::Ok) => break,
                Backend::Auth(Auth::Cleartext) => {
                    need_pw()?;
                    self.send(what, &password(pw), deadline)?;
                }
                Backend::Auth(Auth::Md5(salt)) => {
                    need_pw()?;
                    let h = md5_hash(p.user.as_bytes(), pw, salt);
                    self.send(what, &password(h.as_bytes()), deadline)?;
                }
                Backend::Auth(Auth::Sasl(mechs)) => {
                    need_pw()?;
                    if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(err(
                            what,
                            format!("unsupported SASL mechanisms: {}", mechs.join(", ")),
                        ));
                    }
                    let s = sasl::ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                    self.send(what, &sasl_initial("SCRAM-SHA-256", s.message()), deadline)?;
                    scram = Some(s);
                }
                Backend::Auth(Auth::SaslContinue(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| err(what, "unexpected SASL message"))?;
                    s.update(&data)
                        .map_err(|e| err(what, format!("SCRAM authentication: {e}")))?;
                    let reply = sasl_response(s.message());
                    self.send(what, &reply, deadline)?;
                }
                Backend::Auth(Auth::SaslFinal(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| err(what, "unexpected SASL message"))?;
                    s.finish(&data)
                        .map_err(|e| err(what, format!("SCRAM authentication: {e}")))?;
                }
                Backend::Auth(Auth::Other(n)) => {
                    return Err(err(
                        what,
                        format!("unsupported authentication method (code {n})"),
                    ))
                }
                Backend::Error(f) => return Err(server_err(what, f)),
                Backend::Notice(_) => {}
                m => return Err(err(what, format!("unexpected message at login: {m:?}"))),
            }
        }
        loop {
            match self.recv(what, deadline)? {
                Backend::ReadyForQuery(_) => return Ok(()),
                Backend::BackendKeyData { pid, .. } => self.pid = pid,
                Backend::ParameterStatus(k, v) if k == "server_version" => {
                    self.server_version = parse_server_version(&v);
                }
                Backend::ParameterStatus(..) | Backend::Notice(_) | Backend::Other(_) => {}
                Backend::Error(f) => return Err(server_err(what, f)),
                _ => return Err(err(what, "unexpected message at login")),
            }
        }
    }

    /// Run `sql` (one or more statements) by `deadline`: one result per
    /// statement that completed, or the server's error. A timeout or a lost
    /// connection leaves the connection broken.
    pub fn simple_query(
        &mut self,
        what: &str,
        sql: &str,
        deadline: Deadline,
    ) -> Result<Vec<QueryResult>, PgError> {
        if self.broken {
            return Err(err(what, "connection broken by an earlier error"));
        }
        let q = query(sql).map_err(|m| err(what, m))?;
        self.broken = true;
        self.send(what, &q, deadline)?;
        let (collect, status) = self.collect(what, deadline)?;
        // Simple queries run in implicit transactions: anything but idle
        // means the session is not what the next caller expects.
        self.broken = status != b'I';
        collect.finish().map_err(|f| server_err(what, f))
    }

    /// Read a query's answer up to ReadyForQuery, and its status.
    fn collect(&mut self, what: &str, deadline: Deadline) -> Result<(Collect, u8), PgError> {
        let mut collect = Collect::default();
        let status = self.collect_into(&mut collect, what, deadline)?;
        Ok((collect, status))
    }

    /// Feed `collect` up to ReadyForQuery; the status.
    fn collect_into(
        &mut self,
        collect: &mut Collect,
        what: &str,
        deadline: Deadline,
    ) -> Result<u8, PgError> {
        loop {
            let m = match self.recv(what, deadline) {
                Ok(m) => m,
                Err(e) => {
                    // A FATAL error (shutdown, terminated backend) comes
                    // right before the server closes: it says more.
                    return Err(match &collect.error {
                        Some(f) if !self.read_timed_out => server_err(what, f.clone()),
                        _ => e,
                    });
                }
            };
            if let Backend::Error(f) = &m {
                if f.severity == "FATAL" || f.severity == "PANIC" {
                    self.read_timed_out = false;
                    return Err(server_err(what, f.clone()));
                }
            }
            if let Some(s) = collect.feed(m).map_err(|m| err(what, m))? {
                return Ok(s);
            }
        }
    }

    /// Run `stmts` (one statement each, no parameters) in one round trip,
    /// each prepared on this session the first time it runs here and only
    /// bound and executed after that: the server parses and plans each
    /// once per session, not once per call. One result per statement
    /// that completed, or the server's error; a timeout or a lost
    /// connection leaves the connection broken, as [`Conn::simple_query`].
    pub fn prepared_query(
        &mut self,
        what: &str,
        stmts: &[&str],
        deadline: Deadline,
    ) -> Result<Vec<QueryResult>, PgError> {
        match self.prepared_batch(what, stmts, deadline)? {
            (results, None) => Ok(results),
            (_, Some(e)) => Err(e),
        }
    }

    /// [`Conn::prepared_query`] that keeps what completed before an
    /// error: `Ok((results, Some(error)))` when the server stopped at a
    /// statement (the session is still good), `Err` when the session is
    /// not.
    pub fn prepared_batch(
        &mut self,
        what: &str,
        stmts: &[&str],
        deadline: Deadline,
    ) -> Result<(Vec<QueryResult>, Option<PgError>), PgError> {
        self.settle(what, deadline)?;
        let mut buf = Vec::new();
        let mut names = Vec::with_capacity(stmts.len());
        let mut new = Vec::new();
        for sql in stmts {
            let name = match self.prepared.iter().position(|p| p == sql) {
                Some(i) => format!("clup{i}"),
                None => {
                    let name = format!("clup{}", self.prepared.len() + new.len());
                    buf.extend(parse(&name, sql).map_err(|m| err(what, m))?);
                    new.push(sql.to_string());
                    name
                }
            };
            names.push(name);
        }
        for name in &names {
            buf.extend(bind_execute(name));
        }
        buf.extend_from_slice(&SYNC);
        self.broken = true;
        self.send(what, &buf, deadline)?;
        let mut collect = Collect::default();
        self.read_answer(what, new, &mut collect, deadline)?;
        let (results, error) = collect.into_parts();
        Ok((results, error.map(|f| server_err(what, f))))
    }

    /// Read the answer to a batch that prepared `new` into `collect`. A
    /// server slower than the deadline does not cost the session: the
    /// answer is owed, and read (and dropped) before the next batch. Only
    /// a lost connection, a protocol error or a FATAL error break it.
    fn read_answer(
        &mut self,
        what: &str,
        new: Vec<String>,
        collect: &mut Collect,
        deadline: Deadline,
    ) -> Result<(), PgError> {
        self.read_timed_out = false;
        match self.collect_into(collect, what, deadline) {
            Ok(status) => {
                // The server parses in order and stops at an error: the
                // first `parsed` of the new statements exist on the session.
                self.prepared.extend(new.into_iter().take(collect.parsed));
                self.broken = status != b'I';
                Ok(())
            }
            Err(e) => {
                if std::mem::take(&mut self.read_timed_out) {
                    self.broken = false;
                    self.owed = Some(Owed {
                        new,
                        collect: std::mem::take(collect),
                    });
                }
                Err(e)
            }
        }
    }

    /// Before a new batch: read what is still owed of the last one (by
    /// `deadline`), or say why the session cannot take one.
    fn settle(&mut self, what: &str, deadline: Deadline) -> Result<(), PgError> {
        if self.broken {
            return Err(err(what, "connection broken by an earlier error"));
        }
        if self.owed.is_some() {
            deadline
                .remaining()
                .map_err(|_| timed_out(what, deadline.limit))?;
            let Owed { new, mut collect } = self.owed.take().expect("checked");
            self.broken = true;
            self.read_answer(what, new, &mut collect, deadline)?;
        }
        // Nothing sent yet: a deadline already past leaves the session as
        // it is.
        deadline
            .remaining()
            .map_err(|_| timed_out(what, deadline.limit))?;
        Ok(())
    }

    /// Whether the answer to an earlier batch is still to be read.
    pub fn owes_answer(&self) -> bool {
        self.owed.is_some()
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The server process serving this session.
    pub fn backend_pid(&self) -> i32 {
        self.pid
    }

    /// The server's server_version_num, as it reported at login.
    pub fn server_version(&self) -> Option<u32> {
        self.server_version
    }

    fn send(&mut self, what: &str, buf: &[u8], deadline: Deadline) -> Result<(), PgError> {
        let mut off = 0;
        while off < buf.len() {
            let r = deadline
                .remaining()
                .and_then(|left| self.stream.tcp().set_write_timeout(Some(left)))
                .and_then(|()| self.stream.write(&buf[off..]));
            match r {
                Ok(0) => return Err(self.lost(what, io::ErrorKind::WriteZero.into(), deadline)),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(what, e, deadline)),
            }
        }
        Ok(())
    }

    fn recv(&mut self, what: &str, deadline: Deadline) -> Result<Backend, PgError> {
        loop {
            match decode(&self.inbuf[self.start..]) {
                Ok(Some((m, used))) => {
                    self.start += used;
                    if self.start == self.inbuf.len() {
                        self.inbuf.clear();
                        self.start = 0;
                    }
                    return Ok(m);
                }
                Ok(None) => {}
                Err(m) => {
                    self.broken = true;
                    return Err(err(what, format!("protocol error: {m}")));
                }
            }
            if self.start > 0 {
                self.inbuf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 8192];
            let r = deadline
                .remaining()
                .and_then(|left| self.stream.tcp().set_read_timeout(Some(left)))
                .and_then(|()| self.stream.read(&mut chunk));
            match r {
                Ok(0) => {
                    self.broken = true;
                    return Err(err(what, "server closed the connection unexpectedly"));
                }
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.read_timed_out = is_timeout(&e);
                    return Err(self.lost(what, e, deadline));
                }
            }
        }
    }

    /// The error for a failed read or write; the connection is broken.
    fn lost(&mut self, what: &str, e: io::Error, deadline: Deadline) -> PgError {
        self.broken = true;
        if is_timeout(&e) {
            timed_out(what, deadline.limit)
        } else {
            err(what, format!("connection lost: {e}"))
        }
    }
}

/// A socket timeout: EAGAIN from SO_RCVTIMEO/SO_SNDTIMEO, or our own
/// TimedOut once the deadline has passed.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.broken {
            // Best effort, never waits: a dropped session must not hold up
            // the round that drops it.
            self.stream.close_with(&TERMINATE);
        }
    }
}

/// A session for one-off callers: every call is bounded by its timeout;
/// after a timeout the session is broken and every later call fails at
/// once.
pub struct Client {
    conn: Conn,
    what: String,
}

fn timed_out(what: &str, limit: Duration) -> PgError {
    err(
        what,
        format!("no answer within {:.1}s", limit.as_secs_f64()),
    )
}

/// What a new connection's first moments showed of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// A server process answered the startup packet (an authentication
    /// request, or an error such as "too many clients": either way the
    /// postmaster accepted the connection and started a backend for it).
    Answered,
    /// The TCP connection was accepted (by the kernel, into the listen
    /// backlog) but nothing answered the startup packet by the deadline:
    /// the postmaster is alive but not serving (stopped, or stuck on I/O).
    Stalled(String),
    /// No connection: refused, unreachable or timed out.
    Unreachable(String),
}

/// Open a new connection and send the startup packet; wait for the server's
/// first answer, then close (before any password is sent: the server logs
/// nothing for a client that leaves at that point, as psql does when it
/// asks for a password). A kept session can go on answering while the
/// postmaster takes no new connection; this proves that it does.
pub fn handshake(p: &Params, what: &str, deadline: Deadline) -> Handshake {
    let stalled = || {
        Handshake::Stalled(format!(
            "{what}: the server accepts TCP connections but answered no startup packet within {:.1}s",
            deadline.limit.as_secs_f64()
        ))
    };
    let unreachable = |e: &dyn std::fmt::Display| Handshake::Unreachable(format!("{what}: {e}"));
    let tcp = match resolve(&p.host, p.port)
        .and_then(|addr| TcpStream::connect_timeout(&addr, deadline.remaining()?))
    {
        Ok(t) => t,
        Err(e) => return unreachable(&e),
    };
    let _ = tcp.set_nodelay(true);
    // TLS first where the mode asks for it: a server that answers the SSL
    // request at all has a backend serving this connection.
    let stream = match tls::negotiate(tcp, &p.ssl, &p.host, tls::start(p.ssl.mode), deadline) {
        Ok(s) => s,
        Err(NegotiateError::Io(e)) if is_timeout(&e) => return stalled(),
        Err(NegotiateError::Io(e)) => return unreachable(&e),
        Err(NegotiateError::Refused(_) | NegotiateError::Handshake(_)) => {
            return Handshake::Answered
        }
    };
    let mut c = Conn::on(stream, p);
    let packet = c.startup_packet();
    if let Err(e) = c.send(what, &packet, deadline) {
        return unreachable(&e);
    }
    match c.recv(what, deadline) {
        Ok(_) => Handshake::Answered,
        Err(_) if c.read_timed_out => stalled(),
        Err(e) => unreachable(&e),
    }
}

impl Client {
    pub fn connect(p: &Params, what: &str, timeout: Duration) -> Result<Client, PgError> {
        let conn = Conn::connect(p, what, Deadline::after(timeout))?;
        Ok(Client {
            conn,
            what: what.to_string(),
        })
    }

    pub fn simple_query(
        &mut self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<QueryResult>, PgError> {
        let what = self.what.clone();
        self.conn.simple_query(&what, sql, Deadline::after(timeout))
    }

    /// [`Conn::prepared_query`] within `timeout`.
    pub fn prepared_query(
        &mut self,
        stmts: &[&str],
        timeout: Duration,
    ) -> Result<Vec<QueryResult>, PgError> {
        let what = self.what.clone();
        self.conn
            .prepared_query(&what, stmts, Deadline::after(timeout))
    }

    pub fn backend_pid(&self) -> i32 {
        self.conn.pid
    }

    pub fn is_broken(&self) -> bool {
        self.conn.broken
    }

    pub fn owes_answer(&self) -> bool {
        self.conn.owes_answer()
    }
}

#[cfg(test)]
mod tests;
