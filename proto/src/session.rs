//! Binary messages on the pool socket (`<socket>.pool`), after the handshake.
//!
//! The scheduler asks kvbm "how much of this chain do you hold?" once per new
//! request, with up to thousands of 32-byte keys, and waits for the answer
//! before it can schedule. Over gRPC that round trip costs HTTP/2 framing,
//! protobuf and two async hops on each side; this framing is a length, an op
//! and the keys back to back, answered by a thread that blocks on the socket.
//! The daemon and the client both encode and decode through this module, so
//! the format has one definition (described for humans in `docs/wire.md`).
//!
//! Every message is a frame `[len: u32 LE][kind: u8][body: len - 1 bytes]`.
//! A request's kind is its op; a reply's kind is a status, `0` for success
//! and otherwise the gRPC status code the same failure gets over gRPC.
//!
//! The offload path's Reserve, Commit and Abort use the same framing (the
//! connection is the session, so no session id travels). Acquire and Release
//! stay on gRPC: an Acquire may wait on disk reads, which the async server
//! overlaps and a session thread would not.

/// The largest frame either side accepts (16 MiB: 500k 32-byte keys).
pub const MAX_FRAME: usize = 16 << 20;

/// Op: longest present prefix of a key chain.
pub const OP_LOOKUP: u8 = 1;
/// Op: reserve pool slots for new blocks of this session.
pub const OP_RESERVE: u8 = 2;
/// Op: commit reserved blocks of this session.
pub const OP_COMMIT: u8 = 3;
/// Op: abort reserved blocks of this session.
pub const OP_ABORT: u8 = 4;

/// Reply kind for success.
pub const STATUS_OK: u8 = 0;
/// Reply kind for a malformed request (gRPC `INVALID_ARGUMENT`).
pub const STATUS_INVALID: u8 = 3;
/// Reply kind for an answer too large to send (gRPC `RESOURCE_EXHAUSTED`).
pub const STATUS_RESOURCE_EXHAUSTED: u8 = 8;

/// A decoded Lookup, Commit or Abort request (a namespace and keys); the
/// keys are views into the frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Keys<'a> {
    pub namespace: &'a str,
    pub keys: Vec<&'a [u8]>,
}

/// A decoded Reserve request: keys, each block's parent (empty for a root)
/// and `tokens_per_block` token ids per block (none at all when 0).
#[derive(Debug, PartialEq, Eq)]
pub struct Reserve<'a> {
    pub namespace: &'a str,
    pub keys: Vec<&'a [u8]>,
    pub parents: Vec<&'a [u8]>,
    pub tokens_per_block: usize,
    pub tokens: Vec<u32>,
}

/// A Lookup's answer: blocks of the chain present in any tier, the
/// prefixes wholly in host memory and wholly on disk, and the prefix held on
/// this node (each block in host memory or on disk): blocks
/// `[local, matched)` are only in the shared object store (G4), which reads
/// at its own, usually slower, rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupCounts {
    pub matched: u32,
    pub host: u32,
    pub disk: u32,
    pub local: u32,
}

impl From<&crate::v1::LookupResponse> for LookupCounts {
    /// The counts of a gRPC answer: `local` ends at the first block whose
    /// fastest tier is the object store. Blocks without a location (an
    /// answer that lists none) count as local, as in a 3-value reply.
    fn from(r: &crate::v1::LookupResponse) -> LookupCounts {
        let prefix = |tier: crate::v1::Tier| {
            r.tiers
                .iter()
                .find(|t| t.tier == tier as i32)
                .map_or(0, |t| t.blocks)
        };
        let remote = crate::v1::Tier::Remote as i32;
        let local = r
            .locations
            .iter()
            .take(r.matched as usize)
            .position(|&t| t == remote)
            .map_or(r.matched, |i| i as u32);
        LookupCounts {
            matched: r.matched,
            host: prefix(crate::v1::Tier::Host),
            disk: prefix(crate::v1::Tier::Disk),
            local,
        }
    }
}

/// Appends a Lookup request frame to `buf`. Every key must have the length
/// of the first (vLLM's block hashes do); a key of another length, or more
/// than [`MAX_FRAME`] in all, is an error and leaves `buf` as it was.
pub fn encode_lookup<'k>(
    buf: &mut Vec<u8>,
    namespace: &str,
    keys: impl ExactSizeIterator<Item = &'k [u8]>,
) -> Result<(), String> {
    encode_keys(buf, OP_LOOKUP, namespace, keys)
}

