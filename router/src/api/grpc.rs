//! The gRPC API: `kvtier.router.v1.Router` (the HTTP API's operations) and
//! `grpc.health.v1.Health`. Errors: INVALID_ARGUMENT for bad input,
//! UNAVAILABLE when no worker serves the model, NOT_FOUND for unknown
//! workers and request ids, ALREADY_EXISTS for a conflicting worker,
//! INTERNAL for the router's own setup. `AddWorker` and `RemoveWorker`
//! follow [`Registration`]: UNAUTHENTICATED without the configured bearer
//! token (metadata `authorization: Bearer TOKEN`), PERMISSION_DENIED when
//! registration is disabled or the worker names an address outside the
//! allow-lists.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::proto::grpc::health::v1 as health;
use super::proto::kvtier::router::v1 as pb;
use crate::registration::{Registration, RegistrationError};
use crate::route::{Decision, Input, RouteError, RouteRequest, Router};
use crate::tokenize::ChatOptions;
use crate::workers::{WorkerError, WorkerSpec};

/// The `kvtier.router.v1.Router` service.
pub struct RouterService {
    pub router: Arc<Router>,
    pub registration: Arc<Registration>,
}

fn registration_status(e: RegistrationError) -> Status {
    match e {
        RegistrationError::Unauthenticated => Status::unauthenticated(e.to_string()),
        RegistrationError::Disabled | RegistrationError::Forbidden(_) => {
            Status::permission_denied(e.to_string())
        }
    }
}

impl RouterService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req.metadata().get("authorization").map(|v| v.as_bytes());
        self.registration
            .authorize(auth)
            .map_err(registration_status)
    }
}

/// gRPC status of a route error.
pub fn route_status(e: &RouteError) -> Status {
    match e {
        RouteError::Invalid(m) => Status::invalid_argument(m.clone()),
        RouteError::NoWorkers(_) | RouteError::NoEligible(_) => Status::unavailable(e.to_string()),
        RouteError::Setup(m) => Status::internal(m.clone()),
    }
}

fn to_pb(d: Decision) -> pb::RouteResponse {
    pb::RouteResponse {
        request_id: d.request_id,
        worker_id: d.worker_id,
        endpoint: d.endpoint,
        candidates: d
            .candidates
            .into_iter()
            .map(|c| pb::Candidate {
                worker_id: c.worker_id,
                matched_blocks: Some(pb::TierBlocks {
                    gpu: c.matched_blocks.gpu,
                    host: c.matched_blocks.host,
                    disk: c.matched_blocks.disk,
                    remote: c.matched_blocks.remote,
                }),
                matched_tokens: c.matched_tokens,
                score: c.score,
            })
            .collect(),
    }
}

/// The request of a gRPC `Route` call.
pub fn from_pb(r: pb::RouteRequest) -> Result<RouteRequest, Status> {
    let input = match r.input {
        Some(pb::route_request::Input::TokenIds(t)) => Input::Tokens(t.ids),
        Some(pb::route_request::Input::Prompt(p)) => Input::Prompt(p),
        Some(pb::route_request::Input::MessagesJson(j)) => {
            let v: Vec<serde_json::Value> = serde_json::from_str(&j).map_err(|e| {
                Status::invalid_argument(format!("messages_json must be a JSON array: {e}"))
            })?;
            Input::Messages(v, ChatOptions::default())
        }
        None => {
            return Err(Status::invalid_argument(
                "one of token_ids, prompt or messages_json is required",
            ))
        }
    };
    Ok(RouteRequest {
        model: r.model,
        input,
        lora_name: r.lora_name.filter(|s| !s.is_empty()),
        cache_salt: r.cache_salt.filter(|s| !s.is_empty()),
        subset: None,
    })
}

fn spec_from_pb(w: pb::Worker) -> WorkerSpec {
    WorkerSpec {
        worker_id: w.worker_id,
        endpoint: w.endpoint,
        model: w.model,
        zmq_endpoint: w.zmq_endpoint,
        zmq_replay_endpoint: w.zmq_replay_endpoint,
        dp_ranks: w.dp_ranks.max(1),
        kvbm: w.kvbm,
        metrics_url: w.metrics_url,
        remote_group: w.remote_group,
    }
}

