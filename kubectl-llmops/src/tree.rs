//! `status`: a namespace's llmops objects as a tree, each object under what it depends on
//! (a FineTuneJob under its Dataset, an EvalRun under what it evaluates, a deployment
//! under its adapters' FineTuneJobs or its PromptVersion, a gate under its deployment),
//! with its Ready condition, phase, progress and the reason of a failure. Pure: built
//! from a [`Snapshot`].

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use llmops_crds::condition_types::{FAILED, PASSED, READY, STALLED};
use llmops_crds::{CommonStatus, Dataset, EvalRun, FineTuneJob, ModelDeployment, PromptVersion};

use crate::objects::{Kind, Snapshot, condition, short_digest};
use crate::style::{Paint, Tone, TreeNode, draw, one_line};

/// Label value the operator gives the EvalRuns that gate a ModelDeployment's revisions.
pub const GATE_KIND: &str = "ModelDeploymentGate";
/// The label that carries it.
pub const KIND_LABEL: &str = "llmops.dev/kind";
/// The label naming the object a workload belongs to.
pub const NAME_LABEL: &str = "llmops.dev/name";

/// The role of the deployment a feedback Dataset reads from: where a loop is cut.
const FEEDBACK: &str = "feedback";

/// Messages longer than this are cut unless `--wide`.
const MESSAGE_LIMIT: usize = 200;

/// A condition as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionView {
    /// True, False or Unknown.
    pub status: String,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
}

impl ConditionView {
    fn of(c: &Condition) -> Self {
        ConditionView { status: c.status.clone(), reason: c.reason.clone(), message: c.message.clone() }
    }
}

/// Something an object depends on, and as what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// Its kind.
    pub kind: Kind,
    /// Its name (same namespace).
    pub name: String,
    /// What it is to the dependent: `training data`, `adapter acme-facts`, `prompt`, ….
    pub role: String,
}

fn dep(kind: Kind, name: &str, role: impl Into<String>) -> Dependency {
    Dependency { kind, name: name.to_string(), role: role.into() }
}

/// One object of the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// False for an object that others reference but that does not exist.
    pub found: bool,
    /// A ModelDeployment's promotion gate.
    pub gate: bool,
    /// Its Ready condition; None before the operator has seen it.
    pub ready: Option<ConditionView>,
    /// `Failed` or `Stalled` when True: why it failed.
    pub failure: Option<(String, ConditionView)>,
    /// Its display phase.
    pub phase: Option<String>,
    /// Its progress (step/total).
    pub progress: Option<String>,
    /// Kind-specific facts: records, digests, loss, metrics, endpoint.
    pub facts: Vec<String>,
    /// What it depends on, the one it is drawn under first.
    pub dependencies: Vec<Dependency>,
}

impl Item {
    fn new(kind: Kind, name: String, status: Option<&CommonStatus>) -> Self {
        let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
        let ready = condition(conditions, READY).map(ConditionView::of);
        let failure = [FAILED, STALLED].into_iter().find_map(|t| {
            condition(conditions, t).filter(|c| c.status == "True").map(|c| (t.to_string(), ConditionView::of(c)))
        });
        Item {
            kind,
            name,
            found: true,
            gate: false,
            ready,
            failure,
            phase: status.and_then(|s| s.phase.clone()),
            progress: None,
            facts: Vec::new(),
            dependencies: Vec::new(),
        }
    }

    fn missing(kind: Kind, name: &str) -> Self {
        Item {
            kind,
            name: name.to_string(),
            found: false,
            gate: false,
            ready: None,
            failure: None,
            phase: None,
            progress: None,
            facts: Vec::new(),
            dependencies: Vec::new(),
        }
    }

    fn key(&self) -> (Kind, String) {
        (self.kind, self.name.clone())
    }

    fn tone(&self) -> Tone {
        if !self.found || self.failure.is_some() {
            return Tone::Bad;
        }
        match self.ready.as_ref().map(|r| r.status.as_str()) {
            Some("True") => Tone::Good,
            _ => Tone::Busy,
        }
    }
}