/// Appends a request frame of op `op` whose body is a namespace and keys
/// (Lookup, Commit, Abort); errors as for [`encode_lookup`].
pub fn encode_keys<'k>(
    buf: &mut Vec<u8>,
    op: u8,
    namespace: &str,
    keys: impl ExactSizeIterator<Item = &'k [u8]>,
) -> Result<(), String> {
    let start = begin_frame(buf, op);
    let res = write_keys(buf, namespace, keys).and_then(|()| end_frame(buf, start));
    if res.is_err() {
        buf.truncate(start);
    }
    res
}

/// Appends a Reserve request frame: `parents[i]` is block i's parent key
/// (empty for a root), `tokens` holds `tokens_per_block` ids per block, or
/// is empty. Errors leave `buf` as it was.
pub fn encode_reserve<'k>(
    buf: &mut Vec<u8>,
    namespace: &str,
    keys: impl ExactSizeIterator<Item = &'k [u8]>,
    parents: impl ExactSizeIterator<Item = &'k [u8]>,
    tokens: &[u32],
    tokens_per_block: usize,
) -> Result<(), String> {
    let start = begin_frame(buf, OP_RESERVE);
    let count = keys.len();
    let res = (|| {
        if parents.len() != count {
            return Err(format!("{count} keys but {} parents", parents.len()));
        }
        let tpb = if tokens.is_empty() {
            0
        } else {
            tokens_per_block
        };
        if tokens.len() != count * tpb {
            return Err(format!(
                "{} token ids for {count} blocks of {tokens_per_block}",
                tokens.len()
            ));
        }
        write_keys(buf, namespace, keys)?;
        for p in parents {
            let len = u8::try_from(p.len()).map_err(|_| format!("parent of {} bytes", p.len()))?;
            buf.push(len);
            buf.extend_from_slice(p);
        }
        buf.extend_from_slice(&(tpb as u32).to_le_bytes());
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        end_frame(buf, start)
    })();
    if res.is_err() {
        buf.truncate(start);
    }
    res
}

/// Starts a frame of `kind` in `buf`: a length placeholder that
/// [`end_frame`] fills in. Returns where the frame starts.
fn begin_frame(buf: &mut Vec<u8>, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    start
}

/// Writes the length of the frame begun at `start`, refusing one over
/// [`MAX_FRAME`].
fn end_frame(buf: &mut [u8], start: usize) -> Result<(), String> {
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        return Err(format!("request of {len} bytes exceeds the frame limit"));
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Writes `[ns_len][namespace][key_len][count][keys]`.
fn write_keys<'k>(
    buf: &mut Vec<u8>,
    namespace: &str,
    mut keys: impl ExactSizeIterator<Item = &'k [u8]>,
) -> Result<(), String> {
    let ns_len = u16::try_from(namespace.len()).map_err(|_| "namespace name too long")?;
    let count = keys.len();
    let first = keys.next();
    let key_len = first.map_or(0, <[u8]>::len);
    let key_len_u8 = u8::try_from(key_len).map_err(|_| format!("key of {key_len} bytes"))?;
    if count.saturating_mul(key_len) > MAX_FRAME {
        return Err(format!("request of {count} keys exceeds the frame limit"));
    }
    buf.reserve(2 + namespace.len() + 1 + 4 + count * key_len);
    buf.extend_from_slice(&ns_len.to_le_bytes());
    buf.extend_from_slice(namespace.as_bytes());
    buf.push(key_len_u8);
    buf.extend_from_slice(&(count as u32).to_le_bytes());
    for k in first.into_iter().chain(keys) {
        if k.len() != key_len {
            return Err(format!(
                "keys of one lookup must have one length: {} and {}",
                key_len,
                k.len()
            ));
        }
        buf.extend_from_slice(k);
    }
    Ok(())
}

/// Decodes the body (after the op byte) of a Lookup, Commit or Abort.
pub fn decode_keys(body: &[u8]) -> Result<Keys<'_>, String> {
    let mut r = Reader(body);
    let k = read_keys(&mut r)?;
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the keys", r.0.len()));
    }
    Ok(k)
}

