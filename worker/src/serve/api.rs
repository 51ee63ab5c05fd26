//! The OpenAI request and response types, and turning a request into generation
//! settings. Ranges follow OpenAI's API reference; what this server cannot honour
//! (several choices, log-probabilities, presence or frequency penalties, tools) is
//! refused with a clear error rather than silently ignored.

use llmops_crds::render::ChatMessage;
use llmops_proto::v1::GenerationParameters;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::engine::SamplingParams;

/// Most messages in a chat request.
pub const MAX_MESSAGES: usize = 2048;
/// Most stop sequences, as OpenAI allows.
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes: each is looked for after every generated token.
pub const MAX_STOP_BYTES: usize = 256;

/// Text or a list of text parts, as chat message content may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `text` parts are understood.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    /// system, developer, user or assistant.
    pub role: String,
    /// Its content.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// Options of a streamed response.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// A served model: the base model's name or an adapter's.
    pub model: String,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, above 0 up to 1.
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (extension; 0: all).
    pub top_k: Option<i64>,
    /// Seed; the same seed and request give the same output.
    pub seed: Option<i64>,
    /// Stop sequences.
    pub stop: Option<Stop>,
    /// Choices to return; only 1.
    pub n: Option<i64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of a stream.
    pub stream_options: Option<StreamOptions>,
    /// Not supported unless 0.
    pub presence_penalty: Option<f64>,
    /// Not supported unless 0.
    pub frequency_penalty: Option<f64>,
    /// Penalise tokens already in the context, as llama.cpp does (extension; 1: off).
    pub repetition_penalty: Option<f64>,
    /// An end user's id, recorded in the traffic log.
    pub user: Option<String>,
    /// Not supported when non-empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<MessageIn>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Not supported when true.
    pub logprobs: Option<bool>,
    /// Not supported (it needs `logprobs`).
    pub top_logprobs: Option<i64>,
    /// Not supported when non-empty.
    pub tools: Option<Vec<Value>>,
    /// Only `{"type": "text"}` is supported.
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

/// The prompt of a completions request.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is supported).
    Texts(Vec<String>),
    /// A batch of token lists (only one is supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: PromptIn,
    /// Not supported when true.
    pub echo: Option<bool>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Not supported when set.
    pub logprobs: Option<i64>,
    /// Not supported above 1.
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub common: Common,
}

/// `POST /v1/feedback`.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedbackRequest {
    /// The id of the completion the feedback is about.
    pub id: String,
    /// 1 (bad) to 5 (good).
    pub rating: i64,
    /// A better answer, when the user gives one.
    pub correction: Option<String>,
    /// Free text.
    pub comment: Option<String>,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage of a prompt and an output.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Generation settings a request resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Most tokens to generate, when the request or the deployment set it.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// Resolves sampling settings: the request's fields over the deployment's defaults over
/// the engine's. `random_seed` seeds requests that give no seed.
pub fn settings(
    common: &Common,
    max_tokens: Option<i64>,
    defaults: Option<&GenerationParameters>,
    random_seed: u64,
) -> Result<Settings, ApiError> {
    let d = defaults.cloned().unwrap_or_default();
    if common.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid_parameter("logit_bias", "logit_bias is not supported"));
    }
    if let Some(user) = &common.user
        && user.len() > 256
    {
        return Err(ApiError::invalid_parameter("user", format!("user must be at most 256 bytes, got {}", user.len())));
    }
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::invalid_parameter("n", format!("n must be 1 (got {n}): this server returns one choice")));
    }
    for (name, value) in
        [("presence_penalty", common.presence_penalty), ("frequency_penalty", common.frequency_penalty)]
    {
        if let Some(v) = value.filter(|v| *v != 0.0) {
            return Err(ApiError::invalid_parameter(
                name,
                format!("{name} {v} is not supported; use repetition_penalty (1 is off) instead"),
            ));
        }
    }
    let temperature = common.temperature.or(d.temperature).unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_parameter(
            "temperature",
            format!("temperature must be 0 to 2, got {temperature}"),
        ));
    }
    let top_p = common.top_p.or(d.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_parameter("top_p", format!("top_p must be above 0 and at most 1, got {top_p}")));
    }
    let top_k = match common.top_k {
        Some(k) if k < 0 => {
            return Err(ApiError::invalid_parameter("top_k", format!("top_k must be 0 (off) or more, got {k}")));
        }
        Some(k) => k as usize,
        None => d.top_k.unwrap_or(0) as usize,
    };
    let repetition_penalty = common.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid_parameter(
            "repetition_penalty",
            format!("repetition_penalty must be above 0 and at most 10, got {repetition_penalty}"),
        ));
    }
    let max_tokens = match max_tokens.or(common.max_tokens) {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_parameter("max_tokens", format!("max_tokens must be at least 1, got {m}")));
        }
        Some(m) => Some(m as usize),
        None => d.max_tokens.map(|m| m as usize),
    };
    let stop = match &common.stop {
        None => d.stop.clone(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_parameter(
            "stop",
            format!("at most {MAX_STOP_SEQUENCES} stop sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_parameter("stop", "stop sequences must not be empty"));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_parameter(
            "stop",
            format!("a stop sequence may have at most {MAX_STOP_BYTES} bytes, got one of {}", long.len()),
        ));
    }
    let seed = match common.seed {
        Some(s) => s as u64,
        None => d.seed.unwrap_or(random_seed),
    };
    Ok(Settings {
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            repetition_penalty: repetition_penalty as f32,
            seed,
        },
        stop,
    })
}

