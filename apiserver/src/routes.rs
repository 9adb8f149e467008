//! HTTP: path parsing, content negotiation, query parameters, and the mapping of every outcome
//! to a response (errors become `Status` objects here and nowhere else).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::watch as tokio_watch;

use crate::discovery;
use crate::errors::{ApiError, ApiResult, field};
use crate::meta;
use crate::patch::PatchType;
use crate::resources::ResourceInfo;
use crate::rest::{self, DeleteOptions, FieldValidation, ListOptions, Scope, WriteOptions};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{Obj, Store};
use crate::table::{self, IncludeObject};
use crate::watch::{self, Format, WatchRequest, WatchStart};

/// Server-wide HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
    pub max_body_bytes: usize,
}

/// Shared state of the handlers.
pub struct AppState {
    pub store: Arc<Store>,
    pub opts: HttpOptions,
    pub shutdown: tokio_watch::Receiver<bool>,
    pub server_address: String,
}

/// The router: one fallback handler that understands Kubernetes paths.
pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

async fn handle(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = match dispatch(&app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    tracing::debug!(%method, %uri, status = resp.status().as_u16(), "request");
    resp
}

const JSON: &str = "application/json";
const TABLE_CT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";
const META_CT: &str = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io";
const META_LIST_CT: &str = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io";

fn json_response(code: StatusCode, content_type: &str, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (code, bytes).into_response();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, JSON, body)
}

/// One media range of an `Accept` header.
struct MediaRange {
    mime: String,
    params: HashMap<String, String>,
}

fn parse_accept(headers: &HeaderMap) -> Vec<MediaRange> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    accept
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let mime = parts.next()?.trim().to_ascii_lowercase();
            if mime.is_empty() {
                return None;
            }
            let params = parts
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                })
                .collect();
            Some(MediaRange { mime, params })
        })
        .collect()
}

fn is_json_like(mime: &str) -> bool {
    matches!(mime, "application/json" | "application/*" | "*/*")
}

/// Negotiates the object/list representation.
fn negotiate_objects(headers: &HeaderMap, query: &HashMap<String, String>) -> ApiResult<Format> {
    let ranges = parse_accept(headers);
    if ranges.is_empty() {
        return Ok(Format::Json);
    }
    for r in &ranges {
        if !is_json_like(&r.mime) {
            continue;
        }
        match r.params.get("as").map(String::as_str) {
            None => return Ok(Format::Json),
            Some("Table")
                if r.params.get("g").map(String::as_str) == Some("meta.k8s.io")
                    && matches!(
                        r.params.get("v").map(String::as_str),
                        Some("v1" | "v1beta1")
                    ) =>
            {
                return Ok(Format::Table(IncludeObject::parse(
                    query.get("includeObject").map(String::as_str),
                )?));
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList")
                if r.params.get("g").map(String::as_str) == Some("meta.k8s.io")
                    && matches!(
                        r.params.get("v").map(String::as_str),
                        Some("v1" | "v1beta1")
                    ) =>
            {
                return Ok(Format::Metadata);
            }
            _ => {}
        }
    }
    Err(ApiError::not_acceptable())
}

/// Whether the client asks for aggregated discovery (and which version of it).
fn wants_aggregated(headers: &HeaderMap) -> Option<&'static str> {
    for r in parse_accept(headers) {
        if !is_json_like(&r.mime) {
            continue;
        }
        match (
            r.params.get("as").map(String::as_str),
            r.params.get("g").map(String::as_str),
            r.params.get("v").map(String::as_str),
        ) {
            (None, _, _) => return None,
            (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io"), Some("v2")) => {
                return Some("v2");
            }
            (Some("APIGroupDiscoveryList"), Some("apidiscovery.k8s.io"), Some("v2beta1")) => {
                return Some("v2beta1");
            }
            _ => {}
        }
    }
    None
}

fn aggregated_response(reg: &crate::resources::Registry, core: bool, v: &str) -> Response {
    let ct = format!("application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList");
    json_response(StatusCode::OK, &ct, &discovery::aggregated(reg, core, v))
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true" | "1" | "True"))
}

