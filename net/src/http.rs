//! An HTTP/1 server for an axum `Router`, bounded in time per connection and
//! per request (`axum::serve` sets no header read timeout, so a client that
//! sends part of a request and then nothing holds its connection forever).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use futures::StreamExt;
use hyper::body::Incoming as HyperBody;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tower::Service;

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
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
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
            let svc = hyper::service::service_fn(move |req: Request<HyperBody>| {
                let mut app = app.clone();
                async move {
                    let call = app.call(req.map(Body::new));
                    match tokio::time::timeout(request_timeout, call).await {
                        Ok(r) => r,
                        Err(_) => Ok::<_, Infallible>(timed_out()),
                    }
                }
            });
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(conn), svc));
            tokio::spawn(async move {
                // Timeouts and clients that vanish end here; nothing to do.
                if let Err(e) = conn.await {
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
