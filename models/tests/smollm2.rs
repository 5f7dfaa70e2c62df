//! SmolLM2-135M-Instruct's GGUF against the reference (scripts/ref/smollm2_ref.py): the
//! metadata troupe reads, and every tensor dequantised bit for bit as gguf-py does it
//! (tests/data/smollm2/digests.json). Needs the real file: scripts/test.sh fetches it into the
//! cache (`troupe models fetch smollm2-135m`), or set TROUPE_SMOLLM2_DIR.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use troupe_models::fetch::{known_model, model_dir, troupe_home, SMOLLM2_GGUF};
use troupe_models::gguf::GgufFile;
use troupe_models::quant::GgmlType;

/// The fetched GGUF, or None (the test skips) unless TROUPE_REQUIRE_MODEL says it must be there.
fn gguf() -> Option<PathBuf> {
    let dir = std::env::var_os("TROUPE_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| model_dir(&troupe_home(), "smollm2-135m"));
    if known_model("smollm2-135m").unwrap().is_complete(&dir) {
        return Some(dir.join(SMOLLM2_GGUF));
    }
    assert!(
        std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
        "TROUPE_REQUIRE_MODEL is set but {} holds no {SMOLLM2_GGUF}: run `troupe models fetch smollm2-135m` or set TROUPE_SMOLLM2_DIR",
        dir.display()
    );
    eprintln!("SKIPPED: run `troupe models fetch smollm2-135m` (scripts/test.sh does) or set TROUPE_SMOLLM2_DIR");
    None
}

#[derive(serde::Deserialize)]
struct TensorDigest {
    shape: Vec<usize>,
    sha256: String,
}

#[test]
fn the_metadata_is_the_models() {
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
    for (key, value) in [
        ("llama.block_count", 30),
        ("llama.embedding_length", 576),
        ("llama.attention.head_count", 9),
        ("llama.attention.head_count_kv", 3),
        ("llama.feed_forward_length", 1536),
        ("llama.vocab_size", 49152),
        ("llama.context_length", 8192),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
    ] {
        assert_eq!(file.get_u64(key).unwrap(), value, "{key}");
    }
    assert_eq!(file.get_f64("llama.rope.freq_base").unwrap(), 1e5);
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(
        file.get_strings("tokenizer.ggml.merges").unwrap().len(),
        48_900
    );
    assert_eq!(
        file.get_strings("tokenizer.ggml.tokens").unwrap().len(),
        49_152
    );
    let mut types = BTreeMap::new();
    for tensor in file.tensors() {
        *types.entry(tensor.ggml_type.name()).or_insert(0) += 1;
    }
    assert_eq!(
        types,
        BTreeMap::from([("F32", 61), ("Q4_1", 210), ("Q8_0", 1)])
    );
    assert!(
        file.tensor("output.weight").is_none(),
        "the embeddings are tied"
    );
    assert_eq!(
        file.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
}

#[test]
fn every_tensor_dequantises_bit_for_bit_as_gguf_py_does() {
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let golden: BTreeMap<String, TensorDigest> = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/digests.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let names: std::collections::BTreeSet<&String> =
        file.tensors().iter().map(|t| &t.name).collect();
    assert_eq!(
        names,
        golden.keys().collect(),
        "the file and the reference list other tensors"
    );
    let mut wrong = Vec::new();
    for tensor in file.tensors() {
        let expected = &golden[&tensor.name];
        assert_eq!(tensor.shape(), expected.shape, "{}", tensor.name);
        let values = file.dequantize(tensor);
        let mut hasher = Sha256::new();
        for v in &values {
            hasher.update(v.to_le_bytes());
        }
        if hex::encode(hasher.finalize()) != expected.sha256 {
            wrong.push(tensor.name.clone());
        }
    }
    assert!(
        wrong.is_empty(),
        "dequantised differently from gguf-py: {wrong:?}"
    );
}

#[derive(serde::Deserialize)]
struct Tokenized {
    text: String,
    ids: Vec<u32>,
}

/// troupe's tokenizer against HF `tokenizers` built from the same vocab and merges by the
/// reference script: digits, whitespace runs, emoji, CJK, control tokens in the text.
#[test]
fn the_tokenizer_matches_an_independent_one() {
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let bpe = troupe_models::bpe::Bpe::from_gguf(&file).unwrap();
    let golden: Vec<Tokenized> = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/tokens.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in &golden {
        assert_eq!(bpe.encode(&case.text), case.ids, "{:?}", case.text);
        // Bytes without a token of their own became the unknown token, which decodes to
        // itself; everything else decodes back to the text.
        if !case.ids.contains(&0) {
            assert_eq!(bpe.decode(&case.ids), case.text);
        }
    }
}

#[derive(serde::Deserialize)]
struct Step {
    top_ids: Vec<u32>,
    top_logits: Vec<f64>,
    gap: f64,
}

#[derive(serde::Deserialize)]
struct Generated {
    prompt: String,
    prompt_ids: Vec<u32>,
    token_ids: Vec<u32>,
    steps: Vec<Step>,
}

/// Logits within this of the reference's (float64 on the dequantised weights).
const LOGIT_TOLERANCE: f64 = 1e-3;
/// Below this gap between the reference's top two logits, either may win.
const TIE_GAP: f64 = 1e-4;

/// The decoder against the reference's greedy continuations: at every step the top-10 logits
/// are within 1e-3 and the greedy choice is the reference's. Each step is fed the reference's
/// token, so one step's error cannot hide the next ones.
fn golden() -> Vec<Generated> {
    serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/generate.json"),
        )
        .unwrap(),
    )
    .unwrap()
}

