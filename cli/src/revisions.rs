//! `troupe watch` and `troupe history`: the metadata's changes as they apply, and the
//! metadata as it was at a past revision.

use std::time::Duration;

use clap::Args;
use tokio_stream::StreamExt;
use troupe_proto::v1::{HistoryRequest, WatchRequest};

use crate::error::CliError;
use crate::remote::{self, admin, node_status, print_json};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The first revision to show (default: the next one to apply).
    #[arg(long)]
    pub from: Option<u64>,
    /// Stop after this many changes (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<usize>,
    /// API address of any node.
    #[arg(long)]
    pub addr: String,
    /// One JSON object per change.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The revision to show the metadata at.
    pub revision: u64,
    /// API address of any node (its history goes back as far as its log).
    #[arg(long)]
    pub addr: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn watch(args: &WatchArgs) -> Result<(), CliError> {
    let (addr, count, json) = (args.addr.as_str(), args.count, args.json);
    let from_revision = match args.from {
        Some(from) => from,
        None => node_status(addr).await?.applied_revision + 1,
    };
    // A watch runs until stopped: its deadline is a day.
    let channel = remote::channel(addr, Duration::from_secs(86_400)).await?;
    let mut stream = troupe_proto::v1::admin_client::AdminClient::new(channel)
        .watch(WatchRequest { from_revision })
        .await?
        .into_inner();
    if !json {
        eprintln!("watching from revision {from_revision} (Ctrl-C stops)");
    }
    let mut seen = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while count.is_none_or(|count| seen < count) {
        let change = tokio::select! {
            change = stream.next() => change,
            _ = &mut interrupted => break,
        };
        let Some(change) = change else { break };
        let change = change?;
        seen += 1;
        if json {
            let value: serde_json::Value =
                serde_json::from_str(&change.value_json).unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::json!({"revision": change.revision, "key": change.key, "value": value})
            );
        } else {
            println!(
                "{:>8}  {:<40}  {}",
                change.revision, change.key, change.value_json
            );
        }
    }
    Ok(())
}

pub async fn history(args: &HistoryArgs) -> Result<(), CliError> {
    let json = args.json;
    let reply = admin(&args.addr)
        .await?
        .history(HistoryRequest {
            revision: args.revision,
        })
        .await?
        .into_inner();
    if json {
        let models: Vec<_> = reply
            .models
            .iter()
            .map(|m| {
                serde_json::json!({"name": m.name, "version": m.version, "state": m.state,
                    "digest": m.digest, "mod_revision": m.mod_revision})
            })
            .collect();
        let tasks: Vec<_> = reply
            .tasks
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "priority": t.priority, "mod_revision": t.mod_revision}))
            .collect();
        let settings: Vec<_> = reply
            .settings
            .iter()
            .map(|s| serde_json::json!({"key": s.key, "value": s.value, "mod_revision": s.mod_revision}))
            .collect();
        return print_json(&serde_json::json!({
            "revision": reply.revision,
            "oldest_revision": reply.oldest_revision,
            "models": models,
            "tasks": tasks,
            "settings": settings,
        }));
    }
    println!(
        "as of revision {} (this node can go back to {})",
        reply.revision, reply.oldest_revision
    );
    println!(
        "\n{:<24} {:<14} {:<8} {:>8}",
        "model", "version", "state", "mod rev"
    );
    for m in &reply.models {
        println!(
            "{:<24} {:<14} {:<8} {:>8}",
            m.name, m.version, m.state, m.mod_revision
        );
    }
    println!("\n{:<24} {:>9} {:>8}", "task", "priority", "mod rev");
    for t in &reply.tasks {
        println!("{:<24} {:>9} {:>8}", t.name, t.priority, t.mod_revision);
    }
    println!("\n{:<24} {:<24} {:>8}", "setting", "value", "mod rev");
    for s in &reply.settings {
        println!("{:<24} {:<24} {:>8}", s.key, s.value, s.mod_revision);
    }
    Ok(())
}
