//! Lets stock gRPC clients (grpc-core: Python `grpcio`, C++; grpc-java) talk
//! to a tonic server on a Unix socket.
//!
//! Those clients send the socket's path as the HTTP/2 `:authority`
//! (`/run/kvtier/kvbm.sock`), which is no valid authority: the HTTP/2 layer
//! under tonic (h2) refuses every such request as malformed. [`FixAuthority`]
//! wraps a connection and looks at the first request's headers. When its
//! authority is valid (every Rust and Go client) it steps aside and every
//! later byte passes untouched. Otherwise it decodes each header block (HPACK,
//! keeping the client's dynamic table), replaces an invalid `:authority` by
//! `localhost`, and encodes the block again as plain literals, which use no
//! dynamic table, so the server's decoder never depends on blocks it did
//! not see as sent. Only what the client sends is read; replies pass as they
//! are.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value): rewritten blocks are cut into frames this large.
const MAX_FRAME: usize = 16_384;
/// A header block (HEADERS and its CONTINUATIONs) larger than this ends the
/// connection while rewriting: gRPC headers are a few hundred bytes.
const MAX_BLOCK: usize = 1 << 20;
/// The dynamic table size the server allows (HTTP/2's initial value; h2
/// keeps it).
const TABLE_SIZE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading the preface.
    Preface,
    /// Waiting for the first header block.
    Inspect,
    /// The authority is valid: every byte passes untouched.
    PassThrough,
    /// Every header block is rewritten.
    Rewrite,
}

/// A connection whose requests carry a valid `:authority` (see the module).
pub struct FixAuthority<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the client, not yet looked at.
    raw: Vec<u8>,
    /// Bytes ready for the server.
    out: Vec<u8>,
    out_at: usize,
    /// Bytes still to pass of a frame that is no header frame.
    skip: usize,
    /// The header block being gathered: its frames as sent, its fragment,
    /// and the first frame's END_STREAM flag and stream id.
    frames: Vec<u8>,
    fragment: Vec<u8>,
    end_stream: bool,
    stream: u32,
    gathering: bool,
    decoder: loona_hpack::Decoder<'static>,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        FixAuthority {
            inner,
            mode: Mode::Preface,
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            skip: 0,
            frames: Vec::new(),
            fragment: Vec::new(),
            end_stream: false,
            stream: 0,
            gathering: false,
            decoder,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be decided from `raw` to `out`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::PassThrough => {
                    self.out.append(&mut self.raw);
                    return Ok(());
                }
                Mode::Preface => {
                    if self.raw.len() < PREFACE.len() {
                        return Ok(());
                    }
                    // Not HTTP/2 from a client: not ours to judge.
                    self.mode = if self.raw.starts_with(PREFACE) {
                        Mode::Inspect
                    } else {
                        Mode::PassThrough
                    };
                    self.out.extend(self.raw.drain(..PREFACE.len()));
                }
                Mode::Inspect | Mode::Rewrite => {
                    if self.skip > 0 {
                        let n = self.skip.min(self.raw.len());
                        self.out.extend(self.raw.drain(..n));
                        self.skip -= n;
                        if self.raw.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len =
                        u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
                    let kind = self.raw[3];
                    if kind != HEADERS && kind != CONTINUATION && !self.gathering {
                        // Any other frame passes as it is, as it arrives.
                        let n = (FRAME_HEADER + len).min(self.raw.len());
                        self.out.extend(self.raw.drain(..n));
                        self.skip = FRAME_HEADER + len - n;
                        continue;
                    }
                    if self.fragment.len() + len > MAX_BLOCK {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "HTTP/2 header block too large",
                        ));
                    }
                    if self.raw.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER + len).collect();
                    self.header_frame(&frame)?;
                }
            }
        }
    }

    /// Takes one HEADERS or CONTINUATION frame (or, while a block is being
    /// gathered, any frame: HTTP/2 allows none other there).
    fn header_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        match (kind, self.gathering) {
            (HEADERS, false) => {
                if flags & PADDED != 0 {
                    let pad = *payload.first().ok_or_else(|| bad("empty padded frame"))? as usize;
                    payload = payload
                        .get(
                            1..payload
                                .len()
                                .checked_sub(pad)
                                .ok_or_else(|| bad("bad padding"))?,
                        )
                        .ok_or_else(|| bad("bad padding"))?;
                }
                if flags & PRIORITY != 0 {
                    payload = payload.get(5..).ok_or_else(|| bad("short priority"))?;
                }
                self.end_stream = flags & END_STREAM != 0;
                self.stream = stream;
                self.gathering = true;
            }
            (CONTINUATION, true) if stream == self.stream => {}
            _ => return Err(bad("HTTP/2 frame out of place in a header block")),
        }
        self.frames.extend_from_slice(frame);
        self.fragment.extend_from_slice(payload);
        if flags & END_HEADERS != 0 {
            self.end_block()?;
        }
        Ok(())
    }

    /// A whole header block arrived: decode it, and pass it on as sent or
    /// rewritten.
    fn end_block(&mut self) -> io::Result<()> {
        self.gathering = false;
        let fragment = std::mem::take(&mut self.fragment);
        let frames = std::mem::take(&mut self.frames);
        let headers = self
            .decoder
            .decode(&fragment)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
        let valid = headers
            .iter()
            .filter(|(n, _)| n == b":authority")
            .all(|(_, v)| tonic::codegen::http::uri::Authority::try_from(v.as_slice()).is_ok());
        if self.mode == Mode::Inspect && valid {
            self.out.extend_from_slice(&frames);
            self.mode = Mode::PassThrough;
            return Ok(());
        }
        self.mode = Mode::Rewrite;
        let mut block = Vec::with_capacity(fragment.len() + 64);
        for (name, value) in &headers {
            let value: &[u8] = if name == b":authority"
                && tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                b"localhost"
            } else {
                value
            };
            literal(&mut block, name, value);
        }
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (kind, mut flags) = if i == 0 {
                (HEADERS, if self.end_stream { END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if i == last {
                flags |= END_HEADERS;
            }
            let len = (chunk.len() as u32).to_be_bytes();
            self.out
                .extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
            self.out.extend_from_slice(&self.stream.to_be_bytes());
            self.out.extend_from_slice(chunk);
        }
        Ok(())
    }
}

