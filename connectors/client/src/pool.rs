//! Attaching kvbm's shared host pool.
//!
//! Wire format of the pool socket (`<socket>.pool`, a `SOCK_STREAM` Unix
//! socket): on accept the daemon sends one 16-byte message
//! `[session: u64 LE][pool_len: u64 LE]` with the pool's memfd attached as
//! `SCM_RIGHTS`. The client keeps the connection open for as long as it uses
//! the session: when it closes (or the process dies) the daemon releases the
//! session's leases and reservations.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvtier_proto::session::{self as wire, LookupCounts};
use tonic::Code;

use crate::{Error, Result};

/// The pool socket that belongs to a daemon's gRPC Unix socket.
pub fn pool_socket_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".pool");
    PathBuf::from(s)
}

/// The daemon's host pool, mapped read/write into this process, and the
/// session it belongs to (which also carries the offload path's Reserve,
/// Commit and Abort as binary frames).
pub struct Pool {
    session: u64,
    base: *mut u8,
    len: usize,
    // Held open: the session lives as long as this connection.
    conn: std::sync::Mutex<Session>,
}

// SAFETY: the mapping is plain shared memory; `Pool` only hands out raw
// pointers and slices whose use is the caller's responsibility (slots it was
// granted by Reserve/Acquire).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("session", &self.session)
            .field("len", &self.len)
            .finish()
    }
}

impl Pool {
    /// Connects to the pool socket next to the daemon's gRPC socket
    /// `socket` and maps the pool. Blocking.
    pub fn attach(socket: &Path) -> Result<Pool> {
        Pool::attach_with_timeout(socket, None)
    }

    /// As [`Pool::attach`]; `timeout` bounds each read and write of the
    /// session's later calls (after one times out the session is broken:
    /// a late reply could be taken for the next call's).
    pub fn attach_with_timeout(socket: &Path, timeout: Option<Duration>) -> Result<Pool> {
        let path = pool_socket_path(socket);
        let err = |source| Error::Pool {
            path: path.display().to_string(),
            source,
        };
        let (conn, session, len, fd) = open_session(&path, timeout).map_err(err)?;
        let len = len as usize;
        if len == 0 {
            return Err(err(std::io::Error::other("daemon announced an empty pool")));
        }
        // SAFETY: mapping a shared memfd we own a descriptor for; the length
        // is the daemon's pool size, which is the memfd's size.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        // Each mapping has its own page tables: write-fault this one too
        // (see kvbm's pool for why and what it was measured to cost).
        // SAFETY: advising on the mapping just made; failure is harmless.
        unsafe { libc::madvise(base, len, libc::MADV_POPULATE_WRITE) };
        Ok(Pool {
            session,
            base: base as *mut u8,
            len,
            conn: std::sync::Mutex::new(Session::new(path, conn)),
        })
    }

    /// Reserves slots for blocks `keys` (parents: `parents`, empty for a
    /// root; `tokens_per_block` token ids each in `tokens`, or none) in this
    /// session; one `(offset, length)` per key, length 0 for a block that
    /// needs no write. Errors as for [`Session::lookup`].
    pub fn reserve<'k>(
        &self,
        namespace: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
        parents: impl ExactSizeIterator<Item = &'k [u8]>,
        tokens: &[u32],
        tokens_per_block: usize,
    ) -> Result<Vec<(u64, u64)>> {
        self.with_session(|s| {
            s.call(
                |buf| wire::encode_reserve(buf, namespace, keys, parents, tokens, tokens_per_block),
                wire::decode_slots_reply,
            )
        })
    }

    /// Commits reserved blocks of this session; returns how many.
    pub fn commit<'k>(
        &self,
        namespace: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
    ) -> Result<u32> {
        self.keys_call(wire::OP_COMMIT, namespace, keys)
    }

    /// Aborts reserved blocks of this session; returns how many.
    pub fn abort<'k>(
        &self,
        namespace: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
    ) -> Result<u32> {
        self.keys_call(wire::OP_ABORT, namespace, keys)
    }

    fn keys_call<'k>(
        &self,
        op: u8,
        namespace: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
    ) -> Result<u32> {
        self.with_session(|s| {
            s.call(
                |buf| wire::encode_keys(buf, op, namespace, keys),
                wire::decode_count_reply,
            )
        })
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let mut s = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    /// The session id to pass in Reserve/Commit/Abort/Acquire/Release.
    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address of the mapping (for engines that copy with their own
    /// kernels, e.g. torch over the pool).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// The bytes of a slot, for reading. `None` when the range lies outside
    /// the pool (a reply that does not fit this pool is never trusted).
    pub fn slot(&self, offset: u64, length: u64) -> Option<&[u8]> {
        let end = offset.checked_add(length)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: in bounds of a live mapping; concurrent writers are other
        // clients writing slots they reserved, never a slot leased to us.
        Some(unsafe { std::slice::from_raw_parts(self.base.add(offset as usize), length as usize) })
    }

    /// The bytes of a slot, for writing a reserved block.
    #[allow(clippy::mut_from_ref)]
    pub fn slot_mut(&self, offset: u64, length: u64) -> Option<&mut [u8]> {
        let end = offset.checked_add(length)?;
        if end > self.len as u64 {
            return None;
        }
        // SAFETY: in bounds; the daemon grants a reserved slot to one
        // session only, so no one else reads or writes it until commit.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.base.add(offset as usize), length as usize)
        })
    }
}

