//! Admission of custom resources against a CRD version's `openAPIV3Schema`, the
//! way kube-apiserver (apiextensions-apiserver) does it: prune unknown fields,
//! apply defaults, validate with the OpenAPI v3 subset CRDs allow, check
//! `x-kubernetes-list-type` invariants, then evaluate `x-kubernetes-validations`
//! CEL rules. Errors carry the real server's field paths and message shapes, and
//! [`invalid_status`] builds the 422 `Status` object it returns.
//!
//! Two path renderings coexist on purpose: OpenAPI errors name map entries as
//! `spec.labels.key` (go-openapi's names, copied into the field by the server),
//! while CEL and list-type errors use `field.Path` syntax, `spec.labels[key]`.

#[path = "validation/cel.rs"]
mod cel;
#[path = "validation/format.rs"]
mod format;
#[path = "validation/url.rs"]
mod url;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use regex::Regex;
use serde_json::{Map, Value};

/// Why a schema could not be compiled; the real server rejects such a CRD.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{path}: {keyword} must be {expected}")]
    BadKeyword {
        path: String,
        keyword: &'static str,
        expected: &'static str,
    },
    #[error("{path}: pattern {pattern:?} does not compile: {source}")]
    Pattern {
        path: String,
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("{path}: x-kubernetes-validations[{index}]: compilation failed: {message}")]
    Rule {
        path: String,
        index: usize,
        message: String,
    },
    #[error("{path}: unsupported type {ty:?}")]
    UnsupportedType { path: String, ty: String },
}

/// The kind of a field error, one to one with apimachinery's `field.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldErrorKind {
    Invalid,
    Required,
    NotSupported,
    TooLong,
    TooMany,
    TypeInvalid,
    Forbidden,
    Duplicate,
}

impl FieldErrorKind {
    fn text(self) -> &'static str {
        match self {
            FieldErrorKind::Invalid | FieldErrorKind::TypeInvalid => "Invalid value",
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::TooLong => "Too long",
            FieldErrorKind::TooMany => "Too many",
            FieldErrorKind::Forbidden => "Forbidden",
            FieldErrorKind::Duplicate => "Duplicate value",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::TooLong => "FieldValueTooLong",
            FieldErrorKind::TooMany => "FieldValueTooMany",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
        }
    }

    /// Schema errors after which the server does not run CEL rules (the object
    /// does not have the shape the rules were written for).
    fn blocks_cel(self) -> bool {
        matches!(
            self,
            FieldErrorKind::NotSupported
                | FieldErrorKind::Required
                | FieldErrorKind::TooLong
                | FieldErrorKind::TooMany
                | FieldErrorKind::TypeInvalid
        )
    }
}

/// One field-level validation error (apimachinery's `field.Error`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// `spec.target.path`, `spec.items[0]`; `<nil>` for the object root.
    pub field: String,
    pub kind: FieldErrorKind,
    /// The offending value; `None` when the message omits it.
    pub value: Option<Value>,
    pub detail: String,
}

impl FieldError {
    fn new(field: String, kind: FieldErrorKind, value: Option<Value>, detail: String) -> Self {
        FieldError {
            field,
            kind,
            value,
            detail,
        }
    }

    /// As the real server prints it: `<field>: <body>`.
    pub fn message(&self) -> String {
        format!("{}: {}", self.field, self.body())
    }

    /// The message without the field (a StatusCause's `message`).
    pub fn body(&self) -> String {
        let mut s = String::from(self.kind.text());
        let omit = matches!(
            self.kind,
            FieldErrorKind::Required | FieldErrorKind::Forbidden | FieldErrorKind::TooLong
        );
        if !omit && let Some(value) = &self.value {
            s.push_str(": ");
            s.push_str(&go_value(value));
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }

    /// The StatusCause reason (`FieldValueInvalid`, ...).
    pub fn reason(&self) -> &'static str {
        self.kind.reason()
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// The 422 `Status` kube-apiserver returns for an invalid object
/// (`apierrors.NewInvalid`). Duplicate messages are listed once in `message`,
/// as `ErrorList.ToAggregate` does, but every error stays a cause.
pub fn invalid_status(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> Value {
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let mut seen = std::collections::HashSet::new();
    let messages: Vec<String> = errors
        .iter()
        .map(FieldError::message)
        .filter(|m| seen.insert(m.clone()))
        .collect();
    let message = match messages.len() {
        0 => format!("{qualified} {} is invalid", go_quote(name)),
        1 => format!("{qualified} {} is invalid: {}", go_quote(name), messages[0]),
        _ => format!(
            "{qualified} {} is invalid: [{}]",
            go_quote(name),
            messages.join(", ")
        ),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| {
            serde_json::json!({
                "reason": e.reason(),
                "message": e.body(),
                "field": e.field,
            })
        })
        .collect();
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Invalid",
        "details": {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": causes,
        },
        "code": 422,
    })
}

// ---------------------------------------------------------------------------
// Paths

#[derive(Debug, Clone)]
enum Seg {
    Field(String),
    Index(usize),
    Key(String),
}

/// A location in the object. Cheap enough: objects are small and errors rare.
#[derive(Debug, Clone, Default)]
struct Path(Vec<Seg>);

impl Path {
    fn child(&self, name: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Field(name.to_string()));
        p
    }
    fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    /// go-openapi's name: map keys as `.key`; empty at the root.
    fn openapi(&self) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Field(f) | Seg::Key(f) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(f);
                }
                Seg::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
            }
        }
        s
    }

    /// The field of an error raised from an OpenAPI check: the server wraps the
    /// go-openapi name into a `field.Path`, and a nil path prints `<nil>`.
    fn openapi_field(&self) -> String {
        let s = self.openapi();
        if s.is_empty() { "<nil>".to_string() } else { s }
    }

    /// `field.Path.String()`: map keys as `[key]`.
    fn field(&self) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Field(f) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(f);
                }
                Seg::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
                Seg::Key(k) => {
                    let _ = write!(s, "[{k}]");
                }
            }
        }
        if s.is_empty() { "<nil>".to_string() } else { s }
    }
}

