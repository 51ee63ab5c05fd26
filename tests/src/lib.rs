//! Test harness for cluster tests: starts (or reuses) the loopback control plane of
//! tests/cluster/, installs the CRDs, gives each test its own namespace and applies
//! manifests the way `kubectl apply --server-side --validate=strict` does.
#![forbid(unsafe_code)]

pub mod dev_node;
pub mod s3;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::{Client, Config};
use serde_json::Value;

/// Field manager of everything the tests apply.
pub const FIELD_MANAGER: &str = "llmops-tests";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the repo").to_path_buf()
}

static KUBECONFIG: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Path of the test cluster's kubeconfig: `LLMOPS_TEST_KUBECONFIG` when set, otherwise
/// whatever `tests/cluster/up` prints (it starts the cluster, or reuses a running one).
pub fn kubeconfig() -> Result<PathBuf> {
    KUBECONFIG
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("LLMOPS_TEST_KUBECONFIG") {
                return Ok(PathBuf::from(path));
            }
            let up = repo_root().join("tests/cluster/up");
            let out = std::process::Command::new(&up)
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", up.display()))?;
            if !out.status.success() {
                return Err(format!("{} failed with {}", up.display(), out.status));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().unwrap_or_default().trim().to_string();
            if last.is_empty() {
                return Err(format!("{} printed no kubeconfig path", up.display()));
            }
            Ok(PathBuf::from(last))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A client of the test cluster. Each test makes its own, since a client belongs to the
/// runtime it was made in.
pub async fn client() -> Result<Client> {
    let path = kubeconfig()?;
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Server-side apply with strict field validation, as `kubectl apply --server-side
/// --validate=strict` does.
pub fn strict_apply() -> PatchParams {
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    params.field_validation = Some(ValidationDirective::Strict);
    params
}

/// Polls `check` every 200 ms until it returns Some, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > timeout {
            let detail = last_error.map(|e| format!(": last error: {e:#}")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs every CRD of crds/manifests (server-side apply) and waits until each is
/// Established. Idempotent.
pub async fn install_crds(client: &Client) -> Result<Vec<String>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = repo_root().join("crds/manifests");
    let mut names = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.sort();
    for file in files {
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&std::fs::read_to_string(&file)?)
            .with_context(|| format!("parsing {}", file.display()))?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(&name, &strict_apply(), &Patch::Apply(&crd))
            .await
            .with_context(|| format!("the apiserver refused {}", file.display()))?;
        names.push(name);
    }
    for name in &names {
        eventually(&format!("CRD {name} to be Established"), Duration::from_secs(30), || async {
            let crd = api.get(name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        })
        .await?;
    }
    Ok(names)
}

/// A namespace of one test, deleted when dropped.
pub struct TestNamespace {
    /// Its name.
    pub name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates a namespace named after the test, with a unique suffix.
    pub async fn create(client: &Client, test: &str) -> Result<Self> {
        let suffix = format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos()
        );
        let base: String =
            test.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let name = format!("t-{}-{suffix}", base.chars().take(40).collect::<String>().trim_matches('-'));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"llmops.dev/test": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        Ok(Self { name, kubeconfig: kubeconfig()? })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be shutting down: delete from a
        // thread with its own runtime.
        let name = self.name.clone();
        let path = self.kubeconfig.clone();
        let deleted = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let kubeconfig = Kubeconfig::read_from(&path)?;
                let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
                let client = Client::try_from(config)?;
                Api::<Namespace>::all(client).delete(&name, &DeleteParams::background()).await?;
                Ok(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("warning: could not delete test namespace {}", self.name);
        }
    }
}

/// A client, the CRDs installed, and a fresh namespace for the test `test`.
pub async fn namespace_with_crds(test: &str) -> Result<(Client, TestNamespace)> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, test).await?;
    Ok((client, ns))
}

