//! troupe-transport: how troupe processes reach each other, and whom they let in.
//!
//! - [`identity`]: the node or client a certificate names (`spiffe://troupe/node/<id>`).
//! - [`tls`]: PEM files to rustls configurations (ring, the one crypto provider), reloaded
//!   when the files change.
//! - [`certs`]: the cluster CA and the certificates it issues (`troupe certs`).
//! - [`peer`]: [`PeerTransport`], every node-to-node channel, one lane per kind of traffic.
//! - [`connect`]: the client-side TLS connector that also checks the server's node identity.
//! - [`incoming`]: the server side of both ports (TLS or plaintext, handshakes off the accept
//!   loop).
//! - [`conns`]: bounded connections: a limit per port, idle ones closed, the oldest idle one
//!   making room for a new client.
//! - [`gate`]: the interceptor that admits only member nodes to the peer port, and the
//!   refusal counters.
//! - [`token`]: API roles, bearer tokens (JWT, EdDSA/ES256), the JWKS and the signing key.
//! - [`api_gate`]: the layer in front of the API port: credentials and the RBAC check.

pub mod api_gate;
pub mod certs;
pub mod connect;
pub mod conns;
pub mod gate;
pub mod identity;
pub mod incoming;
pub mod peer;
pub mod tls;
pub mod token;

pub use api_gate::{ApiGateLayer, Denials, Rbac};
pub use conns::{ActivityLayer, ConnLimits, ConnStats};
pub use gate::{Membership, PeerGate, Refusal, Refusals, VerifiedPeer};
pub use identity::Identity;
pub use incoming::{incoming, ConnInfo, Incoming, Security};
pub use peer::{connect_client, connect_client_lazy, Lane, PeerTransport};
pub use rustls;
pub use tls::{ClientTls, TlsError, TlsFiles, TlsState};
pub use token::{Principal, Role, TokenPolicy, Verifier};
