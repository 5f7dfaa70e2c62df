//! openraft's messages and troupe's proposals as typed protobuf (`troupe.v1.RaftPeer`), both
//! ways. Encoding cannot fail; decoding checks that every required field is there and every
//! enum value is known, and names the first one that is not. Whether a well-formed message
//! makes sense for this node is [`super::guard`]'s job.

use std::collections::{BTreeMap, BTreeSet};

use openraft::error::{InstallSnapshotError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{CommittedLeaderId, EntryPayload, Membership, SnapshotSegmentId};
use troupe_proto::v1 as pb;

use crate::metadata::{
    Command, ModelState, NodeModelState, Outcome, Proposal, ProposalBatch, Rejection,
};
use crate::proposer::{WriteFailure, WriteResult};
use crate::types::{
    Entry, LogId, NodeAddr, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};

/// A message that lacks a field it needs, or carries a value no version of troupe sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {problem}")]
pub struct Malformed {
    pub what: &'static str,
    pub problem: String,
}

fn malformed(what: &'static str, problem: impl Into<String>) -> Malformed {
    Malformed {
        what,
        problem: problem.into(),
    }
}

fn required<T>(field: Option<T>, what: &'static str, name: &str) -> Result<T, Malformed> {
    field.ok_or_else(|| malformed(what, format!("it has no {name}")))
}

// ---- votes, log ids, memberships ----

pub fn vote_to(vote: &Vote) -> pb::RaftVote {
    pb::RaftVote {
        term: vote.leader_id.term,
        node_id: vote.leader_id.node_id,
        committed: vote.committed,
    }
}

fn vote_from(vote: pb::RaftVote) -> Vote {
    if vote.committed {
        Vote::new_committed(vote.term, vote.node_id)
    } else {
        Vote::new(vote.term, vote.node_id)
    }
}

fn required_vote(vote: Option<pb::RaftVote>, what: &'static str) -> Result<Vote, Malformed> {
    required(vote, what, "vote").map(vote_from)
}

pub fn log_id_to(log_id: &LogId) -> pb::LogPosition {
    pb::LogPosition {
        term: log_id.leader_id.term,
        node_id: log_id.leader_id.node_id,
        index: log_id.index,
    }
}

fn log_id_from(position: pb::LogPosition) -> LogId {
    LogId::new(
        CommittedLeaderId::new(position.term, position.node_id),
        position.index,
    )
}

fn option_log_id_to(log_id: &Option<LogId>) -> Option<pb::LogPosition> {
    log_id.as_ref().map(log_id_to)
}

fn option_log_id_from(position: Option<pb::LogPosition>) -> Option<LogId> {
    position.map(log_id_from)
}

fn membership_to(membership: &Membership<NodeId, NodeAddr>) -> pb::Membership {
    pb::Membership {
        configs: membership
            .get_joint_config()
            .iter()
            .map(|voters| pb::VoterSet {
                voters: voters.iter().copied().collect(),
            })
            .collect(),
        nodes: membership
            .nodes()
            .map(|(id, addr)| {
                (
                    *id,
                    pb::RaftNodeAddr {
                        api_addr: addr.api_addr.clone(),
                        peer_addr: addr.peer_addr.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// A membership needs at least one voter set, and no set may be empty: openraft cannot count
/// a quorum of nobody.
fn membership_from(
    membership: Option<pb::Membership>,
    what: &'static str,
) -> Result<Membership<NodeId, NodeAddr>, Malformed> {
    let membership = required(membership, what, "membership")?;
    if membership.configs.is_empty() {
        return Err(malformed(what, "its membership has no voter set"));
    }
    let configs: Vec<BTreeSet<NodeId>> = membership
        .configs
        .into_iter()
        .map(|set| set.voters.into_iter().collect::<BTreeSet<_>>())
        .collect();
    if configs.iter().any(BTreeSet::is_empty) {
        return Err(malformed(what, "its membership has an empty voter set"));
    }
    let nodes: BTreeMap<NodeId, NodeAddr> = membership
        .nodes
        .into_iter()
        .map(|(id, addr)| {
            (
                id,
                NodeAddr {
                    api_addr: addr.api_addr,
                    peer_addr: addr.peer_addr,
                },
            )
        })
        .collect();
    Ok(Membership::new(configs, nodes))
}

fn stored_membership_to(stored: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: option_log_id_to(stored.log_id()),
        membership: Some(membership_to(stored.membership())),
    }
}

fn stored_membership_from(
    stored: Option<pb::StoredMembership>,
    what: &'static str,
) -> Result<StoredMembership, Malformed> {
    let stored = required(stored, what, "stored membership")?;
    Ok(StoredMembership::new(
        option_log_id_from(stored.log_id),
        membership_from(stored.membership, what)?,
    ))
}

// ---- proposals ----

fn model_state_to(state: ModelState) -> pb::ModelStateKind {
    match state {
        ModelState::Loading => pb::ModelStateKind::ModelStateLoading,
        ModelState::Ready => pb::ModelStateKind::ModelStateReady,
        ModelState::Active => pb::ModelStateKind::ModelStateActive,
        ModelState::Retired => pb::ModelStateKind::ModelStateRetired,
        ModelState::Wanted => pb::ModelStateKind::ModelStateWanted,
        ModelState::Failed => pb::ModelStateKind::ModelStateFailed,
    }
}

fn model_state_from(value: i32) -> Result<ModelState, Malformed> {
    Ok(match pb::ModelStateKind::try_from(value) {
        Ok(pb::ModelStateKind::ModelStateLoading) => ModelState::Loading,
        Ok(pb::ModelStateKind::ModelStateReady) => ModelState::Ready,
        Ok(pb::ModelStateKind::ModelStateActive) => ModelState::Active,
        Ok(pb::ModelStateKind::ModelStateRetired) => ModelState::Retired,
        Ok(pb::ModelStateKind::ModelStateWanted) => ModelState::Wanted,
        Ok(pb::ModelStateKind::ModelStateFailed) => ModelState::Failed,
        Ok(pb::ModelStateKind::ModelStateUnspecified) | Err(_) => {
            return Err(malformed(
                "proposal",
                format!("model state {value} is not one of troupe's"),
            ))
        }
    })
}

fn node_model_state_to(state: NodeModelState) -> pb::NodeModelStateKind {
    match state {
        NodeModelState::Loading => pb::NodeModelStateKind::NodeModelStateLoading,
        NodeModelState::Ready => pb::NodeModelStateKind::NodeModelStateReady,
        NodeModelState::Failed => pb::NodeModelStateKind::NodeModelStateFailed,
        NodeModelState::Unloaded => pb::NodeModelStateKind::NodeModelStateUnloaded,
    }
}

fn node_model_state_from(value: i32) -> Result<NodeModelState, Malformed> {
    Ok(match pb::NodeModelStateKind::try_from(value) {
        Ok(pb::NodeModelStateKind::NodeModelStateLoading) => NodeModelState::Loading,
        Ok(pb::NodeModelStateKind::NodeModelStateReady) => NodeModelState::Ready,
        Ok(pb::NodeModelStateKind::NodeModelStateFailed) => NodeModelState::Failed,
        Ok(pb::NodeModelStateKind::NodeModelStateUnloaded) => NodeModelState::Unloaded,
        Ok(pb::NodeModelStateKind::NodeModelStateUnspecified) | Err(_) => {
            return Err(malformed(
                "proposal",
                format!("node model state {value} is not one of troupe's"),
            ))
        }
    })
}

pub fn proposal_to(proposal: &Proposal) -> pb::Proposal {
    use pb::proposal::Command as C;
    let command = match &proposal.command {
        Command::RegisterModelVersion {
            name,
            version,
            digest,
            size_bytes,
            format,
            source,
            precision,
        } => C::RegisterModelVersion(pb::RegisterModelVersionCommand {
            name: name.clone(),
            version: version.clone(),
            digest: digest.clone(),
            size_bytes: *size_bytes,
            format: format.clone(),
            source: source.clone(),
            precision: precision.clone(),
        }),
        Command::SetModelState {
            name,
            version,
            state,
            traffic_weight,
            reason,
            requested_at_unix_ms,
        } => C::SetModelState(pb::SetModelStateCommand {
            name: name.clone(),
            version: version.clone(),
            state: model_state_to(*state).into(),
            traffic_weight: *traffic_weight,
            reason: reason.clone(),
            requested_at_unix_ms: *requested_at_unix_ms,
        }),
        Command::SetTaskPriority { name, priority } => {
            C::SetTaskPriority(pb::SetTaskPriorityCommand {
                name: name.clone(),
                priority: *priority,
            })
        }
        Command::SetSetting { key, value } => C::SetSetting(pb::SetSettingCommand {
            key: key.clone(),
            value: value.clone(),
        }),
        Command::ReportModelReadiness {
            name,
            version,
            node_id,
            state,
            reason,
        } => C::ReportModelReadiness(pb::ReportModelReadinessCommand {
            name: name.clone(),
            version: version.clone(),
            node_id: *node_id,
            state: node_model_state_to(*state).into(),
            reason: reason.clone(),
        }),
    };
    pb::Proposal {
        command: Some(command),
        expected_revision: proposal.expected_revision,
        request_id: proposal.request_id.clone(),
    }
}

pub fn proposal_from(proposal: pb::Proposal) -> Result<Proposal, Malformed> {
    use pb::proposal::Command as C;
    let command = match required(proposal.command, "proposal", "command")? {
        C::RegisterModelVersion(c) => Command::RegisterModelVersion {
            name: c.name,
            version: c.version,
            digest: c.digest,
            size_bytes: c.size_bytes,
            format: c.format,
            source: c.source,
            precision: c.precision,
        },
        C::SetModelState(c) => Command::SetModelState {
            name: c.name,
            version: c.version,
            state: model_state_from(c.state)?,
            traffic_weight: c.traffic_weight,
            reason: c.reason,
            requested_at_unix_ms: c.requested_at_unix_ms,
        },
        C::SetTaskPriority(c) => Command::SetTaskPriority {
            name: c.name,
            priority: c.priority,
        },
        C::SetSetting(c) => Command::SetSetting {
            key: c.key,
            value: c.value,
        },
        C::ReportModelReadiness(c) => Command::ReportModelReadiness {
            name: c.name,
            version: c.version,
            node_id: c.node_id,
            state: node_model_state_from(c.state)?,
            reason: c.reason,
        },
    };
    Ok(Proposal {
        command,
        expected_revision: proposal.expected_revision,
        request_id: proposal.request_id,
    })
}

// ---- entries and AppendEntries ----

fn entry_to(entry: &Entry) -> pb::RaftEntry {
    use pb::raft_entry::Payload;
    let payload = match &entry.payload {
        EntryPayload::Blank => Payload::Blank(true),
        EntryPayload::Normal(batch) => Payload::Proposals(pb::ProposalBatch {
            proposals: batch.0.iter().map(proposal_to).collect(),
        }),
        EntryPayload::Membership(membership) => Payload::Membership(membership_to(membership)),
    };
    pb::RaftEntry {
        log_id: Some(log_id_to(&entry.log_id)),
        payload: Some(payload),
    }
}

fn entry_from(entry: pb::RaftEntry) -> Result<Entry, Malformed> {
    use pb::raft_entry::Payload;
    const WHAT: &str = "log entry";
    let log_id = log_id_from(required(entry.log_id, WHAT, "log id")?);
    let payload = match required(entry.payload, WHAT, "payload")? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Proposals(batch) => EntryPayload::Normal(ProposalBatch(
            batch
                .proposals
                .into_iter()
                .map(proposal_from)
                .collect::<Result<_, _>>()?,
        )),
        Payload::Membership(membership) => {
            EntryPayload::Membership(membership_from(Some(membership), WHAT)?)
        }
    };
    Ok(Entry { log_id, payload })
}

pub fn append_request_to(rpc: &AppendEntriesRequest<TypeConfig>) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to(&rpc.vote)),
        prev_log_id: option_log_id_to(&rpc.prev_log_id),
        entries: rpc.entries.iter().map(entry_to).collect(),
        leader_commit: option_log_id_to(&rpc.leader_commit),
    }
}

pub fn append_request_from(
    rpc: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, Malformed> {
    Ok(AppendEntriesRequest {
        vote: required_vote(rpc.vote, "append-entries request")?,
        prev_log_id: option_log_id_from(rpc.prev_log_id),
        entries: rpc
            .entries
            .into_iter()
            .map(entry_from)
            .collect::<Result<_, _>>()?,
        leader_commit: option_log_id_from(rpc.leader_commit),
    })
}

pub fn append_reply_to(response: &AppendEntriesResponse<NodeId>) -> pb::AppendEntriesReply {
    use pb::append_entries_reply::Result as R;
    let result = match response {
        AppendEntriesResponse::Success => R::Success(true),
        AppendEntriesResponse::PartialSuccess(matching) => R::PartialSuccess(pb::PartialSuccess {
            matching: option_log_id_to(matching),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(true),
        AppendEntriesResponse::HigherVote(vote) => R::HigherVote(vote_to(vote)),
    };
    pb::AppendEntriesReply {
        result: Some(result),
    }
}

pub fn append_reply_from(
    reply: pb::AppendEntriesReply,
) -> Result<AppendEntriesResponse<NodeId>, Malformed> {
    use pb::append_entries_reply::Result as R;
    Ok(
        match required(reply.result, "append-entries reply", "result")? {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(partial) => {
                AppendEntriesResponse::PartialSuccess(option_log_id_from(partial.matching))
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(vote) => AppendEntriesResponse::HigherVote(vote_from(vote)),
        },
    )
}

// ---- votes ----

pub fn vote_request_to(rpc: &VoteRequest<NodeId>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to(&rpc.vote)),
        last_log_id: option_log_id_to(&rpc.last_log_id),
    }
}

pub fn vote_request_from(rpc: pb::VoteRequest) -> Result<VoteRequest<NodeId>, Malformed> {
    Ok(VoteRequest {
        vote: required_vote(rpc.vote, "vote request")?,
        last_log_id: option_log_id_from(rpc.last_log_id),
    })
}

pub fn vote_reply_to(response: &VoteResponse<NodeId>) -> pb::VoteReply {
    pb::VoteReply {
        vote: Some(vote_to(&response.vote)),
        vote_granted: response.vote_granted,
        last_log_id: option_log_id_to(&response.last_log_id),
    }
}

pub fn vote_reply_from(reply: pb::VoteReply) -> Result<VoteResponse<NodeId>, Malformed> {
    Ok(VoteResponse {
        vote: required_vote(reply.vote, "vote reply")?,
        vote_granted: reply.vote_granted,
        last_log_id: option_log_id_from(reply.last_log_id),
    })
}

// ---- snapshots ----

fn snapshot_meta_to(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: option_log_id_to(&meta.last_log_id),
        last_membership: Some(stored_membership_to(&meta.last_membership)),
        snapshot_id: meta.snapshot_id.clone(),
    }
}

fn snapshot_meta_from(
    meta: Option<pb::SnapshotMeta>,
    what: &'static str,
) -> Result<SnapshotMeta, Malformed> {
    let meta = required(meta, what, "snapshot meta")?;
    Ok(SnapshotMeta {
        last_log_id: option_log_id_from(meta.last_log_id),
        last_membership: stored_membership_from(meta.last_membership, what)?,
        snapshot_id: meta.snapshot_id,
    })
}

pub fn snapshot_request_to(rpc: &InstallSnapshotRequest<TypeConfig>) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        vote: Some(vote_to(&rpc.vote)),
        meta: Some(snapshot_meta_to(&rpc.meta)),
        offset: rpc.offset,
        data: rpc.data.clone(),
        done: rpc.done,
    }
}

pub fn snapshot_request_from(
    rpc: pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, Malformed> {
    const WHAT: &str = "install-snapshot request";
    Ok(InstallSnapshotRequest {
        vote: required_vote(rpc.vote, WHAT)?,
        meta: snapshot_meta_from(rpc.meta, WHAT)?,
        offset: rpc.offset,
        data: rpc.data,
        done: rpc.done,
    })
}

fn segment_to(segment: &SnapshotSegmentId) -> pb::SnapshotSegment {
    pb::SnapshotSegment {
        snapshot_id: segment.id.clone(),
        offset: segment.offset,
    }
}

fn segment_from(segment: Option<pb::SnapshotSegment>) -> Result<SnapshotSegmentId, Malformed> {
    let segment = required(segment, "install-snapshot reply", "snapshot segment")?;
    Ok(SnapshotSegmentId {
        id: segment.snapshot_id,
        offset: segment.offset,
    })
}

pub fn snapshot_reply_to(
    result: &Result<InstallSnapshotResponse<NodeId>, InstallSnapshotError>,
) -> pb::InstallSnapshotReply {
    use pb::install_snapshot_reply::Result as R;
    let result = match result {
        Ok(response) => R::Vote(vote_to(&response.vote)),
        Err(InstallSnapshotError::SnapshotMismatch(mismatch)) => {
            R::Mismatch(pb::SnapshotMismatch {
                expect: Some(segment_to(&mismatch.expect)),
                got: Some(segment_to(&mismatch.got)),
            })
        }
    };
    pb::InstallSnapshotReply {
        result: Some(result),
    }
}

pub fn snapshot_reply_from(
    reply: pb::InstallSnapshotReply,
) -> Result<Result<InstallSnapshotResponse<NodeId>, InstallSnapshotError>, Malformed> {
    use pb::install_snapshot_reply::Result as R;
    Ok(
        match required(reply.result, "install-snapshot reply", "result")? {
            R::Vote(vote) => Ok(InstallSnapshotResponse {
                vote: vote_from(vote),
            }),
            R::Mismatch(mismatch) => {
                Err(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: segment_from(mismatch.expect)?,
                    got: segment_from(mismatch.got)?,
                }))
            }
        },
    )
}

