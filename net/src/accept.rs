//! The accept side of a listener: back-off on exhausted resources and a cap
//! on open connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener [`Incoming`] can accept from: tokio's `TcpListener` and
/// `UnixListener`.
pub trait Accept: Send + Unpin + 'static {
    /// The accepted stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Polls for one connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Accept for TcpListener {
    type Io = TcpStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        let (s, _) = ready!(TcpListener::poll_accept(self, cx))?;
        // Requests and answers are small: Nagle's delay would only add
        // latency. A failure leaves a working, slower connection.
        let _ = s.set_nodelay(true);
        Poll::Ready(Ok(s))
    }
}

#[cfg(unix)]
impl Accept for UnixListener {
    type Io = UnixStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// Limits of an [`Incoming`]; every default is given on its field.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// Most connections open at once (default 4096). At the cap the
    /// listener stops accepting and new clients wait in the kernel's
    /// backlog until a connection closes.
    pub max_connections: usize,
    /// Pause after an accept fails for want of descriptors or memory
    /// (EMFILE, ENFILE, ENOBUFS, ENOMEM; default 100 ms). Retrying at once
    /// would fail again at once, and spin a core.
    pub backoff: Duration,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        AcceptOptions {
            max_connections: 4096,
            backoff: Duration::from_millis(100),
        }
    }
}

/// Accepted connections, as a stream: the `incoming` of tonic's
/// `serve_with_incoming` and of [`serve_http`](crate::serve_http). It never
/// yields an error: a failed accept is retried (after
/// [`AcceptOptions::backoff`] when resources ran out, logged once per
/// burst), and the stream never ends.
pub struct Incoming<L: Accept> {
    listener: L,
    name: &'static str,
    options: AcceptOptions,
    slots: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    waiting: Option<PermitFuture>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Inside a run of failed accepts (logged at its start only).
    failing: bool,
}

type PermitFuture =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

impl<L: Accept> Incoming<L> {
    /// Accepts from `listener`; `name` names it in logs ("HTTP", "gRPC").
    pub fn new(listener: L, name: &'static str, options: AcceptOptions) -> Self {
        let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
        Incoming {
            listener,
            name,
            options,
            slots,
            permit: None,
            waiting: None,
            pause: None,
            failing: false,
        }
    }

    /// The listener.
    pub fn get_ref(&self) -> &L {
        &self.listener
    }
}

/// Errors that concern one connection only (the peer gave up before we
/// accepted): the next accept may well succeed at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

impl<L: Accept> Stream for Incoming<L> {
    type Item = Result<Conn<L::Io>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(p) = &mut this.pause {
                ready!(p.as_mut().poll(cx));
                this.pause = None;
            }
            if this.permit.is_none() {
                let slots = this.slots.clone();
                let w = this
                    .waiting
                    .get_or_insert_with(|| Box::pin(slots.acquire_owned()));
                let permit = ready!(w.as_mut().poll(cx));
                this.waiting = None;
                match permit {
                    Ok(p) => this.permit = Some(p),
                    // the semaphore is ours and never closed
                    Err(_) => return Poll::Ready(None),
                }
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok(io) => {
                    if this.failing {
                        tracing::info!(listener = this.name, "accepting connections again");
                    }
                    this.failing = false;
                    let Some(permit) = this.permit.take() else {
                        continue;
                    };
                    return Poll::Ready(Some(Ok(Conn {
                        io,
                        _permit: permit,
                    })));
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    if !this.failing {
                        tracing::warn!(
                            listener = this.name, error = %e,
                            backoff_ms = this.options.backoff.as_millis() as u64,
                            "accept failed (descriptors or memory exhausted?): pausing between attempts"
                        );
                    }
                    this.failing = true;
                    this.pause = Some(Box::pin(tokio::time::sleep(this.options.backoff)));
                }
            }
        }
    }
}

/// An accepted connection. It holds one of its [`Incoming`]'s connection
/// slots until dropped.
pub struct Conn<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S> Conn<S> {
    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream and its connection slot apart: for a stream that leaves
    /// the runtime (a blocking thread serving it as a std socket, say),
    /// which must keep the slot for as long as it keeps the connection.
    pub fn into_parts(self) -> (S, Slot) {
        (self.io, Slot(self._permit))
    }
}

/// One of an [`Incoming`]'s connection slots, taken from its [`Conn`]:
/// the connection counts against the cap until this is dropped.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// tonic reads the peer's address (`Request::remote_addr`) from the inner
/// stream's connect info: forward it unchanged.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn connection_cap_holds_until_a_connection_drops() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut inc = Incoming::new(
            l,
            "test",
            AcceptOptions {
                max_connections: 1,
                ..AcceptOptions::default()
            },
        );
        let _c1 = TcpStream::connect(addr).await.expect("connect");
        let _c2 = TcpStream::connect(addr).await.expect("connect");
        let Some(Ok(first)) = inc.next().await else {
            panic!("first connection")
        };
        let peer = tonic::transport::server::Connected::connect_info(&first);
        assert!(peer.remote_addr().is_some());
        // at the cap: the second waits in the backlog
        let waited = tokio::time::timeout(Duration::from_millis(200), inc.next()).await;
        assert!(waited.is_err(), "accepted past the cap");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), inc.next()).await;
        assert!(matches!(second, Ok(Some(Ok(_)))));
    }
}
