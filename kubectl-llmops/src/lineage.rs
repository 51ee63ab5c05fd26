//! `lineage`: what an object was built from, back to the raw data and the base model,
//! with the digest each input had when it was used. Follows `status.lineage` of Datasets
//! and FineTuneJobs, a ModelDeployment's served lineage (adapters with what they were
//! trained on), and what an EvalRun evaluated. Pure: walked over a [`Snapshot`].

use llmops_crds::{LineageInput, ModelDeployment};

use crate::objects::{Kind, ObjectRef, Snapshot, short_digest};
use crate::style::{Paint, Tone, TreeNode, draw};

/// One input (or the object asked about, at the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// `Dataset`, `FineTuneJob`, `PromptVersion`, `ModelDeployment`, `EvalRun`, or a
    /// plain input: `Model`, `Adapter`, `Uri`, `Endpoint`.
    pub kind: String,
    /// The object's name, or the URI.
    pub name: String,
    /// What it is to the object above it, when the record says: `adapter acme-facts`.
    pub role: Option<String>,
    /// Its digest as recorded where it was used; for the root, its own digest. Empty
    /// when none is known yet.
    pub sha256: String,
    /// Remarks: not found, changed since, no lineage yet.
    pub notes: Vec<Note>,
    /// What it was built from.
    pub inputs: Vec<Input>,
}

/// A remark on an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The object does not exist (any more): what it was built from is unknown.
    NotFound,
    /// The object's digest now differs from the one recorded where it was used.
    Changed {
        /// Its digest now.
        now: String,
    },
    /// The object has recorded no lineage yet (it has not started).
    NoLineageYet,
    /// The object is its own input further up: the walk stops here.
    Loop,
    /// Free text (a deployment's revision).
    Info(String),
}

/// Why no lineage could be given at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineageError {
    /// The object asked about does not exist.
    #[error("{object} not found in namespace {namespace}")]
    NotFound {
        /// The object.
        object: ObjectRef,
        /// Its namespace.
        namespace: String,
    },
}

/// The lineage of `object` in namespace `ns`.
pub fn walk(snapshot: &Snapshot, ns: &str, object: &ObjectRef) -> Result<Input, LineageError> {
    if !snapshot.contains(ns, object.kind, &object.name) {
        return Err(LineageError::NotFound { object: object.clone(), namespace: ns.to_string() });
    }
    let mut path = Vec::new();
    Ok(Walker { snapshot, ns }.object(object.kind, &object.name, None, None, &mut path))
}

struct Walker<'a> {
    snapshot: &'a Snapshot,
    ns: &'a str,
}

