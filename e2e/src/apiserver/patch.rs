//! Patch flavours: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! strategic merge patch (approximated, see [`strategic_merge`]) and the
//! field-ownership bookkeeping behind server-side apply.
//!
//! Server-side apply is simplified: ownership is tracked per manager as a set
//! of leaf paths (scalars, atomic lists, and map entries of lists keyed by
//! `name`), stored in `metadata.managedFields[].fieldsV1` in the real
//! `f:`/`k:` notation. An apply conflicts when another manager owns a leaf the
//! applied configuration sets to a different value; `force=true` takes the
//! leaf over. Leaves a manager applied before and omits now are removed from
//! the object unless another manager also owns them. Non-apply writes give
//! their manager the leaves they changed and take those from everyone else.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::error::{ApiError, ApiResult};

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &Value) -> ApiResult<()> {
    let mut ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    // kube-apiserver's JSON patch library reads a missing path as null in a
    // `test` op (kube-rs's finalizer helper relies on it); the crate does
    // not, so those tests are decided here.
    ops.0.retain(|op| match op {
        json_patch::PatchOperation::Test(t) => {
            !(t.value.is_null() && target.pointer(t.path.as_str()).is_none())
        }
        _ => true,
    });
    json_patch::patch(target, &ops).map_err(|e| {
        ApiError::internal(format!(
            "the server rejected our request due to an error in our request: {e}"
        ))
    })
}

/// Merge key of a list field, as the built-in types' strategic-merge tags
/// declare it. `None` means the list is replaced atomically.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" | "addresses" => "type",
        "taints" => "key",
        "ownerReferences" => "uid",
        "images" | "tolerations" => return None,
        _ => return None,
    })
}

/// Primitive lists whose strategy is "merge" (set union).
fn is_set_list(field: &str) -> bool {
    matches!(field, "finalizers")
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for x in m.values_mut() {
                strip_directives(x);
            }
        }
        Value::Array(a) => {
            a.retain(|x| x.get("$patch").and_then(Value::as_str) != Some("delete"));
            for x in a {
                strip_directives(x);
            }
        }
        _ => {}
    }
}

/// Strategic merge patch, approximated: a JSON merge patch in which lists of
/// the built-in kinds with a known merge key (`name`, `type`, `uid`, ... as the
/// Go types declare) are merged element by element, `finalizers` is merged as
/// a set, and the `$patch: delete|replace`, `$deleteFromPrimitiveList/` and
/// `$setElementOrder/` directives are honoured (element order from
/// `$setElementOrder` is not applied; `$retainKeys` is ignored).
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        strip_directives(&mut replaced);
        *target = replaced;
        return;
    }
    if p.get("$patch").and_then(Value::as_str) == Some("delete") {
        *target = Value::Object(Map::new());
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(del)) = (t.get_mut(field), v) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(cur)), Value::Array(new)) => {
                if let Some(key) = merge_key(k) {
                    merge_keyed_list(cur, new, key, true);
                } else if is_set_list(k) {
                    for x in new {
                        if !cur.contains(x) {
                            cur.push(x.clone());
                        }
                    }
                } else {
                    let mut n = v.clone();
                    strip_directives(&mut n);
                    *cur = n.as_array().cloned().unwrap_or_default();
                }
            }
            (Some(cur @ Value::Object(_)), Value::Object(_)) => strategic_merge(cur, v),
            _ => {
                let mut n = v.clone();
                strip_directives(&mut n);
                t.insert(k.clone(), n);
            }
        }
    }
}

fn merge_keyed_list(cur: &mut Vec<Value>, new: &[Value], key: &str, directives: bool) {
    for item in new {
        let Some(kv) = item.get(key).cloned() else {
            cur.push(item.clone());
            continue;
        };
        let pos = cur.iter().position(|c| c.get(key) == Some(&kv));
        if directives && item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                cur.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => {
                if directives {
                    strategic_merge(&mut cur[i], item);
                } else {
                    apply_merge(&mut cur[i], item);
                }
            }
            None => {
                let mut n = item.clone();
                strip_directives(&mut n);
                cur.push(n);
            }
        }
    }
}