fn method_not_allowed() -> ApiError {
    let mut e =
        ApiError::bad_request("the server does not allow this method on the requested resource");
    e.code = 405;
    e.reason = "MethodNotAllowed".into();
    e.details = Some(Default::default());
    e
}

async fn read_body(app: &AppState, body: Body) -> ApiResult<bytes::Bytes> {
    to_bytes(body, app.opts.max_body_bytes)
        .await
        .map_err(|_| ApiError::too_large_body(app.opts.max_body_bytes))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(JSON)
        .to_string()
}

/// Decodes a POST/PUT body (JSON or YAML; protobuf for Namespaces, see `protobuf`).
fn decode_object(headers: &HeaderMap, body: &[u8], res: &ResourceInfo) -> ApiResult<Value> {
    let ct = content_type(headers);
    let base = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let v: Value = match base.as_str() {
        "application/json" | "" | "*/*" => serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?,
        "application/yaml" | "application/x-yaml" | "text/yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?,
        "application/vnd.kubernetes.protobuf"
            if res.builtin == Some(crate::resources::Builtin::Namespace) =>
        {
            crate::protobuf::decode_namespace(body).map_err(|e| {
                ApiError::bad_request(format!("unable to decode the protobuf body: {e}"))
            })?
        }
        _ => {
            return Err(ApiError::unsupported_media_type(
                &ct,
                &["application/json", "application/yaml"],
            ));
        }
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "couldn't get version/kind; json parse error: the body must be a JSON object",
        ));
    }
    Ok(v)
}

fn write_options(q: &HashMap<String, String>) -> ApiResult<WriteOptions> {
    let dry_run = match q.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {}: supported values: \"All\"",
                crate::errors::quote(other)
            )));
        }
    };
    let field_validation = match q.get("fieldValidation").map(String::as_str) {
        None | Some("" | "Warn") => FieldValidation::Warn,
        Some("Ignore") => FieldValidation::Ignore,
        Some("Strict") => FieldValidation::Strict,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Invalid value: {}: fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\"",
                crate::errors::quote(other)
            )));
        }
    };
    let field_manager = q.get("fieldManager").filter(|m| !m.is_empty()).cloned();
    if let Some(m) = &field_manager
        && m.len() > 128
    {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "PatchOptions",
            "",
            &[field::invalid(
                "fieldManager",
                m,
                "must be no more than 128 characters",
            )],
        ));
    }
    Ok(WriteOptions {
        dry_run,
        field_manager,
        force: truthy(q, "force"),
        field_validation,
        warnings: Default::default(),
    })
}

/// The routes we understand.
enum Route {
    Health,
    Version,
    Api,
    Apis,
    Group(String),
    ResourceList(String, String),
    OpenApiV3Index,
    OpenApiV3(String, String),
    Resource(ResourcePath),
}

struct ResourcePath {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
}

