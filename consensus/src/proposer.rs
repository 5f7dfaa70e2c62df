//! Group commit for metadata writes.
//!
//! openraft 0.9 appends each `client_write` as its own log entry and waits, inside its core
//! loop, until that entry is flushed before it takes the next one: one write per flush, however
//! many clients are waiting. The proposer gathers the proposals that arrive while earlier
//! batches are in flight into one entry ([`ProposalBatch`]), so one Raft round and one flush
//! carry all of them. Each proposal still gets its own outcome, and each change its own revision. A lone
//! writer pays one channel hop; under load the batches grow by themselves.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metadata::{Command, Outcome, Proposal, ProposalBatch};
use crate::types::{NodeId, TypeConfig};

/// Proposals per log entry, at most.
const MAX_BATCH_PROPOSALS: usize = 256;
/// Estimated payload bytes per log entry, at most (a batch stops growing past this).
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Batches submitted to Raft and not yet answered, at most. More in flight only queue inside
/// openraft; fewer leave the disk idle while a batch replicates.
const MAX_IN_FLIGHT: usize = 1;
/// Proposals waiting for a batch, at most; a writer beyond this waits for room.
const QUEUE: usize = 16 * 1024;

/// Why a write did not apply on this node. Sent back to a forwarding follower as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteFailure {
    /// This node is not the leader; the leader, if known.
    ForwardToLeader(Option<NodeId>),
    Membership(String),
    Fatal(String),
}

impl WriteFailure {
    fn from_raft(
        error: RaftError<NodeId, ClientWriteError<NodeId, crate::types::NodeAddr>>,
    ) -> Self {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                WriteFailure::ForwardToLeader(forward.leader_id)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                WriteFailure::Membership(e.to_string())
            }
            RaftError::Fatal(fatal) => WriteFailure::Fatal(fatal.to_string()),
        }
    }
}

pub type WriteResult = Result<Outcome, WriteFailure>;

struct Pending {
    proposal: Proposal,
    reply: oneshot::Sender<WriteResult>,
}

/// Rough payload size of a proposal, to bound an entry's size.
fn estimated_bytes(proposal: &Proposal) -> usize {
    let command = match &proposal.command {
        Command::RegisterModelVersion {
            name,
            version,
            digest,
            format,
            ..
        } => name.len() + version.len() + digest.len() + format.len(),
        Command::SetModelState { name, version, .. } => name.len() + version.len(),
        Command::SetTaskPriority { name, .. } => name.len(),
        Command::SetSetting { key, value } => key.len() + value.len(),
        Command::ReportModelReadiness {
            name,
            version,
            reason,
            ..
        } => name.len() + version.len() + reason.len(),
    };
    command + proposal.request_id.as_ref().map_or(0, String::len) + 96
}

/// A handle to the proposer task of one node.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the proposer task on `tasks`; it ends when every handle is dropped or `stop` is
    /// cancelled. Each batch's write is a task of `tasks` too.
    pub fn start(raft: Raft<TypeConfig>, tasks: &TaskTracker, stop: CancellationToken) -> Self {
        let (queue, incoming) = mpsc::channel(QUEUE);
        let proposing = run(raft, incoming, tasks.clone());
        crate::runtime::spawn_until_stopped(tasks, &stop, proposing);
        Self { queue }
    }

    /// Submits one proposal to this node's Raft and waits for its outcome.
    pub async fn write(&self, proposal: Proposal) -> WriteResult {
        let (reply, outcome) = oneshot::channel();
        let stopped = || WriteFailure::Fatal("raft has stopped".into());
        self.queue
            .send(Pending { proposal, reply })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

async fn run(raft: Raft<TypeConfig>, mut incoming: mpsc::Receiver<Pending>, tasks: TaskTracker) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(pending) => pending,
            None => match incoming.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        // While every slot is busy, later proposals pile up in the queue: the next batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = estimated_bytes(&first.proposal);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_PROPOSALS && bytes < MAX_BATCH_BYTES {
            match incoming.try_recv() {
                Ok(pending) => {
                    let size = estimated_bytes(&pending.proposal);
                    if bytes + size > MAX_BATCH_BYTES {
                        carried = Some(pending);
                        break;
                    }
                    bytes += size;
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let (proposals, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.proposal, p.reply)).unzip();
            let count = proposals.len();
            match raft.client_write(ProposalBatch(proposals)).await {
                Ok(response) if response.data.len() == count => {
                    for (reply, outcome) in replies.into_iter().zip(response.data) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Ok(response) => {
                    let failure = WriteFailure::Fatal(format!(
                        "the state machine answered {} outcomes for {count} proposals",
                        response.data.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
                Err(error) => {
                    let failure = WriteFailure::from_raft(error);
                    for reply in replies {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
            }
        });
    }
}
