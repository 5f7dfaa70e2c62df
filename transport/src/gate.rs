//! Who may call: the gates in front of the peer port and the API port, and the refusal
//! counters `/metrics` shows.
//!
//! The peer gate is a tonic interceptor layered over the whole peer server, so every peer
//! RPC, present and future, passes it. It lets a call through only from a certificate that
//! names a node the membership oracle says is a current member, and records that node in the
//! request's extensions as [`VerifiedPeer`], for handlers that must also check what a message
//! claims (a Raft vote names its candidate).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::identity::Identity;
use crate::incoming::{ConnInfo, Security};

/// Why a peer was refused. The set is fixed, so it is safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Plaintext on a TLS port.
    Plaintext,
    /// TLS without a client certificate.
    NoCertificate,
    /// The handshake failed: a certificate from another CA, expired, or not a certificate.
    BadCertificate,
    /// A valid certificate that names no troupe node.
    NoIdentity,
    /// A client certificate (the admin's, say) on the peer port.
    ClientCertificate,
    /// A node certificate of a node that is not a member (removed, or never added).
    NotMember,
    /// A Raft message claiming another sender than the certificate proves.
    WrongSender,
    /// A message no member may send (a term absurdly far ahead, say).
    BadMessage,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::Plaintext,
        Refusal::NoCertificate,
        Refusal::BadCertificate,
        Refusal::NoIdentity,
        Refusal::ClientCertificate,
        Refusal::NotMember,
        Refusal::WrongSender,
        Refusal::BadMessage,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::NoCertificate => "no_certificate",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::NoIdentity => "no_identity",
            Refusal::ClientCertificate => "client_certificate",
            Refusal::NotMember => "not_a_member",
            Refusal::WrongSender => "wrong_sender",
            Refusal::BadMessage => "bad_message",
        }
    }

    /// The gRPC status a refused caller gets.
    pub fn status(self, reason: &str) -> Status {
        let mut status = match self {
            Refusal::Plaintext
            | Refusal::NoCertificate
            | Refusal::BadCertificate
            | Refusal::NoIdentity => Status::unauthenticated(reason),
            Refusal::ClientCertificate | Refusal::NotMember | Refusal::WrongSender => {
                Status::permission_denied(reason)
            }
            Refusal::BadMessage => Status::invalid_argument(reason),
        };
        status
            .metadata_mut()
            .insert(REFUSAL_HEADER, MetadataValue::from_static(self.label()));
        status
    }

    /// The refusal a status carries, if a troupe gate refused the call.
    pub fn of(status: &Status) -> Option<Refusal> {
        let label = status.metadata().get(REFUSAL_HEADER)?.to_str().ok()?;
        Refusal::ALL.into_iter().find(|r| r.label() == label)
    }
}

/// Trailer metadata naming the refusal, so a refused node can tell "you are not a member"
/// from a network error.
pub const REFUSAL_HEADER: &str = "x-troupe-refusal";

/// Refusal counts, and a log that says each one without letting a flood of them flood it.
#[derive(Default)]
pub struct Refusals {
    counts: [AtomicU64; 8],
    log: LogLimit,
}

/// Lets at most [`LOG_BURST`] lines per [`LOG_WINDOW`] through, then says how many it held
/// back, so a flood of bad callers cannot flood the log.
#[derive(Debug, Default)]
pub struct LogLimit {
    window: Mutex<Option<(Instant, u32)>>,
}

impl LogLimit {
    /// Whether this line may be logged.
    pub fn admit(&self, port: &str) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (start, logged) = window.get_or_insert((now, 0));
        if now.duration_since(*start) > LOG_WINDOW {
            if *logged > LOG_BURST {
                tracing::warn!(
                    port,
                    suppressed = *logged - LOG_BURST,
                    "more refused calls were not logged"
                );
            }
            *start = now;
            *logged = 0;
        }
        *logged += 1;
        *logged <= LOG_BURST
    }
}

