//! Text generation: prefill, then decode until EOS, a stop sequence or the token limit;
//! one sequence at a time or many advanced together.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::adapter::Adapter;
use super::loader::LoadedModel;
use super::model::KvCache;
use super::sampling::{Sampler, SamplingParams};

/// Why a generation ended, as OpenAI reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of sequence or a stop sequence.
    Stop,
    /// The token limit.
    Length,
}

impl FinishReason {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt, tokenized (BOS included when the model wants one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Text that ends the generation; it is not part of the output.
    pub stop: Vec<String>,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (up to and excluding EOS).
    pub tokens: Vec<u32>,
    /// Their text, cut before a stop sequence.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
}

/// A sequence being generated: prefilled on creation, then advanced one token per
/// decode step (alone or in a batch) until it finishes. A server holds many at once.
pub struct Sequence {
    request: GenerateRequest,
    adapter: Option<Arc<Adapter>>,
    cache: KvCache,
    sampler: Sampler,
    context: Vec<u32>,
    generated: Vec<u32>,
    next: u32,
    done: Option<FinishReason>,
    /// Decode the text after every token (streaming or stop sequences need it).
    incremental: bool,
    /// The generated text so far, when decoded incrementally.
    text: String,
    /// Byte offset of the earliest stop sequence in the text, once one appeared.
    stop_at: Option<usize>,
    /// Bytes of `text` handed out by `take_delta`.
    emitted: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence").field("generated", &self.generated.len()).field("done", &self.done).finish()
    }
}

fn last_row(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(logits.get(row)?.to_dtype(DType::F32)?.to_vec1()?)
}

impl Sequence {
    /// Prefills the prompt (with `adapter` applied, if any) and picks the first token.
    /// `incremental` makes [`Self::take_delta`] available for streaming.
    pub fn start(
        model: &LoadedModel,
        request: GenerateRequest,
        adapter: Option<Arc<Adapter>>,
        incremental: bool,
    ) -> Result<Self> {
        let mut cache = KvCache::default();
        let logits = model.model.forward_with(&request.prompt, &mut cache, false, adapter.as_deref())?;
        let mut sampler = Sampler::new(request.sampling.clone());
        let next = sampler.sample(&last_row(&logits, 0)?, &request.prompt);
        let incremental = incremental || !request.stop.is_empty();
        let mut sequence = Self {
            context: request.prompt.clone(),
            request,
            adapter,
            cache,
            sampler,
            generated: Vec::new(),
            next,
            done: None,
            incremental,
            text: String::new(),
            stop_at: None,
            emitted: 0,
        };
        sequence.accept(model)?;
        Ok(sequence)
    }

    /// Why it finished, once it has.
    pub fn finished(&self) -> Option<FinishReason> {
        self.done
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated.len()
    }

    /// Takes `self.next` into the output, or finishes.
    fn accept(&mut self, model: &LoadedModel) -> Result<()> {
        if model.tokenizer.is_eos(self.next) {
            self.done = Some(FinishReason::Stop);
            return Ok(());
        }
        self.generated.push(self.next);
        self.context.push(self.next);
        if self.incremental {
            self.text = model.tokenizer.decode(&self.generated, true)?;
            if !self.request.stop.is_empty() {
                self.stop_at = self.request.stop.iter().filter_map(|s| self.text.find(s.as_str())).min();
            }
        }
        if self.stop_at.is_some() {
            self.done = Some(FinishReason::Stop);
        } else if self.generated.len() >= self.request.max_tokens
            || self.cache.len() + 1 >= model.model.config().context_length
        {
            self.done = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// Text generated since the last call that can no longer change: a character still
    /// incomplete, or an ending that may grow into a stop sequence, is held back. What
    /// the calls return, followed by [`Self::finish`]'s remainder, is exactly the text.
    pub fn take_delta(&mut self) -> String {
        let text = &self.text;
        let limit = match self.stop_at {
            Some(cut) => cut,
            None => {
                let mut end = text.trim_end_matches('\u{FFFD}').len();
                for stop in &self.request.stop {
                    // The longest proper prefix of the stop sequence that the text ends with.
                    for (cut, _) in stop.char_indices().skip(1) {
                        if text[..end].ends_with(&stop[..cut]) {
                            end -= cut;
                            break;
                        }
                    }
                }
                end
            }
        };
        if limit <= self.emitted || !text.is_char_boundary(limit) || !text.is_char_boundary(self.emitted) {
            return String::new();
        }
        let delta = text[self.emitted..limit].to_string();
        self.emitted = limit;
        delta
    }

    /// The finished generation, and the part of its text no delta has handed out.
    pub fn finish(self, model: &LoadedModel) -> Result<(Generation, String)> {
        let mut text = model.tokenizer.decode(&self.generated, true)?;
        if let Some(cut) = self.stop_at {
            text.truncate(cut);
        }
        let rest = if self.emitted <= text.len() && text.is_char_boundary(self.emitted) {
            text[self.emitted..].to_string()
        } else {
            String::new()
        };
        let generation = Generation {
            tokens: self.generated,
            text,
            finish_reason: self.done.unwrap_or(FinishReason::Length),
            prompt_tokens: self.request.prompt.len(),
        };
        Ok((generation, rest))
    }
}

/// Advances every unfinished sequence of `sequences` by one token with one batched
/// decode step. Returns how many took part.
pub fn decode_step(model: &LoadedModel, sequences: &mut [&mut Sequence]) -> Result<usize> {
    let mut running: Vec<&mut Sequence> = sequences.iter_mut().filter(|s| s.done.is_none()).map(|s| &mut **s).collect();
    if running.is_empty() {
        return Ok(0);
    }
    let tokens: Vec<u32> = running.iter().map(|s| s.next).collect();
    let logits = {
        let adapters: Vec<Option<Arc<Adapter>>> = running.iter().map(|s| s.adapter.clone()).collect();
        let adapter_refs: Vec<Option<&Adapter>> = adapters.iter().map(|a| a.as_deref()).collect();
        let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|s| &mut s.cache).collect();
        model.model.decode_batch_with(&tokens, &mut caches, &adapter_refs)?
    };
    for (row, s) in running.iter_mut().enumerate() {
        s.next = s.sampler.sample(&last_row(&logits, row)?, &s.context);
        s.accept(model)?;
    }
    Ok(running.len())
}

/// Generates for one request.
pub fn generate(model: &LoadedModel, request: &GenerateRequest) -> Result<Generation> {
    let mut sequence = Sequence::start(model, request.clone(), None, false)?;
    while sequence.done.is_none() {
        let logits = model.model.forward(&[sequence.next], &mut sequence.cache, false)?;
        sequence.next = sequence.sampler.sample(&last_row(&logits, 0)?, &sequence.context);
        sequence.accept(model)?;
    }
    Ok(sequence.finish(model)?.0)
}

/// Generates for several requests together: each is prefilled on its own, then all
/// unfinished ones advance by one token per batched decode step.
pub fn generate_batch(model: &LoadedModel, requests: &[GenerateRequest]) -> Result<Vec<Generation>> {
    let mut sequences: Vec<Sequence> =
        requests.iter().map(|r| Sequence::start(model, r.clone(), None, false)).collect::<Result<_>>()?;
    loop {
        let mut all: Vec<&mut Sequence> = sequences.iter_mut().collect();
        if decode_step(model, &mut all)? == 0 {
            break;
        }
    }
    sequences.into_iter().map(|s| Ok(s.finish(model)?.0)).collect()
}
