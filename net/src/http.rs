//! An HTTP/1 server for an axum `Router`, bounded in time per connection and
//! per request (`axum::serve` sets no header read timeout, so a client that
//! sends part of a request and then nothing holds its connection forever).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use futures::StreamExt;
use hyper::body::Incoming as HyperBody;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio_rustls::rustls;
use tower::Service;

use crate::tls::BearerToken;

use crate::accept::{Accept, Incoming};

/// Time bounds of [`serve_http`]; every default is given on its field.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Longest wait for a complete request header, counted from the
    /// connection's start or from the end of the previous answer; a client
    /// past it is disconnected. It is also how long an idle kept-alive
    /// connection stays open. Default 10 s.
    pub header_read_timeout: Duration,
    /// Longest a request may take once its header is in, reading its body
    /// included; past it the answer is 408 and the connection closes.
    /// Default 60 s.
    pub request_timeout: Duration,
    /// On shutdown, longest wait for requests in progress before
    /// [`serve_http`] returns anyway. Default 5 s.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with this configuration (see
    /// [`TlsFiles::server_config`](crate::TlsFiles::server_config)); the
    /// handshake must end within `header_read_timeout`. Default none.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Requests must carry this bearer token, except those for the paths
    /// in `open_paths`: a 401 otherwise. Default none.
    pub token: Option<BearerToken>,
    /// Paths served without a token (e.g. `/healthz` for load balancers).
    /// Default none.
    pub open_paths: Vec<&'static str>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            token: None,
            open_paths: Vec::new(),
        }
    }
}

fn timed_out() -> Response<Body> {
    let mut r = Response::new(Body::from(r#"{"error":"request timed out"}"#));
    *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Who may be served: everyone, or holders of the token (and anyone for
/// the open paths).
struct Auth {
    token: Option<BearerToken>,
    open_paths: Vec<&'static str>,
}

impl Auth {
    fn allows<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        self.open_paths.contains(&req.uri().path())
            || token.accepts(
                req.headers()
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes),
            )
    }
}

fn unauthorized() -> Response<Body> {
    let mut r = Response::new(Body::from(r#"{"error":"a bearer token is required"}"#));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Serves `app` over HTTP/1.1 on every connection `incoming` yields until
/// `shutdown` completes; then stops accepting (the listener is closed),
/// lets requests in progress finish for up to
/// [`HttpOptions::shutdown_grace`], and returns.
pub async fn serve_http<L, F>(
    incoming: Incoming<L>,
    app: axum::Router,
    options: HttpOptions,
    shutdown: F,
) where
    L: Accept,
    F: Future<Output = ()>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    let request_timeout = options.request_timeout;
    let tls = options.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let auth = Arc::new(Auth {
        token: options.token.clone(),
        open_paths: options.open_paths.clone(),
    });
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let conn = tokio::select! {
                _ = &mut shutdown => break,
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(never)) => match never {},
                    None => break,
                },
            };
            let app = app.clone();
            let auth = auth.clone();
            let svc = hyper::service::service_fn(move |req: Request<HyperBody>| {
                let mut app = app.clone();
                let allowed = auth.allows(&req);
                async move {
                    if !allowed {
                        return Ok::<_, Infallible>(unauthorized());
                    }
                    let call = app.call(req.map(Body::new));
                    match tokio::time::timeout(request_timeout, call).await {
                        Ok(r) => r,
                        Err(_) => Ok::<_, Infallible>(timed_out()),
                    }
                }
            });
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            let handshake = options.header_read_timeout;
            let tls = tls.clone();
            tokio::spawn(async move {
                // Timeouts and clients that vanish end here; nothing to do.
                let ended = match tls {
                    None => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(conn), svc))
                            .await
                    }
                    Some(acceptor) => {
                        let Ok(Ok(conn)) =
                            tokio::time::timeout(handshake, acceptor.accept(conn)).await
                        else {
                            tracing::debug!("TLS handshake failed or timed out");
                            return;
                        };
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(conn), svc))
                            .await
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
            });
        }
    }
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("HTTP shutdown: requests still in progress after the grace period");
    }
}