/// Every non-empty document of a YAML file.
pub fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Server-side applies one manifest into `namespace` with strict field validation.
/// Returns the apiserver's refusal as text, so tests can assert what it says.
pub async fn apply_manifest(
    client: &Client,
    namespace: &str,
    manifest: &Value,
) -> Result<Result<DynamicObject, String>> {
    let api_version = manifest["apiVersion"].as_str().context("manifest without apiVersion")?;
    let kind = manifest["kind"].as_str().context("manifest without kind")?;
    let name = manifest["metadata"]["name"].as_str().context("manifest without metadata.name")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {api_version} {kind}"))?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let mut manifest = manifest.clone();
    manifest["metadata"]["namespace"] = Value::String(namespace.to_string());
    match api.patch(name, &strict_apply(), &Patch::Apply(&manifest)).await {
        Ok(obj) => Ok(Ok(obj)),
        Err(kube::Error::Api(status)) => Ok(Err(status.message)),
        Err(other) => Err(other.into()),
    }
}

/// Path of SmolLM2-135M-Instruct (Q4_1 GGUF): `LLMOPS_TEST_MODEL`, or what
/// scripts/fetch-test-model prints (it downloads the model once into the cache).
pub fn test_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LLMOPS_TEST_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let script = repo_root().join("scripts/fetch-test-model");
    let out = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed with {}", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(stdout.lines().last().unwrap_or_default().trim()))
}

/// The `llmops-worker` binary built beside this test binary (`cargo test --workspace`
/// builds it; `cargo build -p llmops-worker` does too).
pub fn worker_binary() -> Result<PathBuf> {
    target_binary("llmops-worker")
}

/// The `llmops-operator` binary of this build (`cargo test --workspace` builds it).
pub fn operator_binary() -> Result<PathBuf> {
    target_binary("llmops-operator")
}

fn target_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("the test binary has no target directory")?;
    let binary = dir.join(name);
    if !binary.is_file() {
        bail!("{} is missing; build it with `cargo build -p {name}`", binary.display());
    }
    Ok(binary)
}

/// The test cluster's apiserver as pods reach it (for a dev node's in-cluster
/// credentials): its URL and its CA, from the test kubeconfig.
pub fn apiserver() -> Result<dev_node::ApiServer> {
    let path = kubeconfig()?;
    let config = Kubeconfig::read_from(&path)?;
    let cluster = config.clusters.first().and_then(|c| c.cluster.clone()).context("the kubeconfig has no cluster")?;
    let url = cluster.server.context("the kubeconfig's cluster has no server")?;
    let ca_file = match (cluster.certificate_authority, cluster.certificate_authority_data) {
        (Some(file), _) => path.parent().unwrap_or(Path::new("/")).join(file),
        (None, Some(data)) => {
            // ByteString's serde form is base64, as the kubeconfig's.
            let pem: k8s_openapi::ByteString = serde_json::from_value(Value::String(data.trim().to_string()))?;
            let file = std::env::temp_dir().join(format!("llmops-test-ca-{}.crt", std::process::id()));
            std::fs::write(&file, pem.0)?;
            file
        }
        (None, None) => bail!("the kubeconfig names no CA"),
    };
    Ok(dev_node::ApiServer { url, ca_file })
}

/// The first document of `examples/pipeline/<name>`.
pub fn example(name: &str) -> Result<Value> {
    let docs = yaml_documents(&repo_root().join("examples/pipeline").join(name))?;
    docs.into_iter().next().context("empty example")
}

/// Applies a manifest like [`apply_manifest`], failing when the apiserver refuses it.
pub async fn apply(client: &Client, ns: &str, manifest: &Value) -> Result<()> {
    if let Err(refusal) = apply_manifest(client, ns, manifest).await? {
        bail!("the apiserver refused the manifest: {refusal}");
    }
    Ok(())
}