fn spec_to_pb(s: &WorkerSpec) -> pb::Worker {
    pb::Worker {
        worker_id: s.worker_id.clone(),
        endpoint: s.endpoint.clone(),
        model: s.model.clone(),
        zmq_endpoint: s.zmq_endpoint.clone(),
        zmq_replay_endpoint: s.zmq_replay_endpoint.clone(),
        dp_ranks: s.dp_ranks,
        kvbm: s.kvbm.clone(),
        metrics_url: s.metrics_url.clone(),
        remote_group: s.remote_group.clone(),
    }
}

#[tonic::async_trait]
impl pb::router_server::Router for RouterService {
    async fn route(
        &self,
        req: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteResponse>, Status> {
        let r = from_pb(req.into_inner())?;
        let router = self.router.clone();
        let d = tokio::task::spawn_blocking(move || router.route(&r))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| route_status(&e))?;
        Ok(Response::new(to_pb(d)))
    }

    async fn route_done(
        &self,
        req: Request<pb::RouteDoneRequest>,
    ) -> Result<Response<pb::RouteDoneResponse>, Status> {
        let id = req.into_inner().request_id;
        if self.router.done(id) {
            Ok(Response::new(pb::RouteDoneResponse {}))
        } else {
            Err(Status::not_found(format!("request {id} is not in flight")))
        }
    }

    async fn add_worker(
        &self,
        req: Request<pb::Worker>,
    ) -> Result<Response<pb::AddWorkerResponse>, Status> {
        self.authorize(&req)?;
        let spec = spec_from_pb(req.into_inner());
        spec.validate()
            .map_err(|e| Status::invalid_argument(WorkerError::Invalid(e).to_string()))?;
        self.registration
            .check(&spec)
            .map_err(registration_status)?;
        match self.router.workers.add(spec) {
            Ok(created) => Ok(Response::new(pb::AddWorkerResponse { created })),
            Err(e @ WorkerError::Invalid(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ WorkerError::Conflict(_)) => Err(Status::already_exists(e.to_string())),
        }
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self
            .router
            .workers
            .list()
            .iter()
            .map(|w| spec_to_pb(&w.spec))
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn remove_worker(
        &self,
        req: Request<pb::RemoveWorkerRequest>,
    ) -> Result<Response<pb::RemoveWorkerResponse>, Status> {
        self.authorize(&req)?;
        let id = req.into_inner().worker_id;
        let router = self.router.clone();
        let id2 = id.clone();
        let removed = tokio::task::spawn_blocking(move || router.workers.remove(&id2))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if removed {
            Ok(Response::new(pb::RemoveWorkerResponse {}))
        } else {
            Err(Status::not_found(format!("unknown worker {id:?}")))
        }
    }
}

/// `grpc.health.v1.Health`: SERVING for the empty service name and the
/// services kvrouter serves; SERVICE_UNKNOWN otherwise (NOT_FOUND on Check,
/// as the protocol says).
pub struct HealthService;

const SERVICES: [&str; 4] = [
    "",
    "kvtier.router.v1.Router",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "grpc.health.v1.Health",
];

type WatchStream = Pin<Box<dyn Stream<Item = Result<health::HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl health::health_server::Health for HealthService {
    async fn check(
        &self,
        req: Request<health::HealthCheckRequest>,
    ) -> Result<Response<health::HealthCheckResponse>, Status> {
        let s = req.into_inner().service;
        if SERVICES.contains(&s.as_str()) {
            Ok(Response::new(health::HealthCheckResponse {
                status: health::health_check_response::ServingStatus::Serving as i32,
            }))
        } else {
            Err(Status::not_found(format!("unknown service {s:?}")))
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<health::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt;
        let s = req.into_inner().service;
        let status = if SERVICES.contains(&s.as_str()) {
            health::health_check_response::ServingStatus::Serving
        } else {
            health::health_check_response::ServingStatus::ServiceUnknown
        };
        let first = futures::stream::once(async move {
            Ok(health::HealthCheckResponse {
                status: status as i32,
            })
        });
        Ok(Response::new(Box::pin(
            first.chain(futures::stream::pending()),
        )))
    }
}
