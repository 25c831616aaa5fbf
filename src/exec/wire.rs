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

// ---------------------------------------------------------------- codec

/// A server message longer than this is refused (the probes read a few KB).
const MAX_MESSAGE: usize = 64 << 20;

/// The Terminate message.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// A typed message: tag, length (including itself), body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// StartupMessage (protocol 3.0) with `params` as name/value pairs.
pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        put_cstr(&mut body, k.as_bytes());
        put_cstr(&mut body, v.as_bytes());
    }
    body.push(0);
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Query (simple protocol). A NUL in `sql` would cut it short: refused.
pub fn query(sql: &str) -> Result<Vec<u8>, String> {
    if sql.contains('\0') {
        return Err("a query cannot contain a NUL character".to_string());
    }
    let mut body = Vec::with_capacity(sql.len() + 1);
    put_cstr(&mut body, sql.as_bytes());
    Ok(message(b'Q', &body))
}

/// Parse: prepare `sql` (one statement, no parameters) as `name`.
pub fn parse(name: &str, sql: &str) -> Result<Vec<u8>, String> {
    if sql.contains('\0') || name.contains('\0') {
        return Err("a statement cannot contain a NUL character".to_string());
    }
    let mut body = Vec::with_capacity(name.len() + sql.len() + 4);
    put_cstr(&mut body, name.as_bytes());
    put_cstr(&mut body, sql.as_bytes());
    body.extend_from_slice(&0u16.to_be_bytes());
    Ok(message(b'P', &body))
}

/// Bind the unnamed portal to statement `name` (no parameters, every
/// result column as text), then Execute it for all its rows.
pub fn bind_execute(name: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + 8);
    put_cstr(&mut body, b"");
    put_cstr(&mut body, name.as_bytes());
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = message(b'B', &body);
    out.extend_from_slice(&message(b'E', b"\0\0\0\0\0"));
    out
}

/// Sync: the end of an extended-protocol batch.
pub const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// PasswordMessage (cleartext or md5 hash).
pub fn password(p: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(p.len() + 1);
    put_cstr(&mut body, p);
    message(b'p', &body)
}

/// SASLInitialResponse.
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(mechanism.len() + data.len() + 5);
    put_cstr(&mut body, mechanism.as_bytes());
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

/// SASLResponse.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    message(b'p', data)
}

/// An authentication request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Ok,
    Cleartext,
    Md5([u8; 4]),
    Sasl(Vec<String>),
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    /// Kerberos, GSS, SSPI...: not supported.
    Other(u32),
}

/// The fields of an ErrorResponse or NoticeResponse that clup uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// `S`: ERROR, FATAL, PANIC (possibly localized).
    pub severity: String,
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
}

/// A server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Auth(Auth),
    ParameterStatus(String, String),
    BackendKeyData {
        pid: i32,
        key: i32,
    },
    /// Transaction status: `I` idle, `T` in a transaction, `E` failed one.
    ReadyForQuery(u8),
    RowDescription(u16),
    DataRow(Vec<Option<String>>),
    CommandComplete(String),
    EmptyQueryResponse,
    /// A statement prepared (extended protocol).
    ParseComplete,
    Error(Fields),
    Notice(Fields),
    /// Anything else (NotificationResponse, ...): skipped.
    Other(u8),
}

/// A body being read: every read is checked, so a short or lying message
/// is an error, never a panic.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated message".to_string());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let end = self
            .0
            .iter()
            .position(|&c| c == 0)
            .ok_or("unterminated string in message")?;
        let s = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

fn fields(mut b: Body<'_>) -> Result<Fields, String> {
    let mut f = Fields::default();
    loop {
        let kind = b.take(1)?[0];
        if kind == 0 {
            return Ok(f);
        }
        let v = b.cstr()?;
        match kind {
            b'S' => f.severity = v,
            b'C' => f.code = v,
            b'M' => f.message = v,
            _ => {}
        }
    }
}

