//! openraft's type configuration for troupe: what a node is, what the log carries.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::metadata::{Outcome, ProposalBatch};

pub type NodeId = u64;

/// How to reach a node: its public API and its peer (Raft, blobs, forwarding) address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddr {
    pub api_addr: String,
    pub peer_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} peer={}", self.api_addr, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// troupe's Raft: a batch of metadata proposals per entry in, one outcome per proposal out.
    pub TypeConfig:
        D = ProposalBatch,
        R = Vec<Outcome>,
        NodeId = NodeId,
        Node = NodeAddr,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddr>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddr>;
pub type Vote = openraft::Vote<NodeId>;
