"""The vLLM connector's worker side: kvbm's pool mapped into the worker,
and the copies between it and the engine's KV blocks, on a background IO
thread so the engine's step never waits for kvbm — except a layer-by-layer
load, which leases its blocks (one short Acquire) and issues its copies on
the engine thread, in the step that uses them."""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from kvtier._kvtier import Client, KvbmError, KvbmUnavailable, Pool
from kvtier.config import KvtierSettings, LayoutInfo
from kvtier.mover import Mover, Transfer, block_dim, layer_pieces, pool_tensor
from kvtier.vllm_scheduler import KvtierMetadata, LoadSpec

logger = logging.getLogger("kvtier.vllm")


@dataclass
class _Save:
    req_ids: list[str]
    # Written blocks, to commit once the copy is done, and the pool session
    # that reserved them (set by the IO thread).
    keys: list[bytes] = field(default_factory=list)
    session: int = 0
    # None until the IO thread has issued the copy (or given up).
    transfer: Transfer | None = None


# Blocks in the first Acquire of a load; each next one takes twice as many.
LOAD_FIRST_CHUNK = 16


@dataclass
class _Load:
    req_id: str
    block_ids: list[int]
    leases: list[int] = field(default_factory=list)
    session: int = 0
    failed: list[int] = field(default_factory=list)
    transfer: Transfer | None = None
    loaded: int = 0
    # A layer-by-layer load: counted and its failures reported when it
    # started; only its leases wait for the copies.
    sync: bool = False


