//! Every example manifest parses as a `Distribution`; `validate()` accepts
//! the valid ones and refuses each invalid one naming the field its
//! `# expect-field:` line announces (the same field the API server must
//! name when `kubectl apply` refuses it).

use std::path::{Path, PathBuf};

use peerfill_crds::Distribution;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The example files that hold a Distribution (the others show workloads).
fn distribution_files() -> Vec<PathBuf> {
    yaml_files(&examples_dir())
        .into_iter()
        .filter(|p| read(p).lines().any(|l| l == "kind: Distribution"))
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse(path: &Path) -> Result<Distribution, serde_saphyr::Error> {
    serde_saphyr::from_str(&read(path))
}

/// The field named on the first line, `# expect-field: <path>`.
fn expected_field(path: &Path) -> String {
    let text = read(path);
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("# expect-field: ")
        .unwrap_or_else(|| {
            panic!(
                "{} must start with '# expect-field: <path>'",
                path.display()
            )
        })
        .trim()
        .to_owned()
}

#[test]
fn valid_examples_parse_and_validate() {
    let files = distribution_files();
    let names: Vec<_> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .collect();
    assert_eq!(
        names,
        [
            "http.yaml",
            "model-directory.yaml",
            "node-directory.yaml",
            "node-pool.yaml",
            "node-source.yaml"
        ]
    );
    for path in &files {
        let dist = parse(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(dist.metadata.namespace, None, "{}", path.display());
        assert!(dist.metadata.name.is_some(), "{}", path.display());
        if let Err(e) = dist.validate() {
            panic!("{} is refused: {e}", path.display());
        }
    }
}

#[test]
fn examples_round_trip_through_yaml() {
    for path in distribution_files() {
        let dist = parse(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let yaml = serde_saphyr::to_string(&dist).expect("serializes");
        let again: Distribution = serde_saphyr::from_str(&yaml)
            .unwrap_or_else(|e| panic!("{} re-parsed: {e}\n{yaml}", path.display()));
        assert_eq!(dist, again, "{}", path.display());
    }
}

#[test]
fn valid_examples_cover_each_source_and_targeting() {
    let http = parse(&examples_dir().join("http.yaml")).expect("http.yaml parses");
    let http_source = http.spec.source.http.as_ref().expect("http source");
    assert!(http_source.digest.is_some() && http_source.headers_from.is_some());
    assert!(http.spec.strategy.max_download_bytes_per_second.is_some());

    let node = parse(&examples_dir().join("node-source.yaml")).expect("node-source.yaml parses");
    assert_eq!(
        node.spec.source.node.as_ref().map(|n| n.node_name.as_str()),
        Some("build-01")
    );

    // A model-shaped directory: shards with digests, small files without,
    // one file from its own URL, the rest from the base URL.
    let dir = parse(&examples_dir().join("model-directory.yaml")).expect("parses");
    let dir_source = dir.spec.source.http.as_ref().expect("http source");
    assert!(dir_source.url.ends_with('/') && dir_source.digest.is_none());
    let shards: Vec<_> = dir_source
        .files
        .iter()
        .filter(|f| f.path.ends_with(".safetensors"))
        .collect();
    assert_eq!(shards.len(), 4);
    assert!(shards.iter().all(|f| f.digest.is_some()));
    assert!(dir_source.files.iter().any(|f| f.path == "config.json"));
    assert_eq!(
        dir_source.files.iter().filter(|f| f.url.is_some()).count(),
        1
    );
    let urls = dir_source.file_urls();
    assert_eq!(urls[0], format!("{}config.json", dir_source.url));

    let node_dir = parse(&examples_dir().join("node-directory.yaml")).expect("parses");
    assert!(node_dir.spec.source.node.is_some());

    let pool = parse(&examples_dir().join("node-pool.yaml")).expect("node-pool.yaml parses");
    assert!(!pool.spec.target.node_selector.is_empty());
    assert_eq!(pool.spec.target.tolerations.len(), 1);
    assert!(pool.spec.target.node_affinity.is_some());
}

/// `consume.yaml` reads what `http.yaml` distributes: its required node
/// affinity names the label the agents set for that Distribution, and its
/// hostPath is the chart's data root joined with the target's directory.
#[test]
fn consume_example_selects_the_label_and_mounts_the_target_directory() {
    let http = parse(&examples_dir().join("http.yaml")).expect("http.yaml parses");
    let consume: serde_json::Value =
        serde_saphyr::from_str(&read(&examples_dir().join("consume.yaml"))).expect("parses");
    assert_eq!(consume["kind"], "Deployment");
    let ns = consume["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let name = http.metadata.name.as_deref().expect("name");
    let pod = &consume["spec"]["template"]["spec"];
    let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        [0]["matchExpressions"][0];
    assert_eq!(
        term["key"],
        peerfill_crds::node_label_key(ns, name).as_str()
    );
    assert_eq!(term["operator"], "In");
    assert_eq!(term["values"][0], peerfill_crds::NODE_LABEL_VALUE);

    let values: serde_json::Value = serde_saphyr::from_str(&read(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/peerfill/values.yaml"),
    ))
    .expect("values.yaml parses");
    let root = values["agent"]["dataRoot"]
        .as_str()
        .expect("agent.dataRoot");
    let dir = Path::new(&http.spec.target.path)
        .parent()
        .expect("the target has a directory");
    assert_eq!(
        pod["volumes"][0]["hostPath"]["path"],
        Path::new(root).join(dir).to_str().expect("utf-8")
    );
    let mount = &pod["containers"][0]["volumeMounts"][0];
    assert_eq!(mount["readOnly"], true);
}

#[test]
fn invalid_examples_are_refused_naming_the_field() {
    let files = yaml_files(&examples_dir().join("invalid"));
    let required = [
        "two-sources.yaml",
        "no-source.yaml",
        "absolute-path.yaml",
        "dotdot-path.yaml",
        "piece-size-zero.yaml",
        "piece-size-huge.yaml",
        "bad-url-scheme.yaml",
        "bad-digest.yaml",
        "files-with-whole-digest.yaml",
        "files-base-url-without-slash.yaml",
        "files-duplicate-path.yaml",
        "manifest-with-files.yaml",
    ];
    for name in required {
        assert!(
            files.iter().any(|p| p.ends_with(name)),
            "examples/invalid/{name} is missing"
        );
    }
    for path in &files {
        let field = expected_field(path);
        match parse(path) {
            Ok(dist) => {
                let errors = dist
                    .validate()
                    .err()
                    .unwrap_or_else(|| panic!("{} is accepted", path.display()));
                assert!(
                    errors.names_field(&field),
                    "{}: expected an error naming {field}, got: {errors}",
                    path.display()
                );
            }
            // Only a missing required field can make an invalid manifest
            // unrepresentable in Rust; serde then names the field itself.
            Err(e) => {
                let last = field.rsplit('.').next().unwrap_or(&field);
                assert!(
                    e.to_string().contains(&format!("missing field `{last}`")),
                    "{}: parse error does not name {field}: {e}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn each_invalid_example_breaks_exactly_one_field() {
    // One mistake per file keeps the API-server assertions sharp.
    for path in yaml_files(&examples_dir().join("invalid")) {
        if let Ok(dist) = parse(&path) {
            let errors = dist.validate().expect_err("invalid");
            let mut fields: Vec<_> = errors.0.iter().map(|e| e.field.clone()).collect();
            fields.dedup();
            assert_eq!(fields, [expected_field(&path)], "{}", path.display());
        }
    }
}

/// The directory example in the top-level README (a `spec` only) is a
/// valid Distribution spec, and a directory.
#[test]
fn readme_directory_example_is_valid() {
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.contains("files:"))
        .expect("README has a yaml block with files");
    let manifest = format!(
        "apiVersion: peerfill.dev/v1alpha1\nkind: Distribution\nmetadata:\n  name: readme\n{block}"
    );
    let dist: Distribution = serde_saphyr::from_str(&manifest)
        .unwrap_or_else(|e| panic!("README directory example: {e}\n{manifest}"));
    let http = dist.spec.source.http.as_ref().expect("http source");
    assert!(!http.files.is_empty());
    if let Err(e) = dist.validate() {
        panic!("README directory example is refused: {e}");
    }
}
