//! A minimal ZMTP 3.1 peer (NULL security) for the two socket roles the
//! router plays against engines: SUB (connecting to the engine's PUB, or
//! accepting publishers on a bound address) and DEALER (asking the engine's
//! ROUTER for replay).
//!
//! Written for this crate instead of using a general ZeroMQ library so that
//! a peer's disappearance is seen at once (EOF, or heartbeat PINGs left
//! unanswered), frame sizes are bounded before anything is allocated, and no
//! input can panic the reader. Wire format: <https://rfc.zeromq.org/spec/37/>.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};

/// Where a ZeroMQ peer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`
    Tcp(String),
    /// `ipc:///path`
    Ipc(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://host:port` or `ipc://path`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(format!("{s}: no port"));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("{s}: bad host or port"));
            }
            Ok(Endpoint::Tcp(rest.to_owned()))
        } else if let Some(rest) = s.strip_prefix("ipc://") {
            if rest.is_empty() {
                return Err(format!("{s}: empty path"));
            }
            Ok(Endpoint::Ipc(PathBuf::from(rest)))
        } else {
            Err(format!(
                "{s}: only tcp:// and ipc:// endpoints are supported"
            ))
        }
    }

    /// The endpoint with its TCP port moved up by `offset` (vLLM's data
    /// parallel rank r publishes on port + r; for ipc, vLLM appends `_dp{r}`).
    pub fn offset(&self, offset: u32) -> Result<Endpoint, String> {
        if offset == 0 {
            return Ok(self.clone());
        }
        match self {
            Endpoint::Tcp(hp) => {
                let (host, port) = hp
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{hp}: no port"))?;
                let port: u16 = port.parse().map_err(|_| format!("{hp}: bad port"))?;
                let port = u16::try_from(port as u32 + offset)
                    .map_err(|_| format!("{hp}: port + {offset} overflows"))?;
                Ok(Endpoint::Tcp(format!("{host}:{port}")))
            }
            Endpoint::Ipc(p) => {
                let mut s = p.as_os_str().to_owned();
                s.push(format!("_dp{offset}"));
                Ok(Endpoint::Ipc(PathBuf::from(s)))
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(hp) => write!(f, "tcp://{hp}"),
            Endpoint::Ipc(p) => write!(f, "ipc://{}", p.display()),
        }
    }
}

/// The socket role this side plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sub,
    Dealer,
}

impl Role {
    fn name(self) -> &'static [u8] {
        match self {
            Role::Sub => b"SUB",
            Role::Dealer => b"DEALER",
        }
    }
}

/// Limits applied to everything a peer sends.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message (all frames together) accepted; larger ones are read
    /// past and reported as [`Incoming::Oversized`].
    pub max_message_bytes: usize,
    /// Most frames in one message.
    pub max_frames: usize,
    /// Time allowed for the greeting and READY exchange.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 << 20,
            max_frames: 16,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Stream = BufReader<Box<dyn Io>>;

/// What [`Reader::recv`] returns.
#[derive(Debug)]
pub enum Incoming {
    /// A complete message, its frames in order.
    Message(Vec<Bytes>),
    /// A message over the limits, skipped: its size in bytes and frames.
    Oversized { bytes: u64, frames: usize },
    /// A command (PONG, PING...): no data, but a sign of life.
    Command,
}

/// A connection that has completed the ZMTP handshake.
pub struct Conn {
    io: Stream,
    limits: Limits,
    /// The peer's ZMTP minor version (0: 3.0, 1: 3.1).
    peer_minor: u8,
}

/// The sending side of a connection (cloneable; sends are serialized).
#[derive(Clone)]
pub struct Writer {
    inner: Arc<tokio::sync::Mutex<WriteHalf<Stream>>>,
    peer_minor: u8,
}

/// The receiving side of a connection; answers PINGs through its writer.
pub struct Reader {
    rd: ReadHalf<Stream>,
    writer: Writer,
    limits: Limits,
}

const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;
const MAX_COMMAND: u64 = 64 << 10;

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, flags: u8, body: &[u8]) -> io::Result<()> {
    if body.len() > 255 {
        w.write_u8(flags | FLAG_LONG).await?;
        w.write_u64(body.len() as u64).await?;
    } else {
        w.write_u8(flags).await?;
        w.write_u8(body.len() as u8).await?;
    }
    w.write_all(body).await
}

