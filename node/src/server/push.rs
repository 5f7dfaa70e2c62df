//! `Admin/PushModel`: a model version's files streamed to a node. The header carries the
//! manifest; chunks arrive in order per file; the node writes them into a staging directory of
//! its own, verifies every file against the manifest, moves the result into its
//! content-addressed artifact store and only then records the version through Raft. Nothing
//! half-written is ever visible under a digest.

use std::collections::HashSet;

use tonic::{Status, Streaming};
use troupe_consensus::metadata::{Command, Proposal};
use troupe_consensus::{Metadata, ReadConsistency};
use troupe_models::artifact::{check_manifest_path, ArtifactStore, Manifest, ManifestFile};
use troupe_proto::v1::push_model_chunk::Part;
use troupe_proto::v1::{PushModelChunk, PushModelHeader, PushModelResponse};

use super::status::{metadata_error, write_error, write_outcome};

fn blocking_failed(error: tokio::task::JoinError) -> Status {
    Status::internal(format!("a blocking task failed: {error}"))
}

/// The header's manifest, checked: plain relative paths, no duplicates, the files a model
/// needs, sha256 digests as 64 lowercase hex characters.
pub(crate) fn manifest_of(header: &PushModelHeader) -> Result<Manifest, Status> {
    if header.files.is_empty() {
        return Err(Status::invalid_argument(
            "the manifest lists no files: push a model directory (config.json, tokenizer.json, model.safetensors)",
        ));
    }
    let mut seen = HashSet::new();
    let mut files = Vec::with_capacity(header.files.len());
    for file in &header.files {
        check_manifest_path(&file.path).map_err(Status::invalid_argument)?;
        if !seen.insert(file.path.as_str()) {
            return Err(Status::invalid_argument(format!(
                "file {:?} is listed twice in the manifest",
                file.path
            )));
        }
        let hex = file.sha256.len() == 64
            && file
                .sha256
                .chars()
                .all(|c| matches!(c, '0'..='9' | 'a'..='f'));
        if !hex {
            return Err(Status::invalid_argument(format!(
                "file {:?}: sha256 must be 64 lowercase hex characters",
                file.path
            )));
        }
        files.push(ManifestFile {
            path: file.path.clone(),
            size_bytes: file.size_bytes,
            sha256: file.sha256.clone(),
        });
    }
    let paths: Vec<&str> = seen.iter().copied().collect();
    troupe_models::artifact::check_model_files(&paths)
        .map_err(|reason| Status::invalid_argument(format!("the manifest has {reason}")))?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Manifest { files })
}

/// The manifest as a push header lists it: the inverse of [`manifest_of`].
pub fn manifest_entries(manifest: &Manifest) -> Vec<troupe_proto::v1::ManifestFileEntry> {
    manifest
        .files
        .iter()
        .map(|f| troupe_proto::v1::ManifestFileEntry {
            path: f.path.clone(),
            size_bytes: f.size_bytes,
            sha256: f.sha256.clone(),
        })
        .collect()
}

