"""The vLLM connector's scheduler side: how much of a request kvbm can
serve (and whether loading it beats recomputing), which loads and saves each
step carries to the workers, and kvbm's tier events as vLLM's KV events."""

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvtier._kvtier import Client, CostModel, EventStream, KvbmError, KvbmUnavailable, Pool
from kvtier.config import KvtierSettings, LayoutInfo

logger = logging.getLogger("kvtier.vllm")

# Blocks leased per Acquire of a promotion: the first chunks are small, so
# that the promotion's own pace is known early (a 2 MiB block reads in about
# 1 ms from a 2 GB/s disk), then they grow to amortise the round trips.
PROMOTE_CHUNKS = (32, 64, 128)
# A probe (a promotion that only measures a tier) reads this many blocks
# at most: the first chunk's pace includes one-time costs, the rest tells.
PROBE_BLOCKS = sum(PROMOTE_CHUNKS)
# Other requests' prefill must keep the engine busy at least this long for
# a request to wait for slow disk blocks meanwhile.
WAIT_MIN_SECS = 0.02

# kvtier.v1.Tier numbers → vLLM event medium.
_MEDIUM = {2: "CPU", 3: "DISK", 4: "REMOTE"}


@dataclass
class LoadSpec:
    """Onboard ``keys`` into the engine's blocks ``block_ids``: layer by
    layer in this step's forward pass (``sync``), or in the background."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    sync: bool = False


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
    host memory (from disk or G4) and leased by the scheduler before the
    match is reported, so the load cannot miss them."""

    first: int
    keys: list[bytes]
    started: float
    # Longer than this and recomputing would have been faster.
    budget: float
    # Blocks from here on are only in G4 (none by default); the Acquires
    # split there, so each measures one tier.
    local: int = sys.maxsize
    # Only a measurement of `tier` ("disk" or "remote", kvbm's names):
    # nobody waits for it, its leases go at once.
    probe: bool = False
    tier: str = "disk"
    done: bool = False
    abandoned: bool = False
    # Blocks leased on every rank (a prefix of `keys`), and the leases.
    leased: int = 0
    leases: list[tuple[int, int]] = field(default_factory=list)


