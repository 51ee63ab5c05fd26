//! PromptVersion: an immutable, content-hashed prompt template.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, GenerationParameters, nonblank_rules};

/// One immutable version of a prompt: chat messages or a single template in Jinja syntax,
/// its declared variables and default generation parameters. Deployments and
/// evaluations pin a PromptVersion by name and record its digest.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmops.dev",
    version = "v1alpha1",
    kind = "PromptVersion",
    namespaced,
    status = "PromptVersionStatus",
    shortname = "pver",
    shortname = "prompt",
    category = "llmops",
    doc = "PromptVersion is one immutable, content-hashed version of a prompt template.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Prompt", type_ = "string", json_path = ".spec.prompt"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", priority = 1),
    printcolumn(
        name = "Digest",
        type_ = "string",
        json_path = ".status.digest",
        description = "sha256 of the prompt's content"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "a PromptVersion is immutable: create a new PromptVersion instead of changing this one"},
    {"rule": "has(self.messages) != has(self.template)", "message": "exactly one of messages or template must be set"},
    {"rule": "!has(self.examples) || self.examples.all(e, !has(e.variables) || e.variables.all(k, has(self.variables) && self.variables.exists(v, v.name == k)))", "message": "an example sets a variable that variables does not declare", "fieldPath": ".examples", "reason": "FieldValueInvalid"}
]))]
pub struct PromptVersionSpec {
    /// Name of the prompt family this version belongs to, e.g. support-answer.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub prompt: String,
    /// Chat messages; each content is a Jinja template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub messages: Option<Vec<PromptMessage>>,
    /// A single Jinja template rendered to plain text (completion-style prompts); not
    /// empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536), extend("x-kubernetes-validations" = nonblank_rules()))]
    pub template: Option<String>,
    /// Variables the templates use. A template that uses an undeclared variable, or an
    /// example that misses a required one, makes the PromptVersion not Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub variables: Vec<PromptVariable>,
    /// Default generation parameters of requests that use this prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<GenerationParameters>,
    /// Example variable values, rendered when the PromptVersion is reconciled to prove the
    /// templates work. An example may set only declared variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub examples: Vec<PromptExample>,
}

/// Role of a chat message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions to the model.
    System,
    /// What the user says.
    User,
    /// What the model said.
    Assistant,
}

impl Role {
    /// The role as it appears in chat messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message of a prompt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptMessage {
    /// Who speaks.
    pub role: Role,
    /// Content of the message, a Jinja template, e.g. "Answer in {{ language }}."; not
    /// empty.
    #[schemars(length(min = 1, max = 65536), extend("x-kubernetes-validations" = nonblank_rules()))]
    pub content: String,
}

/// A variable a prompt's templates use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptVariable {
    /// Name as used in the templates.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub name: String,
    /// What the variable holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Value used when a caller gives none. A variable without a default is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub default: Option<String>,
}

/// Example values for the variables.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptExample {
    /// Name of the example.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Value of each variable.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 65536}))]
    pub variables: BTreeMap<String, String>,
}

/// Observed state of a PromptVersion.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromptVersionStatus {
    /// observedGeneration, conditions (Ready) and phase.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// sha256 of the prompt's content (messages or template, variables and parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Name of the ConfigMap holding the rendered template for pods that use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Number of examples that rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_rendered: Option<i32>,
}