/// The items of namespace `ns`, in a stable order.
pub fn items(snapshot: &Snapshot, ns: &str) -> Vec<Item> {
    fn in_ns<K: ResourceExt>(ns: &str) -> impl Fn(&&K) -> bool + '_ {
        move |o| o.namespace().as_deref() == Some(ns)
    }
    let mut out = Vec::new();
    out.extend(snapshot.datasets.iter().filter(in_ns(ns)).map(dataset_item));
    out.extend(snapshot.prompt_versions.iter().filter(in_ns(ns)).map(prompt_item));
    out.extend(snapshot.fine_tune_jobs.iter().filter(in_ns(ns)).map(fine_tune_item));
    out.extend(snapshot.deployments.iter().filter(in_ns(ns)).map(deployment_item));
    out.extend(snapshot.eval_runs.iter().filter(in_ns(ns)).map(eval_item));
    out
}

fn number(v: f64) -> String {
    let text = format!("{v:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" { "0".to_string() } else { text.to_string() }
}

fn dataset_item(d: &Dataset) -> Item {
    let status = d.status.as_ref();
    let mut item = Item::new(Kind::Dataset, d.name_any(), status.map(|s| &s.common));
    let source = &d.spec.source;
    if let Some(uri) = &source.uri {
        item.facts.push(format!("source {uri}"));
    } else if let Some(records) = &source.inline {
        item.facts.push(format!("source inline ({} records)", records.len()));
    } else if let Some(f) = &source.feedback {
        item.dependencies.push(dep(Kind::ModelDeployment, &f.model_deployment, FEEDBACK));
        item.facts.push(format!("source feedback of ModelDeployment/{} rated >= {}", f.model_deployment, f.min_rating));
    }
    if let Some(job) = d.spec.token_stats.as_ref().and_then(|t| t.model.fine_tune_job.as_ref()) {
        item.dependencies.push(dep(Kind::FineTuneJob, job, "tokenizer"));
    }
    if let Some(s) = status {
        let mut out = Vec::new();
        if let Some(r) = &s.records {
            let mut text = format!("{} records of {} read", r.output, r.input);
            if let Some(split) = &s.splits {
                text.push_str(&format!(
                    " (train {}, validation {}, test {})",
                    split.train, split.validation, split.test
                ));
            }
            out.push(text);
        }
        if let Some(a) = &s.artifact {
            out.push(format!("sha256 {}", short_digest(&a.sha256, false)));
        }
        if !out.is_empty() {
            item.facts.push(out.join(", "));
        }
    }
    item
}

fn prompt_item(p: &PromptVersion) -> Item {
    let status = p.status.as_ref();
    let mut item = Item::new(Kind::PromptVersion, p.name_any(), status.map(|s| &s.common));
    let mut text = format!("prompt {}", p.spec.prompt);
    if let Some(digest) = status.and_then(|s| s.digest.as_ref()) {
        text.push_str(&format!(", sha256 {}", short_digest(digest, false)));
    }
    item.facts.push(text);
    item
}

fn fine_tune_item(j: &FineTuneJob) -> Item {
    let status = j.status.as_ref();
    let mut item = Item::new(Kind::FineTuneJob, j.name_any(), status.map(|s| &s.common));
    item.dependencies.push(dep(Kind::Dataset, &j.spec.dataset.name, "training data"));
    if let Some(base) = &j.spec.model.fine_tune_job {
        item.dependencies.push(dep(Kind::FineTuneJob, base, "base model"));
    }
    let Some(s) = status else { return item };
    item.progress = s.progress.clone();
    let mut figures = Vec::new();
    if let Some(loss) = s.loss {
        figures.push(format!("loss {}", number(loss)));
    }
    if let Some(loss) = s.eval_loss {
        figures.push(format!("eval loss {}", number(loss)));
    }
    if let Some(rate) = s.tokens_per_second {
        figures.push(format!("{} tokens/s", number(rate)));
    }
    if let Some(eta) = s.eta.as_ref().filter(|_| s.artifact.is_none()) {
        figures.push(format!("ETA {eta}"));
    }
    if let Some(attempts) = s.attempts.filter(|a| *a > 1) {
        figures.push(format!("attempt {attempts}"));
    }
    if !figures.is_empty() {
        item.facts.push(figures.join(", "));
    }
    if let Some(c) = s.checkpoint.as_ref().filter(|_| s.artifact.is_none()) {
        item.facts.push(format!("checkpoint at step {}", c.step));
    }
    let output = match j.spec.method {
        llmops_crds::finetune::FineTuneMethod::Lora => "adapter",
        llmops_crds::finetune::FineTuneMethod::Full => "model",
    };
    let mut digests = Vec::new();
    if let Some(a) = &s.artifact {
        digests.push(format!("{output} sha256 {}", short_digest(&a.sha256, false)));
    }
    if let Some(m) = &s.merged_model {
        digests.push(format!("merged model sha256 {}", short_digest(&m.sha256, false)));
    }
    if !digests.is_empty() {
        item.facts.push(digests.join(", "));
    }
    item
}

/// The ModelDeployment a gate EvalRun belongs to: its controller owner, else its
/// `llmops.dev/name` label.
pub fn gated_deployment(run: &EvalRun) -> Option<String> {
    if run.labels().get(KIND_LABEL).map(String::as_str) != Some(GATE_KIND) {
        return None;
    }
    run.owner_references()
        .iter()
        .find(|o| o.kind == Kind::ModelDeployment.as_str())
        .map(|o| o.name.clone())
        .or_else(|| run.labels().get(NAME_LABEL).cloned())
}

fn eval_item(r: &EvalRun) -> Item {
    let status = r.status.as_ref();
    let mut item = Item::new(Kind::EvalRun, r.name_any(), status.map(|s| &s.common));
    if let Some(md) = gated_deployment(r) {
        item.gate = true;
        item.dependencies.push(dep(Kind::ModelDeployment, &md, "gate of"));
    }
    let target = &r.spec.target;
    if let Some(job) = target.adapter.as_ref().and_then(|a| a.fine_tune_job.as_ref()) {
        item.dependencies.push(dep(Kind::FineTuneJob, job, "adapter"));
    }
    if let Some(job) = target.model.as_ref().and_then(|m| m.fine_tune_job.as_ref()) {
        item.dependencies.push(dep(Kind::FineTuneJob, job, "model"));
    }
    if let Some(md) = &target.model_deployment {
        item.dependencies.push(dep(Kind::ModelDeployment, md, "target"));
    }
    let evaluation = &r.spec.evaluation;
    item.dependencies.push(dep(Kind::Dataset, &evaluation.dataset.name, "eval data"));
    if let Some(p) = &evaluation.prompt {
        item.dependencies.push(dep(Kind::PromptVersion, &p.name, "prompt"));
    }
    if let Some(b) = &evaluation.baseline {
        item.dependencies.push(dep(Kind::EvalRun, &b.eval_run, "baseline"));
    }
    if let Some(md) = evaluation.judge.as_ref().and_then(|j| j.model_deployment.as_ref()) {
        item.dependencies.push(dep(Kind::ModelDeployment, md, "judge"));
    }
    let Some(s) = status else { return item };
    if let Some(p) = condition(&s.common.conditions, PASSED) {
        let mut text = format!("Passed={} ({})", p.status, p.reason);
        if !p.message.is_empty() {
            text.push_str(": ");
            text.push_str(&p.message);
        }
        item.facts.push(text);
    }
    if !s.metrics.is_empty() {
        let metrics: Vec<String> = s
            .metrics
            .iter()
            .map(|m| {
                let name = serde_json::to_value(m.metric).ok().and_then(|v| v.as_str().map(String::from));
                let mut text = format!("{} {}", name.unwrap_or_default(), number(m.value));
                if let (Some(lo), Some(hi)) = (m.ci_low, m.ci_high) {
                    text.push_str(&format!(" [{}, {}]", number(lo), number(hi)));
                }
                text
            })
            .collect();
        item.facts.push(format!("metrics {}", metrics.join(", ")));
    }
    if let Some(samples) = s.samples {
        item.facts.push(format!("samples {samples}, errors {}", s.errors.unwrap_or(0)));
    }
    if let Some(revision) = s.evaluated.as_ref().and_then(|e| e.revision.as_ref()).filter(|_| item.gate) {
        item.facts.push(format!("revision {revision}"));
    }
    item
}

fn deployment_item(md: &ModelDeployment) -> Item {
    let status = md.status.as_ref();
    let mut item = Item::new(Kind::ModelDeployment, md.name_any(), status.map(|s| &s.common));
    for adapter in &md.spec.adapters {
        if let Some(job) = &adapter.source.fine_tune_job {
            item.dependencies.push(dep(Kind::FineTuneJob, job, format!("adapter {}", adapter.name)));
        }
    }
    if let Some(job) = &md.spec.model.fine_tune_job {
        item.dependencies.push(dep(Kind::FineTuneJob, job, "model"));
    }
    if let Some(p) = &md.spec.prompt {
        item.dependencies.push(dep(Kind::PromptVersion, &p.name, "prompt"));
    }
    if let Some(gate) = md.spec.promotion.as_ref().map(|p| &p.gate) {
        item.dependencies.push(dep(Kind::Dataset, &gate.dataset.name, "gate data"));
        if let Some(p) = &gate.prompt {
            item.dependencies.push(dep(Kind::PromptVersion, &p.name, "gate prompt"));
        }
    }
    let Some(s) = status else { return item };
    if let Some(endpoint) = &s.endpoint {
        item.facts.push(format!("endpoint {endpoint}"));
    }
    let mut serving = Vec::new();
    if let Some(r) = &s.serving_revision {
        serving.push(format!("revision {r}"));
    }
    if let Some(r) = &s.candidate_revision {
        serving.push(format!("candidate {r}"));
    }
    if let Some(r) = &s.replicas_summary {
        serving.push(format!("replicas {r}"));
    }
    if !serving.is_empty() {
        item.facts.push(serving.join(", "));
    }
    if let Some(g) = &s.gate {
        let mut text = format!("gate {} on revision {} (EvalRun/{})", g.verdict, g.revision, g.eval_run);
        if let Some(m) = g.message.as_ref().filter(|m| !m.is_empty()) {
            text.push_str(": ");
            text.push_str(m);
        }
        item.facts.push(text);
    }
    item
}

/// An item placed in the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The object.
    pub item: Item,
    /// Its dependencies other than the one it is drawn under.
    pub uses: Vec<Dependency>,
    /// What is drawn under it.
    pub children: Vec<Node>,
    /// `--wide`: messages in full.
    pub wide: bool,
}

