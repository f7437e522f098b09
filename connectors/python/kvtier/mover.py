"""Batched copies between vLLM's paged KV tensors and kvbm's shared pool.

Slot format (one kvbm block): the block's bytes of every layer, layer after
layer in the engine's layer order; a layer's part is the block's page of the
per-layer view in that view's logical element order (``view[block]``). The
view's per-block shape is part of the namespace's registered layout, so
engines whose views differ never share blocks.

Each layer is seen as one or more *pieces*: byte tensors ``[num_blocks,
bytes]`` whose rows are contiguous (a block-first layout is one piece per
layer; vLLM's FlashAttention layout ``[2, num_blocks, ...]`` is two, K and V).
A block's slot is its rows of every piece, in order. A transfer is one
``index_select`` (gather) or ``index_copy_`` (scatter) per piece between the
engine's tensors and a staging tensor (an offload's then transposed into
slot order), and one copy per run of adjacent pool slots: never one copy
per small block. On CUDA the work runs on a side stream that first waits for
the engine's stream (the forward pass that wrote the blocks), and completes
asynchronously: callers poll the returned ``Transfer``.

An onboard in the step that computes the rest of its request goes layer by
layer (``load_layers``): each layer's rows of every slot are one strided
(2-D) host-to-device copy per run of adjacent slots, then scattered into
the layer's blocks, and an event per layer lets the forward pass start a
layer as soon as its blocks are in place: the copy hides behind the compute
of the request's new tokens.

An offload goes in chunks of at most ``chunk_bytes`` (an onboard whole, see
``load``). Staging a whole offload at once would take as much GPU
memory as the blocks (2.6 GB for a 20K-token Llama-3-8B prompt), outside
vLLM's memory budget; and one copy of that size holds the GPU's copy engine,
so the engine's own small device-to-host copies (sampled tokens) queue behind
it. Chunks alternate between two streams so that gathers overlap copies.

The Python calls per transfer are kept few on purpose: the connector issues
them from its IO thread, and each torch call gives up the GIL and must win it
back from the engine thread.
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


def byte_pieces(view: torch.Tensor) -> list[torch.Tensor]:
    """Splits a block-first KV view into byte tensors ``[num_blocks, bytes]``
    with contiguous rows that together hold ``view[block]`` in its logical
    element order (views of the same memory, no copy)."""
    if view[0].is_contiguous():
        rows = view.unsqueeze(1) if view.dim() == 1 else view.view(view.shape[0], -1)
        return [rows.view(torch.uint8)]
    pieces = [p for i in range(view.shape[1]) for p in byte_pieces(view[:, i])]
    if len(pieces) > 64:
        raise ValueError(
            f"kvtier: unsupported KV layout: a block's page of shape {tuple(view.shape[1:])} "
            f"and strides {view.stride()[1:]} is scattered over {len(pieces)} pieces"
        )
    return pieces


def layer_pieces(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """The byte pieces of every layer, in order; ``ValueError`` for a layout
    the copy path cannot move (checked when the KV caches are registered)."""
    pieces = [p for layer in layers for p in byte_pieces(layer)]
    sizes = {p.shape[1] for p in pieces}
    if len(sizes) != 1:
        raise ValueError(
            f"kvtier: unsupported KV layout: layers split into pieces of {sorted(sizes)} bytes"
        )
    return pieces


def widest_word(pieces: list[torch.Tensor]) -> torch.dtype:
    """The widest integer type that every byte piece can be viewed as."""
    for word in (torch.int64, torch.int32, torch.int16):
        size = word.itemsize
        if all(
            p.shape[1] % size == 0 and p.stride(0) % size == 0 and p.data_ptr() % size == 0
            for p in pieces
        ):
            return word
    return torch.uint8


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


class _Memcpy2D(ctypes.Structure):
    """The CUDA driver's CUDA_MEMCPY2D."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
    ]


_CU_MEMORYTYPE_HOST = 1
_CU_MEMORYTYPE_DEVICE = 2


