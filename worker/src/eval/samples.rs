//! Evaluation samples: rows of a prepared split turned into what is sent to the target
//! (chat messages or a plain prompt), what is expected back, and, for multiple-choice
//! rows, the choices and the right one. A PromptVersion, when given, formats every row
//! with the shared renderer.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use llmops_crds::prompt::{PromptMessage, PromptVariable, PromptVersionSpec, Role};
use llmops_crds::render::{ChatMessage, RenderedPrompt};
use llmops_proto::v1::Prompt;
use serde_json::{Map, Value};

use crate::prepare::record::{self, Record, Schema};
use crate::prepare::source::{self, Digests, Format};

/// What is sent to the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, sent through the chat template (`/v1/chat/completions`).
    Chat(Vec<ChatMessage>),
    /// A raw prompt (`/v1/completions`); empty for text records, scored whole.
    Text(String),
}

impl Input {
    /// Whether there is anything to send (text rows have nothing: they are scored whole).
    pub fn is_empty(&self) -> bool {
        matches!(self, Input::Text(t) if t.is_empty())
    }

    /// The input as one string, for results and judges.
    pub fn display(&self) -> String {
        match self {
            Input::Chat(messages) => {
                messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
            }
            Input::Text(text) => text.clone(),
        }
    }
}

/// A multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct Choices {
    /// The candidate continuations.
    pub options: Vec<String>,
    /// Index of the right one.
    pub answer: usize,
}

/// One evaluation sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Position of the row in the split (from 0, unreadable rows included).
    pub index: usize,
    /// What the target gets.
    pub input: Input,
    /// What it should answer, when the row says.
    pub expected: Option<String>,
    /// Choices of a multiple-choice row.
    pub choices: Option<Choices>,
}

/// Samples read from a split, and the rows that could not be used.
#[derive(Debug, Default)]
pub struct SampleSet {
    /// The usable samples, in split order.
    pub samples: Vec<Sample>,
    /// Rows that were skipped, with why (the first few).
    pub invalid: Vec<String>,
    /// How many rows were skipped.
    pub invalid_count: usize,
}

/// A PromptVersion as the shared renderer knows it.
pub fn prompt_spec(prompt: &Prompt) -> Result<PromptVersionSpec> {
    let role = |r: &str| match r {
        "system" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => bail!("prompt {}: role {other:?} is not system, user or assistant", prompt.name),
    };
    let messages = if prompt.messages.is_empty() {
        None
    } else {
        Some(
            prompt
                .messages
                .iter()
                .map(|m| Ok(PromptMessage { role: role(&m.role)?, content: m.content.clone() }))
                .collect::<Result<Vec<_>>>()?,
        )
    };
    let template = (!prompt.template.is_empty()).then(|| prompt.template.clone());
    if messages.is_some() == template.is_some() {
        bail!("prompt {}: exactly one of messages and template must be set", prompt.name);
    }
    let spec = PromptVersionSpec {
        prompt: if prompt.name.is_empty() { "prompt".into() } else { prompt.name.clone() },
        messages,
        template,
        variables: prompt
            .variables
            .iter()
            .map(|v| PromptVariable { name: v.name.clone(), default: v.default.clone(), description: None })
            .collect(),
        parameters: None,
        examples: Vec::new(),
    };
    spec.validate().with_context(|| format!("prompt {}", prompt.name))?;
    Ok(spec)
}

/// Most skipped rows whose reasons are kept.
const KEEP_INVALID: usize = 20;

/// Reads up to `limit` samples (0: all) from a split file (Parquet or JSONL), formatting
/// each with `prompt` when given.
pub fn read(path: &Path, limit: usize, prompt: Option<&PromptVersionSpec>) -> Result<SampleSet> {
    let format = Format::infer(path).with_context(|| format!("cannot tell the format of {}", path.display()))?;
    let mut set = SampleSet::default();
    for (index, row) in source::file_rows(path, format, &Digests::default())?.enumerate() {
        if limit > 0 && set.samples.len() >= limit {
            break;
        }
        match row.value.and_then(|v| sample(index, &v, prompt)) {
            Ok(s) => set.samples.push(s),
            Err(e) => {
                set.invalid_count += 1;
                if set.invalid.len() < KEEP_INVALID {
                    set.invalid.push(format!("{}:{}: {e}", row.origin, row.line));
                }
            }
        }
    }
    if set.samples.is_empty() {
        bail!(
            "{} holds no usable samples{}",
            path.display(),
            set.invalid.first().map(|e| format!(" (first error: {e})")).unwrap_or_default()
        );
    }
    Ok(set)
}

