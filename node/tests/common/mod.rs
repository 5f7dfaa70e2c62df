//! Helpers the node integration tests share: start a node the way `troupe node` does, run
//! the real `troupe` binary, read its output.

#![allow(dead_code)]

use std::process::{Command, Output};

use troupe::config::NodeConfig;
use troupe::RunningNode;

/// A node on 127.0.0.1 with OS-chosen ports and its data dir under `dir`.
pub async fn start_node(id: u64, dir: &tempfile::TempDir) -> RunningNode {
    let config = NodeConfig {
        id,
        api: "127.0.0.1:0".into(),
        peer: "127.0.0.1:0".into(),
        metrics: "127.0.0.1:1".into(),
        data_dir: dir.path().join(format!("node{id}")),
        ..NodeConfig::default()
    };
    troupe::start(config).await.unwrap()
}

/// Runs the `troupe` binary built for these tests.
pub async fn troupe(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// stdout and stderr as text.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// `--members` for `cluster init`: `1=PEER@API,...` in the order given.
pub fn members_arg(nodes: &[RunningNode]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}={}@{}", i + 1, n.peer_addr, n.api_addr))
        .collect::<Vec<_>>()
        .join(",")
}

/// A lost compare-and-set: exit 3, and the message names the key's current revision.
pub fn assert_lost_cas(output: &Output, current_revision: u64) {
    let (_, stderr) = text(output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.starts_with("error: ABORTED: ")
            && stderr.contains(&format!("revision {current_revision}")),
        "{stderr}"
    );
}
