"""Contract tests of kvtier.vllm.KvtierConnector against a real kvbm daemon
and the real vllm package (both connector roles, CPU KV tensors)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Daemon
from engine import Engine
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvtier import Client
from kvtier.config import HashConfigError
from kvtier.vllm import KvtierConnector

BS = 16
HERE = Path(__file__).resolve().parent


def prompt(n_tokens: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n_tokens))


def run_a(eng: Engine, tokens: list[int], req_id="A"):
    """Request A: no match, computed in one step, saved, finished."""
    a = eng.request(req_id, tokens)
    assert eng.scheduler.get_num_new_matched_tokens(a, 0) == (0, False)
    eng.allocate(a, 0)
    eng.step(new=[(a, a.num_tokens)])
    assert eng.scheduler.request_finished(a, eng.blocks[req_id])[0] is True
    out = eng.step(finished={req_id})
    assert out.finished_sending == {req_id}
    return a


def ask_until_reported(eng: Engine, r) -> list:
    """`get_num_new_matched_tokens(r, 0)` asked again as vLLM does while
    the answer is "ask me again" (None); every answer."""
    answers = []
    for _ in range(1000):
        answers.append(eng.scheduler.get_num_new_matched_tokens(r, 0))
        if answers[-1][0] is not None:
            break
        time.sleep(0.01)
    return answers


def test_save_then_load_prefix_bytes_identical(daemon):
    eng = Engine(daemon.socket)
    a = run_a(eng, prompt(80))  # 5 full blocks
    assert eng.worker.worker_side.stats["saved_blocks"] == 5

    # B shares A's first 4 blocks (64 tokens), then diverges.
    b = eng.request("B", prompt(64) + prompt(30, start=5000))
    matched, is_async = eng.scheduler.get_num_new_matched_tokens(b, 0)
    assert (matched, is_async) == (64, True)
    eng.allocate(b, matched)
    out = eng.step()  # B waits for its load: not scheduled this step
    assert out.finished_recving == {"B"}
    assert not out.invalid_block_ids
    for i in range(4):
        assert torch.equal(
            eng.block_bytes(eng.blocks["B"][i]), eng.block_bytes(eng.blocks["A"][i])
        ), f"block {i}"
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    eng.shutdown()


def test_match_beyond_local_hit_and_whole_prompt(daemon):
    eng = Engine(daemon.socket)
    run_a(eng, prompt(80))
    b = eng.request("B", prompt(80))
    # 2 blocks already in the GPU prefix cache: only the 3 beyond count.
    assert eng.scheduler.get_num_new_matched_tokens(b, 2 * BS) == (3 * BS - 1, True)
    # Whole prompt present: one token is left to compute.
    c = eng.request("C", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(c, 0) == (79, True)
    d = eng.request("D", prompt(40, start=9000))
    assert eng.scheduler.get_num_new_matched_tokens(d, 0) == (0, False)
    # vLLM's own whole-prompt hit stops one block short of the end; the 15
    # tokens left are recomputed, not loaded (a load costs an engine step).
    e = eng.request("E", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(e, 4 * BS) == (0, False)
    eng.shutdown()


def test_blocks_kvbm_holds_are_not_offloaded_again(daemon):
    eng = Engine(daemon.socket)
    run_a(eng, prompt(80))  # 5 blocks in kvbm
    sched = eng.scheduler.scheduler_side.stats
    worker = eng.worker.worker_side.stats
    planned, saved = sched["planned_save_blocks"], worker["saved_blocks"]
    # The next turn of the conversation: A's 80 tokens and 32 more, A's
    # blocks still in vLLM's own prefix cache.
    h = eng.request("H", prompt(112))
    h.num_computed_tokens = 80
    assert eng.scheduler.get_num_new_matched_tokens(h, 80) == (0, False)
    eng.allocate(h, 0)
    eng.step(new=[(h, 32)])
    assert sched["planned_save_blocks"] - planned == 2
    assert worker["saved_blocks"] - saved == 2
    assert worker["save_present_blocks"] == 0
    eng.shutdown()


def test_incremental_saves_and_events(daemon):
    eng = Engine(daemon.socket)
    eng.scheduler.take_events()  # starts the subscription
    a = eng.request("A", prompt(64))
    eng.allocate(a, 0)
    eng.step(new=[(a, 20)])  # chunked prefill: 1 full block
    eng.step(cached=[(a, 44)])  # 3 more
    assert eng.worker.worker_side.stats["saved_blocks"] == 4
    deadline = time.monotonic() + 5
    stored = []
    while time.monotonic() < deadline and len(stored) < 4:
        for ev in eng.scheduler.take_events():
            if type(ev).__name__ == "BlockStored":
                assert ev.medium == "CPU" and ev.block_size == BS
                stored.extend(ev.block_hashes)
        time.sleep(0.05)
    assert set(a.block_hashes[:4]) <= set(stored)
    eng.shutdown()


def test_second_engine_process_finds_blocks(daemon):
    eng = Engine(daemon.socket)
    run_a(eng, prompt(80))
    script = HERE / "second_engine.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + sys.path)
    out = subprocess.run(
        [sys.executable, str(script), daemon.socket, json.dumps(prompt(80))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["matched"] == 79 and result["async"] is True
    assert result["identical"] is True
    eng.shutdown()


def test_daemon_killed_engine_continues_and_reconnects(tmp_path):
    d = Daemon(tmp_path).start()
    eng = Engine(d.socket, retry_ms=100, lookup_timeout_ms=50, timeout_ms=500)
    run_a(eng, prompt(80))
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0)[0] == 79
    eng.allocate(b, 79)
    d.kill()
    # The load planned before the crash fails: its blocks go back to vLLM.
    out = eng.step()
    assert out.finished_recving == {"B"}
    assert set(eng.blocks["B"][:5]) == out.invalid_block_ids
    # No matches, saves skipped and counted, steps go on.
    c = eng.request("C", prompt(48, start=7000))
    t = time.perf_counter()
    assert eng.scheduler.get_num_new_matched_tokens(c, 0) == (0, False)
    assert time.perf_counter() - t < 1.0
    eng.allocate(c, 0)
    eng.step(new=[(c, c.num_tokens)])
    assert eng.worker.worker_side.stats["save_skipped_blocks"] >= 3
    assert eng.scheduler.scheduler_side.stats["lookup_failures"] >= 1
    # The daemon comes back (empty): the connector reconnects by itself.
    d.start()
    time.sleep(0.3)
    e = eng.request("E", prompt(48, start=8000))
    eng.scheduler.get_num_new_matched_tokens(e, 0)
    eng.allocate(e, 0)
    eng.step(new=[(e, e.num_tokens)])
    assert eng.worker.worker_side.stats["saved_blocks"] >= 5 + 3
    f = eng.request("F", prompt(48, start=8000))
    assert eng.scheduler.get_num_new_matched_tokens(f, 0) == (47, True)
    eng.shutdown()
    d.stop()


def test_hung_daemon_never_stalls_the_engine(tmp_path):
    d = Daemon(tmp_path).start()
    eng = Engine(d.socket, timeout_ms=3000, lookup_timeout_ms=50, retry_ms=100)
    run_a(eng, prompt(80))
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (79, True)
    eng.allocate(b, 79)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        # The scheduler's lookup gives up after lookup_timeout_ms.
        c = eng.request("C", prompt(48, start=7000))
        t = time.perf_counter()
        assert eng.scheduler.get_num_new_matched_tokens(c, 0) == (0, False)
        assert time.perf_counter() - t < 1.5
        # A step that loads B and saves C: the worker's kvbm calls wait on
        # the IO thread, not in the step (the timeout is 3 s).
        eng.allocate(c, 0)
        t = time.perf_counter()
        first = eng.step(new=[(c, c.num_tokens)], settle=False)
        assert time.perf_counter() - t < 1.5
        assert first.finished_recving is None
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    # Once kvbm answers again, B's load completes or fails, and B is
    # reported exactly once; every block not loaded is in the error ids.
    reported = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not reported:
        out = eng.step()
        reported += sorted(out.finished_recving or ())
        errors = out.invalid_block_ids
    assert reported == ["B"]
    loaded = eng.worker.worker_side.stats["loaded_blocks"]
    assert loaded + len(errors) == 5
    for i in range(loaded):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(b.block_hashes[i]))
    eng.shutdown()
    d.stop()


def test_load_error_reports_block_ids(daemon):
    eng = Engine(daemon.socket)
    a = run_a(eng, prompt(80))
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (79, True)
    eng.allocate(b, 79)
    # Blocks 3 and 4 vanish between the match and the load.
    ns = eng.worker.worker_side.namespace
    assert Client(daemon.socket).evict(ns, a.block_hashes[3:5]) == 2
    out = eng.step()
    assert out.finished_recving == {"B"}
    assert out.invalid_block_ids == set(eng.blocks["B"][3:5])
    for i in range(3):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    eng.shutdown()


def test_failed_loads_are_recomputed_not_failed(daemon):
    # vLLM's default fails the request whose load failed; the connector
    # switches its engine to recomputing before the scheduler reads it.
    from vllm.config import KVTransferConfig

    assert KVTransferConfig().kv_load_failure_policy == "fail"
    eng = Engine(daemon.socket)
    assert eng.config.kv_transfer_config.kv_load_failure_policy == "recompute"
    eng.shutdown()


def test_stats_reach_vllm_logs_and_metrics(daemon):
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

    eng = Engine(daemon.socket)
    run_a(eng, prompt(80))
    saved = eng.worker.worker_side.stats["saved_blocks"]
    assert saved > 0
    stats = eng.worker.get_kv_connector_stats()
    assert stats.data["saved_blocks"] == saved
    assert eng.worker.get_kv_connector_stats() is None, "an interval's counts are taken once"
    # vLLM's logger rebuilds stats from the worker's dict and aggregates.
    total = KvtierConnector.build_kv_connector_stats(dict(stats.data)).aggregate(stats)
    assert total.reduce()["saved_blocks"] == 2 * saved
    # vLLM's Prometheus side builds the connector's metrics by class.
    prom = KVConnectorProm(eng.config, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(dict(stats.data), 0)
    labels = {"model_name": "m", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:kvtier_saved_blocks_total", labels) == saved
    eng.shutdown()


def test_match_skips_tiers_slower_than_recompute(tmp_path):
    from kvtier import CostModel

    d = Daemon(tmp_path, disk_bytes="64MiB").start()
    eng = Engine(d.socket)
    a = run_a(eng, prompt(80))
    eng.worker.worker_side.wait_idle()
    Client(d.socket).sync()
    eng.shutdown()
    # A restart keeps the blocks on disk only.
    d.stop()
    d.start()
    eng = Engine(d.socket)
    side = eng.scheduler.scheduler_side
    bb = side.block_bytes

    def measured(disk_secs_per_block):
        m = CostModel()
        m.observe_load(100 * bb, 0, 100e-6)  # host: 1 µs per block
        m.observe_load(0, 100 * bb, 100 * (1e-6 + disk_secs_per_block))
        # 100 ms a token (a very slow engine): a promotion may take up to
        # 8 s before recomputing the 80 tokens would have been faster, so a
        # loaded test machine does not give it up.
        m.observe_prefill(1024, 1024 * 0.1)
        return m

    b = eng.request("B", prompt(80))
    # Nothing known about the disk: the request recomputes while its blocks
    # are read in the background to measure it.
    side.cost = CostModel()
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    for _ in range(1000):
        if side.stats["disk_probes"]:
            break
        time.sleep(0.01)
    assert side.stats["disk_probes"] == 1 and side.cost.knows_disk()
    assert not side.promotions
    # The probe left the blocks in host memory: back to disk only, once its
    # leases (released in the background) are gone.
    ns = eng.worker.worker_side.namespace
    for _ in range(1000):
        Client(d.socket).clear(tier="host")
        if Client(d.socket).lookup_counts(ns, b.block_hashes)[1] == 0:
            break
        time.sleep(0.01)
    # A disk slower than recomputing (10 s a block, 1.6 s to recompute
    # one): the match is not reported, the blocks are recomputed.
    side.cost = measured(10.0)
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    assert side.stats["skipped_slow_blocks"] == 5
    # A fast one: promoted into host memory and leased first (vLLM is told
    # to ask again meanwhile), then loaded, bytes identical.
    side.cost = measured(10e-6)
    answers = ask_until_reported(eng, b)
    assert answers[0] == (None, False) and answers[-1] == (79, True), answers
    assert side.stats["promotions"] == 1
    assert Client(d.socket).lookup_counts(eng.worker.worker_side.namespace, b.block_hashes)[1] == 5
    eng.allocate(b, 79)
    out = eng.step()
    assert out.finished_recving == {"B"} and not out.invalid_block_ids
    for i in range(4):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    # The load reported done, the scheduler's leases went.
    assert not side.held
    eng.shutdown()
    d.stop()


def test_reset_cache_drops_this_engines_blocks_only(daemon):
    c = Client(daemon.socket)
    c.register_namespace("other", 4096, {})
    c.put("other", b"k", b"", b"\0" * 4096)
    eng = Engine(daemon.socket)
    a = run_a(eng, prompt(80))
    eng.worker.worker_side.wait_idle()
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (79, True)
    assert eng.scheduler.reset_cache() is True
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    assert c.lookup("other", [b"k"]) == 1, "another namespace keeps its blocks"
    assert a.block_hashes
    eng.shutdown()


def test_long_load_in_chunks_stops_at_a_missing_block(daemon):
    # 50 blocks: Acquires of 16 and 32 blocks; block 30 is gone by then.
    eng = Engine(daemon.socket, num_blocks=128)
    a = run_a(eng, prompt(800))
    eng.worker.worker_side.wait_idle()
    b = eng.request("B", prompt(800))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (799, True)
    eng.allocate(b, 799)
    ns = eng.worker.worker_side.namespace
    assert Client(daemon.socket).evict(ns, [a.block_hashes[30]]) == 1
    out = eng.step()
    assert out.finished_recving == {"B"}
    assert out.invalid_block_ids == set(eng.blocks["B"][30:50])
    for i in range(30):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    assert eng.worker.worker_side.stats["loaded_blocks"] == 30
    eng.shutdown()


def test_abort_during_load_leaks_nothing(daemon):
    eng = Engine(daemon.socket)
    a = run_a(eng, prompt(80))
    b = eng.request("B", prompt(80))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (79, True)
    eng.allocate(b, 79)
    # Aborted while waiting for its load (before the worker ran it).
    assert eng.scheduler.request_finished(b, eng.blocks["B"]) == (False, None)
    out = eng.step(finished={"B"})
    assert out.finished_recving == {"B"}  # reported exactly once
    out = eng.step(finished={"B"})
    assert not out.finished_recving and not out.finished_sending
    w = eng.worker.worker_side
    assert not w.loads and not w.saves and not w.pending_saves
    # No lease remains: leased blocks cannot be evicted, these all can.
    ns = w.namespace
    assert Client(daemon.socket).evict(ns, a.block_hashes[:5]) == 5
    eng.shutdown()


def test_preempted_request_is_not_leaked(daemon):
    eng = Engine(daemon.socket)
    a = eng.request("A", prompt(64))
    eng.allocate(a, 0)
    eng.step(new=[(a, 32)])
    eng.step(preempted={"A"}, compute=False)
    assert eng.scheduler.request_finished(a, [])[0] is True
    out = eng.step(finished={"A"})
    assert out.finished_sending == {"A"}
    out = eng.step(finished=set())
    assert not out.finished_sending
    eng.shutdown()


def test_refuses_non_reproducible_hash(daemon, monkeypatch):
    with pytest.raises(HashConfigError, match="sha256_cbor"):
        Engine(daemon.socket, hash_algo="sha256")
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(HashConfigError, match="random seed"):
        Engine(daemon.socket, hash_algo="xxhash_cbor")
    from vllm.v1.core import kv_cache_utils

    if not hasattr(kv_cache_utils, "resolve_none_hash_seed"):
        # vLLM 0.25 (the GPU machine's): a random root hash for every
        # algorithm without PYTHONHASHSEED.
        with pytest.raises(HashConfigError, match="random seed"):
            Engine(daemon.socket, hash_algo="sha256_cbor")
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    Engine(daemon.socket, hash_algo="xxhash_cbor").shutdown()


def test_namespace_shared_by_equal_layouts(daemon):
    e1 = Engine(daemon.socket)
    e2 = Engine(daemon.socket)
    assert e1.worker.worker_side.namespace == e2.worker.worker_side.namespace
    e3 = Engine(daemon.socket, num_kv_heads=4)
    assert e3.worker.worker_side.namespace != e1.worker.worker_side.namespace
    for e in (e1, e2, e3):
        e.shutdown()


def test_unsupported_layout_disables_the_worker_side(daemon):
    eng = Engine(daemon.socket)
    worker = KvtierConnector(eng.config, KVConnectorRole.WORKER, eng.kv_cache_config)
    # Equal shapes, but one layer keeps K and V of a block apart and the
    # others do not: the copy path cannot move them as one slot format.
    kv = {name: t.clone() for name, t in eng.kv.items()}
    first = next(iter(kv))
    t = kv[first]
    kv[first] = t.movedim(0, 1).contiguous().movedim(1, 0)
    worker.register_kv_caches(kv)
    side = worker.worker_side
    assert "unsupported KV layout" in side.disabled_reason
    assert side.io is None  # no IO thread, no pool attached
    eng.shutdown()


def test_failed_attach_closes_the_pool_and_retries(daemon, monkeypatch):
    import kvtier.vllm_worker as kv

    real, calls = kv.Mover, []

    def failing_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected: no CUDA stream")
        return real(*a, **kw)

    monkeypatch.setattr(kv, "Mover", failing_once)
    eng = Engine(daemon.socket, retry_ms=50)
    side = eng.worker.worker_side
    side.wait_idle()
    # The attach that failed left no mapping open (or pinned) behind it.
    assert calls == [1] and side.pool is None and side.mover is None
    time.sleep(0.1)  # past the back-off
    run_a(eng, prompt(80))
    assert side.stats["saved_blocks"] == 5
    assert len(calls) == 2
    eng.shutdown()
