//! The `kvrouter` binary over real sockets: config file + flags + env,
//! workers, routes from token ids / prompt / messages (tokenizer built here),
//! bad input, metrics, gRPC, the Envoy ext_proc picker, gRPC health.

mod api_util;

use std::collections::BTreeMap;

use api_util::{http, json, start};
use kvrouter::api::proto::envoy::config::core::v3 as core;
use kvrouter::api::proto::envoy::r#type::v3 as httptype;
use kvrouter::api::proto::envoy::service::ext_proc::v3 as ep;
use kvrouter::api::proto::grpc::health::v1 as health;
use kvrouter::api::proto::kvtier::router::v1 as pb;
use prost_types::{value::Kind, ListValue, Struct, Value as PValue};
use serde_json::json as j;

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let tok = dir.join("tokenizer.json");
    kvrouter::tokenize::write_word_level_tokenizer(
        &tok,
        &[
            "the",
            "cat",
            "sat",
            "on",
            "mat",
            "<|user|>",
            "<|assistant|>",
        ],
    )
    .expect("tokenizer");
    let cfg = dir.join("kvrouter.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
http = "127.0.0.1:1"   # overridden by the flag
[[models]]
name = "m"
tokenizer = "{}"
[[workers]]
worker_id = "cfg0"
endpoint = "127.0.0.1:9100"
model = "m"
"#,
            tok.display()
        ),
    )
    .expect("config");
    cfg
}

