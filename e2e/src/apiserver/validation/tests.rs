//! Unit tests: one table per concern, each row a schema fragment, an object
//! and the exact errors (field, kind, message) the real server reports.

use serde_json::{Value, json};

use super::*;

/// A resource schema with `spec` described by `spec_schema`.
fn resource(spec_schema: Value) -> CompiledSchema {
    let root = json!({
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
        }
    });
    match CompiledSchema::compile(&root) {
        Ok(s) => s,
        Err(e) => panic!("schema does not compile: {e}"),
    }
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "peerfill.dev/v1alpha1",
        "kind": "Distribution",
        "metadata": {"name": "d1", "namespace": "default"},
        "spec": spec,
    })
}

/// Admits `spec` against `spec_schema`; returns the errors as
/// `(field, kind, message)`.
fn admit(spec_schema: Value, spec: Value) -> Vec<(String, FieldErrorKind, String)> {
    let schema = resource(spec_schema);
    let mut obj = object(spec);
    match schema.admit(&mut obj, None) {
        Ok(()) => Vec::new(),
        Err(errs) => errs
            .into_iter()
            .map(|e| (e.field.clone(), e.kind, e.message()))
            .collect(),
    }
}

type Row = (
    &'static str,
    Value,
    Value,
    Vec<(&'static str, FieldErrorKind, &'static str)>,
);

fn run_table(rows: Vec<Row>) {
    for (name, spec_schema, spec, want) in rows {
        let got = admit(spec_schema, spec);
        let want: Vec<(String, FieldErrorKind, String)> = want
            .into_iter()
            .map(|(f, k, m)| (f.to_string(), k, m.to_string()))
            .collect();
        assert_eq!(got, want, "case {name}");
    }
}

use FieldErrorKind::*;

const CEL_SKIPPED: &str = "<nil>: Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation";

