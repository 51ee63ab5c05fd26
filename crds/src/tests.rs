//! Checks of the generated CRDs and of the example manifests against the types.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crate sits in the workspace").to_path_buf()
}

/// The checked-in YAML must be exactly what the types generate. Set LLMOPS_UPDATE_CRDS=1
/// to rewrite it (or run `llmops-operator crds --write crds/manifests`).
#[test]
fn checked_in_crds_match_the_types() {
    let dir = repo_root().join("crds/manifests");
    let update = std::env::var_os("LLMOPS_UPDATE_CRDS").is_some();
    let mut stale = Vec::new();
    let generated = crd_manifests().expect("CRDs serialize");
    for (name, yaml) in &generated {
        let path = dir.join(name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != *yaml {
            if update {
                std::fs::write(&path, yaml).expect("write CRD manifest");
            } else {
                stale.push(name.clone());
            }
        }
    }
    let mut extra: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/manifests exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && !generated.iter().any(|(g, _)| g == n))
        .collect();
    extra.sort();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "crds/manifests is out of date (stale: {stale:?}, not generated: {extra:?}); \
         regenerate with `cargo run -p llmops-operator -- crds --write crds/manifests` \
         or `LLMOPS_UPDATE_CRDS=1 cargo test -p llmops-crds`"
    );
}

fn crd_json(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(crd).expect("CRD serializes")
}

fn schema_of(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
}

/// Visits every schema node with its path.
fn walk<'a>(node: &'a Value, path: String, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(&path, node);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            walk(v, format!("{path}.{k}"), visit);
        }
    }
    if let Some(items) = node.get("items") {
        walk(items, format!("{path}[]"), visit);
    }
    if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
        walk(ap, format!("{path}{{}}"), visit);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = node.get(key).and_then(Value::as_array) {
            for (i, v) in list.iter().enumerate() {
                walk(v, format!("{path}<{key}{i}>"), visit);
            }
        }
    }
}

#[test]
fn no_additional_properties_false_beside_properties() {
    for crd in crds() {
        let json = crd_json(&crd);
        walk(schema_of(&json), String::new(), &mut |path, node| {
            let closed = node.get("additionalProperties") == Some(&Value::Bool(false));
            assert!(
                !(closed && node.get("properties").is_some()),
                "{}: {path} has additionalProperties: false beside properties",
                crd.spec.names.kind
            );
        });
    }
}

/// The apiserver estimates each CEL rule's cost from the sizes of what it reads: every
/// list, string and map under a rule must be bounded, or the CRD is refused.
#[test]
fn every_cel_rule_sits_under_bounded_lists_and_strings() {
    let mut rules = 0;
    let mut unbounded = Vec::new();
    for crd in crds() {
        let json = crd_json(&crd);
        walk(schema_of(&json), String::new(), &mut |path, node| {
            if node.get("x-kubernetes-validations").is_none() {
                return;
            }
            rules += 1;
            // A rule that reads `self` whole costs what the whole subtree can hold; one
            // that reads `self.field` only what that field can hold.
            let texts: Vec<&str> = node["x-kubernetes-validations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["rule"].as_str())
                .collect();
            let whole = texts.iter().any(|t| t.match_indices("self").any(|(i, _)| !t[i + 4..].starts_with('.')));
            let fields: Vec<String> = texts
                .iter()
                .flat_map(|t| t.split("self.").skip(1))
                .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect())
                .collect();
            walk(node, path.to_string(), &mut |inner, n| {
                let relative = &inner[path.len()..];
                let read = whole
                    || relative.is_empty()
                    || fields.iter().any(|f| {
                        relative
                            .strip_prefix('.')
                            .and_then(|r| r.strip_prefix(f.as_str()))
                            .is_some_and(|r| r.is_empty() || r.starts_with(['.', '[', '{']))
                    });
                if !read {
                    return;
                }
                let kind = n.get("type").and_then(Value::as_str);
                let what = format!("{}: {inner} (under the CEL rule at {path:?})", crd.spec.names.kind);
                let bounded = match kind {
                    Some("array") => n.get("maxItems").is_some(),
                    Some("string") => {
                        n.get("maxLength").is_some() || n.get("enum").is_some() || n.get("format").is_some()
                    }
                    Some("object") if n.get("additionalProperties").is_some_and(Value::is_object) => {
                        n.get("maxProperties").is_some()
                    }
                    _ => true,
                };
                if !bounded {
                    unbounded.push(what);
                }
            });
        });
    }
    unbounded.sort();
    unbounded.dedup();
    assert!(unbounded.is_empty(), "unbounded under CEL rules:\n{}", unbounded.join("\n"));
    assert!(rules >= 15, "expected the CEL rules of all kinds, found {rules}");
}

