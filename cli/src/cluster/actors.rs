//! `troupe cluster actors` and `troupe cluster restart-actor`: a node's actor tree, and
//! restarting one actor through its supervisor.

use clap::Args;
use serde::Serialize;
use troupe_proto::v1::{ActorTreeRequest, RestartActorRequest};

use crate::error::CliError;
use crate::remote::{admin, node_status, print_json};

#[derive(Debug, Args)]
pub struct ActorsArgs {
    /// API address of a node: the tree shown is this node's, or member NODE's.
    #[arg(long)]
    pub addr: String,
    /// The member whose tree to show (its id; `cluster nodes` lists them).
    pub node: Option<u64>,
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
    let addr = node_api(&args.addr, args.node).await?;
    let tree = admin(&addr)
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
pub struct RestartActorArgs {
    /// The actor's path, as `cluster actors` shows it (e.g. node/health).
    pub path: String,
    /// The member whose actor to restart (its id); this node when absent.
    #[arg(long)]
    pub node: Option<u64>,
    /// API address of a node.
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn restart_actor(args: &RestartActorArgs) -> Result<(), CliError> {
    let addr = node_api(&args.addr, args.node).await?;
    let json = args.json;
    let reply = admin(&addr)
        .await?
        .restart_actor(RestartActorRequest {
            path: args.path.clone(),
        })
        .await?
        .into_inner();
    if json {
        return print_json(&serde_json::json!({"path": reply.path, "restarts": reply.restarts}));
    }
    println!("restarted {} (restarts: {})", reply.path, reply.restarts);
    Ok(())
}

/// The API address of node `id` (this node when `None`).
async fn node_api(addr: &str, id: Option<u64>) -> Result<String, CliError> {
    let Some(id) = id else {
        return Ok(addr.to_owned());
    };
    let status = node_status(addr).await?;
    if status.id == id {
        return Ok(addr.to_owned());
    }
    status
        .members
        .iter()
        .find(|m| m.id == id)
        .filter(|m| !m.api_addr.is_empty())
        .map(|m| m.api_addr.clone())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "node {id} is not a member with a known API address (`cluster nodes` lists them)"
            ))
        })
}
