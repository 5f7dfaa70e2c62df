//! [`PeerTransport`]: the one place a node builds connections to its peers. Each kind of
//! traffic has a lane of its own (its own HTTP/2 connection per peer, kept and reused), so
//! Raft, heartbeats, forwarded inference and blob transfers never queue behind each other.
//! With TLS, every connection presents this node's certificate and checks that the peer's
//! names the node it is meant to be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::api_gate::{ApiAuth, ApiGateLayer, Denials, Rbac};
use crate::connect::{ClientSource, TlsConnector};
use crate::conns::{ConnLimits, ConnStats, Tracker};
use crate::gate::{Membership, PeerGate, Refusals};
use crate::identity::Identity;
use crate::incoming::Incoming;
use crate::tls::TlsState;
use crate::token::Verifier;

/// A kind of peer traffic, with a connection of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// openraft's AppendEntries, Vote and InstallSnapshot.
    Raft,
    /// Writes and read-index requests a follower forwards to the leader.
    Writes,
    /// Inference forwarded to a peer.
    Forward,
    /// Health gossip.
    Heartbeat,
    /// Model blob transfers (bulk).
    Blob,
}

#[derive(Debug, thiserror::Error)]
#[error("node {node} has an unusable peer address {addr:?}: {reason}")]
pub struct AddressError {
    pub node: u64,
    pub addr: String,
    pub reason: String,
}

/// Builds, caches and secures peer channels.
pub struct PeerTransport {
    tls: Option<Arc<TlsState>>,
    refusals: Arc<Refusals>,
    connect_timeout: Duration,
    channels: Mutex<HashMap<(Lane, u64), (String, Channel)>>,
}

impl PeerTransport {
    /// Plaintext peers (`--insecure`).
    pub fn insecure(connect_timeout: Duration) -> Self {
        Self {
            tls: None,
            refusals: Arc::default(),
            connect_timeout,
            channels: Mutex::default(),
        }
    }

    /// mTLS with this node's reloadable material.
    pub fn tls(state: Arc<TlsState>, connect_timeout: Duration) -> Self {
        Self {
            tls: Some(state),
            refusals: Arc::default(),
            connect_timeout,
            channels: Mutex::default(),
        }
    }

    pub fn tls_state(&self) -> Option<&Arc<TlsState>> {
        self.tls.as_ref()
    }

    /// Refusals on this node's ports, by reason.
    pub fn refusals(&self) -> &Arc<Refusals> {
        &self.refusals
    }

    /// Connections for a server on `listener` (`port` names it in logs): TLS with this
    /// node's material, or plaintext when insecure.
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
        port: &'static str,
        limits: ConnLimits,
        stats: Arc<ConnStats>,
    ) -> Incoming {
        crate::incoming::incoming(
            listener,
            self.tls.clone(),
            self.refusals.clone(),
            Tracker::new(limits, stats),
            port,
        )
    }

    /// The interceptor every peer-port RPC passes: only current members, by certificate.
    pub fn peer_gate(&self, members: Membership) -> PeerGate {
        PeerGate {
            members,
            refusals: self.refusals.clone(),
        }
    }

    /// The layer in front of the API port: plaintext refused on a TLS port, then the
    /// caller's credential checked against `rbac` (nothing is checked when insecure).
    pub fn api_gate(
        &self,
        verifier: Option<Arc<Verifier>>,
        rbac: Rbac,
        denials: Arc<Denials>,
    ) -> ApiGateLayer {
        ApiGateLayer::new(Arc::new(ApiAuth {
            verifier,
            rbac,
            denials,
            refusals: self.refusals.clone(),
        }))
    }

    /// The endpoint for `addr` with the lane's settings.
    fn endpoint(&self, lane: Lane, addr: &str) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        Ok(match lane {
            // A dead peer is noticed between messages too, and forwarded calls go on a
            // connection that is known to be alive.
            Lane::Raft | Lane::Writes | Lane::Forward => endpoint
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true),
            Lane::Heartbeat | Lane::Blob => endpoint,
        })
    }

    /// A lazily connected channel to `addr` that must prove to be `node`.
    fn open(&self, lane: Lane, node: u64, addr: &str) -> Result<Channel, AddressError> {
        let endpoint = self.endpoint(lane, addr).map_err(|reason| AddressError {
            node,
            addr: addr.to_owned(),
            reason,
        })?;
        Ok(match &self.tls {
            None => endpoint.connect_lazy(),
            Some(state) => endpoint.connect_with_connector_lazy(TlsConnector {
                source: ClientSource::Node(state.clone()),
                expect: Some(Identity::Node(node)),
            }),
        })
    }

    /// The `lane` channel to `node` at `addr`: the cached one, or a new one when there is
    /// none or the node's address changed. A broken connection is remade by the channel.
    pub fn channel(&self, lane: Lane, node: u64, addr: &str) -> Result<Channel, AddressError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel)) = channels.get(&(lane, node)) {
            if known == addr {
                return Ok(channel.clone());
            }
        }
        let channel = self.open(lane, node, addr)?;
        channels.insert((lane, node), (addr.to_owned(), channel.clone()));
        Ok(channel)
    }

    /// Forgets a channel (after it failed), so the next call makes a new one.
    pub fn forget(&self, lane: Lane, node: u64) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(lane, node));
    }
}

/// A channel for a client of the API port: plaintext, or TLS with `tls` (server name from
/// `addr`'s host). Connects before returning.
pub async fn connect_client(
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(config) => {
            endpoint
                .connect_with_connector(TlsConnector {
                    source: ClientSource::Fixed(config),
                    expect: None,
                })
                .await
        }
    }
}

/// [`connect_client`], connecting on first use.
pub fn connect_client_lazy(endpoint: Endpoint, tls: Option<Arc<rustls::ClientConfig>>) -> Channel {
    match tls {
        None => endpoint.connect_lazy(),
        Some(config) => endpoint.connect_with_connector_lazy(TlsConnector {
            source: ClientSource::Fixed(config),
            expect: None,
        }),
    }
}