// ---------------------------------------------------------------------------
// Compiled schema

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Object => "object",
            Type::Array => "array",
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
        }
    }
}

enum Additional {
    Allows(bool),
    Schema(Box<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListType {
    Atomic,
    Set,
    Map,
}

/// One schema node, with everything parsed up front.
#[derive(Debug, Default)]
struct Node {
    ty: Option<Type>,
    nullable: bool,
    format: Option<String>,
    properties: BTreeMap<String, Node>,
    required: Vec<String>,
    additional: Option<Additional>,
    items: Option<Box<Node>>,
    enum_values: Vec<Value>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: bool,
    exclusive_maximum: bool,
    multiple_of: Option<f64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    pattern: Option<(String, Regex)>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    unique_items: bool,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    default: Option<Value>,
    preserve_unknown: bool,
    int_or_string: bool,
    embedded_resource: bool,
    list_type: Option<ListType>,
    list_map_keys: Vec<String>,
    all_of: Vec<Node>,
    any_of: Vec<Node>,
    one_of: Vec<Node>,
    not: Option<Box<Node>>,
    rules: Vec<cel::Rule>,
}

impl std::fmt::Debug for Additional {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Additional::Allows(b) => write!(f, "Allows({b})"),
            Additional::Schema(_) => f.write_str("Schema(..)"),
        }
    }
}

/// The value of keyword `key` through `convert` (absent and null: `None`);
/// a value `convert` refuses is an error saying it should be `expected`.
fn get_keyword<T>(
    m: &Map<String, Value>,
    key: &'static str,
    path: &str,
    expected: &'static str,
    convert: impl FnOnce(&Value) -> Option<T>,
) -> Result<Option<T>, SchemaError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => convert(v).map(Some).ok_or_else(|| SchemaError::BadKeyword {
            path: path.to_string(),
            keyword: key,
            expected,
        }),
    }
}

fn get_u64(
    m: &Map<String, Value>,
    key: &'static str,
    path: &str,
) -> Result<Option<u64>, SchemaError> {
    get_keyword(m, key, path, "a non-negative integer", Value::as_u64)
}

fn get_f64(
    m: &Map<String, Value>,
    key: &'static str,
    path: &str,
) -> Result<Option<f64>, SchemaError> {
    get_keyword(m, key, path, "a number", Value::as_f64)
}

fn get_bool(m: &Map<String, Value>, key: &'static str, path: &str) -> Result<bool, SchemaError> {
    Ok(get_keyword(m, key, path, "a boolean", Value::as_bool)?.unwrap_or(false))
}

fn sub_path(path: &str, rest: &str) -> String {
    if path.is_empty() {
        rest.to_string()
    } else {
        format!("{path}.{rest}")
    }
}