#[test]
fn type_keyword() {
    run_table(vec![
        (
            "integer accepts integers",
            json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            json!({"n": 3}),
            vec![],
        ),
        (
            "integer accepts an integral float",
            json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            json!({"n": 3.0}),
            vec![],
        ),
        (
            "integer refuses a fraction",
            json!({"type": "object", "properties": {"n": {"type": "integer"}}}),
            json!({"n": 3.5}),
            vec![
                (
                    "spec.n",
                    TypeInvalid,
                    "spec.n: Invalid value: \"number\": spec.n in body must be of type integer: \"number\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "number accepts integers",
            json!({"type": "object", "properties": {"n": {"type": "number"}}}),
            json!({"n": 3}),
            vec![],
        ),
        (
            "string refuses a number",
            json!({"type": "object", "properties": {"s": {"type": "string"}}}),
            json!({"s": 1}),
            vec![
                (
                    "spec.s",
                    TypeInvalid,
                    "spec.s: Invalid value: \"integer\": spec.s in body must be of type string: \"integer\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "boolean refuses a string",
            json!({"type": "object", "properties": {"b": {"type": "boolean"}}}),
            json!({"b": "true"}),
            vec![
                (
                    "spec.b",
                    TypeInvalid,
                    "spec.b: Invalid value: \"string\": spec.b in body must be of type boolean: \"string\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "object refuses an array",
            json!({"type": "object", "properties": {"o": {"type": "object"}}}),
            json!({"o": []}),
            vec![
                (
                    "spec.o",
                    TypeInvalid,
                    "spec.o: Invalid value: \"array\": spec.o in body must be of type object: \"array\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "nullable accepts null",
            json!({"type": "object", "properties": {"s": {"type": "string", "nullable": true}}}),
            json!({"s": null}),
            vec![],
        ),
        (
            "int-or-string accepts both and refuses a bool",
            json!({"type": "object", "properties": {
                "a": {"x-kubernetes-int-or-string": true},
                "b": {"x-kubernetes-int-or-string": true},
                "c": {"x-kubernetes-int-or-string": true}}}),
            json!({"a": 1, "b": "50%", "c": true}),
            vec![
                (
                    "spec.c",
                    TypeInvalid,
                    "spec.c: Invalid value: \"boolean\": spec.c in body must be of type integer,string: \"boolean\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
    ]);
}

#[test]
fn required_enum_and_string_keywords() {
    run_table(vec![
        (
            "required names the missing field",
            json!({"type": "object", "required": ["source", "target"], "properties": {
                "source": {"type": "object"}, "target": {"type": "object"}}}),
            json!({"target": {}}),
            vec![
                ("spec.source", Required, "spec.source: Required value"),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "enum of strings",
            json!({"type": "object", "properties": {"p": {"type": "string", "enum": ["Low", "High"]}}}),
            json!({"p": "Medium"}),
            vec![
                (
                    "spec.p",
                    NotSupported,
                    "spec.p: Unsupported value: \"Medium\": supported values: \"Low\", \"High\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "enum of integers lists them as JSON",
            json!({"type": "object", "properties": {"pieceSize": {"type": "integer", "enum": [65536, 1048576]}}}),
            json!({"pieceSize": 0}),
            vec![
                (
                    "spec.pieceSize",
                    NotSupported,
                    "spec.pieceSize: Unsupported value: 0: supported values: \"65536\", \"1048576\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "maxLength counts code points",
            json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}),
            json!({"s": "äöü"}),
            vec![],
        ),
        (
            "maxLength exceeded",
            json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}}),
            json!({"s": "abcd"}),
            vec![
                (
                    "spec.s",
                    TooLong,
                    "spec.s: Too long: may not be more than 3 bytes",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "minLength",
            json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 1}}}),
            json!({"s": ""}),
            vec![(
                "spec.s",
                Invalid,
                "spec.s: Invalid value: \"\": spec.s in body should be at least 1 chars long",
            )],
        ),
        (
            "pattern (RE2, unanchored unless anchored)",
            json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[a-z0-9-]+$"}}}),
            json!({"s": "Bad_Name"}),
            vec![(
                "spec.s",
                Invalid,
                "spec.s: Invalid value: \"Bad_Name\": spec.s in body should match '^[a-z0-9-]+$'",
            )],
        ),
        (
            "format date-time",
            json!({"type": "object", "properties": {"t": {"type": "string", "format": "date-time"}}}),
            json!({"t": "tomorrow"}),
            vec![
                (
                    "spec.t",
                    TypeInvalid,
                    "spec.t: Invalid value: \"tomorrow\": spec.t in body must be of type date-time: \"tomorrow\"",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "unknown format ignored, int32 not range-checked",
            json!({"type": "object", "properties": {
                "s": {"type": "string", "format": "peerfill-special"},
                "n": {"type": "integer", "format": "int32"}}}),
            json!({"s": "x", "n": 99_999_999_999_i64}),
            vec![],
        ),
    ]);
}

#[test]
fn number_keywords() {
    run_table(vec![
        (
            "minimum",
            json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}),
            json!({"n": 0}),
            vec![(
                "spec.n",
                Invalid,
                "spec.n: Invalid value: 0: spec.n in body should be greater than or equal to 1",
            )],
        ),
        (
            "maximum",
            json!({"type": "object", "properties": {"n": {"type": "integer", "maximum": 1073741824}}}),
            json!({"n": 1073741825}),
            vec![(
                "spec.n",
                Invalid,
                "spec.n: Invalid value: 1073741825: spec.n in body should be less than or equal to 1073741824",
            )],
        ),
        (
            "exclusive bounds",
            json!({"type": "object", "properties": {
                "a": {"type": "integer", "minimum": 0, "exclusiveMinimum": true},
                "b": {"type": "integer", "maximum": 10, "exclusiveMaximum": true}}}),
            json!({"a": 0, "b": 10}),
            vec![
                (
                    "spec.a",
                    Invalid,
                    "spec.a: Invalid value: 0: spec.a in body should be greater than 0",
                ),
                (
                    "spec.b",
                    Invalid,
                    "spec.b: Invalid value: 10: spec.b in body should be less than 10",
                ),
            ],
        ),
        (
            "float bounds print like Go",
            json!({"type": "object", "properties": {"x": {"type": "number", "maximum": 1000000.5}}}),
            json!({"x": 2000000.25}),
            vec![(
                "spec.x",
                Invalid,
                "spec.x: Invalid value: 2.00000025e+06: spec.x in body should be less than or equal to 1.0000005e+06",
            )],
        ),
        (
            "multipleOf",
            json!({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 4096}}}),
            json!({"n": 5000}),
            vec![(
                "spec.n",
                Invalid,
                "spec.n: Invalid value: 5000: spec.n in body should be a multiple of 4096",
            )],
        ),
        (
            "multipleOf holds",
            json!({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 4096}}}),
            json!({"n": 8192}),
            vec![],
        ),
    ]);
}

#[test]
fn array_and_object_keywords() {
    run_table(vec![
        (
            "items validated with indexes in the path",
            json!({"type": "object", "properties": {"l": {"type": "array", "items": {
                "type": "object", "properties": {"name": {"type": "string", "minLength": 2}}}}}}),
            json!({"l": [{"name": "ok"}, {"name": "x"}]}),
            vec![(
                "spec.l[1].name",
                Invalid,
                "spec.l[1].name: Invalid value: \"x\": spec.l[1].name in body should be at least 2 chars long",
            )],
        ),
        (
            "minItems",
            json!({"type": "object", "properties": {"l": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}),
            json!({"l": []}),
            vec![(
                "spec.l",
                Invalid,
                "spec.l: Invalid value: 0: spec.l in body should have at least 1 items",
            )],
        ),
        (
            "maxItems",
            json!({"type": "object", "properties": {"l": {"type": "array", "maxItems": 2, "items": {"type": "string"}}}}),
            json!({"l": ["a", "b", "c"]}),
            vec![
                (
                    "spec.l",
                    TooMany,
                    "spec.l: Too many: 3: must have at most 2 items",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "uniqueItems",
            json!({"type": "object", "properties": {"l": {"type": "array", "uniqueItems": true, "items": {"type": "integer"}}}}),
            json!({"l": [1, 2, 1]}),
            vec![(
                "spec.l",
                Invalid,
                "spec.l: Invalid value: \"\": spec.l in body shouldn't contain duplicates",
            )],
        ),
        (
            "list-type set",
            json!({"type": "object", "properties": {"l": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}),
            json!({"l": ["a", "b", "a"]}),
            vec![("spec.l[2]", Duplicate, "spec.l[2]: Duplicate value: \"a\"")],
        ),
        (
            "list-type map",
            json!({"type": "object", "properties": {"l": {
                "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "v": {"type": "integer"}}}}}}),
            json!({"l": [{"name": "a", "v": 1}, {"name": "a", "v": 2}]}),
            vec![(
                "spec.l[1]",
                Duplicate,
                "spec.l[1]: Duplicate value: map[string]interface {}{\"name\":\"a\"}",
            )],
        ),
        (
            "additionalProperties schema: map entries as name.key",
            json!({"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 2}}}}),
            json!({"m": {"ok": "ab", "bad": "abc"}}),
            vec![
                (
                    "spec.m.bad",
                    TooLong,
                    "spec.m.bad: Too long: may not be more than 2 bytes",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "min/maxProperties",
            json!({"type": "object", "properties": {
                "a": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
                "b": {"type": "object", "maxProperties": 1, "additionalProperties": {"type": "string"}}}}),
            json!({"a": {}, "b": {"x": "1", "y": "2"}}),
            vec![
                (
                    "spec.a",
                    Invalid,
                    "spec.a: Invalid value: 0: spec.a in body should have at least 1 properties",
                ),
                (
                    "spec.b",
                    TooMany,
                    "spec.b: Too many: 2: must have at most 1 item",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
    ]);
}

#[test]
fn composition_keywords() {
    let one_of = json!({"type": "object", "properties": {"source": {
        "type": "object",
        "properties": {"http": {"type": "object"}, "node": {"type": "object"}},
        "oneOf": [{"required": ["http"]}, {"required": ["node"]}]}}});
    run_table(vec![
        (
            "oneOf with none valid",
            one_of.clone(),
            json!({"source": {}}),
            vec![
                (
                    "<nil>",
                    Invalid,
                    "<nil>: Invalid value: \"\": \"spec.source\" must validate one and only one schema (oneOf). Found none valid",
                ),
                (
                    "spec.source.http",
                    Required,
                    "spec.source.http: Required value",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "oneOf with two valid",
            one_of.clone(),
            json!({"source": {"http": {}, "node": {}}}),
            vec![(
                "<nil>",
                Invalid,
                "<nil>: Invalid value: \"\": \"spec.source\" must validate one and only one schema (oneOf). Found 2 valid alternatives",
            )],
        ),
        (
            "oneOf satisfied",
            one_of,
            json!({"source": {"node": {}}}),
            vec![],
        ),
        (
            "not",
            json!({"type": "object", "properties": {"s": {"type": "string", "not": {"enum": ["forbidden"]}}}}),
            json!({"s": "forbidden"}),
            vec![(
                "<nil>",
                Invalid,
                "<nil>: Invalid value: \"\": \"spec.s\" must not validate the schema (not)",
            )],
        ),
        (
            "anyOf",
            json!({"type": "object", "properties": {"n": {"type": "integer", "anyOf": [{"minimum": 10}, {"maximum": 0}]}}}),
            json!({"n": 5}),
            vec![
                (
                    "<nil>",
                    Invalid,
                    "<nil>: Invalid value: \"\": \"spec.n\" must validate at least one schema (anyOf)",
                ),
                (
                    "spec.n",
                    Invalid,
                    "spec.n: Invalid value: 5: spec.n in body should be greater than or equal to 10",
                ),
            ],
        ),
    ]);
}

#[test]
fn pruning_removes_unknown_fields_keeps_marked_and_metadata() {
    let schema = resource(json!({
        "type": "object",
        "properties": {
            "known": {"type": "string"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                     "properties": {"inner": {"type": "object", "properties": {"x": {"type": "string"}}}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            "template": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {"spec": {"type": "object"}}}
        }
    }));
    let mut obj = json!({
        "apiVersion": "peerfill.dev/v1alpha1",
        "kind": "Distribution",
        "metadata": {"name": "d1", "labels": {"a": "b"}, "annotations": {"x": "y"}},
        "status": {"phase": "Pending"},
        "spec": {
            "known": "k",
            "unknown": 1,
            "free": {"anything": {"goes": true}, "inner": {"x": "1", "dropped": 2}},
            "labels": {"free": "form"},
            "items": [{"a": "1", "b": "2"}],
            "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}, "extra": 1}
        }
    });
    assert_eq!(schema.admit(&mut obj, None), Ok(()));
    assert_eq!(
        obj,
        json!({
            "apiVersion": "peerfill.dev/v1alpha1",
            "kind": "Distribution",
            "metadata": {"name": "d1", "labels": {"a": "b"}, "annotations": {"x": "y"}},
            "spec": {
                "known": "k",
                "free": {"anything": {"goes": true}, "inner": {"x": "1"}},
                "labels": {"free": "form"},
                "items": [{"a": "1"}],
                "template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}
            }
        })
    );
}

#[test]
fn defaults_apply_nested_in_arrays_and_maps_and_replace_nulls() {
    let schema = resource(json!({
        "type": "object",
        "properties": {
            "strategy": {"type": "object", "default": {}, "properties": {
                "pieceSize": {"type": "integer", "default": 4194304},
                "priority": {"type": "string", "default": "Normal"}}},
            "ports": {"type": "array", "items": {"type": "object", "properties": {
                "protocol": {"type": "string", "default": "TCP"}, "port": {"type": "integer"}}}},
            "limits": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "burst": {"type": "integer", "default": 2}}}},
            "mode": {"type": "string", "default": "Copy"},
            "gone": {"type": "string"}
        }
    }));
    let mut obj = object(json!({
        "ports": [{"port": 1}, {"port": 2, "protocol": "UDP"}],
        "limits": {"eth0": {}},
        "mode": null,
        "gone": null
    }));
    assert_eq!(schema.admit(&mut obj, None), Ok(()));
    assert_eq!(
        obj["spec"],
        json!({
            "strategy": {"pieceSize": 4194304, "priority": "Normal"},
            "ports": [{"port": 1, "protocol": "TCP"}, {"port": 2, "protocol": "UDP"}],
            "limits": {"eth0": {"burst": 2}},
            "mode": "Copy"
        })
    );
}

fn cel_schema(rules: Value, extra_props: Value) -> CompiledSchema {
    let mut props = json!({
        "http": {"type": "object", "properties": {"url": {"type": "string"}}},
        "node": {"type": "object", "properties": {"nodeName": {"type": "string"}}},
        "path": {"type": "string"},
        "size": {"type": "integer"}
    });
    if let (Some(p), Some(extra)) = (props.as_object_mut(), extra_props.as_object()) {
        for (k, v) in extra {
            p.insert(k.clone(), v.clone());
        }
    }
    resource(json!({"type": "object", "properties": props, "x-kubernetes-validations": rules}))
}

fn messages(r: Result<(), Vec<FieldError>>) -> Vec<String> {
    match r {
        Ok(()) => Vec::new(),
        Err(e) => e.iter().map(FieldError::message).collect(),
    }
}

#[test]
fn cel_rules_report_like_the_server() {
    let schema = cel_schema(
        json!([
            {"rule": "has(self.http) != has(self.node)", "message": "exactly one of http or node must be set"},
            {"rule": "!has(self.path) || (!self.path.startsWith('/') && !self.path.split('/').exists(s, s == '..'))",
             "message": "must be a relative path without '..'", "fieldPath": ".path"},
            {"rule": "!has(self.http) || self.http.url.matches('^https?://')",
             "messageExpression": "'unsupported URL scheme in ' + self.http.url", "reason": "FieldValueForbidden", "fieldPath": ".http.url"},
            {"rule": "!has(self.size) || self.size > 0"}
        ]),
        json!({}),
    );
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            json!({"http": {"url": "https://example.com/a"}, "path": "data/a"}),
            vec![],
        ),
        (
            json!({"path": "a"}),
            vec!["spec: Invalid value: \"object\": exactly one of http or node must be set"],
        ),
        (
            json!({"node": {"nodeName": "n1"}, "path": "/etc"}),
            vec!["spec.path: Invalid value: \"object\": must be a relative path without '..'"],
        ),
        (
            json!({"node": {"nodeName": "n1"}, "path": "a/../../b"}),
            vec!["spec.path: Invalid value: \"object\": must be a relative path without '..'"],
        ),
        (
            json!({"http": {"url": "ftp://example.com/a"}}),
            vec!["spec.http.url: Forbidden: unsupported URL scheme in ftp://example.com/a"],
        ),
        (
            json!({"node": {}, "size": 0}),
            vec!["spec: Invalid value: \"object\": failed rule: !has(self.size) || self.size > 0"],
        ),
    ];
    for (spec, want) in cases {
        let mut obj = object(spec.clone());
        assert_eq!(messages(schema.admit(&mut obj, None)), want, "spec {spec}");
    }
}

#[test]
fn cel_runtime_error_becomes_a_field_error() {
    let schema = cel_schema(json!([{"rule": "self.http.url != ''"}]), json!({}));
    let mut obj = object(json!({"node": {}}));
    assert_eq!(
        messages(schema.admit(&mut obj, None)),
        vec![
            "spec: Invalid value: \"object\": no such key: http evaluating rule: self.http.url != ''"
        ]
    );
}

#[test]
fn cel_rules_on_list_items_and_map_values_use_field_paths() {
    let schema = cel_schema(
        json!([]),
        json!({
            "peers": {"type": "array", "items": {"type": "string", "x-kubernetes-validations": [
                {"rule": "self.lowerAscii() == self", "message": "must be lower case"}]}},
            "caps": {"type": "object", "additionalProperties": {"type": "integer", "x-kubernetes-validations": [
                {"rule": "self >= 0", "message": "must not be negative"}]}}
        }),
    );
    let mut obj = object(json!({"peers": ["a", "B"], "caps": {"eth0": -1}}));
    assert_eq!(
        messages(schema.admit(&mut obj, None)),
        vec![
            "spec.caps[eth0]: Invalid value: \"integer\": must not be negative",
            "spec.peers[1]: Invalid value: \"string\": must be lower case",
        ]
    );
}

#[test]
fn cel_transition_rule_only_on_update() {
    let schema = cel_schema(
        json!([{"rule": "self.path == oldSelf.path", "message": "path is immutable", "fieldPath": ".path"}]),
        json!({}),
    );
    // Create: no old object, the transition rule is skipped.
    let mut created = object(json!({"node": {}, "path": "a"}));
    assert_eq!(schema.admit(&mut created, None), Ok(()));
    // Update keeping the path: fine.
    let mut same = object(json!({"node": {}, "path": "a"}));
    assert_eq!(schema.admit(&mut same, Some(&created)), Ok(()));
    // Update changing it: refused.
    let mut changed = object(json!({"node": {}, "path": "b"}));
    assert_eq!(
        messages(schema.admit(&mut changed, Some(&created))),
        vec!["spec.path: Invalid value: \"object\": path is immutable"]
    );
}

#[test]
fn cel_optional_old_self_is_evaluated_on_create() {
    let schema = cel_schema(
        json!([{"rule": "!oldSelf.hasValue() || oldSelf.value().path == self.path", "optionalOldSelf": true,
                "message": "path is immutable"}]),
        json!({}),
    );
    let mut created = object(json!({"node": {}, "path": "a"}));
    assert_eq!(schema.admit(&mut created, None), Ok(()));
    let mut changed = object(json!({"node": {}, "path": "b"}));
    assert_eq!(
        messages(schema.admit(&mut changed, Some(&created))),
        vec!["spec: Invalid value: \"object\": path is immutable"]
    );
}

#[test]
fn cel_is_skipped_after_blocking_schema_errors() {
    let schema = resource(json!({
        "type": "object", "required": ["path"],
        "properties": {"path": {"type": "string"}},
        "x-kubernetes-validations": [{"rule": "false", "message": "never"}]
    }));
    let mut obj = object(json!({}));
    assert_eq!(
        messages(schema.admit(&mut obj, None)),
        vec!["spec.path: Required value", CEL_SKIPPED]
    );
}

#[test]
fn schema_compile_errors() {
    let bad_rule = json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.a ==="}]});
    assert!(matches!(
        CompiledSchema::compile(&bad_rule),
        Err(SchemaError::Rule { index: 0, .. })
    ));
    let bad_pattern =
        json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "("}}});
    assert!(matches!(
        CompiledSchema::compile(&bad_pattern),
        Err(SchemaError::Pattern { .. })
    ));
    let bad_type = json!({"type": "tuple"});
    assert!(matches!(
        CompiledSchema::compile(&bad_type),
        Err(SchemaError::UnsupportedType { .. })
    ));
    let bad_reason =
        json!({"type": "object", "x-kubernetes-validations": [{"rule": "true", "reason": "Nope"}]});
    assert!(matches!(
        CompiledSchema::compile(&bad_reason),
        Err(SchemaError::Rule { .. })
    ));
}

#[test]
fn field_error_messages_and_reasons() {
    let cases: Vec<(FieldError, &str, &str)> = vec![
        (
            FieldError::new(
                "spec.target.path".into(),
                Invalid,
                Some(json!("/etc")),
                "must be a relative path".into(),
            ),
            "spec.target.path: Invalid value: \"/etc\": must be a relative path",
            "FieldValueInvalid",
        ),
        (
            FieldError::new(
                "spec.strategy.pieceSize".into(),
                NotSupported,
                Some(json!(0)),
                "supported values: \"65536\", \"1048576\"".into(),
            ),
            "spec.strategy.pieceSize: Unsupported value: 0: supported values: \"65536\", \"1048576\"",
            "FieldValueNotSupported",
        ),
        (
            FieldError::new("spec.source".into(), Required, None, String::new()),
            "spec.source: Required value",
            "FieldValueRequired",
        ),
        (
            FieldError::new(
                "spec.x".into(),
                Forbidden,
                Some(json!("v")),
                "not allowed".into(),
            ),
            "spec.x: Forbidden: not allowed",
            "FieldValueForbidden",
        ),
        (
            FieldError::new(
                "spec.x".into(),
                TypeInvalid,
                Some(json!("string")),
                "d".into(),
            ),
            "spec.x: Invalid value: \"string\": d",
            "FieldValueTypeInvalid",
        ),
        (
            FieldError::new("spec.x".into(), Invalid, Some(json!(true)), "d".into()),
            "spec.x: Invalid value: true: d",
            "FieldValueInvalid",
        ),
        (
            FieldError::new(
                "spec.x".into(),
                Invalid,
                Some(json!("tab\there \"q\"")),
                String::new(),
            ),
            "spec.x: Invalid value: \"tab\\there \\\"q\\\"\"",
            "FieldValueInvalid",
        ),
        (
            FieldError::new(
                "spec.x".into(),
                Invalid,
                Some(json!({"b": [1, "x"], "a": null})),
                String::new(),
            ),
            "spec.x: Invalid value: map[string]interface {}{\"a\":interface {}(nil), \"b\":[]interface {}{1, \"x\"}}",
            "FieldValueInvalid",
        ),
    ];
    for (err, message, reason) in cases {
        assert_eq!(err.message(), message);
        assert_eq!(err.reason(), reason);
    }
}

#[test]
fn go_float_formatting() {
    for (f, want) in [
        (0.5, "0.5"),
        (1.0, "1"),
        (100000.0, "100000"),
        (1000000.0, "1e+06"),
        (16777216.0, "1.6777216e+07"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (-2.5, "-2.5"),
    ] {
        assert_eq!(go_float(f), want, "{f}");
    }
}

#[test]
fn invalid_status_has_the_servers_shape() {
    let one = [FieldError::new(
        "spec.target.path".into(),
        Invalid,
        Some(json!("/etc")),
        "must be a relative path".into(),
    )];
    assert_eq!(
        invalid_status("Distribution", "peerfill.dev", "d1", &one),
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "Distribution.peerfill.dev \"d1\" is invalid: spec.target.path: Invalid value: \"/etc\": must be a relative path",
            "reason": "Invalid",
            "details": {
                "name": "d1",
                "group": "peerfill.dev",
                "kind": "Distribution",
                "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: \"/etc\": must be a relative path",
                    "field": "spec.target.path"
                }]
            },
            "code": 422
        })
    );
    let two = [
        FieldError::new("spec.source".into(), Required, None, String::new()),
        FieldError::new("spec.source".into(), Required, None, String::new()),
        FieldError::new(
            "spec.strategy.pieceSize".into(),
            Invalid,
            Some(json!(0)),
            "too small".into(),
        ),
    ];
    let status = invalid_status("Distribution", "peerfill.dev", "d1", &two);
    assert_eq!(
        status["message"],
        json!(
            "Distribution.peerfill.dev \"d1\" is invalid: [spec.source: Required value, spec.strategy.pieceSize: Invalid value: 0: too small]"
        )
    );
    assert_eq!(
        status["details"]["causes"].as_array().map(Vec::len),
        Some(3)
    );
}

#[test]
fn ratcheting_keeps_unchanged_invalid_values_updatable() {
    let schema = cel_schema(
        json!([]),
        json!({
            "name": {"type": "string", "maxLength": 3},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "dir": {"type": "string", "x-kubernetes-validations": [
                {"rule": "!self.startsWith('/')", "message": "must be relative"}]}
        }),
    );
    // Stored under an older, laxer schema.
    let stored = object(json!({"node": {}, "name": "toolong", "tags": ["a", "a"], "dir": "/abs"}));
    // Changing something else: the old violations are not reported.
    let mut update = object(
        json!({"node": {}, "name": "toolong", "tags": ["a", "a"], "dir": "/abs", "path": "p"}),
    );
    assert_eq!(schema.admit(&mut update, Some(&stored)), Ok(()));
    // Changing the offending values: reported again.
    let mut worse =
        object(json!({"node": {}, "name": "toolonger", "tags": ["a", "a", "b"], "dir": "/abs2"}));
    assert_eq!(
        messages(schema.admit(&mut worse, Some(&stored))),
        vec![
            "spec.tags[1]: Duplicate value: \"a\"",
            "spec.name: Too long: may not be more than 3 bytes",
            CEL_SKIPPED,
        ]
    );
    let mut cel_only =
        object(json!({"node": {}, "name": "toolong", "tags": ["a", "a"], "dir": "/abs2"}));
    assert_eq!(
        messages(schema.admit(&mut cel_only, Some(&stored))),
        vec!["spec.dir: Invalid value: \"string\": must be relative"]
    );
    // On create the same object is refused.
    let mut created = stored.clone();
    assert!(schema.admit(&mut created, None).is_err());
}

#[test]
fn unknown_fields_are_reported_and_root_rules_see_only_name_in_metadata() {
    let root = json!({
        "type": "object",
        "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {
                "items": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
                "keep": {"type": "string", "nullable": false}}}
        },
        "x-kubernetes-validations": [
            {"rule": "self.metadata.name.startsWith('d')", "message": "name must start with d"},
            {"rule": "!has(self.metadata.labels)", "message": "labels are visible"}
        ]
    });
    let schema = match CompiledSchema::compile(&root) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let mut obj = json!({
        "apiVersion": "peerfill.dev/v1alpha1", "kind": "Distribution",
        "metadata": {"name": "d1", "labels": {"a": "b"}},
        "spec": {"items": [{"a": "x", "b": 1}], "keep": null, "extra": true},
        "status": {}
    });
    let (unknown, result) = schema.admit_reporting_unknown(&mut obj, None);
    assert_eq!(unknown, vec!["status", "spec.extra", "spec.items[0].b"]);
    assert_eq!(result, Ok(()));
    assert_eq!(obj["metadata"]["labels"], json!({"a": "b"}));

    let mut other = json!({"apiVersion": "peerfill.dev/v1alpha1", "kind": "Distribution", "metadata": {"name": "x1"}, "spec": {}});
    assert_eq!(
        messages(schema.admit(&mut other, None)),
        vec!["<nil>: Invalid value: \"object\": name must start with d"]
    );
}

#[test]
fn cel_matches_uses_re2_semantics_and_reports_bad_patterns() {
    let schema = cel_schema(
        json!([
            {"rule": "!has(self.path) || self.path.matches('^[a-z/]+$')", "message": "lower case only", "fieldPath": ".path"},
            {"rule": "!has(self.size) || string(self.size).matches('(')"}
        ]),
        json!({}),
    );
    let mut ok = object(json!({"node": {}, "path": "a/b"}));
    assert_eq!(schema.admit(&mut ok, None), Ok(()));
    let mut upper = object(json!({"node": {}, "path": "A"}));
    assert_eq!(
        messages(schema.admit(&mut upper, None)),
        vec!["spec.path: Invalid value: \"object\": lower case only"]
    );
    let mut bad = object(json!({"node": {}, "size": 1}));
    let msgs = messages(schema.admit(&mut bad, None));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(
        msgs[0].starts_with("spec: Invalid value: \"object\": "),
        "{msgs:?}"
    );
    assert!(
        msgs[0].contains("not a valid regex")
            && msgs[0]
                .ends_with("evaluating rule: !has(self.size) || string(self.size).matches('(')"),
        "{msgs:?}"
    );
}

#[test]
fn go_regex_classes_are_ascii() {
    for (go, rust) in [
        (r"^\d+$", r"^[0-9]+$"),
        (r"\S\W", r"[^\t\n\f\r ][^0-9A-Za-z_]"),
        (
            r"^https?://[^\s/?#]+([/?#]\S*)?$",
            r"^https?://[^\t\n\f\r /?#]+([/?#][^\t\n\f\r ]*)?$",
        ),
        (r"[]\d]", r"[]0-9]"),
        (r"[[:alpha:]\w]", r"[[:alpha:]0-9A-Za-z_]"),
        (r"\\d\.", r"\\d\."),
        (r"[^\S]", r"[^\S]"),
    ] {
        assert_eq!(go_classes_to_ascii(go), rust, "{go}");
    }
    // Go's \s does not include a no-break space, and \d no other digits.
    run_table(vec![
        (
            "no-break space is not \\s in Go",
            json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^\\S+$"}}}),
            json!({"s": "a\u{a0}b"}),
            vec![],
        ),
        (
            "Arabic-Indic digits are not \\d in Go",
            json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^\\d+$"}}}),
            json!({"s": "\u{661}"}),
            vec![(
                "spec.s",
                Invalid,
                "spec.s: Invalid value: \"\u{661}\": spec.s in body should match '^\\d+$'",
            )],
        ),
    ]);
}

#[test]
fn kubernetes_list_library_and_unknown_functions() {
    let schema = cel_schema(
        json!([
            {"rule": "!has(self.nums) || self.nums.isSorted()", "message": "must be sorted"},
            {"rule": "!has(self.nums) || size(self.nums) == 0 || (self.nums.sum() <= 10 && self.nums.min() >= 0 && self.nums.max() < 10)", "message": "bounds"},
            {"rule": "!has(self.names) || self.names.indexOf('root') == -1", "message": "no root"},
            {"rule": "!has(self.names) || self.names.lastIndexOf('a') <= 1", "message": "a late"},
            {"rule": "!has(self.names) || self.names.all(n, n.lowerAscii() == n) && [1, 2].exists_one(x, x == 2) && optional.of(1).hasValue()", "message": "lower"}
        ]),
        json!({
            "nums": {"type": "array", "items": {"type": "integer"}},
            "names": {"type": "array", "items": {"type": "string"}}
        }),
    );
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            json!({"node": {}, "nums": [1, 2, 3], "names": ["a", "b"]}),
            vec![],
        ),
        (json!({"node": {}, "nums": []}), vec![]),
        (
            json!({"node": {}, "nums": [3, 1], "names": ["x", "root", "a", "a"]}),
            vec![
                "spec: Invalid value: \"object\": must be sorted",
                "spec: Invalid value: \"object\": no root",
                "spec: Invalid value: \"object\": a late",
            ],
        ),
        (
            json!({"node": {}, "nums": [5, 6], "names": ["B"]}),
            vec![
                "spec: Invalid value: \"object\": bounds",
                "spec: Invalid value: \"object\": lower",
            ],
        ),
    ];
    for (spec, want) in cases {
        let mut obj = object(spec.clone());
        assert_eq!(messages(schema.admit(&mut obj, None)), want, "spec {spec}");
    }

    // A function the environment does not have fails at compile, not on
    // every admission.
    let unknown =
        json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.noSuchFunction()"}]});
    match CompiledSchema::compile(&unknown) {
        Err(SchemaError::Rule { message, .. }) => {
            assert_eq!(message, "undeclared reference to 'noSuchFunction'")
        }
        other => panic!("expected a rule compile error, got {other:?}"),
    }
}

#[test]
fn metadata_only_name_and_generate_name_are_checked_by_the_schema() {
    let root = json!({
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 5},
                "labels": {"type": "string"}}},
            "spec": {"type": "object"}
        }
    });
    let schema = match CompiledSchema::compile(&root) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let mut ok = json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "short", "labels": {"a": "b"}}, "spec": {}});
    assert_eq!(schema.admit(&mut ok, None), Ok(()));
    let mut long =
        json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "too-long"}, "spec": {}});
    assert_eq!(
        messages(schema.admit(&mut long, None)),
        vec![
            "metadata.name: Too long: may not be more than 5 bytes",
            CEL_SKIPPED
        ]
    );
}

