//! The pool socket: hands the host pool's memfd to local clients, and
//! answers the latency-critical calls (Lookup; Reserve, Commit, Abort of the
//! offload path) without gRPC.
//!
//! On accept the daemon opens a session and sends one 16-byte message
//! `[session u64 LE][pool_len u64 LE]` with the memfd attached
//! (`SCM_RIGHTS`): the shared pool's, or for a tenant's process (by its user
//! or group) the tenant's own pool, which holds no one else's blocks. Slot
//! offsets are relative to that memfd; namespace names are the tenant's
//! (see [`crate::tenant`]). The connection then carries request/reply frames
//! (`kvtier_proto::session`), and signals liveness: when the client closes it
//! or dies, the session ends and its leases and reservations are released.
//!
//! Each connection gets its own thread blocked on the socket: a connection is
//! an engine process (a handful per host), and a blocked thread answers a
//! frame without the wake-up hops of the async runtime.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use futures::StreamExt;
use kvtier_net::Incoming;
use kvtier_proto::session::{self as wire, LookupCounts};
use tokio::net::UnixListener;

use crate::store::{Owner, Session, Store};
use crate::tenant::Principal;

/// Accepts pool clients, one thread each. `incoming` caps how many are
/// served at once (`max_clients`): past the cap new clients wait in the
/// listen backlog until one leaves.
pub async fn serve(mut incoming: Incoming<UnixListener>, store: Arc<Store>) {
    while let Some(Ok(conn)) = incoming.next().await {
        let (conn, slot) = conn.into_parts();
        let accepted = conn
            .peer_cred()
            .and_then(|cred| Ok((conn.into_std()?, cred)));
        let (conn, cred) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "pool client without credentials refused");
                continue;
            }
        };
        let owner = super::owner_of(&cred);
        let who = store.tenants().of_peer(cred.uid(), cred.gid());
        let store = store.clone();
        let spawned = std::thread::Builder::new()
            .name("kvbm-session".into())
            .spawn(move || {
                run_session(conn, owner, &who, &store);
                drop(slot);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a pool session thread");
        }
    }
}

fn run_session(conn: UnixStream, owner: Owner, who: &Principal, store: &Store) {
    let session = store.open_session(owner, who.pool());
    let id = session.id;
    let res = conn
        .set_nonblocking(false)
        .and_then(|_| handshake(&conn, id, who.pool(), store));
    if let Err(e) = res {
        tracing::warn!(error = %e, session = id, "pool handshake failed");
        store.close_session(session);
        return;
    }
    tracing::debug!(session = id, ?owner, "pool session opened");
    match serve_frames(conn, store, who, session) {
        Ok(()) => tracing::debug!(session = id, "pool session closed"),
        Err(e) => tracing::warn!(error = %e, session = id, "pool session ended"),
    }
    store.close_session(session);
}

/// Answers request frames until the client closes the connection. A frame
/// whose body is malformed gets an error reply and the session goes on; a
/// header over the limit, or an unknown op, cannot be skipped safely and
/// ends the session after an error reply.
fn serve_frames(
    mut conn: UnixStream,
    store: &Store,
    who: &Principal,
    session: Session,
) -> std::io::Result<()> {
    let mut body = Vec::new();
    let mut reply = Vec::with_capacity(64);
    loop {
        let mut header = [0u8; 5];
        match conn.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        reply.clear();
        let (len, op) = match wire::decode_header(header) {
            Ok(h) => h,
            Err(msg) => {
                wire::encode_error(&mut reply, wire::STATUS_INVALID, &msg);
                conn.write_all(&reply)?;
                return Err(std::io::Error::other(msg));
            }
        };
        if !matches!(
            op,
            wire::OP_LOOKUP | wire::OP_RESERVE | wire::OP_COMMIT | wire::OP_ABORT
        ) {
            let msg = format!("unknown op {op}");
            wire::encode_error(&mut reply, wire::STATUS_INVALID, &msg);
            conn.write_all(&reply)?;
            return Err(std::io::Error::other(msg));
        }
        read_body(&mut conn, len, &mut body)?;
        if let Err(s) = answer(store, who, session, op, &body, &mut reply) {
            reply.clear();
            wire::encode_error(&mut reply, s.code() as u8, s.message());
        }
        conn.write_all(&reply)?;
        if body.capacity() > KEEP_BODY {
            body = Vec::new();
        }
    }
}

