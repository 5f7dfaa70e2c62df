//! The HTTP port's connections: TLS with the API port's certificates (but HTTP/1.1 in ALPN,
//! which is what OpenAI clients speak; the API port offers only h2), plaintext when the node
//! runs insecure, handshakes off the accept loop, and the API port's connection limits.
//!
//! Each connection carries the [`ConnInfo`] the API gate reads (who the client proved to be),
//! so a client certificate with a role works here as it does on the gRPC port.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::ServerConfig;
use troupe_transport::conns::{Registration, Tracker};
use troupe_transport::identity::role_from_certificate;
use troupe_transport::incoming::{ServerStream, HANDSHAKE_TIMEOUT};
use troupe_transport::tls::Material;
use troupe_transport::{ConnInfo, Identity, Refusal, Refusals, Security, TlsState};

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Longest a connection the tracker closed may wait for its reader to notice.
const RECHECK: Duration = Duration::from_secs(1);

/// What the port offers in ALPN.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Accepted connections for `axum::serve`.
pub struct HttpListener {
    accepted: mpsc::Receiver<HttpIo>,
    local: SocketAddr,
}

/// How the port accepts: its TLS material (none when insecure), refusal counts and limits.
pub struct Accept {
    pub tls: Option<Arc<TlsState>>,
    pub refusals: Arc<Refusals>,
    pub tracker: Arc<Tracker>,
}

impl HttpListener {
    /// Accepts on `listener` until the returned listener is dropped.
    pub fn new(listener: TcpListener, accept: Accept) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, accept, sender));
        Ok(Self { accepted, local })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (HttpIo, SocketAddr) {
        match self.accepted.recv().await {
            Some(io) => {
                let remote = io.info.remote.unwrap_or(self.local);
                (io, remote)
            }
            // The accept loop ended (it only does when this listener is gone).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The connection's [`ConnInfo`], for the request extensions (through axum's `ConnectInfo`).
#[derive(Clone, Debug)]
pub struct HttpPeer(pub ConnInfo);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener>>
    for HttpPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> Self {
        let io = stream.io();
        let mut info = io.info.clone();
        info.activity = Some(io.registration.activity.clone());
        Self(info)
    }
}

async fn accept_loop(listener: TcpListener, accept: Accept, sender: mpsc::Sender<HttpIo>) {
    let accept = Arc::new(accept);
    let configs = Arc::new(Http1Configs::default());
    let mut reap = tokio::time::interval(accept.tracker.reap_interval());
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = reap.tick() => {
                accept.tracker.reap();
                continue;
            }
            _ = sender.closed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, port = "http", "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(registration) = accept.tracker.admit() else {
            if accept.refusals.log_admit("http") {
                tracing::warn!(port = "http", %remote, "refused a connection: every open connection has a call in flight ([limits] max_connections)");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let recheck = accept.tracker.reap_interval().min(RECHECK);
        let (sender, accept, configs) = (sender.clone(), accept.clone(), configs.clone());
        tokio::spawn(async move {
            let opened = match &accept.tls {
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
                    match tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        handshake(tcp, remote, &configs.for_material(&tls.current())),
                    )
                    .await
                    {
                        Ok(Ok(opened)) => Some(opened),
                        Ok(Err(reason)) => {
                            accept.refusals.refuse(
                                Refusal::BadCertificate,
                                "http",
                                Some(remote),
                                &reason,
                            );
                            None
                        }
                        Err(_) => {
                            accept.refusals.refuse(
                                Refusal::BadCertificate,
                                "http",
                                Some(remote),
                                "the TLS handshake did not finish in time",
                            );
                            None
                        }
                    }
                }
            };
            if let Some((stream, info)) = opened {
                let io = HttpIo {
                    stream,
                    info,
                    registration,
                    recheck: Box::pin(tokio::time::sleep(recheck)),
                    recheck_every: recheck,
                };
                let _ = sender.send(io).await;
            }
        });
    }
}

/// The API port's server configuration with HTTP/1.1 in ALPN, made again only when the
/// material is reloaded.
#[derive(Default)]
struct Http1Configs {
    last: Mutex<Option<(Arc<Material>, Arc<ServerConfig>)>>,
}

impl Http1Configs {
    fn for_material(&self, material: &Arc<Material>) -> Arc<ServerConfig> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((of, config)) = last.as_ref() {
            if Arc::ptr_eq(of, material) {
                return config.clone();
            }
        }
        let mut config = (*material.server).clone();
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let config = Arc::new(config);
        *last = Some((material.clone(), config.clone()));
        config
    }
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    config: &Arc<ServerConfig>,
) -> Result<(ServerStream, ConnInfo), String> {
    let mut first = [0u8; 1];
    let peeked = tcp.peek(&mut first).await.map_err(|e| e.to_string())?;
    if peeked == 0 {
        return Err("the client closed the connection before sending anything".into());
    }
    if first[0] != TLS_HANDSHAKE {
        // Served, so that the client reads why it is refused (see `openai::authorize`).
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
    let stream = tokio_rustls::TlsAcceptor::from(config.clone())
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
                Ok(Identity::Client(_)) => role_from_certificate(cert),
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

/// A served connection. Closed by the tracker (idle, or evicted for a new client), it reads
/// as end-of-file, so the server lets it go; a reader waiting on the socket looks again every
/// `recheck_every`.
pub struct HttpIo {
    stream: ServerStream,
    info: ConnInfo,
    registration: Registration,
    recheck: Pin<Box<tokio::time::Sleep>>,
    recheck_every: Duration,
}

impl AsyncRead for HttpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.registration.activity.is_closed() {
            return Poll::Ready(Ok(()));
        }
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        while this.recheck.as_mut().poll(cx).is_ready() {
            if this.registration.activity.is_closed() {
                return Poll::Ready(Ok(()));
            }
            let next = tokio::time::Instant::now() + this.recheck_every;
            this.recheck.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl AsyncWrite for HttpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
