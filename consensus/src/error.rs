//! Errors of the metadata facade. Each says whether a retry can help.

use crate::types::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("raft storage under {path} cannot be opened: {reason}")]
    StorageOpen { path: String, reason: String },

    #[error("invalid raft configuration: {0}")]
    Config(String),

    #[error("no leader is known yet (election in progress or no quorum): retry shortly")]
    NoLeader,

    #[error("node {node_id} is not the leader; {}: send membership changes to the leader", match leader { Some(id) => format!("the leader is node {id}"), None => "no leader is known".to_owned() })]
    NotLeader {
        node_id: NodeId,
        leader: Option<NodeId>,
    },

    #[error("leader {leader} at {addr} is unreachable: {reason}")]
    LeaderUnreachable {
        leader: NodeId,
        addr: String,
        reason: String,
    },

    /// A write reached a leader's log (or may have), and then `cause` stopped it: it may or
    /// may not apply.
    #[error("the write was sent to a leader and no outcome came back ({0}): it may or may not have applied; send it again with the same request_id to find out")]
    OutcomeUnknown(Box<MetadataError>),

    #[error("timed out after {millis} ms waiting for {what}")]
    Timeout { what: String, millis: u64 },

    #[error("membership change refused: {0}")]
    Membership(String),

    #[error("raft failed: {0}")]
    Raft(String),

    #[error("this node has shut down")]
    ShutDown,
}

impl MetadataError {
    /// True when the same request may succeed if sent again (after a short wait or to
    /// another node).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            MetadataError::NoLeader
                | MetadataError::LeaderUnreachable { .. }
                | MetadataError::Timeout { .. }
                | MetadataError::OutcomeUnknown(_)
        )
    }
}
