//! TLS to PostgreSQL, as libpq does it (clup.conf's pg_sslmode and
//! pg_sslrootcert): the negotiation decisions as pure functions, the rustls
//! client configuration for each mode (no bundled web roots: only the CA
//! file libpq would read), the stream [`wire`] reads and writes, and the
//! `MakeTlsConnect` the `postgres` crate's connections use ([`Connector`]).
//!
//! Must not: log; retry on its own (the callers follow [`retry`]); put a
//! password in an error (none passes through here). The TLS stack is
//! rustls with the `ring` provider: no C library to link besides ring's
//! own small C and assembly, which builds with musl-gcc.
//!
//! [`wire`]: crate::exec::wire

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct};
use rustls::{RootCertStore, SignatureScheme, StreamOwned};

use crate::exec::wire::Deadline;
use crate::model::config::{PgSsl, SslMode};

mod connector;
pub use connector::{Connector, HandshakeError};

// ---------------------------------------------------------------- decisions

/// How a connection attempt begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The StartupMessage straight away.
    Plain,
    /// SSLRequest first.
    SslRequest,
}

/// The first attempt for `mode`: libpq's disable and allow begin in plain
/// text, the others ask for TLS.
pub fn start(mode: SslMode) -> Start {
    match mode {
        SslMode::Disable | SslMode::Allow => Start::Plain,
        _ => Start::SslRequest,
    }
}

/// What to do with the server's one-byte answer to SSLRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnAnswer {
    /// 'S': the TLS handshake.
    Handshake,
    /// 'N' and the mode allows it: the StartupMessage in plain text on the
    /// same connection.
    Plain,
    /// The connection fails with this reason.
    Fail(String),
}

pub fn on_answer(mode: SslMode, answer: u8) -> OnAnswer {
    match answer {
        b'S' => OnAnswer::Handshake,
        b'N' if mode <= SslMode::Prefer => OnAnswer::Plain,
        b'N' => OnAnswer::Fail(format!(
            "the server does not support TLS, but pg_sslmode={mode} requires it"
        )),
        b => OnAnswer::Fail(format!(
            "invalid answer to the TLS request: byte {b:#04x} (not a PostgreSQL server?)"
        )),
    }
}

/// How an attempt failed, for [`retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The TLS handshake failed (a certificate refused, no common cipher).
    Handshake,
    /// The server sent an error at login (e.g. pg_hba.conf has no entry
    /// for a plain-text or for a TLS connection).
    Refused,
    /// Anything else (timeout, connection lost): not tried again.
    Other,
}

/// libpq's second try, on a new connection: prefer falls back to plain
/// text when TLS failed; allow tries TLS when the server refused plain
/// text. At most one second try: the second attempt's answer is `None`.
pub fn retry(mode: SslMode, used_tls: bool, failure: Failure) -> Option<Start> {
    match (mode, used_tls, failure) {
        (_, _, Failure::Other) => None,
        (SslMode::Prefer, true, _) => Some(Start::Plain),
        (SslMode::Allow, false, Failure::Refused) => Some(Start::SslRequest),
        _ => None,
    }
}

/// How the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verify {
    /// Not at all (allow, prefer; require without a root certificate).
    Nothing,
    /// Signed by a CA of the root file (verify-ca; require with one).
    Chain,
    /// And valid for the host name or address connected to (verify-full).
    Full,
}

/// libpq's rule: require with a root certificate file behaves as
/// verify-ca. `have_root` says whether one is given or the default exists.
pub fn verify_for(mode: SslMode, have_root: bool) -> Verify {
    match mode {
        SslMode::VerifyFull => Verify::Full,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::Require if have_root => Verify::Chain,
        _ => Verify::Nothing,
    }
}

// ---------------------------------------------------------------- config

/// The root certificate file for `ssl`: pg_sslrootcert, else libpq's
/// default ~/.postgresql/root.crt.
pub fn root_file(ssl: &PgSsl) -> String {
    if !ssl.rootcert.is_empty() {
        return ssl.rootcert.clone();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_string());
    format!("{home}/.postgresql/root.crt")
}

type CacheKey = (Verify, String, Option<SystemTime>);

/// Client configurations by (verification, root file, its mtime): a probe
/// round reuses them, a replaced CA file is read again.
static CONFIGS: Mutex<Vec<(CacheKey, Arc<ClientConfig>)>> = Mutex::new(Vec::new());

/// The rustls configuration for `ssl`, or why there is none (a missing or
/// unreadable root file with a verifying mode).
pub fn client_config(ssl: &PgSsl) -> Result<Arc<ClientConfig>, String> {
    let root = root_file(ssl);
    let mtime = std::fs::metadata(&root).and_then(|m| m.modified()).ok();
    let verify = verify_for(ssl.mode, !ssl.rootcert.is_empty() || mtime.is_some());
    let key = (verify, root.clone(), mtime);
    let mut cache = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let config = Arc::new(build_config(verify, &root)?);
    cache.retain(|((v, r, _), _)| !(*v == verify && *r == root));
    cache.push((key, config.clone()));
    Ok(config)
}