impl Node {
    fn compile(v: &Value, path: &str) -> Result<Node, SchemaError> {
        let m = v.as_object().ok_or_else(|| SchemaError::BadKeyword {
            path: path.to_string(),
            keyword: "schema",
            expected: "an object",
        })?;
        let mut n = Node {
            ty: match m.get("type").and_then(Value::as_str) {
                None | Some("") => None,
                Some("object") => Some(Type::Object),
                Some("array") => Some(Type::Array),
                Some("string") => Some(Type::String),
                Some("integer") => Some(Type::Integer),
                Some("number") => Some(Type::Number),
                Some("boolean") => Some(Type::Boolean),
                Some(other) => {
                    return Err(SchemaError::UnsupportedType {
                        path: path.to_string(),
                        ty: other.to_string(),
                    });
                }
            },
            nullable: get_bool(m, "nullable", path)?,
            format: m
                .get("format")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            minimum: get_f64(m, "minimum", path)?,
            maximum: get_f64(m, "maximum", path)?,
            exclusive_minimum: get_bool(m, "exclusiveMinimum", path)?,
            exclusive_maximum: get_bool(m, "exclusiveMaximum", path)?,
            multiple_of: get_f64(m, "multipleOf", path)?,
            min_length: get_u64(m, "minLength", path)?,
            max_length: get_u64(m, "maxLength", path)?,
            min_items: get_u64(m, "minItems", path)?,
            max_items: get_u64(m, "maxItems", path)?,
            unique_items: get_bool(m, "uniqueItems", path)?,
            min_properties: get_u64(m, "minProperties", path)?,
            max_properties: get_u64(m, "maxProperties", path)?,
            default: m.get("default").cloned(),
            preserve_unknown: get_bool(m, "x-kubernetes-preserve-unknown-fields", path)?,
            int_or_string: get_bool(m, "x-kubernetes-int-or-string", path)?,
            embedded_resource: get_bool(m, "x-kubernetes-embedded-resource", path)?,
            ..Node::default()
        };
        if let Some(p) = m.get("pattern").and_then(Value::as_str) {
            // Go's RE2 `MatchString` is unanchored, as is `Regex::is_match`.
            let re = go_regex(p).map_err(|e| SchemaError::Pattern {
                path: path.to_string(),
                pattern: p.to_string(),
                source: Box::new(e),
            })?;
            n.pattern = Some((p.to_string(), re));
        }
        if let Some(req) = m.get("required") {
            let arr = req.as_array().ok_or_else(|| SchemaError::BadKeyword {
                path: path.to_string(),
                keyword: "required",
                expected: "a list of strings",
            })?;
            for r in arr {
                let s = r.as_str().ok_or_else(|| SchemaError::BadKeyword {
                    path: path.to_string(),
                    keyword: "required",
                    expected: "a list of strings",
                })?;
                n.required.push(s.to_string());
            }
        }
        if let Some(e) = m.get("enum") {
            n.enum_values = e
                .as_array()
                .ok_or_else(|| SchemaError::BadKeyword {
                    path: path.to_string(),
                    keyword: "enum",
                    expected: "a list",
                })?
                .clone();
        }
        if let Some(props) = m.get("properties") {
            let props = props.as_object().ok_or_else(|| SchemaError::BadKeyword {
                path: path.to_string(),
                keyword: "properties",
                expected: "an object",
            })?;
            for (k, v) in props {
                let child = Node::compile(v, &sub_path(path, &format!("properties[{k}]")))?;
                n.properties.insert(k.clone(), child);
            }
        }
        match m.get("additionalProperties") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => n.additional = Some(Additional::Allows(*b)),
            Some(v) => {
                let child = Node::compile(v, &sub_path(path, "additionalProperties"))?;
                n.additional = Some(Additional::Schema(Box::new(child)));
            }
        }
        if let Some(items) = m.get("items") {
            n.items = Some(Box::new(Node::compile(items, &sub_path(path, "items"))?));
        }
        for (key, target) in [
            ("allOf", &mut n.all_of),
            ("anyOf", &mut n.any_of),
            ("oneOf", &mut n.one_of),
        ] {
            if let Some(list) = m.get(key) {
                let list = list.as_array().ok_or_else(|| SchemaError::BadKeyword {
                    path: path.to_string(),
                    keyword: "allOf/anyOf/oneOf",
                    expected: "a list of schemas",
                })?;
                for (i, s) in list.iter().enumerate() {
                    target.push(Node::compile(s, &sub_path(path, &format!("{key}[{i}]")))?);
                }
            }
        }
        if let Some(not) = m.get("not") {
            n.not = Some(Box::new(Node::compile(not, &sub_path(path, "not"))?));
        }
        n.list_type = match m.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => Some(ListType::Set),
            Some("map") => Some(ListType::Map),
            Some("atomic") => Some(ListType::Atomic),
            _ => None,
        };
        if let Some(keys) = m
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
        {
            n.list_map_keys = keys
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if let Some(rules) = m.get("x-kubernetes-validations") {
            let rules = rules.as_array().ok_or_else(|| SchemaError::BadKeyword {
                path: path.to_string(),
                keyword: "x-kubernetes-validations",
                expected: "a list of rules",
            })?;
            for (i, r) in rules.iter().enumerate() {
                let rule = cel::Rule::compile(r).map_err(|message| SchemaError::Rule {
                    path: path.to_string(),
                    index: i,
                    message,
                })?;
                n.rules.push(rule);
            }
        }
        Ok(n)
    }

    /// The type CEL sees, `object`/`array`/... as the server names it in errors.
    fn type_name(&self) -> &'static str {
        match self.ty {
            Some(t) => t.name(),
            // int-or-string has no type: the server prints an empty one.
            None => "",
        }
    }

    fn property_schema(&self, key: &str) -> Option<&Node> {
        if let Some(p) = self.properties.get(key) {
            return Some(p);
        }
        match &self.additional {
            Some(Additional::Schema(s)) => Some(s),
            _ => None,
        }
    }
}

/// A CRD version's openAPIV3Schema, compiled once (regexes and CEL programs
/// parsed up front).
#[derive(Debug)]
pub struct CompiledSchema {
    root: Node,
}

impl CompiledSchema {
    pub fn compile(open_api_v3_schema: &Value) -> Result<Self, SchemaError> {
        Ok(CompiledSchema {
            root: Node::compile(open_api_v3_schema, "openAPIV3Schema")?,
        })
    }

    /// Admission of a custom resource as kube-apiserver does it, in its order:
    /// prune unknown fields (honouring x-kubernetes-preserve-unknown-fields and
    /// never touching apiVersion/kind/metadata), apply defaults (`default`, also
    /// inside arrays/maps), then validate. `old` is the stored object on update
    /// (for CEL transition rules with `oldSelf`, which are skipped on create as
    /// the real server does; values equal to their stored counterpart are not
    /// re-validated, the server's validation ratcheting). Returns every error,
    /// not just the first.
    pub fn admit(&self, obj: &mut Value, old: Option<&Value>) -> Result<(), Vec<FieldError>> {
        self.admit_reporting_unknown(obj, old).1
    }