// ---- forwarded writes and reads ----

fn rejection_to(rejection: &Rejection) -> pb::Rejection {
    use pb::rejection::Reason as R;
    let reason = match rejection {
        Rejection::UnknownModelVersion { name, version } => {
            R::UnknownModelVersion(pb::ModelVersionRef {
                name: name.clone(),
                version: version.clone(),
            })
        }
        Rejection::VersionExists {
            name,
            version,
            existing_digest,
        } => R::VersionExists(pb::VersionExists {
            name: name.clone(),
            version: version.clone(),
            existing_digest: existing_digest.clone(),
        }),
        Rejection::Invalid { field, reason } => R::Invalid(pb::InvalidField {
            field: field.clone(),
            reason: reason.clone(),
        }),
    };
    pb::Rejection {
        reason: Some(reason),
    }
}

fn rejection_from(rejection: pb::Rejection) -> Result<Rejection, Malformed> {
    use pb::rejection::Reason as R;
    Ok(
        match required(rejection.reason, "propose reply", "rejection")? {
            R::UnknownModelVersion(r) => Rejection::UnknownModelVersion {
                name: r.name,
                version: r.version,
            },
            R::VersionExists(r) => Rejection::VersionExists {
                name: r.name,
                version: r.version,
                existing_digest: r.existing_digest,
            },
            R::Invalid(r) => Rejection::Invalid {
                field: r.field,
                reason: r.reason,
            },
        },
    )
}

