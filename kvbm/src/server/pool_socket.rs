//! The pool socket: hands the host pool's memfd to local clients.
//!
//! On accept the daemon opens a session and sends one 16-byte message
//! `[session u64 LE][pool_len u64 LE]` with the memfd attached
//! (`SCM_RIGHTS`). The connection then only signals liveness: when the
//! client closes it or dies, the session ends and its leases and
//! reservations are released.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

use crate::error::{Error, Result};
use crate::store::Store;

pub fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| Error::io(format!("cannot bind {}", path.display()), e))
}

pub async fn serve(listener: UnixListener, store: Arc<Store>) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "pool socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            let session = store.open_session();
            if let Err(e) = handshake(&conn, session, &store) {
                tracing::warn!(error = %e, session, "pool handshake failed");
                store.close_session(session);
                return;
            }
            tracing::debug!(session, "pool session opened");
            wait_closed(conn).await;
            store.close_session(session);
            tracing::debug!(session, "pool session closed");
        });
    }
}

/// Reads until EOF or an error: either means the client is gone.
async fn wait_closed(mut conn: UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn handshake(conn: &UnixStream, session: u64, store: &Store) -> std::io::Result<()> {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&session.to_le_bytes());
    header[8..].copy_from_slice(&store.pool().len().to_le_bytes());
    let fd = store.pool().fd().as_raw_fd();
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
        // The socket is non-blocking (tokio); 16 bytes into a fresh
        // connection's empty send buffer do not block.
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
