//! The gate in front of the API port: who is calling, and may they call this RPC.
//!
//! A tower layer over the whole API server, so every RPC, present and future, passes it. It
//! sees the method path, which a tonic interceptor does not, and asks the server's RBAC table
//! which role the path needs.
//!
//! - Plaintext on a TLS port: `UNAUTHENTICATED`, with the fix (counted as a peer refusal).
//! - `--insecure`: everyone is let in, as [`Credential::Insecure`] with the admin role.
//! - Otherwise the credential is a bearer token (`authorization: Bearer <jwt>`), or else a
//!   client certificate that names a role. A missing or invalid one is `UNAUTHENTICATED`
//!   saying why; a valid one whose role is too low is `PERMISSION_DENIED` naming the role
//!   the RPC needs. Public paths (health) need no credential.
//!
//! Denials are counted by [`Denial`] (a fixed set, safe as metric labels) and logged at a
//! bounded rate. The principal is put in the request's extensions.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::gate::{LogLimit, Refusal, Refusals};
use crate::identity::Identity;
use crate::incoming::{ConnInfo, Security};
use crate::token::{Credential, Denial, Principal, Refused, Role, Verifier};

/// The role an API path needs; `None` for a public path (health checks).
pub type Rbac = fn(&str) -> Option<Role>;

/// Denial counts, and the bounded log of them.
#[derive(Debug, Default)]
pub struct Denials {
    counts: [AtomicU64; 12],
    log: LogLimit,
}

impl Denials {
    fn deny(&self, refused: &Refused, path: &str, info: Option<&ConnInfo>) {
        self.counts[refused.denial as usize].fetch_add(1, Ordering::Relaxed);
        if self.log.admit("api") {
            let remote = info
                .and_then(|i| i.remote)
                .map_or_else(|| "?".to_owned(), |a| a.to_string());
            // The path is the server's own route or an unknown one; bound it either way.
            let path = &path[..path.floor_char_boundary(128)];
            tracing::warn!(%remote, path, denial = refused.denial.label(), reason = %refused.reason, "denied an API call");
        }
    }

    pub fn count(&self, denial: Denial) -> u64 {
        self.counts[denial as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Denial::ALL
            .into_iter()
            .map(|d| (d.label(), self.count(d)))
            .collect()
    }
}

/// The status a denied caller gets.
pub fn denial_status(refused: &Refused) -> Status {
    let mut status = Status::new(refused.denial.code(), refused.reason.clone());
    status.metadata_mut().insert(
        DENIAL_HEADER,
        tonic::metadata::MetadataValue::from_static(refused.denial.label()),
    );
    status
}

/// Trailer metadata naming the denial, for clients and tests.
pub const DENIAL_HEADER: &str = "x-troupe-denial";

/// What the gate checks with.
pub struct ApiAuth {
    /// Token verification; `None` on an insecure node.
    pub verifier: Option<Arc<Verifier>>,
    pub rbac: Rbac,
    pub denials: Arc<Denials>,
    pub refusals: Arc<Refusals>,
}

const PLAINTEXT: &str = "plaintext connection refused: this node serves TLS; connect with --ca FILE (or TROUPE_CA) naming the cluster CA";

impl ApiAuth {
    /// The principal calling `path`, or the status that refuses it.
    pub fn check<B>(&self, request: &http::Request<B>) -> Result<Option<Principal>, Status> {
        let info = request.extensions().get::<ConnInfo>();
        let path = request.uri().path();
        match info.map(|i| &i.security) {
            Some(Security::Plaintext) => {
                self.refusals.refuse(
                    Refusal::Plaintext,
                    "api",
                    info.and_then(|i| i.remote),
                    PLAINTEXT,
                );
                return Err(Refusal::Plaintext.status(PLAINTEXT));
            }
            Some(Security::Insecure) => {
                return Ok(Some(Principal {
                    subject: String::new(),
                    role: Role::Admin,
                    credential: Credential::Insecure,
                }))
            }
            _ => {}
        }
        let Some(needed) = (self.rbac)(path) else {
            return Ok(None);
        };
        let principal = self
            .authenticate(request, info)
            .inspect_err(|refused| self.denials.deny(refused, path, info))
            .map_err(|refused| denial_status(&refused))?;
        if !principal.role.allows(needed) {
            let rpc = path.trim_start_matches('/');
            let refused = Refused {
                denial: Denial::Forbidden,
                reason: format!(
                    "{} has the role '{}'; {} needs '{needed}'",
                    match principal.credential {
                        Credential::Certificate =>
                            format!("client certificate {:?}", principal.subject),
                        _ => "the token".to_owned(),
                    },
                    principal.role,
                    &rpc[..rpc.floor_char_boundary(128)],
                ),
            };
            self.denials.deny(&refused, path, info);
            return Err(denial_status(&refused));
        }
        Ok(Some(principal))
    }

