//! The model cache on the real control plane: a model that an https server (started by
//! the test, with a certificate of a CA of its own) serves is downloaded once by the
//! operator's resolver Job into `models/sha256-<digest>/`, every later object reads that
//! copy, and its digest reaches the lineage. A pinned digest the download does not have
//! stalls the object that pinned it, and nothing is cached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use llmops_crds::{Dataset, ModelDeployment};
use llmops_operator::StoreConfig;
use llmops_tests::dev_node::{DevNode, DevNodeConfig, place_on};
use llmops_tests::{Operator, apply, condition, eventually, example, namespace_with_crds};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// An https server on 127.0.0.1 serving a directory, its request log in a file.
struct HttpsServer {
    child: Child,
    port: u16,
    log: PathBuf,
    ca_pem: String,
}

impl HttpsServer {
    fn start(root: &Path, work: &Path) -> Result<Self> {
        std::fs::create_dir_all(work)?;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl").args(args).current_dir(work).output()?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca = [&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"]].concat();
        openssl(&[&ca[..], &["-subj", "/CN=llmops test CA"]].concat())?;
        openssl(
            &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(),
        )?;
        std::fs::write(
            work.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let script = "import functools, http.server, ssl, sys\n\
            port, root, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]\n\
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)\n\
            server = http.server.ThreadingHTTPServer(('127.0.0.1', port), handler)\n\
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            context.load_cert_chain(cert, key)\n\
            server.socket = context.wrap_socket(server.socket, server_side=True)\n\
            server.serve_forever()\n";
        let log = work.join("requests.log");
        let child = Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .arg(root)
            .arg(work.join("server.crt"))
            .arg(work.join("server.key"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting python3's https server")?;
        let ca_pem = std::fs::read_to_string(work.join("ca.crt"))?;
        Ok(Self { child, port, log, ca_pem })
    }

    fn url(&self, file: &str) -> String {
        format!("https://127.0.0.1:{}/{file}", self.port)
    }

    /// How many GET requests for `file` the server answered.
    fn gets(&self, file: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains(&format!("\"GET /{file} "))).count()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ready_reason<K: serde::Serialize>(obj: &K) -> (String, String, bool) {
    let v = serde_json::to_value(obj).unwrap_or_default();
    let conds = v["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let get = |t: &str| conds.iter().find(|c| c["type"] == t).cloned().unwrap_or_default();
    let ready = get("Ready");
    (
        ready["reason"].as_str().unwrap_or_default().to_string(),
        ready["message"].as_str().unwrap_or_default().to_string(),
        get("Stalled")["status"] == "True",
    )
}

#[tokio::test]
async fn a_model_from_an_https_server_is_downloaded_once_and_reused() -> Result<()> {
    let (client, ns) = namespace_with_crds("models-https").await?;
    let work = std::env::temp_dir().join(format!("llmops-https-{}", ns.name));
    let served = work.join("served");
    std::fs::create_dir_all(&served)?;
    let model = llmops_tests::test_model()?;
    let _ = std::fs::remove_file(served.join(MODEL_FILE));
    std::os::unix::fs::symlink(&model, served.join(MODEL_FILE))?;
    let server = HttpsServer::start(&served, &work.join("tls"))?;
    let sha = llmops_worker::store::file_sha256(&model)?;

    // The CA the resolver trusts for downloads, in the operator's namespace.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let bundle: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "model-registry-ca"}, "data": {"ca.crt": server.ca_pem},
    }))?;
    cms.create(&PostParams::default(), &bundle).await?;
    let op = Operator::start_configured(&client, &ns.name, |c| {
        c.address_by_pod_ip = true;
        c.ca_bundle_configmap = Some("model-registry-ca".into());
    })
    .await?;
    let StoreConfig::Local { mount_path: store, .. } = op.config.store.clone() else { bail!("a local store") };
    let node = dev_node(&client, &ns.name).await?;
    let url = server.url(MODEL_FILE);

    // First: a deployment serving the model straight from the URL.
    let mut md = json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "from-https"},
        "spec": {"model": {"uri": url}, "replicas": 1},
    });
    place_on(&mut md, &node.config.node_name);
    // Two more objects need the same URI at the same moment: one resolution serves all.
    let mut early = Vec::new();
    for name in ["early-1", "early-2"] {
        let mut ds = example("dataset.yaml")?;
        ds["metadata"]["name"] = json!(name);
        ds["spec"]["tokenStats"] = json!({"model": {"uri": url}});
        place_on(&mut ds, &node.config.node_name);
        early.push(ds);
    }
    let (a, b, c) = tokio::join!(
        apply(&client, &ns.name, &md),
        apply(&client, &ns.name, &early[0]),
        apply(&client, &ns.name, &early[1])
    );
    a?;
    b?;
    c?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployed = match eventually("the deployment to be Ready", WAIT, || async {
        let m = mds.get("from-https").await?;
        let conds = m.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.status == "True").map(|_| m))
    })
    .await
    {
        Ok(m) => m,
        Err(e) => bail!("{e:#}; Ready is {:?}", ready_reason(&mds.get("from-https").await?)),
    };
    let lineage = deployed.status.and_then(|s| s.lineage).context("lineage")?;
    assert_eq!(lineage.model.name, url, "the lineage names the URI the spec gave");
    assert_eq!(lineage.model.sha256, sha, "and the digest of what was downloaded");
    let cached = store.join(format!("models/sha256-{sha}/{MODEL_FILE}"));
    assert_eq!(llmops_worker::store::file_sha256(&cached)?, sha, "the cache holds the model under its digest");
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    for name in ["early-1", "early-2"] {
        eventually("the Datasets applied with it to succeed", WAIT, || async {
            let d = datasets.get(name).await?;
            let conds = d.status.clone().map(|s| s.common.conditions).unwrap_or_default();
            if condition(&conds, "Failed").is_some_and(|c| c.status == "True") {
                bail!("{name} failed: {:?}", ready_reason(&d));
            }
            Ok(condition(&conds, "Succeeded").filter(|c| c.status == "True").map(|_| ()))
        })
        .await?;
    }
    let downloads = server.gets(MODEL_FILE);
    assert_eq!(downloads, 1, "the resolver downloaded it once for all three");

    // Second: a Dataset whose token statistics use the same model reads the cached copy.
    let mut ds = example("dataset.yaml")?;
    ds["metadata"]["name"] = json!("counted");
    ds["spec"]["tokenStats"] = json!({"model": {"uri": url}});
    place_on(&mut ds, &node.config.node_name);
    apply(&client, &ns.name, &ds).await?;
    let counted = eventually("the Dataset to succeed", WAIT, || async {
        let d = datasets.get("counted").await?;
        let conds = d.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        if condition(&conds, "Failed").is_some_and(|c| c.status == "True") {
            bail!("the Dataset failed: {:?}", ready_reason(&d));
        }
        Ok(condition(&conds, "Succeeded").filter(|c| c.status == "True").map(|_| d))
    })
    .await?;
    let inputs = counted.status.and_then(|s| s.lineage).map(|l| l.inputs).unwrap_or_default();
    assert!(
        inputs.iter().any(|i| i.kind == "Model" && i.name == url && i.sha256 == sha),
        "the tokenizer's model is in the Dataset's lineage: {inputs:?}"
    );
    assert_eq!(server.gets(MODEL_FILE), downloads, "no second download: the cached copy was reused");
    let records = cms.list(&ListParams::default().labels("llmops.dev/kind=ModelResolution")).await?.items;
    assert_eq!(records.len(), 1, "one resolution for the URI");
    let data = records[0].data.clone().unwrap_or_default();
    assert_eq!(data.get("phase").map(String::as_str), Some("Resolved"));
    assert_eq!(data.get("sha256"), Some(&sha));

    // A pinned digest the download does not have: the object stalls, nothing is cached.
    let wrong = "0".repeat(64);
    let mut pinned = example("dataset.yaml")?;
    pinned["metadata"]["name"] = json!("pinned-wrong");
    pinned["spec"]["tokenStats"] = json!({"model": {"uri": url, "sha256": wrong}});
    place_on(&mut pinned, &node.config.node_name);
    apply(&client, &ns.name, &pinned).await?;
    let (reason, message) = eventually("the Dataset to stall", WAIT, || async {
        let d = datasets.get("pinned-wrong").await?;
        let (reason, message, stalled) = ready_reason(&d);
        Ok(stalled.then_some((reason, message)))
    })
    .await?;
    assert_eq!(reason, "ModelResolutionFailed", "{message}");
    assert!(message.contains("DigestMismatch") && message.contains(&wrong) && message.contains(&sha), "{message}");
    assert!(!store.join(format!("models/sha256-{wrong}")).exists());
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns.name);
    assert!(jobs.get_opt("pinned-wrong-prepare").await?.is_none(), "no worker starts on an unverified model");

    node.stop().await?;
    op.stop().await;
    Ok(())
}

async fn dev_node(client: &Client, ns: &str) -> Result<DevNode> {
    let name = format!("dev-{ns}");
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{ns}"));
    DevNode::start(client.clone(), DevNodeConfig::new(name, llmops_tests::worker_binary()?, work_dir)).await
}
