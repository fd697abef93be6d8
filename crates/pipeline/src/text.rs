//! The CLIP tokenizer of a diffusers `tokenizer/` folder, behaving like transformers'
//! (slow, Python) `CLIPTokenizer`, which is what the FlipSketch app ran:
//! - text clean-up as its `BasicTokenizer` fallback does when ftfy is absent: control and
//!   format characters dropped, whitespace unified, CJK ideographs split apart, NFC, lower case;
//! - CLIP's pre-tokenisation regex and byte-level BPE with `</w>` word ends (tokenizers crate);
//! - the added special tokens (`!` = the pad token, `<|startoftext|>`, `<|endoftext|>`) split
//!   out of the raw prompt first, so a "!" in a prompt is id 0 as in transformers;
//! - BOS/EOS, truncation and padding with the pad token to `model_max_length` (77).
//!
//! The fast `CLIPTokenizerFast` differs from the slow one on CJK ideographs and on control and
//! format characters (zero-width joiner and space, BOM, NUL); we follow the slow one.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizer::NormalizedString;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, Normalizer, PaddingDirection, PaddingParams, PaddingStrategy,
    PreTokenizerWrapper, SplitDelimiterBehavior, TokenizerBuilder, TokenizerImpl,
    TruncationDirection, TruncationParams, TruncationStrategy,
};
use unicode_general_category::{get_general_category, GeneralCategory};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
}

/// CLIP's pre-tokenisation pattern (transformers `CLIPTokenizer.pat`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The slow tokenizer reads only this many merges (`merges[1 : 49152 - 256 - 2 + 1]`).
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// transformers `BasicTokenizer._is_control`: categories C* except tab, newline, return.
fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    )
}

/// transformers `BasicTokenizer._is_whitespace`.
fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
        || get_general_category(c) == GeneralCategory::SpaceSeparator
}

/// transformers `BasicTokenizer._tokenize_chinese_chars` puts spaces around every CJK
/// ideograph (`_is_chinese_char` blocks), making each one a word of its own; isolating them in
/// a pre-tokenizer split before CLIP's pattern has the same effect.
const CJK_PATTERN: &str = r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]";

/// The slow tokenizer's text clean-up, with alignment tracking for the tokenizers crate.
#[derive(Clone, Debug, Default)]
pub struct ClipNormalizer;

impl Normalizer for ClipNormalizer {
    fn normalize(&self, n: &mut NormalizedString) -> tokenizers::Result<()> {
        // 1. _clean_text: drop NUL, U+FFFD and control/format chars; whitespace becomes " "
        n.filter(|c| !(c == '\0' || c == '\u{fffd}' || is_control(c)));
        n.map(|c| if is_whitespace(c) { ' ' } else { c });
        // 2. NFC, then Python's str.lower(), which knows the final sigma; whitespace runs need
        //    no collapsing since CLIP's pattern never matches whitespace.
        n.nfc();
        let lowered = n.get().to_lowercase();
        if lowered.chars().count() == n.get().chars().count() {
            n.transform(lowered.chars().map(|c| (c, 0)), 0);
        } else {
            n.lowercase();
        }
        Ok(())
    }
}

type Inner =
    TokenizerImpl<BPE, ClipNormalizer, PreTokenizerWrapper, TemplateProcessing, DecoderWrapper>;

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Inner,
    max_length: usize,
    pad_id: u32,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// One BPE merge: `"a b"` (merges.txt, older tokenizer.json) or `["a", "b"]` (tokenizer.json
/// since tokenizers 0.20).
fn parse_merge(v: &serde_json::Value) -> Option<(String, String)> {
    match v {
        serde_json::Value::String(line) => {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    Some((a.to_string(), b.to_string()))
                }
                _ => None,
            }
        }
        serde_json::Value::Array(pair) => match pair.as_slice() {
            [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                Some((a.clone(), b.clone()))
            }
            _ => None,
        },
        _ => None,
    }
}