fn resource_path(group: &str, version: &str, rest: &[String]) -> Option<ResourcePath> {
    let namespaced = rest.first().map(String::as_str) == Some("namespaces")
        && rest.len() >= 3
        && !(rest.len() == 3 && matches!(rest[2].as_str(), "status" | "finalize"));
    let (namespace, rest) = if namespaced {
        (Some(rest[1].clone()), &rest[2..])
    } else {
        (None, rest)
    };
    if rest.is_empty() || rest.len() > 3 {
        return None;
    }
    Some(ResourcePath {
        group: group.into(),
        version: version.into(),
        namespace,
        plural: rest[0].clone(),
        name: rest.get(1).cloned(),
        sub: rest.get(2).cloned(),
    })
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => Some(Route::Health),
        ["version"] => Some(Route::Version),
        ["api"] => Some(Route::Api),
        ["apis"] => Some(Route::Apis),
        ["api", v] => Some(Route::ResourceList(String::new(), (*v).into())),
        ["apis", g] => Some(Route::Group((*g).into())),
        ["apis", g, v] => Some(Route::ResourceList((*g).into(), (*v).into())),
        ["openapi", "v3"] => Some(Route::OpenApiV3Index),
        ["openapi", "v3", "api", v] => Some(Route::OpenApiV3(String::new(), (*v).into())),
        ["openapi", "v3", "apis", g, v] => Some(Route::OpenApiV3((*g).into(), (*v).into())),
        ["api", v, ..] => resource_path("", v, &segs[2..]).map(Route::Resource),
        ["apis", g, v, ..] => resource_path(g, v, &segs[3..]).map(Route::Resource),
        _ => None,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (
                (bytes[i + 1] as char).to_digit(16),
                (bytes[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn dispatch(app: &Arc<AppState>, req: Request) -> ApiResult<Response> {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let headers = parts.headers;
    let query = parse_query(parts.uri.query());
    let Some(route) = route(parts.uri.path()) else {
        return Err(ApiError::path_not_found());
    };
    let reg = app.store.registry();
    let read_only = |m: &Method| *m == Method::GET || *m == Method::HEAD;
    match route {
        Route::Health => {
            let mut r = (StatusCode::OK, "ok").into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(r)
        }
        Route::Version if read_only(&method) => Ok(ok(&discovery::version())),
        Route::Api if read_only(&method) => Ok(match wants_aggregated(&headers) {
            Some(v) => aggregated_response(&reg, true, v),
            None => ok(&discovery::api_versions(&app.server_address)),
        }),
        Route::Apis if read_only(&method) => Ok(match wants_aggregated(&headers) {
            Some(v) => aggregated_response(&reg, false, v),
            None => ok(&discovery::api_group_list(&reg)),
        }),
        Route::Group(g) if read_only(&method) => discovery::api_group(&reg, &g)
            .map(|v| ok(&v))
            .ok_or_else(ApiError::path_not_found),
        Route::ResourceList(g, v) if read_only(&method) => {
            if g.is_empty() && v != "v1" {
                return Err(ApiError::path_not_found());
            }
            discovery::api_resource_list(&reg, &g, &v)
                .map(|v| ok(&v))
                .ok_or_else(ApiError::path_not_found)
        }
        Route::OpenApiV3Index if read_only(&method) => Ok(ok(&discovery::openapi_v3_index(&reg))),
        Route::OpenApiV3(g, v) if read_only(&method) => discovery::openapi_v3_gv(&reg, &g, &v)
            .map(|v| ok(&v))
            .ok_or_else(ApiError::path_not_found),
        Route::Resource(p) => {
            let res = reg
                .lookup(&p.group, &p.version, &p.plural)
                .ok_or_else(ApiError::path_not_found)?;
            resource(app, &res, p, method, &headers, &query, body).await
        }
        _ => Err(method_not_allowed()),
    }
}

/// Adds the request's warnings as `Warning: 299 - "..."` headers.
fn with_warnings(mut resp: Response, opts: &WriteOptions) -> Response {
    for w in opts.warnings.borrow().iter() {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {}", crate::errors::quote(w))) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn warning_headers(resp: &mut Response, res: &ResourceInfo, version: &str) {
    if let Some(w) = res
        .version(version)
        .and_then(|v| v.deprecation_warning.as_ref())
        && let Ok(v) = HeaderValue::from_str(&format!("299 - {}", crate::errors::quote(w)))
    {
        resp.headers_mut().insert(header::WARNING, v);
    }
}

async fn resource(
    app: &Arc<AppState>,
    res: &Arc<ResourceInfo>,
    p: ResourcePath,
    method: Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Body,
) -> ApiResult<Response> {
    match (&p.namespace, res.namespaced) {
        (Some(_), false) => return Err(ApiError::path_not_found()),
        (None, true) if p.name.is_some() => return Err(ApiError::path_not_found()),
        _ => {}
    }
    if let Some(ns) = &p.namespace
        && ns.is_empty()
    {
        return Err(ApiError::path_not_found());
    }
    let status = match p.sub.as_deref() {
        None => false,
        Some("status")
            if res
                .version(&p.version)
                .is_some_and(|v| v.status_subresource) =>
        {
            true
        }
        Some(_) => return Err(ApiError::path_not_found()),
    };
    let scope = Scope {
        res: res.clone(),
        version: p.version.clone(),
        namespace: p.namespace.clone().unwrap_or_default(),
        status,
    };
    let mut resp = match p.name {
        None => collection(app, &scope, method, headers, query, body).await?,
        Some(name) => object(app, &scope, &name, method, headers, query, body).await?,
    };
    warning_headers(&mut resp, res, &p.version);
    Ok(resp)
}

fn render_one(scope: &Scope, obj: &Obj, format: Format) -> (String, Value) {
    let o = rest::render(scope, obj);
    match format {
        Format::Json => (JSON.into(), o),
        Format::Metadata => (META_CT.into(), table::partial_metadata(&o)),
        Format::Table(include) => (
            TABLE_CT.into(),
            table::table(
                &scope.res,
                &scope.version,
                std::slice::from_ref(&o),
                Map::new(),
                include,
                true,
            ),
        ),
    }
}

fn object_response(code: StatusCode, scope: &Scope, obj: &Obj, format: Format) -> Response {
    let (ct, body) = render_one(scope, obj, format);
    json_response(code, &ct, &body)
}

async fn object(
    app: &Arc<AppState>,
    scope: &Scope,
    name: &str,
    method: Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Body,
) -> ApiResult<Response> {
    let store = &app.store;
    if method == Method::GET || method == Method::HEAD {
        let format = negotiate_objects(headers, query)?;
        let obj = rest::get(store, scope, name)?;
        return Ok(object_response(StatusCode::OK, scope, &obj, format));
    }
    let format = match negotiate_objects(headers, query) {
        Ok(Format::Table(_)) | Err(_) => Format::Json,
        Ok(f) => f,
    };
    match method {
        Method::PUT => {
            let opts = write_options(query)?;
            let bytes = read_body(app, body).await?;
            let obj = decode_object(headers, &bytes, &scope.res)?;
            let (out, created) = rest::update(store, scope, name, obj, &opts)?;
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(with_warnings(
                object_response(code, scope, &out, format),
                &opts,
            ))
        }
        Method::PATCH => {
            let opts = write_options(query)?;
            let ct = content_type(headers);
            let Some(ptype) = PatchType::from_content_type(&ct) else {
                return Err(ApiError::unsupported_media_type(
                    &ct,
                    &[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/apply-patch+yaml",
                        "application/strategic-merge-patch+json",
                    ],
                ));
            };
            let bytes = read_body(app, body).await?;
            let (out, created) = rest::patch(store, scope, name, ptype, &bytes, &opts)?;
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(with_warnings(
                object_response(code, scope, &out, format),
                &opts,
            ))
        }
        Method::DELETE if !scope.status => {
            let bytes = read_body(app, body).await?;
            let opts = delete_options(query, &bytes)?;
            let d = rest::delete(store, scope, name, &opts)?;
            if scope.res.returns_deleted_object() || !d.removed {
                Ok(object_response(StatusCode::OK, scope, &d.object, format))
            } else {
                Ok(ok(&json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": name,
                        "group": scope.res.group,
                        "kind": scope.res.plural,
                        "uid": meta::uid(&d.object),
                    },
                })))
            }
        }
        _ => Err(method_not_allowed()),
    }
}

fn delete_options(query: &HashMap<String, String>, body: &[u8]) -> ApiResult<DeleteOptions> {
    let mut opts = DeleteOptions {
        dry_run: write_options(query)?.dry_run,
        ..DeleteOptions::default()
    };
    if body.iter().any(|b| !b.is_ascii_whitespace()) {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
        }
        if let Some(p) = v.get("preconditions") {
            opts.precondition_uid = p.get("uid").and_then(Value::as_str).map(str::to_string);
            opts.precondition_rv = p
                .get("resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if let Some(dr) = v.get("dryRun").and_then(Value::as_array) {
            for d in dr {
                match d.as_str() {
                    Some("All") => opts.dry_run = true,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "dryRun: Unsupported value: {}: supported values: \"All\"",
                            other.map(crate::errors::quote).unwrap_or_default()
                        )));
                    }
                }
            }
        }
        if let Some(pp) = v.get("propagationPolicy").and_then(Value::as_str)
            && !matches!(pp, "Orphan" | "Background" | "Foreground")
        {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\"",
                crate::errors::quote(pp)
            )));
        }
    }
    Ok(opts)
}

