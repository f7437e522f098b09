"""Layer-by-layer loads (``load_mode="layerwise"``, the default): the match
is loaded in the step that computes the rest of the request, not in a step
of its own, and whatever cannot be loaded is recomputed in that step."""

import torch
from engine import Engine
from test_vllm_connector import prompt, run_a

from kvtier import Client


def layerwise(daemon, **kw) -> Engine:
    return Engine(daemon.socket, load_mode="layerwise", **kw)


def on_disk_only(tmp_path, tokens: int = 80):
    """A daemon with a disk tier holding request A's prompt (`tokens`
    tokens) on disk only (it was restarted after a sync), and a fresh
    layer-by-layer engine on it."""
    from conftest import Daemon

    d = Daemon(tmp_path, disk_bytes="64MiB").start()
    eng = Engine(d.socket, load_mode="layerwise")
    run_a(eng, prompt(tokens))
    eng.worker.worker_side.wait_idle()
    Client(d.socket).sync()
    eng.shutdown()
    d.stop()
    d.start()
    return d, Engine(d.socket, load_mode="layerwise")


def matched_whole(eng: Engine, tokens: int = 80):
    """Request B: A's 80-token prompt again; matched (79 tokens, loaded in
    the computing step) and allocated, its last token left to compute."""
    b = eng.request("B", prompt(tokens))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (tokens - 1, False)
    eng.allocate(b, tokens - 1)
    b.num_computed_tokens = tokens - 1
    return b


def test_layerwise_load_runs_in_the_computing_step(daemon):
    eng = layerwise(daemon)
    a = run_a(eng, prompt(80))
    # B shares A's first 4 blocks, then 30 tokens of its own.
    b = eng.request("B", prompt(64) + prompt(30, start=5000))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (64, False)
    eng.allocate(b, 64)
    b.num_computed_tokens = 64
    # Scheduled at once with its 30 new tokens; nothing to wait for.
    out = eng.step(new=[(b, 30)])
    assert not out.finished_recving and not out.invalid_block_ids
    for i in range(4):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    ws = eng.worker.worker_side
    assert ws.stats["loaded_blocks"] == 4
    # The lease ends once the copies landed: the blocks can be evicted.
    eng.step(cached=[(b, 1)])
    ns = ws.namespace
    assert Client(daemon.socket).evict(ns, a.block_hashes[:4]) == 4
    eng.shutdown()


def test_layerwise_blocks_gone_are_recomputed_in_the_same_step(daemon):
    eng = layerwise(daemon)
    a = run_a(eng, prompt(80))
    b = matched_whole(eng)
    # Blocks 3 and 4 vanish between the match and the load.
    assert Client(daemon.socket).evict(eng.worker.worker_side.namespace, a.block_hashes[3:5]) == 2
    out = eng.step(new=[(b, 1)])
    assert not out.finished_recving
    assert out.invalid_block_ids == set(eng.blocks["B"][3:5])
    for i in range(3):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    eng.shutdown()


def test_layerwise_with_kvbm_gone_recomputes_everything(tmp_path):
    from conftest import Daemon

    d = Daemon(tmp_path).start()
    eng = Engine(d.socket, load_mode="layerwise")
    run_a(eng, prompt(80))
    b = matched_whole(eng)
    d.kill()
    out = eng.step(new=[(b, 1)])
    assert out.invalid_block_ids == set(eng.blocks["B"][:5])
    eng.shutdown()


def test_layerwise_load_needs_the_forward_to_wait(daemon):
    """A model runner that never calls wait_for_layer_load cannot be
    trusted with blocks copied while it runs: on CUDA they are reported
    for recomputing. On CPU the copy is done before the forward."""
    eng = layerwise(daemon)
    a = run_a(eng, prompt(80))
    b = matched_whole(eng)
    w = eng.worker
    ws = w.worker_side
    w.bind_connector_metadata(
        eng.scheduler.build_connector_meta(_empty_output(eng, b))
    )
    w.start_load_kv(None)
    cuda = ws.layer_events is not None
    w.wait_for_save()
    errors = w.get_block_ids_with_load_errors()
    if cuda:
        assert errors == set(eng.blocks["B"][:5])
    else:
        assert not errors
        for i in range(5):
            assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    w.clear_connector_metadata()
    eng.shutdown()


def _empty_output(eng: Engine, r):
    from engine import SCHEDULER_OUTPUT_FIELDS
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    extra = {"num_common_prefix_blocks": [0]} if "num_common_prefix_blocks" in SCHEDULER_OUTPUT_FIELDS else {}
    return SchedulerOutput(
        **extra,
        scheduled_new_reqs=[NewRequestData.from_request(r, (list(eng.blocks[r.request_id]),))],
        scheduled_cached_reqs=CachedRequestData.make_empty(),
        num_scheduled_tokens={r.request_id: 1},
        total_num_scheduled_tokens=1,
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
        preempted_req_ids=None,
    )


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs():
    from kvtier.vllm import KvtierConnector

    assert KvtierConnector.requires_piecewise_for_cudagraph({}) is True
    assert KvtierConnector.requires_piecewise_for_cudagraph({"load_mode": "async"}) is False


