//! TLS, mutual TLS and the bearer token on both of the `kvrouter` binary's
//! listeners: HTTP through `curl`, gRPC through tonic. Health probes stay
//! open; everything else needs the token; a certificate of another CA gets
//! no connection.

mod api_util;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use api_util::{http, start, Proc};
use kvrouter::api::proto::envoy::service::ext_proc::v3 as ep;
use kvrouter::api::proto::grpc::health::v1 as health;
use kvrouter::api::proto::kvtier::router::v1 as pb;
use kvtier_e2e::certificates;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TOKEN: &str = "api-t0ken";
const REG_TOKEN: &str = "reg-t0ken";

/// A router with TLS, a client CA and the API token (flags and env), one
/// configured worker of model `m`, and its own registration token.
fn start_secured(d: &Path) -> Proc {
    certificates(d);
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).expect("token");
    std::fs::write(d.join("reg-token"), REG_TOKEN).expect("token");
    let cfg = d.join("kvrouter.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[workers]]
worker_id = "w0"
endpoint = "10.0.0.1:8000"
model = "m"
[registration]
token_file = "{}"
"#,
            d.join("reg-token").display()
        ),
    )
    .expect("config");
    let f = |n: &str| d.join(n).display().to_string();
    start(
        &[
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--config",
            &f("kvrouter.toml"),
            "--tls-cert",
            &f("server.pem"),
            "--tls-key",
            &f("server.key"),
            "--tls-client-ca",
            &f("ours-ca.pem"),
        ],
        &[("KVROUTER_AUTH_TOKEN_FILE", &f("token"))],
    )
}

/// `curl`'s status code (`000`: no HTTP answer, e.g. a refused handshake).
fn curl(
    d: &Path,
    url: &str,
    cert: Option<&str>,
    token: Option<&str>,
    body: Option<&str>,
) -> String {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ])
    .arg("--cacert")
    .arg(d.join("ours-ca.pem"));
    if let Some(cert) = cert {
        c.arg("--cert")
            .arg(d.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(d.join(format!("{cert}.key")));
    }
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = c.arg(url).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn http_needs_a_client_certificate_and_the_token_but_for_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let p = start_secured(d);
    let url = |path: &str| format!("https://{}{path}", p.http);
    let route = Some(r#"{"model": "m", "token_ids": [1, 2, 3]}"#);
    let c = |path: &str, cert: Option<&str>, token: Option<&str>, body: Option<&str>| {
        curl(d, &url(path), cert, token, body)
    };
    let me = Some("client");

    assert_eq!(c("/healthz", me, None, None), "200");
    assert_eq!(c("/health", me, None, None), "200");
    assert_eq!(c("/v1/route", me, None, route), "401");
    assert_eq!(c("/v1/route", me, Some("api-t0keN"), route), "401");
    assert_eq!(c("/v1/route", me, Some(TOKEN), route), "200");
    assert_eq!(c("/v1/workers", me, None, None), "401");
    assert_eq!(c("/v1/workers", me, Some(TOKEN), None), "200");
    assert_eq!(c("/metrics", me, None, None), "401");
    assert_eq!(c("/no-such-path", me, None, None), "401");

    // Registration keeps its own token: the API token does not register.
    let w = r#"{"worker_id": "w1", "endpoint": "10.0.0.2:8000", "model": "m"}"#;
    assert_eq!(c("/v1/workers", me, Some(TOKEN), Some(w)), "401");
    assert_eq!(c("/v1/workers", me, Some(REG_TOKEN), Some(w)), "201");

    // No certificate, another CA's, or no TLS at all: no answer.
    assert_eq!(c("/healthz", None, None, None), "000");
    assert_eq!(c("/healthz", Some("rogue"), None, None), "000");
    assert_eq!(
        c("/v1/route", Some("rogue"), Some(TOKEN), route),
        "000",
        "a rogue certificate was served"
    );
    let plain = curl(d, &format!("http://{}/healthz", p.http), None, None, None);
    assert_eq!(plain, "000", "plain HTTP was answered");
    assert!(
        p.log_line(&["beyond loopback"], Duration::ZERO).is_none(),
        "loopback listeners were warned about"
    );
}

fn bearer<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().expect("metadata");
        r.metadata_mut().insert("authorization", v);
    }
    r
}

async fn channel(d: &Path, addr: std::net::SocketAddr, cert: &str) -> Result<Channel, String> {
    let read = |n: &str| std::fs::read(d.join(n)).expect("read");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ours-ca.pem")))
        .identity(Identity::from_pem(
            read(&format!("{cert}.pem")),
            read(&format!("{cert}.key")),
        ));
    Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())
}

