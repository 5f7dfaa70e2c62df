//! The metadata state machine's logic, independent of Raft and storage.

pub mod change;
pub mod command;
pub mod state;

pub use change::{Change, ChangeValue};
pub use command::{
    Command, ModelState, NodeModelState, Outcome, Proposal, ProposalBatch, Rejection,
};
pub use state::{
    KeyRevisions, MetadataState, ModelVersionRecord, NodeReadiness, SettingRecord, TaskRecord,
    MAX_REASON_BYTES,
};

#[cfg(test)]
mod tests;
