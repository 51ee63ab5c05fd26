//! Dataset controller: resolve (a feedback source's ModelDeployment, a tokenizer) ->
//! validate and build (the prepare Assignment) -> the shared batch steps -> status
//! figures from the worker's manifest (record counts, drops, splits, tokens).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use llmops_crds::dataset::{RecordCounts, SplitCounts, TokenCounts, TransformDrops};
use llmops_crds::{Artifact, Dataset, DatasetStatus, Lineage, LineageInput, Resources};
use serde_json::Value;

use super::batch::{BatchKind, Pinned, Plan, batch_accessors};
use super::{resolve_model, spec_hash};
use crate::assignment::{self, ResolvedDatasetInputs};
use crate::context::Context;
use crate::error::Result;
use crate::gateway::Observed;
use crate::models::Requester;
use crate::status::BatchState;
use crate::workload::WorkloadKey;

impl BatchKind for Dataset {
    const SUFFIX: &'static str = "prepare";
    batch_accessors!(DatasetStatus);

    async fn plan(&self, ctx: &Context, key: &WorkloadKey) -> Result<Plan> {
        let mut inputs = ResolvedDatasetInputs::default();
        let mut lineage = Lineage { spec_hash: Some(spec_hash(&self.spec)), inputs: Vec::new() };
        if let Some(f) = &self.spec.source.feedback {
            let api: Api<llmops_crds::ModelDeployment> = Api::namespaced(ctx.client.clone(), &key.namespace);
            if api.get_opt(&f.model_deployment).await?.is_none() {
                return Ok(Plan::wait(
                    "ModelDeploymentNotFound",
                    format!("ModelDeployment {} does not exist in namespace {}", f.model_deployment, key.namespace),
                ));
            }
            inputs.feedback_uri =
                Some(format!("store://{}/modeldeployment/{}/traffic/", key.namespace, f.model_deployment));
            // Precise, not the second-truncated time of conditions: a rating given in this second counts.
            inputs.feedback_until = Some(f.until.as_ref().map(|t| t.0).unwrap_or_else(jiff::Timestamp::now));
        }
        if let Some(uri) = &self.spec.source.uri {
            lineage.inputs.push(LineageInput { kind: "Uri".into(), name: uri.clone(), sha256: String::new() });
        }
        if let Some(ts) = &self.spec.token_stats {
            match resolve_model(ctx, Requester::of(key), &ts.model).await? {
                Ok((model, input)) => {
                    inputs.tokenizer = Some(model);
                    lineage.inputs.push(input);
                }
                Err(plan) => return Ok(plan),
            }
        }
        Ok(match assignment::prepare(key, &ctx.config.store, &self.spec, &inputs) {
            Ok(a) => Plan::Run { assignment: Box::new(a), lineage: Some(lineage), secret_files: Vec::new() },
            Err(e) => e.into(),
        })
    }

    fn figures(&self, status: &mut DatasetStatus, observed: Option<&Observed>, pinned: &Pinned, _key: &WorkloadKey) {
        // The pinned lineage, with the digests the worker reported (now, or before: the
        // gateway forgets a finished workload) filled in.
        let reported = status.lineage.take();
        status.lineage = pinned.lineage.clone();
        if let (Some(lineage), Some(reported)) = (status.lineage.as_mut(), reported) {
            for input in lineage.inputs.iter_mut().filter(|i| i.sha256.is_empty()) {
                if let Some(r) = reported.inputs.iter().find(|r| r.kind == input.kind && r.name == input.name) {
                    input.sha256 = r.sha256.clone();
                }
            }
        }
        let Some(result) = observed.and_then(|o| o.result.as_ref()) else { return };
        if let Some(a) = &result.artifact {
            status.artifact = Some(Artifact { uri: a.uri.clone(), sha256: a.sha256.clone() });
        }
        if let Ok(manifest) = serde_json::from_str::<Value>(&result.manifest_json) {
            apply_manifest(status, &manifest);
            // A source read from a URI is digested by the worker as it reads it.
            if let (Some(lineage), Some(sha)) =
                (status.lineage.as_mut(), manifest["inputs"]["source"]["sha256"].as_str())
            {
                for input in lineage.inputs.iter_mut().filter(|i| i.kind == "Uri" && i.sha256.is_empty()) {
                    input.sha256 = sha.to_string();
                }
            }
        }
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)).unwrap_or(0)
}

/// Copies the figures of a prepare manifest.json into a Dataset's status.
pub fn apply_manifest(status: &mut DatasetStatus, m: &Value) {
    let counts = &m["counts"];
    if counts.is_object() {
        status.records = Some(RecordCounts {
            input: int(&counts["read"]),
            output: int(&counts["written"]),
            parse_errors: int(&counts["invalid"]),
        });
        let s = &counts["splits"];
        status.splits =
            Some(SplitCounts { train: int(&s["train"]), validation: int(&s["validation"]), test: int(&s["test"]) });
    }
    if let Some(drops) = m["drops"].as_array() {
        status.drops = drops
            .iter()
            .map(|d| TransformDrops {
                index: int(&d["index"]) as i32,
                transform: d["transform"].as_str().unwrap_or_default().to_string(),
                dropped: int(&d["dropped"]),
            })
            .collect();
    }
    if let Some(r) = m["redactions"].as_object() {
        status.redactions = r.iter().map(|(k, v)| (k.clone(), int(v))).collect();
    }
    if m["tokens"].is_object() {
        let t = &m["tokens"];
        status.tokens = Some(TokenCounts {
            total: int(&t["total"]),
            per_split: t["splits"]
                .as_object()
                .map(|s| s.iter().map(|(k, v)| (k.clone(), int(v))).collect())
                .unwrap_or_default(),
        });
    }
    if let Some(t) = m["snapshotTime"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        status.snapshot_time = Some(Time(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_figures_reach_status() {
        let manifest: Value = serde_json::from_str(
            r#"{"sha256":"x","counts":{"read":10,"invalid":1,"written":8,"splits":{"train":6,"validation":1,"test":1}},
               "drops":[{"index":0,"transform":"normalize","dropped":0},{"index":1,"transform":"exactDedup","dropped":1}],
               "redactions":{"email":2},"tokens":{"total":300,"splits":{"train":200,"validation":50,"test":50}}}"#,
        )
        .expect("json");
        let mut status = DatasetStatus::default();
        apply_manifest(&mut status, &manifest);
        assert_eq!(status.records, Some(RecordCounts { input: 10, output: 8, parse_errors: 1 }));
        assert_eq!(status.splits, Some(SplitCounts { train: 6, validation: 1, test: 1 }));
        assert_eq!(status.drops.len(), 2);
        assert_eq!(status.drops[1].dropped, 1);
        assert_eq!(status.redactions.get("email"), Some(&2));
        assert_eq!(status.tokens.as_ref().map(|t| t.total), Some(300));
    }
}
