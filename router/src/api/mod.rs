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
use crate::registration::Registration;
use crate::route::{Router, MAX_BODY_BYTES};
use crate::workers::{spawn_scraper, Guard, Spawner, Worker, Workers};
use kvtier_net::{AcceptOptions, Incoming};

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

/// Largest gRPC message decoded: a body of [`MAX_BODY_BYTES`] plus room for
/// the message's other fields (ext_proc headers and metadata).
const MAX_GRPC_MESSAGE: usize = MAX_BODY_BYTES + (1 << 20);

/// Builds the router from `cfg`, binds both listeners and serves. Must run
/// inside a Tokio runtime.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let registration = Arc::new(Registration::from_config(&cfg.registration)?);
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
    for (listener, addr) in [("HTTP", http_addr), ("gRPC", grpc_addr)] {
        if !kvtier_net::is_loopback(&addr) && !registration.has_token() {
            tracing::warn!(
                listener, %addr,
                "listening beyond loopback without authentication: anyone who can reach it \
                 can route, list workers{}",
                if cfg.registration.enabled {
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
    }));
    let http_task = tokio::spawn(kvtier_net::serve_http(
        Incoming::new(http_l, "HTTP", AcceptOptions::default()),
        app,
        kvtier_net::HttpOptions {
            shutdown_grace: SHUTDOWN_GRACE,
            ..Default::default()
        },
        until_stopped(stopped.clone()),
    ));
    let grpc_router = router.clone();
    let grpc_stop = until_stopped(stopped);
    let grpc_task = tokio::spawn(async move {
        use proto::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
        use proto::grpc::health::v1::health_server::HealthServer;
        use proto::kvtier::router::v1::router_server::RouterServer;
        let r = tonic::transport::Server::builder()
            // A peer that stops answering pings is gone: free its slot.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(
                RouterServer::new(grpc::RouterService {
                    router: grpc_router.clone(),
                    registration,
                })
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
            )
            .add_service(
                ExternalProcessorServer::new(Arc::new(ext_proc::ExtProcService {
                    router: grpc_router,
                }))
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
            )
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