/// Checks one step's logits against the reference's: the top-10 within the tolerance, and
/// the greedy choice unless the reference's top-2 gap is a tie. Returns the largest error.
fn check_step(case: &Generated, step: usize, logits: &[f32]) -> f64 {
    let expected = &case.steps[step];
    let mut worst = 0f64;
    for (&id, &want) in expected.top_ids.iter().zip(&expected.top_logits) {
        let error = (f64::from(logits[id as usize]) - want).abs();
        worst = worst.max(error);
        assert!(
            error <= LOGIT_TOLERANCE,
            "{:?} step {step}: logit of token {id} is {}, the reference's {want}",
            case.prompt,
            logits[id as usize]
        );
    }
    let argmax = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32;
    if expected.gap >= TIE_GAP {
        assert_eq!(
            argmax, case.token_ids[step],
            "{:?} step {step}",
            case.prompt
        );
    }
    worst
}

#[test]
fn greedy_steps_match_the_reference() {
    use troupe_models::llama::Llama;
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let device = troupe_models::cpu_device();
    let model = Llama::<troupe_models::CpuBackend>::load(&file, &device).unwrap();
    let mut worst = 0f64;
    for case in &golden() {
        let mut cache = model.new_cache();
        let mut input = case.prompt_ids.clone();
        for step in 0..case.steps.len() {
            let logits = model.forward(&input, &mut cache);
            let rows = logits.dims()[0];
            let last: Vec<f32> = logits
                .slice([rows - 1..rows, 0..model.config().vocab])
                .into_data()
                .to_vec()
                .unwrap();
            worst = worst.max(check_step(case, step, &last));
            input = vec![case.token_ids[step]];
        }
    }
    eprintln!("largest |Δlogit| over the top-10 of every step: {worst:.2e}");
}

/// The serving decoder (quantised weights, paged cache) steps all golden prompts together:
/// prompts prefilled in chunks of 5 tokens beside other sequences' decodes, as the scheduler
/// mixes them. Every sequence's logits must still match the reference's.
#[test]
fn the_quantised_decoder_matches_the_reference_in_a_ragged_batch() {
    use troupe_models::decoder::{QuantLlama, SeqStep};
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let model = QuantLlama::load(&file).unwrap();
    let cases = golden();
    const CHUNK: usize = 5;
    let mut pool = model.new_pool(16, 256);
    struct Seq {
        tokens: Vec<u32>,
        cached: usize,
        blocks: Vec<u32>,
        step: usize,
    }
    let mut seqs: Vec<Seq> = cases
        .iter()
        .map(|case| Seq {
            tokens: case.prompt_ids.clone(),
            cached: 0,
            blocks: Vec::new(),
            step: 0,
        })
        .collect();
    let mut worst = 0f64;
    // Sequence i joins at step i, so prefills overlap other sequences' decodes.
    for round in 0.. {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| i <= round && seqs[i].step < cases[i].steps.len())
            .collect();
        if active.is_empty() && round > seqs.len() {
            break;
        }
        for &i in &active {
            let seq = &mut seqs[i];
            let end = (seq.cached + CHUNK).min(seq.tokens.len());
            let need = pool.blocks_for(end).saturating_sub(seq.blocks.len());
            seq.blocks.extend(pool.allocate(need).unwrap());
        }
        let spans: Vec<(usize, usize)> = active
            .iter()
            .map(|&i| {
                let seq = &seqs[i];
                (seq.cached, (seq.cached + CHUNK).min(seq.tokens.len()))
            })
            .collect();
        let steps: Vec<SeqStep> = active
            .iter()
            .zip(&spans)
            .map(|(&i, &(from, to))| SeqStep {
                tokens: &seqs[i].tokens[from..to],
                start: from,
                blocks: &seqs[i].blocks,
                logits: to == seqs[i].tokens.len(),
            })
            .collect();
        let logits = model.step(&mut pool, &steps);
        let mut out = logits.into_iter();
        for (&i, &(_, to)) in active.iter().zip(&spans) {
            let seq = &mut seqs[i];
            seq.cached = to;
            if to == seq.tokens.len() {
                let last = out.next().unwrap();
                worst = worst.max(check_step(&cases[i], seq.step, &last));
                seq.tokens.push(cases[i].token_ids[seq.step]);
                seq.step += 1;
            }
        }
    }
    for seq in seqs {
        pool.release(seq.blocks);
    }
    assert_eq!(pool.free_blocks(), 256);
    eprintln!("quantised decoder: largest |Δlogit| over the top-10 of every step: {worst:.2e}");
}

/// The golden prompts' ids come out of troupe's tokenizer and the GGUF's own chat template
/// (rendered with minijinja) as they came out of the reference's.
#[test]
fn prompts_tokenise_as_the_reference_did() {
    use troupe_models::chat::{ChatTemplate, Message};
    let Some(path) = gguf() else { return };
    let file = GgufFile::open(&path).unwrap();
    let bpe = troupe_models::bpe::Bpe::from_gguf(&file).unwrap();
    let template = ChatTemplate::new(
        file.get_str("tokenizer.chat_template").unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    #[derive(serde::Deserialize)]
    struct Prompt {
        prompt: String,
        chat: bool,
        prompt_ids: Vec<u32>,
    }
    let golden: Vec<Prompt> = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2/generate.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for case in golden {
        let text = if case.chat {
            template
                .render(&[Message::new("user", &case.prompt)], true)
                .unwrap()
        } else {
            case.prompt.clone()
        };
        assert_eq!(bpe.encode(&text), case.prompt_ids, "{:?}", case.prompt);
    }
}