/// Merge of an applied configuration into the live object: maps merge,
/// keyed lists merge by key (`name` for lists of named objects), other lists
/// and scalars are replaced.
pub fn apply_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (t @ Value::Object(_), Value::Object(a)) => {
            let Value::Object(tm) = t else { return };
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                match (tm.get_mut(k), v) {
                    (Some(Value::Array(cur)), Value::Array(new)) => match list_key(k, new) {
                        Some(key) => merge_keyed_list(cur, new, key, false),
                        None => *cur = new.clone(),
                    },
                    (Some(cur @ Value::Object(_)), Value::Object(_)) => apply_merge(cur, v),
                    _ => {
                        tm.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Merge key for a list in apply: the known built-in keys, or `name` when
/// every element is an object with a string `name`.
fn list_key(field: &str, items: &[Value]) -> Option<&'static str> {
    if let Some(k) = merge_key(field) {
        return Some(k);
    }
    (!items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").and_then(Value::as_str).is_some()))
    .then_some("name")
}

/// One step of a managed-field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathElem {
    Field(String),
    /// List element identified by its merge key and value.
    Key(String, String),
}

pub type FieldPath = Vec<PathElem>;

/// Metadata fields that are owned like content; everything else in metadata
/// belongs to the server.
const OWNED_META: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

/// Leaf paths of an object for ownership purposes.
pub fn leaves(obj: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Value::Object(meta) = v {
                        for f in OWNED_META {
                            if let Some(x) = meta.get(*f) {
                                let p = vec![
                                    PathElem::Field("metadata".into()),
                                    PathElem::Field((*f).into()),
                                ];
                                collect(x, f, p, &mut out);
                            }
                        }
                    }
                }
                _ => collect(v, k, vec![PathElem::Field(k.clone())], &mut out),
            }
        }
    }
    out
}

fn collect(v: &Value, field: &str, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let mut p = path.clone();
                p.push(PathElem::Field(k.clone()));
                collect(x, k, p, out);
            }
        }
        Value::Array(items) => match list_key(field, items) {
            Some(key) if items.iter().all(|i| i.get(key).is_some()) => {
                for item in items {
                    let kv = match item.get(key) {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => continue,
                    };
                    let mut p = path.clone();
                    p.push(PathElem::Key(key.to_string(), kv));
                    collect_item(item, key, p, out);
                }
            }
            _ => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

fn collect_item(item: &Value, key: &str, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    if let Value::Object(m) = item {
        let mut any = false;
        for (k, x) in m {
            if k == key {
                continue;
            }
            any = true;
            let mut p = path.clone();
            p.push(PathElem::Field(k.clone()));
            collect(x, k, p, out);
        }
        if !any {
            out.insert(path);
        }
    }
}

/// Value at a path (None when absent).
pub fn value_at<'a>(obj: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            PathElem::Field(f) => cur.get(f)?,
            PathElem::Key(k, v) => cur.as_array()?.iter().find(|i| match i.get(k) {
                Some(Value::String(s)) => s == v,
                Some(other) => other.to_string().as_str() == v.as_str(),
                None => false,
            })?,
        };
    }
    Some(cur)
}

/// Removes the value at a path; prunes list elements left with only their key.
pub fn remove_at(obj: &mut Value, path: &FieldPath) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for e in parent_path {
        let next = match e {
            PathElem::Field(f) => cur.get_mut(f),
            PathElem::Key(k, v) => cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|i| i.get(k).and_then(Value::as_str) == Some(v.as_str()))
            }),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        PathElem::Field(f) => {
            if let Value::Object(m) = cur {
                m.remove(f);
            }
        }
        PathElem::Key(k, v) => {
            if let Value::Array(a) = cur {
                a.retain(|i| i.get(k).and_then(Value::as_str) != Some(v.as_str()));
            }
        }
    }
}

pub fn path_string(path: &FieldPath) -> String {
    let mut s = String::new();
    for e in path {
        match e {
            PathElem::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            PathElem::Key(k, v) => s.push_str(&format!("[{k}={v:?}]")),
        }
    }
    s
}

