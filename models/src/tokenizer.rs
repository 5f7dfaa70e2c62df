//! Tokenisation exactly as sentence-transformers runs it: the model's `tokenizer.json`,
//! with its built-in truncation (128) and fixed padding replaced by truncation at
//! `max_seq_length` and no padding (batches pad to their own longest row).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::ModelError;

/// Special tokens of the tiny test vocabulary, in id order.
const TINY_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

#[derive(Clone)]
pub struct SentenceTokenizer {
    inner: Tokenizer,
    max_seq_length: usize,
}

impl std::fmt::Debug for SentenceTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceTokenizer")
            .field("max_seq_length", &self.max_seq_length)
            .finish_non_exhaustive()
    }
}

impl SentenceTokenizer {
    pub fn from_file(path: &Path, max_seq_length: usize) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::ModelFileMissing {
                path: path.to_owned(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::new(inner, max_seq_length, path.to_owned())
    }

    fn new(mut inner: Tokenizer, max_seq_length: usize, path: PathBuf) -> Result<Self, ModelError> {
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Tokenizer {
                path,
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner,
            max_seq_length,
        })
    }

    /// A WordPiece tokenizer over a 64-entry vocabulary (specials, letters, digits, a few
    /// continuations): the tokenizer of [`crate::BertConfig::tiny`] test models.
    pub fn tiny(max_seq_length: usize) -> Result<Self, ModelError> {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut add = |token: String| {
            let next = vocab.len() as u32;
            vocab.entry(token).or_insert(next);
        };
        TINY_SPECIALS.iter().for_each(|s| add((*s).to_owned()));
        ('a'..='z').for_each(|c| add(c.to_string()));
        ('0'..='9').for_each(|c| add(c.to_string()));
        ['.', ',', '!', '?', '\'']
            .iter()
            .for_each(|c| add(c.to_string()));
        ['e', 's', 't', 'n', 'r', 'd', 'a', 'o']
            .iter()
            .for_each(|c| add(format!("##{c}")));
        let path = PathBuf::from("<tiny tokenizer>");
        let model = WordPiece::builder()
            .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
            .unk_token("[UNK]".to_owned())
            .build()
            .map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new(
                ("[SEP]".to_owned(), 3),
                ("[CLS]".to_owned(), 2),
            )));
        Self::new(inner, max_seq_length, path)
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Saves the tokenizer as a `tokenizer.json` other tools can read.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Token ids with `[CLS]`/`[SEP]`, truncated to `max_seq_length`, unpadded.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, ModelError> {
        texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                self.inner
                    .encode(text.as_ref(), true)
                    .map(|encoding| encoding.get_ids().to_vec())
                    .map_err(|e| ModelError::Tokenize {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect()
    }
}
