//! Measures the sled store's memory and disk after many metadata writes with compaction:
//! a one-node Raft (real openraft, real sled, real snapshots and purges) takes N setting
//! writes from C concurrent writers, then reports throughput, resident memory and the data
//! directory's size. openraft dropped its own sled store over growth here, so this is the
//! number to watch.
//!
//! usage: cargo run --release -p troupe-consensus --example sled_growth -- [WRITES] [CLIENTS]
//!        [SNAPSHOT_EVERY_ENTRIES (default 10 000; a tenth of it is kept behind each snapshot)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_consensus::metadata::{Command, Proposal};
use troupe_consensus::types::NodeAddr;
use troupe_consensus::{Metadata, MetadataConfig};
use troupe_transport::PeerTransport;

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let writes: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let clients: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let peer = listener.local_addr()?.to_string();
    let mut config =
        MetadataConfig::new(1, "127.0.0.1:0".into(), peer.clone(), dir.path().to_owned());
    if let Some(every) = args.next().map(|a| a.parse()).transpose()? {
        config.snapshot_every_entries = every;
        config.keep_entries_after_snapshot = every / 10;
    }
    let metadata = Arc::new(
        Metadata::start(
            config,
            Arc::new(PeerTransport::insecure(Duration::from_secs(5))),
        )
        .await?,
    );
    let service = metadata.peer_service();
    let gate = metadata.transport().peer_gate(metadata.membership());
    let incoming = metadata.transport().incoming(
        listener,
        "peer",
        troupe_transport::ConnLimits::default(),
        Default::default(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(gate))
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    let members = BTreeMap::from([(
        1,
        NodeAddr {
            api_addr: String::new(),
            peer_addr: peer,
        },
    )]);
    metadata.initialize(members).await?;
    metadata.wait_for_leader(Duration::from_secs(10)).await?;
    let before = resident_kib();

    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let metadata = metadata.clone();
        tasks.push(tokio::spawn(async move {
            let value = "x".repeat(256);
            for i in (client..writes).step_by(clients as usize) {
                let command = Command::SetSetting {
                    key: format!("bench-{client}-{}", i % 1000),
                    value: format!("{i}-{value}"),
                };
                metadata
                    .propose(Proposal::new(command))
                    .await
                    .expect("write");
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let status = metadata.status();
    println!(
        "writes={writes} clients={clients} seconds={seconds:.1} writes_per_sec={:.0} \
         rss_before_kib={before} rss_after_kib={} data_dir_bytes={} snapshot_revision={} snapshot_index={} purged_index={} last_log_index={}",
        writes as f64 / seconds,
        resident_kib(),
        dir_bytes(dir.path()),
        status.snapshot_revision,
        status.snapshot_index,
        status.purged_index,
        status.last_log_index,
    );
    metadata.shutdown().await?;
    println!("data_dir_bytes_after_shutdown={}", dir_bytes(dir.path()));
    Ok(())
}
