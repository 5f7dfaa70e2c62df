//! Model artifacts: a version is a directory of files, identified by the sha256 of a manifest
//! that lists each file's name, size and sha256. The node keeps verified copies in a
//! content-addressed store under its data dir, so a source directory that changes later can
//! never change what a registered version serves.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// Files an encoder's version directory must hold.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Checks that the files at `paths` (relative, '/'-separated) make a model version: one
/// `.gguf` file (a decoder), or the encoder's [`REQUIRED_FILES`]. Says what is missing.
pub fn check_model_files<S: AsRef<str>>(paths: &[S]) -> Result<crate::ModelFormat, String> {
    let ggufs = paths
        .iter()
        .filter(|p| p.as_ref().to_ascii_lowercase().ends_with(".gguf"))
        .count();
    match ggufs {
        0 => {
            for required in REQUIRED_FILES {
                if !paths.iter().any(|p| p.as_ref() == required) {
                    return Err(format!(
                        "no {required}: a model directory holds {} (an encoder) or one .gguf file (a decoder)",
                        REQUIRED_FILES.join(", ")
                    ));
                }
            }
            Ok(crate::ModelFormat::Safetensors)
        }
        1 => Ok(crate::ModelFormat::Gguf),
        n => Err(format!(
            "{n} .gguf files: a decoder's directory holds exactly one"
        )),
    }
}

/// Marker written last into a store entry: its files are complete and verified.
const COMPLETE_MARKER: &str = ".troupe-verified";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the version directory, '/'-separated.
    pub path: String,
    pub size_bytes: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// What a version is made of. Its digest is the sha256 of its canonical JSON encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Sorted by path.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Hashes every regular file under `dir` (hidden files excluded). This reads every byte:
    /// call it on a blocking thread.
    pub fn of_dir(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::ModelDirMissing {
                path: dir.to_owned(),
            });
        }
        let mut relative = Vec::new();
        collect_files(dir, Path::new(""), &mut relative)?;
        relative.sort();
        let names: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .collect();
        if crate::ModelFormat::of_files(&names) == crate::ModelFormat::Safetensors {
            for required in REQUIRED_FILES {
                if !dir.join(required).is_file() {
                    return Err(ModelError::ModelFileMissing {
                        path: dir.join(required),
                    });
                }
            }
        } else if let Err(reason) = check_model_files(&names) {
            return Err(ModelError::InvalidConfig {
                path: dir.to_owned(),
                reason,
            });
        }
        let mut files = Vec::with_capacity(relative.len());
        for path in relative {
            let full = dir.join(&path);
            let (size_bytes, sha256) = hash_file(&full)?;
            files.push(ManifestFile {
                path: path.to_string_lossy().replace('\\', "/"),
                size_bytes,
                sha256,
            });
        }
        Ok(Self { files })
    }

    pub fn canonical_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The version's identity: sha256 of the canonical manifest, lowercase hex.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