/// Decode the first message of `buf`: `Ok(None)` when it is not complete
/// yet, else the message and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Backend, usize)>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(format!("invalid message length {len}"));
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    let mut b = Body(&buf[5..len + 1]);
    let m = match tag {
        b'R' => Backend::Auth(match b.i32()? {
            0 => Auth::Ok,
            3 => Auth::Cleartext,
            5 => {
                let s = b.take(4)?;
                Auth::Md5([s[0], s[1], s[2], s[3]])
            }
            10 => {
                let mut mechs = Vec::new();
                loop {
                    let m = b.cstr()?;
                    if m.is_empty() {
                        break;
                    }
                    mechs.push(m);
                }
                Auth::Sasl(mechs)
            }
            11 => Auth::SaslContinue(b.0.to_vec()),
            12 => Auth::SaslFinal(b.0.to_vec()),
            n => Auth::Other(n as u32),
        }),
        b'S' => Backend::ParameterStatus(b.cstr()?, b.cstr()?),
        b'K' => Backend::BackendKeyData {
            pid: b.i32()?,
            key: b.i32()?,
        },
        b'Z' => Backend::ReadyForQuery(b.take(1)?[0]),
        b'T' => Backend::RowDescription(b.u16()?),
        b'D' => {
            let n = b.u16()?;
            let mut row = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let l = b.i32()?;
                row.push(if l < 0 {
                    None
                } else {
                    Some(String::from_utf8_lossy(b.take(l as usize)?).into_owned())
                });
            }
            Backend::DataRow(row)
        }
        b'C' => Backend::CommandComplete(b.cstr()?),
        b'I' => Backend::EmptyQueryResponse,
        b'1' => Backend::ParseComplete,
        b'E' => Backend::Error(fields(b)?),
        b'N' => Backend::Notice(fields(b)?),
        t => Backend::Other(t),
    };
    Ok(Some((m, len + 1)))
}

/// The result of one statement of a simple query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Text values; NULL is None.
    pub rows: Vec<Vec<Option<String>>>,
    /// The command tag: `SELECT 1`, `UPDATE 3`, `INSERT 0 1`...
    pub tag: String,
}

