//! HTTP front end: routing, discovery and OpenAPI documents, content
//! negotiation (JSON / Table), request bodies, watch streams and metrics.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::Inner;
use super::error::{ApiError, ApiResult};
use super::meta;
use super::registry::ResourceDef;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    DeleteOpts, EventType, FieldValidation, ListQuery, LogEntry, PatchKind, Propagation, WatchMsg,
    WriteCtx,
};
use super::table;

pub type Body = BoxBody<Bytes, Infallible>;

/// The real server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Metrics key: verb (`get`, `list`, `watch`, `create`, `update`, `patch`,
/// `delete`, `deletecollection`), group, resource, subresource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn json_response(code: u16, v: &Value, warnings: &[String]) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut b = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header("Cache-Control", "no-cache, private");
    for w in warnings {
        b = b.header("Warning", format!("299 - {w:?}"));
    }
    b.body(full(body))
        .unwrap_or_else(|_| Response::new(full("")))
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status(), &[])
}

/// Parsed query string (last value wins).
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("1" | "true" | "True"))
    }
}

pub async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match route(&inner, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    Ok(resp)
}

fn discovery_version(inner: &Inner) -> Value {
    let _ = inner;
    json!({
        "major": "1",
        "minor": "32",
        "emulationMajor": "1",
        "emulationMinor": "32",
        "gitVersion": "v1.32.0-peerfill",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn gv_hash(v: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("{:016X}", h.finish())
}

/// OpenAPI v3 document for one group/version: enough for kubectl to see
/// that PATCH supports `fieldValidation` (so it leaves validation to us)
/// and, for custom resources, the structural schema.
fn openapi_v3_gv(inner: &Inner, group: &str, version: &str) -> Option<Value> {
    let state = inner.state.lock().ok()?;
    if !state.registry.has_group_version(group, version) {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let params = json!([
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}},
    ]);
    for d in state
        .registry
        .all()
        .filter(|d| d.group == group && d.version == version)
    {
        let gvk = json!({"group": group, "version": version, "kind": d.kind});
        let schema_name = format!(
            "{}.{}.{}",
            if group.is_empty() {
                "io.k8s.api.core"
            } else {
                group
            },
            version,
            d.kind
        );
        let item = if d.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", d.plural)
        } else {
            format!("{prefix}/{}/{{name}}", d.plural)
        };
        let op = |id: &str| {
            json!({
                "operationId": format!("{id}{}", d.kind),
                "parameters": params,
                "x-kubernetes-action": id,
                "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": {"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}}},
            })
        };
        paths.insert(item, json!({"get": op("read"), "put": op("replace"), "patch": op("patch"), "delete": op("delete")}));
        if let Some(raw) = &d.raw_schema {
            let mut s = raw.clone();
            s["x-kubernetes-group-version-kind"] = json!([gvk]);
            schemas.insert(schema_name, s);
        } else {
            schemas.insert(
                schema_name,
                json!({"type": "object", "x-kubernetes-group-version-kind": [gvk], "x-kubernetes-preserve-unknown-fields": true}),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

fn openapi_v3_root(inner: &Inner) -> ApiResult<Value> {
    let gvs: Vec<(String, String)> = {
        let state = inner
            .state
            .lock()
            .map_err(|_| ApiError::internal("state poisoned"))?;
        let mut gvs: Vec<(String, String)> = state
            .registry
            .all()
            .map(|d| (d.group.clone(), d.version.clone()))
            .collect();
        gvs.dedup();
        gvs
    };
    let mut paths = serde_json::Map::new();
    for (g, v) in gvs {
        let key = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        if paths.contains_key(&key) {
            continue;
        }
        let doc = openapi_v3_gv(inner, &g, &v).unwrap_or(Value::Null);
        paths.insert(
            key.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={}", gv_hash(&doc))}),
        );
    }
    Ok(json!({"paths": paths}))
}

fn discovery(inner: &Inner, segs: &[&str]) -> ApiResult<Option<Value>> {
    let state = inner
        .state
        .lock()
        .map_err(|_| ApiError::internal("state poisoned"))?;
    Ok(match segs {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{}", inner.port)}],
        })),
        ["api", "v1"] => Some(state.registry.resource_list("", "v1")),
        ["apis"] => {
            let groups: Vec<Value> = state
                .registry
                .groups()
                .into_iter()
                .map(|(g, vs)| group_doc(&g, &vs))
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", g] => state.registry.groups().get(*g).map(|vs| {
            let mut d = group_doc(g, vs);
            d["kind"] = json!("APIGroup");
            d["apiVersion"] = json!("v1");
            d
        }),
        ["apis", g, v] if state.registry.has_group_version(g, v) => {
            Some(state.registry.resource_list(g, v))
        }
        _ => None,
    })
}

fn group_doc(g: &str, vs: &[String]) -> Value {
    let versions: Vec<Value> = vs
        .iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "name": g,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

/// Where a resource request points.
struct Target {
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resolve(inner: &Inner, segs: &[&str]) -> ApiResult<Option<Target>> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let state = inner
        .state
        .lock()
        .map_err(|_| ApiError::internal("state poisoned"))?;
    let lookup = |r: &str| state.registry.get(group, version, r);
    // namespaces/{ns}/{resource}/... when {resource} is namespaced here.
    if rest[0] == "namespaces"
        && rest.len() >= 3
        && let Some(def) = lookup(rest[2]).filter(|d| d.namespaced)
    {
        return Ok(Some(Target {
            def,
            namespace: Some(rest[1].to_string()),
            name: rest.get(3).map(|s| s.to_string()),
            subresource: rest.get(4).map(|s| s.to_string()),
        }))
        .and_then(|t| check_depth(t, rest.len() <= 5));
    }
    let Some(def) = lookup(rest[0]) else {
        return Ok(None);
    };
    Ok(Some(Target {
        def,
        namespace: None,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    }))
    .and_then(|t| check_depth(t, rest.len() <= 3))
}

fn check_depth(t: Option<Target>, ok: bool) -> ApiResult<Option<Target>> {
    if ok { Ok(t) } else { Ok(None) }
}

fn not_found_generic() -> ApiError {
    let mut e = ApiError::bad_request("the server could not find the requested resource");
    e.code = 404;
    e.reason = "NotFound";
    e
}

async fn read_body(req: Request<Incoming>) -> ApiResult<(Bytes, String)> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            let mut err = ApiError::bad_request(format!("error reading request body: {e}"));
            if e.to_string().contains("length limit") {
                err.code = 413;
                err.reason = "RequestEntityTooLarge";
            }
            err
        })?
        .to_bytes();
    Ok((body, ct))
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))
    })
}

