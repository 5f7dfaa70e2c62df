//! `troupe cluster`: form the voter set and change membership (here), show status, the
//! members and a node's Raft position ([`status`]), and a node's actor tree ([`actors`]).

mod actors;
mod status;

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_consensus::types::NodeAddr;
use troupe_proto::v1::{AddLearnerRequest, ClusterInitRequest, Member, NodeRef};

pub use self::actors::{ActorsArgs, RestartActorArgs};
use crate::error::CliError;
use crate::remote::{admin, block_on, leader_api, print_json};

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
    /// The members: id, addresses, voter or learner, and how the node asked sees each (up,
    /// suspect, down; RTT; role; applied revision).
    Nodes(StatusArgs),
    /// One node's Raft position: role, term, leader, log, commit and apply indexes, snapshot,
    /// voters and learners.
    Raft(StatusArgs),
    /// One node's actor tree: each actor's status, mailbox depth and restarts, its batchers'
    /// counters, and whether it is serving (and if not, why).
    Actors(ActorsArgs),
    /// Restart one actor (by its path in `cluster actors`) through its supervisor.
    RestartActor(RestartActorArgs),
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

pub fn run(command: ClusterCommand) -> Result<(), CliError> {
    block_on(execute(command))
}

/// Runs one `cluster` command (the shell runs them through this too).
pub async fn execute(command: ClusterCommand) -> Result<(), CliError> {
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
        ClusterCommand::Status(args) => status::status(&args).await,
        ClusterCommand::Nodes(args) => status::nodes(&args).await,
        ClusterCommand::Raft(args) => status::raft(&args).await,
        ClusterCommand::Actors(args) => actors::actors(&args).await,
        ClusterCommand::RestartActor(args) => actors::restart_actor(&args).await,
    }
}

fn print_membership(voters: Vec<u64>, learners: Vec<u64>, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(&Membership { voters, learners });
    }
    println!("voters: {voters:?}\nlearners: {learners:?}");
    Ok(())
}
