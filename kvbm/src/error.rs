//! The crate's one error type: a kind callers can match on, plus context.

use std::fmt;

/// What kind of failure, stable across versions (operators search for these
/// names in logs; gRPC clients see them as status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unknown namespace, block or lease.
    NotFound,
    /// Malformed request: wrong size, bad key, bad field.
    InvalidArgument,
    /// Conflicts with what exists (a namespace re-registered with another layout).
    FailedPrecondition,
    /// No room: the host pool is full of leased blocks, a queue is full.
    ResourceExhausted,
    /// Stored bytes failed verification; the block was dropped.
    ChecksumMismatch,
    /// A tier is degraded (disk full, I/O errors).
    Degraded,
    /// Input/output error on the data directory.
    Io,
    /// The catalog (RocksDB) failed.
    Catalog,
    /// A bug or an impossible state.
    Internal,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn not_found(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, context)
    }

    pub fn invalid(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, context)
    }

    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.context)
    }
}

impl std::error::Error for Error {}

#[cfg(feature = "rocksdb")]
impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Error {
        Error::new(ErrorKind::Catalog, e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        let code = match e.kind {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::ChecksumMismatch => Code::DataLoss,
            ErrorKind::Degraded => Code::Unavailable,
            ErrorKind::Io | ErrorKind::Catalog | ErrorKind::Internal => Code::Internal,
        };
        tonic::Status::new(code, e.context)
    }
}
