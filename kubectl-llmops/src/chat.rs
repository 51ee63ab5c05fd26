//! `chat`: a conversation with a ModelDeployment through its OpenAI-compatible endpoint,
//! to check by hand (or from a script) that what it serves answers.

use std::time::Duration;

use llmops_crds::ModelDeployment;
use llmops_crds::condition_types::READY;
use serde_json::{Value, json};

use crate::objects::condition;

/// Why a chat could not start or a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The deployment does not exist.
    #[error("ModelDeployment {name} not found in namespace {namespace}")]
    NotFound {
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// The deployment does not serve (yet, or any more).
    #[error("ModelDeployment {name} is not Ready{}", why(.reason, .message))]
    NotReady {
        /// Its name.
        name: String,
        /// The Ready condition's reason ("" before the operator saw it).
        reason: String,
        /// The Ready condition's message.
        message: String,
    },
    /// Ready, but the status gives no address (an operator older than the field).
    #[error("ModelDeployment {name} is Ready but its status has no endpoint; pass --endpoint URL")]
    NoEndpoint {
        /// Its name.
        name: String,
    },
    /// The endpoint answered with an error status.
    #[error("{url} answered HTTP {status}{}: {message}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Http {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error's stable code (`model_not_found`, `invalid_api_key`, …).
        code: Option<String>,
        /// The error's message.
        message: String,
    },
    /// The request did not get an answer.
    #[error("cannot reach {url}: {}{hint}", error_chain(.cause))]
    Unreachable {
        /// The URL asked.
        url: String,
        /// What went wrong (in the message, not as a source: the hint comes last).
        cause: reqwest::Error,
        /// What to try, for an address only the cluster can reach.
        hint: String,
    },
    /// A 2xx answer that is not a chat completion.
    #[error("{url} answered something that is not a chat completion: {body}")]
    Malformed {
        /// The URL asked.
        url: String,
        /// The start of the body.
        body: String,
    },
}

fn why(reason: &str, message: &str) -> String {
    match (reason.is_empty(), message.is_empty()) {
        (true, _) => ": the operator has not reconciled it yet".to_string(),
        (false, true) => format!(" ({reason})"),
        (false, false) => format!(" ({reason}): {message}"),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The base URL (up to `/v1`) to chat with: the deployment must be Ready, and its
/// status names the address (`status.endpoint`).
pub fn endpoint(md: &ModelDeployment) -> Result<String, ChatError> {
    let name = kube::ResourceExt::name_any(md);
    let status = md.status.clone().unwrap_or_default();
    match condition(&status.common.conditions, READY) {
        Some(c) if c.status == "True" => {}
        Some(c) => return Err(ChatError::NotReady { name, reason: c.reason.clone(), message: c.message.clone() }),
        None => return Err(ChatError::NotReady { name, reason: String::new(), message: String::new() }),
    }
    status.endpoint.filter(|e| !e.is_empty()).ok_or(ChatError::NoEndpoint { name })
}

/// What to send each turn.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The served model name: the deployment's name for the base model, an adapter's name.
    pub model: String,
    /// `max_tokens` of each request.
    pub max_tokens: Option<u32>,
    /// `temperature` of each request; the deployment's prompt decides when None.
    pub temperature: Option<f64>,
    /// `Authorization: Bearer` key.
    pub api_key: Option<String>,
    /// How long one answer may take.
    pub timeout: Duration,
}

/// The body of one chat completion request.
pub fn request_body(settings: &Settings, messages: &[Value]) -> Value {
    let mut body = json!({"model": settings.model, "messages": messages});
    if let Some(n) = settings.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if let Some(t) = settings.temperature {
        body["temperature"] = json!(t);
    }
    body
}

/// The code and message of an error answer (OpenAI's `{"error": {"message", "code"}}`
/// shape), or the body's start when it has another shape.
pub fn error_of(body: &str) -> (Option<String>, String) {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let e = &v["error"];
        if let Some(message) = e["message"].as_str().or_else(|| e.as_str()) {
            let code = e["code"].as_str().or_else(|| e["type"].as_str()).map(String::from);
            return (code, message.to_string());
        }
    }
    let text = body.trim();
    (None, if text.is_empty() { "(empty body)".to_string() } else { crate::style::one_line(text, false, 300) })
}

/// The assistant's answer in a chat completion.
pub fn reply_of(body: &Value) -> Option<String> {
    body["choices"][0]["message"]["content"].as_str().map(String::from)
}

/// A conversation: every turn is sent with the ones before it.
#[derive(Debug)]
pub struct Conversation {
    http: reqwest::Client,
    url: String,
    settings: Settings,
    messages: Vec<Value>,
}

impl Conversation {
    /// A conversation with the API at `base` (up to `/v1`).
    pub fn new(base: &str, settings: Settings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(settings.timeout).build()?;
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        Ok(Conversation { http, url, settings, messages: Vec::new() })
    }

