//! In-memory storage and the object life cycle: resourceVersions, the event
//! log behind watches, create/update/patch/delete semantics, finalizers,
//! namespaces and garbage collection.
//!
//! Everything lives behind one mutex (held only for short synchronous
//! sections), and watch events are broadcast while it is held, so a watcher
//! that subscribes under the lock sees exactly the events after its snapshot.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use base64::Engine;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::{ApiError, ApiResult, FieldCause};
use super::meta;
use super::patch;
use super::registry::{Registry, ResourceDef};
use super::selector::{FieldSelector, LabelSelector};

/// (group, resource): one store per resource whatever the version served.
pub type StoreKey = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the bounded history and sent to watchers.
#[derive(Debug)]
pub struct LogEntry {
    pub rv: u64,
    pub store: StoreKey,
    pub etype: EventType,
    pub object: Value,
    /// State before the change; lets filtered watches turn a MODIFIED that
    /// leaves (or enters) the selection into DELETED (or ADDED).
    pub prev: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum WatchMsg {
    Event(Arc<LogEntry>),
    /// History was compacted: every open watch ends with 410 Gone.
    Expire,
}

/// How unknown fields in custom resources are treated (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

/// Per-request write parameters.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    pub manager: String,
    pub dry_run: bool,
    pub field_validation: FieldValidation,
}

/// Result of a write.
#[derive(Debug)]
pub struct Written {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone)]
pub struct DeleteOpts {
    pub propagation: Option<Propagation>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

/// A list request's parameters.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub rv_match: Option<String>,
}

pub struct ListResult {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// What a new watch starts from.
pub struct WatchStart {
    pub initial: Vec<Value>,
    pub backlog: Vec<Arc<LogEntry>>,
    pub rx: broadcast::Receiver<WatchMsg>,
    pub start_rv: u64,
}

pub struct State {
    pub registry: Registry,
    objects: HashMap<StoreKey, BTreeMap<(String, String), Value>>,
    /// uid -> (store, namespace, name), for owner look-ups.
    uids: HashMap<String, (StoreKey, String, String)>,
    rv: u64,
    log: VecDeque<Arc<LogEntry>>,
    history: usize,
    /// Watches and exact lists from a resourceVersion below this get 410.
    compacted_rv: u64,
    /// One channel per store, so a busy resource cannot make watchers of
    /// another lag (and get 410) behind it.
    channels: HashMap<StoreKey, broadcast::Sender<WatchMsg>>,
    /// Channels of watches pinned to one object name (`metadata.name=`),
    /// per store and name. A per-node agent watches only its own object:
    /// with one channel per store, each write woke every agent's watch
    /// (5,000 wake-ups per NodeFill write at 5,000 nodes), as the real
    /// server's watch cache avoids by indexing such selectors.
    named: HashMap<(StoreKey, String), broadcast::Sender<WatchMsg>>,
}

/// Events a watcher may fall behind by before it is ended with 410.
const WATCH_BUFFER: usize = 8192;

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    meta::strings_at(obj, "/metadata/finalizers")
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Everything except metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    o
}

/// The object without fields that change on every write.
fn comparable(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    o
}