impl QueryResult {
    /// Rows affected or returned, from the command tag (0 if it has none).
    pub fn count(&self) -> u64 {
        self.tag
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Collects a query's messages into results; pure, so that the
/// sequence rules are tested without a server.
#[derive(Default)]
pub struct Collect {
    results: Vec<QueryResult>,
    current: Option<QueryResult>,
    error: Option<Fields>,
    /// ParseComplete messages seen.
    parsed: usize,
}

impl Collect {
    /// Feed one message; `Some(status)` at ReadyForQuery (the end).
    pub fn feed(&mut self, m: Backend) -> Result<Option<u8>, String> {
        match m {
            Backend::RowDescription(_) => self.current = Some(QueryResult::default()),
            Backend::DataRow(row) => self
                .current
                .get_or_insert_with(QueryResult::default)
                .rows
                .push(row),
            Backend::CommandComplete(tag) => {
                let mut r = self.current.take().unwrap_or_default();
                r.tag = tag;
                self.results.push(r);
            }
            Backend::EmptyQueryResponse => {}
            Backend::ParseComplete => self.parsed += 1,
            // Only the first error counts: the server stops at it.
            Backend::Error(f) => {
                self.error.get_or_insert(f);
            }
            Backend::ReadyForQuery(s) => return Ok(Some(s)),
            Backend::Notice(_) | Backend::ParameterStatus(..) | Backend::Other(_) => {}
            Backend::Auth(_) | Backend::BackendKeyData { .. } => {
                return Err("unexpected message during a query".to_string())
            }
        }
        Ok(None)
    }

    /// The results of the statements that completed, and the error the
    /// server stopped at, if it did.
    pub fn into_parts(self) -> (Vec<QueryResult>, Option<Fields>) {
        (self.results, self.error)
    }

    /// The results, or the error the server sent.
    pub fn finish(self) -> Result<Vec<QueryResult>, Fields> {
        match self.error {
            Some(f) => Err(f),
            None => Ok(self.results),
        }
    }
}

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
mod tests {
    use super::*;

    fn params_for(port: u16) -> Params {
        Params {
            host: "127.0.0.1".to_string(),
            port,
            user: "u".to_string(),
            dbname: "d".to_string(),
            password: Secret::new(""),
            options: String::new(),
            // libpq's default: an SSLRequest first, plain text after 'N'.
            ssl: PgSsl::default(),
        }
    }

    #[test]
    fn handshake_tells_answered_from_stalled_from_unreachable() {
        let limit = Duration::from_millis(300);
        // A listener nobody accepts on: the kernel completes the TCP
        // handshake into the backlog and nothing answers, as with a stopped
        // postmaster.
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = stalled.local_addr().unwrap().port();
        let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
        assert!(
            matches!(h, Handshake::Stalled(ref m) if m.contains("accepts TCP")),
            "{h:?}"
        );

        // A server that asks for a password.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let packet = |s: &mut std::net::TcpStream| {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).unwrap();
                let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                s.read_exact(&mut rest).unwrap();
                rest
            };
            // The SSLRequest (code 80877103): no TLS here.
            assert_eq!(packet(&mut s), 80877103u32.to_be_bytes());
            s.write_all(b"N").unwrap();
            let startup = packet(&mut s);
            assert_eq!(&startup[..4], &[0, 3, 0, 0]);
            s.write_all(&message(b'R', &3u32.to_be_bytes())).unwrap();
            // The client leaves before sending a password.
            let mut buf = [0u8; 16];
            s.read(&mut buf).unwrap()
        });
        let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
        assert_eq!(h, Handshake::Answered);
        assert_eq!(t.join().unwrap(), 0, "nothing sent after the answer");

