//! `troupe cluster status`, `cluster nodes` and `cluster raft`: the cluster as its members
//! see it, the member list from one node, and one node's Raft position.

use serde::Serialize;

use super::StatusArgs;
use crate::error::CliError;
use crate::peer_health::{print_table as print_peer_table, PeerHealthView};
use crate::remote::{node_status, print_json};

#[derive(Serialize)]
struct NodeView {
    id: u64,
    peer_addr: String,
    api_addr: Option<String>,
    reachable: bool,
    role: Option<String>,
    applied_revision: Option<u64>,
    applied_index: Option<u64>,
    term: Option<u64>,
    /// The node's own sync lag (health gossip), when it answered.
    sync_lag: Option<u64>,
    /// Its peers as its heartbeats see them; empty when it did not answer.
    peers: Vec<PeerHealthView>,
    /// Whether it runs without TLS (`--insecure`), when it answered.
    insecure: Option<bool>,
    /// Why it considers itself removed from the cluster, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<String>,
}

#[derive(Serialize)]
struct ClusterView {
    leader: Option<u64>,
    term: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    nodes: Vec<NodeView>,
}

pub(super) async fn status(args: &StatusArgs) -> Result<(), CliError> {
    let local = node_status(&args.addr).await?;
    let mut nodes = Vec::new();
    for member in &local.members {
        let remote = if member.id == local.id {
            Some(local.clone())
        } else if member.api_addr.is_empty() {
            None
        } else {
            node_status(&member.api_addr).await.ok()
        };
        nodes.push(NodeView {
            id: member.id,
            peer_addr: member.peer_addr.clone(),
            api_addr: (!member.api_addr.is_empty()).then(|| member.api_addr.clone()),
            reachable: remote.is_some(),
            role: remote.as_ref().map(|r| r.role.clone()),
            applied_revision: remote.as_ref().map(|r| r.applied_revision),
            applied_index: remote.as_ref().map(|r| r.applied_index),
            term: remote.as_ref().map(|r| r.term),
            sync_lag: remote.as_ref().map(|r| r.sync_lag),
            insecure: remote.as_ref().map(|r| r.insecure),
            removed: remote
                .as_ref()
                .filter(|r| !r.removed.is_empty())
                .map(|r| r.removed.clone()),
            peers: remote.map_or_else(Vec::new, |r| {
                r.peers.into_iter().map(PeerHealthView::from).collect()
            }),
        });
    }
    let view = ClusterView {
        leader: local.leader,
        term: local.term,
        voters: local.voters.clone(),
        learners: local.learners.clone(),
        nodes,
    };
    if args.json {
        return print_json(&view);
    }
    println!(
        "leader: {}  term: {}",
        view.leader.map_or("none".into(), |l| l.to_string()),
        view.term
    );
    if !local.removed.is_empty() {
        println!("node {}: {}", local.id, local.removed);
    }
    println!(
        "{:>4}  {:<9}  {:>8}  {:<21}  {:<21}  {:<8}",
        "id", "role", "applied", "peer", "api", "security"
    );
    for node in &view.nodes {
        println!(
            "{:>4}  {:<9}  {:>8}  {:<21}  {:<21}  {:<8}",
            node.id,
            node.role.as_deref().unwrap_or("unreachable"),
            node.applied_revision.map_or("-".into(), |r| r.to_string()),
            node.peer_addr,
            node.api_addr.as_deref().unwrap_or("-"),
            match node.insecure {
                Some(true) => "INSECURE",
                Some(false) => "mtls",
                None => "-",
            },
        );
    }
    if view.nodes.iter().any(|n| n.insecure == Some(true)) {
        println!("INSECURE: nodes marked so run without TLS (--insecure): their ports are plaintext and let any peer in");
    }
    print_peer_table(view.nodes.iter().map(|n| (n.id, n.peers.as_slice())));
    Ok(())
}

#[derive(Serialize)]
struct NodeRow {
    id: u64,
    api_addr: String,
    peer_addr: String,
    voter: bool,
    /// As seen from the node asked: "self", up, suspect, down or unknown.
    seen_as: String,
    rtt_micros: Option<u64>,
    role: String,
    applied_revision: Option<u64>,
}