#[test]
fn kubernetes_url_library() {
    let schema = cel_schema(
        json!([
            {"rule": "!has(self.http) || isURL(self.http.url)", "message": "not a URL", "fieldPath": ".http.url"},
            {"rule": "!has(self.http) || !isURL(self.http.url) || url(self.http.url).getScheme() in ['http', 'https']",
             "message": "scheme must be http or https", "fieldPath": ".http.url"},
            {"rule": "!has(self.http) || !isURL(self.http.url) || url(self.http.url).getHostname() != 'localhost'",
             "message": "no localhost"},
            {"rule": "!has(self.http) || !isURL(self.http.url) || url(self.http.url).getPort() == '' || int(url(self.http.url).getPort()) > 1024",
             "message": "no privileged port"},
            {"rule": "!has(self.http) || !isURL(self.http.url) || !('token' in url(self.http.url).getQuery())",
             "message": "no token in the query"},
            {"rule": "!has(self.http) || !isURL(self.http.url) || url(self.http.url).getEscapedPath().startsWith('/')",
             "message": "needs a path"}
        ]),
        json!({}),
    );
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("https://origin.example:8443/blob?x=1", vec![]),
        (
            "not a url",
            vec!["spec.http.url: Invalid value: \"object\": not a URL"],
        ),
        (
            "ftp://origin.example/blob",
            vec!["spec.http.url: Invalid value: \"object\": scheme must be http or https"],
        ),
        (
            "http://localhost:80/x?token=a%20b",
            vec![
                "spec: Invalid value: \"object\": no localhost",
                "spec: Invalid value: \"object\": no privileged port",
                "spec: Invalid value: \"object\": no token in the query",
            ],
        ),
        (
            "https://origin.example",
            vec!["spec: Invalid value: \"object\": needs a path"],
        ),
    ];
    for (url, want) in cases {
        let mut obj = object(json!({"http": {"url": url}}));
        assert_eq!(messages(schema.admit(&mut obj, None)), want, "{url}");
    }
}