/// A "literal header field without indexing — new name" (RFC 7541 6.2.2),
/// no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    integer(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    integer(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits `high`.
fn integer(out: &mut Vec<u8>, mut v: usize, n: u32, high: u8) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        loop {
            if me.out_at < me.out.len() {
                let n = (me.out.len() - me.out_at).min(buf.remaining());
                buf.put_slice(&me.out[me.out_at..me.out_at + n]);
                me.out_at += n;
                if me.out_at == me.out.len() {
                    me.out.clear();
                    me.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if me.mode == Mode::PassThrough && me.raw.is_empty() {
                return Pin::new(&mut me.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // End of input: whatever is left goes as it is.
                    me.out.append(&mut me.raw);
                    me.mode = Mode::PassThrough;
                    if me.out.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    me.raw.extend_from_slice(rb.filled());
                    me.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A block as a client with a dynamic table would send it: the
    /// authority added to the table, then referred to by index.
    fn indexed_block(authority: &[u8], first: bool) -> Vec<u8> {
        let mut b = Vec::new();
        // :method POST (static 3), :scheme http (6), :path literal.
        b.push(0x83);
        b.push(0x86);
        b.push(0x04); // literal without indexing, indexed name 4 (:path)
        integer(&mut b, 5, 7, 0);
        b.extend_from_slice(b"/a/Ba");
        if first {
            // :authority (static name 1) with incremental indexing: dynamic 62.
            integer(&mut b, 1, 6, 0x40);
            integer(&mut b, authority.len(), 7, 0);
            b.extend_from_slice(authority);
        } else {
            integer(&mut b, 62, 7, 0x80);
        }
        b
    }

    /// What the server reads of a client that sent `input` and closed.
    async fn through(input: &[u8]) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut client, input).await?;
        drop(client);
        let mut out = Vec::new();
        FixAuthority::new(server).read_to_end(&mut out).await?;
        Ok(out)
    }

    async fn pass(input: Vec<u8>) -> Vec<u8> {
        through(&input).await.unwrap()
    }

    fn headers_of(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        assert!(bytes.starts_with(PREFACE));
        let mut at = PREFACE.len();
        let mut d = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        while at < bytes.len() {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
            let payload = &bytes[at + FRAME_HEADER..at + FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(d.decode(&block).unwrap());
                    block.clear();
                }
            }
            at += FRAME_HEADER + len;
        }
        blocks
    }

    #[tokio::test]
    async fn a_path_authority_becomes_localhost_in_every_request() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &indexed_block(b"/run/k.sock", true),
        ));
        input.extend(frame(0x0, END_STREAM, 1, b"hello")); // DATA
                                                           // The second request refers to the dynamic table, split in two frames.
        let second = indexed_block(b"", false);
        input.extend(frame(HEADERS, 0, 3, &second[..3]));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &second[3..]));
        let out = pass(input).await;
        let blocks = headers_of(&out);
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            let auth: Vec<_> = b.iter().filter(|(n, _)| n == b":authority").collect();
            assert_eq!(auth.len(), 1);
            assert_eq!(auth[0].1, b"localhost");
            assert!(b.iter().any(|(n, v)| n == b":path" && v == b"/a/Ba"));
        }
        // The DATA frame is unchanged.
        assert!(out.windows(5).any(|w| w == b"hello"));
    }

    #[tokio::test]
    async fn a_valid_authority_passes_every_byte_untouched() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &indexed_block(b"localhost:50051", true),
        ));
        input.extend(frame(HEADERS, END_HEADERS, 3, &indexed_block(b"", false)));
        input.extend(frame(0x0, END_STREAM, 3, b"x"));
        assert_eq!(pass(input.clone()).await, input);
    }

    #[tokio::test]
    async fn garbage_is_refused_or_passed_never_a_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let mut input = PREFACE.to_vec();
            let n = rng.random_range(0..64);
            let mut block = indexed_block(b"/x", true);
            for _ in 0..rng.random_range(0..4) {
                let i = rng.random_range(0..block.len());
                block[i] = rng.random();
            }
            input.extend(frame(HEADERS, rng.random::<u8>() | END_HEADERS, 1, &block));
            input.extend((0..n).map(|_| rng.random::<u8>()));
            let _ = through(&input).await;
        }
    }
}
