//! Builds GPT-2-style byte-level BPE tokenizers and writes their side files.
//!
//! Both the GGUF importer and the tiny test-model writer end up with the same
//! three things: a token list, a merge list and some special tokens. This
//! module turns them into a Hugging Face `tokenizer.json` (with the same
//! pre-tokenizer SmolLM2 ships) plus `tokenizer_config.json` and
//! `generation_config.json`, so every model directory we write loads the same
//! way as one downloaded from the Hub.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// File names of the tokenizer side of a Hugging Face model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// A token the tokenizer must never split or produce from ordinary text
/// (`<|im_start|>`, `<|endoftext|>`, ...). `id` must be its index in the
/// token list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub content: String,
}

impl SpecialToken {
    pub fn new(id: u32, content: impl Into<String>) -> Self {
        Self { id, content: content.into() }
    }
}

/// Splits a merge written as `"left right"` (GGUF and `merges.txt` style).
///
/// The search for the separator starts after the first character, because a
/// left half may itself be a lone space in vocabularies that do not map bytes
/// to printable characters; llama.cpp splits the same way.
pub fn parse_merge(line: &str) -> Result<(String, String)> {
    let skip = line.chars().next().map(char::len_utf8).unwrap_or(0);
    match line[skip..].find(' ') {
        Some(pos) => {
            let (left, right) = line.split_at(skip + pos);
            let right = &right[1..];
            if left.is_empty() || right.is_empty() {
                return Err(Error::Tokenizer(format!("malformed merge {line:?}: an empty half")));
            }
            Ok((left.to_string(), right.to_string()))
        }
        None => Err(Error::Tokenizer(format!("malformed merge {line:?}: expected \"left right\""))),
    }
}

/// GPT-2's reversible byte-to-character table: printable Latin-1 bytes map to
/// themselves, the rest to code points from U+0100 upwards, so every byte
/// sequence becomes a string of visible characters that BPE can merge.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let b = byte as u32;
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b
        } else {
            let code = next_extra;
            next_extra += 1;
            code
        };
        // Every code here is below 0x200, far from the surrogate range, so
        // the conversion cannot fail; fall back to U+FFFD rather than panic.
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// Encodes a byte string in GPT-2's byte-level alphabet.
pub fn byte_level_encode(bytes: &[u8]) -> String {
    let table = bytes_to_unicode();
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// How text is split into words before BPE runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreTokenization {
    /// Every digit alone, then GPT-2's regex: SmolLM2 and StarCoder
    /// (llama.cpp pre-tokenizer types `smollm`, `starcoder`, `refact`).
    #[default]
    DigitsThenGpt2,
    /// GPT-2's regex alone (llama.cpp pre-tokenizer type `gpt2`/`default`).
    Gpt2,
}

/// Builds the tokenizer: a byte-level BPE over `tokens` (id = index) with
/// `merges` in priority order and `specials` registered as special tokens.
///
/// Pre-tokenization splits digits one by one and then applies GPT-2's regex,
/// matching SmolLM2's own `tokenizer.json`; no prefix space is added, so the
/// encoding of a prompt equals the concatenation the chat template produced.
pub fn build_byte_level_bpe(
    tokens: &[String],
    merges: &[(String, String)],
    specials: &[SpecialToken],
) -> Result<Tokenizer> {
    build_byte_level_bpe_with(tokens, merges, specials, PreTokenization::default())
}

/// [`build_byte_level_bpe`] with an explicit pre-tokenization.
pub fn build_byte_level_bpe_with(
    tokens: &[String],
    merges: &[(String, String)],
    specials: &[SpecialToken],
    pre: PreTokenization,
) -> Result<Tokenizer> {
    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| Error::Tokenizer("more than 2^32 tokens".into()))?;
        if let Some(first) = vocab.insert(token.clone(), id) {
            // A duplicate would leave one id unreachable and make encoding
            // depend on hash-map order; refuse instead of guessing.
            return Err(Error::Tokenizer(format!(
                "token {token:?} appears twice in the vocabulary (ids {first} and {id})"
            )));
        }
    }
    for special in specials {
        match tokens.get(special.id as usize) {
            Some(token) if *token == special.content => {}
            Some(token) => {
                return Err(Error::Tokenizer(format!(
                    "special token {:?} should have id {} but that id is {token:?}",
                    special.content, special.id
                )));
            }
            None => {
                return Err(Error::Tokenizer(format!(
                    "special token {:?} has id {} beyond the vocabulary of {}",
                    special.content,
                    special.id,
                    tokens.len()
                )));
            }
        }
    }

    let merges: Merges = merges.to_vec();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building the BPE model: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        PreTokenization::DigitsThenGpt2 => {
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])));
        }
        PreTokenization::Gpt2 => {
            tokenizer.with_pre_tokenizer(Some(byte_level));
        }
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // trim_offsets=false keeps offsets covering the leading space, as HF's
    // own byte-level configs do; offsets feed `logprobs.text_offset`.
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));

    let mut seen = HashSet::new();
    let added: Vec<AddedToken> = specials
        .iter()
        .filter(|s| seen.insert(s.content.clone()))
        .map(|s| AddedToken::from(s.content.clone(), true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;
    Ok(tokenizer)
}

/// Writes `tokenizer.json` into `dir`.
pub fn save_tokenizer(tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let path = dir.join(TOKENIZER_FILE);
    tokenizer.save(&path, true).map_err(|e| Error::model_file(&path, format!("writing tokenizer: {e}")))
}

/// `tokenizer_config.json`: what `transformers` reads besides
/// `tokenizer.json` (chat template and the named special tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfigFile {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Byte-level BPE chat models put their markers in the template; adding
    /// a BOS on top would double it.
    pub add_bos_token: bool,
    pub model_max_length: usize,
    pub tokenizer_class: String,
    pub clean_up_tokenization_spaces: bool,
}

