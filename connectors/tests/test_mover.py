"""The connector's copy path alone: whole blocks between vLLM-layout KV views
and a pool buffer, in chunks (``copy_chunk_mb``) that must not change a byte."""

import os

import pytest
import torch

from kvtier.mover import Mover, runs

DEVICE = os.environ.get("KVTIER_TEST_DEVICE", "cpu")


def layers(num_blocks=40, num_layers=3, kv_first=False):
    """Per-layer block-first views [blocks, 2 (K/V), block_size, heads,
    head_dim] with distinct contents: of block-first tensors, or with
    ``kv_first`` of vLLM's FlashAttention layout [2, blocks, ...], where a
    block's K and V pages lie apart."""
    g = torch.Generator().manual_seed(7)
    shape = (2, num_blocks, 16, 2, 8) if kv_first else (num_blocks, 2, 16, 2, 8)
    out = []
    for _ in range(num_layers):
        t = torch.randn(shape, generator=g).to(torch.bfloat16).to(DEVICE)
        out.append(t.movedim(1, 0) if kv_first else t)
    return out


@pytest.mark.parametrize("kv_first", [False, True])
@pytest.mark.parametrize("chunk_blocks", [0, 1, 3, 7, 11, 100])
def test_chunked_save_and_load_are_byte_identical(chunk_blocks, kv_first):
    src = layers(kv_first=kv_first)
    assert len(Mover(src, torch.zeros(0, dtype=torch.uint8)).pieces) == 3 * (1 + kv_first)
    block_bytes = sum(t[0].numel() * t.element_size() for t in src)
    pool = torch.zeros(64 * block_bytes, dtype=torch.uint8)
    mover = Mover(src, pool, chunk_bytes=chunk_blocks * block_bytes)
    assert mover.block_bytes == block_bytes
    assert mover.word == torch.int64  # 512-byte rows: moved as 8-byte words
    assert mover.chunk_blocks == chunk_blocks

    # Scattered engine blocks into slots with adjacent runs and gaps.
    ids = [5, 0, 17, 3, 39, 22, 8, 9, 10, 31, 12]
    slots = [0, 1, 2, 6, 7, 8, 20, 21, 40, 41, 63]
    offsets = [s * block_bytes for s in slots]
    mover.save(ids, offsets).wait()

    # Each slot holds its block's layers, layer after layer.
    for b, s in zip(ids, slots):
        expect = torch.cat([t[b].contiguous().view(torch.uint8).flatten().cpu() for t in src])
        assert torch.equal(pool[s * block_bytes : (s + 1) * block_bytes], expect)

    dst = [t.clone().zero_() for t in src]  # the same layout
    back = Mover(dst, pool, chunk_bytes=chunk_blocks * block_bytes)
    targets = [1, 2, 3, 4, 5, 6, 30, 31, 32, 33, 34]
    back.load(targets, offsets).wait()
    assert back.chunk_blocks == chunk_blocks  # loads go in one piece regardless
    for t_src, t_dst in zip(src, dst):
        assert torch.equal(t_dst[targets], t_src[ids])
        untouched = [i for i in range(t_dst.shape[0]) if i not in targets]
        assert not t_dst[untouched].any()


def test_chunk_smaller_than_a_block_moves_one_block_at_a_time():
    src = layers(num_blocks=4)
    pool = torch.zeros(4 * 4096 * 8, dtype=torch.uint8)
    mover = Mover(src, pool, chunk_bytes=1)
    assert mover.chunk_blocks == 1


def test_scattered_layout_is_refused():
    t = torch.zeros((4, 8, 70), dtype=torch.bfloat16).transpose(1, 2)  # page [70, 8], columns apart
    with pytest.raises(ValueError, match="unsupported KV layout"):
        Mover([t], torch.zeros(1024, dtype=torch.uint8))


def test_layers_of_different_layouts_are_refused():
    a = torch.zeros((4, 2, 16), dtype=torch.bfloat16)  # one piece per block
    b = torch.zeros((2, 4, 16), dtype=torch.bfloat16).movedim(1, 0)  # K and V apart
    with pytest.raises(ValueError, match="unsupported KV layout"):
        Mover([a, b], torch.zeros(1024, dtype=torch.uint8))


def test_slot_outside_the_pool_is_refused():
    src = layers(num_blocks=4)
    mover = Mover(src, torch.zeros(1024, dtype=torch.uint8))
    with pytest.raises(ValueError, match="outside the pool"):
        mover.save([0], [0])


def test_runs_groups_adjacent_slots():
    assert runs([0, 10, 20, 40, 50, 5], 10) == [(0, 3, 0), (3, 2, 40), (5, 1, 5)]
    assert runs([], 10) == []
