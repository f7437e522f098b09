//! Engine ZMQ ingestion against real peers: vLLM 0.32.0's own
//! `ZmqEventPublisher` (PUB + replay ROUTER) and raw pyzmq sockets for
//! malformed input. Needs `KVTIER_PYTHON` (see ingest_util).

mod ingest_util;

use std::sync::Arc;
use std::time::Duration;

use ingest_util::{free_ports, python_with_vllm, wait_until, Collect, Py};
use kvrouter::event::{EngineHash, IndexEvent, Scope, Source, Tier};
use kvrouter::ingest::decode::{bytes_hash, DecodeErrorKind};
use kvrouter::ingest::{spawn_engine, EngineSubscription, IngestMetrics};
use serde_json::json;

fn hx(i: u8) -> String {
    // a 32-byte block hash, as vLLM publishes sha256_cbor digests
    format!("{:02x}", i).repeat(32)
}

fn eh(i: u8) -> EngineHash {
    bytes_hash(&[i; 32]).expect("hash")
}

fn src(rank: u32) -> Source {
    Source {
        worker: Arc::from("w1"),
        dp_rank: rank,
    }
}

fn scope(lora: Option<&str>, group: u32) -> Scope {
    Scope {
        model: Arc::from("m"),
        lora_name: lora.map(Arc::from),
        group,
    }
}

fn stored_gpu(rank: u32, hashes: &[u8], parent: Option<u8>, tokens: Vec<u32>) -> IndexEvent {
    IndexEvent::Stored {
        source: src(rank),
        tier: Tier::Gpu,
        scope: scope(None, 0),
        hashes: hashes.iter().map(|h| eh(*h)).collect(),
        parent: parent.map(eh),
        token_ids: tokens,
        block_size: 4,
    }
}

fn ev_stored(hashes: &[u8], parent: Option<u8>, tokens: &[u32]) -> serde_json::Value {
    json!({"type": "stored", "hashes": hashes.iter().map(|h| hx(*h)).collect::<Vec<_>>(),
           "parent": parent.map(hx), "tokens": tokens, "block_size": 4})
}

fn of_rank(events: &[IndexEvent], rank: u32) -> Vec<IndexEvent> {
    events
        .iter()
        .filter(|e| match e {
            IndexEvent::Stored { source, .. }
            | IndexEvent::Removed { source, .. }
            | IndexEvent::Cleared { source, .. } => source.dp_rank == rank,
        })
        .cloned()
        .collect()
}

