//! `meta.k8s.io/v1 Table` rendering for `kubectl get`: printer columns from
//! the CRD (evaluated with a small JSONPath subset) and sensible defaults for
//! the built-in kinds.

use serde_json::{Value, json};

use super::meta::{self, str_at};
use super::registry::{PrinterColumn, ResourceDef};

/// Evaluates the JSONPath subset CRD printer columns use: `.a.b`, `[n]`,
/// `['key']`, `[*]` and `[?(@.k=="v")]` filters. Returns all matches.
pub fn jsonpath<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path.trim();
    let path = path
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .unwrap_or(path);
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut cur: Vec<&Value> = vec![obj];
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'.' => {
                let start = i + 1;
                let mut j = start;
                while j < bytes.len() && bytes[j] != b'.' && bytes[j] != b'[' {
                    j += 1;
                }
                let field = &path[start..j];
                if !field.is_empty() {
                    cur = cur.into_iter().filter_map(|v| v.get(field)).collect();
                }
                i = j;
            }
            b'[' => {
                let Some(end) = find_close(path, i) else {
                    return Vec::new();
                };
                let inner = path[i + 1..end].trim();
                cur = step_bracket(cur, inner);
                i = end + 1;
            }
            _ => {
                // A leading bare field name.
                let start = i;
                let mut j = start;
                while j < bytes.len() && bytes[j] != b'.' && bytes[j] != b'[' {
                    j += 1;
                }
                let field = &path[start..j];
                cur = cur.into_iter().filter_map(|v| v.get(field)).collect();
                i = j;
            }
        }
    }
    cur
}