/// Arranges items as trees: each under its first dependency (a stand-in is made for a
/// dependency that does not exist, so that what is missing shows), roots and siblings
/// in pipeline order (Dataset, PromptVersion, FineTuneJob, ModelDeployment, EvalRun)
/// then by name. A loop (a feedback Dataset feeding the deployment it reads from) is cut
/// at the feedback edge, else at its first member in that order.
pub fn build(items: Vec<Item>, wide: bool) -> Vec<Node> {
    // An object listed twice (never so from the apiserver) is drawn once.
    let mut seen = BTreeSet::new();
    let mut items: Vec<Item> = items.into_iter().filter(|i| seen.insert(i.key())).collect();
    // A dependency named twice (the same job as two adapters) is listed once.
    for item in &mut items {
        let mut seen = BTreeSet::new();
        item.dependencies.retain(|d| seen.insert((d.kind, d.name.clone())));
    }
    let mut index: BTreeMap<(Kind, String), usize> =
        items.iter().enumerate().map(|(i, item)| (item.key(), i)).collect();
    let firsts: Vec<(Kind, String)> =
        items.iter().filter_map(|i| i.dependencies.first().map(|d| (d.kind, d.name.clone()))).collect();
    for key in firsts {
        if !index.contains_key(&key) {
            index.insert(key.clone(), items.len());
            items.push(Item::missing(key.0, &key.1));
        }
    }
    let mut parent: Vec<Option<usize>> = items
        .iter()
        .map(|item| item.dependencies.first().and_then(|d| index.get(&(d.kind, d.name.clone())).copied()))
        .collect();
    cut_loops(&items, &mut parent);

    let mut children: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
    let mut roots = Vec::new();
    for (i, p) in parent.iter().enumerate() {
        match p {
            None => roots.push(i),
            Some(p) => children[*p].push(i),
        }
    }
    let order = |i: &usize| items[*i].key();
    roots.sort_by_key(order);
    for c in &mut children {
        c.sort_by_key(order);
    }
    fn place(i: usize, items: &[Item], parent: &[Option<usize>], children: &[Vec<usize>], wide: bool) -> Node {
        let item = items[i].clone();
        let drawn_under = parent[i].map(|p| items[p].key());
        let uses =
            item.dependencies.iter().filter(|d| Some((d.kind, d.name.clone())) != drawn_under).cloned().collect();
        Node {
            item,
            uses,
            children: children[i].iter().map(|c| place(*c, items, parent, children, wide)).collect(),
            wide,
        }
    }
    roots.into_iter().map(|r| place(r, &items, &parent, &children, wide)).collect()
}