/// Frame bodies up to this size keep their buffer for the next frame.
const KEEP_BODY: usize = 1 << 20;

/// Reads a body of `len` bytes (`len` is at most `MAX_FRAME`) into `body`.
/// The buffer grows with the bytes that arrive, not with the length the
/// header declares: a client that announces 16 MiB and sends nothing costs
/// nothing.
fn read_body(conn: &mut UnixStream, len: usize, body: &mut Vec<u8>) -> std::io::Result<()> {
    body.clear();
    let n = conn.take(len as u64).read_to_end(body)?;
    if n < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs one request of session `session` and appends its success reply.
fn answer(
    store: &Store,
    who: &Principal,
    session: Session,
    op: u8,
    body: &[u8],
    reply: &mut Vec<u8>,
) -> std::result::Result<(), tonic::Status> {
    let invalid = tonic::Status::invalid_argument;
    match op {
        wire::OP_LOOKUP => wire::encode_lookup_reply(reply, lookup(store, who, body)?),
        wire::OP_RESERVE => {
            let r = wire::decode_reserve(body).map_err(invalid)?;
            let tpb = r.tokens_per_block;
            let blocks = r
                .keys
                .iter()
                .zip(&r.parents)
                .enumerate()
                .map(|(i, (k, p))| kvtier_proto::v1::BlockMeta {
                    key: k.to_vec(),
                    parent: p.to_vec(),
                    token_ids: r.tokens[i * tpb..(i + 1) * tpb].to_vec(),
                })
                .collect();
            let grants = store.reserve(session, &who.namespace(r.namespace), blocks)?;
            wire::encode_slots_reply(reply, grants.iter().map(|g| (g.offset, g.length)));
        }
        wire::OP_COMMIT => {
            let r = wire::decode_keys(body).map_err(invalid)?;
            let ns = who.namespace(r.namespace);
            wire::encode_count_reply(reply, store.commit(session, &ns, &r.keys)?);
        }
        wire::OP_ABORT => {
            let r = wire::decode_keys(body).map_err(invalid)?;
            let ns = who.namespace(r.namespace);
            wire::encode_count_reply(reply, store.abort(session, &ns, &r.keys)?);
        }
        // serve_frames refuses other ops before reading their body.
        _ => return Err(invalid(format!("unknown op {op}"))),
    }
    Ok(())
}

fn lookup(
    store: &Store,
    who: &Principal,
    body: &[u8],
) -> std::result::Result<LookupCounts, tonic::Status> {
    let req = wire::decode_keys(body).map_err(tonic::Status::invalid_argument)?;
    let r = store.lookup(&who.namespace(req.namespace), &req.keys)?;
    Ok(LookupCounts::from(&r))
}

fn handshake(conn: &UnixStream, session: u64, pool: u8, store: &Store) -> std::io::Result<()> {
    let (fd, len) = store
        .pool()
        .segment_fd(pool as usize)
        .ok_or_else(|| std::io::Error::other(format!("no host pool {pool}")))?;
    let fd = fd.as_raw_fd();
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&session.to_le_bytes());
    header[8..].copy_from_slice(&len.to_le_bytes());
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: header.len(),
    };
    // Control buffer with room for one descriptor, 8-byte aligned.
    let mut cmsg_buf = [0u64; 8];
    // SAFETY: building a msghdr over buffers that outlive the sendmsg call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::c_int, fd);
        let n = libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != header.len() {
            return Err(std::io::Error::other("short pool handshake write"));
        }
    }
    Ok(())
}
