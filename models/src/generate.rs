//! Text generation with the decoder: sampling (greedy at temperature 0; else temperature, top-k
//! and top-p, from a seeded generator so that a seed reproduces its output), stop strings,
//! the end-of-sequence token and a token budget.

use std::path::Path;

use crate::bpe::Bpe;
use crate::gguf::GgufError;

/// How to pick tokens, and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 1.0 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
    /// Generation stops before the first of these to appear in the text.
    pub stop: Vec<String>,
    /// Never pick the end-of-sequence token (benchmarks: every request makes `max_tokens`).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Refuses values no sampler can honour, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature {} must be a number >= 0 (0 is greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("a stop string may not be empty".into());
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were made.
    Length,
    /// A stop string appeared.
    Stop,
    /// The model's end-of-sequence token came.
    Eos,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Eos => "eos",
        }
    }
}

/// One finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    /// The text of `token_ids`, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// splitmix64: small, seedable, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from `logits`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    let argmax = || {
        (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
            .unwrap_or(0) as u32
    };
    if params.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let top = logits[order[0] as usize];
    let weights: Vec<f64> = order
        .iter()
        .map(|&id| (f64::from(logits[id as usize] - top) / f64::from(params.temperature)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // The smallest prefix whose probability reaches top_p.
    let mut kept = 0;
    let mut mass = 0.0;
    for weight in &weights {
        kept += 1;
        mass += weight / total;
        if mass >= f64::from(params.top_p) {
            break;
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut draw = rng.next_f64() * kept_total;
    for (i, weight) in weights[..kept].iter().enumerate() {
        if draw < *weight {
            return order[i];
        }
        draw -= weight;
    }
    order[kept - 1]
}

/// The byte offset where the first stop string starts in `text`, if one does.
fn stop_at(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// What one sampled token gave: the token (none for the end-of-sequence token), its
/// log-probability under the model, the text that may be shown now, and whether the
/// sequence has finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub token: Option<u32>,
    pub logprob: f32,
    pub text: String,
    pub finish: Option<FinishReason>,
}

/// One sequence's generation: sampling, the token budget, the end-of-sequence token, stop
/// strings, and the text streamed so far. Text is released only when it is whole UTF-8 and
/// cannot be the start of a stop string, so a streamed text never has to be taken back.
#[derive(Debug, Clone)]
pub struct Decoding {
    params: SamplingParams,
    rng: Rng,
    eos: u32,
    tokens: Vec<u32>,
    /// Bytes of text already released.
    sent: usize,
    finish: Option<FinishReason>,
}

impl Decoding {
    pub fn new(params: SamplingParams, eos: u32) -> Self {
        Self {
            rng: Rng::new(params.seed),
            params,
            eos,
            tokens: Vec::new(),
            sent: 0,
            finish: None,
        }
    }

    /// Tokens generated so far (without the end-of-sequence token).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples the next token from `logits` and says what to stream.
    pub fn next(&mut self, logits: &[f32], tokenizer: &Bpe) -> Emitted {
        let token = if self.params.ignore_eos && (self.eos as usize) < logits.len() {
            let mut masked = logits.to_vec();
            masked[self.eos as usize] = f32::NEG_INFINITY;
            sample(&masked, &self.params, &mut self.rng)
        } else {
            sample(logits, &self.params, &mut self.rng)
        };
        let logprob = log_softmax_at(logits, token as usize);
        if token == self.eos {
            self.finish = Some(FinishReason::Eos);
            return Emitted {
                token: None,
                logprob,
                text: self.release(tokenizer, true),
                finish: self.finish,
            };
        }
        self.tokens.push(token);
        let bytes = tokenizer.decode_bytes(&self.tokens);
        let whole = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            // Up to the last whole character: a character split between tokens waits.
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
        };
        if let Some(at) = stop_at(whole, &self.params.stop) {
            self.finish = Some(FinishReason::Stop);
            let text = whole[self.sent.min(at)..at].to_owned();
            self.sent = at;
            return Emitted {
                token: Some(token),
                logprob,
                text,
                finish: self.finish,
            };
        }
        if self.tokens.len() >= self.params.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        let text = self.release(tokenizer, self.finish.is_some());
        Emitted {
            token: Some(token),
            logprob,
            text,
            finish: self.finish,
        }
    }

    /// The text not yet released: all of it at the end (a split character becomes U+FFFD),
    /// else what is whole and cannot begin a stop string.
    fn release(&mut self, tokenizer: &Bpe, last: bool) -> String {
        let bytes = tokenizer.decode_bytes(&self.tokens);
        if last {
            let text = String::from_utf8_lossy(&bytes[self.sent.min(bytes.len())..]).into_owned();
            self.sent = bytes.len();
            return text;
        }
        let valid = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) => e.valid_up_to(),
        };
        let whole = std::str::from_utf8(&bytes[..valid]).unwrap_or_default();
        let mut safe = whole.len();
        for stop in &self.params.stop {
            // The longest end of the text that a stop string starts with.
            for (at, _) in whole.char_indices().rev().take(stop.chars().count()) {
                if stop.starts_with(&whole[at..]) {
                    safe = safe.min(at);
                }
            }
        }
        let text = whole[self.sent.min(safe)..safe].to_owned();
        self.sent = self.sent.max(safe);
        text
    }

    /// The finished generation (text cut before a stop string).
    pub fn into_generation(self, tokenizer: &Bpe) -> Generation {
        let mut text = tokenizer.decode(&self.tokens);
        if let Some(at) = stop_at(&text, &self.params.stop) {
            text.truncate(at);
        }
        Generation {
            token_ids: self.tokens,
            text,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
        }
    }
}