/// Set of leaf paths as `fieldsV1`.
pub fn to_fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for e in p {
            let key = match e {
                PathElem::Field(f) => format!("f:{f}"),
                PathElem::Key(k, v) => format!("k:{}", json!({ k.as_str(): v })),
            };
            let entry = cur.entry(key).or_insert_with(|| Value::Object(Map::new()));
            cur = match entry {
                Value::Object(m) => m,
                _ => break,
            };
        }
    }
    Value::Object(root)
}

/// Parses `fieldsV1` back into leaf paths.
pub fn from_fields_v1(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    walk_fields(v, Vec::new(), &mut out);
    out
}

fn walk_fields(v: &Value, path: FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Value::Object(m) = v else { return };
    let children: Vec<_> = m.iter().filter(|(k, _)| k.as_str() != ".").collect();
    if children.is_empty() {
        if !path.is_empty() {
            out.insert(path);
        }
        return;
    }
    for (k, child) in children {
        let elem = if let Some(f) = k.strip_prefix("f:") {
            PathElem::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            match serde_json::from_str::<BTreeMap<String, Value>>(key) {
                Ok(m) => match m.into_iter().next() {
                    Some((kk, Value::String(vv))) => PathElem::Key(kk, vv),
                    Some((kk, other)) => PathElem::Key(kk, other.to_string()),
                    None => continue,
                },
                Err(_) => continue,
            }
        } else {
            continue;
        };
        let mut p = path.clone();
        p.push(elem);
        walk_fields(child, p, out);
    }
}

