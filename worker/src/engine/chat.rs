//! Turning chat messages into a prompt with the model's own chat template.

use anyhow::{Context, Result, bail};
use llmops_crds::render::{ChatMessage, chat_template_environment};

use super::LoadedModel;

/// Renders `messages` with a model's chat template; `add_generation_prompt` opens the
/// assistant's turn.
pub fn render_chat(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let Some(template) = template else {
        bail!("the model has no chat template; use the completions API with a full prompt instead");
    };
    let env = chat_template_environment();
    let compiled = env.template_from_str(template).context("the model's chat template does not parse")?;
    compiled
        .render(minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .context("rendering the chat template")
}

/// Renders `messages` with `model`'s own chat template and its BOS/EOS token texts.
pub fn render_for(model: &LoadedModel, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
    let tokenizer = &model.tokenizer;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.decode(&[i], false).ok()).unwrap_or_default();
    render_chat(
        model.chat_template.as_deref(),
        messages,
        add_generation_prompt,
        &token_text(tokenizer.bos),
        &token_text(tokenizer.eos.first().copied()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: text.into() }
    }

    #[test]
    fn renders_chatml_with_default_system_prompt() {
        let out = render_chat(Some(CHATML), &[user("Hi ")], true, "", "").expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }}";
        assert_eq!(render_chat(Some(t), &[user("  ok ")], false, "", "").expect("renders"), "OK");
        let system = ChatMessage { role: "system".into(), content: "x".into() };
        let err = render_chat(Some(t), &[system], false, "", "").expect_err("raises");
        assert!(format!("{err:#}").contains("first must be user"), "{err:#}");
    }

    #[test]
    fn no_template_is_a_clear_error() {
        let err = render_chat(None, &[user("x")], true, "", "").expect_err("no template");
        assert!(err.to_string().contains("no chat template"));
    }
}
