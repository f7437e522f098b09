//! Routing decisions over the real HTTP socket of an in-process router whose
//! index is fed through its `EventSink`: prefix affinity, tiers, shared
//! remote, cache_salt, Removed / Cleared, worker deletion purging blocks.

mod api_util;

use std::sync::Arc;

use api_util::{http, json};
use kvrouter::config::Config;
use kvrouter::event::{EngineHash, EventSink, IndexEvent, Scope, Source, Tier};
use kvrouter::workers::WorkerSpec;

fn worker(id: &str, group: Option<&str>) -> WorkerSpec {
    WorkerSpec {
        worker_id: id.into(),
        endpoint: format!("{id}.local:8000"),
        model: "m".into(),
        zmq_endpoint: None,
        zmq_replay_endpoint: None,
        dp_ranks: 1,
        kvbm: None,
        metrics_url: None,
        remote_group: group.map(str::to_string),
    }
}

fn stored(w: &str, rank: u32, tier: Tier, first_hash: u64, tokens: &[u32]) -> IndexEvent {
    IndexEvent::Stored {
        source: Source {
            worker: Arc::from(w),
            dp_rank: rank,
        },
        tier,
        scope: Scope {
            model: Arc::from("m"),
            lora_name: None,
            group: 0,
        },
        hashes: (0..(tokens.len() / 16) as u64)
            .map(|i| EngineHash(first_hash + i))
            .collect(),
        parent: None,
        token_ids: tokens.to_vec(),
        block_size: 16,
    }
}

fn route(addr: std::net::SocketAddr, tokens: &[u32]) -> serde_json::Value {
    let body = serde_json::json!({"model": "m", "token_ids": tokens}).to_string();
    let (s, b) = http(addr, "POST", "/v1/route", Some(&body));
    assert_eq!(s, 200, "{b}");
    let d = json(&b);
    let id = d["request_id"].as_u64().expect("id");
    assert_eq!(
        http(addr, "POST", &format!("/v1/route/{id}/done"), None).0,
        204
    );
    d
}

fn cand<'a>(d: &'a serde_json::Value, w: &str) -> &'a serde_json::Value {
    d["candidates"]
        .as_array()
        .and_then(|c| c.iter().find(|x| x["worker_id"] == w))
        .expect("candidate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_the_index() {
    let cfg = Config {
        http: "127.0.0.1:0".into(),
        grpc: "127.0.0.1:0".into(),
        workers: vec![
            worker("a", Some("s3")),
            worker("b", Some("s3")),
            worker("c", None),
        ],
        ..Config::default()
    };
    let running = kvrouter::api::start(cfg).await.expect("start");
    let addr = running.http_addr;
    let index = running.router.index.clone();
    let prompt: Vec<u32> = (0..1024).collect();

    // b holds the first 32 blocks on GPU: b wins
    index.apply(stored("b", 0, Tier::Gpu, 100, &prompt[..512]));
    let d = tokio::task::spawn_blocking({
        let p = prompt.clone();
        move || route(addr, &p)
    })
    .await
    .expect("join");
    assert_eq!(d["worker_id"], "b");
    assert_eq!(cand(&d, "b")["matched_blocks"]["gpu"], 32);
    assert_eq!(cand(&d, "b")["matched_tokens"], 512);
    assert_eq!(cand(&d, "a")["matched_blocks"]["gpu"], 0);

    // a's kvbm holds all 64 blocks in host memory: a wins (onboard beats
    // recomputing 512 tokens); the shared remote store of a's kvbm counts
    // for b too but not for c
    index.apply(stored("a", 0, Tier::Host, 500, &prompt));
    index.apply(stored("a", 0, Tier::Remote, 900, &prompt));
    let d = tokio::task::spawn_blocking({
        let p = prompt.clone();
        move || route(addr, &p)
    })
    .await
    .expect("join");
    assert_eq!(d["worker_id"], "a", "{d}");
    assert_eq!(cand(&d, "a")["matched_blocks"]["host"], 64);
    assert_eq!(cand(&d, "b")["matched_blocks"]["gpu"], 32);
    assert_eq!(cand(&d, "b")["matched_blocks"]["remote"], 32);
    assert_eq!(cand(&d, "c")["matched_tokens"], 0);

    // a salted request matches nothing stored without that salt
    let body =
        serde_json::json!({"model": "m", "token_ids": prompt, "cache_salt": "tenant"}).to_string();
    let (s, b) = tokio::task::spawn_blocking(move || http(addr, "POST", "/v1/route", Some(&body)))
        .await
        .expect("join");
    assert_eq!(s, 200);
    assert!(json(&b)["candidates"]
        .as_array()
        .is_some_and(|c| c.iter().all(|x| x["matched_tokens"] == 0)));

    // Removed by engine hash cuts a's host chain at block 10; Cleared drops
    // the remote tier
    index.apply(IndexEvent::Removed {
        source: Source {
            worker: Arc::from("a"),
            dp_rank: 0,
        },
        tier: Tier::Host,
        scope: None,
        hashes: vec![EngineHash(510)],
    });
    index.apply(IndexEvent::Cleared {
        source: Source {
            worker: Arc::from("a"),
            dp_rank: 0,
        },
        tier: Some(Tier::Remote),
    });
    // b's 32 GPU blocks beat a's 10 host blocks once loads are equal: b's
    // backlog from the first route (512 tokens, 51 ms) has drained by now,
    // and a and b each have one request in flight.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let d = tokio::task::spawn_blocking({
        let p = prompt.clone();
        move || route(addr, &p)
    })
    .await
    .expect("join");
    assert_eq!(cand(&d, "a")["matched_blocks"]["host"], 10);
    assert_eq!(cand(&d, "a")["matched_blocks"]["remote"], 0);
    assert_eq!(cand(&d, "b")["matched_blocks"]["remote"], 0);
    assert_eq!(d["worker_id"], "b", "{d}");

    // deleting b purges its blocks
    let before = index.holdings();
    let (s, _) = tokio::task::spawn_blocking(move || http(addr, "DELETE", "/v1/workers/b", None))
        .await
        .expect("join");
    assert_eq!(s, 204);
    assert_eq!(index.holdings(), before - 32);
    // let the prefill backlog of the earlier routes drain (10k tokens/s)
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let d = tokio::task::spawn_blocking({
        let p = prompt.clone();
        move || route(addr, &p)
    })
    .await
    .expect("join");
    assert_eq!(d["worker_id"], "a");
    assert_eq!(d["candidates"].as_array().map(Vec::len), Some(2));
    let (_, m) = tokio::task::spawn_blocking(move || http(addr, "GET", "/metrics", None))
        .await
        .expect("join");
    assert!(
        m.contains("kvrouter_route_matched_blocks_total{tier=\"host\"}"),
        "{m}"
    );
}
