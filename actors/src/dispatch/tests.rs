//! The dispatcher with a scripted protocol: peers that serve, are full, refuse or never
//! answer. (This node's own batcher is exercised by the node's routing tests, over gRPC.)

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use troupe_consensus::metadata::{ModelState, ModelVersionRecord};

use super::*;
use crate::peers::ServedVersion;
use crate::router::STRATEGIES;
use crate::table::ModelKey;

const LOCAL: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Serve,
    Full,
    BadRequest,
    Hang,
}

#[derive(Debug, PartialEq)]
enum Error {
    Full(u64),
    BadRequest(u64),
    Refused(ServeError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Debug)]
struct Served {
    node: u64,
    _counted: ForwardGuard,
}

struct Scripted {
    scripts: HashMap<u64, Script>,
    tried: Mutex<Vec<u64>>,
    keys_built: AtomicUsize,
}

impl Scripted {
    fn new(scripts: &[(u64, Script)]) -> Self {
        Self {
            scripts: scripts.iter().copied().collect(),
            tried: Mutex::default(),
            keys_built: AtomicUsize::new(0),
        }
    }

    fn tried(&self) -> Vec<u64> {
        self.tried.lock().unwrap().clone()
    }
}

impl Hops for Scripted {
    type Answer = Served;
    type Error = Error;

    async fn here(&self, _route: Route, _counted: OwnedInFlightGuard) -> Result<Served, Error> {
        unreachable!("this node has no batcher in these tests")
    }

    async fn forward(
        &self,
        peer: PeerView,
        _min_revision: u64,
        counted: ForwardGuard,
    ) -> Result<Served, Error> {
        let node = peer.node_id;
        self.tried.lock().unwrap().push(node);
        match self.scripts[&node] {
            Script::Serve => Ok(Served {
                node,
                _counted: counted,
            }),
            Script::Full => Err(Error::Full(node)),
            Script::BadRequest => Err(Error::BadRequest(node)),
            Script::Hang => std::future::pending().await,
        }
    }

    fn routing_key(&self) -> Vec<u8> {
        self.keys_built.fetch_add(1, Ordering::Relaxed);
        b"key".to_vec()
    }

    fn refusal(&self, error: ServeError) -> Error {
        Error::Refused(error)
    }

    fn try_next(error: &Error) -> bool {
        matches!(
            error,
            Error::Full(_) | Error::Refused(ServeError::Loading { .. })
        )
    }
}

fn record(state: ModelState) -> ModelVersionRecord {
    crate::table::version_record(state, 1)
}

/// A node of a cluster where model `m` version `v1` is active, loaded on `peers` and not
/// (yet) on this node.
fn node(strategy: &str, peers: &[u64]) -> Dispatcher {
    let table = Arc::new(ServingTable::default());
    let models = [(
        "m".to_owned(),
        [("v1".to_owned(), record(ModelState::Active))].into(),
    )]
    .into();
    table.set_metadata(5, models, BTreeMap::new(), 1);
    let table_of_peers = Arc::new(PeerTable::default());
    table_of_peers.update(|all| {
        for &id in peers {
            let mut peer = PeerView::new(id, format!("api{id}"), format!("peer{id}"));
            peer.state = PeerState::Up;
            peer.versions = vec![ServedVersion {
                key: ModelKey {
                    name: "m".into(),
                    version: "v1".into(),
                },
                default_for_model: true,
            }];
            all.insert(id, peer);
        }
    });
    Dispatcher::new(
        LOCAL,
        false,
        Router::new(crate::router::strategy(strategy, BTreeMap::new()).unwrap()),
        table,
        table_of_peers,
        Arc::default(),
    )
}

fn ask(model: &str, max_attempts: usize, within: Duration) -> Ask<'_> {
    Ask {
        model,
        version: "",
        task: "",
        deadline: Instant::now() + within,
        max_attempts,
    }
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_full_node_moves_the_request_on_to_the_next() {
    let dispatcher = node("least_outstanding", &[2, 3, 4]);
    let hops = Scripted::new(&[(2, Script::Full), (3, Script::Serve), (4, Script::Serve)]);
    let served = dispatcher.dispatch(&hops, ask("m", 3, LONG)).await.unwrap();
    assert_eq!(served.node, 3);
    assert_eq!(hops.tried(), [2, 3]);
}

#[tokio::test]
async fn attempts_stop_at_max_attempts_with_the_last_nodes_error() {
    let dispatcher = node("least_outstanding", &[2, 3, 4]);
    let hops = Scripted::new(&[(2, Script::Full), (3, Script::Full), (4, Script::Serve)]);
    let failure = dispatcher
        .dispatch(&hops, ask("m", 2, LONG))
        .await
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Failed(Error::Full(3))),
        "{failure:?}"
    );
    assert_eq!(hops.tried(), [2, 3]);
}

#[tokio::test]
async fn an_error_that_is_not_worth_another_node_ends_the_request() {
    let dispatcher = node("least_outstanding", &[2, 3]);
    let hops = Scripted::new(&[(2, Script::BadRequest), (3, Script::Serve)]);
    let failure = dispatcher
        .dispatch(&hops, ask("m", 3, LONG))
        .await
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Failed(Error::BadRequest(2))),
        "{failure:?}"
    );
    assert_eq!(hops.tried(), [2]);
}

