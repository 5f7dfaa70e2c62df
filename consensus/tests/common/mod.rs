//! The in-process cluster the consensus tests share: real nodes talking Raft over gRPC on
//! 127.0.0.1, each with its own sled directory.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::oneshot;
use troupe_consensus::metadata::{Command, Outcome, Proposal};
use troupe_consensus::types::NodeAddr;
use troupe_consensus::{Metadata, MetadataConfig};
use troupe_transport::PeerTransport;

pub struct TestNode {
    pub metadata: Arc<Metadata>,
    pub stop_server: Option<oneshot::Sender<()>>,
    pub addr: NodeAddr,
}

pub async fn start_node(id: u64, dir: &TempDir) -> TestNode {
    start_node_with(id, dir, |_| {}).await
}

pub async fn start_node_with(
    id: u64,
    dir: &TempDir,
    tweak: impl FnOnce(&mut MetadataConfig),
) -> TestNode {
    start_node_at(id, dir, "127.0.0.1:0", tweak).await
}

/// Starts (or restarts, with the same data dir) node `id` listening on `peer`.
pub async fn start_node_at(
    id: u64,
    dir: &TempDir,
    peer: &str,
    tweak: impl FnOnce(&mut MetadataConfig),
) -> TestNode {
    let listener = tokio::net::TcpListener::bind(peer).await.unwrap();
    let peer_addr = listener.local_addr().unwrap().to_string();
    let addr = NodeAddr {
        api_addr: format!("api-of-{id}"),
        peer_addr: peer_addr.clone(),
    };
    let mut config = MetadataConfig::new(
        id,
        addr.api_addr.clone(),
        peer_addr,
        dir.path().join(format!("node{id}")),
    );
    tweak(&mut config);
    let metadata = Arc::new(
        Metadata::start(
            config,
            Arc::new(PeerTransport::insecure(Duration::from_secs(5))),
        )
        .await
        .unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let service = metadata.peer_service();
    let gate = metadata.transport().peer_gate(metadata.membership());
    let incoming = metadata.transport().incoming(
        listener,
        "peer",
        troupe_transport::ConnLimits::default(),
        Default::default(),
    );
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(gate))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
    });
    TestNode {
        metadata,
        stop_server: Some(stop),
        addr,
    }
}

pub async fn three_nodes(dir: &TempDir) -> Vec<TestNode> {
    three_nodes_with(dir, |_| {}).await
}

pub async fn three_nodes_with(dir: &TempDir, tweak: impl Fn(&mut MetadataConfig)) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node_with(id, dir, &tweak).await);
    }
    let members: BTreeMap<u64, NodeAddr> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u64 + 1, n.addr.clone()))
        .collect();
    nodes[0].metadata.initialize(members.clone()).await.unwrap();
    // Initialising again is harmless.
    nodes[0].metadata.initialize(members).await.unwrap();
    nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    nodes
}

pub fn priority(name: &str, priority: i32) -> Proposal {
    Proposal::new(Command::SetTaskPriority {
        name: name.into(),
        priority,
    })
}

/// Proposes, polling while the cluster has no reachable leader (an election is a
/// condition to wait out, up to a deadline).
pub async fn propose_retrying(metadata: &Metadata, proposal: Proposal) -> Outcome {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        match metadata.propose(proposal.clone()).await {
            Ok(outcome) => return outcome,
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {}
            Err(error) => panic!("propose failed: {error}"),
        }
    }
}

pub async fn stop_node(node: &mut TestNode) {
    if let Some(stop) = node.stop_server.take() {
        let _ = stop.send(());
    }
    node.metadata.shutdown().await.unwrap();
}

/// Waits until every node has applied `revision`, then returns their digests.
pub async fn digests_at(nodes: &[&TestNode], index: u64) -> Vec<(String, u64)> {
    let mut digests = Vec::new();
    for node in nodes {
        node.metadata
            .wait_applied_index(index, Duration::from_secs(15))
            .await
            .unwrap();
    }
    for node in nodes {
        digests.push(node.metadata.state_digest().await);
    }
    digests
}

/// Polls `condition` for up to 15 s (the shared helper, [`troupe_wait::expect`]).
pub async fn troupe_cluster_wait<T>(mut condition: impl FnMut() -> Option<T>) -> T {
    troupe_wait::expect("a cluster condition", Duration::from_secs(15), || {
        std::future::ready(condition())
    })
    .await
}