class _SchedulerSide:
    def __init__(
        self,
        settings: KvtierSettings,
        info: LayoutInfo,
        block_bytes: int,
        async_scheduling: bool = False,
    ):
        self.settings = settings
        self.info = info
        self.block_size = info.block_size
        # Bytes of one block on one rank (ranks load theirs in parallel).
        self.block_bytes = block_bytes
        # Whether a match is worth loading, from loads and prefills measured
        # here: kvtier's one cost model (kvtier_client::cost).
        self.cost = CostModel()
        # req_id → its match's blocks from here on were only in G4 when its
        # promotion started.
        self.match_local: dict[str, int] = {}
        # req_id → (start, bytes) of its load in flight. Every block of a
        # reported match is in host memory by the time it loads (disk and
        # G4 blocks were promoted first), so a load measures host copies.
        self.load_clock: dict[str, tuple[float, int]] = {}
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
        # Forward steps scheduled and not yet reported: (when, tokens
        # scheduled, requests whose load runs in it), oldest first. vLLM
        # reports every forward step's output to the connector, but a step
        # that runs no forward only when it carries something; so only
        # forward steps are kept, and without async scheduling (where one
        # step runs while the next is scheduled) none is still running when
        # the next is scheduled.
        self.steps: list[tuple[float, int, list[str]]] = []
        self.steps_in_flight = 2 if async_scheduling else 1
        self.layerwise = settings.load_mode == "layerwise"
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
            # Matched blocks not loaded because recomputing them is faster,
            # and those of them only in G4.
            "skipped_slow_blocks": 0,
            "skipped_slow_remote_blocks": 0,
            # Blocks planned for loading that were only in G4 at lookup.
            "planned_remote_blocks": 0,
            # Matches whose disk or G4 blocks were promoted (and leased)
            # before being reported, and those given up as slower than
            # recompute.
            "promotions": 0,
            "promotions_given_up": 0,
            # Slow disk or G4 chains read while other requests kept the
            # engine busy (the request waited for them at no cost).
            "promotions_while_busy": 0,
            # Promotions made only to measure the disk (G4), and rates
            # taken from kvbm's own measure instead (kvbm reports none for
            # G4 reads).
            "disk_probes": 0,
            "disk_rates_from_kvbm": 0,
            "remote_probes": 0,
            "remote_rates_from_kvbm": 0,
        }

    def _lookup(self, hashes) -> tuple[int, int, int]:
        """Blocks of the chain present, in host memory, and held on the
        node (host memory or disk, not only G4), on every rank."""
        counts = [self.client.lookup_counts(ns, hashes) for ns in self.namespaces]
        return tuple(min(c[i] for c in counts) for i in (0, 1, 3))

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
            present, host, local = self._lookup(hashes)
            matched = present
            if present < first < len(hashes):
                # kvbm lacks part of what the GPU holds; it may still hold
                # blocks past it.
                rest, rest_host, rest_local = self._lookup(hashes[first:])
                matched, host, local = first + rest, first + rest_host, first + rest_local
        except KvbmError as e:
            self.stats["lookup_failures"] += 1
            logger.debug("kvtier: lookup failed: %s", e)
            return 0, False
        self.present[request.request_id] = present
        with self.promote_lock:
            # A promotion of this request's chain has brought G4 blocks
            # into host memory since the lookup that started it.
            p = self.promotions.get(request.request_id)
            g4_from = local if p is None else min(local, p.local)
        if not self.settings.load:
            return 0, False
        found = matched
        host = min(host, matched)
        if matched > first:
            # Only what loads faster than it recomputes.
            end = self.cost.plan(first, host, local, matched, self.block_bytes, bs)
            self.stats["skipped_slow_blocks"] += matched - end
            self.stats["skipped_slow_remote_blocks"] += max(0, matched - max(end, local))
            matched = self._measured(request, first, host, local, end)
        start = max(host, first, matched)
        if found > start and self._knows(start, found, local):
            # Disk or G4 blocks the plan skips, slower than recomputing:
            # read them anyway while other requests' prefills keep the
            # engine busy.
            leased = self._while_busy(request, first, host, local, found)
            if leased is None:
                return None, False
            matched = max(matched, leased)
        elif matched > max(host, first):
            # Blocks from disk or G4: bring them into host memory and lease
            # them first; vLLM asks again meanwhile (None).
            matched = self._promoted(request, first, host, local, matched)
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
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "kvtier: match %s gpu=%d kvbm=%d host=%d local=%d -> load %d tokens",
                request.request_id, first, found, host, local, max(ext, 0),
            )
        if ext < max(self.settings.min_match_blocks, 1) * bs:
            return 0, False
        self.local_hit[request.request_id] = num_computed_tokens
        self.match_local[request.request_id] = g4_from
        # Every block of a reported match is in host memory by now (disk
        # and G4 blocks were promoted first): a layer-by-layer load runs in
        # the step that computes the rest of the request.
        return ext, not self.layerwise

    def _knows(self, start: int, end: int, local: int) -> bool:
        """Whether the rates of the tiers holding blocks `[start, end)`
        (past host memory: disk before `local`, G4 from it) are measured."""
        disk = start >= local or self.cost.knows_disk()
        return disk and (end <= local or self.cost.knows_remote())

    def _measured(self, request, first: int, host: int, local: int, end: int) -> int:
        """`end`, the plan's, short of the first tier it reaches whose
        speed is unknown (or old), which the plan counts as a win: that tier
        is measured with this request's blocks in the background, and its
        blocks are recomputed this time rather than bet the request on it.
        The disk comes first in the chain, so it is measured first."""
        bs, bb = self.block_size, self.block_bytes
        near = max(host, first)
        if min(end, local) > near and not self.cost.knows_disk():
            self._probe(request, first, host, min(end, local))
            return self.cost.plan(first, near, near, near, bb, bs)
        g4 = max(local, first)
        if end > g4 and not self.cost.knows_remote():
            self._probe(request, g4, g4, end, tier="remote")
            return self.cost.plan(first, host, local, local, bb, bs)
        return end

    def _probe(self, request, first: int, host: int, end: int, tier: str = "disk") -> None:
        """Measures `tier` by reading blocks `[first, end)` of the request's
        chain (at most `PROBE_BLOCKS` past `host`, those before it being in
        host memory already), unless kvbm has measured it already."""
        with self.promote_lock:
            if any(p.probe for p in self.promotions.values()):
                return  # one measurement at a time
            end = min(end, max(host, first) + PROBE_BLOCKS)
            local = first if tier == "remote" else end
            p = self._start_promotion(request, first, local, end, 0.0, probe=True, tier=tier)
            self.promotions["probe:" + request.request_id] = p

    def _start_promotion(
        self, request, first, local, end, budget, probe=False, tier="disk"
    ) -> _Promotion:
        """Under promote_lock. A promotion a request waits for stops the
        probes of the tiers it reads: two readers would share the disk (or
        the network). Every promotion may read the disk; only one reaching
        past `local` reads G4."""
        if not probe:
            reads = {"disk", "remote"} if end > local else {"disk"}
            for key in [k for k, v in self.promotions.items() if v.probe and v.tier in reads]:
                self._abandon(self.promotions.pop(key))
        p = _Promotion(
            first,
            list(request.block_hashes[first:end]),
            time.monotonic(),
            budget,
            local=local,
            probe=probe,
            tier=tier,
        )
        if self.promoter is None:
            from concurrent.futures import ThreadPoolExecutor

            self.promoter = ThreadPoolExecutor(2, thread_name_prefix="kvtier-promote")
        self.promoter.submit(self._measure if probe else self._promote, p)
        return p

    def _measure(self, p: _Promotion) -> None:
        """A probe: kvbm's own measure of the tier's reads when it has a
        current one (its reads for any engine count); otherwise `p`'s blocks
        read for the purpose. On the promoter thread."""
        try:
            tier = self.promote_client.stats()["tiers"].get(p.tier, {})
            rate = tier.get("read_bytes_per_s", 0)
        except KvbmError as e:
            logger.debug("kvtier: stats failed: %s", e)
            rate = 0
        if not rate:
            return self._promote(p)
        with self.promote_lock:
            if p.tier == "remote":
                self.cost.observe_remote_read(int(rate), 1.0)
            else:
                self.cost.observe_disk_read(int(rate), 1.0)
            self.stats[p.tier + "_rates_from_kvbm"] += 1
            p.done = p.abandoned = True
            self._forget(p)
        logger.debug("kvtier: kvbm reads its %s at %.2f GB/s", p.tier, rate / 1e9)

    def _promoted(self, request, first: int, host: int, local: int, end: int) -> int | None:
        """The end of the match once `[first, end)` is leased in host
        memory; None while the promotion runs. One that takes longer than
        recomputing those blocks is given up: the match ends where the
        prefix leased by then does."""
        req_id = request.request_id
        now = time.monotonic()
        with self.promote_lock:
            p = self.promotions.get(req_id)
            if p is not None and (p.first > first or p.first + len(p.keys) < end):
                self._abandon(self.promotions.pop(req_id))
                p = None
            if p is None:
                budget = self._recompute_secs(first, end)
                if budget is None:
                    budget = self.settings.timeout_ms / 1000
                self.promotions[req_id] = self._start_promotion(request, first, local, end, budget)
                self.stats["promotions"] += 1
                logger.debug(
                    "kvtier: promoting %s: blocks %d..%d (host to %d, local to %d), "
                    "budget %.1f ms", req_id, first, end, host, local, budget * 1e3,
                )
                return None
            if not p.done:
                if now - p.started < p.budget and not self._losing(p, now):
                    return None
                # Out of time, or the disk reads slower than recomputing the
                # rest: the request loads what is leased by now and
                # recomputes the rest; the promotion stops.
                self.stats["promotions_given_up"] += 1
                logger.debug(
                    "kvtier: promotion of %s given up after %.1f ms, %d of %d blocks leased",
                    req_id, (now - p.started) * 1e3, p.leased, len(p.keys),
                )
            return self._take_leased(req_id, p, end)

    def _while_busy(self, request, first: int, host: int, local: int, end: int) -> int | None:
        """Blocks `[host, end)` are on a disk (or in G4) slower than
        recomputing them. While other requests have prefill left to run,
        this one can wait without costing anything: it reads the chain into
        host memory in the meantime (None: ask again), and loads what was
        leased once they are done. With the engine otherwise idle it does
        not wait (returns `first`, nothing more to load)."""
        req_id = request.request_id
        busy = self._busy_secs(req_id)
        with self.promote_lock:
            p = self.promotions.get(req_id)
            if p is None:
                if busy < WAIT_MIN_SECS:
                    return first
                self.promotions[req_id] = self._start_promotion(request, first, local, end, busy)
                self.stats["promotions_while_busy"] += 1
                logger.debug(
                    "kvtier: %s reads blocks %d..%d (host to %d) while the engine is busy "
                    "for %.1f ms", req_id, first, end, host, busy * 1e3,
                )
                return None
            if not p.done and busy > 0 and time.monotonic() - p.started < p.budget:
                return None
            return self._take_leased(req_id, p, end)

    def _take_leased(self, req_id: str, p: _Promotion, end: int) -> int:
        """Under promote_lock: the promotion stops; the request keeps its
        leases until its load is done and loads the leased prefix."""
        del self.promotions[req_id]
        p.abandoned = True
        leases, p.leases = p.leases, []
        self._release(self.held.pop(req_id, []))
        self.held[req_id] = leases
        return p.first + min(p.leased, end - p.first)

    def _busy_secs(self, req_id: str) -> float:
        """Prefill left to schedule for the other requests the engine has
        started, by the cost model (0 while no prefill was measured)."""
        tokens = 0
        for other, st in self.reqs.items():
            r = st.request
            if other != req_id:
                tokens += max(0, r.num_prompt_tokens - r.num_computed_tokens)
        return (self.cost.recompute_secs(tokens) or 0.0) if tokens else 0.0

    def _losing(self, p: _Promotion, now: float) -> bool:
        """Whether waiting for the rest of a promotion, at the pace its
        chunks have come so far, takes longer than recomputing that rest.
        The estimate that started it may have been too kind (a disk busy
        with writes, a stale rate); this one is this promotion's own."""
        if p.leased == 0:
            return False
        rest = self._recompute_secs(p.first + p.leased, p.first + len(p.keys))
        if rest is None:
            return False
        wait_more = (now - p.started) / p.leased * (len(p.keys) - p.leased)
        return wait_more > rest

    def _recompute_secs(self, first: int, end: int) -> float | None:
        """Seconds to prefill blocks `[first, end)` after the first ones
        are computed, by the cost model; None before any prefill was
        measured."""
        bs = self.block_size
        full, done = self.cost.recompute_secs(end * bs), self.cost.recompute_secs(first * bs)
        if full is None or done is None:
            return None
        return full - done

    def _promote(self, p: _Promotion) -> None:
        """Leases `p.keys` on every rank, `PROMOTE_CHUNKS` blocks per
        Acquire (which reads what is on disk or only in G4 into host
        memory), so the leased prefix grows while the request waits and can
        be used as it is when the wait must end. On the promoter thread."""
        try:
            if self.promote_pool is None or self.promote_pool.closed:
                self.promote_pool = Pool(self.settings.socket, timeout_ms=self.settings.timeout_ms)
            session = self.promote_pool.session
            pos, n = 0, 0
            while pos < len(p.keys) and not p.abandoned:
                chunk = PROMOTE_CHUNKS[min(n, len(PROMOTE_CHUNKS) - 1)]
                n += 1
                at = p.first + pos
                if at < p.local:
                    # No Acquire reads from both the disk and G4: kvbm
                    # does not time them apart.
                    chunk = min(chunk, p.local - at)
                part = p.keys[pos : pos + chunk]
                started = time.monotonic()
                counts, leases, from_disk = [], [], 0
                for ns in self.namespaces:
                    lease, slots, disk = self.promote_client.acquire(session, ns, part)
                    if lease:
                        leases.append((session, lease))
                    counts.append(len(slots))
                    from_disk += disk
                got = min(counts)
                # What kvbm actually read from disk, and what only G4 held at
                # the lookup, summed over the ranks as `from_disk` is: blocks
                # already in host memory (another promotion, a probe) would
                # make the disk look fast. (G4 blocks another request brought
                # in meanwhile do make G4 look fast; the promotion's own pace
                # still cuts it short.)
                ranks = len(self.namespaces)
                in_g4 = (at + len(part) - max(at, p.local)) * ranks
                from_g4 = max(0, min(in_g4, got * ranks - from_disk))
                with self.promote_lock:
                    secs = time.monotonic() - started
                    if got == len(part) and (from_disk or from_g4):
                        bb = self.block_bytes
                        self.cost.observe_promotion(from_disk * bb, from_g4 * bb, secs)
                    logger.debug(
                        "kvtier: promoted %d/%d blocks (%d from disk, %d from G4) in %.1f ms%s",
                        got, len(part), from_disk, from_g4, secs * 1e3,
                        " (probe)" if p.probe else "",
                    )
                    if p.abandoned:
                        self._release(leases)
                        break
                    p.leases += leases
                    p.leased += got
                if got < len(part):
                    break
                pos += got
        except KvbmError as e:
            logger.debug("kvtier: promotion failed: %s", e)
            if isinstance(e, KvbmUnavailable) and self.promote_pool is not None:
                self.promote_pool.close()
                self.promote_pool = None
        with self.promote_lock:
            p.done = True
            if p.probe:
                self.stats[p.tier + "_probes"] += 1
                self._forget(p)
                p.abandoned = True
            if p.abandoned:
                self._release(p.leases)
                p.leases = []

    def _forget(self, p: _Promotion) -> None:
        """Under promote_lock: `p` leaves the promotions in flight (a probe's
        key is not the request's)."""
        self.promotions = {k: v for k, v in self.promotions.items() if v is not p}

    def _abandon(self, p: _Promotion) -> None:
        """Under promote_lock: the promotion stops, its leases go."""
        p.abandoned = True
        self._release(p.leases)
        p.leases = []

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
            LoadSpec(
                req_id,
                list(request.block_hashes[first:last]),
                block_ids[first:last],
                sync=self.layerwise,
            )
        )
        local = self.match_local.pop(req_id, last)
        self.load_clock[req_id] = (0.0, (last - first) * self.block_bytes)
        self.stats["planned_load_blocks"] += last - first
        self.stats["planned_remote_blocks"] += max(0, last - max(local, first))
        # Loaded blocks are in kvbm already: saving starts past them.
        st.saved = max(st.saved, last)

    def build_meta(self, so) -> KvtierMetadata:
        now = time.monotonic()
        for spec in self.pending_loads:
            _, nbytes = self.load_clock.get(spec.req_id, (0.0, 0))
            self.load_clock[spec.req_id] = (now, nbytes)
        sync = [spec.req_id for spec in self.pending_loads if spec.sync]
        if so.total_num_scheduled_tokens:
            keep = self.steps_in_flight - 1
            self.steps = (self.steps[-keep:] if keep else []) + [
                (now, so.total_num_scheduled_tokens, sync)
            ]
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
        self.match_local.pop(req_id, None)
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
        failed = set(getattr(output, "invalid_block_ids", None) or ())
        if self.steps:
            started, tokens, sync = self.steps.pop(0)
            if not sync:
                self.cost.observe_prefill(tokens, now - started)
            logger.debug(
                "kvtier: step of %d tokens in %.1f ms%s",
                tokens, (now - started) * 1e3, " (with loads)" if sync else "",
            )
            # Loads that ran inside the step: it measured them together with
            # the prefill they overlapped (an upper bound on the load).
            loaded = 0
            for req_id in sync:
                with self.promote_lock:
                    self._release(self.held.pop(req_id, []))
                loaded += self.load_clock.pop(req_id, (0.0, 0))[1]
            if loaded and not failed:
                self.cost.observe_load(loaded, 0, now - started)
        for req_id in getattr(output, "finished_recving", None) or ():
            with self.promote_lock:
                self._release(self.held.pop(req_id, []))
            started, nbytes = self.load_clock.pop(req_id, (0.0, 0))
            # A load with failed blocks measured a failure, not a rate.
            if started and not failed:
                self.cost.observe_load(nbytes, 0, now - started)

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
