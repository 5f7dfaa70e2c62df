//! `troupe.v1.Artifacts` on the peer port: this node's verified model files, for peers that
//! must serve a version they lack. Only complete, verified store entries are offered.

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status};
use troupe_models::artifact::{check_manifest_path, ArtifactStore};
use troupe_proto::v1::artifacts_server::Artifacts;
use troupe_proto::v1::{
    FileData, GetManifestRequest, GetManifestResponse, ManifestFileEntry, ReadFileRequest,
};

/// Bytes per streamed chunk.
const CHUNK_BYTES: usize = 1 << 20;

pub struct ArtifactService {
    store: ArtifactStore,
    /// Bytes sent to peers, for the metrics.
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ArtifactService {
    pub fn new(store: ArtifactStore, sent: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self { store, sent }
    }
}

fn not_held(digest: &str) -> Status {
    Status::not_found(format!(
        "this node holds no verified copy of artifact {digest}"
    ))
}

#[tonic::async_trait]
impl Artifacts for ArtifactService {
    async fn get_manifest(
        &self,
        request: Request<GetManifestRequest>,
    ) -> Result<Response<GetManifestResponse>, Status> {
        let digest = request.into_inner().digest;
        let manifest = self
            .store
            .manifest(&digest)
            .ok_or_else(|| not_held(&digest))?;
        Ok(Response::new(GetManifestResponse {
            files: manifest
                .files
                .into_iter()
                .map(|f| ManifestFileEntry {
                    path: f.path,
                    size_bytes: f.size_bytes,
                    sha256: f.sha256,
                })
                .collect(),
        }))
    }

    type ReadFileStream = tokio_stream::wrappers::ReceiverStream<Result<FileData, Status>>;

    async fn read_file(
        &self,
        request: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let request = request.into_inner();
        check_manifest_path(&request.path).map_err(Status::invalid_argument)?;
        let manifest = self
            .store
            .manifest(&request.digest)
            .ok_or_else(|| not_held(&request.digest))?;
        if !manifest.files.iter().any(|f| f.path == request.path) {
            return Err(Status::not_found(format!(
                "artifact {} has no file {:?}",
                request.digest, request.path
            )));
        }
        let dir = self
            .store
            .get(&request.digest)
            .ok_or_else(|| not_held(&request.digest))?;
        let path = dir.join(&request.path);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Status::internal(format!("cannot read {}: {e}", path.display())))?;
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(|e| Status::out_of_range(format!("offset {}: {e}", request.offset)))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let sent = self.sent.clone();
        tokio::spawn(async move {
            loop {
                let mut data = vec![0u8; CHUNK_BYTES];
                match file.read(&mut data).await {
                    Ok(0) => return,
                    Ok(read) => {
                        data.truncate(read);
                        if sender.send(Ok(FileData { data })).await.is_err() {
                            return;
                        }
                        sent.fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        let _ = sender
                            .send(Err(Status::internal(format!("read failed: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}