fn find_close(path: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut in_quote: Option<char> = None;
    for (k, c) in path[open..].char_indices() {
        match (in_quote, c) {
            (Some(q), c) if c == q => in_quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => in_quote = Some(c),
            (None, '[') => depth += 1,
            (None, ']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + k);
                }
            }
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| s.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
        .unwrap_or(s)
}

fn step_bracket<'a>(cur: Vec<&'a Value>, inner: &str) -> Vec<&'a Value> {
    if inner == "*" {
        return cur
            .into_iter()
            .flat_map(|v| match v {
                Value::Array(a) => a.iter().collect::<Vec<_>>(),
                Value::Object(m) => m.values().collect(),
                _ => Vec::new(),
            })
            .collect();
    }
    if let Some(filter) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
        let (lhs, op, rhs) = if let Some((l, r)) = filter.split_once("==") {
            (l, "==", Some(r))
        } else if let Some((l, r)) = filter.split_once("!=") {
            (l, "!=", Some(r))
        } else {
            (filter, "exists", None)
        };
        let field_path = lhs
            .trim()
            .strip_prefix('@')
            .unwrap_or(lhs.trim())
            .to_string();
        let want = rhs.map(|r| unquote(r).to_string());
        return cur
            .into_iter()
            .flat_map(|v| {
                v.as_array()
                    .map(|a| a.iter().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .filter(|item| {
                let got = jsonpath(item, &field_path);
                let got_s = got.first().map(|g| scalar_string(g));
                match (op, &want) {
                    ("==", Some(w)) => got_s.as_deref() == Some(w.as_str()),
                    ("!=", Some(w)) => got_s.as_deref() != Some(w.as_str()),
                    _ => !got.is_empty(),
                }
            })
            .collect();
    }
    if let Ok(n) = inner.parse::<i64>() {
        return cur
            .into_iter()
            .filter_map(|v| {
                let a = v.as_array()?;
                let idx = if n < 0 { a.len() as i64 + n } else { n };
                usize::try_from(idx).ok().and_then(|i| a.get(i))
            })
            .collect();
    }
    let key = unquote(inner);
    cur.into_iter().filter_map(|v| v.get(key)).collect()
}

fn scalar_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A cell as the CRD table convertor renders it for the column type.
fn cell(col_type: &str, values: &[&Value]) -> Value {
    let Some(first) = values.first() else {
        return Value::Null;
    };
    match col_type {
        "integer" => first.as_i64().map(Value::from).unwrap_or(Value::Null),
        "number" => first.as_f64().map(Value::from).unwrap_or(Value::Null),
        "boolean" => first.as_bool().map(Value::from).unwrap_or(Value::Null),
        "date" => match first.as_str() {
            Some(s) => json!(meta::age_of(s)),
            None => Value::Null,
        },
        _ => {
            if values.len() > 1 {
                json!(
                    values
                        .iter()
                        .map(|v| scalar_string(v))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            } else {
                match first {
                    Value::String(s) => json!(s),
                    Value::Object(_) | Value::Array(_) => json!(first.to_string()),
                    other => json!(scalar_string(other)),
                }
            }
        }
    }
}

fn col(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: format.into(),
        description: description.into(),
        priority,
        json_path: String::new(),
    }
}

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str =
    "CreationTimestamp is a timestamp representing the server time when this object was created.";

/// Columns and the cells of one object for a built-in kind.
fn builtin_columns(def: &ResourceDef) -> Vec<PrinterColumn> {
    let mut cols = vec![col("Name", "string", "name", NAME_DESC, 0)];
    match def.plural.as_str() {
        "nodes" => {
            cols.push(col("Status", "string", "", "The status of the node", 0));
            cols.push(col("Roles", "string", "", "The roles of the node", 0));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
            cols.push(col(
                "Version",
                "string",
                "",
                "Kubelet Version reported by the node.",
                0,
            ));
        }
        "pods" => {
            cols.push(col(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod for accepting traffic.",
                0,
            ));
            cols.push(col(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod.",
                0,
            ));
            cols.push(col(
                "Restarts",
                "string",
                "",
                "The number of times the containers in this pod have been restarted.",
                0,
            ));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
            cols.push(col("Node", "string", "", "Name of the node.", 1));
        }
        "secrets" => {
            cols.push(col("Type", "string", "", "The type of the secret", 0));
            cols.push(col(
                "Data",
                "string",
                "",
                "The number of entries in the data",
                0,
            ));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
        }
        "configmaps" => {
            cols.push(col("Data", "string", "", "Number of data entries", 0));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
        }
        "namespaces" => {
            cols.push(col(
                "Status",
                "string",
                "",
                "The status of the namespace",
                0,
            ));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
        }
        "leases" => {
            cols.push(col("Holder", "string", "", "The holder of the lease", 0));
            cols.push(col("Age", "string", "", AGE_DESC, 0));
        }
        "events" => {
            cols = vec![
                col(
                    "Last Seen",
                    "string",
                    "",
                    "Time when this Event was last observed.",
                    0,
                ),
                col("Type", "string", "", "Type of this event.", 0),
                col("Reason", "string", "", "Why the action was taken.", 0),
                col(
                    "Object",
                    "string",
                    "",
                    "The object that this event is about.",
                    0,
                ),
                col(
                    "Message",
                    "string",
                    "",
                    "A human-readable description of the status of this operation.",
                    0,
                ),
            ];
        }
        "customresourcedefinitions" => {
            cols.push(col("Created At", "date", "", AGE_DESC, 0));
        }
        _ => cols.push(col("Age", "string", "", AGE_DESC, 0)),
    }
    cols
}

fn builtin_cells(def: &ResourceDef, o: &Value) -> Vec<Value> {
    let name = json!(str_at(o, "/metadata/name"));
    let age = json!(meta::age_of(str_at(o, "/metadata/creationTimestamp")));
    let count = |ptr: &str| {
        o.pointer(ptr)
            .and_then(Value::as_object)
            .map_or(0, |m| m.len())
    };
    match def.plural.as_str() {
        "nodes" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|c| {
                    c.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                })
                .and_then(|c| c.get("status").and_then(Value::as_str))
                .map_or(
                    "Unknown",
                    |s| if s == "True" { "Ready" } else { "NotReady" },
                );
            let mut status = ready.to_string();
            if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<&str> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .collect()
                })
                .unwrap_or_default();
            let roles = if roles.is_empty() {
                "<none>".to_string()
            } else {
                roles.join(",")
            };
            vec![
                name,
                json!(status),
                json!(roles),
                age,
                json!(str_at(o, "/status/nodeInfo/kubeletVersion")),
            ]
        }
        "pods" => {
            let statuses = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses.map_or(0, |s| {
                s.iter()
                    .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                    .count()
            });
            let restarts: i64 = statuses.map_or(0, |s| {
                s.iter()
                    .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                    .sum()
            });
            let phase = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating"
            } else {
                str_at(o, "/status/phase")
            };
            let node = match str_at(o, "/spec/nodeName") {
                "" => "<none>",
                n => n,
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(phase),
                json!(restarts.to_string()),
                age,
                json!(node),
            ]
        }
        "secrets" => vec![
            name,
            json!(str_at(o, "/type")),
            json!(count("/data").to_string()),
            age,
        ],
        "configmaps" => vec![
            name,
            json!((count("/data") + count("/binaryData")).to_string()),
            age,
        ],
        "namespaces" => vec![name, json!(str_at(o, "/status/phase")), age],
        "leases" => vec![name, json!(str_at(o, "/spec/holderIdentity")), age],
        "events" => {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/deprecatedLastTimestamp",
                "/metadata/creationTimestamp",
            ]
            .iter()
            .map(|p| str_at(o, p))
            .find(|s| !s.is_empty())
            .unwrap_or("");
            let (kind, oname) = if def.group.is_empty() {
                (
                    str_at(o, "/involvedObject/kind"),
                    str_at(o, "/involvedObject/name"),
                )
            } else {
                (str_at(o, "/regarding/kind"), str_at(o, "/regarding/name"))
            };
            let message = if def.group.is_empty() {
                str_at(o, "/message")
            } else {
                str_at(o, "/note")
            };
            vec![
                json!(meta::age_of(last)),
                json!(str_at(o, "/type")),
                json!(str_at(o, "/reason")),
                json!(format!("{}/{oname}", kind.to_lowercase())),
                json!(message),
            ]
        }
        "customresourcedefinitions" => vec![name, json!(str_at(o, "/metadata/creationTimestamp"))],
        _ => vec![name, age],
    }
}