/// Every object has at most one parent, so a loop is found by walking up from each
/// object; it is cut at a feedback Dataset, else at its first member in pipeline order.
fn cut_loops(items: &[Item], parent: &mut [Option<usize>]) {
    for start in 0..items.len() {
        let mut path = vec![start];
        let mut at = start;
        while let Some(p) = parent[at] {
            if let Some(pos) = path.iter().position(|x| *x == p) {
                let members = &path[pos..];
                let feedback = members.iter().copied().find(|m| {
                    items[*m].kind == Kind::Dataset
                        && items[*m].dependencies.first().is_some_and(|d| d.role == FEEDBACK)
                });
                let cut = feedback.or_else(|| members.iter().copied().min_by_key(|m| items[*m].key()));
                if let Some(cut) = cut {
                    parent[cut] = None;
                }
                break;
            }
            path.push(p);
            at = p;
        }
    }
}

impl TreeNode for Node {
    fn header(&self, paint: &Paint) -> String {
        let item = &self.item;
        let tone = item.tone();
        let mut text = paint.paint(Tone::Strong, &format!("{}/{}", item.kind, item.name));
        if item.gate {
            text.push_str(" (gate)");
        }
        if !item.found {
            text.push_str("  ");
            text.push_str(&paint.paint(Tone::Bad, "not found"));
            return text;
        }
        let mut phase = item.phase.clone().unwrap_or_else(|| "-".to_string());
        if let Some(p) = &item.progress {
            phase.push(' ');
            phase.push_str(p);
        }
        text.push_str("  ");
        text.push_str(&paint.paint(tone, &phase));
        text.push_str("  ");
        match &item.ready {
            None => text.push_str(&paint.paint(Tone::Busy, "not reconciled yet")),
            Some(r) => {
                let mut ready = format!("Ready={}", r.status);
                if !r.reason.is_empty() {
                    ready.push_str(&format!(" ({})", r.reason));
                }
                text.push_str(&paint.paint(tone, &ready));
            }
        }
        text
    }

