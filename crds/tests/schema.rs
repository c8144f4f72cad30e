//! The checked-in CRD YAML: current, structural, and carrying the rules we
//! intend. The schema's patterns and CEL rules are evaluated here (with the
//! `regex` and `cel` crates) against the Rust checks that mirror them, so
//! the API server and `Distribution::validate()` agree on what is valid.

use std::path::Path;
use std::sync::LazyLock;

use peerfill_crds::validation::{
    check_digest, check_dns_subdomain, check_piece_size, check_relative_path, check_url,
};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Each CRD file, parsed once (the property tests look at it per case).
fn crd(file: &str) -> &'static Value {
    static DISTRIBUTION: LazyLock<Value> = LazyLock::new(|| parse_crd("distribution.yaml"));
    static NODEFILL: LazyLock<Value> = LazyLock::new(|| parse_crd("nodefill.yaml"));
    match file {
        "distribution.yaml" => &DISTRIBUTION,
        "nodefill.yaml" => &NODEFILL,
        other => panic!("no CRD file {other}"),
    }
}

fn parse_crd(file: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn version(crd: &Value) -> &Value {
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["name"], "v1alpha1");
    &versions[0]
}

fn root_schema(crd: &Value) -> &Value {
    &version(crd)["schema"]["openAPIV3Schema"]
}

/// The schema of a field, by its dotted path from the object root.
fn field<'a>(root: &'a Value, dotted: &str) -> &'a Value {
    dotted.split('.').fold(root, |s, name| {
        let child = &s["properties"][name];
        assert!(child.is_object(), "no schema for {dotted} (at {name})");
        child
    })
}

fn rules(schema: &Value) -> Vec<(String, String)> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .map(|r| {
                    (
                        r["rule"].as_str().expect("rule").to_owned(),
                        r["message"].as_str().expect("message").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pattern(schema: &Value) -> regex::Regex {
    let p = schema["pattern"].as_str().expect("pattern");
    regex::Regex::new(p).unwrap_or_else(|e| panic!("pattern {p}: {e}"))
}

/// Evaluates CEL `rule` with `self` bound to `value`, as the API server
/// does for a rule on that field.
fn cel_holds(rule: &str, value: &Value) -> bool {
    let program = cel::Program::compile(rule).unwrap_or_else(|e| panic!("{rule}: {e:?}"));
    let mut ctx = cel::Context::default();
    ctx.add_variable("self", value.clone())
        .unwrap_or_else(|e| panic!("binding self: {e:?}"));
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("{rule} on {value}: {other:?}"),
    }
}

/// Whether the schema of a string field (length bounds, pattern, CEL rules)
/// accepts `s`.
fn string_schema_accepts(schema: &Value, s: &str) -> bool {
    let len = s.chars().count() as u64;
    if schema["minLength"].as_u64().is_some_and(|min| len < min)
        || schema["maxLength"].as_u64().is_some_and(|max| len > max)
    {
        return false;
    }
    if schema.get("pattern").is_some() && !pattern(schema).is_match(s) {
        return false;
    }
    rules(schema)
        .iter()
        .all(|(rule, _)| cel_holds(rule, &json!(s)))
}

#[test]
fn checked_in_yaml_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mismatches = peerfill_crds::crdgen::check_dir(dir).expect("check runs");
    assert!(
        mismatches.is_empty(),
        "run `cargo run -p peerfill-crds --bin crdgen`: {mismatches:?}"
    );
    for file in ["distribution.yaml", "nodefill.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read");
        assert!(text.starts_with(peerfill_crds::crdgen::HEADER), "{file}");
    }
}

