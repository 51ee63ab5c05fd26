//! What is evaluated: a model loaded here with the shared engine (optionally with a LoRA
//! adapter), or any OpenAI-compatible endpoint reached over HTTP with retries.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::samples::{Choices, Input, Sample};
use crate::engine::sampling::SplitMix64;
use crate::engine::{Adapter, GenerateRequest, LoadedModel, SamplingParams, Sequence, decode_step};
use crate::prepare::record::Record;

/// How outputs are generated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// 0: greedy.
    pub temperature: f64,
    /// Nucleus sampling; None: off.
    pub top_p: Option<f64>,
    /// Top-k sampling; None: off.
    pub top_k: Option<u32>,
    /// Most tokens per output.
    pub max_tokens: u32,
    /// Repetition penalty; None: off.
    pub repetition_penalty: Option<f64>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Seed of sampled outputs; sample i uses seed + i.
    pub seed: Option<u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            max_tokens: 128,
            repetition_penalty: None,
            stop: Vec::new(),
            seed: None,
        }
    }
}

/// A model evaluated in this process.
pub struct Local {
    /// The model.
    pub model: Arc<LoadedModel>,
    /// The adapter applied to it.
    pub adapter: Option<Arc<Adapter>>,
}

impl Local {
    /// Prompt tokens of an input: chat inputs through the model's chat template, their
    /// message contents kept as text exactly as the server keeps them, so a local run
    /// sees the prompts a deployment of the same model would.
    pub fn prompt_tokens(&self, input: &Input) -> Result<Vec<u32>> {
        match input {
            Input::Chat(messages) => Ok(crate::serve::prompt::encode_chat(&self.model, messages)?.ids),
            Input::Text(text) => self.model.tokenizer.encode_prompt(text),
        }
    }

    fn request(&self, prompt: Vec<u32>, settings: &Settings, index: usize) -> Result<GenerateRequest, String> {
        let context = self.model.model.config().context_length;
        if prompt.is_empty() {
            return Err("the prompt is empty".into());
        }
        if prompt.len() + 1 >= context {
            return Err(format!("the prompt has {} tokens; the model's context is {context}", prompt.len()));
        }
        let sampling = SamplingParams {
            temperature: settings.temperature as f32,
            top_p: settings.top_p.unwrap_or(1.0) as f32,
            top_k: settings.top_k.unwrap_or(0) as usize,
            repetition_penalty: settings.repetition_penalty.unwrap_or(1.0) as f32,
            seed: settings.seed.unwrap_or(0).wrapping_add(index as u64),
        };
        let max_tokens = (settings.max_tokens as usize).min(context - prompt.len() - 1).max(1);
        Ok(GenerateRequest { prompt, max_tokens, sampling, stop: settings.stop.clone() })
    }