    /// [`admit`](Self::admit) that also returns the paths of the unknown
    /// fields it pruned (`spec.foo`, `spec.items[0].bar`), for the server's
    /// `unknown field "<path>"` warnings and strict field validation. Nulls
    /// dropped or replaced by defaults are not unknown fields.
    pub fn admit_reporting_unknown(
        &self,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> (Vec<String>, Result<(), Vec<FieldError>>) {
        let mut unknown = Vec::new();
        prune(obj, &self.root, &Path::default(), true, &mut unknown);
        apply_defaults(obj, &self.root);
        let errors = self.validate(obj, old);
        let result = if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        };
        (unknown, result)
    }

    /// Validation only (no pruning or defaulting), in the server's order:
    /// list-type invariants, OpenAPI schema, then CEL unless an earlier error
    /// makes the rules meaningless.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        validate_embedded(obj, old, &self.root, &Path::default(), &mut errors);
        validate_list_types(obj, old, &self.root, &Path::default(), &mut errors);
        validate_node(obj, old, &self.root, &Path::default(), true, &mut errors);
        if errors.iter().any(|e| e.kind.blocks_cel()) {
            errors.push(FieldError::new(
                "<nil>".to_string(),
                FieldErrorKind::Invalid,
                Some(Value::String("null".into())),
                "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".to_string(),
            ));
        } else {
            cel_walk(obj, old, &self.root, &Path::default(), true, &mut errors);
        }
        errors
    }
}

// ---------------------------------------------------------------------------
// Pruning