#[tokio::test]
async fn an_answer_that_holds_on_every_node_asks_no_peer() {
    let dispatcher = node("least_outstanding", &[2]);
    let hops = Scripted::new(&[(2, Script::Serve)]);
    let failure = dispatcher
        .dispatch(&hops, ask("unknown", 3, LONG))
        .await
        .unwrap_err();
    assert!(
        matches!(
            failure,
            Failure::Failed(Error::Refused(ServeError::UnknownModel { .. }))
        ),
        "{failure:?}"
    );
    assert!(hops.tried().is_empty());
}

#[tokio::test]
async fn with_no_peer_this_nodes_own_reason_is_the_answer() {
    let dispatcher = node("least_outstanding", &[]);
    let hops = Scripted::new(&[]);
    let failure = dispatcher
        .dispatch(&hops, ask("m", 3, LONG))
        .await
        .unwrap_err();
    assert!(
        matches!(
            failure,
            Failure::Failed(Error::Refused(ServeError::Loading { .. }))
        ),
        "{failure:?}"
    );
    // No attempt allowed: this node's reason is still the answer.
    let failure = dispatcher
        .dispatch(&hops, ask("m", 0, LONG))
        .await
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Failed(Error::Refused(_))),
        "{failure:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_the_wait_on_a_node_that_never_answers_and_names_it() {
    let dispatcher = node("least_outstanding", &[2, 3]);
    let hops = Scripted::new(&[(2, Script::Full), (3, Script::Hang)]);
    let failure = dispatcher
        .dispatch(&hops, ask("m", 3, Duration::from_millis(200)))
        .await
        .unwrap_err();
    match failure {
        Failure::Deadline { waiting_on, last } => {
            assert_eq!(waiting_on, Some(3));
            assert_eq!(last, Some(Error::Full(2)));
        }
        other => panic!("{other:?}"),
    }
    // The request is no longer counted at the node it waited on.
    assert_eq!(dispatcher.router().forwarded_to(3), 0);
}

#[tokio::test]
async fn a_forwarded_request_is_counted_while_its_answer_lives() {
    let dispatcher = node("least_outstanding", &[2, 3]);
    let hops = Scripted::new(&[(2, Script::Full), (3, Script::Serve)]);
    let served = dispatcher.dispatch(&hops, ask("m", 3, LONG)).await.unwrap();
    assert_eq!(
        dispatcher.router().forwarded_to(2),
        0,
        "a refusal is answered"
    );
    assert_eq!(dispatcher.router().forwarded_to(3), 1);
    // Counted as outstanding there: the next request goes to node 2 first.
    let hops_next = Scripted::new(&[(2, Script::Serve), (3, Script::Serve)]);
    let next = dispatcher
        .dispatch(&hops_next, ask("m", 3, LONG))
        .await
        .unwrap();
    assert_eq!(next.node, 2);
    drop((served, next));
    assert_eq!(dispatcher.router().forwarded_to(3), 0);
    assert_eq!(dispatcher.router().forwarded_to(2), 0);
}

#[tokio::test]
async fn only_consistent_hashing_builds_the_routing_key() {
    for strategy in STRATEGIES {
        let built = usize::from(strategy == "consistent_hash");
        let dispatcher = node(strategy, &[2, 3]);
        let hops = Scripted::new(&[(2, Script::Serve), (3, Script::Serve)]);
        dispatcher.dispatch(&hops, ask("m", 3, LONG)).await.unwrap();
        assert_eq!(hops.keys_built.load(Ordering::Relaxed), built, "{strategy}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_forwarded_request_waits_for_the_senders_revision_then_routes_here_only() {
    let dispatcher = Arc::new(node("least_outstanding", &[2]));
    let hops = Scripted::new(&[(2, Script::Serve)]);
    // Behind, and it does not catch up in time.
    let failure = dispatcher
        .serve_forwarded(&hops, ask("m", 3, Duration::from_millis(100)), 9)
        .await
        .unwrap_err();
    assert!(
        matches!(failure, Failure::Behind { wanted: 9, at: 5 }),
        "{failure:?}"
    );
    // It catches up while the request waits: then this node's own answer, no peer asked.
    let serving = dispatcher.serve_forwarded(&hops, ask("m", 3, Duration::from_secs(5)), 9);
    tokio::pin!(serving);
    // Polled once, it finds the table behind and waits for it.
    let waiting =
        std::future::poll_fn(|cx| std::task::Poll::Ready(serving.as_mut().poll(cx).is_pending()))
            .await;
    assert!(waiting, "the request did not wait for revision 9");
    let models = [(
        "m".to_owned(),
        [("v1".to_owned(), record(ModelState::Active))].into(),
    )]
    .into();
    dispatcher.table.set_metadata(9, models, BTreeMap::new(), 1);
    let failure = serving.await.unwrap_err();
    assert!(
        matches!(
            failure,
            Failure::Failed(Error::Refused(ServeError::Loading { .. }))
        ),
        "{failure:?}"
    );
    assert!(hops.tried().is_empty());
}