    fn details(&self, paint: &Paint) -> Vec<String> {
        let item = &self.item;
        let mut lines = Vec::new();
        let failure = item.failure.as_ref();
        if let Some(r) = item.ready.as_ref().filter(|r| !r.message.is_empty()) {
            let repeated = failure.is_some_and(|(_, f)| f.reason == r.reason && f.message == r.message);
            if !repeated {
                lines.push(one_line(&r.message, self.wide, MESSAGE_LIMIT));
            }
        }
        if let Some((type_, f)) = failure {
            let mut text = format!("{type_}: {}", f.reason);
            if !f.message.is_empty() {
                text.push_str(": ");
                text.push_str(&f.message);
            }
            lines.push(paint.paint(Tone::Bad, &one_line(&text, self.wide, MESSAGE_LIMIT)));
        }
        for fact in &item.facts {
            lines.push(one_line(fact, self.wide, MESSAGE_LIMIT));
        }
        if !self.uses.is_empty() {
            let uses: Vec<String> = self.uses.iter().map(|d| format!("{}/{} ({})", d.kind, d.name, d.role)).collect();
            lines.push(format!("uses {}", uses.join(", ")));
        }
        lines
    }

    fn children(&self) -> &[Self] {
        &self.children
    }
}

/// The whole `status` output for the snapshot: one tree per namespace, each under a
/// `Namespace <name>` line when `headers` (all namespaces).
pub fn render(snapshot: &Snapshot, namespaces: &[String], headers: bool, wide: bool, paint: &Paint) -> String {
    let mut out = String::new();
    for (i, ns) in namespaces.iter().enumerate() {
        if headers {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&paint.paint(Tone::Strong, &format!("Namespace {ns}")));
            out.push('\n');
        }
        out.push_str(&draw(&build(items(snapshot, ns), wide), paint));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Snapshot {
        Snapshot::from_yaml(include_str!("../tests/fixtures/pipeline.yaml")).unwrap()
    }

    fn tree(snapshot: &Snapshot) -> String {
        render(snapshot, &["default".to_string()], false, false, &Paint::plain())
    }

    #[test]
    fn the_pipeline_is_drawn_with_each_object_under_what_it_depends_on() {
        let text = tree(&fixture());
        let expected = "\
Dataset/acme-facts  Succeeded  Ready=True (Succeeded)
│ prepared 44 records
│ source inline (2 records)
│ 44 records of 44 read (train 36, validation 4, test 4), sha256 e14d1a1446e7
└─ FineTuneJob/acme-facts-lora  Succeeded 60/60  Ready=True (Succeeded)
   │ trained 60 steps
   │ loss 0.41, eval loss 0.52, 310.5 tokens/s
   │ adapter sha256 ae1eae1d76e5
   ├─ ModelDeployment/acme-support  Serving  Ready=True (Serving)
   │  │ revision 3a4b5c6d7e serves
   │  │ endpoint http://127.0.0.2:8000/v1
   │  │ revision 3a4b5c6d7e, replicas 1/1
   │  │ gate Passed on revision 3a4b5c6d7e (EvalRun/acme-support-gate-3a4b5c6d7e-1f2e3d): contains 0.87 >= 0.5
   │  │ uses PromptVersion/acme-support-v1 (prompt), Dataset/acme-facts-heldout (gate data)
   │  └─ EvalRun/acme-support-gate-3a4b5c6d7e-1f2e3d (gate)  Succeeded  Ready=True (Succeeded)
   │       Passed=True (ThresholdsMet): contains 0.87 >= 0.5
   │       metrics contains 0.8667 [0.6667, 1]
   │       samples 15, errors 0
   │       revision 3a4b5c6d7e
   │       uses FineTuneJob/acme-facts-lora (adapter), Dataset/acme-facts-heldout (eval data), PromptVersion/acme-support-v1 (prompt)
   └─ EvalRun/acme-facts-lora-eval  Failed  Ready=False (NoRecords)
        Failed: NoRecords: the test split of Dataset acme-facts-heldout is empty
        uses Dataset/acme-facts-heldout (eval data), PromptVersion/acme-support-v1 (prompt)
Dataset/acme-facts-heldout  Succeeded  Ready=True (Succeeded)
  source store://imports/acme-heldout.jsonl
  sha256 df16c1c51be8
PromptVersion/acme-support-v1  Ready  Ready=True (Valid)
  prompt acme-support, sha256 cf07194ee232
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn a_missing_dependency_is_drawn_as_not_found_with_its_dependents_under_it() {
        let mut snapshot = fixture();
        snapshot.datasets.retain(|d| d.name_any() != "acme-facts");
        let text = tree(&snapshot);
        assert!(text.starts_with("Dataset/acme-facts  not found\n└─ FineTuneJob/acme-facts-lora  "), "{text}");
    }

    #[test]
    fn an_object_not_reconciled_yet_says_so() {
        let mut snapshot = fixture();
        snapshot.prompt_versions[0].status = None;
        let text = tree(&snapshot);
        assert!(
            text.contains("PromptVersion/acme-support-v1  -  not reconciled yet\n  prompt acme-support\n"),
            "{text}"
        );
    }

    #[test]
    fn a_feedback_loop_is_cut_at_the_feedback_dataset() {
        let mut snapshot = fixture();
        // The loop closed: a feedback Dataset of the deployment trains the adapter it serves.
        let feedback: Dataset = serde_json::from_value(serde_json::json!({
            "apiVersion": "llmops.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "acme-feedback", "namespace": "default"},
            "spec": {"source": {"feedback": {"modelDeployment": "acme-support"}}},
        }))
        .unwrap();
        snapshot.datasets.push(feedback);
        snapshot.fine_tune_jobs[0].spec.dataset.name = "acme-feedback".into();
        let nodes = build(items(&snapshot, "default"), false);
        let roots: Vec<String> = nodes.iter().map(|n| format!("{}/{}", n.item.kind, n.item.name)).collect();
        assert_eq!(
            roots,
            [
                "Dataset/acme-facts",
                "Dataset/acme-facts-heldout",
                "Dataset/acme-feedback",
                "PromptVersion/acme-support-v1"
            ]
        );
        let feedback = &nodes[2];
        assert_eq!(feedback.uses[0].role, "feedback", "the cut edge is still listed");
        assert_eq!(feedback.children[0].item.name, "acme-facts-lora");
        assert_eq!(feedback.children[0].children[0].item.name, "acme-support");
    }

    #[test]
    fn a_deployment_without_adapters_sits_under_its_prompt() {
        let mut snapshot = fixture();
        snapshot.deployments[0].spec.adapters.clear();
        snapshot.deployments[0].spec.promotion = None;
        let nodes = build(items(&snapshot, "default"), false);
        let prompt = nodes.iter().find(|n| n.item.kind == Kind::PromptVersion).unwrap();
        assert_eq!(prompt.children[0].item.name, "acme-support");
        assert!(prompt.children[0].uses.is_empty());
    }

    #[test]
    fn namespaces_are_headed_when_all_are_shown() {
        let mut snapshot = fixture();
        let mut other = snapshot.prompt_versions[0].clone();
        other.metadata.namespace = Some("team-b".into());
        snapshot.prompt_versions.push(other);
        let text = render(&snapshot, &["default".to_string(), "team-b".to_string()], true, false, &Paint::plain());
        assert!(text.starts_with("Namespace default\nDataset/acme-facts "), "{text}");
        assert!(text.ends_with("\nNamespace team-b\nPromptVersion/acme-support-v1  Ready  Ready=True (Valid)\n  prompt acme-support, sha256 cf07194ee232\n"), "{text}");
    }

    #[test]
    fn long_messages_are_cut_unless_wide() {
        let mut snapshot = fixture();
        let long = "x".repeat(300);
        snapshot.datasets[0].status.as_mut().unwrap().common.conditions[0].message = long.clone();
        let text = tree(&snapshot);
        assert!(text.contains(&format!("│ {}…\n", "x".repeat(200))), "{text}");
        let wide = render(&snapshot, &["default".to_string()], false, true, &Paint::plain());
        assert!(wide.contains(&format!("│ {long}\n")), "{wide}");
    }
}
