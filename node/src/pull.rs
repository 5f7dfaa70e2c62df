//! Pulling a model version from a peer: a node that must serve a version it has no copy of
//! reads the manifest and then each file from a peer that holds it (`troupe.v1.Artifacts` on
//! the peer port), resuming a file from the bytes it has after a broken stream, and moves on
//! to the next peer if one fails. Every file is verified against the manifest before the copy
//! is used; a corrupt or partial copy is never stored. Pulls share one token bucket per node
//! (`serving.blob_bandwidth_mbps`), on their own connections, so Raft and client traffic do
//! not queue behind them. Peers are chosen from what Raft and heartbeats say: those that
//! reported the version ready first, peers marked down never, busy ones last.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use troupe_actors::supervisor::ArtifactFetcher;
use troupe_actors::{PeerState, PeerTable};
use troupe_consensus::Metadata;
use troupe_models::artifact::{check_manifest_path, ArtifactStore, Manifest, ManifestFile};
use troupe_proto::v1::artifacts_client::ArtifactsClient;
use troupe_proto::v1::{GetManifestRequest, ReadFileRequest};

/// Broken streams tolerated per file and peer before trying the next peer.
const RESUMES_PER_FILE: usize = 3;

pub struct PeerPuller {
    pub node_id: u64,
    pub metadata: Arc<Metadata>,
    pub store: ArtifactStore,
    /// Shared by every pull of this node; `None` pulls at full speed.
    pub bandwidth: Option<Arc<tokio::sync::Mutex<TokenBucket>>>,
    /// What heartbeats say of the peers: down ones are skipped, busy ones asked last.
    pub peers: Arc<PeerTable>,
    /// Bytes received from peers, for the metrics.
    pub received: Arc<std::sync::atomic::AtomicU64>,
    pub transport: Arc<troupe_transport::PeerTransport>,
}

/// A token bucket over bytes: on average at most `rate` bytes a second. It starts empty and
/// keeps at most `burst` seconds of unused allowance, so a transfer's rate is the cap from its
/// first chunk on.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: tokio::time::Instant,
}

impl TokenBucket {
    /// `bytes_per_second` > 0.
    pub fn new(bytes_per_second: f64) -> Self {
        Self {
            rate: bytes_per_second,
            burst: bytes_per_second * 0.05,
            tokens: 0.0,
            last: tokio::time::Instant::now(),
        }
    }

    /// Waits until `bytes` may go.
    pub async fn take(&mut self, bytes: usize) {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            let wait = Duration::from_secs_f64(-self.tokens / self.rate);
            tokio::time::sleep(wait).await;
            self.tokens = 0.0;
            self.last = tokio::time::Instant::now();
        }
    }
}