    /// Generates an output for each sample, up to `batch` sequences decoded together;
    /// a sample leaves the batch when it finishes and the next one takes its place.
    /// `done` gets each sample's index and its output or the reason it has none.
    pub fn generate(
        &self,
        samples: &[&Sample],
        settings: &Settings,
        batch: usize,
        mut done: impl FnMut(usize, Result<String, String>),
    ) -> Result<()> {
        let model = &*self.model;
        let mut pending = samples.iter();
        let mut running: Vec<(usize, Sequence)> = Vec::new();
        loop {
            while running.len() < batch.max(1) {
                let Some(sample) = pending.next() else { break };
                let started = self
                    .prompt_tokens(&sample.input)
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|prompt| self.request(prompt, settings, sample.index))
                    .and_then(|request| {
                        Sequence::start(model, request, self.adapter.clone(), false).map_err(|e| format!("{e:#}"))
                    });
                match started {
                    Ok(sequence) if sequence.finished().is_some() => {
                        done(sample.index, sequence.finish(model).map(|(g, _)| g.text).map_err(|e| format!("{e:#}")))
                    }
                    Ok(sequence) => running.push((sample.index, sequence)),
                    Err(why) => done(sample.index, Err(why)),
                }
            }
            if running.is_empty() {
                return Ok(());
            }
            if crate::report::control().cancelled() {
                bail!(crate::report::Interrupted::Cancelled("the evaluation was cancelled".into()));
            }
            let mut refs: Vec<&mut Sequence> = running.iter_mut().map(|(_, s)| s).collect();
            decode_step(model, &mut refs)?;
            let mut k = 0;
            while k < running.len() {
                if running[k].1.finished().is_some() {
                    let (index, sequence) = running.swap_remove(k);
                    done(index, sequence.finish(model).map(|(g, _)| g.text).map_err(|e| format!("{e:#}")));
                } else {
                    k += 1;
                }
            }
        }
    }

    fn log_probs(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.model.model.token_log_probs_with(tokens, self.adapter.as_deref())
    }

    /// Negative log-likelihood of a sample's expected output and the number of tokens
    /// scored. Text samples: every token after the first, as llama.cpp's perplexity
    /// scores one window. Chat and completion samples: the answer and its end-of-sequence
    /// token given the input, exactly the tokens fine-tuning learns, so the perplexity is
    /// exp of the fine-tuning loss on them. Text longer than the context is scored in
    /// consecutive windows.
    pub fn nll(&self, sample: &Sample) -> Result<(f64, u64)> {
        let expected = sample.expected.as_deref().context("the sample has no expected output to score")?;
        let context = self.model.model.config().context_length;
        let (tokens, learn) = match &sample.input {
            Input::Text(prompt) if prompt.is_empty() => {
                let tokens = self.model.tokenizer.encode_prompt(expected)?;
                let learn = (0..tokens.len()).map(|i| i > 0).collect::<Vec<_>>();
                (tokens, learn)
            }
            input => {
                let record = match input {
                    Input::Chat(messages) => {
                        let mut messages = messages.clone();
                        messages.push(llmops_crds::render::ChatMessage {
                            role: "assistant".into(),
                            content: expected.to_string(),
                        });
                        Record::Chat { messages }
                    }
                    Input::Text(prompt) => {
                        Record::Completion { prompt: prompt.clone(), completion: expected.to_string() }
                    }
                };
                let example = crate::finetune::data::tokenize(&self.model, &record, context)?;
                (example.tokens, example.learn)
            }
        };
        let (mut nll, mut count) = (0f64, 0u64);
        let mut start = 0;
        while start + 1 < tokens.len() {
            let end = (start + context).min(tokens.len());
            let window = &tokens[start..end];
            let log_probs = self.log_probs(window)?;
            for (i, lp) in log_probs.iter().enumerate() {
                if learn[start + i + 1] {
                    nll -= f64::from(*lp);
                    count += 1;
                }
            }
            start = end;
        }
        if count == 0 {
            bail!("the expected output has no token to score");
        }
        Ok((nll, count))
    }

    /// Log-likelihood of each choice as the continuation of the input; the pick is the
    /// most likely one.
    pub fn choose(&self, input: &Input, choices: &Choices) -> Result<(usize, Vec<f64>)> {
        let tokenizer = &self.model.tokenizer;
        let context_text = match input {
            Input::Chat(messages) => crate::engine::chat::render_for(&self.model, messages, true)?,
            Input::Text(text) => text.clone(),
        };
        let encode = |text: &str| -> Result<Vec<u32>> {
            match input {
                Input::Chat(_) => tokenizer.encode(text, true),
                Input::Text(_) => tokenizer.encode_prompt(text),
            }
        };
        let context = encode(&context_text)?;
        let mut scores: Vec<f64> = Vec::with_capacity(choices.options.len());
        for option in &choices.options {
            let full = encode(&format!("{context_text}{option}"))?;
            // Tokens merged across the boundary belong to the choice.
            let shared = context.iter().zip(&full).take_while(|(a, b)| a == b).count().max(1);
            if shared >= full.len() {
                bail!("choice {option:?} adds no token to the input");
            }
            let log_probs = self.log_probs(&full)?;
            scores.push(log_probs[shared - 1..].iter().map(|&lp| f64::from(lp)).sum());
        }
        let best = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .context("no choices to pick from")?;
        Ok((best, scores))
    }
}

/// Why a request to an endpoint failed, after its retries.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestFailure {
    /// What the last attempt got.
    pub message: String,
    /// Attempts made (0: the request task itself failed).
    pub attempts: u32,
}

impl RequestFailure {
    /// The message with the attempts made, for a sample's error.
    pub fn describe(&self) -> String {
        match self.attempts {
            0 => self.message.clone(),
            1 => format!("{} (after 1 attempt)", self.message),
            n => format!("{} (after {n} attempts)", self.message),
        }
    }
}

/// One attempt's failure.
struct Attempt {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

/// An OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    base: String,
    model: String,
    api_key: Option<String>,
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
}

