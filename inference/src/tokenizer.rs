//! The tokenizer side of a Hugging Face model directory: text to ids and
//! back, the chat template, the end-of-sequence ids, and streaming
//! detokenisation that never splits a UTF-8 character.
//!
//! Files read from the model directory:
//!
//! - `tokenizer.json` (required): the `tokenizers` pipeline itself;
//! - `tokenizer_config.json` (optional): `chat_template` (a string, or a list
//!   of `{name, template}` of which "default" is used), `bos_token` and
//!   `eos_token` (strings, or objects with a `content` field);
//! - `chat_template.jinja` / `chat_template.json` (optional): where newer
//!   `transformers` releases save the template instead;
//! - `generation_config.json` (optional): `eos_token_id` (a number or a list)
//!   and `bos_token_id`.
//!
//! Chat templates are rendered with minijinja configured like transformers'
//! Jinja sandbox: `trim_blocks`, `lstrip_blocks`, `raise_exception`, and
//! Python string methods. Models without a template get a plain
//! `role: content` transcript.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, ErrorKind, Value, context};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA_FILE: &str = "chat_template.jinja";
const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Name the chat template is registered under in its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Tokens an [`IncrementalDecoder`] waits for a character to complete before
/// it gives up and emits the U+FFFD. A UTF-8 character has at most four
/// bytes, so only garbage output (or a run of skipped special tokens) gets
/// here; the cap keeps the re-decoded window, and so each step, bounded.
const MAX_HELD_TOKENS: usize = 16;

/// Prompt tokens an [`IncrementalDecoder`] keeps as decoding context (TGI
/// uses the same five).
const CONTEXT_TOKENS: usize = 5;

/// One chat message as templates see it (`message['role']`,
/// `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A model's tokenizer with the metadata generation needs around it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: ChatTemplate,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.has_chat_template())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of the model directory `dir`.
    ///
    /// Only `tokenizer.json` is required. Errors name the file at fault.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::model_file(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::model_file(&path, format!("not a valid tokenizer: {e}")))?;

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: TokenizerConfig = read_optional_json(&config_path)?.unwrap_or_default();
        let generation: GenerationConfig = read_optional_json(&dir.join(GENERATION_CONFIG_FILE))?.unwrap_or_default();

        let bos_token = config.bos_token.map(SpecialToken::into_content);
        let eos_token = config.eos_token.map(SpecialToken::into_content);

        let bos_token_id =
            bos_token.as_deref().and_then(|t| known_id(&inner, t, "bos_token")).or(generation.bos_token_id);
        let mut eos_token_ids = Vec::new();
        let config_eos = eos_token.as_deref().and_then(|t| known_id(&inner, t, "eos_token"));
        let generation_eos = generation.eos_token_id.map(TokenIds::into_vec);
        for id in config_eos.into_iter().chain(generation_eos.into_iter().flatten()) {
            push_unique(&mut eos_token_ids, id);
        }

        let (source, template_path) = match config.chat_template {
            Some(field) => (field.into_default(), config_path),
            None => find_template_file(dir)?,
        };
        let template = match source {
            Some(source) => ChatTemplate::compile(source)
                .map_err(|e| Error::model_file(&template_path, format!("chat_template does not compile: {e}")))?,
            None => ChatTemplate::Plain,
        };

        Ok(Tokenizer { inner, template, bos_token, eos_token, bos_token_id, eos_token_ids })
    }

    /// Adds end-of-sequence ids found elsewhere (`config.json`'s
    /// `eos_token_id`), keeping the list free of duplicates.
    pub fn with_extra_eos(mut self, ids: &[u32]) -> Self {
        for &id in ids {
            push_unique(&mut self.eos_token_ids, id);
        }
        self
    }

    /// Text to token ids.
    ///
    /// `add_special_tokens` runs the post-processor (e.g. a leading BOS for
    /// Llama); completions pass `false`. Special-token strings inside `text`
    /// (`<|im_end|>`) still map to their ids, as in Hugging Face.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids to text; `skip_special` drops special tokens such as
    /// `<|im_end|>` from the output.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    /// The text of one token, for the `tokens` array of logprobs. Special
    /// tokens keep their text. A token holding part of a UTF-8 character
    /// decodes to U+FFFD; an unknown id gives an empty string.
    pub fn token_str(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(text) => text,
            Err(_) => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    /// The id of a token string (`"<|im_end|>"`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer can produce, added tokens included. A
    /// model's embedding matrix may be larger (padded); never smaller.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation: `tokenizer_config.json`'s `eos_token`,
    /// `generation_config.json`'s `eos_token_id`, and any added with
    /// [`Tokenizer::with_extra_eos`], in that order, without duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// True when the model ships its own chat template; otherwise
    /// [`Tokenizer::apply_chat_template`] uses the plain fallback.
    pub fn has_chat_template(&self) -> bool {
        matches!(self.template, ChatTemplate::Jinja(_))
    }

    /// The underlying `tokenizers` pipeline, for callers that need more
    /// (offsets, batch encoding).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders a conversation into the prompt text the model was trained
    /// on. With `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    ///
    /// A template that rejects the conversation with `raise_exception` (for
    /// example, roles that do not alternate) yields an invalid-request error
    /// on `messages`; any other rendering failure is a tokenizer error.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = match &self.template {
            ChatTemplate::Jinja(env) => env,
            ChatTemplate::Plain => return Ok(plain_transcript(messages, add_generation_prompt)),
        };
        let render = || -> std::result::Result<String, minijinja::Error> {
            env.get_template(TEMPLATE_NAME)?.render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                // Templates concatenate these; "" is safer than undefined.
                bos_token => self.bos_token.as_deref().unwrap_or(""),
                eos_token => self.eos_token.as_deref().unwrap_or(""),
            })
        };
        render().map_err(|e| match raised_message(&e) {
            Some(message) => Error::invalid("messages", message.to_string()),
            None => Error::Tokenizer(format!("chat template failed: {e}")),
        })
    }
}

