//! Byte-level BPE (GPT-2 style) as a GGUF file describes it: `tokenizer.ggml.model = gpt2`,
//! with its vocabulary, merges, token types and pre-tokenizer.
//!
//! Encoding:
//! 1. control tokens (type 3, e.g. `<|im_start|>`) are matched as whole units wherever they
//!    appear in the text; the text between them is encoded as follows;
//! 2. the pre-tokenizer splits the text into pieces. `smollm` first isolates every numeric
//!    character, then applies GPT-2's split
//!    (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`);
//! 3. each piece's UTF-8 bytes become the byte tokens (GPT-2's byte-to-character table) and
//!    are merged pairwise, lowest merge rank first, until no pair has a merge.
//!
//! Decoding maps tokens back to bytes; [`Bpe::decode_bytes`] returns raw bytes so a stream can
//! hold back an incomplete UTF-8 sequence until its next token completes it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::gguf::{GgufError, GgufFile};

/// GGUF token type of control tokens.
const CONTROL: i64 = 3;
/// Pieces remembered per tokenizer; a cache hit skips the merge loop.
const CACHE_PIECES: usize = 65_536;

/// The pre-tokenizers troupe implements, by their GGUF name (`tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's split.
    Gpt2,
    /// Every numeric character alone, then GPT-2's split (SmolLM's).
    SmolLm,
}

impl PreTokenizer {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "default" => Some(Self::Gpt2),
            "smollm" => Some(Self::SmolLm),
            _ => None,
        }
    }
}

pub struct Bpe {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// (left, right) to (rank, merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Token of each byte value: the unknown token for a byte the vocabulary lacks.
    byte_tokens: [u32; 256],
    /// Bytes of each token (a control token's are its text).
    token_bytes: Vec<Vec<u8>>,
    /// Control tokens, longest first, so that one that is a prefix of another never wins.
    controls: Vec<(String, u32)>,
    control_ids: Vec<bool>,
    pre: PreTokenizer,
    split: regex::Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe")
            .field("tokens", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .finish()
    }
}

/// GPT-2's table from bytes to printable characters: the printable Latin-1 bytes map to
/// themselves, the rest to U+0100 upwards in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).expect("below the surrogates");
            next += 1;
            c
        };
    }
    table
}

