#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/corpus/<target>/: valid encodings of
each format, built from the layouts the decoders document (docs/wire.md,
kvbm/src/disk/entry.rs, kvbm/src/catalog/mod.rs, kvbm/src/remote/segment.rs) and the recorded vLLM
batches in router/tests/fixtures. The seeds are committed; run this again
only when a format changes."""

import json
import pathlib
import struct

root = pathlib.Path(__file__).resolve().parent
fixtures = root.parent / "router" / "tests" / "fixtures"
batches = {p.stem: p.read_bytes() for p in sorted(fixtures.glob("*.msgpack"))}


def write(target, name, data):
    d = root / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# --- pool_frame: [len u32 LE][kind u8][body] ---------------------------------
def frame(kind, body):
    return struct.pack("<IB", len(body) + 1, kind) + body


def keys_body(ns, keys):
    klen = len(keys[0]) if keys else 0
    return struct.pack("<H", len(ns)) + ns + struct.pack("<BI", klen, len(keys)) + b"".join(keys)


keys = [bytes([i]) * 16 for i in range(1, 4)]
write("pool_frame", "lookup", frame(1, keys_body(b"ns", keys)))
write("pool_frame", "commit_empty", frame(3, keys_body(b"default", [])))
parents = [b"", keys[0], keys[1]]
reserve = keys_body(b"ns", keys) + b"".join(bytes([len(p)]) + p for p in parents)
reserve += struct.pack("<I", 2) + b"".join(struct.pack("<I", t) for t in range(6))
write("pool_frame", "reserve", frame(2, reserve))
write("pool_frame", "lookup_reply", frame(0, struct.pack("<IIII", 3, 2, 1, 2)))
write("pool_frame", "lookup_reply_3", frame(0, struct.pack("<III", 3, 2, 1)))
write("pool_frame", "slots_reply", frame(0, struct.pack("<IQQQQ", 2, 4096, 8192, 0, 0)))
write("pool_frame", "count_reply", frame(0, struct.pack("<I", 7)))
write("pool_frame", "error_reply", frame(5, b'unknown namespace "x"'))

# --- disk_header: [mode][4 KiB page]; mode 1: the target fixes the checksum --
def header(key, ns=7, generation=42, offset=64 << 20, length=2 << 20, checksum=0xDEADBEEF):
    h = b"KVTG3ENT" + struct.pack("<IIQQIB3xQ", 1, ns, generation, offset, length, len(key), checksum)
    h += key.ljust(32, b"\0")
    return h.ljust(4096, b"\0")


write("disk_header", "key32", b"\x01" + header(bytes(range(32))))
write("disk_header", "key0", b"\x01" + header(b"", length=0))

# --- catalog_record: [key len][ns BE + key][value v1] -------------------------
def record(disk, parent, tokens):
    v = struct.pack("<BQQI", 1, 2 << 20, 0xDEADBEEF, 5)
    v += struct.pack("<BIQQI", 1, 3, 9, 4096, 2 << 20) if disk else b"\0"
    v += bytes([len(parent)]) + parent + struct.pack("<I", len(tokens))
    return v + b"".join(struct.pack("<I", t) for t in tokens)


key = struct.pack(">I", 7) + b"\x01" * 32
write("catalog_record", "on_disk", bytes([len(key)]) + key + record(True, b"\x02" * 32, range(16)))
key = struct.pack(">I", 1) + b"\x09" * 16
write("catalog_record", "in_memory", bytes([len(key)]) + key + record(False, b"", []))

# --- msgpack and engine_batch: recorded vLLM batches -------------------------
for name, b in batches.items():
    write("msgpack", name, b)
    write("engine_batch", name, b"\x40" + b)
write("engine_batch", "limit1_" + next(iter(batches)), b"\x01" + next(iter(batches.values())))

# --- zmtp: [mode][bytes]; mode bit 0: the target sends the handshake first ---
def zframe(body, flags=0):
    if len(body) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def command(name, data=b""):
    return zframe(bytes([len(name)]) + name + data, 4)


def message(*frames):
    return b"".join(zframe(f, 1 if i + 1 < len(frames) else 0) for i, f in enumerate(frames))


greeting = b"\xff" + b"\0" * 8 + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32
ready = command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", 3) + b"PUB")
live = b"".join(
    message(b"kv@0", struct.pack(">Q", seq), b) for seq, b in enumerate(batches.values())
)
write("zmtp", "after_handshake", b"\x01" + live + command(b"PING", b"\x00\x64ctx"))
write("zmtp", "with_handshake", b"\x00" + greeting + ready + live)
write("zmtp", "dealer_replay", b"\x03" + message(b"", struct.pack(">Q", 0), next(iter(batches.values()))))
write("zmtp", "oversized", b"\x01" + message(*[b"x" * 300] * 5) + command(b"ERROR", b"\x03bye"))


# --- route_body: OpenAI-style JSON bodies of POST /v1/route and ext_proc -----
write("route_body", "chat", json.dumps({
    "model": "m", "messages": [{"role": "user", "content": "hi"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "add_generation_prompt": False, "chat_template_kwargs": {"enable_thinking": False},
}, separators=(",", ":")).encode())
write("route_body", "prompt", b'{"model":"m","prompt":"hello world"}')
write("route_body", "tokens", b'{"model":"m","token_ids":[1,2,3],"lora_name":"l","cache_salt":"s"}')
write("route_body", "prompt_ids", b'{"model":"m","prompt":[1,2,3]}')


# --- kvbm_events: messages [len u16 LE][EventBatch protobuf] ------------------
def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def field(num, data):
    """A protobuf field: bytes are length-delimited, ints varints."""
    if isinstance(data, int):
        return varint(num << 3) + varint(data)
    return varint(num << 3 | 2) + varint(len(data)) + data


def stored(tier, keys, parent, tokens, per_block, ns=b"ns", model=b""):
    body = field(1, tier) + field(2, ns) + (field(3, model) if model else b"")
    body += b"".join(field(4, k) for k in keys) + (field(5, parent) if parent else b"")
    body += field(6, b"".join(varint(t) for t in tokens)) + field(7, per_block)
    return field(1, body)


def removed(tier, keys, ns=b"ns"):
    return field(2, field(1, tier) + field(2, ns) + b"".join(field(3, k) for k in keys))


def cleared(tier):
    return field(3, field(1, tier) if tier else b"")


def batch(inc, seq, events, snapshot=False):
    body = field(1, inc) + (field(2, seq) if seq else b"")
    body += b"".join(field(3, e) for e in events) + (field(4, 1) if snapshot else b"")
    return struct.pack("<H", len(body)) + body


k = [bytes([i]) * 32 for i in range(1, 5)]
write("kvbm_events", "live", batch(b"inc-1", 1, [stored(2, k[:2], b"", range(32), 16)])
      + batch(b"inc-1", 2, [stored(3, k[2:], k[1], range(32), 16), removed(2, k[:1])]))
write("kvbm_events", "snapshot_then_live",
      batch(b"inc-2", 5, [cleared(0), stored(2, k, b"", range(64), 16, model=b"m")], snapshot=True)
      + batch(b"inc-2", 6, [cleared(3), removed(2, k[3:])]))
write("kvbm_events", "gap_and_restart", batch(b"inc-1", 1, [stored(4, k[:1], b"", range(16), 16)])
      + batch(b"inc-1", 3, [removed(4, k[:1])]) + batch(b"inc-9", 1, [stored(1, k[:1], b"", range(16), 16)]))


# --- remote_segment: [mode]; mode 1: [footer_at u64][footer]; mode 0: an
# object's tail (footer + trailer; the trailer's checksum is not computed here,
# so mode 0 seeds reach the trailer checks only) ----------------------------
# Format version 3: each entry has a codec byte (bits 0-1: none, lz4, zstd;
# bit 7: encrypted) and the raw length (equal to the stored length for codec 0);
# an encrypted block's token ids are sealed: u32 length, then key id (8), nonce
# (12), ciphertext (4 per token), tag (16) -- opaque to the decoder.
def sealed(tokens):
    n = 8 + 12 + 4 * len(tokens) + 16
    return bytes((0x5A + 7 * i) & 0xFF for i in range(n))


def footer(names, blocks):
    out = struct.pack("<H", len(names)) + b"".join(struct.pack("<H", len(n)) + n for n in names)
    out += struct.pack("<I", len(blocks))
    for ns, off, length, codec, raw_len, key, parent, tokens in blocks:
        out += struct.pack("<HQIQBI", ns, off, length, 0x1234, codec, raw_len)
        out += bytes([len(key)]) + key
        out += bytes([len(parent)]) + parent
        if codec & 0x80:
            out += struct.pack("<I", len(sealed(tokens))) + sealed(tokens)
        else:
            out += struct.pack("<I", len(tokens)) + b"".join(struct.pack("<I", t) for t in tokens)
    return out


codecs = [(0x00, None), (0x01, 8192), (0x82, 8192), (0x80, 4003 - 36)]
chain = [(i % 2, 4096 * (i + 1), 4000 + i, codecs[i][0], codecs[i][1] or 4000 + i, k[i],
          k[i - 1] if i else b"", range(16 * i, 16 * i + 16))
         for i in range(4)]
body = footer([b"llama/tp0", b"llama/tp1"], chain)
write("remote_segment", "footer", b"\x01" + struct.pack("<Q", 5 * 4096) + body)
write("remote_segment", "footer_one", b"\x01" + struct.pack("<Q", 2 * 4096)
      + footer([b"n"], [(0, 4096, 1, 0, 1, b"\x01", b"", [])]))
empty = footer([b"n"], [])  # blocks would not fit under -max_len=8192
trailer = struct.pack("<QIIQ", 4096, len(empty), 3, 0) + b"KVTG4END"
write("remote_segment", "tail", b"\x00" + b"\x00" * 4096 + empty + trailer)
