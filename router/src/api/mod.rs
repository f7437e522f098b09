//! The router's network APIs and the server that runs them.
//!
//! - [`http`]: `POST /v1/route`, `/v1/workers`, `/metrics`.
//! - [`grpc`]: `kvtier.router.v1.Router` and `grpc.health.v1.Health`.
//! - [`ext_proc`]: the Envoy `ext_proc` endpoint picker.
//! - [`proto`]: the generated protobuf code.

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
use crate::route::Router;
use crate::workers::{spawn_scraper, Guard, Spawner, Worker, Workers};

/// A running router.
pub struct Running {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub router: Arc<Router>,
    pub ingest_metrics: Arc<IngestMetrics>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits until a server task ends (it should not).
    pub async fn wait(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        let _ = futures::future::select_all(tasks).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The spawner of a worker's event subscriptions and metrics scraper.
fn spawner(sink: Arc<dyn EventSink>, metrics: Arc<IngestMetrics>, scrape: Duration) -> Spawner {
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
            let sub = KvbmSubscription::new(w.id.clone(), kvbm.clone());
            guards.push(Box::new(spawn_kvbm(sub, sink.clone(), metrics.clone())));
        }
        if let Some(g) = spawn_scraper(w, scrape) {
            guards.push(g);
        }
        guards
    })
}

/// Builds the router from `cfg`, binds both listeners and serves. Must run
/// inside a Tokio runtime.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let index = Arc::new(Index::new(cfg.index.to_index_config()));
    let ingest_metrics = Arc::new(IngestMetrics::new());
    let sink: Arc<dyn EventSink> = index.clone();
    let workers = Arc::new(Workers::new(
        index.clone(),
        Some(spawner(
            sink,
            ingest_metrics.clone(),
            Duration::from_millis(cfg.load.scrape_interval_ms),
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

    let app = http::app(Arc::new(http::HttpState {
        router: router.clone(),
        registry,
    }));
    let http_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(http_l, app).await {
            tracing::error!(error = %e, "HTTP server ended");
        }
    });
    let grpc_router = router.clone();
    let grpc_task = tokio::spawn(async move {
        use proto::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
        use proto::grpc::health::v1::health_server::HealthServer;
        use proto::kvtier::router::v1::router_server::RouterServer;
        let r = tonic::transport::Server::builder()
            .add_service(RouterServer::new(grpc::RouterService {
                router: grpc_router.clone(),
            }))
            .add_service(ExternalProcessorServer::new(Arc::new(
                ext_proc::ExtProcService {
                    router: grpc_router,
                },
            )))
            .add_service(HealthServer::new(grpc::HealthService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_l))
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
        tasks: vec![http_task, grpc_task],
    })
}