/// rustls' ring provider. Deprecated since rustls 0.23.48 for lacking
/// post-quantum key exchange, which only the aws-lc-rs provider has; that
/// one needs cmake and a large C library in the static binary, and the
/// OpenSSL of today's PostgreSQL servers (before 3.5) offers no
/// post-quantum group to agree on anyway.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_config(verify: Verify, root: &str) -> Result<ClientConfig, String> {
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(NoCheck(provider())),
        Verify::Chain => Arc::new(ChainOnly(webpki_verifier(root)?)),
        Verify::Full => webpki_verifier(root)?,
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The CA certificates of `root` (PEM).
pub fn read_roots(root: &str) -> Result<RootCertStore, String> {
    let bytes = std::fs::read(root).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!(
                "TLS: root certificate file \"{root}\" does not exist; set pg_sslrootcert \
                 or a pg_sslmode that does not verify the server certificate"
            )
        } else {
            format!("TLS: cannot read root certificate file \"{root}\": {e}")
        }
    })?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| format!("TLS: root certificate file \"{root}\": {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("TLS: root certificate file \"{root}\": {e}"))?;
    }
    if store.is_empty() {
        return Err(format!(
            "TLS: root certificate file \"{root}\" holds no PEM certificate"
        ));
    }
    Ok(store)
}

fn webpki_verifier(root: &str) -> Result<Arc<WebPkiServerVerifier>, String> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(read_roots(root)?), provider())
        .build()
        .map_err(|e| format!("TLS: root certificate file \"{root}\": {e}"))
}

/// require without a root certificate: any certificate, as libpq (the
/// handshake signatures are still checked, so the session is with the
/// holder of the certificate's key).
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: webpki's checks but the name's. webpki checks the chain (and
/// validity dates) before the name, so "not valid for name" means all else
/// passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The name the certificate must carry: the address, or the DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| {
        format!(
            "TLS: '{}' is not a valid host name",
            crate::model::config::clip(host)
        )
    })
}

/// A rustls error as an operator reads it: what is wrong, and with the
/// unknown authority, which CA file was used.
pub fn describe(e: &rustls::Error, ssl: &PgSsl, host: &str) -> String {
    use CertificateError as C;
    let what = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!(
                "certificate signed by an unknown authority (pg_sslrootcert={})",
                root_file(ssl)
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("certificate is not valid for host {host}")
            }
            C::Expired | C::ExpiredContext { .. } => "certificate has expired".to_string(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "certificate is not valid yet".to_string()
            }
            C::BadSignature => "certificate has a bad signature".to_string(),
            other => format!("invalid server certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(a) => format!("the server sent the alert {a:?}"),
        other => other.to_string(),
    };
    format!("TLS: {what}")
}

/// The rustls error inside an I/O error from a TLS stream, if any.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

// ---------------------------------------------------------------- stream

/// A connection to a server: plain TCP or TLS over it. Socket timeouts are
/// set on [`Stream::tcp`] and bound TLS reads and writes too.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Send `last` (and, over TLS, close_notify) without waiting: a
    /// dropped session must not hold up its caller.
    pub fn close_with(&mut self, last: &[u8]) {
        match self {
            Stream::Plain(s) => {
                if s.set_nonblocking(true).is_ok() {
                    let _ = s.write(last);
                }
            }
            Stream::Tls(t) => {
                let _ = t.conn.writer().write_all(last);
                t.conn.send_close_notify();
                if t.sock.set_nonblocking(true).is_ok() {
                    while t.conn.wants_write() {
                        if t.conn.write_tls(&mut t.sock).unwrap_or(0) == 0 {
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// Why [`negotiate`] failed.
#[derive(Debug)]
pub enum NegotiateError {
    /// The socket failed or the deadline passed.
    Io(io::Error),
    /// The server's answer or the mode rule out a connection.
    Refused(String),
    /// The TLS handshake failed (the reason, for the operator).
    Handshake(String),
}

/// Begin a connection on `tcp` as `how` says, by `deadline`: as it is for
/// [`Start::Plain`]; else SSLRequest, then TLS or plain text as
/// [`on_answer`] decides.
pub fn negotiate(
    mut tcp: TcpStream,
    ssl: &PgSsl,
    host: &str,
    how: Start,
    deadline: Deadline,
) -> Result<Stream, NegotiateError> {
    if how == Start::Plain {
        return Ok(Stream::Plain(tcp));
    }
    // Built before anything is sent: a missing CA file fails at once.
    let config = client_config(ssl).map_err(NegotiateError::Handshake)?;
    let name = server_name(host).map_err(NegotiateError::Handshake)?;
    let io = NegotiateError::Io;
    let left = deadline.remaining().map_err(io)?;
    tcp.set_write_timeout(Some(left)).map_err(io)?;
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .map_err(io)?;
    // Exactly one byte: anything after it must come through TLS
    // (CVE-2021-23222).
    let mut answer = [0u8; 1];
    let left = deadline.remaining().map_err(io)?;
    tcp.set_read_timeout(Some(left)).map_err(io)?;
    tcp.read_exact(&mut answer).map_err(io)?;
    match on_answer(ssl.mode, answer[0]) {
        OnAnswer::Plain => Ok(Stream::Plain(tcp)),
        OnAnswer::Fail(m) => Err(NegotiateError::Refused(m)),
        OnAnswer::Handshake => handshake(tcp, config, name, ssl, host, deadline),
    }
}

fn handshake(
    mut tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    ssl: &PgSsl,
    host: &str,
    deadline: Deadline,
) -> Result<Stream, NegotiateError> {
    let mut conn = ClientConnection::new(config, name)
        .map_err(|e| NegotiateError::Handshake(describe(&e, ssl, host)))?;
    while conn.is_handshaking() {
        let left = deadline.remaining().map_err(NegotiateError::Io)?;
        tcp.set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
            .map_err(NegotiateError::Io)?;
        match conn.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match tls_error(&e) {
                    Some(t) => NegotiateError::Handshake(describe(t, ssl, host)),
                    None => NegotiateError::Io(e),
                })
            }
        }
    }
    Ok(Stream::Tls(Box::new(StreamOwned::new(conn, tcp))))
}

#[cfg(test)]
mod tests;