#[test]
fn every_field_has_a_description() {
    for crd in crds() {
        let json = crd_json(&crd);
        let spec = &schema_of(&json)["properties"]["spec"];
        walk(spec, ".spec".into(), &mut |path, node| {
            if path.ends_with("[]") || path.contains('<') || path.contains('{') || path.contains(".tolerations") {
                return;
            }
            assert!(
                node.get("description").and_then(Value::as_str).is_some_and(|d| d.len() > 8),
                "{}: {path} has no description",
                crd.spec.names.kind
            );
        });
    }
}

#[test]
fn every_kind_has_status_columns_short_names_and_category() {
    for crd in crds() {
        let kind = &crd.spec.names.kind;
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{kind}: short names");
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["llmops".to_string()][..]), "{kind}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some(), "{kind}: status subresource");
        assert_eq!(sub.scale.is_some(), kind == "ModelDeployment", "{kind}: scale subresource");
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns.first(), Some(&"Ready"), "{kind}: {columns:?}");
        assert_eq!(columns.last(), Some(&"Age"), "{kind}: {columns:?}");
        assert!(columns.contains(&"Phase"), "{kind}: {columns:?}");
        assert!(columns.len() >= 4, "{kind}: a kind-specific column: {columns:?}");
        let json = crd_json(&crd);
        let conditions = &schema_of(&json)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind}: conditions list-map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
    }
}