/// Removes fields the schema does not know, recording their paths (the server
/// reports them as `unknown field "<path>"` warnings, or refuses the request
/// under strict field validation).
fn prune(v: &mut Value, s: &Node, path: &Path, is_resource_root: bool, removed: &mut Vec<String>) {
    const META: [&str; 3] = ["apiVersion", "kind", "metadata"];
    match v {
        Value::Object(map) => {
            let keep_meta = is_resource_root || s.embedded_resource;
            let keeps_unknown = s.preserve_unknown
                || matches!(
                    s.additional,
                    Some(Additional::Schema(_)) | Some(Additional::Allows(true))
                );
            if !keeps_unknown {
                map.retain(|k, _| {
                    let keep =
                        s.properties.contains_key(k) || (keep_meta && META.contains(&k.as_str()));
                    if !keep {
                        removed.push(path.child(k).field());
                    }
                    keep
                });
            }
            for (k, child) in map.iter_mut() {
                if is_resource_root && k == "metadata" {
                    // ObjectMeta is the server's, never pruned by the CRD schema.
                    continue;
                }
                if let Some(cs) = s.properties.get(k) {
                    prune(child, cs, &path.child(k), false, removed);
                } else if keep_meta && META.contains(&k.as_str()) {
                    continue;
                } else if let Some(Additional::Schema(cs)) = &s.additional {
                    prune(child, cs, &path.key(k), false, removed);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = &s.items {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item, is, &path.index(i), false, removed);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Defaulting

fn apply_defaults(v: &mut Value, s: &Node) {
    match v {
        Value::Object(map) => {
            // A null where null is not allowed is replaced by the default, or
            // dropped when there is none (the server's non-nullable null pruning).
            let mut drop = Vec::new();
            for (k, cs) in &s.properties {
                match map.get(k) {
                    None => {
                        if let Some(d) = &cs.default {
                            map.insert(k.clone(), d.clone());
                        }
                    }
                    Some(Value::Null) if !cs.nullable => match &cs.default {
                        Some(d) => {
                            map.insert(k.clone(), d.clone());
                        }
                        None => drop.push(k.clone()),
                    },
                    Some(_) => {}
                }
            }
            if let Some(Additional::Schema(cs)) = &s.additional {
                for (k, val) in map.iter_mut() {
                    if s.properties.contains_key(k) {
                        continue;
                    }
                    if val.is_null() && !cs.nullable {
                        match &cs.default {
                            Some(d) => *val = d.clone(),
                            None => drop.push(k.clone()),
                        }
                    }
                }
            }
            for k in drop {
                map.remove(&k);
            }
            for (k, child) in map.iter_mut() {
                if let Some(cs) = s.property_schema(k) {
                    apply_defaults(child, cs);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = &s.items {
                for item in items.iter_mut() {
                    if item.is_null()
                        && !is.nullable
                        && let Some(d) = &is.default
                    {
                        *item = d.clone();
                    }
                    apply_defaults(item, is);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// OpenAPI validation (go-openapi's validator order: type, composition, string,
// format, number, array, enum, object)

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integral(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.is_i64()
                || n.is_u64()
                || n.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
        }
        _ => false,
    }
}

fn openapi_err(
    path: &Path,
    kind: FieldErrorKind,
    value: Option<Value>,
    detail: String,
) -> FieldError {
    FieldError::new(path.openapi_field(), kind, value, detail)
}

/// `old` is the correlated stored value on update: a value equal to it is not
/// validated again (the server's validation ratcheting), so objects stored
/// under an older schema stay updatable as long as the offending values stay.
fn validate_node(
    v: &Value,
    old: Option<&Value>,
    s: &Node,
    path: &Path,
    is_resource_root: bool,
    errors: &mut Vec<FieldError>,
) {
    if old.is_some_and(|o| json_equal(o, v)) {
        return;
    }
    let name = path.openapi();
    // null: only the type and enum checks apply.
    if v.is_null() {
        if let Some(t) = s.ty
            && !s.nullable
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::TypeInvalid,
                Some(Value::String("null".into())),
                format!("{name} in body must be of type {}: \"null\"", t.name()),
            ));
        }
        check_enum(v, s, path, errors);
        return;
    }

    // type (a mismatch does not stop the other checks: go-openapi runs each
    // validator that applies to the value's actual kind)
    let actual = json_type(v);
    let expected = match s.ty {
        Some(t) => {
            let ok = match t {
                Type::Integer => actual == "integer" || (actual == "number" && is_integral(v)),
                Type::Number => actual == "integer" || actual == "number",
                other => other.name() == actual,
            };
            (!ok).then_some(t.name())
        }
        None => {
            let ok = !s.int_or_string
                || matches!(actual, "integer" | "string")
                || (actual == "number" && is_integral(v));
            (!ok).then_some("integer,string")
        }
    };
    if let Some(expected) = expected {
        errors.push(openapi_err(
            path,
            FieldErrorKind::TypeInvalid,
            Some(Value::String(actual.into())),
            format!(
                "{name} in body must be of type {expected}: {}",
                go_quote(actual)
            ),
        ));
    }

    // composition
    validate_composition(v, old, s, path, errors);

    // string
    if let Value::String(st) = v {
        let len = st.chars().count() as u64;
        if let Some(max) = s.max_length
            && len > max
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::TooLong,
                Some(v.clone()),
                format!(
                    "may not be more than {max} {}",
                    if max == 1 { "byte" } else { "bytes" }
                ),
            ));
        }
        if let Some(min) = s.min_length
            && len < min
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(v.clone()),
                format!("{name} in body should be at least {min} chars long"),
            ));
        }
        if let Some((src, re)) = &s.pattern
            && !re.is_match(st)
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(v.clone()),
                format!("{name} in body should match '{src}'"),
            ));
        }
        // format
        if let Some(f) = &s.format
            && !format::is_valid(f, st)
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::TypeInvalid,
                Some(v.clone()),
                format!("{name} in body must be of type {f}: {}", go_quote(st)),
            ));
        }
    }

    // number
    if let Value::Number(n) = v {
        validate_number(v, n, s, path, &name, errors);
    }

    // array
    if let Value::Array(items) = v {
        if let Some(is) = &s.items {
            for (i, item) in items.iter().enumerate() {
                validate_node(
                    item,
                    old_item(s, old, item),
                    is,
                    &path.index(i),
                    false,
                    errors,
                );
            }
        }
        let size = items.len() as u64;
        if let Some(min) = s.min_items
            && size < min
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(Value::from(size)),
                format!("{name} in body should have at least {min} items"),
            ));
        }
        if let Some(max) = s.max_items
            && size > max
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::TooMany,
                Some(Value::from(size)),
                format!(
                    "must have at most {max} item{}",
                    if max == 1 { "" } else { "s" }
                ),
            ));
        }
        if s.unique_items && has_duplicates(items) {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(Value::String(String::new())),
                format!("{name} in body shouldn't contain duplicates"),
            ));
        }
    }

    // enum
    check_enum(v, s, path, errors);

    // object
    if let Value::Object(map) = v {
        let n = map.len() as u64;
        if let Some(min) = s.min_properties
            && n < min
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(Value::from(n)),
                format!("{name} in body should have at least {min} properties"),
            ));
            return;
        }
        if let Some(max) = s.max_properties
            && n > max
        {
            errors.push(openapi_err(
                path,
                FieldErrorKind::TooMany,
                Some(Value::from(n)),
                format!(
                    "must have at most {max} item{}",
                    if max == 1 { "" } else { "s" }
                ),
            ));
            return;
        }
        match &s.additional {
            Some(Additional::Allows(false)) => {
                for k in map.keys() {
                    if s.properties.contains_key(k)
                        || (is_resource_root
                            && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                    {
                        continue;
                    }
                    errors.push(openapi_err(
                        path,
                        FieldErrorKind::Invalid,
                        Some(Value::String(k.clone())),
                        format!("{name}.{k} in body is a forbidden property"),
                    ));
                }
            }
            Some(Additional::Schema(cs)) => {
                for (k, child) in map {
                    if !s.properties.contains_key(k) {
                        validate_node(
                            child,
                            old.and_then(|o| o.get(k)),
                            cs,
                            &path.key(k),
                            false,
                            errors,
                        );
                    }
                }
            }
            _ => {}
        }
        for (k, cs) in &s.properties {
            if is_resource_root && k == "metadata" {
                // ObjectMeta is validated by the server itself; a CRD schema
                // may only constrain its name and generateName further.
                for field in ["name", "generateName"] {
                    if let (Some(fs), Some(fv)) = (
                        cs.properties.get(field),
                        map.get(k).and_then(|m| m.get(field)),
                    ) {
                        let old_field = old.and_then(|o| o.get(k)).and_then(|m| m.get(field));
                        validate_node(
                            fv,
                            old_field,
                            fs,
                            &path.child(k).child(field),
                            false,
                            errors,
                        );
                    }
                }
                continue;
            }
            if let Some(child) = map.get(k) {
                validate_node(
                    child,
                    old.and_then(|o| o.get(k)),
                    cs,
                    &path.child(k),
                    cs.embedded_resource,
                    errors,
                );
            }
        }
        for k in &s.required {
            if !map.contains_key(k) {
                errors.push(openapi_err(
                    &path.child(k),
                    FieldErrorKind::Required,
                    None,
                    String::new(),
                ));
            }
        }
    }
}

