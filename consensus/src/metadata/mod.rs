//! The metadata state machine's logic, independent of Raft and storage.

pub mod change;
pub mod command;
pub mod state;

pub use change::{Change, ChangeValue};
pub use command::{Command, ModelState, Outcome, Proposal, ProposalBatch, Rejection};
pub use state::{KeyRevisions, MetadataState, ModelVersionRecord, SettingRecord, TaskRecord};

#[cfg(test)]
mod tests;
