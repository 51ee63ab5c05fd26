//! The one prompt renderer: what a PromptVersion means. The operator validates
//! PromptVersions with it and the worker renders prompts with it, so both agree.

use std::collections::{BTreeMap, BTreeSet};

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::prompt::PromptVersionSpec;

/// A chat message after rendering.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// system, user or assistant.
    pub role: String,
    /// The rendered content.
    pub content: String,
}

/// A rendered prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RenderedPrompt {
    /// From `messages`.
    Messages(Vec<ChatMessage>),
    /// From `template`.
    Text(String),
}

/// Why a prompt cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    /// A template does not parse.
    #[error("{location}: template syntax error: {detail}")]
    Syntax {
        /// Which template: `template` or `messages[i].content`.
        location: String,
        /// The parser's message.
        detail: String,
    },
    /// A template uses a variable that `variables` does not declare.
    #[error("{location}: uses variable {name:?}, which is not declared in variables")]
    UndeclaredVariable {
        /// Which template.
        location: String,
        /// The variable.
        name: String,
    },
    /// A required variable was not given.
    #[error("variable {name:?} is required (it has no default) but was not given")]
    MissingVariable {
        /// The variable.
        name: String,
    },
    /// A value was given for a variable the prompt does not declare.
    #[error("variable {name:?} is not declared by this prompt")]
    UnknownVariable {
        /// The variable.
        name: String,
    },
    /// Rendering failed (e.g. a filter got a value it cannot handle).
    #[error("{location}: {detail}")]
    Render {
        /// Which template.
        location: String,
        /// The renderer's message.
        detail: String,
    },
    /// Rendering needed more work or wrote more text than a prompt may.
    #[error("{location}: rendering stopped: {limit}")]
    Limit {
        /// Which template.
        location: String,
        /// Which limit was reached, with its value.
        limit: String,
    },
    /// An example of the PromptVersion does not render.
    #[error("example {example:?}: {source}")]
    Example {
        /// The example's name.
        example: String,
        /// What went wrong.
        source: Box<PromptError>,
    },
}

/// Work one render of one template may do, in minijinja fuel: about one unit per
/// instruction executed and per 64 bytes of data created, so it bounds both the time a
/// render takes (loops nested over large ranges run out) and the memory it allocates.
pub const RENDER_FUEL: u64 = 2_000_000;

/// Most bytes one rendered template may produce (4 MiB, beyond any model's context).
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// The Jinja environment every prompt is rendered in: undefined variables are errors, not
/// empty strings, a template keeps its trailing newline, and a render stops with an
/// error once it has used up [`RENDER_FUEL`].
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(RENDER_FUEL));
    let syntax = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env
}

/// The Jinja environment of the chat templates models ship, with the semantics they
/// are written for: blocks trimmed, undefined values lenient, Python string methods
/// (`.strip()`, `.startswith()`) and `raise_exception`.
pub fn chat_template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
    });
    // A model's template runs on every request, over the request's messages: bounded too,
    // with room for long conversations under real templates.
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env
}

/// Fuel of one chat-template render (see [`RENDER_FUEL`]): ten times a prompt's, since a
/// conversation of thousands of messages must still render.
pub const CHAT_TEMPLATE_FUEL: u64 = 10 * RENDER_FUEL;

/// One template of a prompt with where it sits in the spec.
struct Part<'a> {
    location: String,
    role: Option<&'a str>,
    source: &'a str,
}

fn parts(spec: &PromptVersionSpec) -> Vec<Part<'_>> {
    match (&spec.messages, &spec.template) {
        (Some(messages), _) => messages
            .iter()
            .enumerate()
            .map(|(i, m)| Part {
                location: format!("messages[{i}].content"),
                role: Some(m.role.as_str()),
                source: &m.content,
            })
            .collect(),
        (None, Some(template)) => {
            vec![Part { location: "template".to_string(), role: None, source: template }]
        }
        (None, None) => Vec::new(),
    }
}

fn syntax_error(location: &str, err: &minijinja::Error) -> PromptError {
    PromptError::Syntax { location: location.to_string(), detail: err.to_string() }
}