/// Normal stream on two DP ranks, a gap filled by replay, AllBlocksCleared,
/// an engine restart — all published by vLLM's real publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_publisher_stream_gap_clear_restart() {
    let Some(python) = python_with_vllm() else {
        return;
    };
    let _ports = ingest_util::PY_PORTS.lock().await;
    let port = free_ports(2);
    let replay = free_ports(2);
    let mut py = Py::spawn(&python, "vllm_publisher.py");
    for (id, rank) in [("a", 0), ("b", 1)] {
        py.cmd(json!({"cmd": "start", "id": id, "rank": rank,
                      "endpoint": format!("tcp://*:{port}"),
                      "replay": format!("tcp://*:{replay}")}))
            .await;
    }

    let sink = Collect::new();
    let metrics = Arc::new(IngestMetrics::new());
    let mut cfg = EngineSubscription::new("w1", "m", format!("tcp://127.0.0.1:{port}"));
    cfg.zmq_replay_endpoint = Some(format!("tcp://127.0.0.1:{replay}"));
    cfg.dp_ranks = 2;
    let handle = spawn_engine(cfg, sink.clone(), metrics.clone());
    wait_until(|| metrics.connected.get() == 2, "both ranks connected").await;

    // 1. normal stream, both ranks; rank 1 with int hashes, LoRA, CPU, group
    py.cmd(json!({"cmd": "publish", "id": "a",
                  "events": [ev_stored(&[1, 2], None, &[0, 1, 2, 3, 4, 5, 6, 7])]}))
        .await;
    py.cmd(json!({"cmd": "publish", "id": "b", "events": [
        {"type": "stored", "hashes": [5, -6], "parent": null, "tokens": [9, 9, 9, 9, 8, 8, 8, 8],
         "block_size": 4, "lora_name": "L", "medium": "CPU", "group_idx": 1}]}))
        .await;
    let got = sink.wait_n(2, "first batches").await;
    assert_eq!(
        of_rank(&got, 0),
        vec![stored_gpu(0, &[1, 2], None, (0..8).collect())]
    );
    assert_eq!(
        of_rank(&got, 1),
        vec![IndexEvent::Stored {
            source: src(1),
            tier: Tier::Host,
            scope: scope(Some("L"), 1),
            hashes: vec![EngineHash(5), EngineHash(-6i64 as u64)],
            parent: None,
            token_ids: vec![9, 9, 9, 9, 8, 8, 8, 8],
            block_size: 4,
        }]
    );

    // 2. a gap: two batches numbered and buffered for replay, never sent
    py.cmd(json!({"cmd": "drop", "on": true})).await;
    py.cmd(json!({"cmd": "publish", "events": [ev_stored(&[3], Some(2), &[10, 11, 12, 13])]}))
        .await;
    py.cmd(json!({"cmd": "publish", "events": [{"type": "removed", "hashes": [hx(1)], "medium": "GPU"}]}))
        .await;
    py.cmd(json!({"cmd": "drop", "on": false})).await;
    py.cmd(json!({"cmd": "publish", "events": [ev_stored(&[4], Some(3), &[14, 15, 16, 17])]}))
        .await;
    let got = sink.wait_n(3, "replayed batches").await;
    assert_eq!(
        got,
        vec![
            stored_gpu(0, &[3], Some(2), vec![10, 11, 12, 13]),
            IndexEvent::Removed {
                source: src(0),
                tier: Tier::Gpu,
                scope: None,
                hashes: vec![eh(1)],
            },
            stored_gpu(0, &[4], Some(3), vec![14, 15, 16, 17]),
        ]
    );
    assert!(metrics.gaps.get() >= 1);
    assert!(metrics.replays.get() >= 1);
    assert_eq!(metrics.gaps_unrecovered.get(), 0);

    // 3. AllBlocksCleared purges that rank only
    py.cmd(json!({"cmd": "publish", "events": [{"type": "cleared"}]}))
        .await;
    let got = sink.wait_n(1, "cleared").await;
    assert_eq!(
        got,
        vec![IndexEvent::Cleared {
            source: src(0),
            tier: Some(Tier::Gpu)
        }]
    );

    // 4. engine restart: a new publisher on the same ports, seq from 0
    let reconnects = metrics.reconnects.get();
    py.cmd(json!({"cmd": "stop"})).await;
    py.cmd(
        json!({"cmd": "start", "rank": 0, "endpoint": format!("tcp://*:{port}"),
                  "replay": format!("tcp://*:{replay}")}),
    )
    .await;
    wait_until(|| metrics.reconnects.get() > reconnects, "reconnect").await;
    wait_until(|| metrics.connected.get() == 2, "reconnected").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    py.cmd(json!({"cmd": "publish", "events": [ev_stored(&[7], None, &[1, 1, 1, 1])]}))
        .await;
    py.cmd(json!({"cmd": "publish", "events": [ev_stored(&[8], Some(7), &[2, 2, 2, 2])]}))
        .await;
    let got = sink.wait_n(3, "restart").await;
    assert_eq!(
        got,
        vec![
            IndexEvent::Cleared {
                source: src(0),
                tier: Some(Tier::Gpu)
            },
            stored_gpu(0, &[7], None, vec![1, 1, 1, 1]),
            stored_gpu(0, &[8], Some(7), vec![2, 2, 2, 2]),
        ]
    );
    assert_eq!(metrics.restarts.get(), 1);
    assert_eq!(metrics.decode_errors_total(), 0);

    // 5. stopping the subscription closes its connections
    handle.stop();
    wait_until(|| metrics.connected.get() == 0, "disconnect on stop").await;
    py.exit().await;
}

