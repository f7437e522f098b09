//! What several fuzz targets share: a MessagePack encoder to check the
//! router's decoder against, an in-memory ZMTP peer, and an allocator that
//! measures what a decoder allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use kvrouter::ingest::msgpack::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Encodes `v` as MessagePack (always the widest form of each type, so the
/// bytes differ from most inputs but decode to the same value). Integers
/// outside msgpack's range panic: the decoder must never produce them.
pub fn encode_msgpack(v: &Value<'_>, out: &mut Vec<u8>) {
    fn len32(out: &mut Vec<u8>, marker: u8, n: usize) {
        out.push(marker);
        let n = u32::try_from(n).expect("msgpack length over u32");
        out.extend_from_slice(&n.to_be_bytes());
    }
    match v {
        Value::Nil => out.push(0xc0),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Int(i) if *i >= 0 => {
            let u = u64::try_from(*i).expect("msgpack int over u64::MAX");
            out.push(0xcf);
            out.extend_from_slice(&u.to_be_bytes());
        }
        Value::Int(i) => {
            let s = i64::try_from(*i).expect("msgpack int under i64::MIN");
            out.push(0xd3);
            out.extend_from_slice(&s.to_be_bytes());
        }
        Value::Float(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(b) => {
            len32(out, 0xdb, b.len());
            out.extend_from_slice(b);
        }
        Value::Bin(b) => {
            len32(out, 0xc6, b.len());
            out.extend_from_slice(b);
        }
        Value::Array(items) => {
            len32(out, 0xdd, items.len());
            for i in items {
                encode_msgpack(i, out);
            }
        }
        Value::Map(entries) => {
            len32(out, 0xdf, entries.len());
            for (k, v) in entries {
                encode_msgpack(k, out);
                encode_msgpack(v, out);
            }
        }
        Value::Ext(ty, b) => {
            len32(out, 0xc9, b.len());
            out.push(*ty as u8);
            out.extend_from_slice(b);
        }
    }
}

/// A peer whose bytes are fixed in advance: reads return them, then EOF;
/// writes are accepted and dropped.
pub struct ScriptedPeer {
    data: Vec<u8>,
    pos: usize,
}

impl ScriptedPeer {
    pub fn new(data: Vec<u8>) -> Self {
        ScriptedPeer { data, pos: 0 }
    }
}

impl AsyncRead for ScriptedPeer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.data[self.pos..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ScriptedPeer {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A ZMTP 3.1 PUB peer's greeting and READY command: what a real engine
/// sends before its first message.
pub fn zmtp_handshake() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 1;
    g[12..16].copy_from_slice(b"NULL");
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&3u32.to_be_bytes());
    body.extend_from_slice(b"PUB");
    g.push(0x04);
    g.push(body.len() as u8);
    g.extend_from_slice(&body);
    g
}

/// `data` cut into messages, each prefixed by its length (u16 LE); a last
/// message cut short keeps what is there.
pub fn split_u16_prefixed(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [lo, hi, rest @ ..] = data {
        let n = (u16::from_le_bytes([*lo, *hi]) as usize).min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// A kvbm `EventBatch` that a daemon restarted as `incarnation` sends
/// first: seq 0, a snapshot holding nothing.
pub fn encode_restart(incarnation: &str) -> Vec<u8> {
    use kvtier_proto::v1 as pb;
    use prost::Message as _;
    pb::EventBatch {
        incarnation: incarnation.into(),
        seq: 0,
        events: Vec::new(),
        snapshot: true,
    }
    .encode_to_vec()
}

/// The global allocator of targets that bound what a decoder allocates:
/// the system's, counting the bytes live and their peak.
pub struct PeakAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

/// `f`'s result and the most bytes it had allocated at once (beyond what
/// was live when it started). Needs [`PeakAlloc`] as the global allocator.
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}
