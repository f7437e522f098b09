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
use crate::tenant::Principal;

pub struct Service {
    store: Arc<Store>,
}

impl Service {
    pub fn new(store: Arc<Store>) -> Service {
        Service { store }
    }

    /// Who sent `req`: on TCP, what its credentials made it (set by the
    /// listener's authentication, see `server::serve`); on the Unix socket,
    /// the tenant of the peer's user or group, else the operator.
    fn principal<T>(&self, req: &Request<T>) -> Principal {
        if let Some(p) = req.extensions().get::<Principal>() {
            return p.clone();
        }
        match req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
        {
            Some(cred) => self.store.tenants().of_peer(cred.uid(), cred.gid()),
            // TCP without credentials configured: the operator (a warning
            // at start-up says so when the port is beyond loopback).
            None => Principal::Operator,
        }
    }
}

/// The events of `batch` that `who` may see, under the names it knows.
pub fn visible(who: &Principal, mut batch: pb::EventBatch) -> pb::EventBatch {
    if who.is_operator() {
        return batch;
    }
    batch.events.retain_mut(|e| {
        let name = match &mut e.kind {
            Some(pb::event::Kind::Stored(s)) => &mut s.namespace,
            Some(pb::event::Kind::Removed(r)) => &mut r.namespace,
            // A tier cleared for everyone was cleared for this tenant too.
            Some(pb::event::Kind::Cleared(_)) => return true,
            None => return false,
        };
        match who.sees(name).map(str::to_string) {
            Some(mine) => {
                *name = mine;
                true
            }
            None => false,
        }
    });
    batch
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
        let who = self.principal(&req);
        let r = req.into_inner();
        let ns = self
            .store
            .register_namespace(&who.namespace(&r.name), r.block_bytes, r.layout)?;
        let mut ns = ns.to_proto();
        ns.name = r.name;
        Ok(Response::new(pb::RegisterNamespaceResponse {
            namespace: Some(ns),
        }))
    }

    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let who = self.principal(&req);
        Ok(Response::new(pb::ListNamespacesResponse {
            namespaces: self
                .store
                .namespaces()
                .iter()
                .filter_map(|n| {
                    let name = who.sees(&n.name)?.to_string();
                    Some(pb::Namespace {
                        name,
                        ..n.to_proto()
                    })
                })
                .collect(),
        }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let who = self.principal(&req);
        let r = req.into_inner();
        let meta = r
            .block
            .ok_or_else(|| Status::invalid_argument("put without a block"))?;
        let stored = self
            .store
            .put(&who.namespace(&r.namespace), meta, &r.data)?;
        Ok(Response::new(pb::PutResponse { stored }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let who = self.principal(&req);
        let r = req.into_inner();
        let (data, t) = self.store.get(&who.namespace(&r.namespace), &r.key).await?;
        Ok(Response::new(pb::GetResponse {
            data,
            served_from: t as i32,
        }))
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let who = self.principal(&req);
        let r = req.into_inner();
        Ok(Response::new(
            self.store.lookup(&who.namespace(&r.namespace), &r.keys)?,
        ))
    }

    async fn prefetch(
        &self,
        req: Request<pb::PrefetchRequest>,
    ) -> Result<Response<pb::PrefetchResponse>, Status> {
        let who = self.principal(&req);
        let r = req.into_inner();
        let in_host = self
            .store
            .prefetch(&who.namespace(&r.namespace), &r.keys)
            .await?;
        Ok(Response::new(pb::PrefetchResponse { in_host }))
    }

    async fn evict(
        &self,
        req: Request<pb::EvictRequest>,
    ) -> Result<Response<pb::EvictResponse>, Status> {
        let who = self.principal(&req);
        let r = req.into_inner();
        let evicted = self.store.evict(&who.namespace(&r.namespace), &r.keys)?;
        Ok(Response::new(pb::EvictResponse { evicted }))
    }

    async fn clear(
        &self,
        req: Request<pb::ClearRequest>,
    ) -> Result<Response<pb::ClearResponse>, Status> {
        let who = self.principal(&req);
        let req = req.into_inner();
        let t = tier(req.tier)?;
        let removed = if !req.namespace.is_empty() {
            self.store.clear(t, Some(&who.namespace(&req.namespace)))?
        } else if who.is_operator() {
            self.store.clear(t, None)?
        } else {
            // A tenant's "everything" is every namespace of its own.
            let mut removed = 0;
            for ns in self.store.namespaces() {
                if who.sees(&ns.name).is_some() {
                    removed += self.store.clear(t, Some(&ns.name))?;
                }
            }
            removed
        };
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
        let who = self.principal(&req);
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
                .filter_map(|(namespace, key)| {
                    let namespace = who.sees(&namespace)?.to_string();
                    Some(pb::BlockName { namespace, key })
                })
                .collect(),
        }))
    }

    type SubscribeEventsStream = EventStream;

    async fn subscribe_events(
        &self,
        req: Request<pb::SubscribeEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let who = self.principal(&req);
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
                        if tx.send(Ok(visible(&who, (*b).clone()))).await.is_err() {
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
                        let batch = visible(
                            &who,
                            pb::EventBatch {
                                incarnation: incarnation.clone(),
                                seq,
                                events: chunk
                                    .iter()
                                    .cloned()
                                    .map(|k| pb::Event { kind: Some(k) })
                                    .collect(),
                                snapshot: true,
                            },
                        );
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
                        if tx.send(Ok(visible(&who, (*b).clone()))).await.is_err() {
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
        let who = self.principal(&req);
        let r = req.into_inner();
        let grants = self
            .store
            .reserve(s, &who.namespace(&r.namespace), r.blocks)?;
        Ok(Response::new(pb::ReserveResponse {
            slots: slots(grants),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let who = self.principal(&req);
        let r = req.into_inner();
        let committed = self
            .store
            .commit(s, &who.namespace(&r.namespace), &r.keys)?;
        Ok(Response::new(pb::CommitResponse { committed }))
    }

    async fn abort(
        &self,
        req: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let who = self.principal(&req);
        let r = req.into_inner();
        let aborted = self.store.abort(s, &who.namespace(&r.namespace), &r.keys)?;
        Ok(Response::new(pb::AbortResponse { aborted }))
    }

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let s = session(&req, req.get_ref().session)?;
        let who = self.principal(&req);
        let r = req.into_inner();
        let (lease, grants, from_disk) = self
            .store
            .acquire(s, &who.namespace(&r.namespace), &r.keys)
            .await?;
        Ok(Response::new(pb::AcquireResponse {
            lease,
            slots: slots(grants),
            from_disk,
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