class _WorkerSide:
    """The worker's half. kvbm calls (Reserve, Commit, Acquire, Release,
    attaching the pool) and the copies they gate run on one background IO
    thread, so a slow or hung daemon, or an Acquire that promotes blocks from
    disk, never stalls the engine's step: the engine thread only records CUDA
    events, queues jobs and polls what finished. The IO thread owns the pool
    and the mover; the engine thread reads them only through finished jobs."""

    def __init__(self, settings: KvtierSettings, info: LayoutInfo, kv_cache_config, tp_rank: int):
        self.settings = settings
        self.info = info
        self.tp_rank = tp_rank
        self.namespace = info.namespace(tp_rank)
        self.kv_cache_config = kv_cache_config
        self.client = Client(
            settings.socket, timeout_ms=settings.timeout_ms, retry_ms=settings.retry_ms
        )
        # The engine thread's own, for layer-by-layer loads: an Acquire of
        # blocks in host memory is quick, and the step waits for it.
        self.sync_client = Client(
            settings.socket, timeout_ms=settings.load_timeout_ms, retry_ms=settings.retry_ms
        )
        self.layers: list[torch.Tensor] = []
        self.layer_index: dict[str, int] = {}
        # This step's layer-by-layer load: an event per layer, and whether
        # the forward pass waited for each.
        self.layer_events: list | None = None
        self.layer_waited: set[int] = set()
        self.layer_ids: list[int] = []
        self.warned_no_waits = False
        self.layout_extra = ""
        self.block_bytes = 0
        # Owned by the IO thread; the engine thread uses them for a
        # layer-by-layer load under `pool_lock`, under which the IO thread
        # attaches and detaches.
        self.pool_lock = threading.RLock()
        self.pool: Pool | None = None
        self.mover: Mover | None = None
        self.pinned = False
        self.retry_at = 0.0
        self.failures = 0  # consecutive, for the back-off
        self.disabled_reason = ""
        # The side stream of every copy (CUDA), created once: the engine
        # thread orders its own stream after it on preemption.
        self.stream = None
        self.load_stream = None
        self.jobs: queue.Queue = queue.Queue()
        self.io: threading.Thread | None = None
        # Copy-issuing jobs queued and not yet run, and a condition to wait
        # for none (preemption).
        self.unissued = 0
        self.issued = threading.Condition()
        self.lock = threading.Lock()  # stats
        # Engine thread: in flight.
        self.saves: list[_Save] = []
        self.loads: list[_Load] = []
        # req_id → saves not yet finished; requests that ever had saves.
        self.pending_saves: dict[str, int] = {}
        self.save_reqs: set[str] = set()
        self.finished_waiting: set[str] = set()
        self.recved: set[str] = set()
        self.load_errors: set[int] = set()
        self.stats = {
            "saved_blocks": 0,
            "save_skipped_blocks": 0,
            "save_present_blocks": 0,
            "loaded_blocks": 0,
            "load_failed_blocks": 0,
            "reattaches": 0,
        }
        self.reported: dict[str, int] = {}

    def _count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.stats[name] += n

    def take_stats_delta(self) -> dict[str, int]:
        """What was counted since the last call (vLLM's per-interval stats)."""
        with self.lock:
            delta = {k: v - self.reported.get(k, 0) for k, v in self.stats.items()}
            self.reported = dict(self.stats)
        return delta

    # ---- set-up ----

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = [n for n in self.kv_cache_config.kv_cache_groups[0].layer_names if n in kv_caches]
        names += [n for n in kv_caches if n not in names]
        num_blocks = self.kv_cache_config.num_blocks
        views = []
        for name in names:
            t = kv_caches[name]
            d = block_dim(t, num_blocks)
            views.append(t.movedim(d, 0) if d else t)
        shapes = {(tuple(v.shape), v.dtype) for v in views}
        if len(shapes) != 1:
            self.disabled_reason = f"layers differ in KV shape: {sorted(map(str, shapes))}"
            logger.error("kvtier: connector disabled: %s", self.disabled_reason)
            return
        try:
            # Checked here, once: the IO thread builds the mover later.
            layer_pieces(views)
        except ValueError as e:
            self.disabled_reason = str(e)
            logger.error("kvtier: connector disabled: %s", self.disabled_reason)
            return
        self.layers = views
        self.layer_index = {name: i for i, name in enumerate(names)}
        page = "x".join(str(s) for s in views[0].shape[1:])
        self.layout_extra = f"engine=vllm;page={page};layers={len(views)}"
        self.block_bytes = views[0][0].numel() * views[0].element_size() * len(views)
        if views[0].device.type == "cuda":
            self.stream = torch.cuda.Stream(device=views[0].device)
            self.load_stream = torch.cuda.Stream(device=views[0].device)
        self.io = threading.Thread(target=self._run_io, name="kvtier-io", daemon=True)
        self.io.start()
        self.jobs.put((self._ensure_ready,))

    # ---- the IO thread ----

    def _run_io(self) -> None:
        if self.stream is not None:
            # This worker's GPU (with several, not necessarily device 0).
            torch.cuda.set_device(self.stream.device)
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    self._close_pool()
                    return
                job[0](*job[1:])
            except Exception:  # a bug must not kill the thread and hang the engine
                logger.exception("kvtier: IO job failed")
            finally:
                self.jobs.task_done()

    def _queue_copy(self, *job) -> None:
        with self.issued:
            self.unissued += 1
        self.jobs.put((self._issue, *job))

    def _issue(self, fn, *args) -> None:
        try:
            fn(*args)
        finally:
            with self.issued:
                self.unissued -= 1
                self.issued.notify_all()

    def _ensure_ready(self) -> bool:
        """Registers the namespace and attaches the pool when not done yet
        (again after a failure, backing off from retry_ms up to 16 times
        that while kvbm keeps failing)."""
        with self.pool_lock:
            return self._attach()

    def _attach(self) -> bool:
        if self.mover is not None:
            if self.pool.alive:
                return True
            # The daemon closed our session (it stopped or restarted): its
            # slot offsets no longer refer to this mapping.
            self._detach("pool session closed")
        if not self.layers or time.monotonic() < self.retry_at:
            return False
        try:
            self.client.register_namespace(
                self.namespace,
                self.block_bytes,
                self.info.layout(self.tp_rank, self.layout_extra),
            )
            pool = Pool(self.settings.socket, timeout_ms=self.settings.timeout_ms)
        except KvbmError as e:
            self._back_off()
            logger.warning("kvtier: kvbm not ready (%s); offload paused", e)
            return False
        tensor = pool_tensor(pool.address, pool.size)
        if self.stream is not None and self.settings.pin_pool != "off":
            rc = torch.cuda.cudart().cudaHostRegister(pool.address, pool.size, 0)
            self.pinned = int(getattr(rc, "value", rc)) == 0
            if not self.pinned:
                logger.warning("kvtier: cudaHostRegister failed (%s)", rc)
        self.pool = pool
        try:
            self.mover = Mover(self.layers, tensor, self.stream, self.settings.copy_chunk_mb << 20)
        except Exception:
            # Unpin and close the mapping now: the next attempt attaches a new
            # one, and this one would otherwise stay pinned and open.
            self._close_pool()
            self._back_off()
            raise
        self.failures = 0
        return True

    def _back_off(self) -> None:
        self.failures += 1
        delay = self.settings.retry_ms / 1000 * min(2 ** (self.failures - 1), 16)
        self.retry_at = time.monotonic() + delay

    def _detach(self, why: str) -> None:
        """Drops the pool after kvbm failed (it may have restarted with a new
        pool); the next job attaches again."""
        with self.pool_lock:
            self._detach_locked(why)

    def _detach_locked(self, why: str) -> None:
        if self.mover is None:
            return
        logger.warning("kvtier: kvbm failed (%s); re-attaching", why)
        self._close_pool()
        self._count("reattaches")
        self._back_off()

    def _close_pool(self) -> None:
        with self.pool_lock:
            self._close_pool_locked()

    def _close_pool_locked(self) -> None:
        if self.mover is not None:
            # Every copy touching the mapping is on the side streams (or was
            # synchronous, on CPU): after this none is left.
            self.mover.sync()
            if self.load_stream is not None:
                self.load_stream.synchronize()
            self.mover = None
        if self.pool is not None:
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(self.pool.address)
                self.pinned = False
            # Leases and reservations of the old session die with it.
            self.pool.close()
            self.pool = None

    def _whole(self, slots: list[tuple[int, int]]) -> int:
        """How many leading slots hold a whole block of this layout (a slot
        of another size ends what may be copied)."""
        good = 0
        for _off, length in slots:
            if length != self.block_bytes:
                break
            good += 1
        return good

    def _io_load(self, spec: LoadSpec, ld: _Load, ready) -> None:
        """Acquires the blocks in chunks that double in size and queues each
        chunk's copies to the GPU as soon as it is leased: blocks kvbm reads
        from disk for one chunk arrive while the previous chunk is copied,
        so a chain from disk takes about the slower of the two, not their
        sum; the first copies start after a few blocks, and a chain held in
        host memory costs a handful of Acquires."""
        failed = list(spec.block_ids)
        transfer = Transfer()
        parts: list[Transfer] = []
        try:
            if not self._ensure_ready():
                return
            ld.session = self.pool.session
            keys, ids = spec.keys, spec.block_ids
            pos, chunk = 0, LOAD_FIRST_CHUNK
            while pos < len(keys):
                part = keys[pos : pos + chunk]
                try:
                    lease, slots, _ = self.client.acquire(ld.session, self.namespace, part)
                except KvbmError as e:
                    if isinstance(e, KvbmUnavailable):
                        self._detach(str(e))
                    break
                if lease:
                    ld.leases.append(lease)
                good = self._whole(slots)
                if good:
                    try:
                        parts.append(
                            self.mover.load(
                                ids[pos : pos + good], [off for off, _ in slots[:good]], ready
                            )
                        )
                    except (RuntimeError, ValueError) as e:  # e.g. CUDA out of memory
                        logger.error("kvtier: load of %s failed: %s", spec.req_id, e)
                        # Copies issued before the failure must end before the
                        # leases do (the slots may be reused) and before vLLM
                        # recomputes.
                        self.mover.sync()
                        break
                    pos += good
                if good < len(part):
                    break
                chunk *= 2
            failed = list(ids[pos:])
            if parts:
                # One stream: the last chunk's copies end after the others.
                transfer = Transfer(parts[-1].event, [k for p in parts for k in p.keep])
        finally:
            ld.failed = failed
            ld.loaded = len(spec.block_ids) - len(failed)
            ld.transfer = transfer  # last: the engine thread polls it

    def _io_save(self, keys, parents, tokens, block_ids, s: _Save, ready) -> None:
        try:
            if not self._ensure_ready():
                self._count("save_skipped_blocks", len(keys))
                return
            session = self.pool.session
            try:
                # Reserve, Commit and Abort go over the pool's own session
                # (binary frames on the pool socket), not gRPC.
                slots = self.pool.reserve(
                    self.namespace, keys, parents, tokens, self.info.block_size
                )
            except KvbmError as e:
                self._count("save_skipped_blocks", len(keys))
                if isinstance(e, KvbmUnavailable):
                    self._detach(str(e))
                return
            write_keys, write_ids, offsets, bad = [], [], [], []
            for key, bid, (off, length) in zip(keys, block_ids, slots):
                if length == 0:
                    self._count("save_present_blocks")
                elif length == self.block_bytes:
                    write_keys.append(key)
                    write_ids.append(bid)
                    offsets.append(off)
                else:
                    bad.append(key)
            if bad:
                self._abort(bad)
            if not write_keys:
                return
            try:
                transfer = self.mover.save(write_ids, offsets, ready)
            except (RuntimeError, ValueError) as e:  # e.g. CUDA out of memory
                logger.error("kvtier: offload copy failed: %s", e)
                self.mover.sync()  # nothing may still write the slots aborted next
                self._abort(write_keys)
                return
            s.keys, s.session = write_keys, session
            s.transfer = transfer
        finally:
            if s.transfer is None:
                s.transfer = Transfer()

    def _abort(self, keys: list[bytes]) -> None:
        self._count("save_skipped_blocks", len(keys))
        if self.pool is None:
            return
        try:
            self.pool.abort(self.namespace, keys)
        except KvbmError as e:
            logger.debug("kvtier: abort failed: %s", e)

    def _attached_to(self, session: int) -> bool:
        """Whether the pool is still the one of ``session`` (a re-attach
        since ends that session's reservations and leases)."""
        return self.pool is not None and self.pool.session == session

    def _io_commit(self, session: int, keys: list[bytes]) -> None:
        if not self._attached_to(session):
            # Detached since the copy: the reservations died with the session.
            self._count("save_skipped_blocks", len(keys))
            return
        try:
            self.pool.commit(self.namespace, keys)
            self._count("saved_blocks", len(keys))
        except KvbmError as e:
            self._count("save_skipped_blocks", len(keys))
            if isinstance(e, KvbmUnavailable):
                self._detach(str(e))

    def _io_release(self, session: int, lease: int) -> None:
        if not self._attached_to(session):
            return  # the lease died with its session
        try:
            self.client.release(session, lease)
        except KvbmError as e:
            logger.debug("kvtier: release failed: %s", e)

    # ---- the engine thread ----

    def _ready_event(self):
        """An event after the engine's work queued so far (CUDA), which the
        IO thread's copy waits for."""
        if self.stream is None:
            return None
        return torch.cuda.current_stream(self.stream.device).record_event()

    def start_loads(self, meta: KvtierMetadata) -> None:
        self.layer_events, self.layer_waited, self.layer_ids = None, set(), []
        sync = [spec for spec in meta.loads if spec.sync]
        if sync:
            self._load_layerwise(sync)
        for spec in meta.loads:
            if spec.sync:
                continue
            ld = _Load(spec.req_id, list(spec.block_ids))
            self.loads.append(ld)
            if not self.settings.load or self.io is None:
                ld.failed, ld.transfer = list(spec.block_ids), Transfer()
                continue
            self._queue_copy(self._io_load, spec, ld, self._ready_event())

    def _load_layerwise(self, specs: list[LoadSpec]) -> None:
        """Leases the blocks of this step's layer-by-layer loads and issues
        their copies on the load stream, an event per layer for
        ``wait_layer``. Blocks that cannot be loaded now (kvbm down or
        slow, the pool not attached yet, a block gone since the lookup) are
        reported as load errors at the end of this step: vLLM recomputes
        them."""
        ids: list[int] = []
        offsets: list[int] = []
        failed: list[int] = []
        leases: list[int] = []
        events: list = []
        transfer = Transfer()
        session = 0
        with self.pool_lock:
            ready = (
                self.settings.load
                and self.mover is not None
                and self.pool is not None
                and self.pool.alive
            )
            if ready:
                session = self.pool.session
            for spec in specs:
                if not ready:
                    failed += spec.block_ids
                    continue
                try:
                    lease, slots, _ = self.sync_client.acquire(
                        session, self.namespace, spec.keys
                    )
                except KvbmError as e:
                    logger.debug("kvtier: acquire for %s failed: %s", spec.req_id, e)
                    failed += spec.block_ids
                    if isinstance(e, KvbmUnavailable):
                        self.jobs.put((self._detach, str(e)))
                        ready = False
                    continue
                if lease:
                    leases.append(lease)
                good = self._whole(slots)
                ids += spec.block_ids[:good]
                offsets += [off for off, _ in slots[:good]]
                failed += spec.block_ids[good:]
            if ids:
                try:
                    events, transfer = self.mover.load_layers(
                        ids, offsets, self._ready_event(), self.load_stream
                    )
                except (RuntimeError, ValueError) as e:  # e.g. CUDA out of memory
                    logger.error("kvtier: layer-by-layer load failed: %s", e)
                    if self.load_stream is not None:
                        self.load_stream.synchronize()
                    failed += ids
                    ids, events, transfer = [], [], Transfer()
        if not ready and self.io is not None:
            self.jobs.put((self._ensure_ready,))
        self.layer_events = events or None
        self.layer_ids = ids
        self.load_errors.update(failed)
        self._count("load_failed_blocks", len(failed))
        self._count("loaded_blocks", len(ids))
        if leases:
            self.loads.append(_Load("", [], leases=leases, session=session, transfer=transfer, sync=True))

    def wait_layer(self, layer_name: str) -> None:
        """The forward pass is about to use layer ``layer_name``: its stream
        waits for that layer's loaded blocks."""
        events = self.layer_events
        if not events:
            return
        i = self.layer_index.get(layer_name)
        if i is None or i >= len(events):
            return
        torch.cuda.current_stream(self.load_stream.device).wait_event(events[i])
        self.layer_waited.add(i)

    def end_forward(self) -> None:
        """After the forward pass: if it did not wait for every layer it
        loaded (a model runner that never calls wait_for_layer_load), it
        may have read blocks before they arrived — they are reported as
        load errors (vLLM recomputes them) and later loads wait whole."""
        events = self.layer_events
        self.layer_events = None
        if not events or len(self.layer_waited) == len(events):
            return
        if not self.warned_no_waits:
            logger.warning(
                "kvtier: the forward pass did not wait for layer-by-layer loads; "
                "its loaded blocks are recomputed"
            )
            self.warned_no_waits = True
        self.load_errors.update(self.layer_ids)

    def handle_preemptions(self, meta: KvtierMetadata) -> None:
        # A preempted request's blocks may be rewritten by the coming
        # forward: every queued copy must be issued, and the engine's stream
        # must wait for the copies still reading them.
        if not meta.preempted or self.io is None:
            return
        with self.issued:
            self.issued.wait_for(lambda: self.unissued == 0)
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            torch.cuda.current_stream(self.stream.device).wait_stream(self.load_stream)

    def start_saves(self, meta: KvtierMetadata) -> None:
        if not meta.saves:
            return
        keys, parents, tokens, block_ids, owners = [], [], [], [], []
        seen = set()
        bs = self.info.block_size
        for spec in meta.saves:
            self.save_reqs.add(spec.req_id)
            for i, key in enumerate(spec.keys):
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                parents.append(spec.parents[i])
                tokens.extend(spec.tokens[i * bs : (i + 1) * bs])
                block_ids.append(spec.block_ids[i])
            owners.append(spec.req_id)
        if not self.settings.save or self.io is None:
            self._count("save_skipped_blocks", len(keys))
            return
        s = _Save(owners)
        for r in owners:
            self.pending_saves[r] = self.pending_saves.get(r, 0) + 1
        self.saves.append(s)
        self._queue_copy(self._io_save, keys, parents, tokens, block_ids, s, self._ready_event())

    def _poll_saves(self) -> None:
        still = []
        for s in self.saves:
            if s.transfer is None or not s.transfer.done():
                still.append(s)
                continue
            if s.keys:
                self.jobs.put((self._io_commit, s.session, s.keys))
            for r in s.req_ids:
                n = self.pending_saves.get(r, 0) - 1
                if n > 0:
                    self.pending_saves[r] = n
                else:
                    self.pending_saves.pop(r, None)
        self.saves = still

    def _poll_loads(self) -> None:
        still = []
        for ld in self.loads:
            if ld.transfer is None or not ld.transfer.done():
                still.append(ld)
                continue
            for lease in ld.leases:
                self.jobs.put((self._io_release, ld.session, lease))
            if ld.sync:
                continue
            self.load_errors.update(ld.failed)
            self._count("load_failed_blocks", len(ld.failed))
            self._count("loaded_blocks", ld.loaded)
            self.recved.add(ld.req_id)
        self.loads = still

    # ---- completion ----

    def finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._poll_saves()
        self._poll_loads()
        self.finished_waiting.update(r for r in finished_req_ids if r in self.save_reqs)
        sending = {r for r in self.finished_waiting if r not in self.pending_saves}
        self.finished_waiting -= sending
        self.save_reqs -= sending
        recving, self.recved = self.recved, set()
        return (sending or None), (recving or None)

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def wait_idle(self) -> None:
        """Waits until every queued job has run and its copies have landed
        (tests and benchmarks; the engine never waits)."""
        if self.io is None:
            return
        self.jobs.join()
        if self.stream is not None:
            self.stream.synchronize()
            self.load_stream.synchronize()

    def shutdown(self) -> None:
        if self.io is None:
            return
        self.wait_idle()
        self._poll_saves()
        self._poll_loads()
        self.wait_idle()  # the commits and releases just queued
        self.jobs.put(None)
        self.io.join(timeout=max(self.settings.timeout_ms / 1000, 1) * 2)
        self.io = None