/// Receives one push; see the module doc.
pub async fn receive(
    metadata: &Metadata,
    store: &ArtifactStore,
    mut stream: Streaming<PushModelChunk>,
) -> Result<PushModelResponse, Status> {
    let header = match stream.message().await? {
        Some(PushModelChunk {
            part: Some(Part::Header(header)),
        }) => header,
        _ => {
            return Err(Status::invalid_argument(
                "the first message of a push must be its header (name, version, manifest)",
            ))
        }
    };
    let manifest = manifest_of(&header)?;
    let digest = manifest.digest();
    let size_bytes = manifest.total_bytes();
    let version = if header.version.is_empty() {
        digest[..12].to_owned()
    } else {
        header.version.clone()
    };
    // The whole registration is checked before a byte is stored: a push with a bad name is
    // refused here, not after its files are on disk.
    let command = Command::RegisterModelVersion {
        name: header.name.clone(),
        version: version.clone(),
        digest: digest.clone(),
        size_bytes,
        // Recognised from the files unless the client named it.
        format: if header.format.is_empty() {
            let paths: Vec<&str> = header.files.iter().map(|f| f.path.as_str()).collect();
            troupe_models::ModelFormat::of_files(&paths).name().into()
        } else {
            header.format.clone()
        },
        source: None,
        precision: (!header.precision.is_empty()).then(|| header.precision.clone()),
    };
    troupe_consensus::metadata::state::check_command(&command)
        .map_err(|reason| super::status::status(&reason))?;
    super::admin::check_request_id(&header.request_id)?;
    let (name, lookup) = (header.name.clone(), version.clone());
    let existing = metadata
        .read(ReadConsistency::Linearizable, move |state| {
            state
                .models
                .get(&name)
                .and_then(|versions| versions.get(&lookup))
                .map(|record| record.digest.clone())
        })
        .await
        .map_err(metadata_error)?;
    match existing {
        Some(existing) if existing != digest => {
            return Err(Status::already_exists(format!(
                "model '{}' version '{version}' is already registered with digest {existing}, these files have digest {digest}: push them as a new version",
                header.name
            )))
        }
        Some(_) if store.get(&digest).is_some() => {
            let revision = metadata.status().applied_revision;
            return Ok(PushModelResponse {
                version,
                digest,
                size_bytes,
                revision,
                changed: false,
                bytes_received: 0,
            });
        }
        _ => {}
    }

    let bytes_received = stage_and_commit(store, &manifest, &header, &mut stream).await?;
    let proposal = Proposal {
        command,
        expected_revision: None,
        request_id: (!header.request_id.is_empty()).then(|| header.request_id.clone()),
    };
    let outcome = metadata.propose(proposal).await.map_err(write_error)?;
    let (revision, changed) = write_outcome(outcome)?;
    tracing::info!(model = %header.name, %version, %digest, bytes_received, "model version pushed");
    Ok(PushModelResponse {
        version,
        digest,
        size_bytes,
        revision,
        changed,
        bytes_received,
    })
}

/// One chunk on its way from the handler to the staging writer.
enum Staged {
    Chunk {
        file: usize,
        data: Vec<u8>,
    },
    /// Every byte arrived: verify and move into the store.
    Complete,
}

/// Receives the files and commits them to the store; returns the bytes received.
///
/// Every filesystem operation on the staging directory runs in one blocking task that owns
/// it, in order, and that task removes the directory unless it was committed. The handler
/// only checks the chunks and passes them on. So a client that disconnects midway (the
/// handler is dropped, and with it the channel) cannot leave a directory behind: no
/// operation on it is still queued when it is removed, and none runs after.
async fn stage_and_commit(
    store: &ArtifactStore,
    manifest: &Manifest,
    header: &PushModelHeader,
    stream: &mut Streaming<PushModelChunk>,
) -> Result<u64, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(STAGED_CHUNKS);
    let writer = {
        let (store, manifest) = (store.clone(), manifest.clone());
        let paths: Vec<String> = header.files.iter().map(|f| f.path.clone()).collect();
        tokio::task::spawn_blocking(move || write_staged(&store, &manifest, &paths, rx))
    };
    let received = receive_files(stream, header, &tx).await;
    let received = match received {
        Ok(total) if tx.send(Staged::Complete).await.is_ok() => total,
        // The writer stopped on an I/O error, which it returns below.
        Ok(total) => total,
        Err(status) => {
            drop(tx);
            // Wait for the directory to go, so the client's error means "nothing stored".
            let _ = writer.await;
            return Err(status);
        }
    };
    drop(tx);
    writer.await.map_err(blocking_failed)??;
    Ok(received)
}

/// Chunks in flight between the handler and the staging writer.
const STAGED_CHUNKS: usize = 8;

