//! The client side: a tonic connector that dials TCP, runs the TLS handshake with the
//! configuration current at that moment, and, when it knows whom it is calling, checks that
//! the server's certificate names that node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::Identity;
use crate::tls::TlsState;

/// Where a connector takes its client configuration from.
#[derive(Clone)]
pub enum ClientSource {
    /// A node's reloadable material: each new connection uses the newest.
    Node(Arc<TlsState>),
    /// A fixed configuration (the CLI, tests).
    Fixed(Arc<ClientConfig>),
}

impl ClientSource {
    fn config(&self) -> Arc<ClientConfig> {
        match self {
            ClientSource::Node(state) => state.current().client.clone(),
            ClientSource::Fixed(config) => config.clone(),
        }
    }
}

/// Dials `host:port` from the request URI over TLS.
#[derive(Clone)]
pub struct TlsConnector {
    pub source: ClientSource,
    /// The identity the server must prove, when the caller knows it (a peer by node id).
    pub expect: Option<Identity>,
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.source.config();
        let expect = self.expect.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone()).map_err(|e| {
                std::io::Error::other(format!("{host:?} is not a name TLS can verify: {e}"))
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    std::io::Error::other(format!("TLS handshake with {host}:{port} failed: {e}"))
                })?;
            if let Some(expect) = expect {
                let proven = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|cert| Identity::from_certificate(cert));
                match proven {
                    Some(Ok(identity)) if identity == expect => {}
                    Some(Ok(identity)) => {
                        return Err(std::io::Error::other(format!(
                            "{host}:{port} proved to be {identity}, not {expect}: the address belongs to another node"
                        )))
                    }
                    Some(Err(reason)) => {
                        return Err(std::io::Error::other(format!(
                            "{host}:{port} is not a troupe node: {reason}"
                        )))
                    }
                    None => {
                        return Err(std::io::Error::other(format!(
                            "{host}:{port} presented no certificate"
                        )))
                    }
                }
            }
            Ok(TokioIo::new(tls))
        })
    }
}
