//! The HTTP API (axum).
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/v1/route` | `{"model", "token_ids" \| "prompt" \| "messages", "lora_name"?, "cache_salt"?}` | 200 [`Decision`]; 400 bad input; 503 no worker for the model |
//! | POST | `/v1/route/{request_id}/done` | none | 204; 404 unknown or expired |
//! | GET | `/v1/workers` | | 200 `{"workers": [WorkerSpec]}` |
//! | POST | `/v1/workers` | [`WorkerSpec`] | 201 created, 200 already there (same spec), 409 different spec, 400 bad input, 401/403 (below) |
//! | DELETE | `/v1/workers/{worker_id}` | | 204 (blocks purged); 404 unknown; 401/403 (below) |
//! | GET | `/metrics` | | Prometheus text |
//! | GET | `/health` | | 200 `ok` |
//!
//! Errors are `{"error": "reason"}`. A body over
//! [`MAX_BODY_BYTES`](crate::route::MAX_BODY_BYTES) is 413. Adding and
//! removing workers follows [`Registration`]: 401 without the configured
//! bearer token, 403 when registration is disabled or the worker names an
//! address outside the allow-lists.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::registration::{Registration, RegistrationError};
use crate::route::{Input, RouteError, RouteRequest, Router, MAX_BODY_BYTES};
use crate::tokenize::ChatOptions;
use crate::workers::{WorkerError, WorkerSpec};

/// What the HTTP handlers share.
pub struct HttpState {
    pub router: Arc<Router>,
    pub registry: prometheus_client::registry::Registry,
    pub registration: Arc<Registration>,
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": msg.to_string() }))).into_response()
}

/// The answer to a body that could not be read: 413 past the limit.
fn body_error(e: BytesRejection) -> Response {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        ),
        s => error(s, e.body_text()),
    }
}

fn registration_error(e: RegistrationError) -> Response {
    match e {
        RegistrationError::Unauthenticated => {
            let mut r = error(StatusCode::UNAUTHORIZED, e);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
        RegistrationError::Disabled | RegistrationError::Forbidden(_) => {
            error(StatusCode::FORBIDDEN, e)
        }
    }
}

fn authorize(st: &HttpState, headers: &HeaderMap) -> Result<(), RegistrationError> {
    st.registration
        .authorize(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
}

/// The body of `POST /v1/route`. Unknown keys are ignored (so an OpenAI
/// request body can be passed as is); wrong types are errors.
#[derive(Debug, Deserialize)]
pub struct RouteBody {
    pub model: String,
    #[serde(default)]
    pub token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    /// With `messages`: `tools`, `add_generation_prompt`,
    /// `chat_template_kwargs` (the OpenAI body and vLLM's extensions).
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
    #[serde(default)]
    pub lora_name: Option<String>,
    #[serde(default)]
    pub cache_salt: Option<String>,
}

impl RouteBody {
    /// Exactly one of `token_ids`, `prompt`, `messages`.
    pub fn into_request(self) -> Result<RouteRequest, String> {
        let input = match (self.token_ids, self.prompt, self.messages) {
            (Some(t), None, None) => Input::Tokens(t),
            (None, Some(p), None) => Input::Prompt(p),
            (None, None, Some(m)) => {
                Input::Messages(m, ChatOptions::from_body(&Value::Object(self.rest))?)
            }
            (None, None, None) => {
                return Err("one of token_ids, prompt or messages is required".into())
            }
            _ => return Err("give only one of token_ids, prompt or messages".into()),
        };
        Ok(RouteRequest {
            model: self.model,
            input,
            lora_name: self.lora_name.filter(|s| !s.is_empty()),
            cache_salt: self.cache_salt.filter(|s| !s.is_empty()),
            subset: None,
        })
    }
}

/// Status of a route error.
pub fn route_status(e: &RouteError) -> StatusCode {
    match e {
        RouteError::Invalid(_) => StatusCode::BAD_REQUEST,
        RouteError::NoWorkers(_) | RouteError::NoEligible(_) => StatusCode::SERVICE_UNAVAILABLE,
        RouteError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn route(State(st): State<Arc<HttpState>>, b: Result<Bytes, BytesRejection>) -> Response {
    let body = match b {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let parsed: RouteBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
    };
    let req = match parsed.into_request() {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let router = st.router.clone();
    // Tokenizing and lookups are CPU work: keep them off the reactor when
    // a tokenizer is involved.
    let res = if matches!(req.input, Input::Tokens(_)) {
        router.route(&req)
    } else {
        match tokio::task::spawn_blocking(move || router.route(&req)).await {
            Ok(r) => r,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    };
    match res {
        Ok(d) => Json(d).into_response(),
        Err(e) => error(route_status(&e), e),
    }
}

async fn route_done(State(st): State<Arc<HttpState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, "request_id must be an integer");
    };
    if st.router.done(id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("request {id} is not in flight"),
        )
    }
}

async fn list_workers(State(st): State<Arc<HttpState>>) -> Response {
    let ws: Vec<WorkerSpec> = st
        .router
        .workers
        .list()
        .iter()
        .map(|w| w.spec.clone())
        .collect();
    Json(json!({ "workers": ws })).into_response()
}

async fn add_worker(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return registration_error(e);
    }
    let body = match b {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let spec: WorkerSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid worker: {e}")),
    };
    if let Err(e) = spec.validate() {
        return error(StatusCode::BAD_REQUEST, WorkerError::Invalid(e));
    }
    if let Err(e) = st.registration.check(&spec) {
        return registration_error(e);
    }
    match st.router.workers.add(spec.clone()) {
        Ok(true) => (StatusCode::CREATED, Json(spec)).into_response(),
        Ok(false) => (StatusCode::OK, Json(spec)).into_response(),
        Err(e @ WorkerError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ WorkerError::Conflict(_)) => error(StatusCode::CONFLICT, e),
    }
}

async fn delete_worker(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return registration_error(e);
    }
    let router = st.router.clone();
    let id2 = id.clone();
    // Purging walks the worker's blocks: off the reactor.
    let removed = tokio::task::spawn_blocking(move || router.workers.remove(&id2))
        .await
        .unwrap_or(false);
    if removed {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("unknown worker {id:?}"))
    }
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let body = crate::metrics::render(&st.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The HTTP application.
pub fn app(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/route", post(route))
        .route("/v1/route/{id}/done", post(route_done))
        .route("/v1/workers", get(list_workers).post(add_worker))
        .route("/v1/workers/{id}", delete(delete_worker))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        // The name kvbm and Kubernetes probes use.
        .route("/healthz", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