impl Walker<'_> {
    /// A recorded input: an llmops object is followed, anything else is a leaf.
    fn record(&self, input: &LineageInput, role: Option<String>, path: &mut Vec<(Kind, String)>) -> Input {
        match Kind::from_kind_name(&input.kind) {
            Some(kind) => self.object(kind, &input.name, Some(&input.sha256), role, path),
            None => leaf(&input.kind, &input.name, &input.sha256, role),
        }
    }

    /// An object, with the digest recorded where it was used (None at the root, or when
    /// the user of it recorded none), and what it was built from.
    fn object(
        &self,
        kind: Kind,
        name: &str,
        recorded: Option<&str>,
        role: Option<String>,
        path: &mut Vec<(Kind, String)>,
    ) -> Input {
        let mut node = Input {
            kind: kind.as_str().to_string(),
            name: name.to_string(),
            role,
            sha256: recorded.unwrap_or_default().to_string(),
            notes: Vec::new(),
            inputs: Vec::new(),
        };
        let key = (kind, name.to_string());
        if path.contains(&key) {
            node.notes.push(Note::Loop);
            return node;
        }
        if !self.snapshot.contains(self.ns, kind, name) {
            node.notes.push(Note::NotFound);
            return node;
        }
        let current = self.digests(kind, name);
        match recorded.filter(|r| !r.is_empty()) {
            None => node.sha256 = current.first().cloned().unwrap_or_default(),
            Some(r) => {
                if let Some(now) = current.first().filter(|_| !current.iter().any(|c| c == r)) {
                    node.notes.push(Note::Changed { now: now.clone() });
                }
            }
        }
        path.push(key);
        self.inputs_of(kind, name, &mut node, path);
        path.pop();
        node
    }

    /// The digests an object can be recorded under, its main one first: a Dataset's
    /// output, a FineTuneJob's adapter (or model) and merged model, a PromptVersion's
    /// digest, what a deployment serves, what an EvalRun evaluated.
    fn digests(&self, kind: Kind, name: &str) -> Vec<String> {
        let (s, ns) = (self.snapshot, self.ns);
        let found: Vec<Option<String>> = match kind {
            Kind::Dataset => {
                vec![s.dataset(ns, name).and_then(|o| Some(o.status.as_ref()?.artifact.as_ref()?.sha256.clone()))]
            }
            Kind::FineTuneJob => {
                let status = s.fine_tune_job(ns, name).and_then(|o| o.status.as_ref());
                vec![
                    status.and_then(|st| Some(st.artifact.as_ref()?.sha256.clone())),
                    status.and_then(|st| Some(st.merged_model.as_ref()?.sha256.clone())),
                ]
            }
            Kind::PromptVersion => vec![s.prompt_version(ns, name).and_then(|o| o.status.as_ref()?.digest.clone())],
            Kind::ModelDeployment => {
                vec![s.deployment(ns, name).and_then(|o| o.status.as_ref()?.served_model_digest.clone())]
            }
            Kind::EvalRun => {
                vec![s.eval_run(ns, name).and_then(|o| o.status.as_ref()?.evaluated.as_ref()?.model_digest.clone())]
            }
        };
        found.into_iter().flatten().filter(|d| !d.is_empty()).collect()
    }

    fn inputs_of(&self, kind: Kind, name: &str, node: &mut Input, path: &mut Vec<(Kind, String)>) {
        let (s, ns) = (self.snapshot, self.ns);
        let recorded = match kind {
            Kind::Dataset => s.dataset(ns, name).and_then(|o| o.status.as_ref()?.lineage.clone()),
            Kind::FineTuneJob => s.fine_tune_job(ns, name).and_then(|o| o.status.as_ref()?.lineage.clone()),
            Kind::PromptVersion => return,
            Kind::ModelDeployment => {
                if let Some(md) = s.deployment(ns, name) {
                    self.served(md, node, path);
                }
                return;
            }
            Kind::EvalRun => {
                self.evaluated(name, node, path);
                return;
            }
        };
        match recorded {
            // An inline Dataset has a lineage with no inputs: its data is its spec.
            Some(lineage) => {
                node.inputs = lineage.inputs.iter().map(|i| self.record(i, None, path)).collect();
            }
            None => node.notes.push(Note::NoLineageYet),
        }
    }

    /// A deployment's served lineage: the model, each adapter with what it was trained
    /// on (as recorded when the revision was made), the prompt.
    fn served(&self, md: &ModelDeployment, node: &mut Input, path: &mut Vec<(Kind, String)>) {
        let Some(lineage) = md.status.as_ref().and_then(|s| s.lineage.as_ref()) else {
            node.notes.push(Note::NoLineageYet);
            return;
        };
        node.notes.push(Note::Info(format!("revision {}", lineage.revision)));
        node.inputs.push(self.record(&lineage.model, Some("model".into()), path));
        for adapter in &lineage.adapters {
            let role = Some(format!("adapter {}", adapter.name));
            let input = match (&adapter.fine_tune_job, &adapter.uri) {
                (Some(job), _) => {
                    let mut input = self.object(Kind::FineTuneJob, job, Some(&adapter.sha256), role, path);
                    // What the revision recorded, not what the job says now.
                    if !input.notes.contains(&Note::Loop) {
                        input.notes.retain(|n| *n != Note::NoLineageYet);
                        path.push((Kind::FineTuneJob, job.clone()));
                        input.inputs = adapter.trained_on.iter().map(|i| self.record(i, None, path)).collect();
                        path.pop();
                    }
                    input
                }
                (None, uri) => leaf("Adapter", uri.as_deref().unwrap_or(&adapter.name), &adapter.sha256, role),
            };
            node.inputs.push(input);
        }
        if let Some(prompt) = &lineage.prompt {
            node.inputs.push(self.record(prompt, Some("prompt".into()), path));
        }
    }

    /// What an EvalRun evaluated, from its spec and the digests in `status.evaluated`.
    fn evaluated(&self, name: &str, node: &mut Input, path: &mut Vec<(Kind, String)>) {
        let Some(run) = self.snapshot.eval_run(self.ns, name) else { return };
        let evaluated = run.status.as_ref().and_then(|s| s.evaluated.clone()).unwrap_or_default();
        let target = &run.spec.target;
        if let Some(model) = &target.model {
            match (&model.fine_tune_job, &model.uri) {
                (Some(job), _) => {
                    node.inputs.push(self.object(Kind::FineTuneJob, job, None, Some("model".into()), path))
                }
                (None, Some(uri)) => {
                    let digest = model.sha256.as_deref().or_else(|| cache_digest(uri)).unwrap_or_default();
                    node.inputs.push(leaf("Model", uri, digest, Some("model".into())))
                }
                (None, None) => {}
            }
        }
        if let Some(adapter) = &target.adapter {
            match (&adapter.fine_tune_job, &adapter.uri) {
                (Some(job), _) => {
                    node.inputs.push(self.object(Kind::FineTuneJob, job, None, Some("adapter".into()), path))
                }
                (None, Some(uri)) => node.inputs.push(leaf(
                    "Adapter",
                    uri,
                    adapter.sha256.as_deref().unwrap_or_default(),
                    Some("adapter".into()),
                )),
                (None, None) => {}
            }
        }
        if let Some(md) = &target.model_deployment {
            let mut input = self.object(Kind::ModelDeployment, md, None, Some("target".into()), path);
            if let Some(revision) = &evaluated.revision {
                input.notes.push(Note::Info(format!("evaluated revision {revision}")));
            }
            node.inputs.push(input);
        }
        if let Some(endpoint) = &target.endpoint {
            node.inputs.push(leaf("Endpoint", &endpoint.url, "", Some("target".into())));
        }
        let dataset = &run.spec.evaluation.dataset.name;
        node.inputs.push(self.object(
            Kind::Dataset,
            dataset,
            evaluated.dataset_digest.as_deref(),
            Some("eval data".into()),
            path,
        ));
        if let Some(prompt) = &run.spec.evaluation.prompt {
            node.inputs.push(self.object(
                Kind::PromptVersion,
                &prompt.name,
                evaluated.prompt_digest.as_deref(),
                Some("prompt".into()),
                path,
            ));
        }
    }
}