/// Create/update bodies: JSON, YAML, or protobuf for the few built-in kinds
/// kubectl's typed `create <generator>` commands send that way.
fn parse_object_body(body: &[u8], content_type: &str) -> ApiResult<Value> {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    match mime {
        "" | "application/json" | "*/*" => parse_json(body),
        "application/yaml" => parse_yaml_or_json(body),
        "application/vnd.kubernetes.protobuf" => super::protobuf::decode_object(body),
        _ => {
            let mut e = ApiError::bad_request(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml; got {mime:?}"
            ));
            e.code = 415;
            e.reason = "UnsupportedMediaType";
            Err(e)
        }
    }
}

fn parse_yaml_or_json(body: &[u8]) -> ApiResult<Value> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let s = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
    serde_saphyr::from_str::<Value>(s)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

fn user_agent_manager(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .chars()
        .take(128)
        .collect()
}

fn write_ctx(q: &Query, req: &Request<Incoming>) -> ApiResult<WriteCtx> {
    let fv = match q.get("fieldValidation") {
        None | Some("") | Some("Ignore") => FieldValidation::Ignore,
        Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    // The real server defaults to Warn when the client sends nothing.
    let fv = if q.get("fieldValidation").is_none() {
        FieldValidation::Warn
    } else {
        fv
    };
    Ok(WriteCtx {
        manager: q
            .get("fieldManager")
            .map(String::from)
            .unwrap_or_else(|| user_agent_manager(req)),
        dry_run: q.get("dryRun") == Some("All"),
        field_validation: fv,
    })
}

const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn wants_aggregated(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',').any(|m| {
                let m: String = m.chars().filter(|c| !c.is_whitespace()).collect();
                m.contains("g=apidiscovery.k8s.io")
                    && m.contains("v=v2;")
                    && m.contains("as=APIGroupDiscoveryList")
            })
        })
}

fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn list_query(q: &Query, def: &ResourceDef) -> ApiResult<ListQuery> {
    Ok(ListQuery {
        labels: LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?,
        fields: FieldSelector::parse(q.get("fieldSelector").unwrap_or(""), def.field_selectors)?,
        limit: q.get("limit").and_then(|l| l.parse().ok()),
        continue_token: q.get("continue").map(String::from),
        resource_version: q.get("resourceVersion").map(String::from),
        rv_match: q.get("resourceVersionMatch").map(String::from),
    })
}

fn served(def: &ResourceDef, o: Value) -> Value {
    def.to_served(o)
}

async fn route(inner: &Arc<Inner>, req: Request<Incoming>) -> ApiResult<Response<Body>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    match segs.as_slice() {
        ["version"] => return Ok(json_response(200, &discovery_version(inner), &[])),
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full("ok"))
                .unwrap_or_else(|_| Response::new(full("ok"))));
        }
        ["metrics"] => {
            let text = inner.metrics_text();
            return Ok(Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(text))
                .unwrap_or_else(|_| Response::new(full(""))));
        }
        ["openapi", "v2"] => {
            // An empty protobuf message is a valid, empty OpenAPI v2
            // document: kubectl then finds no client-side schema and relies
            // on server-side field validation.
            return Ok(Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
                )
                .body(full(Bytes::new()))
                .unwrap_or_else(|_| Response::new(full(""))));
        }
        ["openapi", "v3"] => return Ok(json_response(200, &openapi_v3_root(inner)?, &[])),
        ["openapi", "v3", "api", v] => {
            return openapi_v3_gv(inner, "", v)
                .map(|d| json_response(200, &d, &[]))
                .ok_or_else(not_found_generic);
        }
        ["openapi", "v3", "apis", g, v] => {
            return openapi_v3_gv(inner, g, v)
                .map(|d| json_response(200, &d, &[]))
                .ok_or_else(not_found_generic);
        }
        _ => {}
    }
    // Aggregated discovery when the client asks for it (kubectl does).
    if method == Method::GET
        && matches!(segs.as_slice(), ["api"] | ["apis"])
        && wants_aggregated(&req)
    {
        let doc = inner.lock()?.registry.aggregated(segs == ["api"]);
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, AGGREGATED_V2)
            .header("Vary", "Accept")
            .body(full(body))
            .unwrap_or_else(|_| Response::new(full(""))));
    }
    if method == Method::GET
        && let Some(doc) = discovery(inner, &segs)?
    {
        return Ok(json_response(200, &doc, &[]));
    }
    let Some(t) = resolve(inner, &segs)? else {
        return Err(not_found_generic());
    };
    let q = Query::parse(req.uri().query());
    let status_only = match t.subresource.as_deref() {
        None => false,
        Some("status") if t.def.has_status => true,
        Some(_) => return Err(not_found_generic()),
    };
    let def = t.def.clone();
    let ns = t.namespace.clone().unwrap_or_default();
    let verb = match (&method, &t.name) {
        (&Method::GET, None) if q.flag("watch") => "watch",
        (&Method::GET, Some(_)) if q.flag("watch") => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    if status_only && !matches!(verb, "get" | "update" | "patch") {
        return Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        ));
    }
    if def.namespaced && t.namespace.is_none() && !matches!(verb, "list" | "watch") {
        return Err(not_found_generic());
    }
    inner.count(RequestKey {
        verb: verb.to_string(),
        group: def.group.clone(),
        resource: def.plural.clone(),
        subresource: t.subresource.clone().unwrap_or_default(),
    });
    let ns_opt = t.namespace.as_deref();
    let table = wants_table(&req);
    let include = q.get("includeObject").unwrap_or("Metadata").to_string();
    match verb {
        "get" => {
            let name = t.name.as_deref().unwrap_or("");
            let obj = inner.lock()?.get(&def, &ns, name)?;
            let obj = served(&def, obj);
            if table {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(String::from);
                return Ok(json_response(
                    200,
                    &table::to_table(&def, &[obj], rv, &include),
                    &[],
                ));
            }
            Ok(json_response(200, &obj, &[]))
        }
        "list" => {
            let lq = list_query(&q, &def)?;
            let mut res = inner.lock()?.list(&def, ns_opt, &lq)?;
            res.items = res.items.into_iter().map(|o| served(&def, o)).collect();
            if table {
                let mut t = table::to_table(
                    &def,
                    &res.items,
                    Some(res.resource_version.to_string()),
                    &include,
                );
                if let Some(c) = &res.continue_token {
                    t["metadata"]["continue"] = json!(c);
                }
                return Ok(json_response(200, &t, &[]));
            }
            let mut meta = json!({"resourceVersion": res.resource_version.to_string()});
            if let Some(c) = res.continue_token {
                meta["continue"] = json!(c);
            }
            if let Some(r) = res.remaining {
                meta["remainingItemCount"] = json!(r);
            }
            Ok(json_response(
                200,
                &json!({"kind": def.list_kind, "apiVersion": def.api_version(), "metadata": meta, "items": res.items}),
                &[],
            ))
        }
        "watch" => {
            let mut lq = list_query(&q, &def)?;
            if let Some(n) = &t.name {
                lq.fields.push_name(n);
            }
            let table_include = table.then(|| include.clone());
            Ok(watch(
                inner.clone(),
                def,
                t.namespace.clone(),
                lq,
                &q,
                table_include,
            ))
        }
        "create" => {
            let ctx = write_ctx(&q, &req)?;
            let (body, ct) = read_body(req).await?;
            let obj = parse_object_body(&body, &ct)?;
            let w = inner.lock()?.create(&def, ns_opt, obj, &ctx)?;
            Ok(json_response(201, &served(&def, w.object), &w.warnings))
        }
        "update" => {
            let ctx = write_ctx(&q, &req)?;
            let name = t.name.clone().unwrap_or_default();
            let (body, _) = read_body(req).await?;
            let obj = parse_json(&body)?;
            let w = inner
                .lock()?
                .update(&def, &ns, &name, obj, status_only, &ctx)?;
            Ok(json_response(
                if w.created { 201 } else { 200 },
                &served(&def, w.object),
                &w.warnings,
            ))
        }
        "patch" => {
            let mut ctx = write_ctx(&q, &req)?;
            let name = t.name.clone().unwrap_or_default();
            let force = q.flag("force");
            let (body, ct) = read_body(req).await?;
            let mime = ct.split(';').next().unwrap_or("").trim().to_string();
            let (kind, patch) = match mime.as_str() {
                "application/merge-patch+json" => (PatchKind::Merge, parse_json(&body)?),
                "application/json-patch+json" => (PatchKind::Json, parse_json(&body)?),
                "application/strategic-merge-patch+json" => {
                    if def.custom {
                        return Err(ApiError::unsupported_media_type(&ct));
                    }
                    (PatchKind::Strategic, parse_json(&body)?)
                }
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    if q.get("fieldManager").is_none_or(str::is_empty) {
                        return Err(ApiError::invalid(
                            "PatchOptions",
                            "meta.k8s.io",
                            "",
                            vec![super::error::FieldCause::required(
                                "fieldManager",
                                "is required for apply patch",
                            )],
                        ));
                    }
                    (PatchKind::Apply, parse_yaml_or_json(&body)?)
                }
                _ => return Err(ApiError::unsupported_media_type(&ct)),
            };
            if kind != PatchKind::Apply
                && q.get("fieldManager").is_none()
                && ctx.manager == "kubectl"
            {
                ctx.manager = "kubectl-patch".into();
            }
            let w =
                inner
                    .lock()?
                    .patch(&def, &ns, &name, kind, &patch, status_only, force, &ctx)?;
            Ok(json_response(
                if w.created { 201 } else { 200 },
                &served(&def, w.object),
                &w.warnings,
            ))
        }
        "delete" => {
            let name = t.name.clone().unwrap_or_default();
            let opts = delete_opts(&q, req).await?;
            let (obj, gone) = inner.lock()?.delete(&def, &ns, &name, &opts)?;
            if gone && def.plural != "pods" {
                let uid = obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
                let mut details = json!({"name": name, "kind": def.plural, "uid": uid});
                if !def.group.is_empty() {
                    details["group"] = json!(def.group);
                }
                return Ok(json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                    &[],
                ));
            }
            Ok(json_response(200, &served(&def, obj), &[]))
        }
        "deletecollection" => {
            let lq = list_query(&q, &def)?;
            let opts = delete_opts(&q, req).await?;
            let mut state = inner.lock()?;
            let items = state.list(&def, ns_opt, &lq)?.items;
            let mut out = Vec::new();
            for o in items {
                let n = meta::str_at(&o, "/metadata/name").to_string();
                let ons = meta::str_at(&o, "/metadata/namespace").to_string();
                if let Ok((obj, _)) = state.delete(&def, &ons, &n, &opts) {
                    out.push(served(&def, obj));
                }
            }
            Ok(json_response(
                200,
                &json!({"kind": def.list_kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": state.current_rv().to_string()}, "items": out}),
                &[],
            ))
        }
        _ => Err(not_found_generic()),
    }
}

