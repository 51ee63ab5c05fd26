//! The five llmops kinds as the plugin sees them: their names on the command line, and a
//! snapshot of the objects of one namespace (or all) that the pure steps walk.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::{Api, ListParams};
use kube::{Client, Resource, ResourceExt};
use llmops_crds::{Dataset, EvalRun, FineTuneJob, ModelDeployment, PromptVersion};
use serde::de::DeserializeOwned;

/// One of the llmops kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Prepared data; the start of a pipeline.
    Dataset,
    /// A prompt template; an input of evaluations and deployments.
    PromptVersion,
    /// A fine-tune of a model on a Dataset.
    FineTuneJob,
    /// A served model.
    ModelDeployment,
    /// An evaluation.
    EvalRun,
}

impl Kind {
    /// Every kind, in the order a pipeline reads (what comes first sorts first).
    pub const ALL: [Kind; 5] =
        [Kind::Dataset, Kind::PromptVersion, Kind::FineTuneJob, Kind::ModelDeployment, Kind::EvalRun];

    /// The kind as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dataset => "Dataset",
            Kind::PromptVersion => "PromptVersion",
            Kind::FineTuneJob => "FineTuneJob",
            Kind::ModelDeployment => "ModelDeployment",
            Kind::EvalRun => "EvalRun",
        }
    }

    /// The resource name, as in `datasets.llmops.dev`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Dataset => "datasets",
            Kind::PromptVersion => "promptversions",
            Kind::FineTuneJob => "finetunejobs",
            Kind::ModelDeployment => "modeldeployments",
            Kind::EvalRun => "evalruns",
        }
    }

    /// The kind a lineage record names (`LineageInput.kind`), when it is an llmops object
    /// rather than a model or data URI.
    pub fn from_kind_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// A kind as typed on the command line: the kind, its plural or a short name as
    /// `kubectl get` accepts them, in any case, optionally followed by `.llmops.dev`.
    pub fn parse(text: &str) -> Option<Kind> {
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_suffix(".llmops.dev").unwrap_or(&lower);
        Some(match name {
            "dataset" | "datasets" | "dset" => Kind::Dataset,
            "promptversion" | "promptversions" | "pver" | "prompt" => Kind::PromptVersion,
            "finetunejob" | "finetunejobs" | "ftj" | "ft" => Kind::FineTuneJob,
            "modeldeployment" | "modeldeployments" | "md" | "mdep" => Kind::ModelDeployment,
            "evalrun" | "evalruns" | "er" | "eval" => Kind::EvalRun,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `<kind>/<name>` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// The kind.
    pub kind: Kind,
    /// The object's name.
    pub name: String,
}

impl std::str::FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kind, name)) = s.split_once('/') else {
            return Err(format!("expected KIND/NAME, such as dataset/acme-facts or md/acme-support, not {s:?}"));
        };
        let kind = Kind::parse(kind).ok_or_else(|| {
            format!(
                "unknown kind {kind:?}: one of dataset (dset), finetunejob (ftj, ft), promptversion (pver, prompt), \
                 modeldeployment (md, mdep), evalrun (er, eval)"
            )
        })?;
        if name.is_empty() || name.contains('/') {
            return Err(format!("expected KIND/NAME, not {s:?}"));
        }
        Ok(ObjectRef { kind, name: name.to_string() })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// The llmops objects of one namespace, or of every namespace, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Datasets.
    pub datasets: Vec<Dataset>,
    /// PromptVersions.
    pub prompt_versions: Vec<PromptVersion>,
    /// FineTuneJobs.
    pub fine_tune_jobs: Vec<FineTuneJob>,
    /// ModelDeployments.
    pub deployments: Vec<ModelDeployment>,
    /// EvalRuns.
    pub eval_runs: Vec<EvalRun>,
}