/// The digest in a URI of the operator's model cache, `store://models/sha256-<digest>/…`,
/// as a gate names the model it evaluates.
pub fn cache_digest(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("store://models/sha256-")?;
    let digest = rest.split('/').next()?;
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
}

fn leaf(kind: &str, name: &str, sha256: &str, role: Option<String>) -> Input {
    Input {
        kind: kind.to_string(),
        name: name.to_string(),
        role,
        sha256: sha256.to_string(),
        notes: Vec::new(),
        inputs: Vec::new(),
    }
}

/// An input as drawn, with digests short or in full.
#[derive(Debug)]
pub struct Drawn<'a> {
    input: &'a Input,
    full: bool,
    children: Vec<Drawn<'a>>,
}

impl<'a> Drawn<'a> {
    /// `input` and what it was built from, ready to draw.
    pub fn new(input: &'a Input, full: bool) -> Self {
        Drawn { input, full, children: input.inputs.iter().map(|i| Drawn::new(i, full)).collect() }
    }
}

impl TreeNode for Drawn<'_> {
    fn header(&self, paint: &Paint) -> String {
        let i = self.input;
        let mut text = String::new();
        if let Some(role) = &i.role {
            text.push_str(role);
            text.push_str(": ");
        }
        let label = if Kind::from_kind_name(&i.kind).is_some() {
            format!("{}/{}", i.kind, i.name)
        } else {
            format!("{} {}", i.kind, i.name)
        };
        text.push_str(&paint.paint(Tone::Strong, &label));
        text.push_str("  sha256 ");
        text.push_str(&paint.paint(Tone::Faint, &short_digest(&i.sha256, self.full)));
        for note in &i.notes {
            let (tone, words) = match note {
                Note::NotFound => (Tone::Bad, "not found: what it was built from is unknown".to_string()),
                Note::Changed { now } => {
                    (Tone::Busy, format!("changed since: its sha256 is now {}", short_digest(now, self.full)))
                }
                Note::NoLineageYet => (Tone::Busy, "no lineage recorded yet".to_string()),
                Note::Loop => (Tone::Bad, "already above: not followed again".to_string()),
                Note::Info(text) => (Tone::Faint, text.clone()),
            };
            text.push_str("  ");
            text.push_str(&paint.paint(tone, &format!("({words})")));
        }
        text
    }

    fn details(&self, _paint: &Paint) -> Vec<String> {
        Vec::new()
    }

    fn children(&self) -> &[Self] {
        &self.children
    }
}