    fn authenticate<B>(
        &self,
        request: &http::Request<B>,
        info: Option<&ConnInfo>,
    ) -> Result<Principal, Refused> {
        let refused = |denial, reason: &str| Refused {
            denial,
            reason: reason.to_owned(),
        };
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let value = value.to_str().map_err(|_| {
                refused(
                    Denial::Malformed,
                    "the authorization header is not ASCII: send `authorization: Bearer <token>`",
                )
            })?;
            let Some(token) = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
            else {
                return Err(refused(
                    Denial::Malformed,
                    "the authorization header is not `Bearer <token>`",
                ));
            };
            let Some(verifier) = &self.verifier else {
                return Err(refused(Denial::UnknownKey, "this node verifies no tokens"));
            };
            return verifier.verify(token.trim());
        }
        if let Some(ConnInfo {
            security: Security::Certified(Ok(identity)),
            role,
            ..
        }) = info
        {
            return match (identity, role) {
                (Identity::Client(name), Some(role)) => Ok(Principal {
                    subject: name.clone(),
                    role: *role,
                    credential: Credential::Certificate,
                }),
                (identity, _) => Err(Refused {
                    denial: Denial::Missing,
                    reason: format!(
                        "the certificate of {identity} grants no API role: send a token (--token; `troupe token issue`) or use a client certificate with a role (`troupe certs add-client`)"
                    ),
                }),
            };
        }
        Err(refused(
            Denial::Missing,
            "no credential: send a bearer token (--token or TROUPE_TOKEN; `troupe token issue` mints one) or a client certificate with a role (--cert/--key)",
        ))
    }
}

/// The tower layer: `Server::builder().layer(ApiGateLayer::new(auth))`.
#[derive(Clone)]
pub struct ApiGateLayer {
    auth: Arc<ApiAuth>,
}

impl ApiGateLayer {
    pub fn new(auth: Arc<ApiAuth>) -> Self {
        Self { auth }
    }
}

impl<S> tower_layer::Layer<S> for ApiGateLayer {
    type Service = ApiGateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiGateService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiGateService<S> {
    inner: S,
    auth: Arc<ApiAuth>,
}

/// The most bytes of `grpc-message` a client is sent: a longer message (one that echoes a
/// client's huge string, say) would exceed the client's header limit and turn the real code
/// into RESOURCE_EXHAUSTED.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// The last word on a status leaving the API port (trailers-only responses, which is how
/// tonic answers a refused unary call):
/// - a body that is not valid protobuf is the client's fault: tonic says INTERNAL, troupe
///   says INVALID_ARGUMENT;
/// - the message is cut to [`MAX_STATUS_MESSAGE_BYTES`].
pub fn edge_status(headers: &mut http::HeaderMap) {
    let decode_error = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers.get("grpc-message").is_some_and(|m| {
            m.as_bytes()
                .starts_with(b"failed%20to%20decode%20Protobuf%20message")
        });
    if decode_error {
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    let Some(message) = headers.get("grpc-message") else {
        return;
    };
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    // Percent-decode, cut at a character boundary, encode again (the gRPC spec's rule:
    // bytes outside 0x20..=0x7E, and '%', are escaped).
    let raw = message.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded);
    let mut end = (MAX_STATUS_MESSAGE_BYTES / 3).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut encoded = String::with_capacity(MAX_STATUS_MESSAGE_BYTES + 16);
    for byte in text[..end].bytes().chain("… (cut)".bytes()) {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    if let Ok(value) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", value);
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> tower_service::Service<http::Request<B>> for ApiGateService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.auth.check(&request) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                let call = self.inner.call(request);
                Box::pin(async move {
                    let mut response = call.await?;
                    edge_status(response.headers_mut());
                    Ok(response)
                })
            }
            Err(status) => {
                let response = status.into_http::<R>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