fn list_meta(rv: u64, cont: Option<&str>, remaining: Option<u64>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("resourceVersion".into(), json!(rv.to_string()));
    if let Some(c) = cont {
        m.insert("continue".into(), json!(c));
    }
    if let Some(r) = remaining {
        m.insert("remainingItemCount".into(), json!(r));
    }
    m
}

fn invalid_list_options(errs: &[crate::validation::FieldError]) -> ApiError {
    ApiError::invalid("meta.k8s.io", "ListOptions", "", errs)
}

async fn collection(
    app: &Arc<AppState>,
    scope: &Scope,
    method: Method,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: Body,
) -> ApiResult<Response> {
    let store = &app.store;
    if scope.status {
        return Err(method_not_allowed());
    }
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        &scope.res,
        &scope.version,
    )?;
    let cluster_wide = scope.res.namespaced && scope.namespace.is_empty();
    match method {
        Method::GET | Method::HEAD => {
            let format = negotiate_objects(headers, query)?;
            if truthy(query, "watch") {
                return watch_collection(app, scope, labels, fields, query, format);
            }
            let limit = match query.get("limit").map(String::as_str) {
                None | Some("") => None,
                Some(l) => Some(l.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "limit: Invalid value: {}",
                        crate::errors::quote(l)
                    ))
                })?),
            };
            let rv_match = query
                .get("resourceVersionMatch")
                .filter(|s| !s.is_empty())
                .cloned();
            let rv = query
                .get("resourceVersion")
                .filter(|s| !s.is_empty())
                .cloned();
            if let Some(m) = &rv_match {
                if !matches!(m.as_str(), "NotOlderThan" | "Exact") {
                    return Err(invalid_list_options(&[crate::validation::FieldError {
                        field: "resourceVersionMatch".into(),
                        reason: "FieldValueNotSupported".into(),
                        message: format!(
                            "Unsupported value: {}: supported values: \"Exact\", \"NotOlderThan\", \"\"",
                            crate::errors::quote(m)
                        ),
                    }]));
                }
                if rv.is_none() {
                    return Err(invalid_list_options(&[field::forbidden(
                        "resourceVersionMatch",
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    )]));
                }
            }
            let opts = ListOptions {
                labels,
                fields,
                limit: limit.and_then(|l| usize::try_from(l).ok()),
                continue_token: query.get("continue").filter(|s| !s.is_empty()).cloned(),
                resource_version: rv,
                resource_version_match: rv_match,
            };
            let result = rest::list(store, scope, &opts)?;
            let lm = list_meta(
                result.resource_version,
                result.continue_token.as_deref(),
                result.remaining,
            );
            let items: Vec<Value> = result
                .items
                .iter()
                .map(|o| rest::render(scope, o))
                .collect();
            let (ct, body) = match format {
                Format::Json => (
                    JSON,
                    json!({
                        "apiVersion": scope.res.api_version(&scope.version),
                        "kind": scope.res.list_kind,
                        "metadata": lm,
                        "items": items,
                    }),
                ),
                Format::Metadata => (
                    META_LIST_CT,
                    json!({
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadataList",
                        "metadata": lm,
                        "items": items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
                    }),
                ),
                Format::Table(include) => (
                    TABLE_CT,
                    table::table(&scope.res, &scope.version, &items, lm, include, true),
                ),
            };
            Ok(json_response(StatusCode::OK, ct, &body))
        }
        Method::POST if !cluster_wide => {
            let opts = write_options(query)?;
            let format = match negotiate_objects(headers, query) {
                Ok(Format::Table(_)) | Err(_) => Format::Json,
                Ok(f) => f,
            };
            let bytes = read_body(app, body).await?;
            let obj = decode_object(headers, &bytes, &scope.res)?;
            let out = rest::create(store, scope, obj, &opts)?;
            Ok(with_warnings(
                object_response(StatusCode::CREATED, scope, &out, format),
                &opts,
            ))
        }
        Method::DELETE if !cluster_wide => {
            let bytes = read_body(app, body).await?;
            let opts = delete_options(query, &bytes)?;
            let deleted = rest::delete_collection(store, scope, &labels, &fields, &opts)?;
            let items: Vec<Value> = deleted.iter().map(|o| rest::render(scope, o)).collect();
            Ok(ok(&json!({
                "apiVersion": scope.res.api_version(&scope.version),
                "kind": scope.res.list_kind,
                "metadata": list_meta(store.current_rv(), None, None),
                "items": items,
            })))
        }
        _ => Err(method_not_allowed()),
    }
}