/// Turns a stream of generated token ids into text pieces.
///
/// Decoding token by token is wrong twice over: byte-level BPE splits
/// multi-byte characters across tokens (each half decodes to U+FFFD), and
/// some decoders (SentencePiece) drop a token's leading space when it is
/// decoded alone. Like TGI (its `prefix_offset` / `read_offset`), this
/// re-decodes a short window: the tokens before `read_offset` were already
/// released and serve as context, the ones after it are new, and new text is
/// released only once it does not end in U+FFFD.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Only the window still needed: older ids are dropped as text is
    /// released, so memory stays bounded on long generations.
    ids: Vec<u32>,
    /// `ids[..read_offset]` is context, `ids[read_offset..]` is unreleased.
    read_offset: usize,
    skip_special: bool,
}

impl IncrementalDecoder {
    /// `skip_special` drops special tokens (`<|im_end|>`) from the text.
    pub fn new(skip_special: bool) -> Self {
        IncrementalDecoder { ids: Vec::new(), read_offset: 0, skip_special }
    }

    /// Starts after a prompt. Its last few tokens are context only, never
    /// emitted: SentencePiece-style decoders drop the leading space of a
    /// sequence's first token, so the first generated word would otherwise
    /// lose the space that separates it from the prompt.
    pub fn with_context(skip_special: bool, prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDecoder { ids: tail.to_vec(), read_offset: tail.len(), skip_special }
    }

