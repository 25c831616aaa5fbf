//! The `postgres` crate's TLS hook over rustls (tokio-rustls), with the
//! verification of [`super::client_config`]. tokio-postgres itself sends
//! SSLRequest and handles the answer by its own sslmode (disable, prefer,
//! require); `exec::pg` maps pg_sslmode onto it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::model::config::PgSsl;

/// Makes a [`Handshake`] per connection, for the host connected to.
#[derive(Clone)]
pub struct Connector {
    ssl: PgSsl,
}

impl Connector {
    pub fn new(ssl: &PgSsl) -> Connector {
        Connector { ssl: ssl.clone() }
    }
}

/// A failed TLS setup or handshake, described for the operator; `exec::pg`
/// finds it in the error's sources (prefer then falls back to plain text).
#[derive(Debug)]
pub struct HandshakeError(pub String);

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type TlsConnect = Handshake;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, HandshakeError> {
        Ok(Handshake {
            config: super::client_config(&self.ssl).map_err(HandshakeError)?,
            name: super::server_name(host).map_err(HandshakeError)?,
            ssl: self.ssl.clone(),
            host: host.to_string(),
        })
    }
}

/// One handshake, for one host.
pub struct Handshake {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    ssl: PgSsl,
    host: String,
}

type Pending<S> = Pin<Box<dyn Future<Output = Result<Tls<S>, HandshakeError>> + Send>>;

impl<S> TlsConnect<S> for Handshake
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Tls<S>;
    type Error = HandshakeError;
    type Future = Pending<S>;

    fn connect(self, stream: S) -> Pending<S> {
        let Handshake {
            config,
            name,
            ssl,
            host,
        } = self;
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(Tls)
                .map_err(|e| {
                    HandshakeError(match super::tls_error(&e) {
                        Some(t) => super::describe(t, &ssl, &host),
                        None => format!("TLS: {e}"),
                    })
                })
        })
    }
}

/// A TLS session of the `postgres` crate.
pub struct Tls<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Tls<S> {
    /// None: clup's SCRAM runs without channel binding, as the probe
    /// client's does.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tls<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tls<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
