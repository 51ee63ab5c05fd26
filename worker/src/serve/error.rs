//! Errors in OpenAI's JSON shape. Every error has a stable snake_case `code`, used in
//! the body, in the `request_errors` metric and in logs; the HTTP status decides which
//! exception OpenAI's client libraries raise.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `model_not_found`.
    pub code: &'static str,
    /// What was wrong and what to do, for a person.
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), param: None }
    }

    /// The request body is not valid JSON or does not fit the request's shape.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    /// A parameter is missing, out of range or unsupported.
    pub fn invalid_parameter(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_parameter", message) }
    }

    /// No served model has this name.
    pub fn model_not_found(model: &str, served: &[String]) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model {model:?} does not exist here; served models: {}", served.join(", ")),
            )
        }
    }

    /// The model names an adapter trained for another base model.
    pub fn adapter_base_mismatch(model: &str, why: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "adapter_base_mismatch",
                format!("the adapter {model:?} cannot be served with this base model: {why}"),
            )
        }
    }

    /// The prompt does not leave room for a single generated token.
    pub fn context_length_exceeded(param: &str, prompt: usize, context: usize) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!("the prompt has {prompt} tokens but the model's context holds {context}; shorten the prompt"),
            )
        }
    }

    /// The prompt and the tokens asked for do not fit in the context together.
    pub fn max_tokens_beyond_context(prompt: usize, asked: i64, context: usize) -> Self {
        Self {
            param: Some("max_tokens".into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "the prompt has {prompt} tokens and max_tokens asks for {asked} more, but the model's context holds \
                     {context}; ask for at most {} tokens or shorten the prompt",
                    context.saturating_sub(prompt)
                ),
            )
        }
    }

    /// The body is declared as something other than JSON.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        let shown: String = content_type.chars().take(100).collect();
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the request body is declared as {shown:?}; send JSON with 'Content-Type: application/json'"),
        )
    }

    /// The body is larger than the server accepts.
    pub fn request_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than the {limit} bytes this server accepts"),
        )
    }

    /// No or a wrong API key.
    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or invalid API key; send it as 'Authorization: Bearer KEY'",
        )
    }

    /// The queue is full.
    pub fn queue_full() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            "the server is at capacity and its queue is full; retry after a short wait",
        )
    }

    /// A completion id that no traffic log holds.
    pub fn unknown_completion(id: &str) -> Self {
        Self {
            param: Some("id".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "unknown_completion_id",
                format!("no completion with id {id:?} was served here"),
            )
        }
    }

    /// The model is still loading.
    pub fn not_ready() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the model is still loading; retry shortly")
    }

    /// No such route.
    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no endpoint {path}"))
    }

    /// Something failed on the server's side.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// OpenAI's error `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