#[test]
fn cel_sees_escaped_property_names_and_raw_map_keys() {
    let schema = cel_schema(
        json!([
            {"rule": "!has(self.__namespace__) || self.__namespace__ != 'kube-system'", "message": "not kube-system"},
            {"rule": "!has(self.max__dash__rate) || self.max__dash__rate > 0", "message": "positive rate"},
            {"rule": "!has(self.labels) || !('app.kubernetes.io/name' in self.labels) || self.labels['app.kubernetes.io/name'] != ''",
             "message": "empty app name"}
        ]),
        json!({
            "namespace": {"type": "string"},
            "max-rate": {"type": "integer"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}
        }),
    );
    let mut ok = object(
        json!({"node": {}, "namespace": "apps", "max-rate": 1, "labels": {"app.kubernetes.io/name": "x"}}),
    );
    assert_eq!(schema.admit(&mut ok, None), Ok(()));
    let mut bad = object(
        json!({"node": {}, "namespace": "kube-system", "max-rate": 0, "labels": {"app.kubernetes.io/name": ""}}),
    );
    assert_eq!(
        messages(schema.admit(&mut bad, None)),
        vec![
            "spec: Invalid value: \"object\": not kube-system",
            "spec: Invalid value: \"object\": positive rate",
            "spec: Invalid value: \"object\": empty app name",
        ]
    );
}

