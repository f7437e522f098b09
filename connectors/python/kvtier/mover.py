"""Batched copies between vLLM's paged KV tensors and kvbm's shared pool.

Slot format (one kvbm block): the block's bytes of every layer, layer after
layer in the engine's layer order; a layer's part is the block's page of the
per-layer view in that view's logical element order (``view[block]``). The
view's per-block shape is part of the namespace's registered layout, so
engines whose views differ never share blocks.

A transfer of n blocks is, per layer, one gather (``index_select``) into a
staging tensor ``[n, layers, layer_bytes]`` (or one scatter, ``index_copy_``,
out of it), and one copy per run of adjacent pool slots between the staging
tensor and the pool: never one copy per small chunk. On CUDA the work runs on
a side stream that first waits for the engine's stream (the forward pass that
wrote the blocks), and completes asynchronously: callers poll the returned
``Transfer``.
"""

import ctypes
from dataclasses import dataclass, field

import torch


def block_dim(t: torch.Tensor, num_blocks: int) -> int:
    """The dimension of a per-layer KV view that indexes blocks."""
    for d in (0, 1):
        if t.dim() > d and t.shape[d] == num_blocks:
            return d
    for d in range(t.dim()):
        if t.shape[d] == num_blocks:
            return d
    raise ValueError(
        f"kvtier: no dimension of size num_blocks={num_blocks} in a KV "
        f"tensor of shape {tuple(t.shape)}"
    )


def pool_tensor(address: int, size: int) -> torch.Tensor:
    """A uint8 tensor over the pool mapping (no copy)."""
    buf = (ctypes.c_uint8 * size).from_address(address)
    return torch.frombuffer(buf, dtype=torch.uint8, count=size)


def runs(offsets: list[int], length: int) -> list[tuple[int, int, int]]:
    """Groups slot i..j whose pool offsets are adjacent: (first, count, offset)."""
    out = []
    i = 0
    n = len(offsets)
    while i < n:
        j = i + 1
        while j < n and offsets[j] == offsets[j - 1] + length:
            j += 1
        out.append((i, j - i, offsets[i]))
        i = j
    return out


@dataclass
class Transfer:
    """One batched copy in flight; ``done()`` once its bytes are in place."""

    event: object = None
    keep: list = field(default_factory=list)

    def done(self) -> bool:
        if self.event is None or self.event.query():
            self.keep.clear()
            return True
        return False

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self.keep.clear()


class Mover:
    """Moves whole blocks between the engine's KV views and the pool."""

    def __init__(self, layers: list[torch.Tensor], pool: torch.Tensor, stream=None):
        # Block-first views of each layer; all of one shape and dtype.
        self.layers = layers
        self.pool = pool
        first = layers[0]
        self.device = first.device
        self.dtype = first.dtype
        self.page_shape = tuple(first.shape[1:])
        self.layer_bytes = first[0].numel() * first.element_size()
        self.block_bytes = self.layer_bytes * len(layers)
        self.cuda = first.device.type == "cuda"
        if self.cuda and stream is None:
            stream = torch.cuda.Stream(device=self.device)
        self.stream = stream if self.cuda else None

    def _ids(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.long)
        if self.cuda:
            ids = ids.pin_memory().to(self.device, non_blocking=True)
        return ids

    def _check(self, offsets: list[int]) -> None:
        size = self.pool.numel()
        for off in offsets:
            if off < 0 or off + self.block_bytes > size:
                raise ValueError(f"kvtier: slot at {off} lies outside the pool")

    def save(self, block_ids: list[int], offsets: list[int], ready=None) -> Transfer:
        """Copies blocks ``block_ids`` of the engine into pool slots at
        ``offsets``, on CUDA after event ``ready`` (default: the current
        stream's work queued so far; a caller on another thread than the
        engine's passes an event the engine thread recorded)."""
        return self._transfer(self._gather_to_pool, block_ids, offsets, ready)

    def load(self, block_ids: list[int], offsets: list[int], ready=None) -> Transfer:
        """Copies pool slots at ``offsets`` into the engine's blocks
        ``block_ids`` (on CUDA after ``ready``, as for ``save``)."""
        return self._transfer(self._scatter_from_pool, block_ids, offsets, ready)

    def _transfer(self, work, block_ids, offsets, ready) -> Transfer:
        self._check(offsets)
        n = len(block_ids)
        if n == 0:
            return Transfer()
        if not self.cuda:
            work(self._ids(block_ids), offsets, n)
            return Transfer()
        if ready is None:
            ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            ids = self._ids(block_ids)
            staging = work(ids, offsets, n)
            done = self.stream.record_event()
        return Transfer(done, [ids, staging])

    def _gather_to_pool(self, ids, offsets, n) -> torch.Tensor:
        staging = torch.empty(
            (n, len(self.layers), self.layer_bytes), dtype=torch.uint8, device=self.device
        )
        for i, layer in enumerate(self.layers):
            page = torch.index_select(layer, 0, ids).contiguous()
            staging[:, i].copy_(page.view(n, -1).view(torch.uint8))
        flat = staging.view(n, self.block_bytes)
        for first, count, off in runs(offsets, self.block_bytes):
            dst = self.pool[off : off + count * self.block_bytes]
            dst.copy_(flat[first : first + count].view(-1), non_blocking=self.cuda)
        return staging

    def _scatter_from_pool(self, ids, offsets, n) -> torch.Tensor:
        staging = torch.empty(
            (n, len(self.layers), self.layer_bytes), dtype=torch.uint8, device=self.device
        )
        flat = staging.view(n, self.block_bytes)
        for first, count, off in runs(offsets, self.block_bytes):
            src = self.pool[off : off + count * self.block_bytes]
            flat[first : first + count].view(-1).copy_(src, non_blocking=self.cuda)
        for i, layer in enumerate(self.layers):
            page = staging[:, i].view(self.dtype).view((n, *self.page_shape))
            layer.index_copy_(0, ids, page)
        return staging

    def sync(self) -> None:
        """Waits for every copy issued so far."""
        if self.stream is not None:
            self.stream.synchronize()