/// A writer that refuses to grow past [`MAX_RENDERED_BYTES`].
struct BoundedOutput {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders one template within the fuel and output limits; errors name `location`.
fn render_bounded(
    template: &minijinja::Template<'_, '_>,
    context: &BTreeMap<String, Value>,
    location: &str,
) -> Result<String, PromptError> {
    let mut out = BoundedOutput { text: Vec::new(), overflowed: false };
    match template.render_captured_to(context, &mut out) {
        Ok(_) => String::from_utf8(out.text)
            .map_err(|e| PromptError::Render { location: location.to_string(), detail: e.to_string() }),
        Err(_) if out.overflowed => Err(PromptError::Limit {
            location: location.to_string(),
            limit: format!("the output exceeds {MAX_RENDERED_BYTES} bytes"),
        }),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(PromptError::Limit {
            location: location.to_string(),
            limit: format!(
                "the template used up its rendering fuel ({RENDER_FUEL} units: about one per instruction and per 64 bytes of data); loops over large ranges cannot finish"
            ),
        }),
        Err(e) => Err(PromptError::Render { location: location.to_string(), detail: e.to_string() }),
    }
}

impl PromptVersionSpec {
    /// Checks that every template parses and uses only declared variables, and that every
    /// example renders. This is what makes a PromptVersion Ready.
    pub fn validate(&self) -> Result<(), PromptError> {
        let env = environment();
        let declared: BTreeSet<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
        for part in parts(self) {
            let template = env.template_from_str(part.source).map_err(|e| syntax_error(&part.location, &e))?;
            let mut used: Vec<String> = template.undeclared_variables(false).into_iter().collect();
            used.sort();
            if let Some(name) = used.into_iter().find(|n| !declared.contains(n.as_str())) {
                return Err(PromptError::UndeclaredVariable { location: part.location, name });
            }
        }
        for example in &self.examples {
            self.render(&example.variables)
                .map_err(|e| PromptError::Example { example: example.name.clone(), source: Box::new(e) })?;
        }
        Ok(())
    }

    /// Renders the prompt with the given variable values; declared defaults fill in
    /// the rest.
    pub fn render<V: Serialize>(&self, values: &BTreeMap<String, V>) -> Result<RenderedPrompt, PromptError> {
        let declared: BTreeSet<&str> = self.variables.iter().map(|v| v.name.as_str()).collect();
        if let Some(name) = values.keys().find(|k| !declared.contains(k.as_str())) {
            return Err(PromptError::UnknownVariable { name: name.clone() });
        }
        let mut context: BTreeMap<String, Value> = BTreeMap::new();
        for variable in &self.variables {
            let value = match (values.get(&variable.name), &variable.default) {
                (Some(v), _) => Value::from(minijinja::value::Serde(v)),
                (None, Some(default)) => Value::from(default.clone()),
                (None, None) => {
                    return Err(PromptError::MissingVariable { name: variable.name.clone() });
                }
            };
            context.insert(variable.name.clone(), value);
        }
        let env = environment();
        let mut messages = Vec::new();
        let mut text = None;
        for part in parts(self) {
            let template = env.template_from_str(part.source).map_err(|e| syntax_error(&part.location, &e))?;
            let rendered = render_bounded(&template, &context, &part.location)?;
            match part.role {
                Some(role) => messages.push(ChatMessage { role: role.to_string(), content: rendered }),
                None => text = Some(rendered),
            }
        }
        Ok(match text {
            Some(text) => RenderedPrompt::Text(text),
            None => RenderedPrompt::Messages(messages),
        })
    }

    /// What a ModelDeployment serving this prompt puts before each chat request: its
    /// system messages (a `template` prompt is one system message), rendered with the
    /// declared defaults. The other messages format samples for evaluations; serving
    /// leaves the conversation to the client. A variable a system message uses must have
    /// a default.
    pub fn served_messages(&self) -> Result<Vec<ChatMessage>, PromptError> {
        let env = environment();
        let mut context: BTreeMap<String, Value> = BTreeMap::new();
        let mut messages = Vec::new();
        for part in parts(self) {
            if part.role.is_some_and(|r| r != "system") {
                continue;
            }
            let template = env.template_from_str(part.source).map_err(|e| syntax_error(&part.location, &e))?;
            for name in template.undeclared_variables(false) {
                let default = self.variables.iter().find(|v| v.name == name).and_then(|v| v.default.clone());
                match default {
                    Some(d) => {
                        context.insert(name, Value::from(d));
                    }
                    None => return Err(PromptError::MissingVariable { name }),
                }
            }
            let content = render_bounded(&template, &context, &part.location)?;
            messages.push(ChatMessage { role: "system".into(), content });
        }
        Ok(messages)
    }

