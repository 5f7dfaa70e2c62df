//! `Admin/PushModel`: a model version's files streamed to a node. The header carries the
//! manifest; chunks arrive in order per file; the node writes them into a staging directory of
//! its own, verifies every file against the manifest, moves the result into its
//! content-addressed artifact store and only then records the version through Raft. Nothing
//! half-written is ever visible under a digest.

use std::collections::HashSet;

use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};
use troupe_consensus::metadata::{Command, Proposal};
use troupe_consensus::{Metadata, ReadConsistency};
use troupe_models::artifact::{
    check_manifest_path, ArtifactStore, Manifest, ManifestFile, REQUIRED_FILES,
};
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
    for required in REQUIRED_FILES {
        if !seen.contains(required) {
            return Err(Status::invalid_argument(format!(
                "the manifest has no {required}: a model directory needs {}",
                REQUIRED_FILES.join(", ")
            )));
        }
    }
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
        format: if header.format.is_empty() {
            "safetensors".into()
        } else {
            header.format.clone()
        },
        source: None,
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

    // Removed however this ends: an error, a client that disconnects midway (the handler is
    // dropped), or after the commit moved it (then there is nothing left to remove). The guard
    // is made where the directory is, inside the blocking task: a client that disconnects
    // while it runs drops the handler, and the task's output (the guard) is dropped with it.
    let staging = {
        let (store, digest) = (store.clone(), digest.clone());
        tokio::task::spawn_blocking(move || store.staging_dir(&digest).map(StagingDir))
            .await
            .map_err(blocking_failed)?
            .map_err(|e| Status::internal(e.to_string()))?
    };
    let bytes_received = receive_files(&mut stream, &header, &staging.0).await?;
    {
        let (store, manifest, path) = (store.clone(), manifest.clone(), staging.0.clone());
        tokio::task::spawn_blocking(move || store.commit(&path, &manifest))
            .await
            .map_err(blocking_failed)?
            .map_err(|e| {
                Status::data_loss(format!("{e}; nothing was stored: push the files again"))
            })?;
    }
    drop(staging);
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

/// A push's staging directory, removed when dropped.
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

/// Writes the chunks into `staging`, checking order and sizes; returns the bytes received.
async fn receive_files(
    stream: &mut Streaming<PushModelChunk>,
    header: &PushModelHeader,
    staging: &std::path::Path,
) -> Result<u64, Status> {
    let mut written = vec![0u64; header.files.len()];
    let mut open: Option<(usize, tokio::fs::File)> = None;
    let mut total = 0u64;
    let io = |path: &std::path::Path, e: std::io::Error| {
        Status::internal(format!("cannot write {}: {e}", path.display()))
    };
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
        if open.as_ref().map(|(i, _)| *i) != Some(index) {
            if let Some((_, mut previous)) = open.take() {
                previous.flush().await.map_err(|e| io(staging, e))?;
            }
            let path = staging.join(&file.path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| io(parent, e))?;
            }
            let handle = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .map_err(|e| io(&path, e))?;
            open = Some((index, handle));
        }
        if let Some((_, handle)) = open.as_mut() {
            handle
                .write_all(&chunk.data)
                .await
                .map_err(|e| io(staging, e))?;
        }
        written[index] = end;
        total += chunk.data.len() as u64;
    }
    if let Some((_, mut last)) = open.take() {
        last.flush().await.map_err(|e| io(staging, e))?;
    }
    for (file, got) in header.files.iter().zip(&written) {
        if *got != file.size_bytes {
            return Err(Status::invalid_argument(format!(
                "the push ended after {got} of {} bytes of {:?}: nothing was stored, push again",
                file.size_bytes, file.path
            )));
        }
        // Empty files get no chunks; create them so the directory is complete.
        if file.size_bytes == 0 {
            let path = staging.join(&file.path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| io(parent, e))?;
            }
            tokio::fs::write(&path, b"")
                .await
                .map_err(|e| io(&path, e))?;
        }
    }
    Ok(total)
}
