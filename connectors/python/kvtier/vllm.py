"""``KvtierConnector``: vLLM's KV connector (``KVConnectorBase_V1``) over kvbm.

Load with::

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvbm/kvbm.sock"}}'

Scheduler side (``_SchedulerSide``): asks kvbm how many of a request's
blocks beyond the GPU's own prefix hit it holds (loaded asynchronously),
plans loads and saves into each step's ``KvtierMetadata``, holds a finished
request's blocks while its offload is in flight, and turns kvbm's tier events
into vLLM's KV events.

Worker side (``_WorkerSide``): learns the layout from the KV tensors,
registers the namespace, maps kvbm's shared pool and moves blocks with
batched copies (``kvtier.mover``): saves through Reserve → copy → Commit,
loads through Acquire → copy → Release, all on a background IO thread so the
engine's step never waits for kvbm.

When kvbm is down, slow or restarting the engine keeps serving: lookups
report no match, saves are skipped and counted, loads that cannot complete
report their blocks through ``get_block_ids_with_load_errors`` (vLLM
recomputes them), and both sides reconnect by themselves.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier._kvtier import Client, CostModel, EventStream, KvbmError, KvbmUnavailable, Pool
from kvtier.config import KvtierSettings, LayoutInfo, layout_info
from kvtier.mover import Mover, Transfer, block_dim, layer_pieces, pool_tensor

try:
    from kvtier import vllm_metrics as _metrics
except ImportError:  # a vLLM without the connector-metrics hooks
    _metrics = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier.vllm")

# kvtier.v1.Tier numbers → vLLM event medium.
_MEDIUM = {2: "CPU", 3: "DISK", 4: "REMOTE"}


@dataclass
class LoadSpec:
    """Onboard ``keys`` into the engine's blocks ``block_ids``."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class SaveSpec:
    """Offload the engine's blocks ``block_ids`` as ``keys``."""

    req_id: str
    keys: list[bytes]
    parents: list[bytes]
    block_ids: list[int]
    tokens: list[int]


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """One step's work for the workers. Plain data: it is pickled."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


def _recompute_failed_loads(kv_transfer_config) -> None:
    """A cache never fails a request: a load that fails (the daemon killed,
    a device error) must make vLLM recompute the blocks, not end the request
    with an error, which is vLLM's default policy (`fail`). The scheduler
    reads the policy after it created its connector, so setting it here
    takes effect."""
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") == "recompute":
        return
    kv_transfer_config.kv_load_failure_policy = "recompute"
    logger.info(
        "kvtier: kv_load_failure_policy set to 'recompute': a failed load "
        "recomputes its blocks instead of failing the request"
    )


class KvtierConnector(KVConnectorBase_V1):
    """vLLM connector offloading to and onboarding from kvbm."""

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped offload is a later miss.
        return False

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        _recompute_failed_loads(self._kv_transfer_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = KvtierSettings.from_extra(extra)
        self.info = layout_info(vllm_config, kv_cache_config, self.settings)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            group = kv_cache_config.kv_cache_groups[0]
            block_bytes = group.kv_cache_spec.page_size_bytes * len(group.layer_names)
            self._scheduler = _SchedulerSide(self.settings, self.info, block_bytes)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            try:
                tp_rank = get_tensor_model_parallel_rank()
            except Exception:  # noqa: BLE001 - no process group (tests, 1 GPU)
                tp_rank = 0
            self._worker = _WorkerSide(self.settings, self.info, kv_cache_config, tp_rank)
        logger.info(
            "kvtier: %s connector for namespace %s at %s",
            role.name.lower(),
            self.info.namespace(0),
            self.settings.socket,
        )

    # ---- scheduler side ----

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: "Request") -> None:
        # Disk promotions start when the request arrives, not when the
        # scheduler first gets to it.
        self._scheduler.matched_tokens(request, 0)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ):
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request), None

    def reset_cache(self) -> bool | None:
        """`reset_prefix_cache(reset_connector=True)`: drops this engine's
        blocks (its namespaces, every tier) from kvbm. Blocks being read or
        written stay."""
        if self._scheduler is None:
            return None
        return self._scheduler.reset()

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        self._scheduler.on_output(connector_output)

    def take_events(self):
        return self._scheduler.take_events()

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        if self._worker is not None:
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.start_loads(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous and whole-request: the request runs only
        # after get_finished reported it.
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        # Saves are batched over all layers in wait_for_save.
        return

    def wait_for_save(self):
        if self.has_connector_metadata():
            self._worker.start_saves(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    # ---- metrics in vLLM's own logs and /metrics ----

    def get_kv_connector_stats(self):
        if self._worker is None or _metrics is None:
            return None
        delta = self._worker.take_stats_delta()
        return _metrics.KvtierConnectorStats(data=delta) if any(delta.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        if _metrics is None:
            return None
        return _metrics.KvtierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        if _metrics is None:
            return None
        return _metrics.KvtierPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- introspection (tests, benchmarks) ----

    @property
    def scheduler_side(self) -> "_SchedulerSide":
        return self._scheduler

    @property
    def worker_side(self) -> "_WorkerSide":
        return self._worker


@dataclass
class _ReqState:
    request: Any
    block_ids: list[int]
    # Blocks [0, saved) are planned for saving (or known present in kvbm).
    saved: int = 0
    had_saves: bool = False


@dataclass
class _Promotion:
    """A match's blocks `[first, first + len(keys))` being brought into
    host memory (from disk) and leased by the scheduler before the match is
    reported, so the load cannot miss them."""

    first: int
    keys: list[bytes]
    started: float
    # Longer than this and recomputing would have been faster.
    budget: float
    done: bool = False
    abandoned: bool = False
    # Blocks leased on every rank (a prefix of `keys`), and the leases.
    leased: int = 0
    leases: list[tuple[int, int]] = field(default_factory=list)


class _SchedulerSide:
    def __init__(self, settings: KvtierSettings, info: LayoutInfo, block_bytes: int):
        self.settings = settings
        self.info = info
        self.block_size = info.block_size
        # Bytes of one block on one rank (ranks load theirs in parallel).
        self.block_bytes = block_bytes
        # Whether a match is worth loading, from loads and prefills measured
        # here: kvtier's one cost model (kvtier_client::cost).
        self.cost = CostModel()
        # req_id → blocks [first, host) of its match are in host memory.
        self.match_host: dict[str, tuple[int, int]] = {}
        # req_id → (start, host bytes, disk bytes) of its load in flight.
        self.load_clock: dict[str, tuple[float, int, int]] = {}
        # Promotions in flight, and the leases of reported matches, kept
        # until their load is done (req_id → (session, lease) pairs). The
        # promotions' kvbm calls run on `promoter` with their own client
        # (Acquire waits for disk reads) and pool session.
        self.promotions: dict[str, _Promotion] = {}
        self.held: dict[str, list[tuple[int, int]]] = {}
        self.promote_lock = threading.Lock()
        self.promoter = None
        self.promote_client = Client(
            settings.socket, timeout_ms=settings.timeout_ms, retry_ms=settings.retry_ms
        )
        self.promote_pool: Pool | None = None
        # Steps scheduled and not yet reported: (when, tokens scheduled),
        # oldest first (with async scheduling one runs while the next is
        # scheduled).
        self.steps: list[tuple[float, int]] = []
        self.namespaces = [info.namespace(r) for r in range(info.tp_world)]
        self.client = Client(
            settings.socket,
            timeout_ms=settings.lookup_timeout_ms,
            retry_ms=settings.retry_ms,
        )
        self.reqs: dict[str, _ReqState] = {}
        # req_id → the block-aligned local hit passed with the last match.
        self.local_hit: dict[str, int] = {}
        # req_id → blocks of its chain kvbm held at the last lookup.
        self.present: dict[str, int] = {}
        self.pending_loads: list[LoadSpec] = []
        self.events: EventStream | None = None
        self.stats = {
            "lookups": 0,
            "lookup_failures": 0,
            "matched_blocks": 0,
            "planned_save_blocks": 0,
            "planned_load_blocks": 0,
            "events_skipped": 0,
            # Matched blocks not loaded because recomputing them is faster.
            "skipped_slow_blocks": 0,
            # Matches whose disk blocks were promoted (and leased) before
            # being reported, and those given up as slower than recompute.
            "promotions": 0,
            "promotions_given_up": 0,
        }

    def _lookup(self, hashes) -> tuple[int, int]:
        """Blocks of the chain present, and in host memory, on every rank."""
        counts = [self.client.lookup_counts(ns, hashes) for ns in self.namespaces]
        return min(c[0] for c in counts), min(c[1] for c in counts)

    def matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if not (self.settings.load or self.settings.save):
            return 0, False
        bs = self.block_size
        hashes = request.block_hashes
        first = num_computed_tokens // bs
        if not hashes:
            return 0, False
        self.stats["lookups"] += 1
        try:
            # The whole chain, not only past the GPU's own hit: the part of
            # that hit kvbm already holds need not be offloaded again (a
            # growing conversation would re-offer its whole history on every
            # turn).
            present, host = self._lookup(hashes)
            matched = present
            if present < first < len(hashes):
                # kvbm lacks part of what the GPU holds; it may still hold
                # blocks past it.
                rest, rest_host = self._lookup(hashes[first:])
                matched, host = first + rest, first + rest_host
        except KvbmError as e:
            self.stats["lookup_failures"] += 1
            logger.debug("kvtier: lookup failed: %s", e)
            return 0, False
        self.present[request.request_id] = present
        if not self.settings.load:
            return 0, False
        if matched > first:
            # Only what loads faster than it recomputes.
            end = self.cost.plan(first, min(host, matched), matched, self.block_bytes, bs)
            self.stats["skipped_slow_blocks"] += matched - end
            matched = end
        if matched > max(host, first):
            # Blocks from disk: bring them into host memory and lease them
            # first; vLLM asks again meanwhile (None) and schedules others.
            matched = self._promoted(request, first, matched)
            if matched is None:
                return None, False
        hit_tokens = matched * bs
        # A step needs one token to compute: never claim the whole prompt.
        hit_tokens = min(hit_tokens, request.num_tokens - 1)
        ext = hit_tokens - num_computed_tokens
        # An asynchronous load costs the request at least one more engine
        # step; a few tokens are cheaper to recompute. (Without this, every
        # whole-prompt GPU hit, which vLLM stops one block short of the end,
        # would load that last block.)
        if ext < max(self.settings.min_match_blocks, 1) * bs:
            return 0, False
        self.local_hit[request.request_id] = num_computed_tokens
        self.match_host[request.request_id] = (first, host)
        return ext, True

    def _promoted(self, request, first: int, end: int) -> int | None:
        """The end of the match once `[first, end)` is leased in host
        memory; None while the promotion runs. One that takes longer than
        recomputing those blocks is given up: the match ends where host
        memory's prefix did."""
        req_id = request.request_id
        now = time.monotonic()
        with self.promote_lock:
            p = self.promotions.get(req_id)
            if p is not None and (p.first > first or p.first + len(p.keys) < end):
                self._abandon(self.promotions.pop(req_id))
                p = None
            if p is None:
                bs = self.block_size
                full, done = self.cost.recompute_secs(end * bs), self.cost.recompute_secs(first * bs)
                budget = full - done if full is not None else self.settings.timeout_ms / 1000
                p = _Promotion(first, list(request.block_hashes[first:end]), now, budget)
                self.promotions[req_id] = p
                self.stats["promotions"] += 1
                if self.promoter is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.promoter = ThreadPoolExecutor(2, thread_name_prefix="kvtier-promote")
                self.promoter.submit(self._promote, p)
                return None
            if not p.done:
                if now - p.started < p.budget:
                    return None
                self.stats["promotions_given_up"] += 1
                self._abandon(self.promotions.pop(req_id))
                return first
            del self.promotions[req_id]
            self._release(self.held.pop(req_id, []))
            self.held[req_id] = p.leases
            return p.first + min(p.leased, end - p.first)

    def _promote(self, p: _Promotion) -> None:
        """Leases `p.keys` on every rank (Acquire reads what is on disk
        into host memory). On the promoter thread."""
        leased, leases = 0, []
        try:
            if self.promote_pool is None or self.promote_pool.closed:
                self.promote_pool = Pool(self.settings.socket, timeout_ms=self.settings.timeout_ms)
            session = self.promote_pool.session
            counts = []
            for ns in self.namespaces:
                lease, slots = self.promote_client.acquire(session, ns, p.keys)
                if lease:
                    leases.append((session, lease))
                counts.append(len(slots))
            leased = min(counts)
        except KvbmError as e:
            logger.debug("kvtier: promotion failed: %s", e)
            if isinstance(e, KvbmUnavailable) and self.promote_pool is not None:
                self.promote_pool.close()
                self.promote_pool = None
        with self.promote_lock:
            p.leased, p.leases, p.done = leased, leases, True
            if p.abandoned:
                self._release(p.leases)

    def _abandon(self, p: _Promotion) -> None:
        """Under promote_lock."""
        p.abandoned = True
        if p.done:
            self._release(p.leases)

    def _release(self, leases: list[tuple[int, int]]) -> None:
        if leases and self.promoter is not None:
            self.promoter.submit(self._release_now, list(leases))

    def _release_now(self, leases: list[tuple[int, int]]) -> None:
        for session, lease in leases:
            try:
                self.promote_client.release(session, lease)
            except KvbmError as e:
                logger.debug("kvtier: release failed: %s", e)

    def after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        block_ids = list(blocks.get_block_ids()[0])
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = _ReqState(request, block_ids)
        else:
            st.request = request
            if len(block_ids) >= len(st.block_ids):
                st.block_ids = block_ids
        # What kvbm holds already is not offloaded again.
        st.saved = max(st.saved, min(self.present.pop(req_id, 0), len(block_ids)))
        if num_external_tokens <= 0:
            return
        bs = self.block_size
        local = self.local_hit.pop(req_id, request.num_computed_tokens)
        first = local // bs
        last = min(-(-(local + num_external_tokens) // bs), len(request.block_hashes))
        if last <= first or last > len(block_ids):
            return
        self.pending_loads.append(
            LoadSpec(req_id, list(request.block_hashes[first:last]), block_ids[first:last])
        )
        _, host = self.match_host.pop(req_id, (first, last))
        in_host = max(0, min(host, last) - first)
        self.load_clock[req_id] = (
            0.0,
            in_host * self.block_bytes,
            (last - first - in_host) * self.block_bytes,
        )
        self.stats["planned_load_blocks"] += last - first
        # Loaded blocks are in kvbm already: saving starts past them.
        st.saved = max(st.saved, last)

    def build_meta(self, so) -> KvtierMetadata:
        now = time.monotonic()
        for spec in self.pending_loads:
            _, host_bytes, disk_bytes = self.load_clock.get(spec.req_id, (0.0, 0, 0))
            self.load_clock[spec.req_id] = (now, host_bytes, disk_bytes)
        self.steps = self.steps[-3:] + [(now, so.total_num_scheduled_tokens)]
        meta = KvtierMetadata(loads=self.pending_loads)
        self.pending_loads = []
        meta.preempted = set(so.preempted_req_ids or ())
        for req_id in meta.preempted:
            st = self.reqs.get(req_id)
            if st is not None:
                st.block_ids = []
        for new in so.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                self._plan_save(meta, new.req_id, st, new.num_computed_tokens, so)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._plan_save(meta, req_id, st, cached.num_computed_tokens[i], so)
        return meta

    def _plan_save(self, meta, req_id, st: _ReqState, computed: int, so) -> None:
        if not self.settings.save:
            return
        request = st.request
        bs = self.block_size
        done_tokens = computed + so.num_scheduled_tokens.get(req_id, 0)
        full = min(done_tokens // bs, len(request.block_hashes), len(st.block_ids))
        start = st.saved
        if full <= start:
            return
        hashes = request.block_hashes
        keys = list(hashes[start:full])
        parents = [hashes[start - 1] if start > 0 else b""] + keys[:-1]
        tokens = list(request.all_token_ids[start * bs : full * bs])
        meta.saves.append(SaveSpec(req_id, keys, parents, st.block_ids[start:full], tokens))
        st.saved = full
        st.had_saves = True
        self.stats["planned_save_blocks"] += full - start

    def finished(self, request) -> bool:
        req_id = request.request_id
        self.match_host.pop(req_id, None)
        self.load_clock.pop(req_id, None)
        self.local_hit.pop(req_id, None)
        with self.promote_lock:
            p = self.promotions.pop(req_id, None)
            if p is not None:
                self._abandon(p)
            self._release(self.held.pop(req_id, []))
        self.present.pop(req_id, None)
        st = self.reqs.pop(req_id, None)
        # The worker reports a request with saves in finished_sending once
        # they are done; until then vLLM keeps its blocks.
        return st is not None and st.had_saves

    def reset(self) -> bool:
        try:
            for ns in self.namespaces:
                self.client.clear(ns)
        except KvbmError as e:
            logger.warning("kvtier: cannot reset kvbm's cache: %s", e)
            return False
        self.present.clear()
        return True

    def on_output(self, output) -> None:
        """A step's results: measures the step (prefill speed) and the
        loads it finished (load rates), for the cost model."""
        now = time.monotonic()
        if self.steps:
            started, tokens = self.steps.pop(0)
            self.cost.observe_prefill(tokens, now - started)
        failed = set(getattr(output, "invalid_block_ids", None) or ())
        for req_id in getattr(output, "finished_recving", None) or ():
            with self.promote_lock:
                self._release(self.held.pop(req_id, []))
            started, host_bytes, disk_bytes = self.load_clock.pop(req_id, (0.0, 0, 0))
            # A load with failed blocks measured a failure, not a rate.
            if started and not failed:
                self.cost.observe_load(host_bytes, disk_bytes, now - started)

    def take_events(self) -> list:
        if not self.settings.events:
            return []
        if self.events is None:
            self.events = EventStream(self.settings.socket, retry_ms=self.settings.retry_ms)
            return []
        ns = self.namespaces[0]
        out = []
        for _incarnation, _seq, _snapshot, events in self.events.drain():
            for ev in events:
                kind = ev[0]
                if kind == "stored":
                    _, tier, namespace, keys, parent, tokens, tpb = ev
                    if namespace != ns or tier not in _MEDIUM:
                        continue
                    out.append(
                        BlockStored(
                            block_hashes=list(keys),
                            parent_block_hash=parent or None,
                            token_ids=list(tokens),
                            block_size=int(tpb) or self.block_size,
                            lora_id=None,
                            medium=_MEDIUM[tier],
                            lora_name=None,
                        )
                    )
                elif kind == "removed":
                    _, tier, namespace, keys = ev
                    if namespace != ns or tier not in _MEDIUM:
                        continue
                    out.append(BlockRemoved(block_hashes=list(keys), medium=_MEDIUM[tier]))
                else:
                    # A cleared tier has no vLLM form that spares the GPU's
                    # own blocks (AllBlocksCleared would drop them too).
                    self.stats["events_skipped"] += 1
        return out

    def shutdown(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        if self.promoter is not None:
            with self.promote_lock:
                for p in self.promotions.values():
                    self._abandon(p)
                for leases in self.held.values():
                    self._release(leases)
                self.promotions.clear()
                self.held.clear()
            self.promoter.shutdown(wait=True)
            self.promoter = None
        if self.promote_pool is not None:
            self.promote_pool.close()
            self.promote_pool = None


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
        self.layers: list[torch.Tensor] = []
        self.layout_extra = ""
        self.block_bytes = 0
        # Owned by the IO thread.
        self.pool: Pool | None = None
        self.mover: Mover | None = None
        self.pinned = False
        self.retry_at = 0.0
        self.failures = 0  # consecutive, for the back-off
        self.disabled_reason = ""
        # The side stream of every copy (CUDA), created once: the engine
        # thread orders its own stream after it on preemption.
        self.stream = None
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
        page = "x".join(str(s) for s in views[0].shape[1:])
        self.layout_extra = f"engine=vllm;page={page};layers={len(views)}"
        self.block_bytes = views[0][0].numel() * views[0].element_size() * len(views)
        if views[0].device.type == "cuda":
            self.stream = torch.cuda.Stream(device=views[0].device)
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
        if self.mover is None:
            return
        logger.warning("kvtier: kvbm failed (%s); re-attaching", why)
        self._close_pool()
        self._count("reattaches")
        self._back_off()

    def _close_pool(self) -> None:
        if self.mover is not None:
            # Every copy touching the mapping is on the side stream (or was
            # synchronous, on CPU): after this none is left.
            self.mover.sync()
            self.mover = None
        if self.pool is not None:
            if self.pinned:
                torch.cuda.cudart().cudaHostUnregister(self.pool.address)
                self.pinned = False
            # Leases and reservations of the old session die with it.
            self.pool.close()
            self.pool = None

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
                    lease, slots = self.client.acquire(ld.session, self.namespace, part)
                except KvbmError as e:
                    if isinstance(e, KvbmUnavailable):
                        self._detach(str(e))
                    break
                if lease:
                    ld.leases.append(lease)
                good = 0
                for _off, length in slots:
                    if length != self.block_bytes:
                        break
                    good += 1
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
        for spec in meta.loads:
            ld = _Load(spec.req_id, list(spec.block_ids))
            self.loads.append(ld)
            if not self.settings.load or self.io is None:
                ld.failed, ld.transfer = list(spec.block_ids), Transfer()
                continue
            self._queue_copy(self._io_load, spec, ld, self._ready_event())

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