// Added for the Python connector (kvtier-py): detecting a daemon restart.
impl Pool {
    /// Whether the daemon still holds this session: `false` once the pool
    /// connection was closed by the other side (daemon stopped or
    /// restarted), after which slot offsets no longer refer to this
    /// mapping. Non-blocking: one `poll(2)`.
    pub fn is_alive(&self) -> bool {
        let fd = match self.conn.lock() {
            Ok(s) if !s.broken => s.conn.as_raw_fd(),
            _ => return false,
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we own, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return true;
        }
        pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLIN) == 0
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `attach`.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// Connects to the pool socket at `path` and reads the handshake:
/// `(connection, session id, pool length, pool memfd)`.
fn open_session(
    path: &Path,
    timeout: Option<Duration>,
) -> std::io::Result<(UnixStream, u64, u64, OwnedFd)> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(timeout)?;
    conn.set_write_timeout(timeout)?;
    let (header, fd) = recv_with_fd(&conn)?;
    let [s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3, l4, l5, l6, l7] = header;
    let session = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let len = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
    Ok((conn, session, len, fd))
}

/// A session on the pool socket without the mapping: the scheduler side's
/// fast path for Lookup (see `kvtier_proto::session`). One call at a time
/// (`&mut self`); a transport error or a timeout breaks the session (every
/// later call fails): drop it and connect again.
#[derive(Debug)]
pub struct Session {
    path: PathBuf,
    conn: UnixStream,
    buf: Vec<u8>,
    broken: bool,
}

impl Session {
    /// Opens a session on the pool socket next to the daemon's gRPC socket
    /// `socket`. `timeout` bounds each read and write of later calls.
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Session> {
        let path = pool_socket_path(socket);
        match open_session(&path, timeout) {
            Ok((conn, _, _, _fd)) => Ok(Session::new(path, conn)),
            Err(source) => Err(Error::Pool {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn new(path: PathBuf, conn: UnixStream) -> Session {
        Session {
            path,
            conn,
            buf: Vec::new(),
            broken: false,
        }
    }

    /// One request/reply: `encode` appends the request frame, `decode`
    /// reads the reply's kind and body.
    fn call<T>(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
        decode: impl FnOnce(u8, &[u8]) -> Result<T, (u8, String)>,
    ) -> Result<T> {
        let pool_err = |path: &Path, source| Error::Pool {
            path: path.display().to_string(),
            source,
        };
        if self.broken {
            return Err(pool_err(
                &self.path,
                std::io::Error::other("session broken by an earlier failure"),
            ));
        }
        self.buf.clear();
        encode(&mut self.buf).map_err(|m| Error::Status(tonic::Status::invalid_argument(m)))?;
        let kind = match self.round_trip() {
            Ok(k) => k,
            Err(e) => {
                self.broken = true;
                return Err(pool_err(&self.path, e));
            }
        };
        decode(kind, &self.buf)
            .map_err(|(code, msg)| Error::Status(tonic::Status::new(Code::from(code as i32), msg)))
    }

    /// Longest prefix of the `keys` chain present in namespace `namespace`,
    /// with the host and disk prefixes and the prefix held on the node (the
    /// rest only in the object store). Every key must have one length.
    /// A daemon-side failure is `Error::Status` with the code gRPC would
    /// give; a broken connection or a timeout is `Error::Pool`.
    pub fn lookup<'k>(
        &mut self,
        namespace: &str,
        keys: impl ExactSizeIterator<Item = &'k [u8]>,
    ) -> Result<LookupCounts> {
        self.call(
            |buf| wire::encode_lookup(buf, namespace, keys),
            wire::decode_lookup_reply,
        )
    }

    /// Sends the request in `buf` and reads the reply's body into `buf`;
    /// returns the reply's kind.
    fn round_trip(&mut self) -> std::io::Result<u8> {
        self.conn.write_all(&self.buf)?;
        let mut header = [0u8; 5];
        self.conn.read_exact(&mut header)?;
        let (len, kind) = wire::decode_header(header).map_err(std::io::Error::other)?;
        self.buf.resize(len, 0);
        self.conn.read_exact(&mut self.buf)?;
        Ok(kind)
    }
}

/// Receives the 16-byte header and the descriptor sent with it.
fn recv_with_fd(conn: &UnixStream) -> std::io::Result<([u8; 16], OwnedFd)> {
    let mut header = [0u8; 16];
    // Room for one descriptor in the control message, 8-byte aligned.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: header.len(),
    };
    // SAFETY: msghdr built over buffers that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: recvmsg on a connected socket into the buffers above.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != header.len() {
        return Err(std::io::Error::other(format!(
            "short pool handshake: {n} bytes"
        )));
    }
    // SAFETY: walking the control messages the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return Ok((header, OwnedFd::from_raw_fd(fd)));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Err(std::io::Error::other(
        "pool handshake carried no descriptor",
    ))
}