def test_promotion_out_of_time_loads_its_leased_prefix(tmp_path, monkeypatch):
    """A disk promotion still running when recomputing would have been
    faster is cut short: the request loads the prefix leased by then and
    recomputes only the rest (it does not pay its whole wait on top of a
    full recompute)."""
    import time

    import kvtier.vllm_scheduler as vs
    from kvtier import CostModel

    monkeypatch.setattr(vs, "PROMOTE_CHUNKS", (2,))
    d, eng = on_disk_only(tmp_path)
    side = eng.scheduler.scheduler_side
    bb = side.block_bytes
    m = CostModel()
    m.observe_load(100 * bb, 0, 100e-6)
    m.observe_disk_read(100 * bb, 100e-6)  # a fast disk: promote
    m.observe_prefill(1024, 1024 * 0.1)
    side.cost = m

    class SlowAfterFirst:
        """The disk stalls after the first chunk."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def acquire(self, *a):
            self.calls += 1
            if self.calls > 1:
                time.sleep(1.0)
            return self.inner.acquire(*a)

        def release(self, *a):
            return self.inner.release(*a)

    side.promote_client = SlowAfterFirst(side.promote_client)
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (None, False)
    p = side.promotions["B"]
    p.budget = 0.3
    for _ in range(300):
        if p.leased >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.35)
    # The first two blocks are leased in host memory; the rest is not.
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (32, False)
    assert side.stats["promotions_given_up"] == 1
    eng.allocate(b, 32)
    b.num_computed_tokens = 32
    out = eng.step(new=[(b, 48)])
    assert not out.invalid_block_ids
    eng.shutdown()
    d.stop()


def test_a_promotion_slower_than_recomputing_is_cut_at_once(daemon):
    """Its own pace, not the estimate that started it, decides: a promotion
    whose chunks come slower than recomputing the rest is cut before its
    budget is spent."""
    import time

    from kvtier import CostModel
    from kvtier.vllm_scheduler import _Promotion

    eng = layerwise(daemon)
    side = eng.scheduler.scheduler_side
    m = CostModel()
    m.observe_prefill(1024, 1024 * 1e-3)  # 1 ms a token
    side.cost = m
    now = time.monotonic()
    p = _Promotion(0, [b"k"] * 5, now - 1.0, budget=60.0, leased=2)
    # 0.5 s a block so far, 3 to go (1.5 s) against 48 ms to recompute them.
    assert side._losing(p, now)
    p.started = now - 0.01  # 5 ms a block: 15 ms to go
    assert not side._losing(p, now)
    eng.shutdown()


def test_idle_steps_do_not_skew_the_prefill_measurement(daemon):
    """While a request waits for a promotion vLLM runs steps without a
    forward, and reports their (empty) outputs to no one: the forward step
    that follows must still be measured as itself, from its own start."""
    import time

    eng = layerwise(daemon)
    side = eng.scheduler.scheduler_side
    for _ in range(6):
        eng.step()  # nothing scheduled, nothing reported
    time.sleep(0.3)
    a = eng.request("A", prompt(512))
    eng.allocate(a, 0)
    eng.step(new=[(a, 512)])
    secs = side.cost.recompute_secs(512)
    assert secs is not None, "the forward step was not measured"
    assert secs < 0.3, "measured from an idle step's start"
    assert not side.steps
    eng.shutdown()


def test_a_probe_reads_a_few_chunks_and_yields_to_a_waiting_request(tmp_path, monkeypatch):
    """Measuring the disk reads only a few chunks, and stops when a request
    starts a promotion it waits for (two readers would share the disk)."""
    import time

    import kvtier.vllm_scheduler as vs
    from kvtier import CostModel

    monkeypatch.setattr(vs, "PROMOTE_CHUNKS", (1, 2))
    monkeypatch.setattr(vs, "PROBE_BLOCKS", 3)
    n = 8
    d, eng = on_disk_only(tmp_path, 16 * n)
    side = eng.scheduler.scheduler_side
    b = eng.request("B", prompt(16 * n))
    # The disk's speed is unknown: B recomputes, a probe measures.
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    probe = next(p for p in side.promotions.values() if p.probe)
    assert len(probe.keys) == vs.PROBE_BLOCKS
    for _ in range(500):
        if probe.done:
            break
        time.sleep(0.01)
    assert probe.done and side.cost.knows_disk()
    assert side.stats["disk_probes"] == 1
    # A probe running when a request starts a promotion is abandoned.
    c = eng.request("C", prompt(16 * n))
    m = CostModel()
    m.observe_disk_read(100 * side.block_bytes, 100e-6)  # fast: promote
    m.observe_prefill(1024, 1024 * 0.1)
    side.cost = m
    again = vs._Promotion(0, [], time.monotonic(), 0.0, probe=True)
    side.promotions["probe:X"] = again
    assert eng.scheduler.get_num_new_matched_tokens(c, 0) == (None, False)
    assert again.abandoned and "probe:X" not in side.promotions
    eng.shutdown()
    d.stop()


def test_a_slow_disk_chain_is_read_while_the_engine_is_busy_anyway(tmp_path, monkeypatch):
    """Disk blocks slower than recomputing are skipped when the engine
    would otherwise idle, but read while other requests' prefill keeps it
    busy: the request waits (None) at no cost, then loads what was leased."""
    import time

    import kvtier.vllm_scheduler as vs
    from kvtier import CostModel

    monkeypatch.setattr(vs, "PROMOTE_CHUNKS", (2,))
    d, eng = on_disk_only(tmp_path)
    side = eng.scheduler.scheduler_side
    bb = side.block_bytes
    m = CostModel()
    m.observe_disk_read(bb, 1.0)  # a second a block: slower than recomputing
    m.observe_prefill(1024, 1024 * 0.01)
    side.cost = m
    b = eng.request("B", prompt(80))
    # Nothing else to run: no wait, recompute.
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    assert not side.promotions
    # Another request's 64-token prefill is still to run (0.64 s).
    x = eng.request("X", prompt(64, start=7000))
    eng.allocate(x, 0)
    inner = side.promote_client

    class StallsAfterFirst:
        """The disk stalls after the first chunk."""

        calls = 0

        def acquire(self, *a):
            self.calls += 1
            if self.calls > 1:
                time.sleep(2.0)
            return inner.acquire(*a)

        def release(self, *a):
            return inner.release(*a)

    side.promote_client = StallsAfterFirst()
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (None, False)
    assert side.stats["promotions_while_busy"] == 1
    p = side.promotions["B"]
    for _ in range(500):
        if p.leased >= 2:
            break
        time.sleep(0.01)
    # Still busy: B keeps waiting; once X's prefill ran, B loads the part
    # of the chain leased by then and recomputes the rest.
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (None, False)
    x.num_computed_tokens = x.num_prompt_tokens
    got, _ = eng.scheduler.get_num_new_matched_tokens(b, 0)
    assert got == 32
    assert "B" not in side.promotions and len(side.held["B"]) >= 1
    eng.allocate(b, got)
    b.num_computed_tokens = got
    out = eng.step(new=[(b, 80 - got)])
    assert not out.invalid_block_ids
    assert "B" not in side.held  # released once loaded
    eng.shutdown()
    d.stop()


def test_the_disk_rate_comes_from_kvbm_when_it_has_measured_it(tmp_path):
    """kvbm measures its disk on its own reads (for any engine); a
    scheduler that does not know the disk's speed takes kvbm's figure
    instead of reading blocks to find out."""
    import time

    from conftest import Daemon

    d = Daemon(tmp_path, host_bytes="64MiB", disk_bytes="256MiB").start()
    c = Client(d.socket)
    assert c.stats()["tiers"]["disk"]["read_bytes_per_s"] == 0
    mib2 = 2 << 20
    c.register_namespace("warm", mib2, {})
    keys = [i.to_bytes(4, "little") * 8 for i in range(80)]
    for i, k in enumerate(keys):
        assert c.put("warm", k, b"", bytes([i]) * mib2)
        if i % 16 == 15:
            # Write-behind drops what it cannot keep up with (a cache never
            # blocks its writer): on a loaded machine, a block evicted from
            # host memory before its write would be gone.
            c.sync()
    c.sync()
    # 160 MiB through a 64 MiB host tier: the first 40 blocks were evicted
    # from host memory and come back from disk.
    for i, k in enumerate(keys[:40]):
        assert c.get("warm", k) == bytes([i]) * mib2
    rate = c.stats()["tiers"]["disk"]["read_bytes_per_s"]
    assert rate > 1e6
    eng = layerwise(d)
    side = eng.scheduler.scheduler_side
    a = eng.request("A", prompt(80))
    side._probe(a, 0, 0, 5)
    for _ in range(500):
        with side.promote_lock:  # the probe's outcome is written under it
            if not side.promotions:
                break
        time.sleep(0.01)
    assert side.cost.knows_disk()
    assert side.stats["disk_rates_from_kvbm"] == 1
    assert side.stats["disk_probes"] == 0 and not side.promotions
    eng.shutdown()
    d.stop()