impl TokenizerConfigFile {
    /// A config for a GPT-2-style tokenizer with no special tokens named yet.
    pub fn new(model_max_length: usize) -> Self {
        Self {
            chat_template: None,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            add_bos_token: false,
            model_max_length,
            tokenizer_class: "GPT2Tokenizer".into(),
            clean_up_tokenization_spaces: false,
        }
    }
}

/// `generation_config.json`: the ids generation starts and stops on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfigFile {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
}

/// Writes `tokenizer_config.json` into `dir`.
pub fn write_tokenizer_config(dir: &Path, config: &TokenizerConfigFile) -> Result<()> {
    write_json(&dir.join(TOKENIZER_CONFIG_FILE), config)
}

/// Writes `generation_config.json` into `dir`.
pub fn write_generation_config(dir: &Path, config: &GenerationConfigFile) -> Result<()> {
    write_json(&dir.join(GENERATION_CONFIG_FILE), config)
}

/// Serializes `value` as pretty JSON to `path`, naming the file on failure.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::model_file(path, format!("serializing: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::model_file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 256 byte tokens after three specials, plus merges spelling "the" and " the".
    fn tiny() -> (Vec<String>, Vec<(String, String)>, Vec<SpecialToken>) {
        let specials = vec![
            SpecialToken::new(0, "<|endoftext|>"),
            SpecialToken::new(1, "<|im_start|>"),
            SpecialToken::new(2, "<|im_end|>"),
        ];
        let mut tokens: Vec<String> = specials.iter().map(|s| s.content.clone()).collect();
        tokens.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
        let merges: Vec<(String, String)> =
            ["t h", "th e", "Ġ the"].iter().map(|m| parse_merge(m).expect("valid merge")).collect();
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
        }
        (tokens, merges, specials)
    }

    #[test]
    fn byte_table_is_a_bijection_with_gpt2_space() {
        let table = bytes_to_unicode();
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
    }

    #[test]
    fn parse_merge_splits_after_first_char() {
        assert_eq!(parse_merge("Ġ t").unwrap(), ("Ġ".into(), "t".into()));
        assert_eq!(parse_merge("  x").unwrap(), (" ".into(), "x".into()));
        assert!(parse_merge("nospace").is_err());
        assert!(parse_merge("a ").is_err());
        assert!(parse_merge("").is_err());
    }

    #[test]
    fn encodes_merges_specials_and_round_trips() {
        let (tokens, merges, specials) = tiny();
        let tok = build_byte_level_bpe(&tokens, &merges, &specials).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_tokenizer(&tok, dir.path()).unwrap();
        let tok = Tokenizer::from_file(dir.path().join(TOKENIZER_FILE)).unwrap();

        let the = tokens.iter().position(|t| t == "the").unwrap() as u32;
        let space_the = tokens.iter().position(|t| t == "Ġthe").unwrap() as u32;
        let text = "<|im_start|>the the 12<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids[0], 1);
        assert_eq!(ids[1], the);
        assert_eq!(ids[2], space_the);
        assert_eq!(*ids.last().unwrap(), 2);
        // Digits are split individually: " 1" "2" -> 'Ġ','1','2' (space, then one token per digit).
        assert_eq!(ids.len(), 1 + 2 + 3 + 1);
        assert_eq!(tok.decode(ids, false).unwrap(), text);
        assert_eq!(tok.decode(ids, true).unwrap(), "the the 12");

        let unicode = "naïve — 東京\n\ttabs";
        let enc = tok.encode(unicode, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), unicode);
    }

    #[test]
    fn rejects_inconsistent_inputs() {
        let (tokens, merges, mut specials) = tiny();
        specials.push(SpecialToken::new(5, "<|nope|>"));
        assert!(matches!(build_byte_level_bpe(&tokens, &merges, &specials), Err(Error::Tokenizer(_))));

        let (mut tokens, merges, specials) = tiny();
        tokens.push("the".into());
        assert!(matches!(build_byte_level_bpe(&tokens, &merges, &specials), Err(Error::Tokenizer(_))));

        let (tokens, mut merges, specials) = tiny();
        merges.push(("zz".into(), "q".into()));
        assert!(matches!(build_byte_level_bpe(&tokens, &merges, &specials), Err(Error::Tokenizer(_))));
    }

    #[test]
    fn side_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TokenizerConfigFile::new(8192);
        cfg.chat_template = Some("{{ messages }}".into());
        cfg.eos_token = Some("<|im_end|>".into());
        write_tokenizer_config(dir.path(), &cfg).unwrap();
        let text = std::fs::read_to_string(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["bos_token"], serde_json::Value::Null);
        assert_eq!(value["add_bos_token"], false);
        assert_eq!(serde_json::from_value::<TokenizerConfigFile>(value).unwrap(), cfg);

        let gen_cfg = GenerationConfigFile { bos_token_id: Some(1), eos_token_id: Some(2), pad_token_id: None };
        write_generation_config(dir.path(), &gen_cfg).unwrap();
        let text = std::fs::read_to_string(dir.path().join(GENERATION_CONFIG_FILE)).unwrap();
        assert_eq!(serde_json::from_str::<GenerationConfigFile>(&text).unwrap(), gen_cfg);
    }
}