impl ArtifactFetcher for PeerPuller {
    fn fetch(
        &self,
        digest: String,
        holders: Vec<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<PathBuf, String>> + Send>> {
        let mut peers: Vec<(u64, String)> = self
            .metadata
            .status()
            .nodes
            .into_iter()
            .filter(|(id, _)| *id != self.node_id && self.peers.state(*id) != PeerState::Down)
            .map(|(id, addr)| (id, addr.peer_addr))
            .collect();
        // Nodes that reported the version ready first; within each group, those answering
        // heartbeats before the others, the least loaded first, then by id.
        peers.sort_by_key(|(id, _)| {
            let view = self.peers.get(*id);
            let answering = view.as_ref().is_some_and(|v| v.state == PeerState::Up);
            let load = view.map_or(u64::MAX, |v| v.queue_depth + v.in_flight);
            (!holders.contains(id), !answering, load, *id)
        });
        let store = self.store.clone();
        let bandwidth = self.bandwidth.clone();
        let received = self.received.clone();
        let transport = self.transport.clone();
        Box::pin(async move {
            let mut failures = Vec::new();
            for (id, addr) in peers {
                let channel = transport.channel(troupe_transport::Lane::Blob, id, &addr);
                let pulled = match channel {
                    Ok(channel) => {
                        pull_from(&store, channel, &digest, bandwidth.as_deref(), &received).await
                    }
                    Err(error) => Err(error.to_string()),
                };
                match pulled {
                    Ok(dir) => {
                        tracing::info!(%digest, peer = id, "artifact pulled from a peer");
                        return Ok(dir);
                    }
                    Err(reason) => failures.push(format!("node {id}: {reason}")),
                }
            }
            Err(if failures.is_empty() {
                format!("no copy of artifact {digest} on this node and no peer to pull it from: push it here with `troupe models push`")
            } else {
                format!(
                    "no peer could provide artifact {digest} ({})",
                    failures.join("; ")
                )
            })
        })
    }
}

async fn pull_from(
    store: &ArtifactStore,
    channel: tonic::transport::Channel,
    digest: &str,
    bandwidth: Option<&tokio::sync::Mutex<TokenBucket>>,
    received: &std::sync::atomic::AtomicU64,
) -> Result<PathBuf, String> {
    let mut client = ArtifactsClient::new(channel).max_decoding_message_size(usize::MAX);
    let files = client
        .get_manifest(GetManifestRequest {
            digest: digest.to_owned(),
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner()
        .files;
    let mut files: Vec<ManifestFile> = files
        .into_iter()
        .map(|f| ManifestFile {
            path: f.path,
            size_bytes: f.size_bytes,
            sha256: f.sha256,
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest { files };
    if manifest.digest() != digest {
        return Err(format!(
            "its manifest has digest {}, not the one asked for",
            manifest.digest()
        ));
    }
    for file in &manifest.files {
        check_manifest_path(&file.path)?;
    }
    let staging = {
        let (store, digest) = (store.clone(), digest.to_owned());
        tokio::task::spawn_blocking(move || store.staging_dir(&digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let result = async {
        for file in &manifest.files {
            pull_file(&mut client, digest, file, &staging, bandwidth, received).await?;
        }
        let (store, manifest, staging) = (store.clone(), manifest.clone(), staging.clone());
        tokio::task::spawn_blocking(move || store.commit(&staging, &manifest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the copy failed verification: {e}"))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    result
}

/// Streams one file into `staging`, resuming from what it has after a broken stream.
async fn pull_file(
    client: &mut ArtifactsClient<tonic::transport::Channel>,
    digest: &str,
    file: &ManifestFile,
    staging: &std::path::Path,
    bandwidth: Option<&tokio::sync::Mutex<TokenBucket>>,
    received: &std::sync::atomic::AtomicU64,
) -> Result<(), String> {
    let path = staging.join(&file.path);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut written = 0u64;
    let mut resumes = 0;
    while written < file.size_bytes {
        let stream = client
            .read_file(ReadFileRequest {
                digest: digest.to_owned(),
                path: file.path.clone(),
                offset: written,
            })
            .await;
        let broken = match stream {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            if written + chunk.data.len() as u64 > file.size_bytes {
                                return Err(format!(
                                    "{:?} is longer than its manifest says",
                                    file.path
                                ));
                            }
                            if let Some(bucket) = bandwidth {
                                bucket.lock().await.take(chunk.data.len()).await;
                            }
                            out.write_all(&chunk.data)
                                .await
                                .map_err(|e| e.to_string())?;
                            written += chunk.data.len() as u64;
                            received.fetch_add(
                                chunk.data.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status.message().to_owned()),
                    }
                }
            }
            Err(status) => Some(status.message().to_owned()),
        };
        if let Some(reason) = broken {
            resumes += 1;
            if resumes > RESUMES_PER_FILE {
                return Err(format!("{:?}: {reason}", file.path));
            }
            tracing::warn!(file = %file.path, written, %reason, "artifact stream broke; resuming");
        } else if written < file.size_bytes {
            return Err(format!(
                "{:?} ended after {written} of {} bytes",
                file.path, file.size_bytes
            ));
        }
    }
    out.flush().await.map_err(|e| e.to_string())
}
