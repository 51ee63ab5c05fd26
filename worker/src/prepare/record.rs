//! Records in the three output schemas, and mapping source rows (JSON objects) onto them.

use llmops_crds::render::ChatMessage;
use llmops_proto::v1::FieldMapping;
use serde::Serialize;
use serde_json::{Map, Value};

/// Shape of the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `messages`.
    Chat,
    /// `prompt` and `completion`.
    Completion,
    /// `text`.
    Text,
}

impl Schema {
    /// From the Assignment's name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "chat" => Some(Self::Chat),
            "completion" => Some(Self::Completion),
            "text" => Some(Self::Text),
            _ => None,
        }
    }
}

/// One record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Record {
    /// A conversation.
    Chat {
        /// Its messages.
        messages: Vec<ChatMessage>,
    },
    /// A prompt and its completion.
    Completion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
}

impl Record {
    /// Every string of the record, for transforms that change text.
    pub fn texts_mut(&mut self) -> Vec<&mut String> {
        match self {
            Record::Chat { messages } => messages.iter_mut().map(|m| &mut m.content).collect(),
            Record::Completion { prompt, completion } => vec![prompt, completion],
            Record::Text { text } => vec![text],
        }
    }

    /// All of the record's text in one string (contents joined by newlines): what
    /// filters, deduplication and token counts look at.
    pub fn content(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Record::Chat { messages } => {
                messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n").into()
            }
            Record::Completion { prompt, completion } => format!("{prompt}\n{completion}").into(),
            Record::Text { text } => text.as_str().into(),
        }
    }
}

fn field<'a>(mapping: Option<&'a FieldMapping>, pick: fn(&FieldMapping) -> &String, default: &'a str) -> &'a str {
    mapping.map(pick).filter(|f| !f.is_empty()).map(String::as_str).unwrap_or(default)
}

fn string_field(row: &Map<String, Value>, name: &str) -> Result<String, String> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(Value::Null) | None => Err(format!("field {name:?} is missing")),
        Some(other) => Err(format!("field {name:?} must be a string, not {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Maps a source row onto `schema`, with field names from `mapping` (the schema's own
/// names by default); says what is wrong with a row that does not fit.
pub fn from_row(row: &Map<String, Value>, schema: Schema, mapping: Option<&FieldMapping>) -> Result<Record, String> {
    match schema {
        Schema::Text => Ok(Record::Text { text: string_field(row, field(mapping, |m| &m.text, "text"))? }),
        Schema::Completion => Ok(Record::Completion {
            prompt: string_field(row, field(mapping, |m| &m.prompt, "prompt"))?,
            completion: string_field(row, field(mapping, |m| &m.completion, "completion"))?,
        }),
        Schema::Chat => {
            let name = field(mapping, |m| &m.messages, "messages");
            let parsed;
            let list = match row.get(name) {
                Some(Value::Array(list)) => list,
                // Some tools store the conversation as a JSON string (CSV columns, for one).
                Some(Value::String(s)) => {
                    parsed = serde_json::from_str::<Value>(s)
                        .map_err(|e| format!("field {name:?} is not a JSON list: {e}"))?;
                    match &parsed {
                        Value::Array(list) => list,
                        other => return Err(format!("field {name:?} must be a list of messages, not {}", kind(other))),
                    }
                }
                Some(other) => return Err(format!("field {name:?} must be a list of messages, not {}", kind(other))),
                None => return Err(format!("field {name:?} is missing")),
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let Value::Object(m) = m else {
                    return Err(format!("{name}[{i}] must be an object with role and content"));
                };
                let role = string_field(m, "role").map_err(|e| format!("{name}[{i}]: {e}"))?;
                if !matches!(role.as_str(), "system" | "user" | "assistant") {
                    return Err(format!("{name}[{i}]: role {role:?} is not system, user or assistant"));
                }
                let content = string_field(m, "content").map_err(|e| format!("{name}[{i}]: {e}"))?;
                messages.push(ChatMessage { role, content });
            }
            if messages.is_empty() {
                return Err(format!("field {name:?} holds no messages"));
            }
            let mut record = Record::Chat { messages };
            prepend_system(&mut record, row, mapping)?;
            Ok(record)
        }
    }
}

/// Puts the mapping's `system` field, when the row has one, first in the conversation.
fn prepend_system(record: &mut Record, row: &Map<String, Value>, mapping: Option<&FieldMapping>) -> Result<(), String> {
    let Some(name) = mapping.map(|m| m.system.as_str()).filter(|s| !s.is_empty()) else { return Ok(()) };
    let Record::Chat { messages } = record else { return Ok(()) };
    if messages.first().is_some_and(|m| m.role == "system") || !row.contains_key(name) {
        return Ok(());
    }
    let content = string_field(row, name)?;
    messages.insert(0, ChatMessage { role: "system".into(), content });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn maps_each_schema_with_renamed_fields() {
        let mapping = FieldMapping { messages: "conv".into(), system: "sys".into(), ..Default::default() };
        let r = from_row(
            &row(json!({"conv": [{"role": "user", "content": "hi"}], "sys": "be kind"})),
            Schema::Chat,
            Some(&mapping),
        )
        .expect("maps");
        assert_eq!(r.content(), "be kind\nhi");
        let r = from_row(&row(json!({"prompt": "2+2", "completion": 4})), Schema::Completion, None).expect("maps");
        assert_eq!(r, Record::Completion { prompt: "2+2".into(), completion: "4".into() });
        let m = FieldMapping { text: "body".into(), ..Default::default() };
        assert!(from_row(&row(json!({"body": "x"})), Schema::Text, Some(&m)).is_ok());
    }

    #[test]
    fn rows_that_do_not_fit_say_why() {
        let err = from_row(&row(json!({"txt": "x"})), Schema::Text, None).expect_err("missing");
        assert!(err.contains("\"text\" is missing"), "{err}");
        let err = from_row(&row(json!({"messages": [{"role": "robot", "content": "x"}]})), Schema::Chat, None)
            .expect_err("bad role");
        assert!(err.contains("messages[0]: role \"robot\""), "{err}");
        let err = from_row(&row(json!({"messages": "not json"})), Schema::Chat, None).expect_err("bad json");
        assert!(err.contains("not a JSON list"), "{err}");
    }
}
