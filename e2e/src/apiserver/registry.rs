//! The served resource types: the built-in subset and the kinds that
//! CustomResourceDefinitions register at runtime.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, FieldCause};
use super::meta::{self, str_at};
use super::validation::CompiledSchema;

/// Verbs of every served resource, as discovery lists them.
const RESOURCE_VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// A printer column (`additionalPrinterColumns` of a CRD).
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served resource at one group/version.
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource: spec and status are written separately.
    pub has_status: bool,
    /// Custom resource (from a CRD).
    pub custom: bool,
    pub printer_columns: Vec<PrinterColumn>,
    pub schema: Option<CompiledSchema>,
    /// The CRD's openAPIV3Schema, published at /openapi/v3.
    pub raw_schema: Option<Value>,
    /// Fields accepted in `fieldSelector` besides metadata.name/namespace.
    pub field_selectors: &'static [&'static str],
}

impl std::fmt::Debug for ResourceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ResourceDef({}/{} {})",
            self.group, self.version, self.plural
        )
    }
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Storage identity: one store per group and resource whatever the
    /// version. Core v1 Events share the events.k8s.io store, as in the real
    /// server, and are converted on the way in and out.
    pub fn store_key(&self) -> (String, String) {
        if self.is_core_event() {
            return ("events.k8s.io".into(), "events".into());
        }
        (self.group.clone(), self.plural.clone())
    }

    fn is_core_event(&self) -> bool {
        self.group.is_empty() && self.plural == "events"
    }

    /// Stored form -> the form this endpoint serves.
    pub fn to_served(&self, mut o: Value) -> Value {
        if self.is_core_event() {
            rename_fields(&mut o, EVENT_FIELDS, false);
        }
        o["apiVersion"] = json!(self.api_version());
        o
    }

    /// Form this endpoint accepts -> stored form.
    pub fn to_stored(&self, mut o: Value) -> Value {
        if self.is_core_event() {
            rename_fields(&mut o, EVENT_FIELDS, true);
        }
        o
    }

    /// True when stored and served forms differ (selectors must see the served one).
    pub fn converts(&self) -> bool {
        self.is_core_event()
    }

    /// Generation is tracked for custom resources and for kinds with a spec/status split.
    pub fn tracks_generation(&self) -> bool {
        self.custom || self.has_status
    }

    /// Short names and categories, present only when there are any, as in
    /// both discovery formats.
    fn add_aliases(&self, entry: &mut Value) {
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            entry["categories"] = json!(self.categories);
        }
    }

    /// Entry of an aggregated (apidiscovery.k8s.io/v2) discovery document.
    fn aggregated_entry(&self) -> Value {
        let kind = json!({"group": self.group, "version": self.version, "kind": self.kind});
        let mut e = json!({
            "resource": self.plural,
            "responseKind": kind,
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": RESOURCE_VERBS,
        });
        self.add_aliases(&mut e);
        if self.has_status {
            e["subresources"] = json!([{"subresource": "status", "responseKind": kind, "verbs": ["get", "patch", "update"]}]);
        }
        e
    }

    fn discovery_entry(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": RESOURCE_VERBS,
        });
        self.add_aliases(&mut main);
        let mut out = vec![main];
        if self.has_status {
            out.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

/// events.k8s.io/v1 field -> core/v1 field.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

fn rename_fields(o: &mut Value, pairs: &[(&str, &str)], core_to_stored: bool) {
    let Some(m) = o.as_object_mut() else { return };
    for (stored, core) in pairs {
        let (from, to) = if core_to_stored {
            (core, stored)
        } else {
            (stored, core)
        };
        if let Some(v) = m.remove(*from) {
            m.insert((*to).to_string(), v);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    has_status: bool,
    field_selectors: &'static [&'static str],
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if matches!(plural, "pods" | "services") {
            vec!["all".into()]
        } else {
            vec![]
        },
        has_status,
        custom: false,
        printer_columns: vec![],
        schema: None,
        raw_schema: None,
        field_selectors,
    }
}

/// All resource types currently served, keyed by (group, version, plural).
#[derive(Default)]
pub struct Registry {
    defs: BTreeMap<(String, String, String), Arc<ResourceDef>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Self::default();
        for d in [
            builtin(
                "",
                "v1",
                "namespaces",
                "Namespace",
                false,
                &["ns"],
                true,
                &["status.phase"],
            ),
            builtin(
                "",
                "v1",
                "nodes",
                "Node",
                false,
                &["no"],
                true,
                &["spec.unschedulable"],
            ),
            builtin(
                "",
                "v1",
                "pods",
                "Pod",
                true,
                &["po"],
                true,
                &[
                    "spec.nodeName",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "status.phase",
                    "status.podIP",
                ],
            ),
            builtin("", "v1", "secrets", "Secret", true, &[], false, &["type"]),
            builtin(
                "",
                "v1",
                "configmaps",
                "ConfigMap",
                true,
                &["cm"],
                false,
                &[],
            ),
            builtin("", "v1", "services", "Service", true, &["svc"], true, &[]),
            builtin(
                "",
                "v1",
                "serviceaccounts",
                "ServiceAccount",
                true,
                &["sa"],
                false,
                &[],
            ),
            builtin(
                "",
                "v1",
                "events",
                "Event",
                true,
                &["ev"],
                false,
                &[
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "source",
                    "type",
                ],
            ),
            builtin(
                "coordination.k8s.io",
                "v1",
                "leases",
                "Lease",
                true,
                &[],
                false,
                &[],
            ),
            builtin(
                "events.k8s.io",
                "v1",
                "events",
                "Event",
                true,
                &[],
                false,
                &[
                    "regarding.kind",
                    "regarding.name",
                    "regarding.namespace",
                    "reason",
                    "type",
                ],
            ),
            builtin(
                "apps",
                "v1",
                "deployments",
                "Deployment",
                true,
                &["deploy"],
                true,
                &[],
            ),
            builtin(
                "apps",
                "v1",
                "daemonsets",
                "DaemonSet",
                true,
                &["ds"],
                true,
                &[],
            ),
            builtin(
                "apiextensions.k8s.io",
                "v1",
                "customresourcedefinitions",
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
                true,
                &[],
            ),
        ] {
            r.insert(d);
        }
        r
    }

    fn insert(&mut self, d: ResourceDef) {
        self.defs.insert(
            (d.group.clone(), d.version.clone(), d.plural.clone()),
            Arc::new(d),
        );
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceDef>> {
        self.defs.values()
    }

    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.defs.keys().any(|(g, v, _)| g == group && v == version)
    }

    /// Groups with their versions (first = preferred), `""` excluded.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, v, _) in self.defs.keys() {
            if g.is_empty() {
                continue;
            }
            let vs = out.entry(g.clone()).or_default();
            if !vs.contains(v) {
                vs.push(v.clone());
            }
        }
        for vs in out.values_mut() {
            vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        out
    }

    pub fn resource_list(&self, group: &str, version: &str) -> Value {
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        let resources: Vec<Value> = self
            .defs
            .iter()
            .filter(|((g, v, _), _)| g == group && v == version)
            .flat_map(|(_, d)| d.discovery_entry())
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    }

    /// Aggregated discovery (`APIGroupDiscoveryList`, apidiscovery.k8s.io/v2)
    /// for the core group (`core`) or all named groups.
    pub fn aggregated(&self, core: bool) -> Value {
        let groups: Vec<(String, Vec<String>)> = if core {
            vec![(String::new(), vec!["v1".to_string()])]
        } else {
            self.groups().into_iter().collect()
        };
        let items: Vec<Value> = groups
            .into_iter()
            .map(|(g, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| {
                        let resources: Vec<Value> = self
                            .defs
                            .iter()
                            .filter(|((dg, dv, _), _)| *dg == g && dv == v)
                            .map(|(_, d)| d.aggregated_entry())
                            .collect();
                        json!({"version": v, "resources": resources, "freshness": "Current"})
                    })
                    .collect();
                let metadata = if g.is_empty() {
                    json!({})
                } else {
                    json!({"name": g})
                };
                json!({"metadata": metadata, "versions": versions})
            })
            .collect();
        json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
    }

    /// Registers (or replaces) the kinds a CRD defines; returns the CRD's
    /// status to store.
    pub fn register_crd(&mut self, crd: &Value) -> ApiResult<Value> {
        let parsed = parse_crd(crd)?;
        self.unregister_crd(&parsed.group, &parsed.plural);
        let accepted = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
        let stored: Vec<String> = parsed
            .defs
            .iter()
            .filter(|(_, storage)| *storage)
            .map(|(d, _)| d.version.clone())
            .collect();
        for (d, _) in parsed.defs {
            self.insert(d);
        }
        Ok(json!({
            "acceptedNames": accepted,
            "storedVersions": stored,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": super::meta::now_rfc3339()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": super::meta::now_rfc3339()},
            ],
        }))
    }

    pub fn unregister_crd(&mut self, group: &str, plural: &str) {
        self.defs
            .retain(|(g, _, p), d| !(d.custom && g == group && p == plural));
    }
}