impl ClipTokenizer {
    /// Reads a tokenizer folder: the BPE table from `vocab.json` + `merges.txt` (transformers
    /// 4) or, when those are absent, from `tokenizer.json` (what transformers 5 writes), and
    /// the special tokens and length from `tokenizer_config.json` (and
    /// `special_tokens_map.json` when present). Either way the text is cleaned and split as
    /// the slow `CLIPTokenizer` does.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let file_err = |path: &Path, msg: String| TokenizerError::File {
            path: path.to_path_buf(),
            msg,
        };
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p)
                .map_err(|e| file_err(&p, e.to_string()))
                .map(|s| (p, s))
        };
        let (vp, vocab, merges) =
            if dir.join("vocab.json").is_file() || !dir.join("tokenizer.json").is_file() {
                let (vp, vocab_text) = read("vocab.json")?;
                let vocab: Vocab = serde_json::from_str(&vocab_text)
                    .map_err(|e| file_err(&vp, format!("not a vocabulary: {e}")))?;
                let (mp, merges_text) = read("merges.txt")?;
                let mut merges = Vec::new();
                // line 0 is the "#version" header
                for (i, line) in merges_text.lines().skip(1).take(CLIP_MERGES).enumerate() {
                    if line.is_empty() {
                        continue;
                    }
                    match parse_merge(&serde_json::Value::String(line.to_string())) {
                        Some(m) => merges.push(m),
                        None => {
                            return Err(file_err(
                                &mp,
                                format!("line {}: expected two symbols, got {line:?}", i + 2),
                            ))
                        }
                    }
                }
                (vp, vocab, merges)
            } else {
                // transformers 5 writes a CLIP tokenizer as tokenizer.json alone: the same BPE
                // table, as the fast tokenizer's `model.vocab` and `model.merges`.
                let (tp, text) = read("tokenizer.json")?;
                let bad = |msg: String| file_err(&tp, msg);
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
                let model = &v["model"];
                if model["type"].as_str() != Some("BPE") {
                    return Err(bad(format!(
                        "model.type is {}, a CLIP tokenizer is \"BPE\"",
                        model["type"]
                    )));
                }
                let vocab: Vocab = serde_json::from_value(model["vocab"].clone())
                    .map_err(|e| bad(format!("model.vocab is not a vocabulary: {e}")))?;
                let list = model["merges"]
                    .as_array()
                    .ok_or_else(|| bad("model.merges is not a list".into()))?;
                let mut merges = Vec::new();
                for (i, m) in list.iter().take(CLIP_MERGES).enumerate() {
                    merges.push(parse_merge(m).ok_or_else(|| {
                        bad(format!("model.merges[{i}]: expected two symbols, got {m}"))
                    })?);
                }
                (tp, vocab, merges)
            };
        let mut config = serde_json::Map::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let (p, text) = read(name)?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| file_err(&p, format!("invalid JSON: {e}")))?;
                if let serde_json::Value::Object(o) = v {
                    config.extend(o);
                }
            }
        }
        let bos = token_str(config.get("bos_token")).unwrap_or_else(|| "<|startoftext|>".into());
        let eos = token_str(config.get("eos_token")).unwrap_or_else(|| "<|endoftext|>".into());
        let unk = token_str(config.get("unk_token")).unwrap_or_else(|| eos.clone());
        let pad = token_str(config.get("pad_token")).unwrap_or_else(|| eos.clone());
        let max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .unwrap_or(77.0);
        if !(1.0..=4096.0).contains(&max_length) {
            return Err(file_err(
                &dir.join("tokenizer_config.json"),
                format!("model_max_length {max_length} is unusable"),
            ));
        }
        let max_length = max_length as usize;
        let id = |t: &str| {
            vocab.get(t).copied().ok_or_else(|| {
                file_err(&vp, format!("special token {t:?} is not in the vocabulary"))
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        id(&unk)?;

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(unk)
            .build()
            .map_err(|e| file_err(&vp, format!("cannot build BPE: {e}")))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        let cjk = Split::new(
            SplitPattern::Regex(CJK_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        let pre = PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(cjk),
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ]));
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos} $A {eos}"))
            .and_then(|b| {
                b.special_tokens(vec![(bos.clone(), bos_id), (eos.clone(), eos_id)])
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(TokenizerError::Tokenize)?;
        let mut inner: Inner = TokenizerBuilder::new()
            .with_model(bpe)
            .with_normalizer(Some(ClipNormalizer))
            .with_pre_tokenizer(Some(pre))
            .with_post_processor(Some(post))
            .with_decoder(None)
            .build()
            .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        // Split on the raw prompt before any clean-up, as the slow tokenizer's trie does.
        let mut specials = vec![AddedToken::from(pad.clone(), true)];
        for t in [&bos, &eos] {
            if *t != pad {
                specials.push(AddedToken::from(t.clone(), true));
            }
        }
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad,
        }));
        Ok(Self {
            inner,
            max_length,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids of one prompt: BOS, tokens, EOS, truncated and padded to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}
