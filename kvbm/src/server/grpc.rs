//! The `kvtier.v1.Kvbm` gRPC service over the store.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kvtier_proto::v1::{self as pb, kvbm_server::Kvbm};
use tokio::sync::broadcast::error::RecvError;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::events::Resume;
use crate::store::{Session, SlotGrant, Store};

pub struct Service {
    store: Arc<Store>,
}

impl Service {
    pub fn new(store: Arc<Store>) -> Service {
        Service { store }
    }
}

fn slots(grants: Vec<SlotGrant>) -> Vec<pb::Slot> {
    grants
        .into_iter()
        .map(|g| pb::Slot {
            key: g.key,
            offset: g.offset,
            length: g.length,
        })
        .collect()
}

/// The claim a request makes to session `id`: the calling process, as the
/// kernel reports it on the Unix socket. Over TCP no caller can own a
/// session (sessions belong to pool-socket connections, which are local).
fn session<T>(req: &Request<T>, id: u64) -> Result<Session, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied(
                "sessions are usable only over the Unix socket, by the process \
                 that opened them on the pool socket",
            )
        })?;
    Ok(Session {
        id,
        owner: super::owner_of(&cred),
    })
}

fn tier(t: i32) -> Result<pb::Tier, Status> {
    pb::Tier::try_from(t).map_err(|_| Status::invalid_argument(format!("unknown tier {t}")))
}

/// Snapshot events per batch: keeps batches well under the message limit.
const SNAPSHOT_BATCH: usize = 512;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::EventBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Kvbm for Service {
    async fn register_namespace(
        &self,
        req: Request<pb::RegisterNamespaceRequest>,
    ) -> Result<Response<pb::RegisterNamespaceResponse>, Status> {
        let r = req.into_inner();
        let ns = self
            .store
            .register_namespace(&r.name, r.block_bytes, r.layout)?;
        Ok(Response::new(pb::RegisterNamespaceResponse {
            namespace: Some(ns.to_proto()),
        }))
    }

    async fn list_namespaces(
        &self,
        _: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: self
                .store
                .namespaces()
                .iter()
                .map(|n| n.to_proto())
                .collect(),
        }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.into_inner();
        let meta = r
            .block
            .ok_or_else(|| Status::invalid_argument("put without a block"))?;
        let stored = self.store.put(&r.namespace, meta, &r.data)?;
        Ok(Response::new(pb::PutResponse { stored }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let (data, t) = self.store.get(&r.namespace, &r.key).await?;
        Ok(Response::new(pb::GetResponse {
            data,
            served_from: t as i32,
        }))
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.store.lookup(&r.namespace, &r.keys)?))
    }

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchResponse>, Status> {
        let r = req.into_inner();
        let in_host = self.store.prefetch(&r.namespace, &r.keys).await?;
        Ok(Response::new(pb::PrefetchResponse { in_host }))
    }

    async fn evict(
        &self,
        req: Request<pb::EvictRequest>,
    ) -> Result<Response<pb::EvictResponse>, Status> {
        let r = req.into_inner();
        let evicted = self.store.evict(&r.namespace, &r.keys)?;
        Ok(Response::new(pb::EvictResponse { evicted }))
    }

    async fn clear(
        &self,
        req: Request<pb::ClearRequest>,
    ) -> Result<Response<pb::ClearResponse>, Status> {
        let req = req.into_inner();
        let t = tier(req.tier)?;
        let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let removed = self.store.clear(t, ns)?;
        Ok(Response::new(pb::ClearResponse { removed }))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.store.stats()))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let store = self.store.clone();
        let req = req.into_inner();
        let report = tokio::task::spawn_blocking(move || {
            store.sync(req.retry_dropped, req.list_not_durable)
        })
        .await
        .map_err(|e| Status::internal(format!("sync task: {e}")))??;
        Ok(Response::new(pb::SyncResponse {
            durable_blocks: report.durable_blocks,
            not_durable: report.not_durable,
            lost: report.lost,
            not_durable_blocks: report
                .not_durable_blocks
                .into_iter()
                .map(|(namespace, key)| pb::BlockName { namespace, key })
                .collect(),
        }))
    }

    type SubscribeEventsStream = EventStream;

    async fn subscribe_events(
        &self,
        req: Request<pb::SubscribeEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        let (mut rx, resume) = self.store.events().subscribe(r.from_seq, &r.incarnation);
        let store = self.store.clone();
        let incarnation = store.events().incarnation().to_string();
        let stream = async_stream(move |tx| async move {
            let mut last = match resume {
                Resume::Replay(batches) => {
                    let mut last = r.from_seq.saturating_sub(1);
                    for b in batches {
                        last = b.seq;
                        if tx.send(Ok((*b).clone())).await.is_err() {
                            return;
                        }
                    }
                    last
                }
                Resume::Snapshot { seq } => {
                    let events = {
                        let store = store.clone();
                        match tokio::task::spawn_blocking(move || store.snapshot()).await {
                            Ok(e) => e,
                            Err(_) => return,
                        }
                    };
                    for chunk in events.chunks(SNAPSHOT_BATCH) {
                        let batch = pb::EventBatch {
                            incarnation: incarnation.clone(),
                            seq,
                            events: chunk
                                .iter()
                                .cloned()
                                .map(|k| pb::Event { kind: Some(k) })
                                .collect(),
                            snapshot: true,
                        };
                        if tx.send(Ok(batch)).await.is_err() {
                            return;
                        }
                    }
                    seq
                }
            };
            loop {
                match rx.recv().await {
                    Ok(b) if b.seq <= last => continue,
                    Ok(b) => {
                        last = b.seq;
                        if tx.send(Ok((*b).clone())).await.is_err() {
                            return;
                        }
                    }
                    // Fell behind the live channel: end the stream; the
                    // subscriber resumes from last+1 (replay ring or snapshot).
                    Err(RecvError::Lagged(_)) => {
                        let _ = tx
                            .send(Err(Status::aborted(format!(
                                "subscriber fell behind; resume from {}",
                                last + 1
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let r = req.into_inner();
        let grants = self.store.reserve(s, &r.namespace, r.blocks)?;
        Ok(Response::new(pb::ReserveResponse {
            slots: slots(grants),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let r = req.into_inner();
        let committed = self.store.commit(s, &r.namespace, &r.keys)?;
        Ok(Response::new(pb::CommitResponse { committed }))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let r = req.into_inner();
        let aborted = self.store.abort(s, &r.namespace, &r.keys)?;
        Ok(Response::new(pb::AbortResponse { aborted }))
    }

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let r = req.into_inner();
        let (lease, grants) = self.store.acquire(s, &r.namespace, &r.keys).await?;
        Ok(Response::new(pb::AcquireResponse {
            lease,
            slots: slots(grants),
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let r = req.into_inner();
        self.store.release(s, r.lease)?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}

/// A stream fed by a task through a bounded channel (back-pressure on slow
/// subscribers instead of unbounded buffering).
fn async_stream<F, Fut>(f: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::EventBatch, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
