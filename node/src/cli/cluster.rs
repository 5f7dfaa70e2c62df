//! `troupe cluster`: form the voter set, change membership, show status.

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_consensus::types::NodeAddr;
use troupe_proto::v1::{ActorTreeRequest, AddLearnerRequest, ClusterInitRequest, Member, NodeRef};

use super::peer_health::{print_table as print_peer_table, PeerHealthView};
use super::remote::{admin, block_on, leader_api, node_status, print_json};
use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Form the cluster from its voters. Idempotent on an initialised cluster.
    Init(InitArgs),
    /// Add a non-voting member (it replicates, and can be promoted).
    AddLearner(AddLearnerArgs),
    /// Make a learner a voter.
    Promote(NodeArgs),
    /// Remove a node from the cluster.
    Remove(NodeArgs),
    /// Leader, term, voters, learners, each node's applied revision, and how each node's
    /// heartbeats see its peers (state, RTT, load, sync lag, clock offset).
    Status(StatusArgs),
    /// One node's actor tree: each actor's status, mailbox depth and restarts, its batchers'
    /// counters, and whether it is serving (and if not, why).
    Actors(ActorsArgs),
}

#[derive(Debug, Args)]
pub struct ActorsArgs {
    /// API address of the node.
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ActorView {
    path: String,
    kind: String,
    status: String,
    mailbox_depth: u64,
    restarts: u64,
    detail: String,
}

#[derive(Serialize)]
struct BatcherView {
    model: String,
    version: String,
    batches: u64,
    rows: u64,
    requests: u64,
    rejected_full: u64,
    expired: u64,
    cancelled: u64,
    failed: u64,
    queued: u64,
    in_flight: u64,
    worker_restarts: u64,
    lane_depths: Vec<u64>,
}

#[derive(Serialize)]
struct TreeView {
    serving: bool,
    not_serving_reasons: Vec<String>,
    revision: u64,
    actors: Vec<ActorView>,
    batchers: Vec<BatcherView>,
}

pub(super) async fn actors(args: &ActorsArgs) -> Result<(), CliError> {
    let tree = admin(&args.addr)
        .await?
        .actor_tree(ActorTreeRequest {})
        .await?
        .into_inner();
    let view = TreeView {
        serving: tree.serving,
        not_serving_reasons: tree.not_serving_reasons,
        revision: tree.revision,
        actors: tree
            .actors
            .into_iter()
            .map(|a| ActorView {
                path: a.path,
                kind: a.kind,
                status: a.status,
                mailbox_depth: a.mailbox_depth,
                restarts: a.restarts,
                detail: a.detail,
            })
            .collect(),
        batchers: tree
            .batchers
            .into_iter()
            .map(|b| BatcherView {
                model: b.model,
                version: b.version,
                batches: b.batches,
                rows: b.rows,
                requests: b.requests,
                rejected_full: b.rejected_full,
                expired: b.expired,
                cancelled: b.cancelled,
                failed: b.failed,
                queued: b.queued,
                in_flight: b.in_flight,
                worker_restarts: b.worker_restarts,
                lane_depths: b.lane_depths,
            })
            .collect(),
    };
    if args.json {
        return print_json(&view);
    }
    if view.serving {
        println!("serving (metadata revision {})", view.revision);
    } else {
        println!("NOT SERVING: {}", view.not_serving_reasons.join("; "));
    }
    println!(
        "\n{:<48} {:<16} {:<10} {:>7} {:>8}  detail",
        "actor", "kind", "status", "mailbox", "restarts"
    );
    for a in &view.actors {
        println!(
            "{:<48} {:<16} {:<10} {:>7} {:>8}  {}",
            a.path, a.kind, a.status, a.mailbox_depth, a.restarts, a.detail
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// API address of any member.
    #[arg(long)]
    pub addr: String,
    /// Voters as ID=PEER_ADDR[@API_ADDR], comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub members: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AddLearnerArgs {
    /// The new member as ID=PEER_ADDR[@API_ADDR].
    pub member: String,
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    pub id: u64,
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

/// Parses `ID=PEER[@API]`.
pub fn parse_member(text: &str) -> Result<Member, CliError> {
    let usage = |problem: &str| {
        CliError::Usage(format!(
            "member {text:?} is not ID=PEER_ADDR[@API_ADDR]{problem}, e.g. 1=127.0.0.1:7701@127.0.0.1:7700 or 1=node1:7701@node1:7700"
        ))
    };
    let (id, addrs) = text.split_once('=').ok_or_else(|| usage(""))?;
    let id: u64 = match id.trim().parse() {
        Ok(id) if id > 0 => id,
        _ => return Err(usage(": the id must be a positive integer")),
    };
    let (peer, api) = match addrs.split_once('@') {
        Some((peer, api)) => (peer, api),
        None => (addrs, ""),
    };
    for (what, addr) in [("peer", peer), ("API", api)] {
        if what == "API" && addr.is_empty() {
            continue;
        }
        if let Err(problem) = NodeAddr::check_dialable(addr) {
            return Err(usage(&format!(": the {what} address {problem}")));
        }
    }
    Ok(Member {
        id,
        peer_addr: peer.to_owned(),
        api_addr: api.to_owned(),
    })
}

#[derive(Serialize)]
struct Membership {
    voters: Vec<u64>,
    learners: Vec<u64>,
}

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

pub fn run(command: ClusterCommand) -> Result<(), CliError> {
    block_on(async move {
        match command {
            ClusterCommand::Init(args) => {
                let members = args
                    .members
                    .iter()
                    .map(|m| parse_member(m))
                    .collect::<Result<Vec<_>, _>>()?;
                let reply = admin(&args.addr)
                    .await?
                    .cluster_init(ClusterInitRequest { members })
                    .await?
                    .into_inner();
                if args.json {
                    print_json(
                        &serde_json::json!({"initialized": reply.initialized, "leader": reply.leader}),
                    )
                } else {
                    println!(
                        "{}",
                        if reply.initialized {
                            "initialized"
                        } else {
                            "already initialized"
                        }
                    );
                    Ok(())
                }
            }
            ClusterCommand::AddLearner(args) => {
                let member = parse_member(&args.member)?;
                let leader = leader_api(&args.addr).await?;
                let reply = admin(&leader)
                    .await?
                    .add_learner(AddLearnerRequest {
                        member: Some(member),
                    })
                    .await?
                    .into_inner();
                print_membership(reply.voters, reply.learners, args.json)
            }
            ClusterCommand::Promote(args) => {
                let leader = leader_api(&args.addr).await?;
                let reply = admin(&leader)
                    .await?
                    .promote(NodeRef { id: args.id })
                    .await?
                    .into_inner();
                print_membership(reply.voters, reply.learners, args.json)
            }
            ClusterCommand::Remove(args) => {
                let leader = leader_api(&args.addr).await?;
                let reply = admin(&leader)
                    .await?
                    .remove(NodeRef { id: args.id })
                    .await?
                    .into_inner();
                print_membership(reply.voters, reply.learners, args.json)
            }
            ClusterCommand::Status(args) => status(&args).await,
            ClusterCommand::Actors(args) => actors(&args).await,
        }
    })
}

fn print_membership(voters: Vec<u64>, learners: Vec<u64>, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(&Membership { voters, learners });
    }
    println!("voters: {voters:?}\nlearners: {learners:?}");
    Ok(())
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