async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u8, u64)> {
    let flags = r.read_u8().await?;
    let size = if flags & FLAG_LONG != 0 {
        r.read_u64().await?
    } else {
        r.read_u8().await? as u64
    };
    Ok((flags, size))
}

async fn read_body<R: AsyncRead + Unpin>(r: &mut R, size: u64) -> io::Result<Vec<u8>> {
    if size > MAX_COMMAND {
        return Err(proto_err("command frame too large"));
    }
    let mut body = vec![0u8; size as usize];
    r.read_exact(&mut body).await?;
    Ok(body)
}

fn command(name: &[u8], data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + name.len() + data.len());
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    body.extend_from_slice(data);
    body
}

impl Conn {
    /// Connects to `ep` and completes the ZMTP handshake as `role`.
    pub async fn connect(ep: &Endpoint, role: Role, limits: Limits) -> io::Result<Conn> {
        let io: Box<dyn Io> = match ep {
            Endpoint::Tcp(hp) => {
                let s = TcpStream::connect(hp.as_str()).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            #[cfg(unix)]
            Endpoint::Ipc(p) => Box::new(UnixStream::connect(p).await?),
            #[cfg(not(unix))]
            Endpoint::Ipc(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "ipc:// needs unix",
                ))
            }
        };
        Self::handshake(io, role, limits).await
    }

    /// Completes the ZMTP handshake as `role` over a stream that is already
    /// connected: in-process peers, and the fuzz targets (`fuzz/`), which
    /// feed a peer's bytes from memory.
    pub async fn over<S>(io: S, role: Role, limits: Limits) -> io::Result<Conn>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake(Box::new(io), role, limits).await
    }

    async fn handshake(io: Box<dyn Io>, role: Role, limits: Limits) -> io::Result<Conn> {
        let mut conn = Conn {
            io: BufReader::with_capacity(64 << 10, io),
            limits,
            peer_minor: 0,
        };
        match tokio::time::timeout(limits.handshake_timeout, conn.greet(role)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "ZMTP handshake timed out",
                ))
            }
        }
        Ok(conn)
    }

    async fn greet(&mut self, role: Role) -> io::Result<()> {
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[8] = 1;
        greeting[9] = 0x7f;
        greeting[10] = 3; // major
        greeting[11] = 1; // minor
        greeting[12..16].copy_from_slice(b"NULL");
        self.io.write_all(&greeting).await?;
        self.io.flush().await?;

        let mut peer = [0u8; 64];
        self.io.read_exact(&mut peer[..10]).await?;
        if peer[0] != 0xff || peer[9] & 0x01 == 0 {
            return Err(proto_err("not a ZMTP peer"));
        }
        self.io.read_exact(&mut peer[10..]).await?;
        if peer[10] < 3 {
            return Err(proto_err(format!("ZMTP {}.x peer", peer[10])));
        }
        self.peer_minor = if peer[10] > 3 { 1 } else { peer[11].min(1) };
        let mech = &peer[12..32];
        if &mech[..4] != b"NULL" || mech[4..].iter().any(|b| *b != 0) {
            return Err(proto_err("peer wants a security mechanism other than NULL"));
        }

        let mut props = Vec::with_capacity(32);
        let name = b"Socket-Type";
        props.push(name.len() as u8);
        props.extend_from_slice(name);
        props.extend_from_slice(&(role.name().len() as u32).to_be_bytes());
        props.extend_from_slice(role.name());
        write_frame(&mut self.io, FLAG_COMMAND, &command(b"READY", &props)).await?;
        self.io.flush().await?;

        // The peer's READY (or ERROR).
        let (flags, size) = read_header(&mut self.io).await?;
        let body = read_body(&mut self.io, size).await?;
        if flags & FLAG_COMMAND == 0 {
            return Err(proto_err("expected READY, got a message"));
        }
        match split_command(&body)?.0 {
            b"READY" => Ok(()),
            b"ERROR" => Err(proto_err("peer answered ERROR")),
            _ => Err(proto_err("expected READY")),
        }
    }

    /// Splits into a reader (for a task of its own) and a writer.
    pub fn split(self) -> (Reader, Writer) {
        let (rd, wr) = tokio::io::split(self.io);
        let writer = Writer {
            inner: Arc::new(tokio::sync::Mutex::new(wr)),
            peer_minor: self.peer_minor,
        };
        (
            Reader {
                rd,
                writer: writer.clone(),
                limits: self.limits,
            },
            writer,
        )
    }
}

