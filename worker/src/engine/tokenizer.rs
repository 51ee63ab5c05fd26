//! Tokenizers: from an HF tokenizer.json, or built from GGUF metadata so that it splits
//! text exactly as llama.cpp does for the same file.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token type of a control token (BOS, EOS, chat markers).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp's token type of a user-defined token.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// A tokenizer with its special ids.
#[derive(Clone)]
pub struct TextTokenizer {
    /// Splits special tokens out of the text (`<|im_start|>` becomes one token).
    special: Tokenizer,
    /// Encodes special-token text as plain text.
    plain: Tokenizer,
    /// The special tokens' texts by id: control tokens such as `<|im_start|>`.
    specials: HashMap<u32, String>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// Tokens that end a generation.
    pub eos: Vec<u32>,
    /// Whether a BOS token is prepended to prompts.
    pub add_bos: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// The pre-tokenizer regular expressions llama.cpp uses per `tokenizer.ggml.pre` value,
/// applied in order; the last one is followed by GPT-2 byte-level mapping.
fn pre_tokenizer_regexes(pre: &str) -> Result<Vec<&'static str>> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => vec![GPT2],
        // Digits are split one by one before the GPT-2 expression.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => vec![LLAMA3],
        "qwen2" | "deepseek-r1-qwen" | "megrez" => vec![QWEN2],
        other => bail!(
            "the GGUF tokenizer uses pre-tokenizer {other:?}, which this worker does not implement; \
             use an HF directory with tokenizer.json instead"
        ),
    })
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(pattern.to_string()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
    Ok(split.into())
}

fn metadata<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    content.metadata.get(key)
}

fn metadata_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    metadata(content, key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|i| i as u32)))
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let model = metadata(content, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .context("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")?;
        if model != "gpt2" {
            bail!(
                "the GGUF tokenizer model {model:?} is not supported (only BPE \"gpt2\" tokenizers are); \
                 use an HF directory with tokenizer.json instead"
            );
        }
        let tokens: Vec<String> = metadata(content, "tokenizer.ggml.tokens")
            .context("tokenizer.ggml.tokens is missing")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match metadata(content, "tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let merges: Vec<(String, String)> = metadata(content, "tokenizer.ggml.merges")
            .context("tokenizer.ggml.merges is missing")?
            .to_vec()?
            .iter()
            .map(|m| {
                let m = m.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::Msg(format!("malformed merge {m:?}")))
            })
            .collect::<candle_core::Result<_>>()?;
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .build()
            .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;
        let pre = metadata(content, "tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map_or("default", |s| s);
        let mut steps = Vec::new();
        for regex in pre_tokenizer_regexes(pre)? {
            steps.push(split(regex)?);
        }
        steps.push(ByteLevel::new(false, false, false).into());
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;

        let bos = metadata_u32(content, "tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = metadata_u32(content, "tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = metadata_u32(content, "tokenizer.ggml.eot_token_id") {
            eos.push(eot);
        }
        let add_bos = metadata(content, "tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Self::finish(tokenizer, bos, eos, add_bos)
    }

    /// Loads an HF tokenizer.json; BOS/EOS come from the model's configuration.
    pub fn from_file(path: &std::path::Path, bos: Option<u32>, eos: Vec<u32>, add_bos: bool) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::finish(tokenizer, bos, eos, add_bos)
    }

    fn finish(special: Tokenizer, bos: Option<u32>, mut eos: Vec<u32>, add_bos: bool) -> Result<Self> {
        // Chat models end a turn with their end-of-turn marker even when EOS is another token.
        for marker in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"] {
            if let Some(id) = special.token_to_id(marker)
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        if eos.is_empty() {
            bail!("the tokenizer defines no end-of-sequence token");
        }
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let specials = special
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        Ok(Self { special, plain, specials, bos, eos, add_bos })
    }

    /// Token ids of `text`. With `special`, special-token text such as `<|im_start|>` becomes
    /// its single token; without, it is tokenized as plain text. BOS is never added here.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let tokenizer = if special { &self.special } else { &self.plain };
        let encoding = tokenizer.encode_fast(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a rendered chat prompt whose `content` byte ranges hold message text.
    /// Special-token text such as `<|im_start|>` becomes its control token only outside
    /// those ranges (the chat template's own markup); inside them it is tokenized as the
    /// plain text it is. A prompt whose contents hold no special-token text gets exactly
    /// the ids of `encode(text, true)`. BOS is never added here.
    pub fn encode_chat(&self, text: &str, content: &[Range<usize>]) -> Result<Vec<u32>> {
        let encoding = self.special.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let (ids, offsets) = (encoding.get_ids(), encoding.get_offsets());
        let in_content = |start: usize, end: usize| content.iter().any(|r| start < r.end && r.start < end);
        // The markup's control tokens, each with the text it covers (a token that strips
        // the spaces beside it covers them too).
        let mut markup = Vec::new();
        let mut forged = false;
        for (&id, &(start, end)) in ids.iter().zip(offsets) {
            let Some(token) = self.specials.get(&id) else { continue };
            let core = text
                .get(start..end)
                .and_then(|covered| covered.find(token.as_str()))
                .map_or((start, end), |at| (start + at, start + at + token.len()));
            if in_content(core.0, core.1) {
                forged = true;
            } else {
                markup.push((start, end, id));
            }
        }
        if !forged {
            return Ok(ids.to_vec());
        }
        // Split the text at the markup's control tokens only; the pieces between them,
        // contents included, are plain text.
        let mut out = Vec::with_capacity(ids.len());
        let mut at = 0;
        let piece = |from: usize, to: usize| {
            text.get(from..to).with_context(|| format!("tokenizing: no text at bytes {from}..{to}"))
        };
        for (start, end, id) in markup {
            if start < at {
                bail!("tokenizing: overlapping control tokens at byte {start}");
            }
            if start > at {
                out.extend(self.encode(piece(at, start)?, false)?);
            }
            out.push(id);
            at = end;
        }
        if at < text.len() {
            out.extend(self.encode(piece(at, text.len())?, false)?);
        }
        Ok(out)
    }

    /// The first special token whose text occurs in `text`, if any.
    pub fn special_text_in(&self, text: &str) -> Option<&str> {
        self.specials.values().map(String::as_str).filter(|token| text.contains(token)).min()
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.contains_key(&id)
    }

    /// Token ids of a prompt as the model expects it: BOS first when the model adds one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend(self.encode(text, true)?);
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.special.decode(ids, skip_special).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    /// Writes the tokenizer as an HF tokenizer.json.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        self.special.save(path, false).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Number of tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    /// Id of a token's text, if it is one token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    /// Whether `id` ends a generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}