    /// sha256 of the prompt's content: the canonical JSON of the spec. Two PromptVersions
    /// with the same content have the same digest whatever their names.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(b"llmops.dev/PromptVersion/v1alpha1\n");
        hasher.update(&canonical);
        hex::encode(hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PromptVersionSpec {
        serde_yaml_ng::from_str(yaml).expect("valid spec")
    }

    const SUPPORT: &str = r#"
prompt: support
messages:
  - role: system
    content: "You answer in {{ language }}.{% if tone %} Be {{ tone }}.{% endif %}"
  - role: user
    content: "{{ question }}"
variables:
  - name: language
    default: English
  - name: tone
    default: ""
  - name: question
examples:
  - name: basic
    variables: {question: "Where is my order?"}
"#;

    #[test]
    fn serving_takes_the_system_messages_with_their_defaults() {
        let s = spec(SUPPORT);
        let served = s.served_messages().expect("servable: the user turn is the client's");
        assert_eq!(served, vec![ChatMessage { role: "system".into(), content: "You answer in English.".into() }]);
        let mut needs = s.clone();
        if let Some(m) = needs.messages.as_mut() {
            m[0].content = "You answer about {{ question }}".into();
        }
        assert_eq!(needs.served_messages(), Err(PromptError::MissingVariable { name: "question".into() }));
    }

    #[test]
    fn renders_messages_with_defaults_and_values() {
        let s = spec(SUPPORT);
        s.validate().expect("valid");
        let values =
            BTreeMap::from([("question".to_string(), "Hi?".to_string()), ("tone".to_string(), "brief".to_string())]);
        let rendered = s.render(&values).expect("renders");
        assert_eq!(
            rendered,
            RenderedPrompt::Messages(vec![
                ChatMessage { role: "system".into(), content: "You answer in English. Be brief.".into() },
                ChatMessage { role: "user".into(), content: "Hi?".into() },
            ])
        );
    }

    #[test]
    fn missing_required_variable_is_an_error() {
        let s = spec(SUPPORT);
        let err = s.render(&BTreeMap::<String, String>::new()).unwrap_err();
        assert_eq!(err, PromptError::MissingVariable { name: "question".into() });
    }

    #[test]
    fn unknown_variable_is_an_error() {
        let s = spec(SUPPORT);
        let values =
            BTreeMap::from([("question".to_string(), "x".to_string()), ("colour".to_string(), "red".to_string())]);
        assert_eq!(s.render(&values).unwrap_err(), PromptError::UnknownVariable { name: "colour".into() });
    }

    #[test]
    fn undeclared_variable_in_template_fails_validation() {
        let s = spec("prompt: p\ntemplate: 'Hello {{ name }} from {{ place }}'\nvariables: [{name: name}]\n");
        let err = s.validate().unwrap_err();
        assert_eq!(err, PromptError::UndeclaredVariable { location: "template".into(), name: "place".into() });
        assert!(err.to_string().contains("\"place\""), "{err}");
    }

    #[test]
    fn example_with_missing_variable_fails_validation() {
        let s = spec(
            "prompt: p\ntemplate: '{{ a }} {{ b }}'\nvariables: [{name: a}, {name: b}]\nexamples: [{name: half, variables: {a: x}}]\n",
        );
        let err = s.validate().unwrap_err();
        assert!(matches!(err, PromptError::Example { ref example, .. } if example == "half"), "{err}");
        assert!(err.to_string().contains("\"b\" is required"), "{err}");
    }

    #[test]
    fn syntax_error_names_the_template() {
        let s = spec("prompt: p\nmessages: [{role: user, content: '{% if x %}open'}]\nvariables: [{name: x}]\n");
        match s.validate().unwrap_err() {
            PromptError::Syntax { location, .. } => assert_eq!(location, "messages[0].content"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn loop_variables_are_not_undeclared() {
        let s = spec(
            "prompt: p\ntemplate: |-\n  {% for d in docs %}- {{ d }}\n  {% endfor %}\nvariables: [{name: docs}]\n",
        );
        s.validate().expect("loop variable d is bound by the loop");
        let values = BTreeMap::from([("docs".to_string(), serde_json::json!(["a", "b"]))]);
        assert_eq!(s.render(&values).expect("renders"), RenderedPrompt::Text("- a\n- b\n".into()));
    }

    #[test]
    fn nested_loops_run_out_of_fuel_instead_of_hanging() {
        // Three loops over a 1000-character default: 10^9 iterations without a bound.
        let nested =
            "{% for a in text %}{% for b in text %}{% for c in text %}{{ c }}{% endfor %}{% endfor %}{% endfor %}";
        let text = "x".repeat(1000);
        let s = spec(&format!(
            "prompt: p\ntemplate: '{nested}'\nvariables: [{{name: text, default: '{text}'}}]\nexamples: [{{name: e}}]\n"
        ));
        let started = std::time::Instant::now();
        let err = s.validate().unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
        match &err {
            PromptError::Example { source, .. } => {
                assert!(matches!(**source, PromptError::Limit { ref location, .. } if location == "template"), "{err}")
            }
            other => panic!("expected a limit error, got {other:?}"),
        }
        assert!(err.to_string().contains("rendering fuel"), "{err}");
        assert!(err.to_string().contains(&RENDER_FUEL.to_string()), "{err}");
        // Serving renders the system messages with the same limits.
        let served = spec(&format!(
            "prompt: p\nmessages: [{{role: system, content: '{nested}'}}]\nvariables: [{{name: text, default: '{text}'}}]\n"
        ));
        assert!(matches!(served.served_messages(), Err(PromptError::Limit { .. })));
    }

    #[test]
    fn huge_strings_are_refused_not_built() {
        let s = spec("prompt: p\ntemplate: \"{{ 'x' * 90000000 }}\"\n");
        let err = s.render(&BTreeMap::<String, String>::new()).unwrap_err();
        assert!(matches!(err, PromptError::Limit { .. } | PromptError::Render { .. }), "{err:?}");
    }

    #[test]
    fn output_is_bounded() {
        // Well within the fuel, but more text than a prompt may hold.
        let s =
            spec("prompt: p\ntemplate: '{% for i in range(80) %}{{ big }}{% endfor %}'\nvariables: [{name: big}]\n");
        let big = "y".repeat(64 << 10);
        let err = s.render(&BTreeMap::from([("big".to_string(), big.clone())])).unwrap_err();
        match &err {
            PromptError::Limit { limit, .. } => {
                assert!(limit.contains(&format!("exceeds {MAX_RENDERED_BYTES} bytes")), "{err}")
            }
            other => panic!("expected a limit error, got {other:?}"),
        }
        // An ordinary large prompt still renders.
        let ok = s.render(&BTreeMap::from([("big".to_string(), "y".repeat(1000))])).expect("renders");
        assert!(matches!(ok, RenderedPrompt::Text(ref t) if t.len() == 80_000));
    }

    #[test]
    fn digest_depends_on_content_only() {
        let a = spec(SUPPORT);
        let mut b = spec(SUPPORT);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest().len(), 64);
        b.variables[0].default = Some("French".into());
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn a_chat_template_with_nested_loops_runs_out_of_fuel() {
        let mut env = chat_template_environment();
        env.add_template(
            "chat",
            "{% for a in messages %}{% for b in messages %}{% for c in messages %}x{% endfor %}{% endfor %}{% endfor %}",
        )
        .expect("parses");
        let messages: Vec<_> = (0..400).map(|i| minijinja::context! { role => "user", content => i }).collect();
        let started = std::time::Instant::now();
        let err = env
            .get_template("chat")
            .and_then(|t| t.render(minijinja::context! { messages => messages }))
            .expect_err("out of fuel");
        assert_eq!(err.kind(), minijinja::ErrorKind::OutOfFuel, "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    }
}