fn check_enum(v: &Value, s: &Node, path: &Path, errors: &mut Vec<FieldError>) {
    if s.enum_values.is_empty() || s.enum_values.iter().any(|e| json_equal(e, v)) {
        return;
    }
    let supported: Vec<String> = s
        .enum_values
        .iter()
        .map(|e| match e {
            Value::String(st) => go_quote(st),
            other => go_quote(&other.to_string()),
        })
        .collect();
    errors.push(openapi_err(
        path,
        FieldErrorKind::NotSupported,
        Some(v.clone()),
        format!("supported values: {}", supported.join(", ")),
    ));
}

/// JSON equality where 1 and 1.0 are the same number.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, p)| y.get(k).is_some_and(|q| json_equal(p, q)))
        }
        _ => a == b,
    }
}

fn has_duplicates(items: &[Value]) -> bool {
    items
        .iter()
        .enumerate()
        .any(|(i, a)| items[..i].iter().any(|b| json_equal(a, b)))
}

fn validate_number(
    v: &Value,
    n: &serde_json::Number,
    s: &Node,
    path: &Path,
    name: &str,
    errors: &mut Vec<FieldError>,
) {
    let x = n.as_f64().unwrap_or(f64::NAN);
    let data_is_int = n.is_i64() || n.is_u64();
    // The server prints a bound as an integer when both sides are integers
    // (go-openapi's native-type checks), as a Go float otherwise.
    let show = |bound: f64| -> String {
        if data_is_int && bound.fract() == 0.0 && bound.abs() < 9.2e18 {
            format!("{}", bound as i64)
        } else {
            go_float(bound)
        }
    };
    if let Some(m) = s.multiple_of
        && m > 0.0
    {
        let q = x / m;
        if (q - q.round()).abs() > 1e-9 * q.abs().max(1.0) {
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(v.clone()),
                format!("{name} in body should be a multiple of {}", show(m)),
            ));
        }
    }
    if let Some(max) = s.maximum {
        let bad = if s.exclusive_maximum {
            x >= max
        } else {
            x > max
        };
        if bad {
            let rel = if s.exclusive_maximum {
                "less than"
            } else {
                "less than or equal to"
            };
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(v.clone()),
                format!("{name} in body should be {rel} {}", show(max)),
            ));
        }
    }
    if let Some(min) = s.minimum {
        let bad = if s.exclusive_minimum {
            x <= min
        } else {
            x < min
        };
        if bad {
            let rel = if s.exclusive_minimum {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errors.push(openapi_err(
                path,
                FieldErrorKind::Invalid,
                Some(v.clone()),
                format!("{name} in body should be {rel} {}", show(min)),
            ));
        }
    }
}

fn validate_composition(
    v: &Value,
    old: Option<&Value>,
    s: &Node,
    path: &Path,
    errors: &mut Vec<FieldError>,
) {
    let name = path.openapi();
    // Composite errors are not field errors in go-openapi: the server files them
    // under the nil path with an empty value.
    let composite = |detail: String| {
        FieldError::new(
            "<nil>".into(),
            FieldErrorKind::Invalid,
            Some(Value::String(String::new())),
            detail,
        )
    };
    let run = |sub: &Node| {
        let mut e = Vec::new();
        validate_node(v, old, sub, path, false, &mut e);
        e
    };
    if !s.any_of.is_empty() {
        let results: Vec<Vec<FieldError>> = s.any_of.iter().map(run).collect();
        if !results.iter().any(Vec::is_empty) {
            errors.push(composite(format!(
                "{} must validate at least one schema (anyOf)",
                go_quote(&name)
            )));
            if let Some(best) = results.into_iter().min_by_key(Vec::len) {
                errors.extend(best);
            }
        }
    }
    if !s.one_of.is_empty() {
        let results: Vec<Vec<FieldError>> = s.one_of.iter().map(run).collect();
        let valid = results.iter().filter(|r| r.is_empty()).count();
        if valid != 1 {
            let extra = if valid == 0 {
                "Found none valid".to_string()
            } else {
                format!("Found {valid} valid alternatives")
            };
            errors.push(composite(format!(
                "{} must validate one and only one schema (oneOf). {extra}",
                go_quote(&name)
            )));
            if valid == 0
                && let Some(best) = results.into_iter().min_by_key(Vec::len)
            {
                errors.extend(best);
            }
        }
    }
    if !s.all_of.is_empty() {
        let mut valid = 0;
        for sub in &s.all_of {
            let e = run(sub);
            if e.is_empty() {
                valid += 1;
            }
            errors.extend(e);
        }
        if valid != s.all_of.len() {
            let extra = if valid == 0 { ". None validated" } else { "" };
            errors.push(composite(format!(
                "{} must validate all the schemas (allOf){extra}",
                go_quote(&name)
            )));
        }
    }
    if let Some(not) = &s.not
        && run(not).is_empty()
    {
        errors.push(composite(format!(
            "{} must not validate the schema (not)",
            go_quote(&name)
        )));
    }
}