impl Bpe {
    /// The tokenizer a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, GgufError> {
        let unsupported = |reason: String| GgufError::Unsupported {
            path: file.path().to_owned(),
            reason,
        };
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(unsupported(format!(
                "tokenizer.ggml.model is {model:?}; troupe reads byte-level BPE (\"gpt2\")"
            )));
        }
        let pre_name = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| {
            unsupported(format!(
                "tokenizer.ggml.pre is {pre_name:?}; troupe implements \"smollm\" and \"gpt2\""
            ))
        })?;
        let tokens: Vec<String> = file
            .get_strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let types = match file.metadata().get("tokenizer.ggml.token_type") {
            Some(_) => file.get_ints("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(unsupported(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let unknown = match file.metadata().get("tokenizer.ggml.unknown_token_id") {
            Some(_) => Some(file.get_u64("tokenizer.ggml.unknown_token_id")? as u32),
            None => None,
        };
        let merges = file.get_strings("tokenizer.ggml.merges")?;
        Self::new(tokens, &types, &merges, unknown, pre).map_err(unsupported)
    }

    /// A tokenizer from its parts; `merges` are `"left right"`, highest priority first. A byte
    /// value with no token of its own becomes `unknown` (SmolLM2 lacks a few control bytes and
    /// bytes UTF-8 never uses); without one, every byte must have a token.
    pub fn new(
        tokens: Vec<String>,
        types: &[i64],
        merges: &[&str],
        unknown: Option<u32>,
        pre: PreTokenizer,
    ) -> Result<Self, String> {
        if let Some(unknown) = unknown.filter(|&u| u as usize >= tokens.len()) {
            return Err(format!(
                "the unknown token {unknown} is outside the vocabulary of {}",
                tokens.len()
            ));
        }
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let chars = byte_chars();
        let mut byte_tokens = [0u32; 256];
        for (byte, c) in chars.iter().enumerate() {
            byte_tokens[byte] = ids
                .get(c.to_string().as_str())
                .copied()
                .or(unknown)
                .ok_or_else(|| {
                    format!("the vocabulary has no token for byte {byte:#04x} and no unknown token")
                })?;
        }
        let mut merged = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let (left, right) = merge
                .split_once(' ')
                .ok_or_else(|| format!("merge {rank} ({merge:?}) is not two tokens"))?;
            let lookup = |t: &str| {
                ids.get(t)
                    .copied()
                    .ok_or_else(|| format!("merge {rank} ({merge:?}) names unknown token {t:?}"))
            };
            let pair = (lookup(left)?, lookup(right)?);
            let result = lookup(&format!("{left}{right}"))?;
            merged.entry(pair).or_insert((rank as u32, result));
        }
        let mut char_bytes = HashMap::new();
        for (byte, c) in chars.iter().enumerate() {
            char_bytes.insert(*c, byte as u8);
        }
        let control_ids: Vec<bool> = types.iter().map(|&t| t == CONTROL).collect();
        let token_bytes = tokens
            .iter()
            .zip(&control_ids)
            .map(|(token, &control)| {
                if control {
                    token.as_bytes().to_vec()
                } else {
                    token
                        .chars()
                        .map(|c| char_bytes.get(&c).copied().unwrap_or(b'?'))
                        .collect()
                }
            })
            .collect();
        let mut controls: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| control_ids[*i])
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        controls.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
        let split =
            regex::Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
                .expect("a valid pattern");
        Ok(Self {
            tokens,
            ids,
            merges: merged,
            byte_tokens,
            token_bytes,
            controls,
            control_ids,
            pre,
            split,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A vocabulary of the 256 bytes and no merges: token `i` is byte `i` (for tests).
    #[cfg(test)]
    pub(crate) fn for_bytes() -> Self {
        let tokens = byte_chars().iter().map(char::to_string).collect();
        Self::new(tokens, &[1; 256], &[], None, PreTokenizer::Gpt2).expect("byte vocabulary")
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token's text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.control_ids.get(id as usize).copied().unwrap_or(false)
    }

    /// Token ids of `text`; control tokens written in the text count as themselves.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = self
                .controls
                .iter()
                .filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            match next {
                Some((at, len, id)) => {
                    self.encode_ordinary(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_ordinary(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// Text with no control tokens in it.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) {
        match self.pre {
            PreTokenizer::Gpt2 => self.split_gpt2(text, out),
            PreTokenizer::SmolLm => {
                let mut start = 0;
                for (at, c) in text.char_indices() {
                    if c.is_numeric() {
                        self.split_gpt2(&text[start..at], out);
                        self.encode_piece(&text[at..at + c.len_utf8()], out);
                        start = at + c.len_utf8();
                    }
                }
                self.split_gpt2(&text[start..], out);
            }
        }
    }

    /// GPT-2's split. The pattern has no lookahead, so `\s+(?!\S)` is done here: a run of
    /// whitespace followed by more text gives its last character to the next piece.
    fn split_gpt2(&self, text: &str, out: &mut Vec<u32>) {
        let mut at = 0;
        while at < text.len() {
            let Some(found) = self.split.find_at(text, at) else {
                break;
            };
            let mut end = found.end();
            let piece = found.as_str();
            if end < text.len() && piece.chars().all(char::is_whitespace) {
                let last = piece.chars().next_back().map_or(0, char::len_utf8);
                if piece.len() > last {
                    end -= last;
                }
            }
            self.encode_piece(&text[found.start()..end], out);
            at = end;
        }
    }

    /// One piece's bytes, merged.
    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        if let Some(ids) = self.cache_get(piece) {
            out.extend(ids);
            return;
        }
        let mut parts: Vec<u32> = piece
            .bytes()
            .map(|b| self.byte_tokens[b as usize])
            .collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, id)| (rank, i, id))
                })
                .min();
            let Some((rank, _, _)) = best else { break };
            // Every occurrence of the best pair, left to right, as one round.
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() {
                    if let Some(&(r, id)) = self.merges.get(&(parts[i], parts[i + 1])) {
                        if r == rank {
                            merged.push(id);
                            i += 2;
                            continue;
                        }
                    }
                }
                merged.push(parts[i]);
                i += 1;
            }
            parts = merged;
        }
        self.cache_put(piece, &parts);
        out.extend(parts);
    }

    fn cache_get(&self, piece: &str) -> Option<Vec<u32>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(piece).cloned()
    }

    fn cache_put(&self, piece: &str, ids: &[u32]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_PIECES {
            cache.clear();
        }
        cache.insert(piece.to_owned(), ids.to_vec());
    }

    /// The bytes `ids` stand for (ids outside the vocabulary give nothing).
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .filter_map(|&id| self.token_bytes.get(id as usize))
            .flatten()
            .copied()
            .collect()
    }

    /// The text `ids` stand for; invalid UTF-8 (a sequence cut between tokens) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 byte tokens plus `extra`, merges over them.
    fn tiny(extra: &[&str], merges: &[&str], controls: &[&str]) -> Bpe {
        let mut tokens: Vec<String> = controls.iter().map(|c| (*c).to_owned()).collect();
        let mut types = vec![CONTROL; controls.len()];
        tokens.extend(byte_chars().iter().map(char::to_string));
        tokens.extend(extra.iter().map(|t| (*t).to_owned()));
        types.resize(tokens.len(), 1);
        Bpe::new(tokens, &types, merges, None, PreTokenizer::SmolLm).unwrap()
    }

    #[test]
    fn merges_go_lowest_rank_first() {
        // "Ġ" is the space's character.
        let bpe = tiny(
            &["ab", "bc", "abc", "Ġa"],
            &["b c", "a b", "a bc", "Ġ a"],
            &[],
        );
        let abc = bpe.encode("abc");
        assert_eq!(abc.len(), 1);
        assert_eq!(bpe.token(abc[0]), Some("abc"));
        assert_eq!(bpe.decode(&bpe.encode(" abc abd")), " abc abd");
    }

    #[test]
    fn digits_stand_alone_and_whitespace_runs_leave_one_space_to_the_next_word() {
        let mut bpe = tiny(&["Ġ1", "ĠĠ", "Ġx"], &["Ġ 1", "Ġ Ġ", "Ġ x"], &[]);
        // SmolLM's split keeps the space away from the digit; GPT-2's joins them.
        assert_eq!(bpe.encode(" 1").len(), 2);
        bpe.pre = PreTokenizer::Gpt2;
        assert_eq!(bpe.encode(" 1").len(), 1);
        // "   x": the run gives its last space to the word: "ĠĠ" then "Ġx".
        let ids = bpe.encode("   x");
        let tokens: Vec<_> = ids.iter().map(|&id| bpe.token(id).unwrap()).collect();
        assert_eq!(tokens, ["ĠĠ", "Ġx"]);
        // At the end of the text the whole run is one piece.
        assert_eq!(bpe.encode("x  ").len(), 2);
    }

    #[test]
    fn control_tokens_match_whole_and_the_longest_wins() {
        let bpe = tiny(&[], &[], &["<|a|>", "<|a|>b"]);
        let ids = bpe.encode("x<|a|>b<|a|>");
        assert_eq!(ids, [bpe.byte_tokens[b'x' as usize], 1, 0]);
        assert!(bpe.is_control(0));
        assert_eq!(bpe.decode(&ids), "x<|a|>b<|a|>");
    }

    #[test]
    fn a_vocabulary_without_every_byte_is_refused() {
        let error = Bpe::new(vec!["a".into()], &[1], &[], None, PreTokenizer::Gpt2).unwrap_err();
        assert!(error.contains("no token for byte"), "{error}");
        // With an unknown token, a missing byte becomes it.
        let bpe = Bpe::new(vec!["a".into()], &[1], &[], Some(0), PreTokenizer::Gpt2).unwrap();
        assert_eq!(bpe.encode("\u{4}"), [0]);
    }
}