#[test]
fn distribution_names_columns_and_subresources() {
    let crd = crd("distribution.yaml");
    assert_eq!(crd["metadata"]["name"], "distributions.peerfill.dev");
    assert_eq!(crd["spec"]["group"], "peerfill.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "Distribution");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["dist"]));
    let v = version(crd);
    assert_eq!(v["subresources"]["status"], json!({}));
    // (name, type, jsonPath, priority: 1 shows with `-o wide` only)
    let columns: Vec<(&str, &str, &str, i64)> = v["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default(),
                c["type"].as_str().unwrap_or_default(),
                c["jsonPath"].as_str().unwrap_or_default(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Phase", "string", ".status.phase", 0),
            ("Ready", "string", ".status.ready", 0),
            ("Progress", "string", ".status.progress", 0),
            ("Throughput", "string", ".status.throughput", 0),
            ("Files", "integer", ".status.files", 1),
            ("Age", "date", ".metadata.creationTimestamp", 0),
        ]
    );
    // The directory and manifest rules name the field they are about, as validate() does.
    let http = field(root_schema(crd), "spec.source.http");
    let paths: Vec<&str> = http["x-kubernetes-validations"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["fieldPath"].as_str())
        .collect();
    assert_eq!(paths, [".digest", ".url", ".manifestUrl"]);
    let files = field(root_schema(crd), "spec.source.http.files");
    assert_eq!(files["x-kubernetes-list-type"], "map");
    assert_eq!(files["x-kubernetes-list-map-keys"], json!(["path"]));
    assert_eq!(files["maxItems"], 1000);
    let root = root_schema(crd);
    let phase = field(root, "status.phase");
    assert_eq!(
        phase["enum"],
        json!(["Pending", "Progressing", "Complete", "Failed", "Deleting"])
    );
    let conditions = field(root, "status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    assert_eq!(field(root, "status.failingNodes")["maxItems"], 10);
    assert_eq!(root["required"], json!(["spec"]));
}

#[test]
fn nodefill_is_cluster_scoped_with_columns() {
    let crd = crd("nodefill.yaml");
    assert_eq!(crd["metadata"]["name"], "nodefills.peerfill.dev");
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["kind"], "NodeFill");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["nf"]));
    let v = version(crd);
    assert_eq!(v["subresources"]["status"], json!({}));
    let names: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "Endpoint",
            "Zone",
            "Assigned",
            "Complete",
            "Heartbeat",
            "Age"
        ]
    );
    let root = root_schema(crd);
    for (list, key) in [
        ("spec.distributions", "uid"),
        ("status.distributions", "uid"),
        ("status.conditions", "type"),
    ] {
        let s = field(root, list);
        assert_eq!(s["x-kubernetes-list-type"], "map", "{list}");
        assert_eq!(s["x-kubernetes-list-map-keys"], json!([key]), "{list}");
    }
    for f in [
        "spec.distributions",
        "status.endpoint",
        "status.lastHeartbeat",
    ] {
        field(root, f);
    }
    let range = &field(root, "spec.distributions")["items"]["properties"]["role"]["properties"]["originRanges"]
        ["items"];
    assert_eq!(range["required"], json!(["end", "start"]));
}

/// Walks every schema node and checks the rules of a Kubernetes structural
/// schema that schema generators commonly break.
fn assert_structural(schema: &Value, at: &str) {
    let obj = schema
        .as_object()
        .unwrap_or_else(|| panic!("{at}: not an object"));
    for forbidden in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
    ] {
        assert!(!obj.contains_key(forbidden), "{at}: has {forbidden}");
    }
    let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true))
        || obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    let ty = obj.get("type").and_then(Value::as_str);
    assert!(ty.is_some() || preserves, "{at}: no type");
    if let Some(format) = obj.get("format").and_then(Value::as_str) {
        let known = match ty {
            Some("integer") => ["int32", "int64"].contains(&format),
            Some("number") => ["double", "float"].contains(&format),
            Some("string") => ["date-time", "byte", "date", "int-or-string"].contains(&format),
            _ => false,
        };
        assert!(known, "{at}: format {format} on {ty:?}");
    }
    assert!(
        !(obj.contains_key("properties") && obj.contains_key("additionalProperties")),
        "{at}: properties and additionalProperties"
    );
    if let Some(keys) = obj
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
    {
        let required = &obj["items"]["required"];
        for key in keys {
            assert!(
                required.as_array().is_some_and(|r| r.contains(key)),
                "{at}: list-map key {key} must be required"
            );
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            assert_structural(child, &format!("{at}.{name}"));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = obj.get(key).filter(|c| c.is_object()) {
            assert_structural(child, &format!("{at}[{key}]"));
        }
    }
}

