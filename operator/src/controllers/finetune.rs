//! FineTuneJob controller: resolve (the Dataset must be Ready; its digest is pinned;
//! the base model) -> build (the finetune Assignment, always resuming from the newest
//! checkpoint) -> the shared batch steps, with suspend and deletion asking the worker to
//! checkpoint and stop first -> status figures from progress events (step, loss,
//! tokens/s, ETA), checkpoints and the result.

use llmops_crds::finetune::CheckpointStatus;
use llmops_crds::{Artifact, FineTuneJob, FineTuneJobStatus, Lineage, LineageInput, Resources};

use super::batch::{BatchKind, Pinned, Plan, batch_accessors};
use super::{resolve_dataset, resolve_model, spec_hash};
use crate::assignment;
use crate::context::Context;
use crate::error::Result;
use crate::gateway::Observed;
use crate::metrics::{Metrics, ObjectLabels};
use crate::models::Requester;
use crate::status::{BatchState, format_eta};
use crate::workload::WorkloadKey;

impl BatchKind for FineTuneJob {
    const SUFFIX: &'static str = "finetune";
    const CHECKPOINT_ON_STOP: bool = true;
    batch_accessors!(FineTuneJobStatus);

    fn suspend(&self) -> bool {
        self.spec.suspend
    }

    async fn plan(&self, ctx: &Context, key: &WorkloadKey) -> Result<Plan> {
        let dataset = match resolve_dataset(ctx, &key.namespace, &self.spec.dataset.name).await? {
            Ok(d) => d,
            Err(plan) => return Ok(plan),
        };
        let (model, model_lineage) = match resolve_model(ctx, Requester::of(key), &self.spec.model).await? {
            Ok(m) => m,
            Err(plan) => return Ok(plan),
        };
        let lineage = Lineage {
            spec_hash: Some(spec_hash(&self.spec)),
            inputs: vec![
                model_lineage,
                LineageInput {
                    kind: "Dataset".into(),
                    name: dataset.name.clone(),
                    sha256: dataset.artifact.sha256.clone(),
                },
            ],
        };
        Ok(match assignment::finetune(key, &ctx.config.store, &self.spec, model, &dataset) {
            Ok(a) => Plan::Run { assignment: Box::new(a), lineage: Some(lineage), secret_files: Vec::new() },
            Err(e) => e.into(),
        })
    }

    fn export(s: &FineTuneJobStatus, observed: Option<&Observed>, metrics: &Metrics, key: &WorkloadKey) {
        let labels = ObjectLabels { namespace: key.namespace.clone(), name: key.name.clone() };
        Metrics::set_figure(&metrics.finetune_loss, &labels, s.loss);
        Metrics::set_figure(&metrics.finetune_tokens_per_second, &labels, s.tokens_per_second);
        let ratio = match (s.step, s.total_steps) {
            (Some(step), Some(total)) if total > 0 => Some(step as f64 / total as f64),
            _ => None,
        };
        Metrics::set_figure(&metrics.finetune_progress_ratio, &labels, ratio);
        // Only while it runs: a finished job has no time left to estimate.
        let running = observed.is_some_and(|o| o.result.is_none());
        let eta = observed.and_then(|o| o.progress.as_ref()).map(|p| p.eta_seconds).filter(|e| *e > 0.0);
        Metrics::set_figure(&metrics.finetune_eta_seconds, &labels, eta.filter(|_| running));
    }

    fn figures(&self, s: &mut FineTuneJobStatus, observed: Option<&Observed>, pinned: &Pinned, _key: &WorkloadKey) {
        s.lineage = pinned.lineage.clone();
        let Some(o) = observed else { return };
        if let Some(p) = &o.progress {
            s.step = Some(p.step as i64);
            if p.total_steps > 0 {
                s.total_steps = Some(p.total_steps as i64);
                s.progress = Some(format!("{}/{}", p.step, p.total_steps));
            }
            if p.epoch > 0.0 {
                s.epoch = Some(round(p.epoch));
            }
            // A figure that is not a finite number is never shown (as 0 or otherwise).
            let m = |k: &str| p.metrics.get(k).copied().filter(|v| v.is_finite()).map(round);
            s.loss = m("loss").or(s.loss);
            s.eval_loss = m("eval_loss").or(s.eval_loss);
            s.learning_rate = p.metrics.get("learning_rate").copied().filter(|v| v.is_finite()).or(s.learning_rate);
            s.tokens_per_second = m("tokens_per_second").or(s.tokens_per_second);
            s.eta = (p.eta_seconds > 0.0).then(|| format_eta(p.eta_seconds));
        }
        if let Some(c) = &o.checkpoint {
            s.checkpoint = Some(CheckpointStatus { uri: c.uri.clone(), step: c.step as i64 });
        }
        if let Some(r) = &o.result {
            if let Some(a) = &r.artifact {
                s.artifact = Some(Artifact { uri: a.uri.clone(), sha256: a.sha256.clone() });
            }
            s.eta = None;
            if let Some(loss) = r.metrics.get("loss").or_else(|| r.metrics.get("train_loss")).filter(|l| l.is_finite())
            {
                s.loss = Some(round(*loss));
            }
            if let Some(loss) = r.metrics.get("eval_loss").filter(|l| l.is_finite()) {
                s.eval_loss = Some(round(*loss));
            }
            if let (Some(step), Some(total)) = (s.step, s.total_steps) {
                s.progress = Some(format!("{step}/{total}"));
            }
        }
    }
}

/// Rounds a figure for display, so that status does not change on noise digits.
fn round(v: f64) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    let magnitude = v.abs().log10().floor();
    let factor = 10f64.powf(4.0 - magnitude.max(-8.0));
    (v * factor).round() / factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_that_is_not_a_number_is_never_shown() {
        let job: FineTuneJob =
            serde_yaml_ng::from_str(include_str!("../../tests/fixtures/finetunejob.yaml")).expect("fixture");
        let key = WorkloadKey { namespace: "ns".into(), kind: "FineTuneJob".into(), name: "t".into(), uid: "u".into() };
        let pinned =
            Pinned { token: String::new(), assignment: Default::default(), lineage: None, secret_files: vec![] };
        let progress = |loss: f64| Observed {
            progress: Some(llmops_proto::v1::Progress {
                step: 3,
                total_steps: 10,
                metrics: [("loss".to_string(), loss)].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = FineTuneJobStatus::default();
        job.figures(&mut s, Some(&progress(f64::NAN)), &pinned, &key);
        assert_eq!(s.loss, None, "NaN must not read as 0");
        job.figures(&mut s, Some(&progress(2.5)), &pinned, &key);
        assert_eq!(s.loss, Some(2.5));
        job.figures(&mut s, Some(&progress(f64::INFINITY)), &pinned, &key);
        assert_eq!(s.loss, Some(2.5), "the last finite loss stays");
    }

    #[test]
    fn figures_keep_five_significant_digits() {
        assert_eq!(round(1.234567), 1.2346);
        assert_eq!(round(1234.5678), 1234.6);
        assert_eq!(round(f64::NAN), 0.0);
    }
}