/// Decodes the body (after the op byte) of a Reserve.
pub fn decode_reserve(body: &[u8]) -> Result<Reserve<'_>, String> {
    let mut r = Reader(body);
    let Keys { namespace, keys } = read_keys(&mut r)?;
    let mut parents = Vec::with_capacity(keys.len());
    for _ in 0..keys.len() {
        let len = r.take::<1>()?[0] as usize;
        parents.push(r.bytes(len)?);
    }
    let tokens_per_block = u32::from_le_bytes(r.take::<4>()?) as usize;
    let n = tokens_per_block
        .checked_mul(keys.len())
        .ok_or_else(|| "token count overflows".to_string())?;
    if r.0.len() != n * 4 {
        return Err(format!(
            "reserve announces {n} token ids but carries {} bytes",
            r.0.len()
        ));
    }
    let tokens =
        r.0.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
    Ok(Reserve {
        namespace,
        keys,
        parents,
        tokens_per_block,
        tokens,
    })
}

fn read_keys<'a>(r: &mut Reader<'a>) -> Result<Keys<'a>, String> {
    let ns_len = u16::from_le_bytes(r.take::<2>()?) as usize;
    let namespace = std::str::from_utf8(r.bytes(ns_len)?)
        .map_err(|_| "namespace name is not UTF-8".to_string())?;
    let key_len = r.take::<1>()?[0] as usize;
    let count = u32::from_le_bytes(r.take::<4>()?) as usize;
    let need = key_len
        .checked_mul(count)
        .ok_or_else(|| "key count overflows".to_string())?;
    if r.0.len() < need {
        return Err(format!(
            "request announces {count} keys of {key_len} bytes but carries {} bytes",
            r.0.len()
        ));
    }
    let keys = if count == 0 {
        Vec::new()
    } else if key_len == 0 {
        return Err("keys of 0 bytes".into());
    } else {
        r.bytes(need)?.chunks_exact(key_len).collect()
    };
    Ok(Keys { namespace, keys })
}

/// Appends a success reply to a Lookup.
pub fn encode_lookup_reply(buf: &mut Vec<u8>, c: LookupCounts) {
    let start = begin_frame(buf, STATUS_OK);
    for v in [c.matched, c.host, c.disk, c.local] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    reply_done(buf, start);
}

/// Ends a reply frame: replies are built by the daemon from bounded
/// requests; one that still came out over the limit is replaced by an error
/// reply, never sent with a length the client would refuse.
fn reply_done(buf: &mut Vec<u8>, start: usize) {
    if let Err(msg) = end_frame(buf, start) {
        buf.truncate(start);
        encode_error(
            buf,
            STATUS_RESOURCE_EXHAUSTED,
            &format!("reply too large: {msg}"),
        );
    }
}

/// Appends a success reply carrying one count (Commit, Abort).
pub fn encode_count_reply(buf: &mut Vec<u8>, n: u32) {
    let start = begin_frame(buf, STATUS_OK);
    buf.extend_from_slice(&n.to_le_bytes());
    reply_done(buf, start);
}

