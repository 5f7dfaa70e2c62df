//! The server side of both ports: accept TCP, tell TLS from plaintext by the first byte, run
//! the handshake off the accept loop (with a deadline, so a silent client holds nothing), and
//! hand tonic connections that carry who the client proved to be ([`ConnInfo`]).
//!
//! A plaintext client of a TLS port is not cut off mid-handshake: its connection is served,
//! and [`crate::gate`] answers each of its calls `UNAUTHENTICATED` with the fix.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::conns::{Activity, Registration, Tracker};
use crate::gate::{Refusal, Refusals};
use crate::identity::Identity;
use crate::tls::TlsState;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the transport learned about a connection.
#[derive(Debug, Clone)]
pub enum Security {
    /// The port runs without TLS (`--insecure`).
    Insecure,
    /// A plaintext client on a TLS port.
    Plaintext,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a client certificate that chains to the CA and is in date; the identity it
    /// names, or why it names none.
    Certified(Result<Identity, String>),
}

/// Per-connection information, in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub security: Security,
    /// The API role a client certificate grants (`spiffe://troupe/role/<role>`).
    pub role: Option<crate::token::Role>,
    /// Whether a call is in flight, for the idle timeout and the connection limit.
    pub activity: Option<Arc<Activity>>,
}

/// A served connection: TLS or plain TCP, with its place among the port's connections.
pub struct Conn {
    io: ServerStream,
    info: ConnInfo,
    registration: Registration,
}

/// An accepted socket, after the TLS handshake or in plaintext: the byte stream both ports
/// (and the OpenAI HTTP port) serve.
pub enum ServerStream {
    Tls(Box<TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            ServerStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            ServerStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            ServerStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            ServerStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
            ServerStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Tls(stream) => stream.is_write_vectored(),
            ServerStream::Plain(stream) => stream.is_write_vectored(),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        let mut info = self.info.clone();
        info.activity = Some(self.registration.activity.clone());
        info
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // A closed connection (idle, or evicted for a new one) reads as end-of-file, so the
        // server lets it go.
        let activity = &this.registration.activity;
        if activity.is_closed() {
            return Poll::Ready(Ok(()));
        }
        activity.park_reader(cx);
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Connections for `Server::serve_with_incoming`; the listener closes when the server drops
/// the stream.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<Result<Conn, std::io::Error>>;

/// Accepts on `listener`. With `tls`, every TLS connection is handshaken with the newest
/// material; handshake failures (an unknown CA, an expired certificate) are logged with the
/// peer's address and counted in `refusals`. `tracker` bounds the open connections and closes
/// idle ones.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
    refusals: Arc<Refusals>,
    tracker: Arc<Tracker>,
    port: &'static str,
) -> Incoming {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut reap = tokio::time::interval(tracker.reap_interval());
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = reap.tick() => {
                    tracker.reap();
                    continue;
                }
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, port, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(registration) = tracker.admit() else {
                if refusals.log_admit(port) {
                    tracing::warn!(port, %remote, "refused a connection: every open connection has a call in flight ([limits] max_connections)");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, tls, refusals) = (tx.clone(), tls.clone(), refusals.clone());
            tokio::spawn(async move {
                let accepted = match tls {
                    None => Some((
                        ServerStream::Plain(tcp),
                        ConnInfo {
                            remote: Some(remote),
                            security: Security::Insecure,
                            role: None,
                            activity: None,
                        },
                    )),
                    Some(tls) => {
                        let activity = registration.activity.clone();
                        tokio::select! {
                            handshaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, remote, &tls)) => match handshaken {
                                Ok(Ok(accepted)) => Some(accepted),
                                Ok(Err(reason)) => {
                                    refusals.refuse(Refusal::BadCertificate, port, Some(remote), &reason);
                                    None
                                }
                                Err(_) => {
                                    refusals.refuse(
                                        Refusal::BadCertificate,
                                        port,
                                        Some(remote),
                                        "the TLS handshake did not finish in time",
                                    );
                                    None
                                }
                            },
                            // Evicted for a newer connection while still handshaking.
                            _ = activity.closing.notified() => None,
                        }
                    }
                };
                if let Some((io, info)) = accepted {
                    let conn = Conn {
                        io,
                        info,
                        registration,
                    };
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &TlsState,
) -> Result<(ServerStream, ConnInfo), String> {
    let mut first = [0u8; 1];
    let peeked = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
    if peeked == 0 {
        return Err("the client closed the connection before sending anything".into());
    }
    if first[0] != TLS_HANDSHAKE {
        return Ok((
            ServerStream::Plain(tcp),
            ConnInfo {
                remote: Some(remote),
                security: Security::Plaintext,
                role: None,
                activity: None,
            },
        ));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current().server.clone());
    let stream = acceptor
        .accept(tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (security, role) = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => (Security::Anonymous, None),
        Some(cert) => {
            let identity = Identity::from_certificate(cert);
            // Only a client certificate grants an API role.
            let role = match identity {
                Ok(Identity::Client(_)) => crate::identity::role_from_certificate(cert),
                _ => None,
            };
            (Security::Certified(identity), role)
        }
    };
    Ok((
        ServerStream::Tls(Box::new(stream)),
        ConnInfo {
            remote: Some(remote),
            security,
            role,
            activity: None,
        },
    ))
}