/// Paths present in `before` but pruned from `after` (unknown fields).
fn pruned_paths(before: &Value, after: &Value, prefix: &str, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match a.get(k) {
                    Some(av) => pruned_paths(bv, av, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(b), Value::Array(a)) => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                pruned_paths(bv, av, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

impl State {
    pub fn new(history: usize) -> Self {
        let mut s = Self {
            registry: Registry::with_builtins(),
            objects: HashMap::new(),
            uids: HashMap::new(),
            rv: 1,
            log: VecDeque::new(),
            history: history.max(1),
            compacted_rv: 0,
            channels: HashMap::new(),
            named: HashMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            if let Some(def) = s.registry.get("", "v1", "namespaces") {
                // Cannot fail: fixed valid names into an empty store.
                let _ = s.create(
                    &def,
                    None,
                    obj,
                    &WriteCtx {
                        manager: "kube-apiserver".into(),
                        dry_run: false,
                        field_validation: FieldValidation::Ignore,
                    },
                );
            }
        }
        s
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    fn subscribe(&mut self, key: &StoreKey, q: &ListQuery) -> broadcast::Receiver<WatchMsg> {
        let map_entry = match q.fields.pinned_name() {
            Some(name) => self.named.entry((key.clone(), name.to_string())),
            None => {
                return self
                    .channels
                    .entry(key.clone())
                    .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
                    .subscribe();
            }
        };
        map_entry
            .or_insert_with(|| broadcast::channel(WATCH_BUFFER).0)
            .subscribe()
    }

    /// Forgets all history and ends every open watch with 410 Gone, as when
    /// etcd compacts past a watcher's position.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted_rv = self.rv;
        for tx in self.channels.values().chain(self.named.values()) {
            let _ = tx.send(WatchMsg::Expire);
        }
    }

    fn record(&mut self, store: StoreKey, etype: EventType, object: Value, prev: Option<Value>) {
        let entry = Arc::new(LogEntry {
            rv: self.rv,
            store,
            etype,
            object,
            prev,
        });
        self.log.push_back(entry.clone());
        while self.log.len() > self.history {
            if let Some(old) = self.log.pop_front() {
                self.compacted_rv = self.compacted_rv.max(old.rv);
            }
        }
        let name = entry
            .object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(name) = name {
            let key = (entry.store.clone(), name);
            // A channel whose watches all ended is dropped here.
            if let Some(tx) = self.named.get(&key)
                && tx.send(WatchMsg::Event(entry.clone())).is_err()
            {
                self.named.remove(&key);
            }
        }
        // No receivers is fine.
        if let Some(tx) = self.channels.get(&entry.store) {
            let _ = tx.send(WatchMsg::Event(entry));
        }
    }

    /// Stores `obj` under a new resourceVersion and logs the event.
    fn commit(&mut self, store: &StoreKey, obj: Value, prev: Option<Value>) -> Value {
        self.rv += 1;
        let mut obj = obj;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let ns = meta_str(&obj, "namespace").to_string();
        let name = meta_str(&obj, "name").to_string();
        let uid = meta_str(&obj, "uid").to_string();
        self.uids
            .insert(uid, (store.clone(), ns.clone(), name.clone()));
        self.objects
            .entry(store.clone())
            .or_default()
            .insert((ns, name), obj.clone());
        let etype = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(store.clone(), etype, obj.clone(), prev);
        obj
    }

    /// Removes an object for good (DELETED event).
    fn remove(&mut self, store: &StoreKey, ns: &str, name: &str) -> Option<Value> {
        let prev = self
            .objects
            .get_mut(store)?
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        self.uids.remove(meta_str(&prev, "uid"));
        let mut gone = prev.clone();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(store.clone(), EventType::Deleted, gone.clone(), Some(prev));
        if store.0 == "apiextensions.k8s.io" && store.1 == "customresourcedefinitions" {
            self.drop_crd(&gone);
        }
        Some(gone)
    }

    fn drop_crd(&mut self, crd: &Value) {
        let group = meta::str_at(crd, "/spec/group").to_string();
        let plural = meta::str_at(crd, "/spec/names/plural").to_string();
        let key = (group.clone(), plural.clone());
        let names: Vec<(String, String)> = self
            .objects
            .get(&key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (ns, name) in names {
            self.remove(&key, &ns, &name);
        }
        self.registry.unregister_crd(&group, &plural);
    }

    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<Value> {
        self.objects
            .get(&def.store_key())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.plural, &def.group, name))
    }

    fn namespace_check(&self, def: &ResourceDef, ns: &str) -> ApiResult<()> {
        if !def.namespaced {
            return Ok(());
        }
        let key = (String::new(), "namespaces".to_string());
        match self
            .objects
            .get(&key)
            .and_then(|m| m.get(&(String::new(), ns.to_string())))
        {
            None => Err(ApiError::not_found("namespaces", "", ns)),
            Some(n) if is_deleting(n) => Err(ApiError::forbidden(
                &def.plural,
                &def.group,
                "",
                format!(
                    "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    ApiError::qualified(&def.plural, &def.group)
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Kind-specific defaulting the real server's strategies perform.
    fn prepare(&self, def: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
        match (def.group.as_str(), def.plural.as_str()) {
            ("", "namespaces") => {
                let name = meta_str(obj, "name").to_string();
                let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
                if let Value::Object(l) = labels {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
                if obj.get("spec").is_none() {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                if obj.pointer("/status/phase").is_none() {
                    obj["status"] = json!({"phase": "Active"});
                }
            }
            ("", "pods") if obj.pointer("/status/phase").is_none() => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            ("", "secrets") => {
                // stringData is write-only: merged into data, base64-encoded.
                if let Some(Value::Object(sd)) =
                    obj.as_object_mut().and_then(|m| m.remove("stringData"))
                {
                    let data = obj
                        .as_object_mut()
                        .map(|m| m.entry("data").or_insert_with(|| json!({})));
                    if let Some(Value::Object(d)) = data {
                        for (k, v) in sd {
                            let s = v.as_str().unwrap_or_default();
                            d.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(s)),
                            );
                        }
                    }
                }
                if obj.get("type").is_none() {
                    obj["type"] = json!("Opaque");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Schema admission for custom resources plus unknown-field handling.
    fn admit(
        &self,
        def: &ResourceDef,
        obj: &mut Value,
        old: Option<&Value>,
        ctx: &WriteCtx,
    ) -> ApiResult<Vec<String>> {
        let Some(schema) = &def.schema else {
            return Ok(Vec::new());
        };
        let before = obj.clone();
        let name = meta_str(obj, "name").to_string();
        schema.admit(obj, old).map_err(|errs| {
            ApiError::from_status(super::validation::invalid_status(
                &def.kind, &def.group, &name, &errs,
            ))
        })?;
        let mut pruned = Vec::new();
        if let (Value::Object(b), Value::Object(a)) = (&before, &*obj) {
            for (k, bv) in b {
                if k == "metadata" || k == "apiVersion" || k == "kind" {
                    continue;
                }
                match a.get(k) {
                    Some(av) => pruned_paths(bv, av, k, &mut pruned),
                    None => pruned.push(k.clone()),
                }
            }
        }
        if pruned.is_empty() {
            return Ok(Vec::new());
        }
        let unknown: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect();
        match ctx.field_validation {
            FieldValidation::Strict => Err(ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
                unknown.join(", "),
                kind = def.kind,
                v = def.version
            ))),
            FieldValidation::Warn => Ok(unknown),
            FieldValidation::Ignore => Ok(Vec::new()),
        }
    }

    fn check_meta(&self, def: &ResourceDef, obj: &Value, name: &str) -> ApiResult<()> {
        let mut causes = Vec::new();
        if let Some(c) = meta::validate_name(name, def.plural == "namespaces") {
            causes.push(c);
        }
        if let Some(m) = obj.get("metadata") {
            causes.extend(meta::validate_labels_annotations(m));
            causes.extend(meta::validate_finalizers_owners(m));
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(&def.kind, &def.group, name, causes))
        }
    }

    fn check_type(def: &ResourceDef, obj: &Value) -> ApiResult<()> {
        if !obj.is_object() || obj.get("metadata").is_some_and(|m| !m.is_object()) {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        if (!av.is_empty() && av != def.api_version()) || (!kind.is_empty() && kind != def.kind) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                def.api_version()
            )));
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        def: &ResourceDef,
        ns: Option<&str>,
        obj: Value,
        ctx: &WriteCtx,
    ) -> ApiResult<Written> {
        Self::check_type(def, &obj)?;
        let mut obj = def.to_stored(obj);
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        let ns = ns.unwrap_or("").to_string();
        {
            let m = meta_mut(&mut obj);
            if def.namespaced {
                match m.get("namespace").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() && n != ns => {
                        return Err(ApiError::bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ));
                    }
                    _ => {
                        m.insert("namespace".into(), json!(ns));
                    }
                }
            } else {
                m.remove("namespace");
            }
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if name.is_empty() {
                match m.get("generateName").and_then(Value::as_str) {
                    Some(g) if !g.is_empty() => {
                        let generated = format!("{g}{}", meta::random_suffix());
                        m.insert("name".into(), json!(generated));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            &def.kind,
                            &def.group,
                            "",
                            vec![FieldCause::required(
                                "metadata.name",
                                "name or generateName is required",
                            )],
                        ));
                    }
                }
            }
            for f in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                m.remove(f);
            }
            m.insert("uid".into(), json!(meta::new_uid()));
            m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
            m.remove("generation");
        }
        let name = meta_str(&obj, "name").to_string();
        self.check_meta(def, &obj, &name)?;
        self.namespace_check(def, &ns)?;
        if self
            .objects
            .get(&def.store_key())
            .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
        {
            return Err(ApiError::already_exists(&def.plural, &def.group, &name));
        }
        if def.tracks_generation() {
            meta_mut(&mut obj).insert("generation".into(), json!(1));
        }
        if def.custom && def.has_status {
            // Status is written only through /status.
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        self.prepare(def, &mut obj)?;
        let warnings = self.admit(def, &mut obj, None, ctx)?;
        let mut crd_status = None;
        if def.group == "apiextensions.k8s.io" && def.plural == "customresourcedefinitions" {
            let mut probe = Registry::default();
            crd_status = Some(probe.register_crd(&obj)?);
        }
        patch::record_update(
            None,
            &mut obj,
            &ctx.manager,
            &def.api_version(),
            "",
            &meta::now_rfc3339(),
        );
        if ctx.dry_run {
            return Ok(Written {
                object: obj,
                created: true,
                warnings,
            });
        }
        if let Some(status) = crd_status {
            self.registry.register_crd(&obj)?;
            obj["status"] = status;
        }
        let stored = self.commit(&def.store_key(), obj, None);
        Ok(Written {
            object: stored,
            created: true,
            warnings,
        })
    }

    /// PUT (main endpoint or `/status`).
    pub fn update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        status_only: bool,
        ctx: &WriteCtx,
    ) -> ApiResult<Written> {
        Self::check_type(def, &obj)?;
        let obj = def.to_stored(obj);
        let url_name = name;
        let body_name = meta_str(&obj, "name");
        if !body_name.is_empty() && body_name != url_name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
            )));
        }
        let old = match self.get(def, ns, name) {
            Ok(o) => o,
            Err(e) => {
                // PUT on a missing object creates it (allowCreateOnUpdate),
                // which the real server permits for a few kinds only.
                let creatable = matches!(
                    def.plural.as_str(),
                    "namespaces" | "nodes" | "leases" | "events" | "configmaps" | "secrets"
                );
                if creatable && !status_only {
                    let mut o = obj;
                    meta_mut(&mut o).insert("name".into(), json!(name));
                    return self.create(def, if def.namespaced { Some(ns) } else { None }, o, ctx);
                }
                return Err(e);
            }
        };
        let rv = meta_str(&obj, "resourceVersion");
        if rv.is_empty() && def.custom {
            // Custom resources do not allow unconditional updates.
            return Err(ApiError::invalid(
                &def.kind,
                &def.group,
                name,
                vec![FieldCause::invalid(
                    "metadata.resourceVersion",
                    "0x0",
                    "must be specified for an update",
                )],
            ));
        }
        if !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict_modified(&def.plural, &def.group, name));
        }
        self.write_over(def, ns, name, old, obj, status_only, ctx, None)
    }

    /// Applies the update rules to `new` replacing `old`, and commits.
    #[allow(clippy::too_many_arguments)]
    fn write_over(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        old: Value,
        new: Value,
        status_only: bool,
        ctx: &WriteCtx,
        managed_fields: Option<Value>,
    ) -> ApiResult<Written> {
        // A patch can turn the document into anything; objects only from here.
        if !new.is_object() || new.get("metadata").is_some_and(|m| !m.is_object()) {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object whose metadata is an object",
            ));
        }
        let mut obj = if status_only {
            // Only status changes through /status; metadata and spec stay.
            let mut o = old.clone();
            match new.get("status") {
                Some(s) => o["status"] = s.clone(),
                None => {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            o
        } else {
            let mut o = new;
            if def.has_status {
                match old.get("status") {
                    Some(s) => o["status"] = s.clone(),
                    None => {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            o
        };
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        {
            let om = old.get("metadata").cloned().unwrap_or(json!({}));
            let m = meta_mut(&mut obj);
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
                "generateName",
            ] {
                match om.get(f) {
                    Some(v) => {
                        m.insert(f.into(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
            m.insert(
                "managedFields".into(),
                om.get("managedFields").cloned().unwrap_or(json!([])),
            );
        }
        self.check_meta(def, &obj, name)?;
        if is_deleting(&old) {
            let before = finalizers(&old);
            if let Some(added) = finalizers(&obj).iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    &def.kind,
                    &def.group,
                    name,
                    vec![FieldCause::forbidden(
                        "metadata.finalizers",
                        &format!(
                            "no new finalizers can be added if the object is being deleted, found new finalizers []string{{\"{added}\"}}"
                        ),
                    )],
                ));
            }
        }
        self.prepare(def, &mut obj)?;
        let warnings = self.admit(def, &mut obj, Some(&old), ctx)?;
        if def.tracks_generation() && !status_only && spec_part(&obj) != spec_part(&old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut obj).insert("generation".into(), json!(g + 1));
        }
        let is_crd =
            def.group == "apiextensions.k8s.io" && def.plural == "customresourcedefinitions";
        let crd_status = if is_crd && !status_only {
            let mut probe = Registry::default();
            Some(probe.register_crd(&obj)?)
        } else {
            None
        };
        match managed_fields {
            Some(mf) => {
                meta_mut(&mut obj).insert("managedFields".into(), mf);
            }
            None => patch::record_update(
                Some(&old),
                &mut obj,
                &ctx.manager,
                &def.api_version(),
                if status_only { "status" } else { "" },
                &meta::now_rfc3339(),
            ),
        }
        if comparable(&obj) == comparable(&old) {
            // No-op writes keep the resourceVersion and send no event.
            return Ok(Written {
                object: old,
                created: false,
                warnings,
            });
        }
        if ctx.dry_run {
            return Ok(Written {
                object: obj,
                created: false,
                warnings,
            });
        }
        if let Some(status) = crd_status {
            self.registry.register_crd(&obj)?;
            obj["status"] = status;
        }
        let key = def.store_key();
        let stored = self.commit(&key, obj, Some(old));
        if is_deleting(&stored) && finalizers(&stored).is_empty() {
            // Last finalizer gone: the deletion completes now.
            let gone = self.remove(&key, ns, name).unwrap_or(stored);
            self.collect_garbage();
            return Ok(Written {
                object: gone,
                created: false,
                warnings,
            });
        }
        Ok(Written {
            object: stored,
            created: false,
            warnings,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &Value,
        status_only: bool,
        force: bool,
        ctx: &WriteCtx,
    ) -> ApiResult<Written> {
        if kind == PatchKind::Apply && !body.is_object() {
            return Err(ApiError::bad_request(
                "an apply configuration must be an object",
            ));
        }
        let old = match self.get(def, ns, name) {
            Ok(o) => o,
            Err(_) if kind == PatchKind::Apply && !status_only => {
                let mut obj = patch::server_side_apply(
                    &json!({"metadata": {}}),
                    body,
                    &ctx.manager,
                    force,
                    &def.api_version(),
                    "",
                    &meta::now_rfc3339(),
                    |m| ApiError::conflict(&def.plural, &def.group, name, m),
                )?;
                meta_mut(&mut obj).insert("name".into(), json!(name));
                let managed = obj.pointer("/metadata/managedFields").cloned();
                let mut w =
                    self.create(def, if def.namespaced { Some(ns) } else { None }, obj, ctx)?;
                // Keep the Apply ownership instead of create's Update entry.
                if let Some(mf) = managed
                    && !ctx.dry_run
                {
                    let mut o = w.object.clone();
                    meta_mut(&mut o).insert("managedFields".into(), mf);
                    let key = def.store_key();
                    if let Some(m) = self.objects.get_mut(&key) {
                        m.insert((ns.to_string(), name.to_string()), o.clone());
                    }
                    w.object = o;
                }
                return Ok(w);
            }
            Err(e) => return Err(e),
        };
        // Patches apply to the served form (core/v1 Events differ from storage).
        let mut new = def.to_served(old.clone());
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut new, body),
            PatchKind::Json => patch::json_patch(&mut new, body)?,
            PatchKind::Strategic => patch::strategic_merge(&mut new, body),
            PatchKind::Apply => {
                let av = body.get("apiVersion").and_then(Value::as_str).unwrap_or("");
                let k = body.get("kind").and_then(Value::as_str).unwrap_or("");
                if av.is_empty() || k.is_empty() {
                    return Err(ApiError::bad_request(
                        "apiVersion and kind must be set in an apply configuration",
                    ));
                }
                new = patch::server_side_apply(
                    &old,
                    body,
                    &ctx.manager,
                    force,
                    &def.api_version(),
                    if status_only { "status" } else { "" },
                    &meta::now_rfc3339(),
                    |m| ApiError::conflict(&def.plural, &def.group, name, m),
                )?;
            }
        }
        let new = def.to_stored(new);
        // A patch may carry a resourceVersion precondition.
        let rv = meta_str(&new, "resourceVersion");
        if !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::conflict_modified(&def.plural, &def.group, name));
        }
        // Apply carries its own managedFields (computed by server_side_apply).
        let apply_fields = if kind == PatchKind::Apply {
            new.pointer("/metadata/managedFields").cloned()
        } else {
            None
        };
        let w = self.write_over(def, ns, name, old, new, status_only, ctx, apply_fields)?;
        Ok(w)
    }

    /// DELETE of one object. Returns the object (still present, pending
    /// finalizers) or `None` when it is gone, with the last state.
    pub fn delete(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<(Value, bool)> {
        let obj = self.get(def, ns, name)?;
        if let Some(uid) = &opts.precondition_uid
            && uid != meta_str(&obj, "uid")
        {
            return Err(ApiError::conflict(
                &def.plural,
                &def.group,
                name,
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&obj, "uid")
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv != meta_str(&obj, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &def.plural,
                &def.group,
                name,
                format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&obj, "resourceVersion")
                ),
            ));
        }
        if opts.dry_run {
            return Ok((obj, false));
        }
        let key = def.store_key();
        let uid = meta_str(&obj, "uid").to_string();
        if opts.propagation == Some(Propagation::Orphan) {
            self.orphan_dependents(&uid);
        }
        let foreground = opts.propagation == Some(Propagation::Foreground);
        let res = self.delete_internal(&key, ns, name, foreground);
        self.collect_garbage();
        match res {
            Some((o, true)) => Ok((o, true)),
            Some((o, false)) => {
                // GC may have completed it (foreground with no dependents).
                let still = self
                    .objects
                    .get(&key)
                    .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
                    .cloned();
                match still {
                    Some(s) => Ok((s, false)),
                    None => Ok((o, true)),
                }
            }
            None => Err(ApiError::not_found(&def.plural, &def.group, name)),
        }
    }

    /// Marks for deletion (finalizers pending) or removes. Returns the
    /// resulting object and whether it is gone.
    fn delete_internal(
        &mut self,
        key: &StoreKey,
        ns: &str,
        name: &str,
        foreground: bool,
    ) -> Option<(Value, bool)> {
        let obj = self
            .objects
            .get(key)?
            .get(&(ns.to_string(), name.to_string()))?
            .clone();
        let is_namespace = key.0.is_empty() && key.1 == "namespaces";
        let mut fins = finalizers(&obj);
        if foreground && !fins.iter().any(|f| f == "foregroundDeletion") {
            fins.push("foregroundDeletion".into());
        }
        if fins.is_empty() && !is_namespace {
            return self.remove(key, ns, name).map(|o| (o, true));
        }
        if is_deleting(&obj) && fins == finalizers(&obj) {
            return Some((obj, false));
        }
        let mut upd = obj.clone();
        {
            let m = meta_mut(&mut upd);
            if !fins.is_empty() {
                m.insert("finalizers".into(), json!(fins));
            }
            if !m.contains_key("deletionTimestamp") {
                m.insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
                // As the real server's BeforeDelete: generation moves when
                // deletion starts, so generation-filtered controllers see it.
                if let Some(g) = m.get("generation").and_then(Value::as_i64)
                    && g > 0
                {
                    m.insert("generation".into(), json!(g + 1));
                }
            }
        }
        if is_namespace {
            upd["status"] = json!({"phase": "Terminating"});
        }
        Some((self.commit(key, upd, Some(obj)), false))
    }

    fn orphan_dependents(&mut self, owner_uid: &str) {
        let mut targets = Vec::new();
        for (key, m) in &self.objects {
            for ((ns, name), o) in m {
                if owner_uids(o).iter().any(|u| u == owner_uid) {
                    targets.push((key.clone(), ns.clone(), name.clone(), o.clone()));
                }
            }
        }
        for (key, _ns, _name, o) in targets {
            let mut upd = o.clone();
            if let Some(Value::Array(refs)) = upd.pointer_mut("/metadata/ownerReferences") {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            }
            if let Some(Value::Array(refs)) = upd.pointer("/metadata/ownerReferences")
                && refs.is_empty()
            {
                meta_mut(&mut upd).remove("ownerReferences");
            }
            self.commit(&key, upd, Some(o));
        }
    }

    /// Garbage collection to a fixpoint: dependents whose owners are all
    /// gone are deleted (background), foreground deletions finish when their
    /// dependents are gone, and terminating namespaces are emptied.
    pub fn collect_garbage(&mut self) {
        for _ in 0..1000 {
            let mut actions: Vec<(StoreKey, String, String, GcAction)> = Vec::new();
            let mut deleting_owner_with_deps: HashMap<String, bool> = HashMap::new();
            for m in self.objects.values() {
                for o in m.values() {
                    for u in owner_uids(o) {
                        deleting_owner_with_deps.insert(u, true);
                    }
                }
            }
            let terminating_ns: Vec<String> = self
                .objects
                .get(&(String::new(), "namespaces".to_string()))
                .map(|m| {
                    m.values()
                        .filter(|n| is_deleting(n))
                        .map(|n| meta_str(n, "name").to_string())
                        .collect()
                })
                .unwrap_or_default();
            let mut ns_has_content: HashMap<String, bool> = HashMap::new();
            for (key, m) in &self.objects {
                for ((ns, name), o) in m {
                    if !ns.is_empty() && terminating_ns.contains(ns) {
                        ns_has_content.insert(ns.clone(), true);
                        if !is_deleting(o) {
                            actions.push((key.clone(), ns.clone(), name.clone(), GcAction::Delete));
                        }
                    }
                    let owners = owner_uids(o);
                    if !owners.is_empty() && !is_deleting(o) {
                        let alive = owners.iter().filter(|u| self.uids.contains_key(*u)).count();
                        let owner_fg = owners.iter().any(|u| {
                            self.uids
                                .get(u)
                                .and_then(|(k, n, nm)| {
                                    self.objects
                                        .get(k)
                                        .and_then(|mm| mm.get(&(n.clone(), nm.clone())))
                                })
                                .is_some_and(|ow| {
                                    is_deleting(ow)
                                        && finalizers(ow).iter().any(|f| f == "foregroundDeletion")
                                })
                        });
                        if alive == 0 || owner_fg {
                            actions.push((key.clone(), ns.clone(), name.clone(), GcAction::Delete));
                        }
                    }
                    if is_deleting(o)
                        && finalizers(o).iter().any(|f| f == "foregroundDeletion")
                        && !deleting_owner_with_deps.contains_key(meta_str(o, "uid"))
                    {
                        actions.push((
                            key.clone(),
                            ns.clone(),
                            name.clone(),
                            GcAction::FinishForeground,
                        ));
                    }
                    if key.0.is_empty() && key.1 == "namespaces" && is_deleting(o) {
                        let nsname = meta_str(o, "name").to_string();
                        actions.push((
                            key.clone(),
                            ns.clone(),
                            name.clone(),
                            GcAction::FinishNamespace(nsname),
                        ));
                    }
                }
            }
            actions.retain(|(_, _, _, a)| match a {
                GcAction::FinishNamespace(n) => !ns_has_content.contains_key(n),
                _ => true,
            });
            if actions.is_empty() {
                return;
            }
            for (key, ns, name, action) in actions {
                match action {
                    GcAction::Delete => {
                        self.delete_internal(&key, &ns, &name, false);
                    }
                    GcAction::FinishNamespace(_) => {
                        self.remove(&key, &ns, &name);
                    }
                    GcAction::FinishForeground => {
                        let Some(o) = self
                            .objects
                            .get(&key)
                            .and_then(|m| m.get(&(ns.clone(), name.clone())))
                            .cloned()
                        else {
                            continue;
                        };
                        let fins: Vec<String> = finalizers(&o)
                            .into_iter()
                            .filter(|f| f != "foregroundDeletion")
                            .collect();
                        if fins.is_empty() {
                            self.remove(&key, &ns, &name);
                        } else {
                            let mut upd = o.clone();
                            meta_mut(&mut upd).insert("finalizers".into(), json!(fins));
                            self.commit(&key, upd, Some(o));
                        }
                    }
                }
            }
        }
        tracing::warn!("garbage collection did not settle after 1000 passes");
    }

    fn rv_param(&self, rv: &str) -> ApiResult<u64> {
        rv.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))
    }

    pub fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        q: &ListQuery,
    ) -> ApiResult<ListResult> {
        if let Some(rv) = q
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty() && *r != "0")
        {
            let n = self.rv_param(rv)?;
            if n > self.rv {
                return Err(ApiError::too_large_rv(n));
            }
            if q.rv_match.as_deref() == Some("Exact") && n < self.compacted_rv {
                return Err(ApiError::gone(format!(
                    "too old resource version: {n} ({})",
                    self.compacted_rv
                )));
            }
        }
        let start_after: Option<(String, String)> = match &q.continue_token {
            Some(t) if !t.is_empty() => {
                let raw = hex::decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                let mut parts = raw.splitn(3, '\n');
                let _rv = parts.next();
                match (parts.next(), parts.next()) {
                    (Some(n), Some(m)) => Some((n.to_string(), m.to_string())),
                    _ => return Err(ApiError::bad_request("continue key is not valid")),
                }
            }
            _ => None,
        };
        let mut items = Vec::new();
        let mut remaining = 0usize;
        let mut last_key = None;
        if let Some(m) = self.objects.get(&def.store_key()) {
            for ((ons, oname), o) in m {
                if let Some(n) = ns
                    && n != ons
                {
                    continue;
                }
                if let Some(s) = &start_after
                    && (ons.clone(), oname.clone()) <= *s
                {
                    continue;
                }
                // A list pinned to one name (every per-node agent's watch
                // relists so, all at once when their watches time out)
                // skips the others before converting or matching them.
                if q.fields.pinned_name().is_some_and(|n| n != oname) {
                    continue;
                }
                let view;
                let seen = if def.converts() {
                    view = def.to_served(o.clone());
                    &view
                } else {
                    o
                };
                if !q.labels.matches(seen) || !q.fields.matches(seen) {
                    continue;
                }
                if q.limit.is_some_and(|l| l > 0 && items.len() >= l) {
                    remaining += 1;
                    continue;
                }
                last_key = Some((ons.clone(), oname.clone()));
                let mut o = o.clone();
                o["apiVersion"] = json!(def.api_version());
                items.push(o);
            }
        }
        let continue_token = if remaining > 0 {
            last_key.map(|(n, m)| hex::encode(format!("{}\n{n}\n{m}", self.rv)))
        } else {
            None
        };
        Ok(ListResult {
            items,
            resource_version: self.rv,
            continue_token,
            remaining: (remaining > 0).then_some(remaining),
        })
    }

    /// Starts a watch: the snapshot or backlog to send first, and a receiver
    /// subscribed under the lock so no event is missed or duplicated.
    pub fn watch(
        &mut self,
        def: &ResourceDef,
        ns: Option<&str>,
        q: &ListQuery,
        send_initial_events: bool,
    ) -> ApiResult<WatchStart> {
        let rv = q.resource_version.as_deref().unwrap_or("");
        let key = def.store_key();
        if rv.is_empty() || rv == "0" || send_initial_events {
            let list = self.list(
                def,
                ns,
                &ListQuery {
                    limit: None,
                    continue_token: None,
                    resource_version: None,
                    ..q.clone()
                },
            )?;
            return Ok(WatchStart {
                initial: list.items,
                backlog: Vec::new(),
                rx: self.subscribe(&key, q),
                start_rv: self.rv,
            });
        }
        let n = self.rv_param(rv)?;
        if n < self.compacted_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {n} ({})",
                self.compacted_rv
            )));
        }
        if n > self.rv {
            return Err(ApiError::too_large_rv(n));
        }
        // A watch pinned to one name takes only that object's events: the
        // agents' watches all resume together when they time out, and each
        // would otherwise translate every other node's events.
        let pinned = q.fields.pinned_name();
        let backlog = self
            .log
            .iter()
            .filter(|e| e.rv > n && e.store == key)
            .filter(|e| {
                pinned.is_none_or(|name| {
                    e.object.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
                })
            })
            .cloned()
            .collect();
        Ok(WatchStart {
            initial: Vec::new(),
            backlog,
            rx: self.subscribe(&key, q),
            start_rv: n,
        })
    }
}