fn watch_collection(
    app: &Arc<AppState>,
    scope: &Scope,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
    format: Format,
) -> ApiResult<Response> {
    let bookmarks = truthy(query, "allowWatchBookmarks");
    let send_initial = match query.get("sendInitialEvents").map(String::as_str) {
        None | Some("") => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "sendInitialEvents: Invalid value: {}",
                crate::errors::quote(other)
            )));
        }
    };
    let rv_match = query
        .get("resourceVersionMatch")
        .filter(|s| !s.is_empty())
        .cloned();
    let rv = query.get("resourceVersion").cloned().unwrap_or_default();
    let mut errs = Vec::new();
    match send_initial {
        Some(_) => {
            if rv_match.as_deref() != Some("NotOlderThan") {
                errs.push(field::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if send_initial == Some(true) && !bookmarks {
                errs.push(field::forbidden(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks to true",
                ));
            }
        }
        None => {
            if rv_match.is_some() {
                errs.push(field::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
        }
    }
    if !errs.is_empty() {
        return Err(invalid_list_options(&errs));
    }
    let current = app.store.current_rv();
    let start = match (rv.as_str(), send_initial) {
        (_, Some(true)) => {
            if !rv.is_empty() && rv != "0" {
                let n = rest::parse_rv(&rv)?;
                if n > current {
                    return Err(ApiError::too_large(n, current));
                }
            }
            WatchStart::Now { initial: true }
        }
        ("" | "0", Some(false)) => WatchStart::Now { initial: false },
        ("" | "0", None) => WatchStart::Now { initial: true },
        (n, _) => {
            let n = rest::parse_rv(n)?;
            if n > current {
                return Err(ApiError::too_large(n, current));
            }
            WatchStart::After(n)
        }
    };
    let timeout = match query.get("timeoutSeconds").map(String::as_str) {
        None | Some("") => app.opts.default_watch_timeout,
        Some(t) => Duration::from_secs(t.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "timeoutSeconds: Invalid value: {}",
                crate::errors::quote(t)
            ))
        })?),
    };
    let req = WatchRequest {
        scope: scope.clone(),
        labels,
        fields,
        start,
        bookmarks,
        initial_events_end: send_initial == Some(true),
        timeout,
        format,
    };
    let stream = watch::start(
        app.store.clone(),
        req,
        app.opts.bookmark_interval,
        app.shutdown.clone(),
    );
    let ct = match format {
        Format::Table(_) => TABLE_CT,
        _ => JSON,
    };
    let mut resp = Response::new(Body::from_stream(stream));
    if let Ok(v) = HeaderValue::from_str(ct) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| match route(p) {
            Some(Route::Resource(rp)) => Some((
                rp.group,
                rp.version,
                rp.namespace,
                rp.plural,
                rp.name,
                rp.sub,
            )),
            _ => None,
        };
        assert_eq!(
            r("/api/v1/namespaces/default/events/x"),
            Some((
                "".into(),
                "v1".into(),
                Some("default".into()),
                "events".into(),
                Some("x".into()),
                None
            ))
        );
        assert_eq!(
            r("/api/v1/namespaces/foo/status"),
            Some((
                "".into(),
                "v1".into(),
                None,
                "namespaces".into(),
                Some("foo".into()),
                Some("status".into())
            ))
        );
        assert_eq!(
            r("/apis/g.io/v1/widgets"),
            Some((
                "g.io".into(),
                "v1".into(),
                None,
                "widgets".into(),
                None,
                None
            ))
        );
        assert!(r("/apis/g.io/v1/namespaces/ns/widgets/a/status/extra").is_none());
        assert_eq!(percent_decode("a%2Fb"), "a/b");
    }
}