pub(super) async fn nodes(args: &StatusArgs) -> Result<(), CliError> {
    let json = args.json;
    let status = node_status(&args.addr).await?;
    let rows: Vec<NodeRow> = status
        .members
        .iter()
        .map(|m| {
            let peer = status.peers.iter().find(|p| p.node_id == m.id);
            let is_self = m.id == status.id;
            NodeRow {
                id: m.id,
                api_addr: m.api_addr.clone(),
                peer_addr: m.peer_addr.clone(),
                voter: status.voters.contains(&m.id),
                seen_as: if is_self {
                    "self".into()
                } else {
                    peer.map_or("unknown".into(), |p| p.state.clone())
                },
                rtt_micros: peer.and_then(|p| p.rtt_micros),
                role: if is_self {
                    status.role.clone()
                } else {
                    peer.map(|p| p.raft_role.clone()).unwrap_or_default()
                },
                applied_revision: if is_self {
                    Some(status.applied_revision)
                } else {
                    peer.map(|p| p.applied_revision)
                },
            }
        })
        .collect();
    if json {
        return print_json(&rows);
    }
    println!(
        "{:>4}  {:<21}  {:<21}  {:<7}  {:<9}  {:>8}  {:<9}  {:>8}",
        "id", "api", "peer", "member", "seen as", "rtt ms", "role", "applied"
    );
    for row in &rows {
        println!(
            "{:>4}  {:<21}  {:<21}  {:<7}  {:<9}  {:>8}  {:<9}  {:>8}",
            row.id,
            if row.api_addr.is_empty() {
                "-"
            } else {
                &row.api_addr
            },
            row.peer_addr,
            if row.voter { "voter" } else { "learner" },
            row.seen_as,
            row.rtt_micros
                .map_or("-".into(), |r| format!("{:.2}", r as f64 / 1e3)),
            if row.role.is_empty() { "-" } else { &row.role },
            row.applied_revision.map_or("-".into(), |r| r.to_string()),
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct RaftView {
    id: u64,
    role: String,
    term: u64,
    leader: Option<u64>,
    last_log_index: u64,
    committed_index: Option<u64>,
    applied_index: u64,
    applied_revision: u64,
    snapshot_index: u64,
    snapshot_revision: u64,
    purged_index: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    leader_changes: u64,
    sync_lag: u64,
    insecure: bool,
    removed: String,
}

pub(super) async fn raft(args: &StatusArgs) -> Result<(), CliError> {
    let json = args.json;
    let s = node_status(&args.addr).await?;
    let view = RaftView {
        id: s.id,
        role: s.role,
        term: s.term,
        leader: s.leader,
        last_log_index: s.last_log_index,
        committed_index: s.committed_index,
        applied_index: s.applied_index,
        applied_revision: s.applied_revision,
        snapshot_index: s.snapshot_index,
        snapshot_revision: s.snapshot_revision,
        purged_index: s.purged_index,
        voters: s.voters,
        learners: s.learners,
        leader_changes: s.leader_changes,
        sync_lag: s.sync_lag,
        insecure: s.insecure,
        removed: s.removed,
    };
    if json {
        return print_json(&view);
    }
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for (field, value) in [
        ("node", view.id.to_string()),
        ("role", view.role.clone()),
        ("term", view.term.to_string()),
        ("leader", opt(view.leader)),
        ("last log index", view.last_log_index.to_string()),
        ("committed index", opt(view.committed_index)),
        ("applied index", view.applied_index.to_string()),
        ("applied revision", view.applied_revision.to_string()),
        ("snapshot index", view.snapshot_index.to_string()),
        ("snapshot revision", view.snapshot_revision.to_string()),
        ("purged index", view.purged_index.to_string()),
        ("voters", format!("{:?}", view.voters)),
        ("learners", format!("{:?}", view.learners)),
        ("leader changes", view.leader_changes.to_string()),
        ("sync lag (entries)", view.sync_lag.to_string()),
        (
            "security",
            if view.insecure {
                "INSECURE (plaintext)"
            } else {
                "mtls"
            }
            .to_owned(),
        ),
        (
            "removed",
            if view.removed.is_empty() {
                "no".to_owned()
            } else {
                view.removed.clone()
            },
        ),
    ] {
        println!("{field:<19} {value}");
    }
    Ok(())
}