/// Kubernetes version ordering: GA > beta > alpha, then by numbers.
fn version_priority(v: &str) -> (u8, u32, u32) {
    let rest = v.strip_prefix('v').unwrap_or(v);
    let num_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let major: u32 = rest[..num_end].parse().unwrap_or(0);
    let tail = &rest[num_end..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (level, n) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        (0, tail)
    };
    (level, major, n.parse().unwrap_or(0))
}

struct ParsedCrd {
    group: String,
    plural: String,
    defs: Vec<(ResourceDef, bool)>,
}

fn parse_crd(crd: &Value) -> ApiResult<ParsedCrd> {
    let name = str_at(crd, "/metadata/name");
    let group = str_at(crd, "/spec/group").to_string();
    let plural = str_at(crd, "/spec/names/plural").to_string();
    let kind = str_at(crd, "/spec/names/kind").to_string();
    let invalid = |causes: Vec<FieldCause>| {
        ApiError::invalid(
            "CustomResourceDefinition",
            "apiextensions.k8s.io",
            name,
            causes,
        )
    };
    let mut causes = Vec::new();
    if group.is_empty() {
        causes.push(FieldCause::required("spec.group", ""));
    }
    if plural.is_empty() {
        causes.push(FieldCause::required("spec.names.plural", ""));
    }
    if kind.is_empty() {
        causes.push(FieldCause::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(FieldCause::invalid(
            "metadata.name",
            name,
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = str_at(crd, "/spec/scope");
    if scope != "Namespaced" && scope != "Cluster" {
        causes.push(FieldCause {
            field: "spec.scope".into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""
            ),
        });
    }
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(FieldCause::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    }
    if !causes.is_empty() {
        return Err(invalid(causes));
    }
    let singular = match str_at(crd, "/spec/names/singular") {
        "" => kind.to_lowercase(),
        s => s.to_string(),
    };
    let list_kind = match str_at(crd, "/spec/names/listKind") {
        "" => format!("{kind}List"),
        s => s.to_string(),
    };
    let short_names = meta::strings_at(crd, "/spec/names/shortNames");
    let categories = meta::strings_at(crd, "/spec/names/categories");
    let mut defs = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let version = str_at(v, "/name").to_string();
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            Some(s) => Some(CompiledSchema::compile(s).map_err(|e| {
                invalid(vec![FieldCause::invalid(
                    &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    "",
                    &e.to_string(),
                )])
            })?),
            None => None,
        };
        let printer_columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: str_at(c, "/name").into(),
                        type_: str_at(c, "/type").into(),
                        format: str_at(c, "/format").into(),
                        description: str_at(c, "/description").into(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        json_path: str_at(c, "/jsonPath").into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let storage = v.get("storage").and_then(Value::as_bool).unwrap_or(false);
        defs.push((
            ResourceDef {
                group: group.clone(),
                version,
                plural: plural.clone(),
                singular: singular.clone(),
                kind: kind.clone(),
                list_kind: list_kind.clone(),
                namespaced: scope == "Namespaced",
                short_names: short_names.clone(),
                categories: categories.clone(),
                has_status: v.pointer("/subresources/status").is_some(),
                custom: true,
                printer_columns,
                schema,
                raw_schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                field_selectors: &[],
            },
            storage,
        ));
    }
    Ok(ParsedCrd {
        group,
        plural,
        defs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        let mut v = vec!["v1alpha1", "v1", "v2beta1", "v1beta2"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(v, ["v1", "v2beta1", "v1beta2", "v1alpha1"]);
    }
}