#[test]
fn schemas_are_structural() {
    for file in ["distribution.yaml", "nodefill.yaml"] {
        let crd = crd(file);
        assert_structural(root_schema(crd), file);
    }
}

#[test]
fn distribution_bounds() {
    let crd = crd("distribution.yaml");
    let root = root_schema(crd);
    let bounds = |f: &str| {
        let s = field(root, f);
        (s["minimum"].as_f64(), s["maximum"].as_f64())
    };
    let mib = 1024.0 * 1024.0;
    assert_eq!(
        bounds("spec.strategy.pieceSize"),
        (Some(64.0 * 1024.0), Some(64.0 * mib))
    );
    assert_eq!(
        bounds("spec.strategy.maxOriginConnections"),
        (Some(1.0), Some(64.0))
    );
    for f in [
        "spec.strategy.maxDownloadBytesPerSecond",
        "spec.strategy.maxUploadBytesPerSecond",
    ] {
        assert_eq!(bounds(f), (Some(mib), Some(100.0 * 1024.0 * mib)), "{f}");
    }
    assert_eq!(
        bounds("spec.strategy.priority"),
        (Some(-1000.0), Some(1000.0))
    );
    // Unset, the piece size follows the content size: no schema default.
    assert!(field(root, "spec.strategy.pieceSize")["default"].is_null());
    assert_eq!(
        field(root, "spec.strategy.maxOriginConnections")["default"],
        16
    );
    assert_eq!(field(root, "spec.target.path")["maxLength"], 1024);
    assert_eq!(field(root, "spec.source.http.url")["maxLength"], 2048);
    assert_eq!(field(root, "spec")["required"], json!(["source", "target"]));
}

#[test]
fn source_rule_requires_exactly_one() {
    let crd = crd("distribution.yaml");
    let source = field(root_schema(crd), "spec.source");
    let rules = rules(source);
    assert_eq!(rules.len(), 1);
    let (rule, message) = &rules[0];
    assert!(message.contains("spec.source.http") && message.contains("spec.source.node"));
    let http = json!({"url": "https://origin.example/x"});
    let node = json!({"nodeName": "build-01", "path": "x"});
    assert!(cel_holds(rule, &json!({ "http": http })));
    assert!(cel_holds(rule, &json!({ "node": node })));
    assert!(!cel_holds(rule, &json!({ "http": http, "node": node })));
    assert!(!cel_holds(rule, &json!({})));
}

#[test]
fn piece_size_rule_matches_rust() {
    let crd = crd("distribution.yaml");
    let schema = field(root_schema(crd), "spec.strategy.pieceSize");
    let rules = rules(schema);
    assert_eq!(rules.len(), 1);
    let (min, max) = (
        schema["minimum"].as_f64().expect("minimum") as i64,
        schema["maximum"].as_f64().expect("maximum") as i64,
    );
    let mut samples: Vec<i64> = vec![0, 1, 3 << 20, 1 << 40, i64::MAX];
    for shift in 10..=30 {
        samples.extend([(1 << shift) - 1, 1 << shift, (1 << shift) + 1]);
    }
    for v in samples {
        let schema_ok = (min..=max).contains(&v) && cel_holds(&rules[0].0, &json!(v));
        let rust_ok = check_piece_size(v as u64).is_ok();
        assert_eq!(schema_ok, rust_ok, "piece size {v}");
    }
}

