//! The generated CRDs (`crds/*.yaml`) compiled by the API stand-in's schema
//! validation, and every example manifest admitted the way kube-apiserver
//! would: the valid ones pass with their defaults filled in, the invalid ones
//! are refused with an error naming the field their `# expect-field:` names.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use peerfill_e2e::apiserver::validation::{CompiledSchema, FieldError, invalid_status};
use serde_json::{Value, json};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// `(apiVersion, kind)` to the compiled schema of that CRD version.
struct Schemas(BTreeMap<(String, String), CompiledSchema>);

impl Schemas {
    fn load() -> Schemas {
        let mut out = BTreeMap::new();
        for file in ["distribution.yaml", "nodefill.yaml"] {
            let path = common::workspace_root().join("crds").join(file);
            for crd in yaml_docs(&path) {
                let group = crd["spec"]["group"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: no spec.group"));
                let kind = crd["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: no kind"));
                let versions = crd["spec"]["versions"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{file}: no versions"));
                assert!(!versions.is_empty(), "{file}: no versions");
                for v in versions {
                    let name = v["name"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{file}: version without name"));
                    let schema = &v["schema"]["openAPIV3Schema"];
                    let compiled = CompiledSchema::compile(schema)
                        .unwrap_or_else(|e| panic!("{file} {name}: schema does not compile: {e}"));
                    out.insert((format!("{group}/{name}"), kind.to_string()), compiled);
                }
            }
        }
        Schemas(out)
    }

    fn for_object(&self, obj: &Value) -> Option<&CompiledSchema> {
        let api_version = obj["apiVersion"].as_str()?;
        let kind = obj["kind"].as_str()?;
        self.0.get(&(api_version.to_string(), kind.to_string()))
    }
}

#[test]
fn every_crd_version_schema_compiles() {
    let schemas = Schemas::load();
    for key in [
        (
            "peerfill.dev/v1alpha1".to_string(),
            "Distribution".to_string(),
        ),
        ("peerfill.dev/v1alpha1".to_string(), "NodeFill".to_string()),
    ] {
        assert!(
            schemas.0.contains_key(&key),
            "no schema for {key:?}; have {:?}",
            schemas.0.keys()
        );
    }
}

#[test]
fn valid_examples_are_admitted_with_defaults() {
    let schemas = Schemas::load();
    let files = common::yaml_files(&common::workspace_root().join("examples")).unwrap_or_default();
    assert!(!files.is_empty(), "no examples/*.yaml yet");
    let mut admitted = 0;
    for file in files {
        for mut doc in yaml_docs(&file) {
            let Some(schema) = schemas.for_object(&doc) else {
                continue;
            };
            if let Err(errs) = schema.admit(&mut doc, None) {
                let msgs: Vec<String> = errs.iter().map(FieldError::message).collect();
                panic!("{} is refused: {msgs:#?}", file.display());
            }
            if doc["kind"] == "Distribution" {
                assert!(
                    doc["spec"]["strategy"]["maxOriginConnections"].is_u64(),
                    "{}: strategy not defaulted: {}",
                    file.display(),
                    doc["spec"]
                );
            }
            admitted += 1;
        }
    }
    assert!(admitted > 0, "no example is a peerfill.dev resource");
}

#[test]
fn invalid_examples_are_refused_naming_the_field() {
    let schemas = Schemas::load();
    let files = common::yaml_files(&common::workspace_root().join("examples").join("invalid"))
        .unwrap_or_default();
    assert!(!files.is_empty(), "no examples/invalid/*.yaml yet");
    for file in files {
        let text = read(&file);
        let expect = common::expected_field(&text)
            .unwrap_or_else(|| panic!("{}: no `# expect-field:` comment", file.display()));
        let mut docs = yaml_docs(&file);
        assert_eq!(
            docs.len(),
            1,
            "{}: one manifest per invalid example",
            file.display()
        );
        let doc = &mut docs[0];
        let schema = schemas
            .for_object(doc)
            .unwrap_or_else(|| panic!("{}: not a peerfill.dev resource", file.display()));
        let errs = match schema.admit(doc, None) {
            Ok(()) => panic!(
                "{} was admitted, expected an error naming {expect}",
                file.display()
            ),
            Err(errs) => errs,
        };
        let status = invalid_status(
            doc["kind"].as_str().unwrap_or_default(),
            "peerfill.dev",
            doc["metadata"]["name"].as_str().unwrap_or_default(),
            &errs,
        );
        let message = status["message"].as_str().unwrap_or_default();
        assert!(
            errs.iter().any(|e| e.field == expect) || message.contains(&expect),
            "{}: no error names {expect}: {message}",
            file.display()
        );
        assert_eq!(status["code"], 422);
        println!("{}: {message}", file.display());
    }
}

fn distribution(spec: Value) -> Value {
    json!({
        "apiVersion": "peerfill.dev/v1alpha1",
        "kind": "Distribution",
        "metadata": {"name": "model", "namespace": "default"},
        "spec": spec,
    })
}

/// The refusals the issue lists, against the real generated schema, so they
/// hold whatever the example files look like.
#[test]
fn the_issue_invalid_manifests_are_refused_naming_the_field() {
    let schemas = Schemas::load();
    let http = json!({"url": "https://origin.example/model.bin"});
    let node = json!({"nodeName": "builder-1", "path": "out/model.bin"});
    let target = json!({"path": "models/m1"});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "two sources",
            json!({"source": {"http": http, "node": node}, "target": target}),
            "spec.source",
        ),
        (
            "no source",
            json!({"source": {}, "target": target}),
            "spec.source",
        ),
        (
            "absolute path",
            json!({"source": {"http": http}, "target": {"path": "/etc/passwd"}}),
            "spec.target.path",
        ),
        (
            "dot-dot in path",
            json!({"source": {"http": http}, "target": {"path": "a/../../etc"}}),
            "spec.target.path",
        ),
        (
            "piece size 0",
            json!({"source": {"http": http}, "target": target, "strategy": {"pieceSize": 0}}),
            "spec.strategy.pieceSize",
        ),
        (
            "piece size huge",
            json!({"source": {"http": http}, "target": target, "strategy": {"pieceSize": 1_u64 << 40}}),
            "spec.strategy.pieceSize",
        ),
        (
            "bad URL scheme",
            json!({"source": {"http": {"url": "ftp://origin.example/model.bin"}}, "target": target}),
            "spec.source.http.url",
        ),
        (
            "bad digest",
            json!({"source": {"http": {"url": "https://origin.example/m", "digest": "md5:abc"}}, "target": target}),
            "spec.source.http.digest",
        ),
    ];
    for (name, spec, field) in cases {
        let mut obj = distribution(spec);
        let schema = schemas
            .for_object(&obj)
            .unwrap_or_else(|| panic!("no Distribution schema"));
        let errs = match schema.admit(&mut obj, None) {
            Ok(()) => panic!("{name}: admitted"),
            Err(errs) => errs,
        };
        let status = invalid_status("Distribution", "peerfill.dev", "model", &errs);
        let message = status["message"].as_str().unwrap_or_default().to_string();
        assert!(
            errs.iter().any(|e| e.field == field) || message.contains(field),
            "{name}: no error names {field}: {message}"
        );
        println!("{name}: {message}");
    }

    // And a minimal valid one gets the documented defaults.
    let mut ok = distribution(json!({"source": {"http": http}, "target": target}));
    let schema = schemas
        .for_object(&ok)
        .unwrap_or_else(|| panic!("no Distribution schema"));
    assert_eq!(schema.admit(&mut ok, None), Ok(()));
    assert_eq!(
        ok["spec"]["strategy"],
        json!({"maxOriginConnections": 16, "priority": 0})
    );
}