        // Nothing listens.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let h = handshake(&params_for(port), "probe x", Deadline::after(limit));
        assert!(matches!(h, Handshake::Unreachable(_)), "{h:?}");
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        message(tag, body)
    }

    #[test]
    fn frontend_messages() {
        let s = startup(&[("user", "u"), ("database", "d")]);
        assert_eq!(&s[..4], &(s.len() as u32).to_be_bytes());
        assert_eq!(&s[4..8], &[0, 3, 0, 0]);
        assert_eq!(&s[8..], b"user\0u\0database\0d\0\0");
        assert_eq!(query("SELECT 1").unwrap(), b"Q\0\0\0\x0dSELECT 1\0");
        assert!(query("a\0b").is_err());
        assert_eq!(password(b"pw"), b"p\0\0\0\x07pw\0");
        assert_eq!(
            sasl_initial("SCRAM-SHA-256", b"n,,x"),
            b"p\0\0\0\x1aSCRAM-SHA-256\0\0\0\0\x04n,,x"
        );
        assert_eq!(sasl_response(b"abc"), b"p\0\0\0\x07abc");
        assert_eq!(TERMINATE, *b"X\0\0\0\x04");
        assert_eq!(
            parse("clup0", "SELECT 1").unwrap(),
            b"P\0\0\0\x15clup0\0SELECT 1\0\0\0"
        );
        assert!(parse("clup0", "a\0b").is_err());
        assert_eq!(
            bind_execute("clup1"),
            b"B\0\0\0\x11\0clup1\0\0\0\0\0\0\0E\0\0\0\x09\0\0\0\0\0"
        );
        assert_eq!(SYNC, *b"S\0\0\0\x04");
    }

    #[test]
    fn backend_messages() {
        let d = |b: &[u8]| decode(b).unwrap().unwrap();
        assert_eq!(d(&msg(b'R', &[0, 0, 0, 0])), (Backend::Auth(Auth::Ok), 9));
        assert_eq!(
            d(&msg(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])).0,
            Backend::Auth(Auth::Md5([1, 2, 3, 4]))
        );
        assert_eq!(
            d(&msg(
                b'R',
                b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
            ))
            .0,
            Backend::Auth(Auth::Sasl(vec![
                "SCRAM-SHA-256-PLUS".into(),
                "SCRAM-SHA-256".into()
            ]))
        );
        assert_eq!(
            d(&msg(b'R', b"\0\0\0\x0br=abc")).0,
            Backend::Auth(Auth::SaslContinue(b"r=abc".to_vec()))
        );
        assert_eq!(
            d(&msg(b'R', &[0, 0, 0, 7])).0,
            Backend::Auth(Auth::Other(7))
        );
        assert_eq!(
            d(&msg(b'S', b"TimeZone\0UTC\0")).0,
            Backend::ParameterStatus("TimeZone".into(), "UTC".into())
        );
        assert_eq!(
            d(&msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7])).0,
            Backend::BackendKeyData { pid: 42, key: 7 }
        );
        assert_eq!(d(&msg(b'Z', b"I")).0, Backend::ReadyForQuery(b'I'));
        // Two columns: 'ab' and NULL.
        assert_eq!(
            d(&msg(b'D', b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff")).0,
            Backend::DataRow(vec![Some("ab".into()), None])
        );
        assert_eq!(
            d(&msg(b'C', b"UPDATE 3\0")).0,
            Backend::CommandComplete("UPDATE 3".into())
        );
        assert_eq!(
            d(&msg(
                b'E',
                b"SERROR\0VERROR\0C25006\0Mcannot execute UPDATE in a read-only transaction\0\0"
            ))
            .0,
            Backend::Error(Fields {
                severity: "ERROR".into(),
                code: "25006".into(),
                message: "cannot execute UPDATE in a read-only transaction".into(),
            })
        );
        assert_eq!(d(&msg(b'A', b"x")).0, Backend::Other(b'A'));
    }

    #[test]
    fn partial_and_bad_input() {
        let full = msg(b'C', b"SELECT 1\0");
        for cut in 0..full.len() {
            assert_eq!(decode(&full[..cut]).unwrap(), None, "{cut}");
        }
        // Two messages back to back: the first is taken alone.
        let mut two = full.clone();
        two.extend(msg(b'Z', b"I"));
        let (_, used) = decode(&two).unwrap().unwrap();
        assert_eq!(used, full.len());
        assert!(decode(b"C\0\0\0\x02").is_err(), "length below 4");
        assert!(decode(b"C\x7f\0\0\0").is_err(), "absurd length");
        // Lies inside the body are errors, not panics.
        assert!(decode(&msg(b'D', b"\0\x01\0\0\0\x09ab")).is_err());
        assert!(decode(&msg(b'K', &[0, 0])).is_err());
        assert!(decode(&msg(b'C', b"no nul")).is_err());
        assert!(decode(&msg(b'E', b"Sx")).is_err());
    }

    #[test]
    fn collecting_several_statements() {
        let mut c = Collect::default();
        let feed = |c: &mut Collect, m| c.feed(m).unwrap();
        assert_eq!(feed(&mut c, Backend::RowDescription(1)), None);
        feed(&mut c, Backend::DataRow(vec![Some("1".into())]));
        feed(&mut c, Backend::DataRow(vec![None]));
        feed(&mut c, Backend::CommandComplete("SELECT 2".into()));
        feed(&mut c, Backend::Notice(Fields::default()));
        feed(&mut c, Backend::CommandComplete("UPDATE 0".into()));
        feed(&mut c, Backend::RowDescription(1));
        feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
        assert_eq!(feed(&mut c, Backend::ReadyForQuery(b'I')), Some(b'I'));
        let r = c.finish().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].rows, vec![vec![Some("1".into())], vec![None]]);
        assert_eq!(r[0].count(), 2);
        assert_eq!(r[1].count(), 0);
        assert!(r[2].rows.is_empty());
        let insert = QueryResult {
            rows: vec![],
            tag: "INSERT 0 1".into(),
        };
        assert_eq!(insert.count(), 1);

        let mut c = Collect::default();
        feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
        feed(
            &mut c,
            Backend::Error(Fields {
                severity: "ERROR".into(),
                code: "42P01".into(),
                message: "relation does not exist".into(),
            }),
        );
        feed(&mut c, Backend::ReadyForQuery(b'I'));
        assert_eq!(c.finish().unwrap_err().code, "42P01");
        assert!(Collect::default().feed(Backend::Auth(Auth::Ok)).is_err());
    }

    #[test]
    fn collecting_an_extended_batch() {
        let feed = |c: &mut Collect, m| c.feed(m).unwrap();
        let d = |b: &[u8]| decode(b).unwrap().unwrap().0;
        assert_eq!(d(&msg(b'1', b"")), Backend::ParseComplete);
        assert_eq!(d(&msg(b'2', b"")), Backend::Other(b'2'));
        // Two statements parsed, the second bound and run: no RowDescription
        // (no Describe is sent), DataRows straight away.
        let mut c = Collect::default();
        feed(&mut c, Backend::ParseComplete);
        feed(&mut c, Backend::ParseComplete);
        feed(&mut c, Backend::Other(b'2'));
        feed(&mut c, Backend::DataRow(vec![Some("7".into())]));
        feed(&mut c, Backend::CommandComplete("SELECT 1".into()));
        feed(&mut c, Backend::Other(b'2'));
        feed(&mut c, Backend::CommandComplete("SELECT 0".into()));
        assert_eq!(feed(&mut c, Backend::ReadyForQuery(b'I')), Some(b'I'));
        assert_eq!(c.parsed, 2);
        let r = c.finish().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].rows, vec![vec![Some("7".into())]]);
        assert!(r[1].rows.is_empty());
    }

    #[test]
    fn deadline_bounds_a_silent_server() {
        use std::net::TcpListener;
        let d = Deadline::after(Duration::from_millis(50));
        assert!(d.remaining().unwrap() <= Duration::from_millis(50));
        let past = Deadline {
            at: Instant::now() - Duration::from_millis(1),
            limit: Duration::from_millis(100),
        };
        assert_eq!(
            past.remaining().unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );

        // A listener that accepts (the kernel does) but never answers: the
        // login waits until the deadline, then the error says so.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Params {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
            user: "u".into(),
            dbname: "d".into(),
            password: Secret::new("pw"),
            options: String::new(),
            ssl: PgSsl::default(),
        };
        let started = Instant::now();
        let e = Conn::connect(&p, "test", Deadline::after(Duration::from_millis(300)))
            .err()
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(e.msg, "no answer within 0.3s");
        // Past the deadline: no socket call at all.
        let e = Conn::connect(&p, "test", past).err().unwrap();
        assert_eq!(e.msg, "no answer within 0.1s");
    }

    #[test]
    fn params_compare_sessions() {
        let p = Params {
            host: "10.0.0.1".into(),
            port: 5432,
            user: "u".into(),
            dbname: "d".into(),
            password: Secret::new("pw"),
            options: "-c statement_timeout=1000".into(),
            ssl: PgSsl::default(),
        };
        assert!(p.same_session(&p.clone()));
        let other = Params {
            port: 5433,
            ..p.clone()
        };
        assert!(!p.same_session(&other));
        let other = Params {
            dbname: "postgres".into(),
            ..p.clone()
        };
        assert!(!p.same_session(&other));
        let other = Params {
            ssl: PgSsl {
                mode: crate::model::config::SslMode::VerifyFull,
                rootcert: "/ca.pem".into(),
            },
            ..p.clone()
        };
        assert!(!p.same_session(&other));
    }
}
