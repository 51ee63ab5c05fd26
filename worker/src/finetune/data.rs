//! Training examples: records of a prepared split (Parquet or JSONL, chat, completion or
//! text) turned into token ids with a loss mask that leaves the prompt out, and batches
//! of them, padded or packed.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::engine::LoadedModel;
use crate::engine::chat::render_for;
use crate::prepare::record::{self, Record, Schema};
use crate::prepare::source::{self, Digests, Format};

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Per token: whether predicting it counts towards the loss.
    pub learn: Vec<bool>,
}

/// Reads the records of a split file, inferring chat, completion or text from its fields.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let format = Format::infer(path).with_context(|| format!("cannot tell the format of {}", path.display()))?;
    let mut records = Vec::new();
    let mut invalid = 0usize;
    let mut first_error = None;
    for row in source::file_rows(path, format, &Digests::default())? {
        let parsed = row.value.and_then(|v| {
            let schema = if v.contains_key("messages") {
                Schema::Chat
            } else if v.contains_key("prompt") {
                Schema::Completion
            } else {
                Schema::Text
            };
            record::from_row(&v, schema, None)
        });
        match parsed {
            Ok(r) => records.push(r),
            Err(e) => {
                invalid += 1;
                first_error.get_or_insert(format!("{}:{}: {e}", row.origin, row.line));
            }
        }
    }
    if records.is_empty() {
        bail!(
            "{} holds no usable records{}",
            path.display(),
            first_error.map(|e| format!(" (first error: {e})")).unwrap_or_default()
        );
    }
    if invalid > 0 {
        tracing::warn!(file = %path.display(), invalid, first = first_error.unwrap_or_default(), "skipped unreadable records");
    }
    Ok(records)
}

/// Tokenizes a record: the prompt (chat template up to the assistant's last turn, or the
/// completion prompt) is context only; the answer and the end-of-sequence token are
/// learned. Text records are learned whole. Cut to `max_len` tokens.
pub fn tokenize(model: &LoadedModel, record: &Record, max_len: usize) -> Result<Example> {
    let tok = &model.tokenizer;
    let eos = tok.eos.first().copied();
    let (prompt, answer_end): (Vec<u32>, Vec<u32>) = match record {
        Record::Chat { messages } => {
            let last = messages
                .iter()
                .rposition(|m| m.role == "assistant")
                .context("a chat record without an assistant turn has nothing to learn")?;
            let prompt_text = render_for(model, &messages[..last], true)?;
            let full_text = render_for(model, &messages[..=last], false)?;
            let prompt = tok.encode(&prompt_text, true)?;
            let full = tok.encode(&full_text, true)?;
            if !full.starts_with(&prompt) {
                // Templates that rewrite earlier turns: learn the whole conversation's end.
                tracing::debug!("chat template output is not prefix-stable; learning from the full text");
            }
            let mut full = full;
            // Chat templates end a turn with their end-of-turn token; add EOS otherwise.
            if let Some(e) = eos
                && !full.iter().rev().take(3).any(|t| tok.is_eos(*t))
            {
                full.push(e);
            }
            (prompt, full)
        }
        Record::Completion { prompt, completion } => {
            let p = tok.encode_prompt(prompt)?;
            let mut full = tok.encode_prompt(&format!("{prompt}{completion}"))?;
            if let Some(e) = eos {
                full.push(e);
            }
            (p, full)
        }
        Record::Text { text } => {
            let mut full = tok.encode_prompt(text)?;
            if let Some(e) = eos {
                full.push(e);
            }
            let start: Vec<u32> = full.first().copied().into_iter().collect();
            (start, full)
        }
    };
    let shared = prompt.iter().zip(&answer_end).take_while(|(a, b)| a == b).count();
    let mut tokens = answer_end;
    tokens.truncate(max_len);
    let learn: Vec<bool> = (0..tokens.len()).map(|i| i >= shared.max(1)).collect();
    if !learn.iter().any(|l| *l) {
        bail!("the prompt alone fills max_seq_length ({max_len} tokens); nothing is left to learn");
    }
    Ok(Example { tokens, learn })
}

/// A batch ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// Inputs [b, t].
    pub inputs: Tensor,
    /// Position of each input in its sequence [b, t].
    pub positions: Tensor,
    /// Segment of each input (packed sequences) per row.
    pub segments: Vec<Vec<u32>>,
    /// Next-token targets [b, t].
    pub targets: Tensor,
    /// 1 where the target counts [b, t].
    pub weights: Tensor,
    /// Tokens that count.
    pub tokens: usize,
}

/// Builds a batch of `examples`: one example per row, right-padded (`packing` false), or
/// examples packed greedily into rows of `max_len` with separate attention segments.
pub fn batch(examples: &[&Example], max_len: usize, packing: bool, pad: u32, device: &Device) -> Result<Batch> {
    let mut rows: Vec<Vec<(usize, &Example)>> = Vec::new();
    if packing {
        let mut current: Vec<(usize, &Example)> = Vec::new();
        let mut used = 0;
        for (i, e) in examples.iter().enumerate() {
            let len = e.tokens.len() - 1;
            if used + len > max_len && !current.is_empty() {
                rows.push(std::mem::take(&mut current));
                used = 0;
            }
            current.push((i, e));
            used += len;
        }
        if !current.is_empty() {
            rows.push(current);
        }
    } else {
        rows = examples.iter().enumerate().map(|(i, e)| vec![(i, *e)]).collect();
    }
    let width = rows.iter().map(|r| r.iter().map(|(_, e)| e.tokens.len() - 1).sum::<usize>()).max().unwrap_or(1).max(1);
    let (mut inputs, mut positions, mut targets, mut weights, mut segments) = (vec![], vec![], vec![], vec![], vec![]);
    let mut counted = 0;
    for row in &rows {
        let mut seg = Vec::with_capacity(width);
        let mut n = 0;
        for (s, (_, e)) in row.iter().enumerate() {
            for i in 0..e.tokens.len() - 1 {
                inputs.push(e.tokens[i]);
                positions.push(i as u32);
                targets.push(e.tokens[i + 1]);
                let learn = e.learn[i + 1];
                weights.push(if learn { 1f32 } else { 0.0 });
                counted += usize::from(learn);
                seg.push(s as u32);
                n += 1;
            }
        }
        for _ in n..width {
            inputs.push(pad);
            positions.push(0);
            targets.push(pad);
            weights.push(0.0);
            seg.push(u32::MAX);
        }
        segments.push(seg);
    }
    let b = rows.len();
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, width), device)?,
        positions: Tensor::from_vec(positions, (b, width), device)?,
        segments,
        targets: Tensor::from_vec(targets, (b, width), device)?,
        weights: Tensor::from_vec(weights, (b, width), device)?,
        tokens: counted,
    })
}