    /// Adds one token; returns the text it completes (possibly empty, when
    /// the token ends mid-character or is a skipped special token).
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<String> {
        self.ids.push(token);
        let (prefix, full) = self.decode_window(tok)?;
        let held = self.ids.len() - self.read_offset;
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}');
        if complete || held >= MAX_HELD_TOKENS { Ok(self.advance(&prefix, &full)) } else { Ok(String::new()) }
    }

    /// Releases whatever is still held at the end of generation, including
    /// an incomplete character as U+FFFD.
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.decode_window(tok)?;
        Ok(self.advance(&prefix, &full))
    }

    /// Decodes the context window alone and with the new tokens.
    fn decode_window(&self, tok: &Tokenizer) -> Result<(String, String)> {
        let prefix = tok.decode(&self.ids[..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids, self.skip_special)?;
        Ok((prefix, full))
    }

    /// Releases the new text and slides the window forward: the tokens just
    /// released become the context of the next step.
    fn advance(&mut self, prefix: &str, full: &str) -> String {
        let piece = match full.strip_prefix(prefix) {
            Some(rest) => rest.to_string(),
            // The decoder rewrote the context (whitespace clean-up): fall
            // back to counting characters, as TGI does in Python.
            None => full.chars().skip(prefix.chars().count()).collect(),
        };
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        piece
    }
}

/// A compiled chat template, or the plain fallback. Shared, so cloning a
/// [`Tokenizer`] does not copy the compiled template.
#[derive(Clone)]
enum ChatTemplate {
    Jinja(Arc<Environment<'static>>),
    Plain,
}

impl ChatTemplate {
    fn compile(source: String) -> std::result::Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on;
        // templates are written for that whitespace handling.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)?;
        Ok(ChatTemplate::Jinja(Arc::new(env)))
    }
}

/// `{role}: {content}\n` per message, then `assistant:` to prompt a reply.
fn plain_transcript(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut text = String::new();
    for message in messages {
        text.push_str(&message.role);
        text.push_str(": ");
        text.push_str(&message.content);
        text.push('\n');
    }
    if add_generation_prompt {
        text.push_str("assistant:");
    }
    text
}

/// The message of a template's `raise_exception(...)`, carried as the
/// error's source so it can be told apart from template bugs.
#[derive(Debug)]
struct TemplateException(String);

impl fmt::Display for TemplateException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(TemplateException(message)))
}

fn raised_message(err: &minijinja::Error) -> Option<&str> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<TemplateException>() {
            return Some(&raised.0);
        }
        current = e.source();
    }
    None
}

/// The parts of `tokenizer_config.json` used here; the rest is ignored.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
}

/// `chat_template` is either one template or a named list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl TemplateField {
    /// The template transformers uses when none is named: "default", or
    /// failing that the first one listed. An empty list means no template.
    fn into_default(self) -> Option<String> {
        match self {
            TemplateField::One(template) => Some(template),
            TemplateField::Named(mut list) => {
                let index = list.iter().position(|t| t.name == "default").unwrap_or(0);
                (index < list.len()).then(|| list.swap_remove(index).template)
            }
        }
    }
}

/// `"<|im_end|>"` or `{"content": "<|im_end|>", "lstrip": false, ...}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    fn into_content(self) -> String {
        match self {
            SpecialToken::Text(s) | SpecialToken::Object { content: s } => s,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

/// `eos_token_id` is a number in most configs and a list in Llama 3's.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// Parses an optional JSON side file: absent is `None`, unreadable or
/// malformed is an error naming the file.
fn read_optional_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::model_file(path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::model_file(path, format!("invalid JSON: {e}")))
}

/// Looks for a template saved next to, rather than inside,
/// `tokenizer_config.json`; returns it with the file it came from.
fn find_template_file(dir: &Path) -> Result<(Option<String>, std::path::PathBuf)> {
    let jinja = dir.join(CHAT_TEMPLATE_JINJA_FILE);
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok((Some(source), jinja)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::model_file(&jinja, e)),
    }
    #[derive(Deserialize)]
    struct ChatTemplateJson {
        chat_template: Option<String>,
    }
    let json = dir.join(CHAT_TEMPLATE_JSON_FILE);
    let source = read_optional_json::<ChatTemplateJson>(&json)?.and_then(|t| t.chat_template);
    Ok((source, json))
}

