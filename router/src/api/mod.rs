//! The router's network APIs and the server that runs them.
//!
//! - [`http`]: `POST /v1/route`, `/v1/workers`, `/metrics`.
//! - [`grpc`]: `kvtier.router.v1.Router` and `grpc.health.v1.Health`.
//! - [`ext_proc`]: the Envoy `ext_proc` endpoint picker.
//! - [`proto`]: the generated protobuf code.
//!
//! Both listeners take the same TLS files (`tls_cert`, `tls_key`, mutual
//! with `tls_client_ca`) and the same bearer token (`auth_token_file`),
//! through `kvtier-net`. The token is asked of every HTTP request but the
//! health probes, and of every gRPC call but `grpc.health.v1`, ext_proc
//! included: Envoy sends it as `grpc_service.initial_metadata`; a gateway
//! that cannot is authenticated by its client certificate instead (set
//! `tls_client_ca` and no token).

pub mod ext_proc;
pub mod grpc;
pub mod http;
pub mod proto;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::event::EventSink;
use crate::index::Index;
use crate::ingest::{
    spawn_engine, spawn_kvbm, EngineSubscription, IngestMetrics, KvbmSubscription,
};
use crate::registration::Registration;
use crate::route::{Router, MAX_BODY_BYTES};
use crate::workers::{spawn_scraper, Guard, Spawner, Worker, Workers};
use kvtier_net::{AcceptOptions, BearerToken, Incoming};

/// A running router.
pub struct Running {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub router: Arc<Router>,
    pub ingest_metrics: Arc<IngestMetrics>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How long [`Running::shutdown`] lets requests in progress finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Running {
    /// Waits until a server task ends (it should not before
    /// [`Running::shutdown`]).
    pub async fn wait(&mut self) {
        if self.tasks.is_empty() {
            return futures::future::pending().await;
        }
        let _ = futures::future::select_all(self.tasks.iter_mut()).await;
    }

    /// Stops accepting connections, lets requests in progress finish for
    /// up to 5 s, then stops every server task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::info!("shutdown: connections still open after the grace period");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Who may use the listeners: everyone without a token; with one, callers
/// presenting it, or the registration token (registration calls need that
/// one, and a request carries a single `Authorization`).
#[derive(Debug)]
struct ApiAuth {
    token: Option<BearerToken>,
    registration: Option<BearerToken>,
}

impl ApiAuth {
    fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(t) = &self.token else {
            return true;
        };
        t.accepts(authorization)
            || self
                .registration
                .as_ref()
                .is_some_and(|r| r.accepts(authorization))
    }
}

/// Paths served without a token, for load balancers' probes.
const OPEN_PATHS: [&str; 2] = ["/health", "/healthz"];

/// The HTTP gate of [`ApiAuth`]: 401 with `WWW-Authenticate: Bearer`.
async fn http_auth(
    axum::extract::State(auth): axum::extract::State<Arc<ApiAuth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if OPEN_PATHS.contains(&req.uri().path()) || auth.allows(presented) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({"error": "a bearer token is required"})),
    )
        .into_response()
}

/// The gRPC gate of [`ApiAuth`], as a tonic interceptor.
fn grpc_auth(
    auth: Arc<ApiAuth>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| {
        let presented = req.metadata().get("authorization").map(|v| v.as_bytes());
        if auth.allows(presented) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated("a bearer token is required"))
        }
    }
}

/// The spawner of a worker's event subscriptions and metrics scraper.
fn spawner(
    sink: Arc<dyn EventSink>,
    metrics: Arc<IngestMetrics>,
    scrape: Duration,
    kvbm_credentials: kvtier_client::Credentials,
) -> Spawner {
    Arc::new(move |w: &Arc<Worker>| {
        let mut guards: Vec<Guard> = Vec::new();
        let s = &w.spec;
        if let Some(zmq) = &s.zmq_endpoint {
            let mut sub = EngineSubscription::new(w.id.clone(), s.model.clone(), zmq.clone());
            sub.zmq_replay_endpoint = s.zmq_replay_endpoint.clone();
            sub.dp_ranks = s.dp_ranks;
            guards.push(Box::new(spawn_engine(sub, sink.clone(), metrics.clone())));
        }
        if let Some(kvbm) = &s.kvbm {
            let mut sub = KvbmSubscription::new(w.id.clone(), kvbm.clone());
            sub.credentials = kvbm_credentials.clone();
            guards.push(Box::new(spawn_kvbm(sub, sink.clone(), metrics.clone())));
        }
        if let Some(g) = spawn_scraper(w, scrape) {
            guards.push(g);
        }
        guards
    })
}

/// Largest gRPC message decoded: a body of [`MAX_BODY_BYTES`] plus room for
/// the message's other fields (ext_proc headers and metadata).
const MAX_GRPC_MESSAGE: usize = MAX_BODY_BYTES + (1 << 20);