/// The lineage as text.
pub fn render(root: &Input, full: bool, paint: &Paint) -> String {
    draw(&[Drawn::new(root, full)], paint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn fixture() -> Snapshot {
        Snapshot::from_yaml(include_str!("../tests/fixtures/pipeline.yaml")).unwrap()
    }

    fn lineage(snapshot: &Snapshot, object: &str, full: bool) -> String {
        let root = walk(snapshot, "default", &object.parse().unwrap()).unwrap();
        render(&root, full, &Paint::plain())
    }

    #[test]
    fn a_deployment_goes_back_through_its_adapter_to_the_raw_data_and_base_model() {
        let text = lineage(&fixture(), "md/acme-support", false);
        let expected = "\
ModelDeployment/acme-support  sha256 8fe88bf015b5  (revision 3a4b5c6d7e)
├─ model: Model store://imports/SmolLM2-135M-Instruct.Q4_1.gguf  sha256 9372c470eead
├─ adapter acme-facts: FineTuneJob/acme-facts-lora  sha256 ae1eae1d76e5
│  ├─ Model store://imports/SmolLM2-135M-Instruct.Q4_1.gguf  sha256 9372c470eead
│  └─ Dataset/acme-facts  sha256 e14d1a1446e7
└─ prompt: PromptVersion/acme-support-v1  sha256 cf07194ee232
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn full_digests_are_printed_on_request() {
        let text = lineage(&fixture(), "dataset/acme-facts-heldout", true);
        let expected = "\
Dataset/acme-facts-heldout  sha256 df16c1c51be8437dd9b3608a3acac00ab25f1395a91265780f3793926b9c47fe
└─ Uri store://imports/acme-heldout.jsonl  sha256 ccd46a37c96b938890b6647fd42f68b1d54ff828062d55dfc5d4469689ec1022
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn a_fine_tune_job_follows_its_dataset() {
        let text = lineage(&fixture(), "ftj/acme-facts-lora", false);
        let expected = "\
FineTuneJob/acme-facts-lora  sha256 ae1eae1d76e5
├─ Model store://imports/SmolLM2-135M-Instruct.Q4_1.gguf  sha256 9372c470eead
└─ Dataset/acme-facts  sha256 e14d1a1446e7
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn a_missing_input_is_printed_as_such_and_a_changed_one_is_flagged() {
        let mut snapshot = fixture();
        snapshot.datasets.retain(|d| d.name_any() != "acme-facts");
        let prompt = snapshot.prompt_versions[0].status.as_mut().unwrap();
        prompt.digest = Some("ab".repeat(32));
        let text = lineage(&snapshot, "md/acme-support", false);
        assert!(
            text.contains(
                "│  └─ Dataset/acme-facts  sha256 e14d1a1446e7  (not found: what it was built from is unknown)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "└─ prompt: PromptVersion/acme-support-v1  sha256 cf07194ee232  (changed since: its sha256 is now abababababab)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_eval_run_shows_what_it_evaluated() {
        let text = lineage(&fixture(), "evalrun/acme-support-gate-3a4b5c6d7e-1f2e3d", false);
        let expected = "\
EvalRun/acme-support-gate-3a4b5c6d7e-1f2e3d  sha256 1317322052bd
├─ model: Model store://models/sha256-9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4/SmolLM2-135M-Instruct.Q4_1.gguf  sha256 9372c470eead
├─ adapter: FineTuneJob/acme-facts-lora  sha256 ae1eae1d76e5
│  ├─ Model store://imports/SmolLM2-135M-Instruct.Q4_1.gguf  sha256 9372c470eead
│  └─ Dataset/acme-facts  sha256 e14d1a1446e7
├─ eval data: Dataset/acme-facts-heldout  sha256 df16c1c51be8
│  └─ Uri store://imports/acme-heldout.jsonl  sha256 ccd46a37c96b
└─ prompt: PromptVersion/acme-support-v1  sha256 cf07194ee232
";
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn an_object_that_has_not_started_says_it_has_no_lineage_yet() {
        let mut snapshot = fixture();
        snapshot.fine_tune_jobs[0].status = None;
        let text = lineage(&snapshot, "ftj/acme-facts-lora", false);
        assert_eq!(text, "FineTuneJob/acme-facts-lora  sha256 -  (no lineage recorded yet)\n");
    }

    #[test]
    fn asking_for_an_object_that_does_not_exist_is_an_error() {
        let err = walk(&fixture(), "default", &"dataset/nope".parse().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "Dataset/nope not found in namespace default");
    }

    #[test]
    fn a_loop_in_recorded_lineage_stops() {
        let mut snapshot = fixture();
        let lineage = snapshot.datasets[0].status.as_mut().unwrap().lineage.as_mut().unwrap();
        lineage.inputs.push(LineageInput {
            kind: "FineTuneJob".into(),
            name: "acme-facts-lora".into(),
            sha256: "".into(),
        });
        let text = self::lineage(&snapshot, "ftj/acme-facts-lora", false);
        assert!(
            text.ends_with("   └─ FineTuneJob/acme-facts-lora  sha256 -  (already above: not followed again)\n"),
            "{text}"
        );
    }
}