/// Why the objects could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The apiserver does not serve the kind: the CRDs are not installed.
    #[error(
        "the apiserver does not know {resource}: are the llmops CRDs installed? \
         (llmops-operator crds | kubectl apply --server-side -f -, or the Helm chart)"
    )]
    NotInstalled {
        /// `<plural>.llmops.dev`.
        resource: String,
    },
    /// RBAC refused the list.
    #[error("not allowed to list {resource} {scope}: {message}")]
    Forbidden {
        /// `<plural>.llmops.dev`.
        resource: String,
        /// `in namespace X` or `in all namespaces`.
        scope: String,
        /// The apiserver's message.
        message: String,
    },
    /// Anything else the client reported.
    #[error("listing {resource} {scope}")]
    Api {
        /// `<plural>.llmops.dev`.
        resource: String,
        /// `in namespace X` or `in all namespaces`.
        scope: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

impl Snapshot {
    /// Reads every llmops object of `namespace`, or of all namespaces when it is None.
    pub async fn fetch(client: &Client, namespace: Option<&str>) -> Result<Self, FetchError> {
        Ok(Snapshot {
            datasets: list(client, namespace, Kind::Dataset).await?,
            prompt_versions: list(client, namespace, Kind::PromptVersion).await?,
            fine_tune_jobs: list(client, namespace, Kind::FineTuneJob).await?,
            deployments: list(client, namespace, Kind::ModelDeployment).await?,
            eval_runs: list(client, namespace, Kind::EvalRun).await?,
        })
    }

    /// Objects from YAML documents (fixtures, `kubectl get -o yaml` output); documents of
    /// other kinds are skipped, and a `kind: List` is read item by item.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        use serde::Deserialize;
        let mut snapshot = Snapshot::default();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = serde_json::Value::deserialize(doc)?;
            snapshot.add_value(value).map_err(|e| anyhow::anyhow!("document {}: {e}", i + 1))?;
        }
        Ok(snapshot)
    }

    fn add_value(&mut self, value: serde_json::Value) -> Result<(), serde_json::Error> {
        match value["kind"].as_str().unwrap_or_default() {
            "List" => {
                if let serde_json::Value::Array(items) = value["items"].clone() {
                    for item in items {
                        self.add_value(item)?;
                    }
                }
            }
            "Dataset" => self.datasets.push(serde_json::from_value(value)?),
            "PromptVersion" => self.prompt_versions.push(serde_json::from_value(value)?),
            "FineTuneJob" => self.fine_tune_jobs.push(serde_json::from_value(value)?),
            "ModelDeployment" => self.deployments.push(serde_json::from_value(value)?),
            "EvalRun" => self.eval_runs.push(serde_json::from_value(value)?),
            _ => {}
        }
        Ok(())
    }

    /// Whether it holds no object at all.
    pub fn is_empty(&self) -> bool {
        self.datasets.is_empty()
            && self.prompt_versions.is_empty()
            && self.fine_tune_jobs.is_empty()
            && self.deployments.is_empty()
            && self.eval_runs.is_empty()
    }

    /// The namespaces its objects live in, sorted.
    pub fn namespaces(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.extend(self.datasets.iter().filter_map(|o| o.namespace()));
        out.extend(self.prompt_versions.iter().filter_map(|o| o.namespace()));
        out.extend(self.fine_tune_jobs.iter().filter_map(|o| o.namespace()));
        out.extend(self.deployments.iter().filter_map(|o| o.namespace()));
        out.extend(self.eval_runs.iter().filter_map(|o| o.namespace()));
        out
    }

    /// The Dataset `name` of namespace `ns`.
    pub fn dataset(&self, ns: &str, name: &str) -> Option<&Dataset> {
        find(&self.datasets, ns, name)
    }

    /// The PromptVersion `name` of namespace `ns`.
    pub fn prompt_version(&self, ns: &str, name: &str) -> Option<&PromptVersion> {
        find(&self.prompt_versions, ns, name)
    }

    /// The FineTuneJob `name` of namespace `ns`.
    pub fn fine_tune_job(&self, ns: &str, name: &str) -> Option<&FineTuneJob> {
        find(&self.fine_tune_jobs, ns, name)
    }

    /// The ModelDeployment `name` of namespace `ns`.
    pub fn deployment(&self, ns: &str, name: &str) -> Option<&ModelDeployment> {
        find(&self.deployments, ns, name)
    }

    /// The EvalRun `name` of namespace `ns`.
    pub fn eval_run(&self, ns: &str, name: &str) -> Option<&EvalRun> {
        find(&self.eval_runs, ns, name)
    }

    /// Whether namespace `ns` holds `kind`/`name`.
    pub fn contains(&self, ns: &str, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Dataset => self.dataset(ns, name).is_some(),
            Kind::PromptVersion => self.prompt_version(ns, name).is_some(),
            Kind::FineTuneJob => self.fine_tune_job(ns, name).is_some(),
            Kind::ModelDeployment => self.deployment(ns, name).is_some(),
            Kind::EvalRun => self.eval_run(ns, name).is_some(),
        }
    }
}