    /// Sends `text` as the user's next message and returns the answer, which becomes
    /// part of the conversation. A failed turn leaves the conversation as it was.
    pub async fn say(&mut self, text: &str) -> Result<String, ChatError> {
        let mut messages = self.messages.clone();
        messages.push(json!({"role": "user", "content": text}));
        let mut request = self.http.post(&self.url).json(&request_body(&self.settings, &messages));
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let unreachable = |cause: reqwest::Error| ChatError::Unreachable {
            url: self.url.clone(),
            cause,
            hint: cluster_only_hint(&self.url),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.text().await.map_err(unreachable)?;
        if !status.is_success() {
            let (code, message) = error_of(&body);
            return Err(ChatError::Http { url: self.url.clone(), status: status.as_u16(), code, message });
        }
        let reply = serde_json::from_str::<Value>(&body).ok().as_ref().and_then(reply_of).ok_or_else(|| {
            ChatError::Malformed { url: self.url.clone(), body: crate::style::one_line(&body, false, 300) }
        })?;
        messages.push(json!({"role": "assistant", "content": reply}));
        self.messages = messages;
        Ok(reply)
    }
}

/// For a Service address that only resolves inside the cluster: how to reach it from here.
fn cluster_only_hint(url: &str) -> String {
    let host = url.split("://").nth(1).and_then(|rest| rest.split(['/', ':']).next()).unwrap_or_default();
    if host.ends_with(".svc") || host.ends_with(".svc.cluster.local") {
        let service = host.split('.').next().unwrap_or(host);
        format!(
            "\n{host} is an address inside the cluster; from outside it, forward a port \
             (kubectl port-forward svc/{service} 8000:8000) and pass --endpoint http://127.0.0.1:8000/v1"
        )
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(status: Value) -> ModelDeployment {
        serde_json::from_value(json!({
            "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "assistant", "namespace": "default"},
            "spec": {"model": {"uri": "store://m.gguf"}},
            "status": status,
        }))
        .unwrap()
    }

    fn ready(status: &str, reason: &str, message: &str) -> Value {
        json!({"type": "Ready", "status": status, "reason": reason, "message": message,
               "lastTransitionTime": "2026-01-01T00:00:00Z"})
    }

    #[test]
    fn only_a_ready_deployment_with_an_endpoint_is_chatted_with() {
        let ok = md(json!({"conditions": [ready("True", "Serving", "")], "endpoint": "http://127.0.0.2:8000/v1"}));
        assert_eq!(endpoint(&ok).unwrap(), "http://127.0.0.2:8000/v1");
        let waiting = md(json!({"conditions": [ready("False", "Evaluating", "the gate runs")]}));
        assert_eq!(
            endpoint(&waiting).unwrap_err().to_string(),
            "ModelDeployment assistant is not Ready (Evaluating): the gate runs"
        );
        assert_eq!(
            endpoint(&md(json!({}))).unwrap_err().to_string(),
            "ModelDeployment assistant is not Ready: the operator has not reconciled it yet"
        );
        let no_address = md(json!({"conditions": [ready("True", "Serving", "")]}));
        assert!(matches!(endpoint(&no_address), Err(ChatError::NoEndpoint { .. })));
    }

    #[test]
    fn requests_carry_only_the_settings_given() {
        let mut s = Settings {
            model: "acme-facts".into(),
            max_tokens: Some(32),
            temperature: None,
            api_key: None,
            timeout: Duration::from_secs(1),
        };
        let messages = [json!({"role": "user", "content": "Hi"})];
        assert_eq!(request_body(&s, &messages), json!({"model": "acme-facts", "messages": messages, "max_tokens": 32}));
        s.temperature = Some(0.0);
        assert_eq!(request_body(&s, &messages)["temperature"], json!(0.0));
    }

    #[test]
    fn error_answers_are_read_in_openai_shape_or_as_text() {
        let body = r#"{"error": {"message": "no served model is called x; served: assistant", "type": "model_not_found", "param": "model", "code": "model_not_found"}}"#;
        assert_eq!(
            error_of(body),
            (Some("model_not_found".into()), "no served model is called x; served: assistant".into())
        );
        assert_eq!(error_of("upstream connect error\n"), (None, "upstream connect error".into()));
        assert_eq!(error_of(""), (None, "(empty body)".into()));
        let e =
            ChatError::Http { url: "u".into(), status: 401, code: Some("invalid_api_key".into()), message: "m".into() };
        assert_eq!(e.to_string(), "u answered HTTP 401 (invalid_api_key): m");
    }

    #[test]
    fn a_cluster_address_gets_a_port_forward_hint() {
        assert!(cluster_only_hint("http://acme.default.svc:8000/v1/chat/completions").contains("svc/acme 8000:8000"));
        assert_eq!(cluster_only_hint("http://127.0.0.2:8000/v1/chat/completions"), "");
    }

    #[test]
    fn the_reply_is_the_first_choice() {
        let body = json!({"choices": [{"message": {"role": "assistant", "content": "Bolt."}}]});
        assert_eq!(reply_of(&body).as_deref(), Some("Bolt."));
        assert_eq!(reply_of(&json!({})), None);
    }
}