/// Appends a success reply carrying slots `(offset, length)` (Reserve).
pub fn encode_slots_reply(buf: &mut Vec<u8>, slots: impl ExactSizeIterator<Item = (u64, u64)>) {
    let start = begin_frame(buf, STATUS_OK);
    buf.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for (off, len) in slots {
        buf.extend_from_slice(&off.to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
    }
    reply_done(buf, start);
}

/// Decodes a count reply, or the daemon's `(status, message)`.
pub fn decode_count_reply(kind: u8, body: &[u8]) -> Result<u32, (u8, String)> {
    ok_body(kind, body)?;
    let mut r = Reader(body);
    r.take::<4>()
        .map(u32::from_le_bytes)
        .map_err(|e| (STATUS_INVALID, format!("malformed reply: {e}")))
}

/// Decodes a slots reply, or the daemon's `(status, message)`.
pub fn decode_slots_reply(kind: u8, body: &[u8]) -> Result<Vec<(u64, u64)>, (u8, String)> {
    ok_body(kind, body)?;
    let bad = |e: String| (STATUS_INVALID, format!("malformed reply: {e}"));
    let mut r = Reader(body);
    let n = u32::from_le_bytes(r.take::<4>().map_err(bad)?) as usize;
    if r.0.len() != n * 16 {
        return Err(bad(format!("{n} slots in {} bytes", r.0.len())));
    }
    Ok(r.0
        .chunks_exact(16)
        .map(|c| {
            let (o, l) = c.split_at(8);
            (
                u64::from_le_bytes(o.try_into().unwrap_or_default()),
                u64::from_le_bytes(l.try_into().unwrap_or_default()),
            )
        })
        .collect())
}

fn ok_body(kind: u8, body: &[u8]) -> Result<(), (u8, String)> {
    if kind != STATUS_OK {
        return Err((kind, String::from_utf8_lossy(body).into_owned()));
    }
    Ok(())
}

/// Appends an error reply: `status` is a gRPC code, `message` says why.
pub fn encode_error(buf: &mut Vec<u8>, status: u8, message: &str) {
    let start = begin_frame(buf, status);
    buf.extend_from_slice(&message.as_bytes()[..message.len().min(4096)]);
    // At most 4 KiB: always within the limit.
    let _ = end_frame(buf, start);
}

/// Decodes a reply frame's kind and body into the Lookup answer, or the
/// daemon's `(status, message)`. A daemon without the object-store count
/// sends three values: everything it matched is then local.
pub fn decode_lookup_reply(kind: u8, body: &[u8]) -> Result<LookupCounts, (u8, String)> {
    ok_body(kind, body)?;
    let mut r = Reader(body);
    let mut next = || {
        r.take::<4>()
            .map(u32::from_le_bytes)
            .map_err(|e| (STATUS_INVALID, format!("malformed lookup reply: {e}")))
    };
    let (matched, host, disk) = (next()?, next()?, next()?);
    Ok(LookupCounts {
        matched,
        host,
        disk,
        local: next().unwrap_or(matched),
    })
}

/// Splits a frame header into `(body length after the kind byte, kind)`,
/// refusing frames over [`MAX_FRAME`] or without a kind byte.
pub fn decode_header(h: [u8; 5]) -> Result<(usize, u8), String> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(format!("frame of {len} bytes (limit {MAX_FRAME})"));
    }
    Ok((len - 1, h[4]))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(buf: &[u8]) -> (u8, &[u8]) {
        let (len, kind) = decode_header(buf[..5].try_into().unwrap()).unwrap();
        assert_eq!(buf.len(), 5 + len);
        (kind, &buf[5..])
    }

    #[test]
    fn lookup_round_trip() {
        let keys: Vec<[u8; 32]> = (0..100u8).map(|i| [i; 32]).collect();
        let mut buf = Vec::new();
        encode_lookup(&mut buf, "ns-a", keys.iter().map(|k| &k[..])).unwrap();
        let (kind, body) = frame(&buf);
        assert_eq!(kind, OP_LOOKUP);
        let l = decode_keys(body).unwrap();
        assert_eq!(l.namespace, "ns-a");
        assert_eq!(l.keys.len(), 100);
        assert_eq!(l.keys[7], &[7u8; 32][..]);

        let c = LookupCounts {
            matched: 9,
            host: 4,
            disk: 6,
            local: 6,
        };
        let mut rep = Vec::new();
        encode_lookup_reply(&mut rep, c);
        let (kind, body) = frame(&rep);
        assert_eq!(body.len(), 16);
        assert_eq!(decode_lookup_reply(kind, body), Ok(c));
    }

    /// A daemon that predates the object-store count answers three values:
    /// the whole match is then local, priced as host memory and disk.
    #[test]
    fn a_three_value_lookup_reply_is_all_local() {
        let body: Vec<u8> = [9u32, 4, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let c = decode_lookup_reply(STATUS_OK, &body).unwrap();
        assert_eq!(
            c,
            LookupCounts {
                matched: 9,
                host: 4,
                disk: 9,
                local: 9
            }
        );
        // Fewer than three is malformed; a partial fourth is ignored.
        assert!(decode_lookup_reply(STATUS_OK, &body[..11]).is_err());
        let mut longer = body.clone();
        longer.extend_from_slice(&[1, 2]);
        assert_eq!(decode_lookup_reply(STATUS_OK, &longer), Ok(c));
    }

    /// Over gRPC the local prefix is read from the blocks' locations: it
    /// ends at the first block only in the object store.
    #[test]
    fn counts_of_a_grpc_lookup() {
        use crate::v1::{LookupResponse, Tier, TierPrefix};
        let (h, d, r) = (Tier::Host as i32, Tier::Disk as i32, Tier::Remote as i32);
        let resp = |locations: Vec<i32>| LookupResponse {
            matched: locations.len() as u32,
            tiers: vec![
                TierPrefix { tier: h, blocks: 2 },
                TierPrefix { tier: d, blocks: 0 },
                TierPrefix { tier: r, blocks: 0 },
            ],
            locations,
        };
        let c = LookupCounts::from(&resp(vec![h, h, d, r, r]));
        assert_eq!((c.matched, c.host, c.disk, c.local), (5, 2, 0, 3));
        assert_eq!(LookupCounts::from(&resp(vec![r, r])).local, 0);
        assert_eq!(LookupCounts::from(&resp(vec![h, d])).local, 2);
        // No locations listed: nothing says the blocks are remote.
        let mut bare = resp(vec![h, d, r]);
        bare.locations.clear();
        assert_eq!(LookupCounts::from(&bare).local, 3);
    }

    #[test]
    fn reserve_round_trip_and_refusals() {
        let keys: Vec<[u8; 32]> = (1..=3u8).map(|i| [i; 32]).collect();
        let parents: Vec<&[u8]> = vec![&[], &keys[0], &keys[1]];
        let tokens: Vec<u32> = (0..48).collect();
        let reserve = |buf: &mut Vec<u8>, tokens: &[u32]| {
            let keys = keys.iter().map(|k| &k[..]);
            encode_reserve(buf, "ns", keys, parents.iter().copied(), tokens, 16)
        };
        let mut buf = Vec::new();
        reserve(&mut buf, &tokens).unwrap();
        let (kind, body) = frame(&buf);
        assert_eq!(kind, OP_RESERVE);
        let r = decode_reserve(body).unwrap();
        assert_eq!(r.namespace, "ns");
        assert_eq!(r.keys.len(), 3);
        assert_eq!(r.parents, parents);
        assert_eq!((r.tokens_per_block, r.tokens), (16, tokens.clone()));
        // Every truncation is an error, not a panic.
        for cut in 0..body.len() {
            assert!(decode_reserve(&body[..cut]).is_err(), "cut at {cut}");
        }
        // No tokens at all is fine; a wrong number is refused up front.
        let mut buf2 = Vec::new();
        reserve(&mut buf2, &[]).unwrap();
        assert!(decode_reserve(frame(&buf2).1).unwrap().tokens.is_empty());
        let mut buf3 = vec![7];
        let err = reserve(&mut buf3, &tokens[..40]).unwrap_err();
        assert!(err.contains("token ids"), "{err}");
        assert_eq!(buf3, vec![7]);
        // Slots and counts come back as sent.
        let mut rep = Vec::new();
        encode_slots_reply(&mut rep, [(4096u64, 2u64 << 20), (0, 0)].into_iter());
        let (kind, body) = frame(&rep);
        assert_eq!(
            decode_slots_reply(kind, body),
            Ok(vec![(4096, 2 << 20), (0, 0)])
        );
        assert!(decode_slots_reply(STATUS_OK, &body[..body.len() - 1]).is_err());
        let mut rep = Vec::new();
        encode_count_reply(&mut rep, 7);
        let (kind, body) = frame(&rep);
        assert_eq!(decode_count_reply(kind, body), Ok(7));
    }

    #[test]
    fn empty_chain_is_valid() {
        let mut buf = Vec::new();
        encode_lookup(&mut buf, "ns", std::iter::empty()).unwrap();
        let (_, body) = frame(&buf);
        assert!(decode_keys(body).unwrap().keys.is_empty());
    }

    #[test]
    fn mixed_key_lengths_are_refused_without_writing() {
        let a = [1u8; 32];
        let b = [2u8; 16];
        let mut buf = vec![9];
        let err = encode_lookup(&mut buf, "ns", [&a[..], &b[..]].into_iter()).unwrap_err();
        assert!(err.contains("one length"), "{err}");
        assert_eq!(buf, vec![9]);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let mut buf = Vec::new();
        encode_lookup(&mut buf, "ns", [&[1u8; 32][..], &[2u8; 32][..]].into_iter()).unwrap();
        let body = &buf[5..];
        // Every truncation is refused, none panics.
        for cut in 0..body.len() {
            assert!(decode_keys(&body[..cut]).is_err(), "cut at {cut}");
        }
        // Count larger than the keys carried.
        let mut lying = body.to_vec();
        let count_at = 2 + 2 + 1;
        lying[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_keys(&lying).is_err());
        // Zero-length keys with a count.
        let zero = [0u8, 0, 0, 5, 0, 0, 0];
        assert!(decode_keys(&zero).is_err());
        // Namespace not UTF-8.
        let bad_ns = [1u8, 0, 0xff, 1, 0, 0, 0, 0];
        assert!(decode_keys(&bad_ns).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn headers_outside_limits_are_refused() {
        assert!(decode_header([0, 0, 0, 0, 1]).is_err());
        let [a, b, c, d] = u32::MAX.to_le_bytes();
        assert!(decode_header([a, b, c, d, 1]).is_err());
        assert_eq!(decode_header([3, 0, 0, 0, 7]), Ok((2, 7)));
    }

    /// Every decoder, fed valid frames with random bytes flipped, cut off,
    /// repeated or appended: an answer or an error, never a panic, and what
    /// a decoded request holds always fits in the bytes it came from.
    #[test]
    fn mutated_frames_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let keys: Vec<[u8; 16]> = (0..6u8).map(|i| [i; 16]).collect();
        let parents: Vec<&[u8]> = vec![&[], &keys[0], &keys[1], &keys[2], &keys[3], &keys[4]];
        let tokens: Vec<u32> = (0..24).collect();
        let mut seeds = Vec::new();
        let mut buf = Vec::new();
        encode_lookup(&mut buf, "ns", keys.iter().map(|k| &k[..])).unwrap();
        seeds.push(buf.clone());
        buf.clear();
        let ks = keys.iter().map(|k| &k[..]);
        encode_reserve(&mut buf, "ns", ks, parents.iter().copied(), &tokens, 4).unwrap();
        seeds.push(buf.clone());
        buf.clear();
        encode_slots_reply(&mut buf, [(4096u64, 8192u64), (0, 0)].into_iter());
        seeds.push(buf.clone());
        buf.clear();
        encode_lookup_reply(&mut buf, LookupCounts::default());
        seeds.push(buf.clone());

        for _ in 0..200_000 {
            let mut f = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                if f.is_empty() {
                    f.push(rng.random());
                }
                match rng.random_range(0..4) {
                    0 => {
                        let i = rng.random_range(0..f.len());
                        f[i] = rng.random();
                    }
                    1 => f.truncate(rng.random_range(0..f.len().max(1))),
                    2 => f.extend((0..rng.random_range(1..9)).map(|_| rng.random::<u8>())),
                    _ => {
                        // A plausible count or length in a random place.
                        let i = rng.random_range(0..f.len());
                        let v: u32 = *[0, 1, 255, 65535, u32::MAX, 1 << 24]
                            .get(rng.random_range(0..6))
                            .unwrap();
                        for (j, b) in v.to_le_bytes().into_iter().enumerate() {
                            if let Some(x) = f.get_mut(i + j) {
                                *x = b;
                            }
                        }
                    }
                }
            }
            if f.len() >= 5 {
                let _ = decode_header(f[..5].try_into().unwrap());
            }
            let body = f.get(5..).unwrap_or(&[]);
            if let Ok(k) = decode_keys(body) {
                let held: usize = k.keys.iter().map(|k| k.len()).sum();
                assert!(held + k.namespace.len() <= body.len());
            }
            if let Ok(r) = decode_reserve(body) {
                assert!(r.tokens.len() * 4 <= body.len());
                assert_eq!(r.parents.len(), r.keys.len());
            }
            let kind = f.get(4).copied().unwrap_or(0);
            if let Ok(slots) = decode_slots_reply(kind, body) {
                assert!(slots.len() * 16 <= body.len());
            }
            let _ = decode_count_reply(kind, body);
            let _ = decode_lookup_reply(kind, body);
        }
    }

    #[test]
    fn error_replies_carry_status_and_message() {
        let mut rep = Vec::new();
        encode_error(&mut rep, 5, "unknown namespace \"x\"");
        let (kind, body) = frame(&rep);
        assert_eq!(
            decode_lookup_reply(kind, body),
            Err((5, "unknown namespace \"x\"".to_string()))
        );
        // A short success body is an error, not a panic.
        assert!(decode_lookup_reply(STATUS_OK, &[1, 2, 3]).is_err());
    }
}
