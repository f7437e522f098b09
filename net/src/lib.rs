//! kvtier-net: the listener pieces kvtier's daemons share.
//!
//! - [`Incoming`]: accepts from a TCP or Unix listener, backs off instead of
//!   spinning when the process runs out of descriptors or memory, and caps
//!   open connections; a tonic `serve_with_incoming` stream as it is.
//! - [`serve_http`]: an HTTP/1 server for an axum `Router` with a header
//!   read timeout, a per-request deadline and graceful shutdown.
//! - [`raise_nofile_limit`]: the soft descriptor limit up to the hard one.
//! - [`is_loopback`]: whether a listener is reachable from this host only.
//! - [`TlsFiles`], [`BearerToken`]: TLS (mutual with a client CA) and bearer
//!   tokens for TCP listeners.
//! - [`clock::Utc`]: wall-clock time as a UTC date.
//! - [`backoff::Backoff`]: exponential delays with jitter.
//! - [`FixAuthority`]: lets grpc-core clients, which send a socket path as
//!   `:authority`, reach a tonic server on a Unix socket.

mod accept;
mod authority;
pub mod backoff;
pub mod clock;
mod http;
mod limits;
mod tls;

pub use accept::{Accept, AcceptOptions, Conn, Incoming, Slot};
pub use authority::FixAuthority;
pub use http::{serve_http, HttpOptions};
pub use limits::{is_loopback, raise_nofile_limit};
pub use tls::{BearerToken, TlsFiles};
