//! `/metrics` (Prometheus text) and `/healthz` on the HTTP port.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::store::Store;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(store)
}

async fn metrics(State(store): State<Arc<Store>>) -> impl IntoResponse {
    store.refresh_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        store.metrics().encode(),
    )
}

/// 200 with `{"status": "ok"}` or `{"status": "degraded", "degraded":
/// {"disk": "why"}}`: a degraded disk still serves the host tier, so the
/// daemon stays in rotation; the reason is for operators and alerts.
async fn healthz(State(store): State<Arc<Store>>) -> impl IntoResponse {
    let degraded = store.degraded();
    let status = if degraded.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    let reasons: serde_json::Map<String, serde_json::Value> = degraded
        .into_iter()
        .map(|(t, r)| (t, serde_json::Value::String(r)))
        .collect();
    Json(serde_json::json!({ "status": status, "degraded": reasons }))
}