enum GcAction {
    Delete,
    FinishForeground,
    FinishNamespace(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> WriteCtx {
        WriteCtx {
            manager: "test".into(),
            dry_run: false,
            field_validation: FieldValidation::Strict,
        }
    }

    #[test]
    fn conflict_on_stale_rv_and_noop_keeps_rv() -> Result<(), ApiError> {
        let mut s = State::new(100);
        let def = s
            .registry
            .get("", "v1", "configmaps")
            .ok_or_else(|| ApiError::internal("no def"))?;
        let w = s.create(
            &def,
            Some("default"),
            json!({"metadata": {"name": "c"}, "data": {"a": "1"}}),
            &ctx(),
        )?;
        let rv1 = meta_str(&w.object, "resourceVersion").to_string();
        let same = s.update(&def, "default", "c", w.object.clone(), false, &ctx())?;
        assert_eq!(meta_str(&same.object, "resourceVersion"), rv1);
        let mut changed = w.object.clone();
        changed["data"]["a"] = json!("2");
        let w2 = s.update(&def, "default", "c", changed.clone(), false, &ctx())?;
        assert_ne!(meta_str(&w2.object, "resourceVersion"), rv1);
        let err = s.update(&def, "default", "c", changed, false, &ctx());
        assert!(err.is_err_and(|e| e.code == 409 && e.message.contains("has been modified")));
        Ok(())
    }

    #[test]
    fn non_object_patches_are_refused() -> Result<(), ApiError> {
        let mut s = State::new(100);
        let def = s
            .registry
            .get("", "v1", "configmaps")
            .ok_or_else(|| ApiError::internal("no def"))?;
        s.create(
            &def,
            Some("default"),
            json!({"metadata": {"name": "c"}}),
            &ctx(),
        )?;
        for (kind, body) in [
            (PatchKind::Merge, json!("scalar")),
            (PatchKind::Merge, json!({"metadata": 5})),
            (
                PatchKind::Json,
                json!([{"op": "replace", "path": "", "value": 1}]),
            ),
            (PatchKind::Apply, json!([1])),
            (PatchKind::Strategic, json!(null)),
        ] {
            let r = s.patch(&def, "default", "c", kind, &body, false, false, &ctx());
            assert!(
                r.is_err_and(|e| e.code == 400 || e.code == 500),
                "{kind:?} {body}"
            );
        }
        for (kind, body) in [(PatchKind::Apply, json!("x")), (PatchKind::Merge, json!(1))] {
            let r = s.patch(&def, "default", "new", kind, &body, false, false, &ctx());
            assert!(r.is_err(), "{kind:?} {body}");
        }
        Ok(())
    }

    #[test]
    fn gc_and_namespace_termination() -> Result<(), ApiError> {
        let mut s = State::new(100);
        let cm = s
            .registry
            .get("", "v1", "configmaps")
            .ok_or_else(|| ApiError::internal("no def"))?;
        let nsd = s
            .registry
            .get("", "v1", "namespaces")
            .ok_or_else(|| ApiError::internal("no def"))?;
        s.create(&nsd, None, json!({"metadata": {"name": "x"}}), &ctx())?;
        let owner = s.create(
            &cm,
            Some("x"),
            json!({"metadata": {"name": "owner"}}),
            &ctx(),
        )?;
        let uid = meta_str(&owner.object, "uid").to_string();
        s.create(&cm, Some("x"), json!({"metadata": {"name": "dep", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}), &ctx())?;
        let opts = DeleteOpts {
            propagation: None,
            precondition_uid: None,
            precondition_rv: None,
            dry_run: false,
        };
        s.delete(&cm, "x", "owner", &opts)?;
        assert!(s.get(&cm, "x", "dep").is_err());
        s.create(
            &cm,
            Some("x"),
            json!({"metadata": {"name": "f", "finalizers": ["a/b"]}}),
            &ctx(),
        )?;
        let (ns_obj, gone) = s.delete(&nsd, "", "x", &opts)?;
        assert!(!gone);
        assert_eq!(ns_obj["status"]["phase"], json!("Terminating"));
        let f = s.get(&cm, "x", "f")?;
        assert!(is_deleting(&f));
        let mut f2 = f.clone();
        f2["metadata"]["finalizers"] = json!([]);
        s.update(&cm, "x", "f", f2, false, &ctx())?;
        assert!(s.get(&nsd, "", "x").is_err());
        Ok(())
    }
}
