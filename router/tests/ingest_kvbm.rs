//! kvbm ingestion against a real tonic server over a real Unix socket (and
//! TCP) that implements `SubscribeEvents` as kvtier.v1 specifies it: replay
//! ring, snapshots, incarnations. (An end-to-end test against the `kvbm`
//! binary belongs to tests/ once both exist.)

mod ingest_util;

use std::pin::Pin;
use std::sync::Arc;

use ingest_util::{wait_until, Collect};
use kvrouter::event::{EngineHash, IndexEvent, Scope, Source, Tier};
use kvrouter::ingest::decode::{bytes_hash, DecodeErrorKind};
use kvrouter::ingest::{spawn_kvbm, IngestMetrics, KvbmSubscription};
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::kvbm_server::{Kvbm, KvbmServer};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct FakeState {
    incarnation: String,
    ring: Vec<pb::EventBatch>,
    snapshot: Vec<pb::Event>,
    live: Vec<mpsc::Sender<Result<pb::EventBatch, Status>>>,
    requests: Vec<(u64, String)>,
}

#[derive(Default, Clone)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn last_seq(st: &FakeState) -> u64 {
        st.ring.last().map(|b| b.seq).unwrap_or(0)
    }

    /// Appends a batch to the ring; sends it live unless `ring_only`.
    fn publish(&self, events: Vec<pb::Event>, ring_only: bool) {
        let mut st = self.0.lock();
        let b = pb::EventBatch {
            incarnation: st.incarnation.clone(),
            seq: Self::last_seq(&st) + 1,
            events,
            snapshot: false,
        };
        st.ring.push(b.clone());
        if !ring_only {
            st.live.retain(|tx| tx.try_send(Ok(b.clone())).is_ok());
        }
    }

    /// Ends every open stream (the client must reconnect).
    fn kill(&self) {
        self.0.lock().live.clear();
    }

    fn restart(&self, incarnation: &str, snapshot: Vec<pb::Event>) {
        let mut st = self.0.lock();
        st.incarnation = incarnation.to_owned();
        st.ring.clear();
        st.snapshot = snapshot;
        st.live.clear();
    }

    fn requests(&self) -> Vec<(u64, String)> {
        self.0.lock().requests.clone()
    }
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Kvbm for Fake {
    async fn register_namespace(
        &self,
        _: Request<pb::RegisterNamespaceRequest>,
    ) -> Res<pb::RegisterNamespaceResponse> {
        Err(Status::unimplemented("register_namespace"))
    }
    async fn list_namespaces(
        &self,
        _: Request<pb::ListNamespacesRequest>,
    ) -> Res<pb::ListNamespacesResponse> {
        Err(Status::unimplemented("list_namespaces"))
    }
    async fn put(&self, _: Request<pb::PutRequest>) -> Res<pb::PutResponse> {
        Err(Status::unimplemented("put"))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Res<pb::GetResponse> {
        Err(Status::unimplemented("get"))
    }
    async fn lookup(&self, _: Request<pb::LookupRequest>) -> Res<pb::LookupResponse> {
        Err(Status::unimplemented("lookup"))
    }
    async fn prefetch(&self, _: Request<pb::PrefetchRequest>) -> Res<pb::PrefetchResponse> {
        Err(Status::unimplemented("prefetch"))
    }
    async fn evict(&self, _: Request<pb::EvictRequest>) -> Res<pb::EvictResponse> {
        Err(Status::unimplemented("evict"))
    }
    async fn clear(&self, _: Request<pb::ClearRequest>) -> Res<pb::ClearResponse> {
        Err(Status::unimplemented("clear"))
    }
    async fn stats(&self, _: Request<pb::StatsRequest>) -> Res<pb::StatsResponse> {
        Err(Status::unimplemented("stats"))
    }
    async fn sync(&self, _: Request<pb::SyncRequest>) -> Res<pb::SyncResponse> {
        Err(Status::unimplemented("sync"))
    }
    async fn reserve(&self, _: Request<pb::ReserveRequest>) -> Res<pb::ReserveResponse> {
        Err(Status::unimplemented("reserve"))
    }
    async fn commit(&self, _: Request<pb::CommitRequest>) -> Res<pb::CommitResponse> {
        Err(Status::unimplemented("commit"))
    }
    async fn abort(&self, _: Request<pb::AbortRequest>) -> Res<pb::AbortResponse> {
        Err(Status::unimplemented("abort"))
    }
    async fn acquire(&self, _: Request<pb::AcquireRequest>) -> Res<pb::AcquireResponse> {
        Err(Status::unimplemented("acquire"))
    }
    async fn release(&self, _: Request<pb::ReleaseRequest>) -> Res<pb::ReleaseResponse> {
        Err(Status::unimplemented("release"))
    }

    type SubscribeEventsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::EventBatch, Status>> + Send>>;

    async fn subscribe_events(
        &self,
        req: Request<pb::SubscribeEventsRequest>,
    ) -> Res<Self::SubscribeEventsStream> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let mut st = self.0.lock();
        st.requests.push((req.from_seq, req.incarnation.clone()));
        let first = st.ring.first().map(|b| b.seq).unwrap_or(1);
        let replayable = req.incarnation == st.incarnation
            && req.from_seq >= first
            && req.from_seq <= Fake::last_seq(&st) + 1;
        if replayable {
            for b in st.ring.iter().filter(|b| b.seq >= req.from_seq) {
                let _ = tx.try_send(Ok(b.clone()));
            }
        } else {
            let mut events = vec![cleared(pb::Tier::Unspecified)];
            events.extend(st.snapshot.clone());
            let _ = tx.try_send(Ok(pb::EventBatch {
                incarnation: st.incarnation.clone(),
                seq: Fake::last_seq(&st),
                events,
                snapshot: true,
            }));
        }
        st.live.push(tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn stored(tier: pb::Tier, keys: &[&[u8]], parent: &[u8], tokens: Vec<u32>) -> pb::Event {
    pb::Event {
        kind: Some(pb::event::Kind::Stored(pb::BlockStored {
            tier: tier as i32,
            namespace: "ns".into(),
            model: "m".into(),
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            parent: parent.to_vec(),
            token_ids: tokens,
            tokens_per_block: 2,
        })),
    }
}

fn removed(tier: pb::Tier, keys: &[&[u8]]) -> pb::Event {
    pb::Event {
        kind: Some(pb::event::Kind::Removed(pb::BlockRemoved {
            tier: tier as i32,
            namespace: "ns".into(),
            keys: keys.iter().map(|k| k.to_vec()).collect(),
        })),
    }
}

fn cleared(tier: pb::Tier) -> pb::Event {
    pb::Event {
        kind: Some(pb::event::Kind::Cleared(pb::TierCleared {
            tier: tier as i32,
        })),
    }
}

fn src() -> Source {
    Source {
        worker: Arc::from("node1"),
        dp_rank: 0,
    }
}

fn k(b: &[u8]) -> EngineHash {
    bytes_hash(b).expect("key")
}

fn ix_stored(tier: Tier, keys: &[&[u8]], parent: Option<&[u8]>, tokens: Vec<u32>) -> IndexEvent {
    IndexEvent::Stored {
        source: src(),
        tier,
        scope: Scope {
            model: Arc::from("m"),
            lora_name: None,
            group: 0,
        },
        hashes: keys.iter().map(|x| k(x)).collect(),
        parent: parent.map(k),
        token_ids: tokens,
        block_size: 2,
    }
}

fn ix_clear(tier: Tier) -> IndexEvent {
    IndexEvent::Cleared {
        source: src(),
        tier: Some(tier),
    }
}

fn clear_kvbm_tiers() -> Vec<IndexEvent> {
    vec![
        ix_clear(Tier::Host),
        ix_clear(Tier::Disk),
        ix_clear(Tier::Remote),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvbm_stream_snapshot_replay_gap_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("kvbm.sock");
    let fake = Fake::default();
    fake.restart(
        "I1",
        vec![stored(pb::Tier::Host, &[b"k1"], b"", vec![1, 2])],
    );
    fake.publish(
        vec![stored(pb::Tier::Host, &[b"k1"], b"", vec![1, 2])],
        true,
    );
    fake.publish(
        vec![stored(pb::Tier::Disk, &[b"k2"], b"k1", vec![3, 4])],
        true,
    );
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind unix");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvbmServer::new(fake.clone()))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );

    let sink = Collect::new();
    let metrics = Arc::new(IngestMetrics::new());
    let cfg = KvbmSubscription::new("node1", format!("unix:{}", sock.display()));
    let handle = spawn_kvbm(cfg, sink.clone(), metrics.clone());

    // 1. from 0: a snapshot (it restates content after a clear)
    let got = sink.wait_n(4, "snapshot").await;
    let mut want = clear_kvbm_tiers();
    want.push(ix_stored(Tier::Host, &[b"k1"], None, vec![1, 2]));
    assert_eq!(got, want);
    assert_eq!(fake.requests(), vec![(0, String::new())]);

    // 2. live
    fake.publish(vec![removed(pb::Tier::Host, &[b"k1"])], false);
    let got = sink.wait_n(1, "live").await;
    assert_eq!(
        got,
        vec![IndexEvent::Removed {
            source: src(),
            tier: Tier::Host,
            scope: None,
            hashes: vec![k(b"k1")],
        }]
    );

    // 3. the stream breaks: resume from last + 1 with the incarnation
    fake.kill();
    fake.publish(vec![cleared(pb::Tier::Disk)], true);
    let got = sink.wait_n(1, "resumed").await;
    assert_eq!(got, vec![ix_clear(Tier::Disk)]);
    assert_eq!(fake.requests().last(), Some(&(4, "I1".to_owned())));
    assert_eq!(metrics.reconnects.get(), 1);

    // 4. a gap on the live stream: resubscribe from the missing seq
    fake.publish(
        vec![stored(pb::Tier::Remote, &[b"k5"], b"", vec![5, 5])],
        true,
    );
    fake.publish(
        vec![stored(pb::Tier::Remote, &[b"k6"], b"k5", vec![6, 6])],
        false,
    );
    let got = sink.wait_n(2, "gap replay").await;
    assert_eq!(
        got,
        vec![
            ix_stored(Tier::Remote, &[b"k5"], None, vec![5, 5]),
            ix_stored(Tier::Remote, &[b"k6"], Some(b"k5"), vec![6, 6]),
        ]
    );
    assert_eq!(metrics.gaps.get(), 1);
    assert_eq!(fake.requests().last(), Some(&(5, "I1".to_owned())));

    // 5. bad events are counted and skipped, the good one goes through
    fake.publish(
        vec![
            stored(pb::Tier::Unspecified, &[b"x"], b"", vec![1, 1]),
            stored(pb::Tier::Host, &[&[7u8; 40]], b"", vec![1, 1]),
            stored(pb::Tier::Host, &[b"y"], b"", vec![1, 1, 1]),
            pb::Event { kind: None },
            stored(pb::Tier::Host, &[b"z"], b"", vec![2, 2]),
        ],
        false,
    );
    let got = sink.wait_n(1, "after bad events").await;
    assert_eq!(got, vec![ix_stored(Tier::Host, &[b"z"], None, vec![2, 2])]);
    assert_eq!(metrics.decode_errors_of(DecodeErrorKind::Proto), 2);
    assert_eq!(metrics.decode_errors_of(DecodeErrorKind::Hash), 1);
    assert_eq!(metrics.decode_errors_of(DecodeErrorKind::TokenCount), 1);

    // 6. the daemon restarts: new incarnation → purge, then its snapshot
    fake.restart(
        "I2",
        vec![stored(pb::Tier::Remote, &[b"k9"], b"", vec![9, 9])],
    );
    let got = sink.wait_n(4, "new incarnation").await;
    let mut want = clear_kvbm_tiers(); // the snapshot's TierCleared{UNSPECIFIED}
    want.push(ix_stored(Tier::Remote, &[b"k9"], None, vec![9, 9]));
    assert_eq!(got, want);
    assert_eq!(metrics.restarts.get(), 1);
    assert_eq!(fake.requests().last(), Some(&(8, "I1".to_owned())));

    handle.stop();
    wait_until(|| metrics.connected.get() == 0, "disconnect on stop").await;

    // the same over TCP
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp");
    let addr = tcp.local_addr().expect("addr");
    let tcp_server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvbmServer::new(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(tcp)),
    );
    let sink2 = Collect::new();
    let _h = spawn_kvbm(
        KvbmSubscription::new("node1", format!("http://{addr}")),
        sink2.clone(),
        metrics.clone(),
    );
    let got = sink2.wait_n(4, "tcp snapshot").await;
    assert_eq!(
        got.last(),
        Some(&ix_stored(Tier::Remote, &[b"k9"], None, vec![9, 9]))
    );
    server.abort();
    tcp_server.abort();
}
