//! The answer to `troupe.v1.Peer/Heartbeat`: this node's load, served versions, Raft
//! position and clock. It reads shared state only (atomics, the serving table's read lock,
//! Raft's metrics watch), never waits on an actor, so a busy node still answers in time.
//! Also the peer table's rows as Admin shows them.

use std::sync::Arc;
use std::time::Instant;

use troupe_actors::health::measure::since_last_seen;
use troupe_actors::health::probe::unix_micros;
use troupe_actors::table::LocalState;
use troupe_actors::{PeerView, TreeView};
use troupe_consensus::{Metadata, Role};
use troupe_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, NodeLoad, PeerHealthEntry, ServedVersion,
};

pub struct HeartbeatResponder {
    node_id: u64,
    metadata: Arc<Metadata>,
    tree: TreeView,
    /// `cluster.backup`, advertised to the peers.
    backup: bool,
}

/// The Raft role as the wire and the shell spell it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}

impl HeartbeatResponder {
    pub fn new(node_id: u64, metadata: Arc<Metadata>, tree: TreeView, backup: bool) -> Self {
        Self {
            node_id,
            metadata,
            tree,
            backup,
        }
    }

    pub fn answer(&self, request: &HeartbeatRequest) -> HeartbeatResponse {
        let received = unix_micros();
        tracing::trace!(
            node_id = self.node_id,
            from = request.from_node,
            "heartbeat"
        );
        let table = &self.tree.table;
        let versions = table
            .local_keys()
            .into_iter()
            .filter(|key| matches!(table.local(key), Some(LocalState::Ready(_))))
            .map(|key| ServedVersion {
                default_for_model: table.serving_version(&key.name).as_deref()
                    == Some(key.version.as_str()),
                model: key.name,
                version: key.version,
            })
            .collect();
        let status = self.metadata.status();
        let serving = self.tree.health.borrow().serving;
        HeartbeatResponse {
            node_id: self.node_id,
            received_unix_micros: received,
            load: Some(NodeLoad {
                queue_depth: self.tree.queue_depth(),
                in_flight: self.tree.in_flight.get(),
            }),
            versions,
            raft_role: role_name(status.role).to_owned(),
            term: status.term,
            leader: status.leader,
            applied_index: status.applied_index,
            applied_revision: status.applied_revision,
            serving,
            backup: self.backup,
            replied_unix_micros: unix_micros(),
        }
    }
}

/// A peer-table row as `Admin/NodeStatus` shows it.
pub fn peer_health_entry(view: &PeerView, now: Instant) -> PeerHealthEntry {
    let name = |served: &troupe_actors::ServedVersion| served.key.to_string();
    PeerHealthEntry {
        node_id: view.node_id,
        peer_addr: view.peer_addr.clone(),
        state: view.state.as_str().to_owned(),
        missed: view.missed,
        rtt_micros: view.rtt.map(|rtt| rtt.as_micros() as u64),
        clock_offset_micros: view.clock_offset_micros,
        queue_depth: view.queue_depth,
        in_flight: view.in_flight,
        versions: view.versions.iter().map(name).collect(),
        default_versions: view
            .versions
            .iter()
            .filter(|served| served.default_for_model)
            .map(name)
            .collect(),
        raft_role: view.raft_role.clone(),
        term: view.term,
        leader: view.leader,
        applied_index: view.applied_index,
        applied_revision: view.applied_revision,
        sync_lag: view.sync_lag,
        serving: view.serving,
        backup: view.backup,
        last_seen_ms_ago: since_last_seen(view, now).map(|ago| ago.as_millis() as u64),
    }
}