pub fn write_result_to(result: &WriteResult) -> pb::ProposeReply {
    use pb::propose_reply::Result as R;
    let result = match result {
        Ok(Outcome::Applied { revision }) => R::Applied(pb::WriteApplied {
            revision: *revision,
            changed: true,
        }),
        Ok(Outcome::Unchanged { revision }) => R::Applied(pb::WriteApplied {
            revision: *revision,
            changed: false,
        }),
        Ok(Outcome::Conflict {
            key,
            current_revision,
            current_value,
        }) => R::Conflict(pb::WriteConflict {
            key: key.clone(),
            current_revision: *current_revision,
            current_value: current_value.clone(),
        }),
        Ok(Outcome::Rejected { reason }) => R::Rejected(rejection_to(reason)),
        Err(WriteFailure::ForwardToLeader(leader)) => {
            R::ForwardToLeader(pb::LeaderHint { leader: *leader })
        }
        Err(WriteFailure::Membership(error)) => R::MembershipError(error.clone()),
        Err(WriteFailure::Fatal(error)) => R::Fatal(error.clone()),
    };
    pb::ProposeReply {
        result: Some(result),
    }
}

pub fn write_result_from(reply: pb::ProposeReply) -> Result<WriteResult, Malformed> {
    use pb::propose_reply::Result as R;
    Ok(match required(reply.result, "propose reply", "result")? {
        R::Applied(applied) if applied.changed => Ok(Outcome::Applied {
            revision: applied.revision,
        }),
        R::Applied(applied) => Ok(Outcome::Unchanged {
            revision: applied.revision,
        }),
        R::Conflict(conflict) => Ok(Outcome::Conflict {
            key: conflict.key,
            current_revision: conflict.current_revision,
            current_value: conflict.current_value,
        }),
        R::Rejected(rejection) => Ok(Outcome::Rejected {
            reason: rejection_from(rejection)?,
        }),
        R::ForwardToLeader(hint) => Err(WriteFailure::ForwardToLeader(hint.leader)),
        R::MembershipError(error) => Err(WriteFailure::Membership(error)),
        R::Fatal(error) => Err(WriteFailure::Fatal(error)),
    })
}