fn text_field(row: &Map<String, Value>, name: &str) -> Option<String> {
    match row.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The choices of a multiple-choice row: `choices` (a list of strings, or a JSON string
/// of one) and `answer` (the index of the right choice, or its text).
fn choices(row: &Map<String, Value>) -> Result<Option<Choices>, String> {
    let Some(raw) = row.get("choices") else { return Ok(None) };
    let parsed;
    let list = match raw {
        Value::Array(list) => list,
        Value::String(s) => {
            parsed =
                serde_json::from_str::<Value>(s).map_err(|e| format!("field \"choices\" is not a JSON list: {e}"))?;
            parsed.as_array().ok_or("field \"choices\" must be a list of strings")?
        }
        _ => return Err("field \"choices\" must be a list of strings".into()),
    };
    let options: Vec<String> = list
        .iter()
        .map(|v| v.as_str().map(String::from).ok_or("every choice must be a string".to_string()))
        .collect::<Result<_, _>>()?;
    if options.len() < 2 {
        return Err("a multiple-choice row needs at least two choices".into());
    }
    let answer = match row.get("answer") {
        Some(Value::Number(n)) => n.as_u64().map(|i| i as usize).ok_or("field \"answer\" must be a choice index")?,
        Some(Value::String(s)) => match s.parse::<usize>() {
            Ok(i) => i,
            Err(_) => options
                .iter()
                .position(|o| o.trim() == s.trim())
                .ok_or_else(|| format!("answer {s:?} is not one of the choices"))?,
        },
        _ => return Err("a row with choices needs an answer (an index or the right choice's text)".into()),
    };
    if answer >= options.len() {
        return Err(format!("answer {answer} is out of range for {} choices", options.len()));
    }
    Ok(Some(Choices { options, answer }))
}

fn sample(index: usize, row: &Map<String, Value>, prompt: Option<&PromptVersionSpec>) -> Result<Sample, String> {
    let choices = choices(row)?;
    // The row's own input and expected output, by the schema its fields say it has.
    let (input, mut expected) = if row.contains_key("messages") {
        let Record::Chat { mut messages } = record::from_row(row, Schema::Chat, None)? else {
            unreachable!("chat rows map to chat records")
        };
        let expected = match messages.last() {
            Some(m) if m.role == "assistant" && messages.len() > 1 => messages.pop().map(|m| m.content),
            _ => None,
        };
        (Input::Chat(messages), expected)
    } else if row.contains_key("prompt") {
        let prompt = text_field(row, "prompt").ok_or("field \"prompt\" must be a string")?;
        (Input::Text(prompt), text_field(row, "completion"))
    } else if row.contains_key("text") {
        let text = text_field(row, "text").ok_or("field \"text\" must be a string")?;
        (Input::Text(String::new()), Some(text))
    } else if prompt.is_some() {
        (Input::Text(String::new()), None)
    } else {
        return Err("a sample needs messages, prompt or text (or a prompt to format its fields)".into());
    };
    if expected.is_none() {
        expected = ["expected", "answer", "reference"].iter().find_map(|f| text_field(row, f));
        if choices.is_some() {
            expected = None;
        }
    }
    let input = match prompt {
        Some(spec) => format(spec, row, &input)?,
        None => input,
    };
    Ok(Sample { index, input, expected, choices })
}

/// Renders `spec` with the row's fields as variables. `input` (and `prompt`, when the row
/// has no such field) stand for the row's own input: a completion prompt, or a chat's
/// last user turn.
fn format(spec: &PromptVersionSpec, row: &Map<String, Value>, own: &Input) -> Result<Input, String> {
    let own_text = match own {
        Input::Text(t) => t.clone(),
        Input::Chat(messages) => {
            messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone()).unwrap_or_default()
        }
    };
    let mut values: BTreeMap<String, Value> = BTreeMap::new();
    for variable in &spec.variables {
        let name = variable.name.as_str();
        let value = match row.get(name) {
            Some(v) if !v.is_null() && name != "messages" => Some(v.clone()),
            _ if name == "input" || name == "prompt" => Some(Value::String(own_text.clone())),
            _ => None,
        };
        if let Some(v) = value {
            values.insert(name.to_string(), v);
        }
    }
    match spec.render(&values).map_err(|e| format!("formatting with the prompt: {e}"))? {
        // A prompt without a user turn (a deployment's system prompt) sets the scene; the
        // sample's own turns follow it, as they follow it when the deployment serves.
        RenderedPrompt::Messages(mut messages) if !messages.iter().any(|m| m.role == "user") => {
            match own {
                Input::Chat(turns) => messages.extend(turns.iter().filter(|m| m.role != "system").cloned()),
                Input::Text(text) => messages.push(ChatMessage { role: "user".into(), content: text.clone() }),
            }
            Ok(Input::Chat(messages))
        }
        RenderedPrompt::Messages(messages) => Ok(Input::Chat(messages)),
        RenderedPrompt::Text(text) => Ok(Input::Text(text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn each_schema_gives_input_and_expected() {
        let s = sample(
            0,
            &row(json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})),
            None,
        )
        .expect("chat");
        assert_eq!(s.input, Input::Chat(vec![ChatMessage { role: "user".into(), content: "hi".into() }]));
        assert_eq!(s.expected.as_deref(), Some("hello"));
        let s = sample(1, &row(json!({"prompt": "2+2=", "completion": "4"})), None).expect("completion");
        assert_eq!((s.input, s.expected.as_deref()), (Input::Text("2+2=".into()), Some("4")));
        let s = sample(2, &row(json!({"text": "a b c"})), None).expect("text");
        assert_eq!((s.input, s.expected.as_deref()), (Input::Text(String::new()), Some("a b c")));
    }

    #[test]
    fn multiple_choice_rows_take_an_index_or_the_text() {
        let s = sample(0, &row(json!({"prompt": "Sky is", "choices": [" blue", " green"], "answer": 0})), None)
            .expect("index");
        assert_eq!(s.choices, Some(Choices { options: vec![" blue".into(), " green".into()], answer: 0 }));
        let s = sample(0, &row(json!({"prompt": "x", "choices": "[\"a\", \"b\"]", "answer": "b"})), None)
            .expect("text answer");
        assert_eq!(s.choices.map(|c| c.answer), Some(1));
        let err = sample(0, &row(json!({"prompt": "x", "choices": ["a", "b"], "answer": 2})), None).expect_err("range");
        assert!(err.contains("out of range"), "{err}");
        let err = sample(0, &row(json!({"prompt": "x", "choices": ["a", "b"]})), None).expect_err("no answer");
        assert!(err.contains("needs an answer"), "{err}");
    }

    #[test]
    fn a_prompt_formats_rows_with_their_fields() {
        let prompt = Prompt {
            name: "qa".into(),
            messages: vec![
                llmops_proto::v1::ChatMessage { role: "system".into(), content: "Answer in {{ language }}.".into() },
                llmops_proto::v1::ChatMessage { role: "user".into(), content: "{{ prompt }}".into() },
            ],
            variables: vec![
                llmops_proto::v1::PromptVariable { name: "language".into(), default: Some("English".into()) },
                llmops_proto::v1::PromptVariable { name: "prompt".into(), default: None },
            ],
            ..Default::default()
        };
        let spec = prompt_spec(&prompt).expect("valid prompt");
        let s = sample(
            0,
            &row(json!({"prompt": "Capital of France?", "completion": "Paris", "language": "French"})),
            Some(&spec),
        )
        .expect("formats");
        assert_eq!(
            s.input,
            Input::Chat(vec![
                ChatMessage { role: "system".into(), content: "Answer in French.".into() },
                ChatMessage { role: "user".into(), content: "Capital of France?".into() },
            ])
        );
        assert_eq!(s.expected.as_deref(), Some("Paris"));
        let bad = Prompt { template: "{{ missing }}".into(), ..Default::default() };
        assert!(prompt_spec(&bad).is_err(), "an undeclared variable is refused");
    }

    #[test]
    fn a_system_only_prompt_keeps_the_samples_own_turn() {
        let prompt = Prompt {
            name: "system".into(),
            messages: vec![llmops_proto::v1::ChatMessage { role: "system".into(), content: "Be brief.".into() }],
            ..Default::default()
        };
        let spec = prompt_spec(&prompt).expect("valid prompt");
        let s = sample(0, &row(json!({"prompt": "Capital of France?", "completion": "Paris"})), Some(&spec))
            .expect("formats");
        assert_eq!(
            s.input,
            Input::Chat(vec![
                ChatMessage { role: "system".into(), content: "Be brief.".into() },
                ChatMessage { role: "user".into(), content: "Capital of France?".into() },
            ])
        );
    }
}
