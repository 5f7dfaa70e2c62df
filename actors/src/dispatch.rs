//! The request dispatcher: one request's way through the cluster, for Embed and Generate
//! alike.
//!
//! For a request that a client sent to this node, [`Dispatcher::dispatch`]:
//! 1. resolves the route on this node's serving table once. An error that holds on every
//!    node (unknown model, version or task; no active version) ends the request there;
//! 2. lists the candidates: this node when its route resolved, and the peers that
//!    heartbeats say serve the version and that are not down;
//! 3. orders them with the [`Router`]'s strategy;
//! 4. tries them in order, at most `max_attempts`: this node on the route from step 1, a
//!    peer through [`Hops::forward`]. A node that was full or unavailable
//!    ([`Hops::try_next`]) moves the request on to the next one.
//!
//! A request that a peer forwarded here goes to [`Dispatcher::serve_forwarded`]: it waits
//! until this node's table has caught up with the sender's, then is served here or refused,
//! and never forwarded again.
//!
//! The dispatcher counts what it starts: a request served here is in this node's in-flight
//! count, and one forwarded is in the peer's forwarded count, each until the [`Hops`] drops
//! the guard it was given (when the answer is back, or when a generation's stream ends).
//!
//! The request's deadline is enforced here and only here: the wait for this node's table,
//! and each attempt, end when it passes. Batchers and schedulers read the deadline only to
//! skip work that nobody waits for any more.
//!
//! The protocol stays outside: [`Hops`] is implemented by the node's gRPC handlers, which
//! build the request, forward it over the peer port and map errors to status codes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ServeError;
use crate::peers::{InFlight, OwnedInFlightGuard, PeerState, PeerTable, PeerView};
use crate::router::{Candidate, ForwardGuard, Router};
use crate::table::{Route, ServingTable};

/// What the dispatcher needs from a request's protocol.
pub trait Hops: Sync {
    /// A served request (an Embed response, a Generate stream).
    type Answer: Send;
    /// Why a node did not serve it.
    type Error: Send + std::fmt::Display;

    /// Serves the request on this node, on the route the dispatcher resolved. `counted`
    /// keeps the request in this node's in-flight count: hold it as long as the work lives.
    fn here(
        &self,
        route: Route,
        counted: OwnedInFlightGuard,
    ) -> impl Future<Output = Result<Self::Answer, Self::Error>> + Send;

    /// Sends the request to `peer`, asking it to serve at `min_revision` of its serving table
    /// or later. `counted` keeps it in the peer's forwarded count: hold it as long as the work
    /// lives.
    fn forward(
        &self,
        peer: PeerView,
        min_revision: u64,
        counted: ForwardGuard,
    ) -> impl Future<Output = Result<Self::Answer, Self::Error>> + Send;

    /// The request's key for consistent hashing. Called only by that strategy.
    fn routing_key(&self) -> Vec<u8>;

    /// `error` of this node's serving table as the protocol's error.
    fn refusal(&self, error: ServeError) -> Self::Error;

    /// Whether another node may serve after this error: the node was full or unavailable.
    fn try_next(error: &Self::Error) -> bool;
}

/// The request, as the dispatcher sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a str,
    /// Empty for the model's serving version.
    pub version: &'a str,
    /// Empty for the default task.
    pub task: &'a str,
    pub deadline: Instant,
    /// Nodes the request may try (`routing.max_attempts`).
    pub max_attempts: usize,
}

/// Why a request was not served.
#[derive(Debug)]
pub enum Failure<E> {
    /// A node's answer that ends the request (a bad request, an error that holds on every
    /// node), or the last node's when no attempt was left.
    Failed(E),
    /// The deadline passed, while `waiting_on` this node or between two. `last` is the error
    /// of the node tried before, if any.
    Deadline {
        waiting_on: Option<u64>,
        last: Option<E>,
    },
    /// No node serves the model now: none has it loaded and reachable.
    NoNode,
    /// A forwarded request: this node's table did not reach the sender's revision in time.
    Behind { wanted: u64, at: u64 },
}

/// The nodes one request may try, as the dispatcher resolved them.
struct Candidates {
    /// In the router's terms.
    listed: Vec<Candidate>,
    /// This node's route, when it can serve.
    route: Option<Route>,
    /// Why this node cannot, when it cannot.
    local_error: Option<ServeError>,
    /// The peers listed, with what is needed to reach them.
    peers: BTreeMap<u64, PeerView>,
}

/// Routes the requests of one node. Shared by its handlers.
pub struct Dispatcher {
    node_id: u64,
    /// This node is a backup: tried after the primaries.
    backup: bool,
    router: Router,
    table: Arc<ServingTable>,
    peers: Arc<PeerTable>,
    in_flight: Arc<InFlight>,
}