/// Builds the Table for `objects` (`include`: "None", "Metadata" or "Object").
pub fn to_table(
    def: &ResourceDef,
    objects: &[Value],
    resource_version: Option<String>,
    include: &str,
) -> Value {
    let (columns, custom) = if def.custom {
        let mut cols = vec![col("Name", "string", "name", NAME_DESC, 0)];
        if def.printer_columns.is_empty() {
            let mut age = col("Age", "date", "", AGE_DESC, 0);
            age.json_path = ".metadata.creationTimestamp".into();
            cols.push(age);
        } else {
            cols.extend(def.printer_columns.iter().cloned());
        }
        (cols, true)
    } else {
        (builtin_columns(def), false)
    };
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = if custom {
                let mut c = vec![json!(str_at(o, "/metadata/name"))];
                c.extend(
                    columns
                        .iter()
                        .skip(1)
                        .map(|col| cell(&col.type_, &jsonpath(o, &col.json_path))),
                );
                c
            } else {
                builtin_cells(def, o)
            };
            let mut row = json!({"cells": cells});
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            row
        })
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": columns.iter().map(|c| json!({
            "name": c.name,
            "type": if c.type_ == "date" && !custom { "string".to_string() } else { c.type_.clone() },
            "format": c.format,
            "description": c.description,
            "priority": c.priority,
        })).collect::<Vec<_>>(),
        "rows": rows,
    });
    if let Some(rv) = resource_version {
        table["metadata"]["resourceVersion"] = json!(rv);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Complete", "status": "False"}]},
            "metadata": {"labels": {"a.b/c": "x"}}});
        assert_eq!(jsonpath(&o, ".status.phase"), vec![&json!("Running")]);
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Complete\")].status"),
            vec![&json!("False")]
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[0].type"),
            vec![&json!("Ready")]
        );
        assert_eq!(jsonpath(&o, ".metadata.labels['a.b/c']"), vec![&json!("x")]);
        assert!(jsonpath(&o, ".status.missing").is_empty());
    }
}
