//! The CRDs against a real apiserver: they install, the examples are accepted, and
//! invalid specs are refused with a message that names the field.

use std::path::PathBuf;

use llmops_tests::{apply_manifest, client, install_crds, namespace_with_crds, repo_root, yaml_documents};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![repo_root().join(dir)];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("directory exists") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[tokio::test]
async fn every_crd_installs_and_becomes_established() -> anyhow::Result<()> {
    let client = client().await?;
    let names = install_crds(&client).await?;
    assert_eq!(
        names,
        [
            "datasets.llmops.dev",
            "evalruns.llmops.dev",
            "finetunejobs.llmops.dev",
            "modeldeployments.llmops.dev",
            "promptversions.llmops.dev"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn every_example_manifest_is_accepted() -> anyhow::Result<()> {
    let (client, ns) = namespace_with_crds("examples").await?;
    let mut applied = 0;
    for file in yaml_files("examples") {
        for doc in yaml_documents(&file)? {
            let result = apply_manifest(&client, &ns.name, &doc).await?;
            let obj = result.map_err(|msg| anyhow::anyhow!("{} was refused: {msg}", file.display()))?;
            // Defaults from the schema are filled in by the apiserver.
            if doc["kind"] == "FineTuneJob" {
                assert!(obj.data["spec"]["checkpoints"]["keep"].is_i64(), "{}: defaults applied", file.display());
            }
            applied += 1;
        }
    }
    assert!(applied >= 10, "applied {applied} examples");
    Ok(())
}

#[tokio::test]
async fn unknown_fields_are_refused_under_strict_validation() -> anyhow::Result<()> {
    let (client, ns) = namespace_with_crds("unknown-fields").await?;
    let mut doc = yaml_documents(&repo_root().join("examples/finetunejob.yaml"))?.remove(0);
    doc["spec"]["hyperparameters"]["learningRat"] = serde_json::json!(0.1);
    let refused = apply_manifest(&client, &ns.name, &doc).await?.expect_err("an unknown field is refused");
    assert!(refused.contains("spec.hyperparameters.learningRat"), "{refused}");
    // Server-side apply reports it from the typed patch; create/update as "unknown field".
    assert!(refused.contains("field not declared in schema") || refused.contains("unknown field"), "{refused}");

    let mut doc = yaml_documents(&repo_root().join("examples/dataset.yaml"))?.remove(0);
    doc["spec"]["colour"] = serde_json::json!("teal");
    let refused = apply_manifest(&client, &ns.name, &doc).await?.expect_err("an unknown field is refused");
    assert!(refused.contains("spec.colour"), "{refused}");
    Ok(())
}

/// Each file in tests/invalid/ breaks one rule. Its `# expect:` lines must all appear in
/// the apiserver's refusal; with `# update: true` the first document is created and the
/// second, an update of it, must be refused.
#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() -> anyhow::Result<()> {
    let (client, ns) = namespace_with_crds("invalid").await?;
    let files = yaml_files("tests/invalid");
    assert!(files.len() >= 15, "the corpus has {} cases", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let expects: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect:")).map(str::trim).collect();
        let update = text.lines().any(|l| l.trim() == "# update: true");
        assert!(!expects.is_empty(), "{}: no `# expect:` line", file.display());
        let mut docs = yaml_documents(file)?;
        if update {
            assert_eq!(docs.len(), 2, "{}: an update case has two documents", file.display());
            let first = docs.remove(0);
            if let Err(msg) = apply_manifest(&client, &ns.name, &first).await? {
                failures.push(format!("{}: the valid first document was refused: {msg}", file.display()));
                continue;
            }
        }
        assert_eq!(docs.len(), 1, "{}: one manifest per case", file.display());
        match apply_manifest(&client, &ns.name, &docs[0]).await? {
            Ok(_) => failures.push(format!("{}: was accepted", file.display())),
            Err(msg) => {
                for expect in &expects {
                    if !msg.contains(expect) {
                        failures.push(format!("{}: refusal lacks {expect:?}: {msg}", file.display()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The apiserver does not range-check `format: int32` by itself: without a maximum, an
/// object holding 2147483648 is stored, and from then on every typed list and watch of
/// its kind (the operator's) fails to decode it. Each kind refuses such a number, and
/// the typed readers of every kind keep working.
#[tokio::test]
async fn out_of_range_int32_is_refused_for_every_kind() -> anyhow::Result<()> {
    use kube::api::{Api, ListParams};
    let (client, ns) = namespace_with_crds("int32").await?;
    let cases: [(&str, &[&str]); 5] = [
        ("examples/dataset.yaml", &["backoffLimit"]),
        ("examples/finetunejob.yaml", &["hyperparameters", "batchSize"]),
        ("examples/promptversion.yaml", &["parameters", "maxTokens"]),
        ("examples/modeldeployment.yaml", &["serving", "maxQueue"]),
        ("examples/evalrun.yaml", &["concurrency"]),
    ];
    let mut failures = Vec::new();
    for (file, path) in cases {
        for value in [2_147_483_648_i64, 99_999_999_999, -2_147_483_649] {
            let mut doc = yaml_documents(&repo_root().join(file))?.remove(0);
            let mut node = &mut doc["spec"];
            for key in &path[..path.len() - 1] {
                node = &mut node[*key];
            }
            node[path[path.len() - 1]] = serde_json::json!(value);
            let field = format!("spec.{}", path.join("."));
            match apply_manifest(&client, &ns.name, &doc).await? {
                Ok(_) => failures.push(format!("{file}: {field} = {value} was accepted")),
                Err(msg) if !msg.contains(&field) => failures.push(format!("{file}: refusal lacks {field}: {msg}")),
                Err(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing undecodable was stored: typed lists of every kind still work.
    let lp = ListParams::default();
    Api::<llmops_crds::Dataset>::namespaced(client.clone(), &ns.name).list(&lp).await?;
    Api::<llmops_crds::FineTuneJob>::namespaced(client.clone(), &ns.name).list(&lp).await?;
    Api::<llmops_crds::PromptVersion>::namespaced(client.clone(), &ns.name).list(&lp).await?;
    Api::<llmops_crds::ModelDeployment>::namespaced(client.clone(), &ns.name).list(&lp).await?;
    Api::<llmops_crds::EvalRun>::namespaced(client.clone(), &ns.name).list(&lp).await?;
    Ok(())
}

/// CPU and memory are checked as Kubernetes checks quantities.
#[tokio::test]
async fn quantities_are_checked_as_kubernetes_checks_them() -> anyhow::Result<()> {
    let (client, ns) = namespace_with_crds("quantities").await?;
    let mut failures = Vec::new();
    let cases = [
        ("cpu", serde_json::json!("500m"), true),
        ("cpu", serde_json::json!("0.5"), true),
        ("cpu", serde_json::json!(2), true),
        ("memory", serde_json::json!("2Gi"), true),
        ("memory", serde_json::json!("512M"), true),
        ("memory", serde_json::json!("32GB"), false),
        ("cpu", serde_json::json!("-2"), false),
        ("cpu", serde_json::json!("0"), false),
        ("memory", serde_json::json!("lots"), false),
    ];
    for (i, (field, value, accepted)) in cases.into_iter().enumerate() {
        let mut doc = yaml_documents(&repo_root().join("examples/dataset.yaml"))?.remove(0);
        doc["metadata"]["name"] = serde_json::json!(format!("quantity-{i}"));
        doc["spec"]["resources"][field] = value.clone();
        match (apply_manifest(&client, &ns.name, &doc).await?, accepted) {
            (Ok(_), true) => {}
            (Err(msg), false) if msg.contains(&format!("spec.resources.{field}")) => {}
            (result, _) => failures.push(format!("{field}: {value}: {result:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