#[test]
fn kubernetes_regex_library() {
    let schema = cel_schema(
        json!([
            {"rule": "!has(self.path) || self.path.find('[0-9]+') == '' || int(self.path.find('[0-9]+')) < 100", "message": "version below 100"},
            {"rule": "!has(self.path) || size(self.path.findAll('/')) < 3", "message": "at most 3 segments"},
            {"rule": "!has(self.path) || self.path.findAll('[a-z]', 2) == ['v', 'v'] || !self.path.startsWith('vv')", "message": "limit"}
        ]),
        json!({}),
    );
    let mut ok = object(json!({"node": {}, "path": "vv42/a"}));
    assert_eq!(schema.admit(&mut ok, None), Ok(()));
    let mut bad = object(json!({"node": {}, "path": "v420/a/b/c"}));
    assert_eq!(
        messages(schema.admit(&mut bad, None)),
        vec![
            "spec: Invalid value: \"object\": version below 100",
            "spec: Invalid value: \"object\": at most 3 segments"
        ]
    );
}

#[test]
fn cel_treats_null_fields_as_absent() {
    // The generated Distribution rule: `http: null` next to `node` is fine.
    let schema = resource(json!({
        "type": "object",
        "properties": {"source": {
            "type": "object",
            "properties": {
                "http": {"type": "object", "nullable": true, "properties": {"url": {"type": "string"}}},
                "node": {"type": "object", "nullable": true, "properties": {"path": {"type": "string"}}}
            },
            "x-kubernetes-validations": [{"rule": "has(self.http) != has(self.node)", "message": "exactly one"}]
        }}
    }));
    let mut one = object(json!({"source": {"http": null, "node": {"path": "a"}}}));
    assert_eq!(schema.admit(&mut one, None), Ok(()));
    assert_eq!(
        one["spec"]["source"]["http"],
        Value::Null,
        "nullable null is kept"
    );
    let mut none = object(json!({"source": {"http": null, "node": null}}));
    assert_eq!(
        messages(schema.admit(&mut none, None)),
        vec!["spec.source: Invalid value: \"object\": exactly one"]
    );
}

#[test]
fn embedded_resources_need_kind_and_api_version() {
    let spec = json!({"type": "object", "properties": {"template": {
        "type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}}});
    run_table(vec![
        (
            "complete",
            spec.clone(),
            json!({"template": {"apiVersion": "v1", "kind": "Pod", "spec": {}}}),
            vec![],
        ),
        (
            "missing kind, bad apiVersion",
            spec.clone(),
            json!({"template": {"apiVersion": "a/b/c"}}),
            vec![
                (
                    "spec.template.apiVersion",
                    Invalid,
                    "spec.template.apiVersion: Invalid value: \"a/b/c\": unexpected GroupVersion string: a/b/c",
                ),
                (
                    "spec.template.kind",
                    Required,
                    "spec.template.kind: Required value: must not be empty",
                ),
                ("<nil>", Invalid, CEL_SKIPPED),
            ],
        ),
        (
            "empty kind",
            spec,
            json!({"template": {"apiVersion": "v1", "kind": ""}}),
            vec![(
                "spec.template.kind",
                Invalid,
                "spec.template.kind: Invalid value: \"\": must not be empty",
            )],
        ),
    ]);
}