/// The id of a special token named in `tokenizer_config.json`. A name the
/// vocabulary lacks is a broken config, but not worth refusing the model
/// over: warn and carry on without it.
fn known_id(inner: &tokenizers::Tokenizer, token: &str, field: &str) -> Option<u32> {
    let id = inner.token_to_id(token);
    if id.is_none() {
        tracing::warn!("{TOKENIZER_CONFIG_FILE}: {field} {token:?} is not in the vocabulary");
    }
    id
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokenizers::AddedToken;
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    use super::*;

    /// SmolLM2's ChatML template, as it appears in its tokenizer_config.json.
    const CHATML: &str = r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const TEXT: &str = "héllo wörld 😀 日本";

    /// Merges of the test vocabulary, as byte strings. Some make whole
    /// characters ("é"), some only part of one (the first two bytes of 😀
    /// and of 日), so decoding must cope with characters split across tokens.
    const MERGES: &[(&[u8], &[u8])] =
        &[(b"\xc3", b"\xa9"), (b"h", b"\xc3\xa9"), (b"l", b"l"), (b" ", b"w"), (b"\xf0", b"\x9f"), (b"\xe6", b"\x97")];
    const BYTE_TOKENS: u32 = 256;
    const IM_START: u32 = BYTE_TOKENS + MERGES.len() as u32;
    const IM_END: u32 = IM_START + 1;

    /// GPT-2's byte-to-character table: printable Latin-1 bytes stand for
    /// themselves, the rest map to U+0100 onwards in byte order.
    fn byte_chars() -> Vec<char> {
        let mut next = 256;
        (0u32..256)
            .map(|b| {
                let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
                let code = if printable {
                    b
                } else {
                    next += 1;
                    next - 1
                };
                char::from_u32(code).unwrap()
            })
            .collect()
    }

    fn byte_level(bytes: &[u8]) -> String {
        let chars = byte_chars();
        bytes.iter().map(|&b| chars[b as usize]).collect()
    }

    /// Writes a byte-level BPE `tokenizer.json` built with the tokenizers
    /// API: ids 0..256 are the bytes, then the merges, then the two ChatML
    /// special tokens.
    fn write_tokenizer_json(dir: &Path) {
        let mut vocab: Vocab = (0..=255u8).map(|b| (byte_level(&[b]), u32::from(b))).collect();
        let mut merges = Vec::new();
        for (i, (a, b)) in MERGES.iter().enumerate() {
            let (a, b) = (byte_level(a), byte_level(b));
            vocab.insert(format!("{a}{b}"), BYTE_TOKENS + i as u32);
            merges.push((a, b));
        }
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().unwrap();
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        tokenizer
            .add_special_tokens([AddedToken::from("<|im_start|>", true), AddedToken::from("<|im_end|>", true)])
            .unwrap();
        tokenizer.save(dir.join(TOKENIZER_FILE), false).unwrap();
    }

    fn write_json(dir: &Path, name: &str, value: serde_json::Value) {
        std::fs::write(dir.join(name), value.to_string()).unwrap();
    }

    /// A model directory with tokenizer.json and a ChatML tokenizer_config.
    fn chatml_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(dir.path());
        write_json(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            json!({
                "chat_template": CHATML,
                "bos_token": null,
                "eos_token": {"content": "<|im_end|>", "lstrip": false, "rstrip": false},
                "model_max_length": 8192,
            }),
        );
        dir
    }

    fn chatml() -> (tempfile::TempDir, Tokenizer) {
        let dir = chatml_dir();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    /// A tokenizer whose config holds `template` as its chat_template.
    fn with_template(template: serde_json::Value) -> Result<Tokenizer> {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(dir.path());
        write_json(
            dir.path(),
            TOKENIZER_CONFIG_FILE,
            json!({"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
        );
        Tokenizer::from_dir(dir.path())
    }

    fn user(content: &str) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    fn names_file(err: &Error, file: &str) -> bool {
        matches!(err, Error::ModelFile { path, .. } if path.file_name().is_some_and(|n| n == file))
    }

    fn decode_incrementally(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
        let mut decoder = IncrementalDecoder::new(skip_special);
        let mut pieces: Vec<String> = ids.iter().map(|&id| decoder.push(tok, id).unwrap()).collect();
        pieces.push(decoder.flush(tok).unwrap());
        pieces
    }

    #[test]
    fn encode_decode_round_trip() {
        let (_dir, tok) = chatml();
        let ids = tok.encode(TEXT, false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), TEXT);
        assert_eq!(tok.vocab_size(), IM_END as usize + 1);
    }

    #[test]
    fn merges_apply_and_split_characters() {
        let (_dir, tok) = chatml();
        // "hé" + "ll" + "o".
        assert_eq!(tok.encode("héllo", false).unwrap(), vec![BYTE_TOKENS + 1, BYTE_TOKENS + 2, u32::from(b'o')]);
        // 😀 = F0 9F 98 80: one merged token for the first two bytes, then one per byte.
        let ids = tok.encode("😀", false).unwrap();
        assert_eq!(ids, vec![BYTE_TOKENS + 4, 0x98, 0x80]);
    }

    #[test]
    fn special_token_strings_map_to_special_ids() {
        let (_dir, tok) = chatml();
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids.first(), Some(&IM_START));
        assert_eq!(ids.last(), Some(&IM_END));
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nhi<|im_end|>");
        assert_eq!(tok.token_id("<|im_end|>"), Some(IM_END));
    }

    #[test]
    fn token_str_of_whole_partial_and_special_tokens() {
        let (_dir, tok) = chatml();
        assert_eq!(tok.token_str(BYTE_TOKENS + 1), "hé");
        assert_eq!(tok.token_str(BYTE_TOKENS + 3), " w");
        assert_eq!(tok.token_str(BYTE_TOKENS + 4), "\u{FFFD}");
        assert_eq!(tok.token_str(IM_END), "<|im_end|>");
        assert_eq!(tok.token_str(1_000_000), "");
    }

    #[test]
    fn incremental_decoder_matches_full_decode() {
        let (_dir, tok) = chatml();
        let ids = tok.encode(TEXT, false).unwrap();
        assert!(ids.len() > 10, "the text should span many tokens: {ids:?}");
        let pieces = decode_incrementally(&tok, &ids, true);
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(pieces.concat(), TEXT);
        // No piece ever carries half a character.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    }

    #[test]
    fn incremental_decoder_holds_partial_characters() {
        let (_dir, tok) = chatml();
        let ids = tok.encode("a😀", false).unwrap();
        let pieces = decode_incrementally(&tok, &ids, true);
        assert_eq!(pieces, vec!["a", "", "", "😀", ""]);
    }

    #[test]
    fn incremental_decoder_skips_or_keeps_special_tokens() {
        let (_dir, tok) = chatml();
        let mut ids = tok.encode("hi 日本", false).unwrap();
        ids.insert(1, IM_END);
        ids.push(IM_END);
        assert_eq!(decode_incrementally(&tok, &ids, true).concat(), "hi 日本");
        assert_eq!(decode_incrementally(&tok, &ids, false).concat(), tok.decode(&ids, false).unwrap());
    }

    #[test]
    fn incremental_decoder_flushes_incomplete_character() {
        let (_dir, tok) = chatml();
        let mut decoder = IncrementalDecoder::new(true);
        assert_eq!(decoder.push(&tok, u32::from(b'x')).unwrap(), "x");
        assert_eq!(decoder.push(&tok, BYTE_TOKENS + 4).unwrap(), "");
        assert_eq!(decoder.flush(&tok).unwrap(), "\u{FFFD}");
        assert_eq!(decoder.flush(&tok).unwrap(), "");
    }

    #[test]
    fn incremental_decoder_gives_up_on_endless_garbage() {
        let (_dir, tok) = chatml();
        let mut decoder = IncrementalDecoder::new(true);
        // Continuation bytes never complete a character.
        let pieces: Vec<String> = (0..2 * MAX_HELD_TOKENS).map(|_| decoder.push(&tok, 0x80).unwrap()).collect();
        assert!(pieces.iter().any(|p| p.contains('\u{FFFD}')));
        assert!(decoder.ids.len() <= MAX_HELD_TOKENS);
    }

    #[test]
    fn incremental_decoder_context_is_not_emitted() {
        let (_dir, tok) = chatml();
        let prompt = tok.encode("prompt 日本", false).unwrap();
        let ids = tok.encode(TEXT, false).unwrap();
        let mut decoder = IncrementalDecoder::with_context(true, &prompt);
        let mut text: String = ids.iter().map(|&id| decoder.push(&tok, id).unwrap()).collect();
        text.push_str(&decoder.flush(&tok).unwrap());
        assert_eq!(text, TEXT);
    }

    /// SentencePiece-style decoding (Llama 2, Mistral v0.1): "▁world" alone
    /// decodes to "world", after another token to " world".
    #[test]
    fn incremental_decoder_keeps_sentencepiece_spaces() {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::metaspace::Metaspace;

        let dir = tempfile::tempdir().unwrap();
        let vocab: Vocab = [("[UNK]", 0), ("▁Hello", 1), ("▁world", 2), ("!", 3)]
            .into_iter()
            .map(|(t, id)| (t.to_string(), id))
            .collect();
        let model = WordLevel::builder().vocab(vocab).unk_token("[UNK]".into()).build().unwrap();
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_decoder(Some(Metaspace::default()));
        inner.save(dir.path().join(TOKENIZER_FILE), false).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();

        assert_eq!(tok.decode(&[2], true).unwrap(), "world");
        assert_eq!(decode_incrementally(&tok, &[1, 2, 3], true).concat(), "Hello world!");
        // Continuing after the prompt "Hello": the space before "world" stays.
        let mut decoder = IncrementalDecoder::with_context(true, &[1]);
        assert_eq!(decoder.push(&tok, 2).unwrap(), " world");
        assert_eq!(decoder.push(&tok, 3).unwrap(), "!");
    }

    #[test]
    fn chatml_template_renders_like_transformers() {
        let (_dir, tok) = chatml();
        assert!(tok.has_chat_template());
        let messages = [ChatMessage::new("system", "Be brief."), user("Hi!")];
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(tok.apply_chat_template(&messages[1..], false).unwrap(), "<|im_start|>user\nHi!<|im_end|>\n");
    }

    #[test]
    fn named_template_list_uses_default() {
        let tok = with_template(json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{{ messages | length }}{{ eos_token }}"},
        ]))
        .unwrap();
        assert_eq!(tok.apply_chat_template(&[user("a"), user("b")], true).unwrap(), "<|im_start|>2<|im_end|>");
    }

    #[test]
    fn empty_template_list_means_plain_fallback() {
        let tok = with_template(json!([])).unwrap();
        assert!(!tok.has_chat_template());
        assert_eq!(tok.apply_chat_template(&[user("a")], true).unwrap(), "user: a\nassistant:");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let tok = with_template(json!("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}")).unwrap();
        assert_eq!(tok.apply_chat_template(&[user("a"), user("b")], false).unwrap(), "    a\n    b\n");
    }

    #[test]
    fn python_string_methods_work() {
        let tok = with_template(json!(
            "{% for m in messages %}{% if m.content.startswith('x') %}{{ m.content.strip().upper() }}{% endif %}{% endfor %}"
        ))
        .unwrap();
        assert_eq!(tok.apply_chat_template(&[user("x y  "), user("no")], false).unwrap(), "X Y");
    }

    #[test]
    fn raise_exception_is_a_request_error() {
        let tok = with_template(json!(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok"
        ))
        .unwrap();
        assert_eq!(tok.apply_chat_template(&[user("hi")], true).unwrap(), "ok");
        match tok.apply_chat_template(&[ChatMessage::new("assistant", "hi")], true) {
            Err(Error::InvalidRequest { param, message }) => {
                assert_eq!(param, "messages");
                assert_eq!(message, "Conversation must start with a user message");
            }
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn other_render_failures_are_tokenizer_errors() {
        let tok = with_template(json!("{{ no_such_function() }}")).unwrap();
        let err = tok.apply_chat_template(&[user("hi")], true).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)), "{err:?}");
    }

    #[test]
    fn template_syntax_error_names_the_config() {
        let err = with_template(json!("{% for m in messages %}")).unwrap_err();
        assert!(names_file(&err, TOKENIZER_CONFIG_FILE), "{err}");
        assert!(err.to_string().contains("chat_template"), "{err}");
    }

    #[test]
    fn plain_fallback_without_template() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(dir.path());
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert!(!tok.has_chat_template());
        let messages = [ChatMessage::new("system", "S"), user("U")];
        assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), "system: S\nuser: U\nassistant:");
        assert_eq!(tok.apply_chat_template(&messages, false).unwrap(), "system: S\nuser: U\n");
        assert!(tok.eos_token_ids().is_empty());
        assert_eq!(tok.bos_token_id(), None);
    }

    #[test]
    fn template_from_chat_template_jinja_file() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(dir.path());
        write_json(dir.path(), TOKENIZER_CONFIG_FILE, json!({"eos_token": "<|im_end|>"}));
        std::fs::write(dir.path().join(CHAT_TEMPLATE_JINJA_FILE), CHATML).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.apply_chat_template(&[user("x")], false).unwrap(), "<|im_start|>user\nx<|im_end|>\n");
    }

    #[test]
    fn eos_ids_are_the_union_of_all_sources() {
        let dir = chatml_dir();
        write_json(dir.path(), GENERATION_CONFIG_FILE, json!({"eos_token_id": [IM_END, 0], "bos_token_id": IM_START}));
        let tok = Tokenizer::from_dir(dir.path()).unwrap().with_extra_eos(&[0, 7]);
        assert_eq!(tok.eos_token_ids(), &[IM_END, 0, 7]);
        // bos_token is null in tokenizer_config, so generation_config's counts.
        assert_eq!(tok.bos_token_id(), Some(IM_START));

        write_json(dir.path(), GENERATION_CONFIG_FILE, json!({"eos_token_id": 5, "bos_token_id": null}));
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), &[IM_END, 5]);
        assert_eq!(tok.bos_token_id(), None);
    }

    #[test]
    fn unknown_special_token_names_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer_json(dir.path());
        write_json(dir.path(), TOKENIZER_CONFIG_FILE, json!({"bos_token": "<s>", "eos_token": "</s>"}));
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.bos_token_id(), None);
        assert!(tok.eos_token_ids().is_empty());
    }

    #[test]
    fn missing_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(names_file(&err, TOKENIZER_FILE), "{err}");
        assert!(err.to_string().contains(TOKENIZER_FILE), "{err}");
    }

    #[test]
    fn corrupt_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), b"{\"model\": 42").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(names_file(&err, TOKENIZER_FILE), "{err}");
        assert!(err.to_string().contains("not a valid tokenizer"), "{err}");
    }

    #[test]
    fn corrupt_side_files_name_the_file() {
        for file in [TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_JSON_FILE] {
            let dir = tempfile::tempdir().unwrap();
            write_tokenizer_json(dir.path());
            std::fs::write(dir.path().join(file), b"{not json").unwrap();
            let err = Tokenizer::from_dir(dir.path()).unwrap_err();
            assert!(names_file(&err, file), "{file}: {err}");
        }
    }

    #[test]
    fn chat_message_serde() {
        let message: ChatMessage = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(message, user("hi"));
        assert_eq!(serde_json::to_value(&message).unwrap(), json!({"role": "user", "content": "hi"}));
    }
}