impl Writer {
    async fn frame(&self, flags: u8, body: &[u8]) -> io::Result<()> {
        let mut w = self.inner.lock().await;
        write_frame(&mut *w, flags, body).await?;
        w.flush().await
    }

    /// Sends one message.
    pub async fn send(&self, frames: &[&[u8]]) -> io::Result<()> {
        let mut w = self.inner.lock().await;
        for (i, f) in frames.iter().enumerate() {
            let more = if i + 1 < frames.len() { FLAG_MORE } else { 0 };
            write_frame(&mut *w, more, f).await?;
        }
        w.flush().await
    }

    /// SUB: subscribes to messages whose first frame starts with `topic`.
    pub async fn subscribe(&self, topic: &[u8]) -> io::Result<()> {
        if self.peer_minor >= 1 {
            self.frame(FLAG_COMMAND, &command(b"SUBSCRIBE", topic))
                .await
        } else {
            let mut body = Vec::with_capacity(1 + topic.len());
            body.push(1);
            body.extend_from_slice(topic);
            self.frame(0, &body).await
        }
    }

    /// Whether the peer speaks ZMTP 3.1 (answers heartbeats).
    pub fn heartbeats(&self) -> bool {
        self.peer_minor >= 1
    }

    /// Sends a heartbeat PING (ZMTP 3.1 peers answer PONG). A no-op
    /// against ZMTP 3.0 peers.
    pub async fn ping(&self, ttl: Duration) -> io::Result<()> {
        if self.peer_minor < 1 {
            return Ok(());
        }
        let ttl_ds = (ttl.as_millis() / 100).min(u16::MAX as u128) as u16;
        self.frame(FLAG_COMMAND, &command(b"PING", &ttl_ds.to_be_bytes()))
            .await
    }
}