#[test]
fn path_rules_match_rust() {
    let crd = crd("distribution.yaml");
    let root = root_schema(crd);
    for f in ["spec.target.path", "spec.source.node.path"] {
        let schema = field(root, f);
        assert_eq!(rules(schema).len(), 5, "{f}");
        let long_segment = format!("a/{}", "b".repeat(256));
        let max_segment = format!("a/{}", "b".repeat(255));
        let too_long = ["abcdefgh"; 114].join("/");
        let samples = [
            "a",
            "a/b/c.bin",
            "/a",
            "..",
            ".",
            "a/..",
            "../a",
            "a/./b",
            "a/.b",
            "a/b..",
            "...",
            "a//b",
            "a/",
            "",
            long_segment.as_str(),
            max_segment.as_str(),
            too_long.as_str(),
            ".peerfill-status/assignments.json",
            "a/.peerfill-partial",
            "a/.peerfill",
            "a/x.peerfill",
            "a/peerfill",
            "a\0b",
            "a\nb",
            "a\tb",
            "a\u{7f}",
            "a\u{80}",
        ];
        for s in samples {
            assert_eq!(
                string_schema_accepts(schema, s),
                check_relative_path(s).is_ok(),
                "{f} = {s:?}"
            );
        }
    }
}

#[test]
fn string_patterns_match_rust() {
    let crd = crd("distribution.yaml");
    let root = root_schema(crd);
    let hex = "0123456789abcdef".repeat(4);
    let url = field(root, "spec.source.http.url");
    for s in [
        "http://a",
        "https://origin.example/x?y#z",
        "http://[::1]:8080/",
        "ftp://a",
        "https://",
        "https:///x",
        "https://a b",
        "https://a/\u{7f}",
        "HTTPS://a",
        "https://a/\u{a0}",
    ] {
        assert_eq!(
            string_schema_accepts(url, s),
            check_url(s).is_ok(),
            "url {s:?}"
        );
    }
    let digest = field(root, "spec.source.http.digest");
    for s in [
        format!("sha256:{hex}"),
        format!("blake3:{hex}"),
        format!("md5:{hex}"),
        format!("sha256:{}", hex.to_uppercase()),
        format!("sha256:{hex}a"),
        "sha256:".into(),
    ] {
        assert_eq!(
            string_schema_accepts(digest, &s),
            check_digest(&s).is_ok(),
            "digest {s:?}"
        );
    }
    let node = field(root, "spec.source.node.nodeName");
    for s in ["a", "node-1", "a.b-c", "-a", "a-", "A", "a..b", "a_b", ""] {
        assert_eq!(
            string_schema_accepts(node, s),
            check_dns_subdomain(s).is_ok(),
            "node name {s:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Paths over an alphabet dense in separators and dots: the schema and
    /// the Rust check agree on every one.
    #[test]
    fn path_schema_and_rust_agree(s in "[a./]{0,12}") {
        let crd = crd("distribution.yaml");
        let schema = field(root_schema(crd), "spec.target.path");
        prop_assert_eq!(string_schema_accepts(schema, &s), check_relative_path(&s).is_ok());
    }

    /// URLs over an alphabet dense in the characters the pattern cares about.
    #[test]
    fn url_schema_and_rust_agree(s in "(https?|ftp|HTTP)?(://)?[a/?#@: \t\u{7f}\u{a0}]{0,8}") {
        let crd = crd("distribution.yaml");
        let schema = field(root_schema(crd), "spec.source.http.url");
        prop_assert_eq!(string_schema_accepts(schema, &s), check_url(&s).is_ok());
    }

    /// DNS subdomains.
    #[test]
    fn dns_schema_and_rust_agree(s in "[a0.\\-A_]{0,10}") {
        let crd = crd("distribution.yaml");
        let schema = field(root_schema(crd), "spec.source.node.nodeName");
        prop_assert_eq!(string_schema_accepts(schema, &s), check_dns_subdomain(&s).is_ok());
    }
}
