//! Replays the committed fuzz corpora (fuzz/corpus/<target>/) through the same entry points
//! the cargo-fuzz targets drive, on the stable toolchain: every input that once found new
//! coverage still runs without a panic. `scripts/fuzz.sh` grows the corpora.

use std::path::Path;

#[test]
fn every_committed_fuzz_input_runs_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut total = 0;
    for (target, entry) in troupe_node::fuzz_entry::TARGETS {
        let dir = root.join(target);
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!inputs.is_empty(), "{} is empty", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{} panicked", input.display());
            total += 1;
        }
    }
    eprintln!("replayed {total} fuzz inputs");
}