/// Loads every document of every YAML file under examples/ into its Rust type.
fn example_documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    let mut dirs = vec![repo_root().join("examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

fn typed<T: serde::de::DeserializeOwned>(file: &Path, value: &Value) -> T {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not load: {e}", file.display(), value["kind"]))
}

#[test]
fn every_example_manifest_loads_into_the_types() {
    let docs = example_documents();
    let mut kinds = std::collections::BTreeSet::new();
    for (file, value) in &docs {
        assert_eq!(value["apiVersion"], "llmops.dev/v1alpha1", "{}", file.display());
        let kind = value["kind"].as_str().expect("kind").to_string();
        match kind.as_str() {
            "Dataset" => drop(typed::<Dataset>(file, value)),
            "FineTuneJob" => drop(typed::<FineTuneJob>(file, value)),
            "PromptVersion" => {
                let pv: PromptVersion = typed(file, value);
                pv.spec.validate().unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            }
            "ModelDeployment" => drop(typed::<ModelDeployment>(file, value)),
            "EvalRun" => drop(typed::<EvalRun>(file, value)),
            other => panic!("{}: unexpected kind {other}", file.display()),
        }
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 5, "examples cover every kind: {kinds:?}");
    let pipeline: std::collections::BTreeSet<String> = docs
        .iter()
        .filter(|(f, _)| f.parent().is_some_and(|p| p.ends_with("pipeline")))
        .map(|(_, v)| v["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(pipeline.len(), 5, "examples/pipeline wires all five kinds: {pipeline:?}");
}

#[test]
fn unknown_enum_value_is_refused_by_the_types() {
    let bad = serde_json::json!({"model": {"uri": "store://m.gguf"}, "dataset": {"name": "d"}, "method": "qlora"});
    let err = serde_json::from_value::<FineTuneJobSpec>(bad).unwrap_err();
    assert!(err.to_string().contains("qlora"), "{err}");
}

#[test]
fn defaults_fill_in_omitted_fields() {
    let spec: FineTuneJobSpec = serde_json::from_value(serde_json::json!({
        "model": {"uri": "store://models/smollm2.gguf"},
        "dataset": {"name": "support"},
        "lora": {}
    }))
    .expect("minimal spec");
    assert_eq!(spec.method, finetune::FineTuneMethod::Lora);
    assert_eq!(spec.lora.expect("lora").rank, 8);
    assert_eq!(spec.hyperparameters.learning_rate, 2e-4);
    assert_eq!(spec.checkpoints.interval_steps, 100);
    // The schema carries the same defaults, so the apiserver fills them in too.
    let json = crd_json(&FineTuneJob::crd());
    let hp = &schema_of(&json)["properties"]["spec"]["properties"]["hyperparameters"]["properties"];
    assert_eq!(hp["learningRate"]["default"], serde_json::json!(2e-4));
    assert_eq!(hp["learningRate"]["exclusiveMinimum"], serde_json::json!(true));
}

/// The apiserver does not range-check `format: int32`: an object holding 2147483648 is
/// stored, and then every typed reader of its kind (the operator's watch) fails on it.
/// Every integer of every kind therefore carries a maximum (and a minimum); those of
/// the spec are chosen per field, not left at the type's limits.
#[test]
fn every_integer_has_a_maximum() {
    let mut missing = Vec::new();
    let mut spec_integers = 0;
    for crd in crds() {
        let json = crd_json(&crd);
        walk(schema_of(&json), String::new(), &mut |path, node| {
            if node.get("type").and_then(Value::as_str) != Some("integer") {
                return;
            }
            let kind = &crd.spec.names.kind;
            let max = node.get("maximum").and_then(Value::as_f64);
            let min = node.get("minimum").and_then(Value::as_f64);
            match (min, max) {
                (Some(min), Some(max)) => {
                    // Bounds beyond 2^53 do not survive a trip through a JSON number.
                    let exact = MAX_SAFE_INTEGER as f64;
                    if max > exact || min < -exact {
                        missing.push(format!("{kind}: {path}: bounds {min}..{max} are not exact JSON numbers"));
                    }
                    if node.get("format").and_then(Value::as_str) == Some("int32") && max > f64::from(i32::MAX) {
                        missing.push(format!("{kind}: {path}: maximum {max} does not fit an int32"));
                    }
                    if path.starts_with(".spec") {
                        spec_integers += 1;
                        if max >= f64::from(i32::MAX) && node.get("format").and_then(Value::as_str) == Some("int32") {
                            missing.push(format!("{kind}: {path}: a spec int32 needs a chosen bound, not the type's"));
                        }
                    }
                }
                _ => missing.push(format!("{kind}: {path}: integer without minimum and maximum")),
            }
        });
    }
    assert!(missing.is_empty(), "integers without bounds:\n{}", missing.join("\n"));
    assert!(spec_integers >= 30, "expected the integers of every kind's spec, found {spec_integers}");
}

/// Every number a user writes in a spec has both bounds, except a threshold's, which
/// CEL keeps within its metric's range (perplexity has no upper end).
#[test]
fn every_spec_number_is_bounded() {
    let mut unbounded = Vec::new();
    for crd in crds() {
        let json = crd_json(&crd);
        let spec = &schema_of(&json)["properties"]["spec"];
        walk(spec, ".spec".into(), &mut |path, node| {
            if node.get("type").and_then(Value::as_str) != Some("number") || path.contains(".thresholds[]") {
                return;
            }
            if node.get("minimum").is_none() || node.get("maximum").is_none() {
                unbounded.push(format!("{}: {path}", crd.spec.names.kind));
            }
        });
    }
    assert!(unbounded.is_empty(), "numbers without both bounds:\n{}", unbounded.join("\n"));
}

/// Every string a user writes in a spec is bounded (maxLength, an enum or a format), and
/// so is every list and map.
#[test]
fn every_spec_string_list_and_map_is_bounded() {
    let mut unbounded = Vec::new();
    for crd in crds() {
        let json = crd_json(&crd);
        let spec = &schema_of(&json)["properties"]["spec"];
        walk(spec, ".spec".into(), &mut |path, node| {
            let kind = &crd.spec.names.kind;
            let bounded = match node.get("type").and_then(Value::as_str) {
                Some("string") => {
                    node.get("maxLength").is_some() || node.get("enum").is_some() || node.get("format").is_some()
                }
                Some("array") => node.get("maxItems").is_some(),
                Some("object") if node.get("additionalProperties").is_some_and(Value::is_object) => {
                    node.get("maxProperties").is_some()
                }
                _ => true,
            };
            if !bounded {
                unbounded.push(format!("{kind}: {path}"));
            }
        });
    }
    assert!(unbounded.is_empty(), "unbounded:\n{}", unbounded.join("\n"));
}

/// Every URI field of every kind carries the rules that refuse file://, pvc:// and
/// . or .. segments.
#[test]
fn every_uri_field_refuses_file_and_pvc_and_dot_segments() {
    let mut uri_fields = 0;
    let mut missing = Vec::new();
    for crd in crds() {
        let json = crd_json(&crd);
        let spec = &schema_of(&json)["properties"]["spec"];
        walk(spec, ".spec".into(), &mut |path, node| {
            if node.get("pattern").and_then(Value::as_str) != Some(URI_PATTERN) {
                return;
            }
            uri_fields += 1;
            let rules = node["x-kubernetes-validations"].to_string();
            for needle in ["file://", "pvc://", "[.][.]?", "store://", "65535"] {
                if !rules.contains(needle) {
                    missing.push(format!("{}: {path} lacks the {needle} rule", crd.spec.names.kind));
                }
            }
        });
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    assert!(uri_fields >= 8, "expected the URI fields of every kind, found {uri_fields}");
}