/// Waits up to `limit` for `sink` to hold `n` events; how long it took.
async fn within(sink: &Collect, n: usize, limit: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if sink.len() >= n {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Never blind: an idle engine's blocks, published before the router knew
/// it, reach the index within a second of subscribing, with nothing
/// published since. Two replicas agree; one restarted while the engine
/// published catches up on reconnecting, again without a new batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_at_connect_and_replicas_catch_up() {
    let Some(python) = python_with_vllm() else {
        return;
    };
    let _ports = ingest_util::PY_PORTS.lock().await;
    let port = free_ports(1);
    let replay = free_ports(1);
    let mut py = Py::spawn(&python, "vllm_publisher.py");
    py.cmd(json!({"cmd": "start", "id": "a", "rank": 0,
                  "endpoint": format!("tcp://*:{port}"),
                  "replay": format!("tcp://*:{replay}")}))
        .await;
    // Published with no subscriber: only the replay buffer keeps them.
    py.cmd(json!({"cmd": "publish", "id": "a",
                  "events": [ev_stored(&[1, 2], None, &[0, 1, 2, 3, 4, 5, 6, 7])]}))
        .await;
    py.cmd(json!({"cmd": "publish", "id": "a",
                  "events": [ev_stored(&[3], Some(2), &[8, 9, 10, 11])]}))
        .await;
    let subscribe = |sink: Arc<Collect>| {
        let mut cfg = EngineSubscription::new("w1", "m", format!("tcp://127.0.0.1:{port}"));
        cfg.zmq_replay_endpoint = Some(format!("tcp://127.0.0.1:{replay}"));
        spawn_engine(cfg, sink, Arc::new(IngestMetrics::new()))
    };
    let want = vec![
        stored_gpu(0, &[1, 2], None, (0..8).collect()),
        stored_gpu(0, &[3], Some(2), vec![8, 9, 10, 11]),
    ];
    let (one, two) = (Collect::new(), Collect::new());
    let _h1 = subscribe(one.clone());
    let h2 = subscribe(two.clone());
    for (name, sink) in [("replica 1", &one), ("replica 2", &two)] {
        let took = within(sink, 2, Duration::from_secs(1)).await;
        assert!(took.is_some(), "{name}: blind to the idle engine after 1 s");
        assert_eq!(sink.take(), want, "{name}");
    }

    // Replica 2 goes away; the engine publishes; replica 2 comes back.
    h2.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    py.cmd(json!({"cmd": "publish", "id": "a",
                  "events": [ev_stored(&[4], Some(3), &[12, 13, 14, 15])]}))
        .await;
    let four = vec![stored_gpu(0, &[4], Some(3), vec![12, 13, 14, 15])];
    assert!(within(&one, 1, Duration::from_secs(1)).await.is_some());
    assert_eq!(one.take(), four);
    let back = Collect::new();
    let _h3 = subscribe(back.clone());
    assert!(
        within(&back, 3, Duration::from_secs(1)).await.is_some(),
        "the restarted replica did not catch up within 1 s"
    );
    let mut all = want.clone();
    all.extend(four);
    assert_eq!(
        back.take(),
        all,
        "the restarted replica sees what the other one does"
    );
    py.exit().await;
}

fn msgpack_batch(events: &[u8], n: u8) -> Vec<u8> {
    // [0.0, [events...]]
    let mut o = vec![0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x90 | n];
    o.extend_from_slice(events);
    o
}

/// `["BlockStored", [h], nil, [t0..t3], 4]` with small-int hash and tokens.
fn mp_stored(h: u8, tokens: [u8; 4]) -> Vec<u8> {
    let mut o = vec![0x95, 0xab];
    o.extend_from_slice(b"BlockStored");
    o.extend_from_slice(&[0x91, h, 0xc0, 0x94]);
    o.extend_from_slice(&tokens);
    o.push(4);
    o
}

/// Whether an event arrives within 500 ms.
async fn landed(sink: &Collect) -> bool {
    for _ in 0..25 {
        if sink.len() > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn frames(seq: u64, payload: &[u8]) -> serde_json::Value {
    json!({"cmd": "send", "frames": ["", hexs(&seq.to_be_bytes()), hexs(payload)]})
}

/// Malformed frames from a raw pyzmq PUB: counted by kind, never applied,
/// the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_counted_and_skipped() {
    let Some(python) = python_with_vllm() else {
        return;
    };
    let _ports = ingest_util::PY_PORTS.lock().await;
    let port = free_ports(1);
    let mut py = Py::spawn(&python, "raw_pub.py");
    py.cmd(json!({"cmd": "bind", "endpoint": format!("tcp://127.0.0.1:{port}")}))
        .await;
    let sink = Collect::new();
    let metrics = Arc::new(IngestMetrics::new());
    let mut cfg = EngineSubscription::new("w1", "m", format!("tcp://127.0.0.1:{port}"));
    cfg.options.max_message_bytes = 1 << 20;
    let _handle = spawn_engine(cfg, sink.clone(), metrics.clone());
    wait_until(|| metrics.connected.get() == 1, "connected").await;
    // the PUB learns the subscription asynchronously: send until one lands
    for _ in 0..60 {
        py.cmd(frames(0, &msgpack_batch(&mp_stored(1, [1, 2, 3, 4]), 1)))
            .await;
        if landed(&sink).await {
            break;
        }
    }
    wait_until(|| sink.len() == 1, "first batch").await;
    sink.take();

    // wrong frame counts and a bad seq frame
    py.cmd(json!({"cmd": "send", "frames": ["00"]})).await;
    py.cmd(json!({"cmd": "send", "frames": ["", "", "", "", ""]}))
        .await;
    py.cmd(json!({"cmd": "send", "frames": ["", "0001", "90"]}))
        .await;
    // garbage msgpack (seq 1), then a batch with one unknown event, one
    // stored whose tokens do not fill its block, and one good removal (seq 2)
    py.cmd(frames(1, b"\xc1\xc1\xc1")).await;
    let mut evs = vec![0x91, 0xa7];
    evs.extend_from_slice(b"Unknown");
    let mut bad = vec![0x95, 0xab];
    bad.extend_from_slice(b"BlockStored");
    bad.extend_from_slice(&[0x91, 2, 0xc0, 0x92, 1, 2, 4]);
    evs.extend(bad);
    let mut rm = vec![0x93, 0xac];
    rm.extend_from_slice(b"BlockRemoved");
    rm.extend_from_slice(&[0x91, 1, 0xc0]);
    evs.extend(rm);
    py.cmd(frames(2, &msgpack_batch(&evs, 3))).await;
    // a message over the 1 MiB limit (seq 3, lost), then seq 4
    py.cmd(json!({"cmd": "send_huge", "seq": 3, "bytes": 2 << 20}))
        .await;
    py.cmd(frames(4, &msgpack_batch(&mp_stored(5, [5, 6, 7, 8]), 1)))
        .await;

    let got = sink.wait_n(2, "good events").await;
    assert_eq!(
        got,
        vec![
            IndexEvent::Removed {
                source: src(0),
                tier: Tier::Gpu,
                scope: None,
                hashes: vec![EngineHash(1)],
            },
            IndexEvent::Stored {
                source: src(0),
                tier: Tier::Gpu,
                scope: scope(None, 0),
                hashes: vec![EngineHash(5)],
                parent: None,
                token_ids: vec![5, 6, 7, 8],
                block_size: 4,
            },
        ]
    );
    let k = |kind| metrics.decode_errors_of(kind);
    assert_eq!(k(DecodeErrorKind::Frames), 2);
    assert_eq!(k(DecodeErrorKind::Seq), 1);
    assert_eq!(k(DecodeErrorKind::Msgpack), 1);
    assert_eq!(k(DecodeErrorKind::UnknownEvent), 1);
    assert_eq!(k(DecodeErrorKind::TokenCount), 1);
    assert_eq!(k(DecodeErrorKind::TooLarge), 1);
    assert_eq!(metrics.gaps.get(), 1);
    assert_eq!(metrics.gaps_unrecovered.get(), 1);
    assert_eq!(metrics.restarts.get(), 0);

    // bind mode: a publisher connecting to the router's SUB, rank from the batch
    let bport = free_ports(1);
    let bsink = Collect::new();
    let cfg = EngineSubscription::new("w1", "m", format!("bind:tcp://127.0.0.1:{bport}"));
    let _bound = spawn_engine(cfg, bsink.clone(), metrics.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    py.cmd(json!({"cmd": "connect", "endpoint": format!("tcp://127.0.0.1:{bport}")}))
        .await;
    // [0.0, [stored], 3]
    let mut b = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x91];
    b.extend(mp_stored(9, [1, 1, 2, 2]));
    b.push(3);
    for _ in 0..60 {
        py.cmd(frames(0, &b)).await;
        if landed(&bsink).await {
            break;
        }
    }
    let got = bsink.take();
    assert!(!got.is_empty());
    match &got[0] {
        IndexEvent::Stored { source, hashes, .. } => {
            assert_eq!(source, &src(3));
            assert_eq!(hashes, &vec![EngineHash(9)]);
        }
        other => panic!("{other:?}"),
    }
    py.exit().await;
}