impl Reader {
    /// Receives the next message or command. Not cancel-safe: run it in a
    /// task of its own and forward what it returns.
    pub async fn recv(&mut self) -> io::Result<Incoming> {
        let mut frames: Vec<Bytes> = Vec::new();
        let mut total: u64 = 0;
        let mut count = 0usize;
        let mut oversized = false;
        loop {
            let (flags, size) = read_header(&mut self.rd).await?;
            if flags & FLAG_COMMAND != 0 {
                if count != 0 {
                    return Err(proto_err("command inside a multipart message"));
                }
                let body = read_body(&mut self.rd, size).await?;
                self.on_command(&body).await?;
                return Ok(Incoming::Command);
            }
            count += 1;
            total = total.saturating_add(size);
            if !oversized
                && (count > self.limits.max_frames || total > self.limits.max_message_bytes as u64)
            {
                oversized = true;
                frames = Vec::new();
            }
            if oversized {
                let mut skip = (&mut self.rd).take(size);
                let copied = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await?;
                if copied != size {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            } else {
                let mut body = vec![0u8; size as usize];
                self.rd.read_exact(&mut body).await?;
                frames.push(Bytes::from(body));
            }
            if flags & FLAG_MORE == 0 {
                return Ok(if oversized {
                    Incoming::Oversized {
                        bytes: total,
                        frames: count,
                    }
                } else {
                    Incoming::Message(frames)
                });
            }
        }
    }

    async fn on_command(&mut self, body: &[u8]) -> io::Result<()> {
        let (name, data) = split_command(body)?;
        match name {
            b"PING" => {
                // PING: ttl (2 bytes) + context (0..16 bytes), echoed in PONG
                let ctx = data.get(2..).unwrap_or(&[]);
                let ctx = &ctx[..ctx.len().min(16)];
                self.writer
                    .frame(FLAG_COMMAND, &command(b"PONG", ctx))
                    .await
            }
            b"ERROR" => Err(proto_err("peer sent ERROR")),
            _ => Ok(()),
        }
    }
}

fn split_command(body: &[u8]) -> io::Result<(&[u8], &[u8])> {
    let n = *body.first().ok_or_else(|| proto_err("empty command"))? as usize;
    let name = body
        .get(1..1 + n)
        .ok_or_else(|| proto_err("truncated command"))?;
    Ok((name, &body[1 + n..]))
}

/// Whether a Unix socket sits at `p` (false: nothing does). Anything else
/// there (a regular file, a directory, a symlink, a device) is an error:
/// binding must never replace it.
#[cfg(unix)]
pub fn existing_socket(p: &std::path::Path) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => Ok(true),
        Ok(m) => {
            let t = m.file_type();
            let what = if t.is_symlink() {
                "a symlink"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{}: {what} is there; refusing to replace it with a socket",
                    p.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A bound address accepting ZMTP peers (publishers connecting to the
/// router's SUB).
pub enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Ipc(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `ep`. For tcp, a host of `*` means every interface.
    pub async fn bind(ep: &Endpoint) -> io::Result<Listener> {
        match ep {
            Endpoint::Tcp(hp) => {
                let addr = match hp.strip_prefix("*:") {
                    Some(port) => format!("0.0.0.0:{port}"),
                    None => hp.clone(),
                };
                Ok(Listener::Tcp(TcpListener::bind(addr).await?))
            }
            #[cfg(unix)]
            Endpoint::Ipc(p) => {
                if existing_socket(p)? {
                    // Stale (its owner is gone) only when a connect is
                    // refused; a live one belongs to someone else.
                    match tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(p)).await
                    {
                        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            std::fs::remove_file(p)?
                        }
                        Ok(Err(e)) => return Err(e),
                        Ok(Ok(_)) | Err(_) => {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{}: a live socket is bound there", p.display()),
                            ))
                        }
                    }
                }
                let l = UnixListener::bind(p)?;
                // Events are users' prompts: the socket is for the router's
                // user and group only.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Ipc(l, p.clone()))
            }
            #[cfg(not(unix))]
            Endpoint::Ipc(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "ipc:// needs unix",
            )),
        }
    }

    /// The bound endpoint (with the port resolved).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?.to_string())),
            #[cfg(unix)]
            Listener::Ipc(_, p) => Ok(Endpoint::Ipc(p.clone())),
        }
    }

    /// Accepts one peer; complete its handshake with [`Pending::handshake`]
    /// (in a task of its own, so a slow peer does not hold up the others).
    pub async fn accept(&self) -> io::Result<Pending> {
        let io: Box<dyn Io> = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            #[cfg(unix)]
            Listener::Ipc(l, _) => Box::new(l.accept().await?.0),
        };
        Ok(Pending { io })
    }
}

/// An accepted connection before its handshake.
pub struct Pending {
    io: Box<dyn Io>,
}

impl Pending {
    pub async fn handshake(self, role: Role, limits: Limits) -> io::Result<Conn> {
        Conn::handshake(self.io, role, limits).await
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ipc_bind_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let file = d.join("file");
        std::fs::write(&file, b"precious").expect("write");
        let sub = d.join("dir");
        std::fs::create_dir(&sub).expect("mkdir");
        let link = d.join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        for p in [&file, &sub, &link] {
            let e = Listener::bind(&Endpoint::Ipc(p.clone()))
                .await
                .err()
                .unwrap_or_else(|| panic!("{} replaced", p.display()));
            assert!(e.to_string().contains("refusing"), "{e}");
        }
        assert_eq!(std::fs::read(&file).expect("read"), b"precious");
        assert!(sub.is_dir());
        assert!(std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink());

        // a live socket is someone else's
        let live = d.join("live.sock");
        let _owner = std::os::unix::net::UnixListener::bind(&live).expect("bind");
        let e = Listener::bind(&Endpoint::Ipc(live.clone())).await.err();
        assert_eq!(e.map(|e| e.kind()), Some(io::ErrorKind::AddrInUse));

        // a stale one (its listener closed, the file left behind) is reused
        let stale = d.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(existing_socket(&stale).expect("socket"));
        let l = Listener::bind(&Endpoint::Ipc(stale.clone()))
            .await
            .expect("stale socket replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&stale)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        drop(l);
    }
}