/// Waits until `name` has condition `condition_type` True and returns it; fails at once
/// when its Failed condition turns True, and on timeout, with its conditions.
pub async fn until_condition<K>(api: &Api<K>, name: &str, condition_type: &str, timeout: Duration) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let found = eventually(&format!("{name} to be {condition_type}"), timeout, || async {
        let obj = api.get(name).await?;
        let v = serde_json::to_value(&obj)?;
        let conds = v["status"]["conditions"].as_array().cloned().unwrap_or_default();
        if conds.iter().any(|c| c["type"] == "Failed" && c["status"] == "True") {
            bail!("{name} failed: {conds:?}");
        }
        Ok(conds.iter().any(|c| c["type"] == condition_type && c["status"] == "True").then_some(obj))
    })
    .await;
    match found {
        Ok(obj) => Ok(obj),
        Err(e) => {
            let v = serde_json::to_value(api.get(name).await?)?;
            bail!("{e:#}; its conditions: {}", v["status"]["conditions"])
        }
    }
}

/// The condition of type `t`.
pub fn condition<'a>(
    conds: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conds.iter().find(|c| c.type_ == t)
}

static KSTATUS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Path of the kstatus helper (`tests/kstatus`, cli-utils' `kstatus/status` package in
/// a Go main), built when missing (its version carries a hash of its sources, so an
/// edited helper is rebuilt rather than reused).
pub fn kstatus_binary() -> Result<PathBuf> {
    KSTATUS.get_or_init(|| cluster_tool("kstatus")).clone().map_err(|e| anyhow!(e))
}

/// Path of helm, as tests/cluster/build builds it.
pub fn helm_binary() -> Result<PathBuf> {
    HELM.get_or_init(|| cluster_tool("helm")).clone().map_err(|e| anyhow!(e))
}

/// `bin_path NAME` of tests/cluster/lib.sh, built with `tests/cluster/build NAME` when
/// missing.
fn cluster_tool(name: &str) -> Result<PathBuf, String> {
    let cluster = repo_root().join("tests/cluster");
    let path = std::process::Command::new("bash")
        .args(["-c", r#"source "$1" && bin_path "$2""#, "bash"])
        .arg(cluster.join("lib.sh"))
        .arg(name)
        .output()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !path.status.success() {
        return Err(format!("bin_path {name} failed: {}", String::from_utf8_lossy(&path.stderr)));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&path.stdout).trim());
    if !path.is_file() {
        let build = cluster.join("build");
        // Its progress goes to stderr, so that stdout stays the test's.
        let out = std::process::Command::new(&build)
            .arg(name)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", build.display()))?;
        if !out.status.success() || !path.is_file() {
            return Err(format!(
                "`{} {name}` failed with {}: {}{}",
                build.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(path)
}

/// The kstatus health of one object, as Flux and cli-utils compute it
/// (`status.Compute` of sigs.k8s.io/cli-utils): `(status, message)`, the status one of
/// `Current`, `InProgress`, `Failed`, `Terminating`, `NotFound` or `Unknown`.
pub fn kstatus(object: &Value) -> Result<(String, String)> {
    use std::io::Write;
    let binary = kstatus_binary()?;
    let mut child = std::process::Command::new(&binary)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    let input = serde_json::to_vec(object)?;
    child.stdin.take().context("kstatus stdin")?.write_all(&input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("kstatus failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let [line] = lines.as_slice() else { bail!("kstatus judged {} objects, not one: {stdout}", lines.len()) };
    // `<Kind>/<name> <Status> <message>`; the name has no spaces, the message may.
    let mut fields = line.splitn(3, ' ');
    let _id = fields.next();
    let status = fields.next().filter(|s| !s.is_empty()).with_context(|| format!("kstatus printed {line:?}"))?;
    Ok((status.to_string(), fields.next().unwrap_or_default().trim().to_string()))
}

/// An operator running in the calling test's runtime, watching one namespace, with its
/// gateway on a free port of 127.0.0.1 and a hostPath store under the temp dir.
pub struct Operator {
    task: tokio::task::JoinHandle<Result<()>>,
    /// The gateway's host:port.
    pub addr: String,
    /// What it was started with.
    pub config: llmops_operator::Config,
}

impl Operator {
    /// Starts an operator for `namespace`.
    pub async fn start(client: &Client, namespace: &str) -> Result<Self> {
        Self::start_configured(client, namespace, |_| {}).await
    }

    /// Starts an operator for `namespace`, with `adjust` changing its configuration.
    pub async fn start_configured(
        client: &Client,
        namespace: &str,
        adjust: impl FnOnce(&mut llmops_operator::Config),
    ) -> Result<Self> {
        use llmops_operator::{Config, StoreConfig, StoreVolume};
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let store: PathBuf = std::env::temp_dir().join(format!("llmops-store-{namespace}"));
        let mut config = Config::new(addr.parse()?, addr.clone());
        config.namespaces = vec![namespace.to_string()];
        config.resolver_namespace = namespace.to_string();
        // Resolver pods go to the development node of the namespace when a test starts one
        // (`dev-<namespace>`); elsewhere they stay pending and a test runs them itself.
        config.resolver_node_selector = BTreeMap::from([
            (dev_node::NODE_LABEL.to_string(), "true".to_string()),
            ("kubernetes.io/hostname".to_string(), format!("dev-{namespace}")),
        ]);
        config.resolver_tolerations = vec![dev_node::NODE_TAINT.to_string()];
        config.store = StoreConfig::Local { mount_path: store.clone(), volume: StoreVolume::HostPath(store) };
        config.progress_interval = Duration::from_millis(200);
        config.checkpoint_grace = Duration::from_secs(3);
        adjust(&mut config);
        Self::start_with(client, config).await
    }

    /// Starts an operator with `config`.
    pub async fn start_with(client: &Client, config: llmops_operator::Config) -> Result<Self> {
        let addr = config.gateway_address.clone();
        let task = tokio::spawn(llmops_operator::run(client.clone(), config.clone()));
        // The gateway listens once run() has bound its port.
        eventually("the gateway to listen", Duration::from_secs(60), || async {
            Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()))
        })
        .await?;
        Ok(Self { task, addr, config })
    }

    /// Stops the operator, as a crash or a rollout would.
    pub async fn stop(self) -> llmops_operator::Config {
        self.task.abort();
        let _ = self.task.await;
        self.config
    }

    /// A gRPC client of its gateway.
    pub async fn client(
        &self,
    ) -> Result<llmops_proto::v1::worker_gateway_client::WorkerGatewayClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))?.connect().await?;
        Ok(llmops_proto::v1::worker_gateway_client::WorkerGatewayClient::new(channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A custom object with `generation` 2 and the given status.
    fn object(status: Value) -> Value {
        json!({"apiVersion": "llmops.dev/v1alpha1", "kind": "Dataset",
               "metadata": {"name": "d", "namespace": "n", "generation": 2}, "status": status})
    }

    fn cond(type_: &str, status: &str) -> Value {
        json!({"type": type_, "status": status, "reason": "Because", "message": format!("{type_} is {status}"),
               "lastTransitionTime": "2025-01-01T00:00:00Z"})
    }

    #[test]
    fn kstatus_reads_conditions_and_generations_as_flux_does() -> Result<()> {
        let current = kstatus(&object(json!({"observedGeneration": 2, "conditions": [cond("Ready", "True")]})))?;
        assert_eq!(current.0, "Current", "{current:?}");
        let reconciling = kstatus(&object(json!({"observedGeneration": 2, "conditions": [
            cond("Reconciling", "True"), cond("Ready", "False")]})))?;
        assert_eq!(reconciling, ("InProgress".into(), "Reconciling is True".into()));
        let stalled = kstatus(&object(json!({"observedGeneration": 2, "conditions": [
            cond("Stalled", "True"), cond("Ready", "False")]})))?;
        assert_eq!(stalled, ("Failed".into(), "Stalled is True".into()));
        let behind = kstatus(&object(json!({"observedGeneration": 1, "conditions": [cond("Ready", "True")]})))?;
        assert_eq!(behind.0, "InProgress", "{behind:?}");
        assert!(behind.1.contains("observed generation is 1"), "{behind:?}");
        Ok(())
    }
}