async fn delete_opts(q: &Query, req: Request<Incoming>) -> ApiResult<DeleteOpts> {
    let (body, _) = read_body(req).await?;
    let b = parse_json(&body)?;
    let policy = b
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or_else(|| q.get("propagationPolicy"))
        .map(|p| match p {
            "Foreground" => Ok(Propagation::Foreground),
            "Background" => Ok(Propagation::Background),
            "Orphan" => Ok(Propagation::Orphan),
            other => Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {other:?}"
            ))),
        })
        .transpose()?;
    let orphan = b.get("orphanDependents").and_then(Value::as_bool) == Some(true)
        || q.flag("orphanDependents");
    let dry_run = b
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == "All"))
        || q.get("dryRun") == Some("All");
    Ok(DeleteOpts {
        propagation: if orphan {
            Some(Propagation::Orphan)
        } else {
            policy
        },
        precondition_uid: b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(String::from),
        precondition_rv: b
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from),
        dry_run,
    })
}

/// Counts a watch as open for as long as its task lives.
struct WatchGuard(Arc<Inner>);

impl WatchGuard {
    fn new(inner: Arc<Inner>) -> Self {
        inner.active_watches.fetch_add(1, Ordering::Relaxed);
        Self(inner)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.active_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Turns a logged change into what a filtered watch should see.
fn translate(
    def: &ResourceDef,
    entry: &LogEntry,
    ns: Option<&str>,
    q: &ListQuery,
) -> Option<(EventType, Value)> {
    let matches = |o: &Value| {
        let view;
        let o = if def.converts() {
            view = def.to_served(o.clone());
            &view
        } else {
            o
        };
        ns.is_none_or(|n| o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(n))
            && q.labels.matches(o)
            && q.fields.matches(o)
    };
    let now = matches(&entry.object);
    let before = entry.prev.as_ref().is_some_and(matches);
    match entry.etype {
        EventType::Added => now.then(|| (EventType::Added, entry.object.clone())),
        EventType::Deleted => before.then(|| (EventType::Deleted, entry.object.clone())),
        EventType::Modified => match (before, now) {
            (true, true) => Some((EventType::Modified, entry.object.clone())),
            (false, true) => Some((EventType::Added, entry.object.clone())),
            (true, false) => Some((EventType::Deleted, entry.object.clone())),
            (false, false) => None,
        },
    }
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": etype, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn watch(
    inner: Arc<Inner>,
    def: Arc<ResourceDef>,
    ns: Option<String>,
    lq: ListQuery,
    q: &Query,
    table_include: Option<String>,
) -> Response<Body> {
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.flag("sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let start = inner
        .lock()
        .and_then(|mut s| s.watch(&def, ns.as_deref(), &lq, send_initial));
    let bookmark_kind = json!({"kind": def.kind, "apiVersion": def.api_version()});
    let shutdown = inner.shutdown.clone();
    let interval = inner.bookmark_interval;
    let key = def.store_key();
    tokio::spawn(async move {
        let _active = WatchGuard::new(inner.clone());
        // Table watches (kubectl get -w): every object becomes a one-row
        // Table; column definitions only in the first, as the real server.
        let mut first_table = true;
        let mut render = |o: Value| -> Value {
            let o = served(&def, o);
            match &table_include {
                Some(include) => {
                    let mut t = table::to_table(&def, &[o], None, include);
                    if !first_table {
                        t["columnDefinitions"] = json!([]);
                    }
                    first_table = false;
                    t
                }
                None => o,
            }
        };
        let mut start = match start {
            Ok(s) => s,
            Err(e) => {
                // The real server answers 200 and reports the error as an event.
                let _ = tx.send(event_line("ERROR", &e.to_status())).await;
                return;
            }
        };
        for o in start.initial.drain(..) {
            if tx.send(event_line("ADDED", &render(o))).await.is_err() {
                return;
            }
        }
        if send_initial {
            let mut bm = bookmark_kind.clone();
            bm["metadata"] = json!({"resourceVersion": start.start_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}});
            if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                return;
            }
        }
        let mut last = start.start_rv;
        for e in start.backlog.drain(..) {
            last = e.rv;
            if let Some((t, o)) = translate(&def, &e, ns.as_deref(), &lq)
                && tx.send(event_line(t.as_str(), &render(o))).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        let mut rx = start.rx;
        let expired = |rv: u64| {
            let mut s = ApiError::gone(format!("too old resource version: {rv}")).to_status();
            s["reason"] = json!("Expired");
            s
        };
        // A broadcast event goes on only when it is this watch's and newer
        // than `last` (the drain before a bookmark and the main loop both
        // see it); false once the client is gone.
        let mut forward = async |e: &LogEntry, last: &mut u64| -> bool {
            if e.store != key || e.rv <= *last {
                return true;
            }
            *last = e.rv;
            match translate(&def, e, ns.as_deref(), &lq) {
                Some((t, o)) => {
                    inner.watch_events_sent.fetch_add(1, Ordering::Relaxed);
                    tx.send(event_line(t.as_str(), &render(o))).await.is_ok()
                }
                None => true,
            }
        };
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = shutdown.cancelled() => return,
                // The client went away: stop now rather than at the timeout.
                _ = tx.closed() => return,
                _ = ticker.tick(), if bookmarks => {
                    // Everything up to the current RV is already queued in rx
                    // (events are broadcast under the lock): drain, then mark.
                    let Ok(cur) = inner.lock().map(|s| s.current_rv()) else { return };
                    loop {
                        match rx.try_recv() {
                            Ok(WatchMsg::Event(e)) => {
                                if !forward(&e, &mut last).await { return; }
                            }
                            Ok(WatchMsg::Expire) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                                let _ = tx.send(event_line("ERROR", &expired(last))).await;
                                return;
                            }
                            Err(_) => break,
                        }
                    }
                    last = last.max(cur);
                    let mut bm = bookmark_kind.clone();
                    bm["metadata"] = json!({"resourceVersion": last.to_string()});
                    if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                msg = rx.recv() => match msg {
                    Ok(WatchMsg::Event(e)) => {
                        if !forward(&e, &mut last).await { return; }
                    }
                    Ok(WatchMsg::Expire) | Err(RecvError::Lagged(_)) => {
                        let _ = tx.send(event_line("ERROR", &expired(last))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let body = StreamBody::new(frames);
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| Response::new(full("")))
}
