//! `troupe priorities`: task priorities, written through Raft.

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_proto::v1::{ReadRequest, SetPriorityRequest};

use super::remote::{admin, block_on, print_json, print_write, ListArgs, WriteOptions};
use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum PrioritiesCommand {
    /// Set a task's priority; prints the revision it applied at (the current one when the
    /// priority was already so). A lost CAS exits 3.
    Set(SetArgs),
    /// Tasks in scheduling order (priority desc, mod_revision asc, name asc).
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub name: String,
    #[arg(allow_hyphen_values = true)]
    pub priority: i32,
    #[command(flatten)]
    pub write: WriteOptions,
}

#[derive(Serialize)]
struct TaskView {
    name: String,
    priority: i32,
    mod_revision: u64,
    create_revision: u64,
}

pub fn run(command: PrioritiesCommand) -> Result<(), CliError> {
    block_on(execute(command))
}

/// Runs one `priorities` command (the shell runs them through this too).
pub async fn execute(command: PrioritiesCommand) -> Result<(), CliError> {
    match command {
        PrioritiesCommand::Set(args) => set(args).await,
        PrioritiesCommand::List(args) => list(args).await,
    }
}

pub(super) async fn set(args: SetArgs) -> Result<(), CliError> {
    let write = args.write;
    let reply = admin(&write.addr)
        .await?
        .set_priority(SetPriorityRequest {
            name: args.name,
            priority: args.priority,
            expected_revision: write.expected_revision,
            request_id: write.request_id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_write(&reply, write.json)
}

pub(super) async fn list(args: ListArgs) -> Result<(), CliError> {
    let reply = admin(&args.addr)
        .await?
        .list_priorities(ReadRequest {
            stale: args.stale,
            min_revision: 0,
        })
        .await?
        .into_inner();
    let tasks: Vec<TaskView> = reply
        .tasks
        .into_iter()
        .map(|t| TaskView {
            name: t.name,
            priority: t.priority,
            mod_revision: t.mod_revision,
            create_revision: t.create_revision,
        })
        .collect();
    if args.json {
        return print_json(&tasks);
    }
    println!("{:<24} {:>9} {:>12}", "task", "priority", "mod_revision");
    for task in tasks {
        println!(
            "{:<24} {:>9} {:>12}",
            task.name, task.priority, task.mod_revision
        );
    }
    Ok(())
}
