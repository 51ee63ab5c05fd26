//! The OpenAI request bodies the server accepts: any bytes are parsed as a chat,
//! completions and feedback request the way the server's handlers parse them (JSON,
//! field path on error), and what parses is resolved to generation settings, chat
//! messages and a rendered ChatML prompt. Nothing may panic; a request either resolves
//! or is a 4xx error naming a parameter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmops_proto::v1::GenerationParameters;
use llmops_worker::engine::chat::render_chat;
use llmops_worker::serve::api::{self, ChatRequest, CompletionRequest, FeedbackRequest};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn parse<T: serde::de::DeserializeOwned>(data: &[u8]) -> Option<T> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let value = serde_path_to_error::deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(value)
}

fn check_settings(result: Result<api::Settings, llmops_worker::serve::error::ApiError>) {
    match result {
        Ok(s) => {
            assert!((0.0..=2.0).contains(&s.sampling.temperature));
            assert!(s.sampling.top_p > 0.0 && s.sampling.top_p <= 1.0);
            assert!(s.stop.len() <= 4 && s.stop.iter().all(|s| !s.is_empty()));
            assert!(s.max_tokens.is_none_or(|m| m >= 1));
        }
        Err(e) => assert!(e.status.is_client_error() && !e.code.is_empty(), "{e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let defaults = GenerationParameters { temperature: Some(0.7), max_tokens: Some(64), ..Default::default() };
    if let Some(req) = parse::<ChatRequest>(data) {
        check_settings(api::settings(&req.common, req.max_completion_tokens, Some(&defaults), 1));
        check_settings(api::settings(&req.common, req.max_completion_tokens, None, 1));
        if let Ok(messages) = api::chat_messages(&req.messages) {
            assert_eq!(messages.len(), req.messages.len());
            let prompt = render_chat(Some(CHATML), &messages, true, "", "").expect("ChatML renders any messages");
            assert!(prompt.ends_with("<|im_start|>assistant\n"));
        }
    }
    if let Some(req) = parse::<CompletionRequest>(data) {
        check_settings(api::settings(&req.common, None, Some(&defaults), 1));
    }
    let _ = parse::<FeedbackRequest>(data);
});
