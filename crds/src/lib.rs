//! The llmops custom resources (group `llmops.dev`, version `v1alpha1`) as Rust types, and
//! the prompt renderer that defines what a PromptVersion means. No client or runtime code:
//! the operator, the worker and the tests all build on these types.
#![forbid(unsafe_code)]
// Several `printcolumn(...)` entries repeat `type_ = "string"`, which clippy mistakes for
// a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod dataset;
pub mod deployment;
pub mod evalrun;
pub mod finetune;
pub mod prompt;
pub mod render;

pub use common::*;
pub use dataset::{Dataset, DatasetSpec, DatasetStatus};
pub use deployment::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
pub use evalrun::{EvalRun, EvalRunSpec, EvalRunStatus};
pub use finetune::{FineTuneJob, FineTuneJobSpec, FineTuneJobStatus};
pub use prompt::{PromptVersion, PromptVersionSpec, PromptVersionStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every llmops kind.
pub const GROUP: &str = "llmops.dev";
/// API version of every llmops kind.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions of all five kinds, in dependency order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Dataset::crd(), FineTuneJob::crd(), PromptVersion::crd(), ModelDeployment::crd(), EvalRun::crd()]
        .into_iter()
        .map(unwrap_descriptions)
        .map(add_root_rules)
        .map(bound_status_integers)
        .collect()
}

/// CEL rules of a kind that read `metadata.name`, which only the schema's root can see:
/// names that must become DNS labels of owned objects, and objects that name themselves.
fn root_rules(kind: &str) -> serde_json::Value {
    match kind {
        "ModelDeployment" => serde_json::json!([{
            "rule": format!("self.metadata.name.size() <= 63 && self.metadata.name.matches('{DEPLOYMENT_NAME_PATTERN}')"),
            "message": "metadata.name must be a DNS-1035 label (at most 63 lowercase letters, digits or -, starting with a letter and ending with a letter or digit): the ModelDeployment's Service carries its name",
        }]),
        "FineTuneJob" => serde_json::json!([{
            "rule": "!has(self.spec.model.fineTuneJob) || self.spec.model.fineTuneJob != self.metadata.name",
            "message": "spec.model.fineTuneJob names this FineTuneJob itself: a job cannot train on its own output",
            "fieldPath": ".spec.model.fineTuneJob",
            "reason": "FieldValueInvalid",
        }]),
        "EvalRun" => serde_json::json!([
            {
                "rule": "!has(self.spec.baseline) || self.spec.baseline.evalRun != self.metadata.name",
                "message": "spec.baseline.evalRun names this EvalRun itself: a run cannot be its own baseline",
                "fieldPath": ".spec.baseline.evalRun",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": "has(self.spec.target.model) || !self.spec.metrics.exists(m, m == 'perplexity' || m == 'multipleChoice')",
                "message": "perplexity and multipleChoice need a local model target (target.model): an endpoint or a ModelDeployment gives no log-likelihoods",
                "fieldPath": ".spec.metrics",
                "reason": "FieldValueInvalid",
            }
        ]),
        _ => serde_json::json!([]),
    }
}

fn schema_root(value: &mut serde_json::Value) -> Option<&mut serde_json::Map<String, serde_json::Value>> {
    value["spec"]["versions"][0]["schema"]["openAPIV3Schema"].as_object_mut()
}

fn add_root_rules(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let rules = root_rules(&crd.spec.names.kind);
    if rules.as_array().is_none_or(Vec::is_empty) {
        return crd;
    }
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    if let Some(root) = schema_root(&mut value) {
        root.insert("x-kubernetes-validations".into(), rules);
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// The apiserver does not range-check `format: int32`, and one object with a larger
/// number breaks every typed reader of its kind. Spec integers carry chosen bounds; the
/// status (written by the operator, and by anyone allowed to write it) gets the bounds
/// of its integer types.
fn bound_status_integers(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn visit(node: &mut serde_json::Value) {
        let Some(map) = node.as_object_mut() else { return };
        if map.get("type").and_then(serde_json::Value::as_str) == Some("integer") && !map.contains_key("maximum") {
            let (min, max) = match map.get("format").and_then(serde_json::Value::as_str) {
                Some("int32") => (i64::from(i32::MIN), i64::from(i32::MAX)),
                // Beyond 2^53 a bound written as a JSON number is not read back exactly.
                _ => (-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER),
            };
            map.entry("minimum").or_insert(min.into());
            map.insert("maximum".into(), max.into());
        }
        for key in ["properties", "patternProperties"] {
            if let Some(props) = map.get_mut(key).and_then(serde_json::Value::as_object_mut) {
                props.values_mut().for_each(visit);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = map.get_mut(key) {
                visit(child);
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(list) = map.get_mut(key).and_then(serde_json::Value::as_array_mut) {
                list.iter_mut().for_each(visit);
            }
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    if let Some(status) =
        schema_root(&mut value).and_then(|root| root.get_mut("properties")).and_then(|p| p.get_mut("status"))
    {
        visit(status);
    }
    serde_json::from_value(value).unwrap_or(crd)
}

/// Doc comments are wrapped at the source's line width; `kubectl explain` wraps text
/// itself, so line breaks inside a paragraph are joined (paragraph breaks stay).
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn visit(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    match v {
                        serde_json::Value::String(text) if key == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|p| p.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => visit(v),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(visit),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else { return crd };
    visit(&mut value["spec"]["versions"]);
    serde_json::from_value(value).unwrap_or(crd)
}

/// One CRD as the YAML document checked in under crds/manifests/.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(crd)?;
    Ok(format!(
        "# Generated by `llmops-operator crds --write crds/manifests` from the llmops-crds types; do not edit.\n{body}"
    ))
}

/// File name of a CRD's manifest: `<plural>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.spec.names.plural)
}

/// All CRD manifests as (file name, YAML).
pub fn crd_manifests() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    crds().iter().map(|crd| Ok((crd_file_name(crd), crd_yaml(crd)?))).collect()
}

#[cfg(test)]
mod tests;