/// One `managedFields` entry, decoded.
#[derive(Debug, Clone)]
pub struct Manager {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub subresource: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

pub fn read_managers(obj: &Value) -> Vec<Manager> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    let text = |key: &str, absent: &str| {
                        e.get(key)
                            .and_then(Value::as_str)
                            .unwrap_or(absent)
                            .to_string()
                    };
                    Manager {
                        manager: text("manager", ""),
                        operation: text("operation", "Update"),
                        api_version: text("apiVersion", ""),
                        subresource: text("subresource", ""),
                        time: text("time", ""),
                        fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managers(obj: &mut Value, managers: &[Manager]) {
    let entries: Vec<Value> = managers
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// Records a non-apply write by `manager`: it owns the leaves it changed.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: &str,
    now: &str,
) {
    let mut managers = old.map(read_managers).unwrap_or_default();
    let new_leaves = leaves(new);
    let old_leaves = old.map(leaves).unwrap_or_default();
    let changed: BTreeSet<FieldPath> = new_leaves
        .iter()
        .filter(|p| old.and_then(|o| value_at(o, p)) != value_at(new, p))
        .cloned()
        .collect();
    let removed: BTreeSet<FieldPath> = old_leaves.difference(&new_leaves).cloned().collect();
    for m in &mut managers {
        m.fields
            .retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    if !changed.is_empty() {
        match managers.iter_mut().find(|m| {
            m.manager == manager && m.operation == "Update" && m.subresource == subresource
        }) {
            Some(m) => {
                m.fields.extend(changed);
                m.time = now.to_string();
                m.api_version = api_version.to_string();
            }
            None => managers.push(Manager {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                subresource: subresource.to_string(),
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    write_managers(new, &managers);
}

/// Server-side apply of `applied` by `manager` onto `live` (an empty object
/// for a create). Returns the merged object with updated managedFields, or a
/// 409 listing the conflicting fields.
#[allow(clippy::too_many_arguments)]
pub fn server_side_apply(
    live: &Value,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    subresource: &str,
    now: &str,
    conflict: impl Fn(String) -> ApiError,
) -> ApiResult<Value> {
    let mut managers = read_managers(live);
    let applied_leaves = leaves(applied);
    let mut conflicts: Vec<(String, FieldPath)> = Vec::new();
    for m in &managers {
        if m.manager == manager && m.operation == "Apply" {
            continue;
        }
        for p in m.fields.intersection(&applied_leaves) {
            if value_at(live, p) != value_at(applied, p) {
                conflicts.push((m.manager.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let n = conflicts.len();
        let list = conflicts
            .iter()
            .map(|(m, p)| format!("conflict with \"{m}\": {}", path_string(p)))
            .collect::<Vec<_>>();
        let msg = if n == 1 {
            format!("Apply failed with 1 conflict: {}", list.join(""))
        } else {
            format!("Apply failed with {n} conflicts: {}", list.join("\n"))
        };
        return Err(conflict(msg));
    }
    for m in &mut managers {
        if m.manager == manager && m.operation == "Apply" {
            continue;
        }
        m.fields.retain(|p| !applied_leaves.contains(p));
    }
    let previously: BTreeSet<FieldPath> = managers
        .iter()
        .filter(|m| m.manager == manager && m.operation == "Apply" && m.subresource == subresource)
        .flat_map(|m| m.fields.iter().cloned())
        .collect();
    let others: BTreeSet<FieldPath> = managers
        .iter()
        .filter(|m| !(m.manager == manager && m.operation == "Apply"))
        .flat_map(|m| m.fields.iter().cloned())
        .collect();
    let mut out = live.clone();
    for p in previously.difference(&applied_leaves) {
        if !others.contains(p) {
            remove_at(&mut out, p);
        }
    }
    apply_merge(&mut out, applied);
    managers.retain(|m| {
        !(m.manager == manager && m.operation == "Apply" && m.subresource == subresource)
    });
    managers.push(Manager {
        manager: manager.to_string(),
        operation: "Apply".into(),
        api_version: api_version.to_string(),
        subresource: subresource.to_string(),
        time: now.to_string(),
        fields: applied_leaves,
    });
    write_managers(&mut out, &managers);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn json_patch_test_null_matches_a_missing_path() {
        // What kube-rs's finalizer helper sends for an object without any.
        let add_first = json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": ["f"] },
        ]);
        let mut t = json!({"metadata": {"name": "x"}});
        json_patch(&mut t, &add_first).expect("missing path tests equal to null");
        assert_eq!(t["metadata"]["finalizers"], json!(["f"]));
        // Now present: the same test fails, as on the real server.
        assert!(json_patch(&mut t, &add_first).is_err());
        // A non-null value still needs the path.
        let mut t = json!({"metadata": {}});
        let test_value = json!([{ "op": "test", "path": "/metadata/uid", "value": "u" }]);
        assert!(json_patch(&mut t, &test_value).is_err());
    }

    #[test]
    fn strategic_merges_named_lists() {
        let mut t = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
            "metadata": {"finalizers": ["f1"]}});
        strategic_merge(
            &mut t,
            &json!({"spec": {"containers": [{"name": "b", "image": "z"}, {"name": "a", "$patch": "delete"}],
                "$setElementOrder/containers": [{"name": "b"}]},
                "metadata": {"finalizers": ["f2"]}}),
        );
        assert_eq!(
            t["spec"]["containers"],
            json!([{"name": "b", "image": "z"}])
        );
        assert_eq!(t["metadata"]["finalizers"], json!(["f1", "f2"]));
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"x": 1, "items": [{"name": "n", "v": 2}], "l": [1, 2]}});
        let l = leaves(&obj);
        assert_eq!(from_fields_v1(&to_fields_v1(&l)), l);
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn apply_conflicts_and_removal() {
        // Only the manager, the object and force vary between the applies.
        let apply = |live: &Value, applied: &Value, manager: &str, force: bool| {
            let conflict = |m: String| ApiError::conflict("things", "", "t", m);
            server_side_apply(live, applied, manager, force, "v1", "", "t", conflict)
        };
        let a1 = json!({"spec": {"x": 1, "y": 2}});
        let live = apply(&json!({"metadata": {}}), &a1, "m1", false).unwrap_or_default();
        assert_eq!(live["spec"], json!({"x": 1, "y": 2}));
        // A second manager setting x differently conflicts unless forced.
        let a2 = json!({"spec": {"x": 5}});
        let err = apply(&live, &a2, "m2", false);
        assert!(err.is_err_and(|e| e.code == 409 && e.message.contains("\"m1\": .spec.x")));
        let live2 = apply(&live, &a2, "m2", true).unwrap_or_default();
        assert_eq!(live2["spec"]["x"], json!(5));
        // m1 drops y: removed; x now belongs to m2 and stays.
        let live3 = apply(&live2, &json!({"spec": {}}), "m1", false).unwrap_or_default();
        assert_eq!(live3["spec"], json!({"x": 5}));
    }
}