def _driver_copy_2d():
    """``cuMemcpy2DAsync`` from the CUDA driver, or None where there is no
    driver (torch has no strided host-to-device copy: it would stage a
    non-contiguous host tensor through a pageable buffer)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


# A layer-by-layer onboard makes one 2-D copy per piece, layer and run of
# adjacent slots; past this many calls (a fragmented pool) the whole onboard
# is one copy per run instead, and every layer waits for all of it.
MAX_2D_COPIES = 4096


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

    def __init__(
        self, layers: list[torch.Tensor], pool: torch.Tensor, stream=None, chunk_bytes: int = 0
    ):
        # ``layers``: block-first views of each layer, all of one shape and dtype.
        self.pool = pool
        first = layers[0]
        self.device = first.device
        self.block_bytes = first[0].numel() * first.element_size() * len(layers)
        # Pieces as the widest words their sizes and alignment allow: the
        # index kernels move one element per thread, so bytes would be slow.
        pieces = layer_pieces(layers)
        self.word = widest_word(pieces)
        self.pieces = [p.view(self.word) for p in pieces]
        self.piece_words = self.pieces[0].shape[1]
        self.num_layers = len(layers)
        # Blocks per chunk (0: the whole transfer in one).
        self.chunk_blocks = max(chunk_bytes // self.block_bytes, 1) if chunk_bytes > 0 else 0
        self.cuda = first.device.type == "cuda"
        if self.cuda and stream is None:
            stream = torch.cuda.Stream(device=self.device)
        self.stream = stream if self.cuda else None
        # Chunks alternate between the side stream and a second one, so one
        # chunk's gather (compute) overlaps the previous chunk's copy (copy
        # engine); every transfer ends joined back into ``stream``.
        self.second = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.copy_2d = _driver_copy_2d() if self.cuda else None

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
        return self._transfer(self._gather_to_pool, block_ids, offsets, ready, self.chunk_blocks)

    def load(self, block_ids: list[int], offsets: list[int], ready=None) -> Transfer:
        """Copies pool slots at ``offsets`` into the engine's blocks
        ``block_ids`` (on CUDA after ``ready``, as for ``save``).

        Whole, not in chunks: an onboard is what a waiting request's
        time to first token is made of, and every chunk costs the calling
        thread dozens of torch calls, each of which gives up Python's GIL
        and must win it back from the engine thread, which spins while the
        request waits (measured in vLLM 0.25 on an H200, with an earlier
        version of this code that made ~200 calls per chunk: a 20K-token
        onboard took 227 ms in 64 MiB chunks against 77–82 ms whole).
        Host-to-device copies do not hold up the engine's own
        device-to-host ones."""
        return self._transfer(self._scatter_from_pool, block_ids, offsets, ready, 0)

    def load_layers(self, block_ids: list[int], offsets: list[int], ready, stream):
        """Copies pool slots at ``offsets`` into the engine's blocks
        ``block_ids`` layer by layer on ``stream`` (after event ``ready``).
        Returns one event per layer (the layer's blocks are in place once it
        completed; ``[]`` when the copy is already done, on CPU) and the
        Transfer of the whole."""
        self._check(offsets)
        n = len(block_ids)
        if n == 0:
            return [], Transfer()
        if not self.cuda:
            self._scatter_from_pool(self._ids(block_ids), offsets)
            return [], Transfer()
        bb = self.block_bytes
        slot_runs = runs(offsets, bb)
        per_layer = len(self.pieces) // self.num_layers
        if self.copy_2d is None or len(slot_runs) * len(self.pieces) > MAX_2D_COPIES:
            t = self._transfer(self._scatter_from_pool, block_ids, offsets, ready, 0)
            return [t.event] * self.num_layers, t
        piece_bytes = self.piece_words * self.word.itemsize
        base = self.pool.data_ptr()
        handle = ctypes.c_void_p(stream.cuda_stream)
        desc = _Memcpy2D(
            srcMemoryType=_CU_MEMORYTYPE_HOST,
            srcPitch=bb,
            dstMemoryType=_CU_MEMORYTYPE_DEVICE,
            dstPitch=piece_bytes,
            WidthInBytes=piece_bytes,
        )
        events = []
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            ids = self._ids(block_ids)
            # Two layers' staging, reused in turn: a layer's copy waits (on
            # this one stream) for the scatter of the layer two before.
            staging = [
                torch.empty((per_layer, n, self.piece_words), dtype=self.word, device=self.device)
                for _ in range(2)
            ]
            for layer in range(self.num_layers):
                rows = staging[layer % 2]
                for p in range(per_layer):
                    index = layer * per_layer + p
                    dst = rows[p]
                    for first, count, off in slot_runs:
                        desc.srcHost = base + off + index * piece_bytes
                        desc.dstDevice = dst.data_ptr() + first * piece_bytes
                        desc.Height = count
                        rc = self.copy_2d(ctypes.byref(desc), handle)
                        if rc != 0:
                            raise RuntimeError(f"kvtier: cuMemcpy2DAsync failed ({rc})")
                    self.pieces[index].index_copy_(0, ids, dst)
                events.append(stream.record_event())
        return events, Transfer(events[-1], [ids, staging])

    def _transfer(self, work, block_ids, offsets, ready, chunk_blocks: int) -> Transfer:
        self._check(offsets)
        n = len(block_ids)
        if n == 0:
            return Transfer()
        step = chunk_blocks or n
        if not self.cuda:
            ids = self._ids(block_ids)
            for i in range(0, n, step):
                work(ids[i : i + step], offsets[i : i + step])
            return Transfer()
        if ready is None:
            ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            ids = self._ids(block_ids)
        if n > step:
            self.second.wait_stream(self.stream)  # after ready and the ids
        for c, i in enumerate(range(0, n, step)):
            # Each chunk's staging tensor is dropped at once: allocated on
            # its stream, its memory is reused only by that stream's later
            # work, so one chunk's worth per stream is ever in use.
            with torch.cuda.stream(self.second if c % 2 else self.stream):
                work(ids[i : i + step], offsets[i : i + step])
        if n > step:
            self.stream.wait_stream(self.second)
        done = self.stream.record_event()
        return Transfer(done, [ids])

    def _gather_to_pool(self, ids, offsets) -> None:
        n = len(offsets)
        staging = torch.empty(
            (len(self.pieces), n, self.piece_words), dtype=self.word, device=self.device
        )
        for piece, rows in zip(self.pieces, staging.unbind(0)):
            torch.index_select(piece, 0, ids, out=rows)
        slots = staging.transpose(0, 1).contiguous().view(torch.uint8).view(-1)
        bb = self.block_bytes
        for first, count, off in runs(offsets, bb):
            self.pool[off : off + count * bb].copy_(
                slots[first * bb : (first + count) * bb], non_blocking=self.cuda
            )

    def _scatter_from_pool(self, ids, offsets) -> None:
        n = len(offsets)
        bb = self.block_bytes
        slots = torch.empty(n * bb, dtype=torch.uint8, device=self.device)
        for first, count, off in runs(offsets, bb):
            slots[first * bb : (first + count) * bb].copy_(
                self.pool[off : off + count * bb], non_blocking=self.cuda
            )
        # Slot-major rows straight into the pieces: no transposed copy (an
        # onboard is unchunked, so that copy would double its GPU memory).
        rows = slots.view(self.word).view(n, len(self.pieces), self.piece_words)
        for piece, piece_rows in zip(self.pieces, rows.unbind(1)):
            piece.index_copy_(0, ids, piece_rows)

    def sync(self) -> None:
        """Waits for every copy issued so far (also those of a transfer that
        failed before joining its second stream back)."""
        if self.stream is not None:
            self.stream.synchronize()
            self.second.synchronize()
