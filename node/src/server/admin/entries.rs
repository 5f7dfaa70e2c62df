//! What the Admin handlers check and how they map metadata to its proto messages: request
//! ids, members, read consistency, and the model, task and setting entries of list and history
//! answers.

use tonic::Status;
use troupe_consensus::metadata::{MetadataState, SettingRecord};
use troupe_consensus::types::NodeAddr;
use troupe_consensus::ReadConsistency;
use troupe_proto::v1::{
    Member, ModelVersionEntry, NodeReadinessEntry, ReadRequest, SettingEntry, TaskPriorityEntry,
};

/// A client's request id (empty: none) follows the name rule, so that what the idempotency
/// window keeps is bounded. Ids troupe assigns itself (and its own actors') are not checked.
pub(crate) fn check_request_id(request_id: &str) -> Result<(), Status> {
    match (!request_id.is_empty())
        .then(|| troupe_proto::names::name_problem(request_id))
        .flatten()
    {
        Some(problem) => Err(Status::invalid_argument(format!("request_id: {problem}"))),
        None => Ok(()),
    }
}

pub(super) fn consistency(request: &ReadRequest) -> ReadConsistency {
    if request.min_revision > 0 {
        ReadConsistency::AtLeast(request.min_revision)
    } else if request.stale {
        ReadConsistency::Stale
    } else {
        ReadConsistency::Linearizable
    }
}

pub(super) fn setting_entry(key: &str, record: &SettingRecord) -> SettingEntry {
    SettingEntry {
        key: key.to_owned(),
        value: record.value.clone(),
        create_revision: record.revisions.create_revision,
        mod_revision: record.revisions.mod_revision,
    }
}

/// Every registered version, as ListModels and History answer them (without this node's
/// local state).
pub(super) fn model_entries(state: &MetadataState) -> Vec<ModelVersionEntry> {
    let mut models = Vec::new();
    for (name, versions) in &state.models {
        for (version, record) in versions {
            models.push(ModelVersionEntry {
                name: name.clone(),
                version: version.clone(),
                digest: record.digest.clone(),
                size_bytes: record.size_bytes,
                format: record.format.clone(),
                precision: record.precision.clone().unwrap_or_default(),
                state: record.state.as_str().to_owned(),
                traffic_weight: record.traffic_weight,
                create_revision: record.revisions.create_revision,
                mod_revision: record.revisions.mod_revision,
                local_state: String::new(),
                nodes: record
                    .nodes
                    .iter()
                    .map(|(node_id, report)| NodeReadinessEntry {
                        node_id: *node_id,
                        state: report.state.as_str().to_owned(),
                        reason: report.reason.clone(),
                        revision: report.revision,
                    })
                    .collect(),
                reason: record.reason.clone(),
            });
        }
    }
    models
}

/// Task priorities in scheduling order.
pub(super) fn task_entries(state: &MetadataState) -> Vec<TaskPriorityEntry> {
    state
        .task_order()
        .into_iter()
        .map(|task| TaskPriorityEntry {
            create_revision: state
                .tasks
                .get(&task.name)
                .map_or(0, |t| t.revisions.create_revision),
            name: task.name,
            priority: task.priority,
            mod_revision: task.mod_revision,
        })
        .collect()
}

pub(super) fn setting_entries(state: &MetadataState) -> Vec<SettingEntry> {
    state
        .settings
        .iter()
        .map(|(key, record)| setting_entry(key, record))
        .collect()
}

pub(super) fn member(id: u64, addr: &NodeAddr) -> Member {
    Member {
        id,
        peer_addr: addr.peer_addr.clone(),
        api_addr: addr.api_addr.clone(),
    }
}

pub(crate) fn check_member(member: Option<Member>) -> Result<(u64, NodeAddr), Status> {
    let member = member.ok_or_else(|| Status::invalid_argument("field 'member' is required"))?;
    if member.id == 0 {
        return Err(Status::invalid_argument(
            "member id 0 is not valid: ids are positive",
        ));
    }
    if let Err(problem) = NodeAddr::check_dialable(&member.peer_addr) {
        return Err(Status::invalid_argument(format!(
            "member {} peer address {problem}",
            member.id
        )));
    }
    if !member.api_addr.is_empty() {
        if let Err(problem) = NodeAddr::check_dialable(&member.api_addr) {
            return Err(Status::invalid_argument(format!(
                "member {} API address {problem}",
                member.id
            )));
        }
    }
    Ok((
        member.id,
        NodeAddr {
            api_addr: member.api_addr,
            peer_addr: member.peer_addr,
        },
    ))
}