/// `log softmax(logits)[index]`, in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(logits[index] - max) - total.ln()) as f32
}

/// The GGUF file `path` names: itself, or the only `.gguf` in a directory.
pub fn gguf_in(path: &Path) -> Result<std::path::PathBuf, GgufError> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    let io = |source| GgufError::Io {
        path: path.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?.path();
        if entry.extension().is_some_and(|e| e == "gguf") {
            found.push(entry);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(GgufError::Unsupported {
            path: path.to_owned(),
            reason: format!(
                "the directory holds {n} .gguf files; a decoder's directory holds exactly one"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_a_seed_repeats_its_draws() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let greedy = SamplingParams::default();
        assert_eq!(sample(&logits, &greedy, &mut Rng::new(1)), 1);
        let hot = SamplingParams {
            temperature: 1.0,
            seed: 9,
            ..SamplingParams::default()
        };
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| sample(&logits, &hot, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(9), draws(9));
        assert_ne!(draws(9), draws(10));
        assert!(draws(9).contains(&2), "a close second is drawn sometimes");
        // top_k = 1 and a tiny top_p are greedy whatever the temperature.
        for params in [
            SamplingParams {
                top_k: 1,
                ..hot.clone()
            },
            SamplingParams {
                top_p: 0.01,
                ..hot.clone()
            },
        ] {
            let mut rng = Rng::new(3);
            assert!((0..50).all(|_| sample(&logits, &params, &mut rng) == 1));
        }
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let bad = |params: SamplingParams| params.check().unwrap_err();
        let base = SamplingParams::default();
        assert!(bad(SamplingParams {
            temperature: -1.0,
            ..base.clone()
        })
        .contains("temperature"));
        assert!(bad(SamplingParams {
            top_p: 0.0,
            ..base.clone()
        })
        .contains("top_p"));
        assert!(bad(SamplingParams {
            max_tokens: 0,
            ..base.clone()
        })
        .contains("max_tokens"));
        assert!(bad(SamplingParams {
            stop: vec![String::new()],
            ..base
        })
        .contains("stop"));
    }

    #[test]
    fn stop_strings_cut_at_the_earliest() {
        let stop = vec!["\n\n".to_owned(), "END".to_owned()];
        assert_eq!(stop_at("abc END x\n\n", &stop), Some(4));
        assert_eq!(stop_at("abc", &stop), None);
    }

    #[test]
    fn streamed_text_holds_back_what_may_start_a_stop_string() {
        // A byte-level vocabulary: token i is byte i.
        let bpe = Bpe::for_bytes();
        let params = SamplingParams {
            max_tokens: 100,
            stop: vec!["END".into()],
            ..SamplingParams::default()
        };
        let mut decoding = Decoding::new(params, 0);
        let mut streamed = String::new();
        let mut finish = None;
        for &byte in b"ab EN xEND tail" {
            let mut logits = vec![0f32; 256];
            logits[byte as usize] = 10.0;
            let emitted = decoding.next(&logits, &bpe);
            streamed.push_str(&emitted.text);
            if let Some(f) = emitted.finish {
                finish = Some(f);
                break;
            }
            // What is streamed so far never contains the stop string's start at its end
            // until it is known not to be one.
            assert!(
                !streamed.ends_with("EN") && !streamed.contains("END"),
                "{streamed:?}"
            );
        }
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(streamed, "ab EN x");
        let generation = decoding.into_generation(&bpe);
        assert_eq!(generation.text, "ab EN x");
    }

    #[test]
    fn a_character_split_between_tokens_is_released_whole() {
        let bpe = Bpe::for_bytes();
        let mut decoding = Decoding::new(SamplingParams::default(), 0);
        let mut texts = Vec::new();
        for &byte in "é!".as_bytes() {
            let mut logits = vec![0f32; 256];
            logits[byte as usize] = 10.0;
            texts.push(decoding.next(&logits, &bpe).text);
        }
        assert_eq!(texts, ["", "é", "!"]);
        assert!((log_softmax_at(&[0.0, 0.0], 1) - 0.5f32.ln()).abs() < 1e-6);
    }
}