/// Builds the router from `cfg`, binds both listeners and serves. Must run
/// inside a Tokio runtime.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let registration = Arc::new(Registration::from_config(&cfg.registration)?);
    // Bad TLS, token or credential files are start-up errors, named.
    let tls = cfg.tls()?;
    let http_tls = match &tls {
        Some(t) => Some(t.server_config().context("TLS configuration")?),
        None => None,
    };
    let grpc_tls = match &tls {
        Some(t) => Some(t.tonic_config().context("TLS configuration")?),
        None => None,
    };
    let token = match &cfg.auth_token_file {
        Some(f) => Some(BearerToken::from_file(f).context("auth_token_file")?),
        None => None,
    };
    let authenticated = token.is_some() || tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let auth = Arc::new(ApiAuth {
        token,
        registration: registration.token().cloned(),
    });
    let kvbm_credentials = cfg.kvbm_client.credentials()?;
    let index = Arc::new(Index::new(cfg.index.to_index_config()));
    let ingest_metrics = Arc::new(IngestMetrics::new());
    let sink: Arc<dyn EventSink> = index.clone();
    let workers = Arc::new(Workers::new(
        index.clone(),
        Some(spawner(
            sink,
            ingest_metrics.clone(),
            Duration::from_millis(cfg.load.scrape_interval_ms),
            kvbm_credentials,
        )),
    ));
    for w in &cfg.workers {
        workers
            .add(w.clone())
            .with_context(|| format!("worker {:?} in the config", w.worker_id))?;
    }
    let router = Arc::new(Router::new(&cfg, index.clone(), workers.clone()));
    let mut registry = prometheus_client::registry::Registry::default();
    router
        .metrics
        .register(&mut registry, index.clone(), workers.clone());
    ingest_metrics.register(&mut registry);

    let http_l = tokio::net::TcpListener::bind(&cfg.http)
        .await
        .with_context(|| format!("binding HTTP {}", cfg.http))?;
    let grpc_l = tokio::net::TcpListener::bind(&cfg.grpc)
        .await
        .with_context(|| format!("binding gRPC {}", cfg.grpc))?;
    let http_addr = http_l.local_addr()?;
    let grpc_addr = grpc_l.local_addr()?;
    for (listener, addr) in [("HTTP", http_addr), ("gRPC", grpc_addr)] {
        if !kvtier_net::is_loopback(&addr) && !authenticated {
            tracing::warn!(
                listener, %addr,
                "listening beyond loopback without authentication (set auth_token_file or \
                 tls_client_ca): anyone who can reach it can route, list workers{}",
                if cfg.registration.enabled && registration.token().is_none() {
                    " and add or remove them (set registration.token_file, or registration.enabled = false)"
                } else {
                    ""
                }
            );
        }
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let app = http::app(Arc::new(http::HttpState {
        router: router.clone(),
        registry,
        registration: registration.clone(),
    }))
    .layer(axum::middleware::from_fn_with_state(
        auth.clone(),
        http_auth,
    ));
    let http_task = tokio::spawn(kvtier_net::serve_http(
        Incoming::new(http_l, "HTTP", AcceptOptions::default()),
        app,
        kvtier_net::HttpOptions {
            shutdown_grace: SHUTDOWN_GRACE,
            tls: http_tls,
            ..Default::default()
        },
        until_stopped(stopped.clone()),
    ));
    let grpc_router = router.clone();
    let grpc_stop = until_stopped(stopped);
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(t) = grpc_tls {
        grpc_builder = grpc_builder.tls_config(t).context("TLS configuration")?;
    }
    let grpc_task = tokio::spawn(async move {
        use proto::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
        use proto::grpc::health::v1::health_server::HealthServer;
        use proto::kvtier::router::v1::router_server::RouterServer;
        use tonic::service::interceptor::InterceptedService;
        let r = grpc_builder
            // A peer that stops answering pings is gone: free its slot.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(InterceptedService::new(
                RouterServer::new(grpc::RouterService {
                    router: grpc_router.clone(),
                    registration,
                })
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
                grpc_auth(auth.clone()),
            ))
            .add_service(InterceptedService::new(
                ExternalProcessorServer::new(Arc::new(ext_proc::ExtProcService {
                    router: grpc_router,
                }))
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
                grpc_auth(auth),
            ))
            // Health stays open, like `/healthz`: probes carry no token.
            .add_service(HealthServer::new(grpc::HealthService))
            .serve_with_incoming_shutdown(
                Incoming::new(grpc_l, "gRPC", AcceptOptions::default()),
                grpc_stop,
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server ended");
        }
    });
    Ok(Running {
        http_addr,
        grpc_addr,
        router,
        ingest_metrics,
        stop,
        tasks: vec![http_task, grpc_task],
    })
}