/// The messages of a chat request as the chat template takes them.
pub fn chat_messages(messages: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_parameter("messages", "messages must not be empty"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid_parameter(
            "messages",
            format!("at most {MAX_MESSAGES} messages, got {}", messages.len()),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid_parameter(
                    &format!("messages[{i}].role"),
                    format!("role {other:?} is not supported; use system, developer, user or assistant"),
                ));
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid_parameter(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content part of type {kind:?} is not supported; only text parts are"),
                            ));
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role: role.to_string(), content });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: Value) -> Common {
        serde_json::from_value(json).expect("parses")
    }

    #[test]
    fn request_overrides_deployment_defaults() {
        let d = GenerationParameters { temperature: Some(0.2), max_tokens: Some(64), ..Default::default() };
        let s = settings(&common(serde_json::json!({"model": "m", "top_p": 0.5})), None, Some(&d), 7).expect("ok");
        assert_eq!(s.sampling.temperature, 0.2);
        assert_eq!(s.sampling.top_p, 0.5);
        assert_eq!(s.max_tokens, Some(64));
        assert_eq!(s.sampling.seed, 7);
        let s = settings(&common(serde_json::json!({"model": "m", "temperature": 0, "seed": 3})), Some(5), Some(&d), 7)
            .expect("ok");
        assert_eq!((s.sampling.temperature, s.max_tokens, s.sampling.seed), (0.0, Some(5), 3));
    }

    #[test]
    fn out_of_range_parameters_name_the_field() {
        for (body, param) in [
            (serde_json::json!({"model": "m", "temperature": 2.5}), "temperature"),
            (serde_json::json!({"model": "m", "top_p": 0}), "top_p"),
            (serde_json::json!({"model": "m", "max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"model": "m", "n": 2}), "n"),
            (serde_json::json!({"model": "m", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (serde_json::json!({"model": "m", "presence_penalty": 0.5}), "presence_penalty"),
            (serde_json::json!({"model": "m", "stop": ["x".repeat(MAX_STOP_BYTES + 1)]}), "stop"),
            (serde_json::json!({"model": "m", "stop": ""}), "stop"),
            (serde_json::json!({"model": "m", "logit_bias": {"42": 100}}), "logit_bias"),
            (serde_json::json!({"model": "m", "user": "u".repeat(300)}), "user"),
            (serde_json::json!({"model": "m", "top_k": -1}), "top_k"),
            (serde_json::json!({"model": "m", "repetition_penalty": 0}), "repetition_penalty"),
            (serde_json::json!({"model": "m", "max_tokens": -5}), "max_tokens"),
        ] {
            let err = settings(&common(body), None, None, 0).expect_err("refused");
            assert_eq!(err.param.as_deref(), Some(param));
            assert_eq!(err.code, "invalid_parameter");
        }
    }

    #[test]
    fn content_parts_join_and_unknown_roles_are_refused() {
        let m: Vec<MessageIn> = serde_json::from_value(serde_json::json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]))
        .expect("parses");
        let out = chat_messages(&m).expect("ok");
        assert_eq!(out[0].role, "system");
        assert_eq!(out[1].content, "ab");
        let bad: Vec<MessageIn> =
            serde_json::from_value(serde_json::json!([{"role": "tool", "content": "x"}])).expect("parses");
        assert_eq!(chat_messages(&bad).expect_err("refused").param.as_deref(), Some("messages[0].role"));
        let image: Vec<MessageIn> = serde_json::from_value(
            serde_json::json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        )
        .expect("parses");
        assert_eq!(chat_messages(&image).expect_err("refused").param.as_deref(), Some("messages[0].content[0]"));
        let many = vec![MessageIn { role: "user".into(), content: None }; MAX_MESSAGES + 1];
        assert_eq!(chat_messages(&many).expect_err("refused").param.as_deref(), Some("messages"));
        assert!(chat_messages(&many[..MAX_MESSAGES]).is_ok());
    }
}
