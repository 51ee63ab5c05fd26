//! Text generation: prefill, then decode until EOS, a stop sequence or the token limit;
//! one sequence at a time or many advanced together.

use anyhow::Result;
use candle_core::{DType, Tensor};

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

/// A sequence being generated.
struct Active<'a> {
    request: &'a GenerateRequest,
    cache: KvCache,
    sampler: Sampler,
    context: Vec<u32>,
    generated: Vec<u32>,
    next: u32,
    done: Option<FinishReason>,
    /// Byte offset of the earliest stop sequence in the text, once one appeared.
    stop_at: Option<usize>,
}

fn last_row(logits: &Tensor, row: usize) -> Result<Vec<f32>> {
    Ok(logits.get(row)?.to_dtype(DType::F32)?.to_vec1()?)
}

impl<'a> Active<'a> {
    fn start(model: &LoadedModel, request: &'a GenerateRequest) -> Result<Self> {
        let mut cache = KvCache::default();
        let logits = model.model.forward(&request.prompt, &mut cache, false)?;
        let mut sampler = Sampler::new(request.sampling.clone());
        let next = sampler.sample(&last_row(&logits, 0)?, &request.prompt);
        let mut active = Self {
            request,
            cache,
            sampler,
            context: request.prompt.clone(),
            generated: Vec::new(),
            next,
            done: None,
            stop_at: None,
        };
        active.accept(model)?;
        Ok(active)
    }

    /// Takes `self.next` into the output, or finishes. The text is only decoded on the
    /// way when there are stop sequences to look for.
    fn accept(&mut self, model: &LoadedModel) -> Result<()> {
        if model.tokenizer.is_eos(self.next) {
            self.done = Some(FinishReason::Stop);
            return Ok(());
        }
        self.generated.push(self.next);
        self.context.push(self.next);
        if !self.request.stop.is_empty() {
            let text = model.tokenizer.decode(&self.generated, true)?;
            self.stop_at = self.request.stop.iter().filter_map(|s| text.find(s.as_str())).min();
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

    fn finish(self, model: &LoadedModel) -> Result<Generation> {
        let mut text = model.tokenizer.decode(&self.generated, true)?;
        if let Some(cut) = self.stop_at {
            text.truncate(cut);
        }
        Ok(Generation {
            tokens: self.generated,
            text,
            finish_reason: self.done.unwrap_or(FinishReason::Length),
            prompt_tokens: self.request.prompt.len(),
        })
    }
}

/// Generates for one request.
pub fn generate(model: &LoadedModel, request: &GenerateRequest) -> Result<Generation> {
    let mut active = Active::start(model, request)?;
    while active.done.is_none() {
        let logits = model.model.forward(&[active.next], &mut active.cache, false)?;
        active.next = active.sampler.sample(&last_row(&logits, 0)?, &active.context);
        active.accept(model)?;
    }
    active.finish(model)
}

/// Generates for several requests together: each is prefilled on its own, then all
/// unfinished ones advance by one token per batched decode step.
pub fn generate_batch(model: &LoadedModel, requests: &[GenerateRequest]) -> Result<Vec<Generation>> {
    let mut actives: Vec<Active<'_>> = requests.iter().map(|r| Active::start(model, r)).collect::<Result<_>>()?;
    loop {
        let running: Vec<usize> = (0..actives.len()).filter(|&i| actives[i].done.is_none()).collect();
        if running.is_empty() {
            break;
        }
        let tokens: Vec<u32> = running.iter().map(|&i| actives[i].next).collect();
        let logits = {
            let mut caches: Vec<&mut KvCache> = actives
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| running.contains(i))
                .map(|(_, a)| &mut a.cache)
                .collect();
            model.model.decode_batch(&tokens, &mut caches)?
        };
        for (row, &i) in running.iter().enumerate() {
            let a = &mut actives[i];
            a.next = a.sampler.sample(&last_row(&logits, row)?, &a.context);
            a.accept(model)?;
        }
    }
    actives.into_iter().map(|a| a.finish(model)).collect()
}