#[test]
fn grpc_needs_a_client_certificate_and_the_token_but_for_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let p = start_secured(&d);
    let addr = p.grpc;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let ch = channel(&d, addr, "client").await.expect("TLS connect");
        let mut rc = pb::router_client::RouterClient::new(ch.clone());
        let req = || pb::RouteRequest {
            model: "m".into(),
            input: Some(pb::route_request::Input::TokenIds(pb::TokenIds {
                ids: vec![1, 2, 3],
            })),
            ..Default::default()
        };
        for t in [None, Some("wrong")] {
            let e = rc.route(bearer(req(), t)).await.expect_err("no token");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{t:?}");
        }
        let r = rc
            .route(bearer(req(), Some(TOKEN)))
            .await
            .expect("route with the token")
            .into_inner();
        assert_eq!(r.candidates.len(), 1);
        let e = rc
            .list_workers(bearer(pb::ListWorkersRequest {}, None))
            .await
            .expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Registration: its own token, through the listener's gate too.
        let w = || pb::Worker {
            worker_id: "g".into(),
            endpoint: "e:1".into(),
            model: "m".into(),
            ..Default::default()
        };
        let e = rc
            .add_worker(bearer(w(), Some(TOKEN)))
            .await
            .expect_err("API token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(rc.add_worker(bearer(w(), Some(REG_TOKEN))).await.is_ok());

        // ext_proc is gated like the rest (Envoy sends the token as
        // initial metadata).
        let mut xc = ep::external_processor_client::ExternalProcessorClient::new(ch.clone());
        let (_tx, rx) = tokio::sync::mpsc::channel::<ep::ProcessingRequest>(1);
        let e = xc
            .process(bearer(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                None,
            ))
            .await
            .expect_err("ext_proc without the token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let (_tx, rx) = tokio::sync::mpsc::channel::<ep::ProcessingRequest>(1);
        assert!(xc
            .process(bearer(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                Some(TOKEN)
            ))
            .await
            .is_ok());

        // Health needs no token.
        let h = health::health_client::HealthClient::new(ch)
            .check(health::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health without a token")
            .into_inner();
        assert_eq!(
            h.status,
            health::health_check_response::ServingStatus::Serving as i32
        );

        // Another CA's certificate, or plain gRPC: no service.
        let rogue = match channel(&d, addr, "rogue").await {
            Err(_) => true,
            Ok(ch) => pb::router_client::RouterClient::new(ch)
                .route(bearer(req(), Some(TOKEN)))
                .await
                .is_err(),
        };
        assert!(rogue, "a rogue certificate was served");
        let plain = match pb::router_client::RouterClient::connect(format!("http://{addr}")).await {
            Err(_) => true,
            Ok(mut c) => c.route(bearer(req(), Some(TOKEN))).await.is_err(),
        };
        assert!(plain, "plain gRPC was served");
    });
}

#[test]
fn a_token_in_the_config_file_counts_as_authentication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("token"), TOKEN).expect("token");
    let cfg = d.join("kvrouter.toml");
    std::fs::write(
        &cfg,
        format!("auth_token_file = \"{}\"\n", d.join("token").display()),
    )
    .expect("config");
    let p = start(
        &[
            "--http",
            "0.0.0.0:0",
            "--grpc",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().expect("path"),
        ],
        &[],
    );
    let local: std::net::SocketAddr = format!("127.0.0.1:{}", p.http.port())
        .parse()
        .expect("addr");
    assert_eq!(http(local, "GET", "/healthz", None).0, 200);
    assert_eq!(http(local, "GET", "/v1/workers", None).0, 401);
    assert!(
        p.log_line(&["beyond loopback"], Duration::from_millis(500))
            .is_none(),
        "a listener with a token was warned about"
    );
}

#[test]
fn bad_tls_and_token_settings_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("empty"), " \n").expect("write");
    std::fs::write(d.join("junk.pem"), "not a certificate").expect("write");
    let f = |n: &str| d.join(n).display().to_string();
    for args in [
        vec!["--tls-cert".to_string(), f("junk.pem")],
        vec![
            "--tls-cert".into(),
            f("junk.pem"),
            "--tls-key".into(),
            f("junk.pem"),
        ],
        vec!["--tls-client-ca".into(), f("junk.pem")],
        vec!["--auth-token-file".into(), f("empty")],
        vec!["--auth-token-file".into(), f("missing")],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvrouter"))
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(&args)
            .env_remove("KVROUTER_CONFIG")
            .output()
            .expect("run kvrouter");
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            String::from_utf8_lossy(&out.stdout).is_empty(),
            "{args:?} listened"
        );
    }
}