/// The staging writer: see [`stage_and_commit`].
fn write_staged(
    store: &ArtifactStore,
    manifest: &Manifest,
    paths: &[String],
    mut chunks: tokio::sync::mpsc::Receiver<Staged>,
) -> Result<(), Status> {
    use std::io::Write;
    let digest = manifest.digest();
    let staging = StagingDir(
        store
            .staging_dir(&digest)
            .map_err(|e| Status::internal(e.to_string()))?,
    );
    let io = |path: &std::path::Path, e: std::io::Error| {
        Status::internal(format!("cannot write {}: {e}", path.display()))
    };
    let mut files: Vec<Option<std::fs::File>> = paths.iter().map(|_| None).collect();
    let create = |relative: &str| -> Result<std::fs::File, Status> {
        let path = staging.0.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::File::create(&path).map_err(|e| io(&path, e))
    };
    loop {
        match chunks.blocking_recv() {
            Some(Staged::Chunk { file, data }) => {
                let handle = match &mut files[file] {
                    Some(handle) => handle,
                    slot => slot.insert(create(&paths[file])?),
                };
                handle
                    .write_all(&data)
                    .map_err(|e| io(&staging.0.join(&paths[file]), e))?;
            }
            Some(Staged::Complete) => break,
            // The handler is gone (the client disconnected) or it refused a chunk.
            None => return Err(Status::cancelled("the push ended before its last chunk")),
        }
    }
    // Empty files get no chunks; create them so the directory is complete.
    for (slot, path) in files.iter_mut().zip(paths) {
        if slot.is_none() {
            *slot = Some(create(path)?);
        }
    }
    drop(files);
    store
        .commit(&staging.0, manifest)
        .map_err(|e| Status::data_loss(format!("{e}; nothing was stored: push the files again")))?;
    Ok(())
}

/// A push's staging directory, removed when dropped (after a commit it has moved, and there
/// is nothing left to remove).
struct StagingDir(std::path::PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {
                tracing::debug!(path = %self.0.display(), "removed a push's staging directory")
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.0.display(), %error, "cannot remove a push's staging directory; the next start removes it")
            }
        }
    }
}

/// Checks the chunks (order, sizes) and passes them to the staging writer; returns the bytes
/// received once every file is complete.
async fn receive_files(
    stream: &mut Streaming<PushModelChunk>,
    header: &PushModelHeader,
    writer: &tokio::sync::mpsc::Sender<Staged>,
) -> Result<u64, Status> {
    let mut written = vec![0u64; header.files.len()];
    let mut total = 0u64;
    while let Some(message) = stream.message().await? {
        let Some(Part::Chunk(chunk)) = message.part else {
            return Err(Status::invalid_argument(
                "a push has one header, first; every later message must be a chunk",
            ));
        };
        let index = chunk.file as usize;
        let Some(file) = header.files.get(index) else {
            return Err(Status::invalid_argument(format!(
                "chunk for file {index}, but the manifest lists {} files",
                header.files.len()
            )));
        };
        if chunk.offset != written[index] {
            return Err(Status::invalid_argument(format!(
                "chunk of {:?} at offset {}, expected {}: send each file's chunks in order",
                file.path, chunk.offset, written[index]
            )));
        }
        let end = written[index] + chunk.data.len() as u64;
        if end > file.size_bytes {
            return Err(Status::invalid_argument(format!(
                "{:?} is {} bytes in the manifest, but {end} were sent",
                file.path, file.size_bytes
            )));
        }
        written[index] = end;
        total += chunk.data.len() as u64;
        let staged = Staged::Chunk {
            file: index,
            data: chunk.data,
        };
        if writer.send(staged).await.is_err() {
            // The writer stopped on an I/O error; the caller returns it.
            return Ok(total);
        }
    }
    for (file, got) in header.files.iter().zip(&written) {
        if *got != file.size_bytes {
            return Err(Status::invalid_argument(format!(
                "the push ended after {got} of {} bytes of {:?}: nothing was stored, push again",
                file.size_bytes, file.path
            )));
        }
    }
    Ok(total)
}