/// At most this many refusal lines per window; the rest are counted and summed up.
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

impl Refusals {
    /// Counts a refusal and logs it, with the reason and the peer's address.
    pub fn refuse(&self, refusal: Refusal, port: &str, remote: Option<SocketAddr>, reason: &str) {
        self.counts[refusal as usize].fetch_add(1, Ordering::Relaxed);
        if self.log.admit(port) {
            let remote = remote.map_or_else(|| "?".to_owned(), |a| a.to_string());
            tracing::warn!(port, %remote, refusal = refusal.label(), reason, "refused a connection");
        }
    }

    /// Whether a line about this port may be logged now (shares the refusals' rate limit).
    pub fn log_admit(&self, port: &str) -> bool {
        self.log.admit(port)
    }

    pub fn count(&self, refusal: Refusal) -> u64 {
        self.counts[refusal as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .into_iter()
            .map(|r| (r.label(), self.count(r)))
            .collect()
    }

    pub fn total(&self) -> u64 {
        Refusal::ALL.into_iter().map(|r| self.count(r)).sum()
    }
}

/// The caller of a peer RPC, as the gate established it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifiedPeer {
    /// The node proven by its certificate, a current member.
    Node(u64),
    /// The port runs without TLS (`--insecure`): nobody is proven.
    Insecure,
}

impl VerifiedPeer {
    /// The verified caller of `request`. A request that did not pass the gate has none, and
    /// handlers must refuse it.
    pub fn of<T>(request: &Request<T>) -> Option<VerifiedPeer> {
        request.extensions().get::<VerifiedPeer>().copied()
    }
}

/// Says whether a node id is a current member: a voter, a learner, or a node being added.
pub type Membership = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The interceptor in front of the peer port.
#[derive(Clone)]
pub struct PeerGate {
    pub members: Membership,
    pub refusals: Arc<Refusals>,
}

pub const FIX_PLAINTEXT: &str = "this node's peer port requires mTLS with a node certificate of the cluster CA (start every node with --tls-dir; `troupe certs init` makes them), or --insecure on every node for a trusted network";

impl PeerGate {
    fn check(&self, info: Option<&ConnInfo>) -> Result<VerifiedPeer, (Refusal, String)> {
        let Some(info) = info else {
            return Err((
                Refusal::NoCertificate,
                "the connection carries no transport information".into(),
            ));
        };
        match &info.security {
            Security::Insecure => Ok(VerifiedPeer::Insecure),
            Security::Plaintext => Err((Refusal::Plaintext, format!("plaintext connection refused: {FIX_PLAINTEXT}"))),
            Security::Anonymous => Err((
                Refusal::NoCertificate,
                "no client certificate: the peer port accepts only node certificates of the cluster CA".into(),
            )),
            Security::Certified(Err(reason)) => Err((Refusal::NoIdentity, format!("{reason}: the peer port accepts only node certificates"))),
            Security::Certified(Ok(Identity::Client(name))) => Err((
                Refusal::ClientCertificate,
                format!("client certificate {name:?} refused: the peer port accepts only node certificates; clients use the API port"),
            )),
            Security::Certified(Ok(Identity::Node(id))) => {
                if (self.members)(*id) {
                    Ok(VerifiedPeer::Node(*id))
                } else {
                    Err((
                        Refusal::NotMember,
                        format!("node {id} is not a member of this cluster (removed, or not added yet: `troupe cluster add-learner`)"),
                    ))
                }
            }
        }
    }
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let info = request.extensions().get::<ConnInfo>().cloned();
        match self.check(info.as_ref()) {
            Ok(peer) => {
                request.extensions_mut().insert(peer);
                Ok(request)
            }
            Err((refusal, reason)) => {
                self.refusals
                    .refuse(refusal, "peer", info.and_then(|i| i.remote), &reason);
                Err(refusal.status(&reason))
            }
        }
    }
}
