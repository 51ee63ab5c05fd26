//! PromptVersion controller: validate (every template parses with the shared renderer,
//! uses only declared variables, and every example renders) -> build (a ConfigMap with
//! the prompt in the protocol's JSON form and the rendered examples, for pods that use
//! it) -> apply -> status (digest, Ready with a reason naming what is wrong).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use llmops_crds::condition_types::READY;
use llmops_crds::render::{PromptError, RenderedPrompt};
use llmops_crds::{PromptVersion, PromptVersionSpec, PromptVersionStatus};

use crate::conditions::{self, Health};
use crate::context::Context;
use crate::error::{AtStep, ReconcileError, Result, Step};
use crate::workload::{FIELD_MANAGER, WorkloadKey, owner_reference};

/// The condition reason of a prompt error.
pub fn reason(e: &PromptError) -> &'static str {
    match e {
        PromptError::Syntax { .. } => "TemplateSyntaxError",
        PromptError::UndeclaredVariable { .. } => "UndeclaredVariable",
        PromptError::MissingVariable { .. } => "MissingVariable",
        PromptError::UnknownVariable { .. } => "UnknownVariable",
        PromptError::Render { .. } => "RenderError",
        PromptError::Example { .. } => "ExampleFailed",
        PromptError::Limit { .. } => "RenderLimitExceeded",
    }
}

/// Validated: the rendered examples. Pure.
pub fn validate(spec: &PromptVersionSpec) -> std::result::Result<BTreeMap<String, RenderedPrompt>, PromptError> {
    spec.validate()?;
    spec.examples
        .iter()
        .map(|e| {
            spec.render(&e.variables)
                .map(|r| (e.name.clone(), r))
                .map_err(|source| PromptError::Example { example: e.name.clone(), source: Box::new(source) })
        })
        .collect()
}

/// The ConfigMap of a valid PromptVersion. Pure.
pub fn build_config_map(
    pv: &PromptVersion,
    key: &WorkloadKey,
    digest: &str,
    examples: &BTreeMap<String, RenderedPrompt>,
) -> Result<ConfigMap> {
    let prompt = crate::assignment::prompt(&key.name, &pv.spec, digest);
    let mut data = BTreeMap::new();
    data.insert("prompt.json".to_string(), serde_json::to_string_pretty(&prompt)?);
    data.insert("examples.json".to_string(), serde_json::to_string_pretty(examples)?);
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(key.child_name("prompt")),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels()),
            owner_references: Some(vec![owner_reference(pv)?]),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    })
}

/// Reconciles one PromptVersion.
pub async fn reconcile(pv: Arc<PromptVersion>, ctx: Arc<Context>) -> std::result::Result<Action, ReconcileError> {
    super::instrumented(&*pv, &ctx, reconcile_inner(&pv, &ctx)).await
}

/// How a failed reconcile is retried.
pub fn error_policy(_pv: Arc<PromptVersion>, _error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(pv: &PromptVersion, ctx: &Context) -> std::result::Result<Action, ReconcileError> {
    let key = WorkloadKey::of(pv).at(Step::Dereference)?;
    let api: Api<PromptVersion> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let old = pv.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let generation = pv.metadata.generation;
    let now = conditions::now();
    let digest = pv.spec.digest();
    status.common.observed_generation = generation;
    status.digest = Some(digest.clone());
    // Templates are the tenant's code: they render with bounded fuel and output (see
    // llmops_crds::render), on a blocking thread, never on the reconcilers' runtime.
    let spec = pv.spec.clone();
    let validated = tokio::task::spawn_blocking(move || validate(&spec)).await.unwrap_or_else(|e| {
        Err(PromptError::Render { location: "template".into(), detail: format!("rendering failed: {e}") })
    });
    match validated {
        Ok(examples) => {
            let cm = build_config_map(pv, &key, &digest, &examples).at(Step::Build)?;
            let name = cm.metadata.name.clone().unwrap_or_default();
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &key.namespace);
            cms.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm)).await.at(Step::Apply)?;
            status.config_map = Some(name);
            status.examples_rendered = Some(examples.len() as i32);
            let message = format!("rendered {} example(s); digest {digest}", examples.len());
            let c = &mut status.common.conditions;
            conditions::set(c, READY, true, "Valid", message.clone(), generation, &now);
            conditions::set_health(c, Health::Settled, "Valid", &message, generation, &now);
            status.common.phase = Some("Ready".into());
        }
        Err(e) => {
            let reason = reason(&e);
            status.examples_rendered = None;
            let was = conditions::get(&old.common.conditions, READY).map(|c| c.reason.clone());
            let c = &mut status.common.conditions;
            conditions::set(c, READY, false, reason, e.to_string(), generation, &now);
            // The spec is immutable: nothing but a new object fixes it.
            conditions::set_health(c, Health::Stalled, reason, &e.to_string(), generation, &now);
            status.common.phase = Some("Invalid".into());
            if was.as_deref() != Some(reason) {
                ctx.event(pv, true, reason, e.to_string()).await;
            }
        }
    }
    super::batch::write_status::<PromptVersion, PromptVersionStatus>(ctx, &api, &key, &old, &status)
        .await
        .at(Step::UpdateStatus)?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_prompt_renders_its_examples() {
        let pv: PromptVersion =
            serde_yaml_ng::from_str(include_str!("../../tests/fixtures/promptversion.yaml")).expect("fixture");
        let examples = validate(&pv.spec).expect("valid");
        assert_eq!(examples.len(), 1);
        let key =
            WorkloadKey { namespace: "ns".into(), kind: "PromptVersion".into(), name: "p".into(), uid: "u".into() };
        let mut pv = pv;
        pv.metadata.uid = Some("u".into());
        let cm = build_config_map(&pv, &key, "d", &examples).expect("config map");
        let data = cm.data.expect("data");
        assert!(data["prompt.json"].contains("\"sha256\": \"d\""), "{}", data["prompt.json"]);
        assert!(data["examples.json"].contains("support robot"), "{}", data["examples.json"]);
    }

    #[test]
    fn an_example_missing_a_variable_is_not_ready() {
        let mut pv: PromptVersion =
            serde_yaml_ng::from_str(include_str!("../../tests/fixtures/promptversion.yaml")).expect("fixture");
        pv.spec.examples[0].variables.clear();
        let e = validate(&pv.spec).expect_err("invalid");
        assert_eq!(reason(&e), "ExampleFailed");
        assert!(e.to_string().contains("prompt"), "{e}");
    }
}