fn collect_files(root: &Path, relative: &Path, out: &mut Vec<PathBuf>) -> Result<(), ModelError> {
    let dir = root.join(relative);
    let entries = std::fs::read_dir(&dir).map_err(ModelError::io(&dir))?;
    for entry in entries {
        let entry = entry.map_err(ModelError::io(&dir))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = relative.join(&name);
        // The entry itself, never what a link points to: a link could take the push
        // anywhere on this machine (/etc/passwd), so links and special files are refused.
        let kind = entry.file_type().map_err(ModelError::io(entry.path()))?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            out.push(path);
        } else {
            return Err(ModelError::NotARegularFile {
                path: entry.path(),
                what: if kind.is_symlink() {
                    "a symbolic link"
                } else {
                    "not a regular file (a device, socket or pipe)"
                },
            });
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String), ModelError> {
    let mut file = std::fs::File::open(path).map_err(ModelError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(ModelError::io(path))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// A node's verified copies of model versions: `<root>/<digest>/`.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path_of(&self, digest: &str) -> PathBuf {
        self.root.join(digest)
    }

    /// The manifest of a complete stored copy.
    pub fn manifest(&self, digest: &str) -> Option<Manifest> {
        let dir = self.get(digest)?;
        let bytes = std::fs::read(dir.join(".troupe-manifest.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Re-hashes a stored copy against its manifest before it is used. A copy that no
    /// longer matches (disk corruption, a hand edit) is removed, so it is fetched again.
    /// Blocking: it reads every byte.
    pub fn verify(&self, digest: &str) -> Result<PathBuf, ModelError> {
        let dir = self.path_of(digest);
        let manifest = self
            .manifest(digest)
            .filter(|m| m.digest() == digest)
            .ok_or_else(|| ModelError::ArtifactMismatch {
                path: dir.clone(),
                expected: digest.to_owned(),
                actual: "an unreadable or foreign manifest".into(),
            });
        let check = manifest.and_then(|manifest| {
            for file in &manifest.files {
                let path = dir.join(&file.path);
                let (size, sha256) = hash_file(&path)?;
                if size != file.size_bytes || sha256 != file.sha256 {
                    return Err(ModelError::ArtifactMismatch {
                        path,
                        expected: file.sha256.clone(),
                        actual: sha256,
                    });
                }
            }
            Ok(dir.clone())
        });
        if check.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        check
    }

    /// The stored copy of `digest`, if it is complete.
    pub fn get(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.path_of(digest);
        dir.join(COMPLETE_MARKER).is_file().then_some(dir)
    }

    /// Copies `source` into the store if its manifest digest is `digest`, verifying the
    /// copy before it is marked complete. Blocking: run it on a blocking thread.
    pub fn import(&self, source: &Path, digest: &str) -> Result<PathBuf, ModelError> {
        if let Some(existing) = self.get(digest) {
            return Ok(existing);
        }
        let manifest = Manifest::of_dir(source)?;
        let actual = manifest.digest();
        if actual != digest {
            return Err(ModelError::ArtifactMismatch {
                path: source.to_owned(),
                expected: digest.to_owned(),
                actual,
            });
        }
        let staging = self.staging_dir(digest)?;
        for file in &manifest.files {
            let from = source.join(&file.path);
            let to = staging.join(&file.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(ModelError::io(parent))?;
            }
            std::fs::copy(&from, &to).map_err(ModelError::io(&from))?;
        }
        self.commit(&staging, &manifest)
    }

    /// Removes staging directories left by a push or import that never finished (the
    /// process was killed midway). Call at start, before any push can begin. Returns how
    /// many were removed.
    pub fn remove_leftover_staging(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".partial") {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(error) => {
                        tracing::warn!(path = %entry.path().display(), %error, "cannot remove a leftover staging directory")
                    }
                }
            }
        }
        removed
    }

    /// A fresh, empty directory of its own to assemble `digest` in; concurrent uploads or
    /// imports of the same digest do not share one.
    pub fn staging_dir(&self, digest: &str) -> Result<PathBuf, ModelError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.root).map_err(ModelError::io(&self.root))?;
        let unique = format!(
            ".{digest}.{}-{}.partial",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let staging = self.root.join(unique);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(ModelError::io(&staging))?;
        }
        std::fs::create_dir_all(&staging).map_err(ModelError::io(&staging))?;
        Ok(staging)
    }

    /// Verifies every file in `staging` against `manifest` (size and sha256) and moves it
    /// into the store under the manifest's digest. A mismatch leaves the store untouched.
    /// Blocking: it reads every byte.
    pub fn commit(&self, staging: &Path, manifest: &Manifest) -> Result<PathBuf, ModelError> {
        let digest = manifest.digest();
        for file in &manifest.files {
            let path = staging.join(&file.path);
            let (size, sha256) = hash_file(&path)?;
            if size != file.size_bytes || sha256 != file.sha256 {
                let _ = std::fs::remove_dir_all(staging);
                return Err(ModelError::ArtifactMismatch {
                    path,
                    expected: file.sha256.clone(),
                    actual: sha256,
                });
            }
        }
        let manifest_path = staging.join(".troupe-manifest.json");
        std::fs::write(&manifest_path, manifest.canonical_json())
            .map_err(ModelError::io(&manifest_path))?;
        let marker = staging.join(COMPLETE_MARKER);
        std::fs::write(&marker, &digest).map_err(ModelError::io(&marker))?;
        let target = self.path_of(&digest);
        if self.get(&digest).is_some() {
            let _ = std::fs::remove_dir_all(staging);
            return Ok(target);
        }
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(ModelError::io(&target))?;
        }
        std::fs::rename(staging, &target).map_err(ModelError::io(&target))?;
        Ok(target)
    }
}

/// Checks a manifest path is a plain relative path inside the version directory.
pub fn check_manifest_path(path: &str) -> Result<(), String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == ".." || part.starts_with('.'));
    if bad {
        return Err(format!(
            "file path {path:?} must be relative, '/'-separated, without '.', '..' or hidden parts"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_names_the_bytes_and_import_verifies_them() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("model");
        crate::write_tiny_model_dir(&source, 7).unwrap();
        let manifest = Manifest::of_dir(&source).unwrap();
        let digest = manifest.digest();
        assert_eq!(digest.len(), 64);
        assert_eq!(Manifest::of_dir(&source).unwrap().digest(), digest);

        let store = ArtifactStore::new(dir.path().join("store"));
        assert!(store.get(&digest).is_none());
        let stored = store.import(&source, &digest).unwrap();
        assert_eq!(Manifest::of_dir(&stored).unwrap().digest(), digest);
        assert_eq!(store.get(&digest), Some(stored));

        // Changed bytes are a different version: importing them under the old digest fails.
        std::fs::write(source.join("extra.txt"), b"changed").unwrap();
        let error = store.import(&source, &"0".repeat(64)).unwrap_err();
        assert!(
            matches!(error, ModelError::ArtifactMismatch { .. }),
            "{error}"
        );
    }
}