/// Longest wait between attempts, whatever a Retry-After header asks.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Endpoint {
    /// A client of `url` (up to and including /v1) that asks for `model`.
    pub fn new(url: &str, model: &str, api_key: Option<String>, timeout: Duration) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("endpoint {url:?} is not an http(s) URL");
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key,
            attempts: 5,
            backoff: Duration::from_millis(250),
        })
    }

    /// The request body and path for an input.
    fn body(&self, input: &Input, settings: &Settings, index: usize) -> (&'static str, Value) {
        let mut body = match input {
            Input::Chat(messages) => json!({"model": self.model, "messages": messages}),
            Input::Text(prompt) => json!({"model": self.model, "prompt": prompt}),
        };
        body["max_tokens"] = json!(settings.max_tokens);
        body["temperature"] = json!(settings.temperature);
        if let Some(p) = settings.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(k) = settings.top_k {
            body["top_k"] = json!(k);
        }
        if let Some(r) = settings.repetition_penalty {
            body["repetition_penalty"] = json!(r);
        }
        if !settings.stop.is_empty() {
            body["stop"] = json!(settings.stop);
        }
        if let Some(seed) = settings.seed {
            body["seed"] = json!(seed.wrapping_add(index as u64));
        }
        let path = if matches!(input, Input::Chat(_)) { "/chat/completions" } else { "/completions" };
        (path, body)
    }

    /// The output for `input`, retrying timeouts, connection errors, 429 and 5xx answers
    /// with exponential backoff and jitter (or the server's Retry-After).
    pub async fn complete(&self, input: &Input, settings: &Settings, index: usize) -> Result<String, RequestFailure> {
        let (path, body) = self.body(input, settings, index);
        let mut jitter = SplitMix64(index as u64 ^ 0x5EED);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(path, &body).await {
                Ok(text) => return Ok(text),
                Err(failure) => failure,
            };
            if !failure.retryable || attempt >= self.attempts.max(1) {
                return Err(RequestFailure { message: failure.message, attempts: attempt });
            }
            let exponential = self.backoff.saturating_mul(1 << (attempt - 1).min(16)).min(MAX_BACKOFF);
            let wait = failure.retry_after.unwrap_or_else(|| exponential.mul_f64(0.75 + 0.5 * jitter.next_f64()));
            tracing::debug!(index, attempt, error = %failure.message, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
        }
    }

    async fn attempt(&self, path: &str, body: &Value) -> Result<String, Attempt> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Attempt {
            message: if e.is_timeout() { format!("timed out: {e}") } else { format!("request failed: {e}") },
            retryable: true,
            retry_after: None,
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, jiff::Timestamp::now()));
        let text = response.text().await.map_err(|e| Attempt {
            message: format!("reading the response: {e}"),
            retryable: true,
            retry_after: None,
        })?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let detail = parsed
                .as_ref()
                .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(String::from))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(Attempt {
                message: format!("HTTP {}: {detail}", status.as_u16()),
                retryable: status.as_u16() == 429 || status.is_server_error(),
                retry_after,
            });
        }
        let choice = parsed.as_ref().and_then(|v| v.pointer("/choices/0"));
        let content = choice.and_then(|c| {
            c.pointer("/message/content").or_else(|| c.get("text")).and_then(Value::as_str).map(String::from)
        });
        content.ok_or_else(|| Attempt {
            message: format!(
                "the answer has no choices[0].message.content or choices[0].text: {}",
                text.chars().take(200).collect::<String>()
            ),
            retryable: false,
            retry_after: None,
        })
    }
}

/// The wait a `Retry-After` value asks for (RFC 9110: delay-seconds or an HTTP date),
/// at most [`MAX_BACKOFF`]; a date in the past is no wait. A value that is neither
/// (negative, not a number, garbage) is ignored, and the usual backoff applies.
fn retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // A run of digits too long for u64 is still a (very long) delay.
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_BACKOFF));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0)
            .then(|| Duration::from_secs_f64(seconds.min(MAX_BACKOFF.as_secs_f64())));
    }
    static DATES: jiff::fmt::rfc2822::DateTimeParser = jiff::fmt::rfc2822::DateTimeParser::new();
    let at = DATES.parse_timestamp(value).ok()?;
    let ahead = at.as_millisecond().saturating_sub(now.as_millisecond()).max(0);
    Some(Duration::from_millis(u64::try_from(ahead).unwrap_or(0)).min(MAX_BACKOFF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates_caps_them_and_ignores_garbage() {
        let now: jiff::Timestamp = "2026-03-01T12:00:00Z".parse().expect("a timestamp");
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(retry_after("3", now), secs(3));
        assert_eq!(retry_after(" 0 ", now), secs(0));
        assert_eq!(retry_after("1.5", now), Some(Duration::from_millis(1500)));
        for huge in
            ["86400", "18446744073709551616", "99999999999999999999999999999999", "1e300", "1.7976931348623157e308"]
        {
            assert_eq!(retry_after(huge, now), Some(MAX_BACKOFF), "{huge}");
        }
        assert_eq!(retry_after("Sun, 01 Mar 2026 12:00:05 GMT", now), secs(5));
        assert_eq!(retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now), secs(0), "a past date is no wait");
        assert_eq!(retry_after("Thu, 01 Jan 2099 00:00:00 GMT", now), Some(MAX_BACKOFF));
        for garbage in [
            "",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "-1",
            "-0.5",
            "NaN",
            "inf",
            "-inf",
            "soon",
            "Sun, 99 Foo 2026",
            "1e",
            "\u{0}",
            "+",
        ] {
            assert_eq!(retry_after(garbage, now), None, "{garbage:?}");
        }
    }
}
