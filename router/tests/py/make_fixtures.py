"""Writes the recorded msgpack fixtures of router/tests/ingest_fixtures.rs.

Run once with the vllm==0.32.0 interpreter:
  $KVTIER_PYTHON router/tests/py/make_fixtures.py router/tests/fixtures
The bytes are committed; this script documents where they came from.

- vllm032_map.msgpack: vLLM 0.32.0's own classes (map encoding, tagged by
  "type", defaults omitted), byte hashes, LoRA, CPU medium, group_idx.
- legacy_array.msgpack: the array_like encoding vLLM shipped before the map
  encoding (and SGLang still ships): [ts, events, dp_rank], positional events
  with integer hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES style), negative
  ones included.
- legacy_short.msgpack: the oldest array_like shape: [ts, events] and a
  BlockStored without medium / lora_name.
"""

import os
import sys

import msgspec
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)


# The array_like shapes of earlier releases, declared here as they shipped.
class LegacyBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(LegacyEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class LegacyBlockRemoved(LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class LegacyAllBlocksCleared(LegacyEvent, tag="AllBlocksCleared"):
    pass


class OldestBlockStored(LegacyEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class OldestBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    enc = msgspec.msgpack.Encoder()

    h1 = bytes(range(32))
    h2 = bytes(range(32, 64))
    h3 = bytes(range(64, 80))  # 16 bytes, like xxhash_cbor
    batch = KVEventBatch(
        ts=1700000000.5,
        events=[
            BlockStored(
                block_hashes=[h1, h2],
                parent_block_hash=None,
                token_ids=list(range(8)),
                block_size=4,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            BlockStored(
                block_hashes=[h3],
                parent_block_hash=h2,
                token_ids=[100, 101, 102, 103],
                block_size=4,
                lora_id=7,
                medium="CPU",
                lora_name="sql-lora",
                extra_keys=[("sql-lora",)],
                group_idx=1,
                kv_cache_spec_kind="full_attention",
            ),
            BlockRemoved(block_hashes=[h1], medium=None, group_idx=0),
            AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )
    with open(os.path.join(out_dir, "vllm032_map.msgpack"), "wb") as f:
        f.write(enc.encode(batch))

    legacy = LegacyBatch(
        ts=1700000001.0,
        events=[
            LegacyBlockStored(
                block_hashes=[1, -2],
                parent_block_hash=-9223372036854775808,
                token_ids=[1, 2, 3, 4],
                block_size=2,
                lora_id=None,
                medium=None,
                lora_name=None,
            ),
            LegacyBlockStored(
                block_hashes=[18446744073709551615],
                parent_block_hash=-2,
                token_ids=[5, 6],
                block_size=2,
                lora_id=None,
                medium="cpu",
                lora_name="ad",
            ),
            LegacyBlockRemoved(block_hashes=[1], medium="GPU"),
            LegacyAllBlocksCleared(),
        ],
        data_parallel_rank=1,
    )
    with open(os.path.join(out_dir, "legacy_array.msgpack"), "wb") as f:
        f.write(enc.encode(legacy))

    oldest = OldestBatch(
        ts=1.0,
        events=[
            OldestBlockStored(
                block_hashes=[10, 11],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4, 5, 6],
                block_size=3,
                lora_id=3,
            )
        ],
    )
    with open(os.path.join(out_dir, "legacy_short.msgpack"), "wb") as f:
        f.write(enc.encode(oldest))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "router/tests/fixtures")