// ---------------------------------------------------------------------------
// x-kubernetes-embedded-resource: an embedded object needs a kind and a
// well-formed apiVersion (its metadata is left to the schema).

fn validate_embedded(
    v: &Value,
    old: Option<&Value>,
    s: &Node,
    path: &Path,
    errors: &mut Vec<FieldError>,
) {
    if old.is_some_and(|o| json_equal(o, v)) {
        return;
    }
    if let Value::Object(map) = v
        && s.embedded_resource
        && !path.0.is_empty()
    {
        for key in ["apiVersion", "kind"] {
            let at = path.child(key);
            match map.get(key) {
                None => errors.push(FieldError::new(
                    at.field(),
                    FieldErrorKind::Required,
                    None,
                    "must not be empty".into(),
                )),
                Some(Value::String(x)) if x.is_empty() => errors.push(FieldError::new(
                    at.field(),
                    FieldErrorKind::Invalid,
                    Some(Value::String(String::new())),
                    "must not be empty".into(),
                )),
                Some(Value::String(x)) if key == "apiVersion" && x.matches('/').count() > 1 => {
                    errors.push(FieldError::new(
                        at.field(),
                        FieldErrorKind::Invalid,
                        Some(Value::String(x.clone())),
                        format!("unexpected GroupVersion string: {x}"),
                    ))
                }
                Some(Value::String(_)) => {}
                Some(other) => errors.push(FieldError::new(
                    at.field(),
                    FieldErrorKind::Invalid,
                    Some(other.clone()),
                    "must be a string".into(),
                )),
            }
        }
    }
    for_each_child(v, old, s, false, path, |child, old_child, cs, at| {
        validate_embedded(child, old_child, cs, at, errors)
    });
}

// ---------------------------------------------------------------------------
// x-kubernetes-list-type