pub fn read_index_to(result: &Result<u64, String>) -> pb::ReadIndexReply {
    use pb::read_index_reply::Result as R;
    pb::ReadIndexReply {
        result: Some(match result {
            Ok(index) => R::Index(*index),
            Err(error) => R::Error(error.clone()),
        }),
    }
}

pub fn read_index_from(reply: pb::ReadIndexReply) -> Result<Result<u64, String>, Malformed> {
    use pb::read_index_reply::Result as R;
    Ok(
        match required(reply.result, "read-index reply", "result")? {
            R::Index(index) => Ok(index),
            R::Error(error) => Err(error),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn addr(n: u64) -> NodeAddr {
        NodeAddr {
            api_addr: format!("127.0.0.1:{}", 7000 + n),
            peer_addr: format!("node{n}:7701"),
        }
    }

    fn every_command() -> Vec<Proposal> {
        let commands = vec![
            Command::RegisterModelVersion {
                name: "minilm".into(),
                version: "v1".into(),
                digest: "ab".repeat(32),
                size_bytes: 90_000_000,
                format: "safetensors".into(),
                source: Some("/models/minilm".into()),
                precision: Some("int8".into()),
            },
            Command::SetModelState {
                name: "minilm".into(),
                version: "v1".into(),
                state: ModelState::Wanted,
                traffic_weight: Some(30),
                reason: None,
                requested_at_unix_ms: Some(1_700_000_000_000),
            },
            Command::SetModelState {
                name: "minilm".into(),
                version: "v0".into(),
                state: ModelState::Failed,
                traffic_weight: None,
                reason: Some("node 2: out of memory".into()),
                requested_at_unix_ms: None,
            },
            Command::SetTaskPriority {
                name: "search".into(),
                priority: -4,
            },
            Command::SetSetting {
                key: "max_batch".into(),
                value: "ünïcode ✓".into(),
            },
            Command::ReportModelReadiness {
                name: "minilm".into(),
                version: "v1".into(),
                node_id: 3,
                state: NodeModelState::Unloaded,
                reason: String::new(),
            },
        ];
        commands
            .into_iter()
            .enumerate()
            .map(|(i, command)| Proposal {
                command,
                expected_revision: (i % 2 == 0).then_some(i as u64),
                request_id: (i % 3 == 0).then(|| format!("req-{i}")),
            })
            .collect()
    }

    #[test]
    fn every_append_survives_the_wire_unchanged() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([2, 3, 4])],
            BTreeMap::from([
                (1, addr(1)),
                (2, addr(2)),
                (3, addr(3)),
                (4, addr(4)),
                (5, addr(5)),
            ]),
        );
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(7, 2),
            prev_log_id: Some(log_id(6, 1, 40)),
            entries: vec![
                Entry {
                    log_id: log_id(7, 2, 41),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(7, 2, 42),
                    payload: EntryPayload::Normal(ProposalBatch(every_command())),
                },
                Entry {
                    log_id: log_id(7, 2, 43),
                    payload: EntryPayload::Membership(membership),
                },
            ],
            leader_commit: Some(log_id(6, 1, 39)),
        };
        let back = append_request_from(append_request_to(&rpc)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{rpc:?}"));
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&rpc).unwrap()
        );

        for response in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::PartialSuccess(Some(log_id(3, 1, 9))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(9, 3)),
        ] {
            assert_eq!(
                append_reply_from(append_reply_to(&response)).unwrap(),
                response
            );
        }
    }

    #[test]
    fn votes_snapshots_and_forwarded_writes_survive_the_wire_unchanged() {
        let vote = VoteRequest {
            vote: Vote::new(5, 3),
            last_log_id: Some(log_id(4, 1, 17)),
        };
        assert_eq!(vote_request_from(vote_request_to(&vote)).unwrap(), vote);
        let reply = VoteResponse {
            vote: Vote::new_committed(5, 3),
            vote_granted: true,
            last_log_id: None,
        };
        assert_eq!(vote_reply_from(vote_reply_to(&reply)).unwrap(), reply);

        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(5, 3),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(5, 3, 1000)),
                last_membership: StoredMembership::new(
                    Some(log_id(1, 1, 2)),
                    Membership::new(
                        vec![BTreeSet::from([1, 2, 3])],
                        BTreeMap::from([(1, addr(1)), (2, addr(2)), (3, addr(3))]),
                    ),
                ),
                snapshot_id: "5-3-1000-7".into(),
            },
            offset: 3 << 20,
            data: vec![0, 1, 2, 255],
            done: false,
        };
        let back = snapshot_request_from(snapshot_request_to(&chunk)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{chunk:?}"));
        let mismatch = Err(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
            expect: SnapshotSegmentId {
                id: "a".into(),
                offset: 0,
            },
            got: SnapshotSegmentId {
                id: "b".into(),
                offset: 9,
            },
        }));
        assert_eq!(
            snapshot_reply_from(snapshot_reply_to(&mismatch)).unwrap(),
            mismatch
        );

        for proposal in every_command() {
            assert_eq!(proposal_from(proposal_to(&proposal)).unwrap(), proposal);
        }
        let results: Vec<WriteResult> = vec![
            Ok(Outcome::Applied { revision: 3 }),
            Ok(Outcome::Unchanged { revision: 4 }),
            Ok(Outcome::Conflict {
                key: "settings/a".into(),
                current_revision: 9,
                current_value: Some("x".into()),
            }),
            Ok(Outcome::Conflict {
                key: "settings/b".into(),
                current_revision: 0,
                current_value: None,
            }),
            Ok(Outcome::Rejected {
                reason: Rejection::Invalid {
                    field: "key".into(),
                    reason: "empty".into(),
                },
            }),
            Ok(Outcome::Rejected {
                reason: Rejection::VersionExists {
                    name: "m".into(),
                    version: "v".into(),
                    existing_digest: "d".into(),
                },
            }),
            Ok(Outcome::Rejected {
                reason: Rejection::UnknownModelVersion {
                    name: "m".into(),
                    version: "v".into(),
                },
            }),
            Err(WriteFailure::ForwardToLeader(Some(2))),
            Err(WriteFailure::ForwardToLeader(None)),
            Err(WriteFailure::Membership("m".into())),
            Err(WriteFailure::Fatal("f".into())),
        ];
        for result in results {
            assert_eq!(write_result_from(write_result_to(&result)).unwrap(), result);
        }
        for result in [Ok(7), Err("not the leader".to_owned())] {
            assert_eq!(read_index_from(read_index_to(&result)).unwrap(), result);
        }
    }

    #[test]
    fn missing_fields_and_unknown_states_are_named() {
        let error = append_request_from(pb::AppendEntriesRequest::default()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed append-entries request: it has no vote"
        );
        let entry_without_payload = pb::AppendEntriesRequest {
            vote: Some(pb::RaftVote::default()),
            entries: vec![pb::RaftEntry {
                log_id: Some(pb::LogPosition::default()),
                payload: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            append_request_from(entry_without_payload)
                .unwrap_err()
                .to_string(),
            "malformed log entry: it has no payload"
        );
        let mut proposal = proposal_to(&every_command()[1]);
        if let Some(pb::proposal::Command::SetModelState(c)) = &mut proposal.command {
            c.state = 99;
        }
        assert_eq!(
            proposal_from(proposal).unwrap_err().to_string(),
            "malformed proposal: model state 99 is not one of troupe's"
        );
        let empty_set = pb::Membership {
            configs: vec![pb::VoterSet { voters: vec![] }],
            nodes: Default::default(),
        };
        assert!(membership_from(Some(empty_set), "log entry").is_err());
        assert!(membership_from(Some(pb::Membership::default()), "log entry").is_err());
        assert!(write_result_from(pb::ProposeReply::default()).is_err());
    }
}
