//! The protocol-3 messages: what the client sends (startup, queries,
//! the extended protocol's parse/bind/execute, passwords and SASL) and the
//! decoding of what the server answers, with the collection of a query's
//! results. Pure bytes: no socket here.

/// A server message longer than this is refused (the probes read a few KB).
pub(super) const MAX_MESSAGE: usize = 64 << 20;

/// The Terminate message.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

pub(super) fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// A typed message: tag, length (including itself), body.
pub(super) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
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
pub(super) struct Body<'a>(&'a [u8]);

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

pub(super) fn fields(mut b: Body<'_>) -> Result<Fields, String> {
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
    pub(super) error: Option<Fields>,
    /// ParseComplete messages seen.
    pub(super) parsed: usize,
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