fn validate_list_types(
    v: &Value,
    old: Option<&Value>,
    s: &Node,
    path: &Path,
    errors: &mut Vec<FieldError>,
) {
    if old.is_some_and(|o| json_equal(o, v)) {
        // Ratcheting: an unchanged list keeps whatever duplicates it had.
        return;
    }
    if let Value::Array(items) = v {
        match s.list_type {
            Some(ListType::Set) => {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].iter().any(|b| json_equal(item, b)) {
                        errors.push(FieldError::new(
                            path.index(i).field(),
                            FieldErrorKind::Duplicate,
                            Some(item.clone()),
                            String::new(),
                        ));
                    }
                }
            }
            Some(ListType::Map) => {
                let keys_of = |item: &Value| -> Map<String, Value> {
                    let mut m = Map::new();
                    for k in &s.list_map_keys {
                        let kv = item.get(k).cloned().or_else(|| {
                            s.items
                                .as_ref()
                                .and_then(|is| is.properties.get(k))
                                .and_then(|p| p.default.clone())
                        });
                        if let Some(kv) = kv {
                            m.insert(k.clone(), kv);
                        }
                    }
                    m
                };
                let keys: Vec<Map<String, Value>> = items.iter().map(keys_of).collect();
                for i in 0..keys.len() {
                    if keys[..i].iter().any(|b| {
                        json_equal(&Value::Object(keys[i].clone()), &Value::Object(b.clone()))
                    }) {
                        errors.push(FieldError::new(
                            path.index(i).field(),
                            FieldErrorKind::Duplicate,
                            Some(Value::Object(keys[i].clone())),
                            String::new(),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    for_each_child(v, old, s, false, path, |child, old_child, cs, at| {
        validate_list_types(child, old_child, cs, at, errors)
    });
}

// ---------------------------------------------------------------------------
// CEL walk: rules at every node that has a value, `oldSelf` correlated through
// properties, map keys and map-type list keys (as the server correlates them).

fn cel_walk(
    v: &Value,
    old: Option<&Value>,
    s: &Node,
    path: &Path,
    is_resource_root: bool,
    errors: &mut Vec<FieldError>,
) {
    if v.is_null() {
        return;
    }
    let unchanged = old.is_some_and(|o| json_equal(o, v));
    for rule in &s.rules {
        if unchanged && !rule.is_transition() {
            // Ratcheting: a rule that does not look at oldSelf cannot newly
            // fail on a value that did not change.
            continue;
        }
        if let Some(err) = rule.evaluate(v, old, s, path, is_resource_root) {
            errors.push(err);
        }
    }
    for_each_child(
        v,
        old,
        s,
        is_resource_root,
        path,
        |child, old_child, cs, at| cel_walk(child, old_child, cs, at, false, errors),
    );
}

/// Calls `visit` on each child of `v` that has a schema: properties, then
/// (for other keys) the additionalProperties schema, and list items; each
/// with its stored counterpart. `skip_metadata` leaves out a resource root's
/// `metadata` property, which the server validates itself.
fn for_each_child<'v>(
    v: &'v Value,
    old: Option<&'v Value>,
    s: &'v Node,
    skip_metadata: bool,
    path: &Path,
    mut visit: impl FnMut(&'v Value, Option<&'v Value>, &'v Node, &Path),
) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let old_child = old.and_then(|o| o.get(k));
                if let Some(cs) = s.properties.get(k) {
                    if skip_metadata && k == "metadata" {
                        continue;
                    }
                    visit(child, old_child, cs, &path.child(k));
                } else if let Some(Additional::Schema(cs)) = &s.additional {
                    visit(child, old_child, cs, &path.key(k));
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = &s.items {
                for (i, item) in items.iter().enumerate() {
                    visit(item, old_item(s, old, item), is, &path.index(i));
                }
            }
        }
        _ => {}
    }
}

/// The stored counterpart of a list item, correlated as the server does: by
/// key for `map` lists, by value for `set` lists; atomic lists correlate no
/// items.
fn old_item<'a>(s: &Node, old: Option<&'a Value>, item: &Value) -> Option<&'a Value> {
    let Some(Value::Array(olds)) = old else {
        return None;
    };
    match s.list_type {
        Some(ListType::Map) => olds.iter().find(|o| {
            s.list_map_keys
                .iter()
                .all(|k| match (o.get(k), item.get(k)) {
                    (Some(a), Some(b)) => json_equal(a, b),
                    (None, None) => true,
                    _ => false,
                })
        }),
        Some(ListType::Set) => olds.iter().find(|o| json_equal(o, item)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Go-compatible regular expressions

/// Compiles a Go (RE2) pattern. The syntax is the same; what differs is that
/// Go's `\d`, `\s` and `\w` are ASCII-only while Rust's are Unicode-aware,
/// so those are spelled out as Go defines them.
fn go_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&go_classes_to_ascii(pattern))
}

fn go_classes_to_ascii(pattern: &str) -> String {
    const DIGIT: &str = "0-9";
    const SPACE: &str = "\\t\\n\\f\\r ";
    const WORD: &str = "0-9A-Za-z_";
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut chars = pattern.chars().peekable();
    // Inside `[...]`; `class_start` while a `]` would still be a literal.
    let mut in_class = false;
    let mut class_start = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    out.push(c);
                    break;
                };
                let ascii = match next {
                    'd' | 'D' => Some(DIGIT),
                    's' | 'S' => Some(SPACE),
                    'w' | 'W' => Some(WORD),
                    _ => None,
                };
                match ascii {
                    Some(set) if in_class && next.is_ascii_lowercase() => out.push_str(set),
                    Some(set) if !in_class => {
                        let neg = if next.is_ascii_uppercase() { "^" } else { "" };
                        let _ = write!(out, "[{neg}{set}]");
                    }
                    // A negated shorthand inside a class has no ASCII spelling
                    // short of rewriting the class; keep it.
                    _ => {
                        out.push(c);
                        out.push(next);
                    }
                }
                class_start = false;
            }
            '[' if !in_class => {
                out.push(c);
                in_class = true;
                class_start = true;
                if chars.peek() == Some(&'^') {
                    out.push('^');
                    chars.next();
                }
            }
            '[' if in_class && chars.peek() == Some(&':') => {
                // POSIX class such as `[:alpha:]`: copy through its `]`.
                out.push(c);
                for p in chars.by_ref() {
                    out.push(p);
                    if p == ']' {
                        break;
                    }
                }
                class_start = false;
            }
            ']' if in_class && !class_start => {
                out.push(c);
                in_class = false;
            }
            _ => {
                out.push(c);
                class_start = false;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Go-compatible printing

/// Go's `strconv.Quote` (what `%q` prints).
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                if (c as u32) < 0x10000 {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                } else {
                    let _ = write!(out, "\\U{:08x}", c as u32);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `%v` of a float64 (`%g` with the shortest digits): exponent form when
/// the decimal exponent is < -4 or >= 6, so 1e6 prints `1e+06`.
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // Rust's `{:e}` is the shortest round-trip representation: d.ddde±x.
    let e = format!("{f:e}");
    let (mantissa, exp) = match e.split_once('e') {
        Some((m, x)) => (m.to_string(), x.parse::<i32>().unwrap_or(0)),
        None => (e.clone(), 0),
    };
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    format!("{f}")
}

/// How the server prints a bad value (`%v`, `%q` for strings, `%#v` for the rest).
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => go_quote("null"),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(u)) => u.to_string(),
            _ => go_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => go_quote(s),
        other => go_sharp_v(other),
    }
}

/// Go's `%#v` of the unstructured form (`map[string]interface {}`, ...).
fn go_sharp_v(v: &Value) -> String {
    match v {
        Value::Null => "interface {}(nil)".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(_) => go_value(v),
        Value::String(s) => go_quote(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(go_sharp_v).collect();
            format!("[]interface {{}}{{{}}}", inner.join(", "))
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", go_quote(k), go_sharp_v(&map[k])))
                .collect();
            format!("map[string]interface {{}}{{{}}}", inner.join(", "))
        }
    }
}

#[cfg(test)]
#[path = "validation/tests.rs"]
mod tests;
