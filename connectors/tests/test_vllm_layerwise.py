"""Layer-by-layer loads (``load_mode="layerwise"``, the default): the match
is loaded in the step that computes the rest of the request, not in a step
of its own, and whatever cannot be loaded is recomputed in that step."""

import torch
from engine import Engine
from test_vllm_connector import prompt, run_a

from kvtier import Client


def layerwise(daemon, **kw) -> Engine:
    return Engine(daemon.socket, load_mode="layerwise", **kw)


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

    from conftest import Daemon

    import kvtier.vllm_scheduler as vs
    from kvtier import CostModel

    monkeypatch.setattr(vs, "PROMOTE_CHUNK", 2)
    d = Daemon(tmp_path, disk_bytes="64MiB").start()
    eng = Engine(d.socket, load_mode="layerwise")
    run_a(eng, prompt(80))
    eng.worker.worker_side.wait_idle()
    Client(d.socket).sync()
    eng.shutdown()
    d.stop()
    d.start()  # the blocks are on disk only now
    eng = Engine(d.socket, load_mode="layerwise")
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