impl Dispatcher {
    pub fn new(
        node_id: u64,
        backup: bool,
        router: Router,
        table: Arc<ServingTable>,
        peers: Arc<PeerTable>,
        in_flight: Arc<InFlight>,
    ) -> Self {
        Self {
            node_id,
            backup,
            router,
            table,
            peers,
            in_flight,
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Serves a client's request here or on a peer (the module's steps 1-4).
    pub async fn dispatch<H: Hops>(
        &self,
        hops: &H,
        ask: Ask<'_>,
    ) -> Result<H::Answer, Failure<H::Error>> {
        // Peers must serve at least what this node's table knows now.
        let revision = self.table.revision();
        let Candidates {
            listed,
            mut route,
            local_error,
            mut peers,
        } = self
            .candidates(&ask)
            .map_err(|e| Failure::Failed(hops.refusal(e)))?;
        let order = self.order(&listed, || hops.routing_key());
        let mut last = local_error.map(|e| hops.refusal(e));
        for node in order.into_iter().take(ask.max_attempts) {
            if Instant::now() >= ask.deadline {
                return Err(Failure::Deadline {
                    waiting_on: None,
                    last,
                });
            }
            let attempt = if node == self.node_id {
                let Some(route) = route.take() else { continue };
                let counted = self.in_flight.enter_owned();
                within(ask.deadline, hops.here(route, counted)).await
            } else {
                let Some(peer) = peers.remove(&node) else {
                    continue;
                };
                let counted = self.router.forwarding(node);
                within(ask.deadline, hops.forward(peer, revision, counted)).await
            };
            match attempt {
                Some(Ok(answer)) => return Ok(answer),
                Some(Err(error)) if H::try_next(&error) => {
                    tracing::debug!(node, %error, "the node could not take the request; trying the next");
                    last = Some(error);
                }
                Some(Err(error)) => return Err(Failure::Failed(error)),
                None => {
                    return Err(Failure::Deadline {
                        waiting_on: Some(node),
                        last,
                    })
                }
            }
        }
        Err(last.map_or(Failure::NoNode, Failure::Failed))
    }

    /// Serves a request a peer forwarded here, once this node's serving table is at
    /// `min_revision` (the sender's when it routed): here or not at all.
    pub async fn serve_forwarded<H: Hops>(
        &self,
        hops: &H,
        ask: Ask<'_>,
        min_revision: u64,
    ) -> Result<H::Answer, Failure<H::Error>> {
        if within(ask.deadline, self.caught_up(min_revision))
            .await
            .is_none()
        {
            return Err(Failure::Behind {
                wanted: min_revision,
                at: self.table.revision(),
            });
        }
        let route = self
            .table
            .route(ask.model, ask.version, ask.task)
            .map_err(|e| Failure::Failed(hops.refusal(e)))?;
        let counted = self.in_flight.enter_owned();
        match within(ask.deadline, hops.here(route, counted)).await {
            Some(answer) => answer.map_err(Failure::Failed),
            None => Err(Failure::Deadline {
                waiting_on: Some(self.node_id),
                last: None,
            }),
        }
    }

    /// Resolves this node's route and lists the nodes that can serve `ask` now. Errs with a
    /// refusal that holds on every node.
    fn candidates(&self, ask: &Ask<'_>) -> Result<Candidates, ServeError> {
        let mut listed = Vec::new();
        let (route, local_error) = match self.table.route(ask.model, ask.version, ask.task) {
            Ok(route) => {
                listed.push(Candidate {
                    node_id: self.node_id,
                    outstanding: self.in_flight.get(),
                    backup: self.backup,
                    suspect: false,
                });
                (Some(route), None)
            }
            Err(error) if error.cluster_wide() => return Err(error),
            Err(error) => (None, Some(error)),
        };
        let mut peers = BTreeMap::new();
        for peer in self.peers.snapshot() {
            let reachable = matches!(peer.state, PeerState::Up | PeerState::Suspect);
            if peer.node_id == self.node_id || !reachable || !peer.serves(ask.model, ask.version) {
                continue;
            }
            listed.push(Candidate {
                node_id: peer.node_id,
                outstanding: peer.in_flight + self.router.forwarded_to(peer.node_id),
                backup: peer.backup,
                suspect: peer.state == PeerState::Suspect,
            });
            peers.insert(peer.node_id, peer);
        }
        Ok(Candidates {
            listed,
            route,
            local_error,
            peers,
        })
    }

    /// The order to try `candidates` in. Only a strategy that reads the ring and the key
    /// makes the dispatcher list the members and build the key.
    fn order(&self, candidates: &[Candidate], routing_key: impl FnOnce() -> Vec<u8>) -> Vec<u64> {
        let (members, key) = if self.router.strategy().reads_key() {
            let members: Vec<u64> = std::iter::once(self.node_id)
                .chain(self.peers.snapshot().iter().map(|p| p.node_id))
                .collect();
            (members, routing_key())
        } else {
            (Vec::new(), Vec::new())
        };
        self.router.order(self.node_id, candidates, &members, &key)
    }

    /// Returns once this node's serving table is at `revision` or later.
    async fn caught_up(&self, revision: u64) {
        let mut changes = self.table.subscribe();
        while self.table.revision() < revision {
            if changes.changed().await.is_err() {
                // The table is gone with the node: never caught up.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// `work`'s output, or `None` when `deadline` passed first.
async fn within<T>(deadline: Instant, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout_at(deadline.into(), work).await.ok()
}

#[cfg(test)]
mod tests;