#[test]
fn http_api_over_the_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(dir.path());
    let p = start(
        &[
            "--http",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().expect("path"),
        ],
        &[("KVROUTER_GRPC", "127.0.0.1:0")],
    );
    let a = p.http;
    // the config's worker is there; add two more
    let (s, b) = http(a, "GET", "/v1/workers", None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["workers"][0]["worker_id"], "cfg0");
    let w1 = j!({"worker_id": "w1", "endpoint": "127.0.0.1:9101", "model": "m"});
    let (s, b) = http(a, "POST", "/v1/workers", Some(&w1.to_string()));
    assert_eq!(s, 201, "{b}");
    let (s, _) = http(a, "POST", "/v1/workers", Some(&w1.to_string()));
    assert_eq!(s, 200);
    let mut w1b = w1.clone();
    w1b["endpoint"] = j!("127.0.0.1:1");
    assert_eq!(
        http(a, "POST", "/v1/workers", Some(&w1b.to_string())).0,
        409
    );
    for bad in [
        "{",
        "[]",
        r#"{"worker_id": "x"}"#,
        r#"{"worker_id": 3, "endpoint": "e", "model": "m"}"#,
        r#"{"worker_id": "", "endpoint": "e", "model": "m"}"#,
        r#"{"worker_id": "x", "endpoint": "e", "model": "m", "metrics_url": "ftp://x"}"#,
        r#"{"worker_id": "x", "endpoint": "e", "model": "m", "bogus": 1}"#,
    ] {
        let (s, b) = http(a, "POST", "/v1/workers", Some(bad));
        assert_eq!(s, 400, "{bad} -> {b}");
        assert!(json(&b)["error"].is_string());
    }

    // routes: token ids, prompt, messages
    let (s, b) = http(
        a,
        "POST",
        "/v1/route",
        Some(r#"{"model": "m", "token_ids": [1, 2, 3]}"#),
    );
    assert_eq!(s, 200, "{b}");
    let d = json(&b);
    assert!(["cfg0", "w1"].contains(&d["worker_id"].as_str().unwrap_or_default()));
    assert_eq!(d["candidates"].as_array().map(Vec::len), Some(2));
    assert!(d["candidates"][0]["matched_blocks"]["gpu"].is_u64());
    assert!(d["candidates"][0]["score"].is_f64());
    let id = d["request_id"].as_u64().expect("id");
    assert_eq!(
        http(a, "POST", &format!("/v1/route/{id}/done"), None).0,
        204
    );
    assert_eq!(
        http(a, "POST", &format!("/v1/route/{id}/done"), None).0,
        404
    );
    // in-flight load spreads requests with nothing cached over both workers
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (s, b) = http(
            a,
            "POST",
            "/v1/route",
            Some(r#"{"model": "m", "prompt": "the cat sat on the mat"}"#),
        );
        assert_eq!(s, 200, "{b}");
        seen.insert(
            json(&b)["worker_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let msgs = r#"{"model": "m", "messages": [{"role": "user", "content": "the cat"}], "cache_salt": "t1"}"#;
    assert_eq!(http(a, "POST", "/v1/route", Some(msgs)).0, 200);

    // bad input: 400 with a reason; unknown model: 503
    for bad in [
        "not json",
        r#"{"token_ids": [1]}"#,
        r#"{"model": "m"}"#,
        r#"{"model": "m", "token_ids": [1], "prompt": "x"}"#,
        r#"{"model": "m", "token_ids": [-1]}"#,
        r#"{"model": "m", "token_ids": "abc"}"#,
        r#"{"model": "m", "messages": [{"content": "no role"}]}"#,
        r#"{"model": 7, "prompt": "x"}"#,
    ] {
        let (s, b) = http(a, "POST", "/v1/route", Some(bad));
        assert_eq!(s, 400, "{bad} -> {b}");
        assert!(json(&b)["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (s, b) = http(
        a,
        "POST",
        "/v1/route",
        Some(r#"{"model": "nope", "token_ids": [1]}"#),
    );
    assert_eq!(s, 503, "{b}");
    assert!(json(&b)["error"]
        .as_str()
        .is_some_and(|e| e.contains("nope")));
    assert_eq!(http(a, "GET", "/nowhere", None).0, 404);
    assert_eq!(http(a, "POST", "/v1/route/abc/done", None).0, 400);

    // delete
    assert_eq!(http(a, "DELETE", "/v1/workers/w1", None).0, 204);
    assert_eq!(http(a, "DELETE", "/v1/workers/w1", None).0, 404);
    let (_, b) = http(a, "GET", "/v1/workers", None);
    assert_eq!(json(&b)["workers"].as_array().map(Vec::len), Some(1));

    // metrics
    let (s, m) = http(a, "GET", "/metrics", None);
    assert_eq!(s, 200);
    for name in [
        "kvrouter_index_blocks ",
        "kvrouter_index_block_events_total",
        "kvrouter_route_latency_seconds_bucket",
        "kvrouter_routes_total{outcome=\"routed\"}",
        "kvrouter_routes_total{outcome=\"invalid\"}",
        "kvrouter_index_tier_blocks{tier=\"gpu\"}",
        "kvrouter_workers 1",
    ] {
        assert!(m.contains(name), "{name} missing in\n{m}");
    }
}

#[test]
fn defaults_and_env() {
    // KVROUTER_HTTP from the environment, no config file
    let p = start(
        &[],
        &[
            ("KVROUTER_HTTP", "127.0.0.1:0"),
            ("KVROUTER_GRPC", "127.0.0.1:0"),
        ],
    );
    assert_eq!(http(p.http, "GET", "/health", None).0, 200);
    let (s, b) = http(
        p.http,
        "POST",
        "/v1/route",
        Some(r#"{"model": "m", "token_ids": [1]}"#),
    );
    assert_eq!(s, 503, "{b}");
}

fn string_value(s: &str) -> PValue {
    PValue {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn body_msg(body: &str, subset: Option<&[&str]>) -> ep::ProcessingRequest {
    let metadata_context = subset.map(|s| {
        let mut ns = BTreeMap::new();
        ns.insert(
            "x-gateway-destination-endpoint-subset".to_string(),
            PValue {
                kind: Some(Kind::ListValue(ListValue {
                    values: s.iter().map(|x| string_value(x)).collect(),
                })),
            },
        );
        let mut md = core::Metadata::default();
        md.filter_metadata
            .insert("envoy.lb.subset_hint".to_string(), Struct { fields: ns });
        md
    });
    ep::ProcessingRequest {
        request: Some(ep::processing_request::Request::RequestBody(ep::HttpBody {
            body: body.as_bytes().to_vec(),
            end_of_stream: true,
        })),
        metadata_context,
        observability_mode: false,
    }
}

fn headers_msg() -> ep::ProcessingRequest {
    ep::ProcessingRequest {
        request: Some(ep::processing_request::Request::RequestHeaders(
            ep::HttpHeaders {
                headers: Some(core::HeaderMap {
                    headers: vec![core::HeaderValue {
                        key: ":path".into(),
                        value: String::new(),
                        raw_value: b"/v1/completions".to_vec(),
                    }],
                }),
                end_of_stream: false,
            },
        )),
        metadata_context: None,
        observability_mode: false,
    }
}

/// One ext_proc exchange: headers then body; returns the body answer.
async fn pick(
    client: &mut ep::external_processor_client::ExternalProcessorClient<tonic::transport::Channel>,
    body: &str,
    subset: Option<&[&str]>,
) -> ep::ProcessingResponse {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("process")
        .into_inner();
    tx.send(headers_msg()).await.expect("send");
    let first = stream
        .message()
        .await
        .expect("recv")
        .expect("headers answer");
    assert!(matches!(
        first.response,
        Some(ep::processing_response::Response::RequestHeaders(_))
    ));
    tx.send(body_msg(body, subset)).await.expect("send");
    stream.message().await.expect("recv").expect("body answer")
}

fn destination(r: &ep::ProcessingResponse) -> Option<String> {
    let Some(ep::processing_response::Response::RequestBody(b)) = &r.response else {
        return None;
    };
    let h = b
        .response
        .as_ref()?
        .header_mutation
        .as_ref()?
        .set_headers
        .first()?
        .header
        .as_ref()?;
    assert_eq!(h.key, "x-gateway-destination-endpoint");
    let v = String::from_utf8(h.raw_value.clone()).ok()?;
    let md = r.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
    let Some(Kind::StructValue(s)) = &md.kind else {
        return None;
    };
    let Some(Kind::StringValue(m)) = &s.fields.get("x-gateway-destination-endpoint")?.kind else {
        return None;
    };
    assert_eq!(m, &v, "header and metadata agree");
    Some(v)
}

fn immediate_status(r: &ep::ProcessingResponse) -> Option<i32> {
    match &r.response {
        Some(ep::processing_response::Response::ImmediateResponse(i)) => {
            i.status.as_ref().map(|s| s.code)
        }
        _ => None,
    }
}

#[test]
fn grpc_ext_proc_and_health_over_the_binary() {
    let p = start(&["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], &[]);
    let url = format!("http://{}", p.grpc);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut rc = pb::router_client::RouterClient::connect(url.clone())
            .await
            .expect("connect");
        for (id, ep) in [("a", "10.1.0.1:8000"), ("b", "http://10.1.0.2:8000/v1")] {
            let r = rc
                .add_worker(pb::Worker {
                    worker_id: id.into(),
                    endpoint: ep.into(),
                    model: "m".into(),
                    ..Default::default()
                })
                .await
                .expect("add");
            assert!(r.into_inner().created);
        }
        let bad = rc
            .add_worker(pb::Worker::default())
            .await
            .expect_err("empty worker");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let r = rc
            .route(pb::RouteRequest {
                model: "m".into(),
                input: Some(pb::route_request::Input::TokenIds(pb::TokenIds {
                    ids: vec![1, 2, 3],
                })),
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        assert_eq!(r.candidates.len(), 2);
        rc.route_done(pb::RouteDoneRequest {
            request_id: r.request_id,
        })
        .await
        .expect("done");
        let e = rc
            .route(pb::RouteRequest {
                model: "m".into(),
                input: None,
                ..Default::default()
            })
            .await
            .expect_err("no input");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = rc
            .route(pb::RouteRequest {
                model: "m".into(),
                input: Some(pb::route_request::Input::MessagesJson("{".into())),
                ..Default::default()
            })
            .await
            .expect_err("bad json");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = rc
            .route(pb::RouteRequest {
                model: "zz".into(),
                input: Some(pb::route_request::Input::TokenIds(pb::TokenIds {
                    ids: vec![1],
                })),
                ..Default::default()
            })
            .await
            .expect_err("unknown model");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = rc
            .route(pb::RouteRequest {
                model: "m".into(),
                input: Some(pb::route_request::Input::Prompt("x".into())),
                ..Default::default()
            })
            .await
            .expect_err("no tokenizer");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let ws = rc
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("list")
            .into_inner();
        assert_eq!(ws.workers.len(), 2);

        // ext_proc endpoint picker
        let mut xc = ep::external_processor_client::ExternalProcessorClient::connect(url.clone())
            .await
            .expect("connect");
        let body = r#"{"model": "m", "prompt": [5, 6, 7, 8]}"#;
        let r = pick(&mut xc, body, None).await;
        let d = destination(&r).expect("a destination");
        assert!(d == "10.1.0.1:8000" || d == "10.1.0.2:8000", "{d}");
        // the subset hint restricts the choice
        for _ in 0..3 {
            let r = pick(&mut xc, body, Some(&["10.1.0.2:8000", "10.9.9.9:1"])).await;
            assert_eq!(destination(&r).as_deref(), Some("10.1.0.2:8000"));
        }
        // nothing eligible / no worker: 503; bad body: 400
        let r = pick(&mut xc, body, Some(&["10.9.9.9:1"])).await;
        assert_eq!(
            immediate_status(&r),
            Some(httptype::StatusCode::ServiceUnavailable as i32)
        );
        let r = pick(&mut xc, r#"{"model": "zz", "prompt": "x"}"#, None).await;
        assert_eq!(
            immediate_status(&r),
            Some(httptype::StatusCode::ServiceUnavailable as i32)
        );
        let r = pick(&mut xc, "{not json", None).await;
        assert_eq!(
            immediate_status(&r),
            Some(httptype::StatusCode::BadRequest as i32)
        );

        // health
        let mut hc = health::health_client::HealthClient::connect(url)
            .await
            .expect("connect");
        let h = hc
            .check(health::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(
            h.status,
            health::health_check_response::ServingStatus::Serving as i32
        );
        let h = hc
            .check(health::HealthCheckRequest {
                service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
            })
            .await
            .expect("check");
        assert_eq!(h.into_inner().status, 1);
        let e = hc
            .check(health::HealthCheckRequest {
                service: "nope".into(),
            })
            .await
            .expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound);
        rc.remove_worker(pb::RemoveWorkerRequest {
            worker_id: "a".into(),
        })
        .await
        .expect("rm");
        let e = rc
            .remove_worker(pb::RemoveWorkerRequest {
                worker_id: "a".into(),
            })
            .await
            .expect_err("gone");
        assert_eq!(e.code(), tonic::Code::NotFound);
    });
}