fn find<'a, K: ResourceExt>(objects: &'a [K], ns: &str, name: &str) -> Option<&'a K> {
    objects.iter().find(|o| o.namespace().as_deref() == Some(ns) && o.name_any() == name)
}

fn scope(namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("in namespace {ns}"),
        None => "in all namespaces".to_string(),
    }
}

async fn list<K>(client: &Client, namespace: Option<&str>, kind: Kind) -> Result<Vec<K>, FetchError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + fmt::Debug
        + ResourceExt,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let resource = format!("{}.{}", kind.plural(), llmops_crds::GROUP);
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|o| (o.namespace(), o.name_any()));
            Ok(items)
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Err(FetchError::NotInstalled { resource }),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            Err(FetchError::Forbidden { resource, scope: scope(namespace), message: status.message.clone() })
        }
        Err(source) => Err(FetchError::Api { resource, scope: scope(namespace), source }),
    }
}

/// The metadata of `kind`/`name` in `namespace`, or None when it does not exist.
pub async fn get_metadata(client: &Client, namespace: &str, object: &ObjectRef) -> kube::Result<Option<ObjectMeta>> {
    async fn get<K>(client: &Client, ns: &str, name: &str) -> kube::Result<Option<ObjectMeta>>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + fmt::Debug,
    {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        Ok(api.get_opt(name).await?.map(|o| o.meta().clone()))
    }
    let name = object.name.as_str();
    match object.kind {
        Kind::Dataset => get::<Dataset>(client, namespace, name).await,
        Kind::PromptVersion => get::<PromptVersion>(client, namespace, name).await,
        Kind::FineTuneJob => get::<FineTuneJob>(client, namespace, name).await,
        Kind::ModelDeployment => get::<ModelDeployment>(client, namespace, name).await,
        Kind::EvalRun => get::<EvalRun>(client, namespace, name).await,
    }
}

/// The condition of type `type_`.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The first `n` characters of a digest (all of it when `full`); `-` when there is none.
pub fn short_digest(sha256: &str, full: bool) -> String {
    if sha256.is_empty() {
        "-".to_string()
    } else if full {
        sha256.to_string()
    } else {
        sha256.chars().take(12).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_read_as_kubectl_reads_them() {
        assert_eq!(Kind::parse("md"), Some(Kind::ModelDeployment));
        assert_eq!(Kind::parse("FineTuneJob"), Some(Kind::FineTuneJob));
        assert_eq!(Kind::parse("datasets.llmops.dev"), Some(Kind::Dataset));
        assert_eq!(Kind::parse("eval"), Some(Kind::EvalRun));
        assert_eq!(Kind::parse("pods"), None);
        let r: ObjectRef = "ftj/acme-facts-lora".parse().unwrap();
        assert_eq!(r, ObjectRef { kind: Kind::FineTuneJob, name: "acme-facts-lora".into() });
        assert!("acme".parse::<ObjectRef>().unwrap_err().contains("KIND/NAME"));
        assert!("pod/x".parse::<ObjectRef>().unwrap_err().contains("unknown kind"));
    }

    #[test]
    fn digests_are_shortened_unless_asked_for_in_full() {
        let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(short_digest(sha, false), "0123456789ab");
        assert_eq!(short_digest(sha, true), sha);
        assert_eq!(short_digest("", false), "-");
    }
}
