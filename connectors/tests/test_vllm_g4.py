"""Blocks only in the shared object store (G4), against a real kvbm on a real
S3-compatible server (Garage): the scheduler prices them at G4's own rate,
measures that rate before betting a request on it, and loads them only when
that beats recomputing."""

import time

import torch
from conftest import Daemon
from engine import Engine
from test_vllm_connector import ask_until_reported, prompt, run_a

from kvtier import Client, CostModel

BLOCKS = 5


def wait_for(cond, what: str, secs: float = 30.0):
    deadline = time.monotonic() + secs
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {secs} s"
        time.sleep(0.02)


def on_g4_only(tmp_path, garage):
    """A daemon on the bucket whose engine saved request A's 80-token
    prompt (5 blocks), which kvbm uploaded; restarted, it holds them only in
    G4 (host memory only, no disk). Returns the daemon, a fresh engine and
    request A."""
    d = Daemon(tmp_path, remote=garage).start()
    eng = Engine(d.socket)
    a = run_a(eng, prompt(16 * BLOCKS))
    eng.worker.worker_side.wait_idle()
    wait_for(
        lambda: Client(d.socket).stats()["tiers"]["remote"]["blocks"] >= BLOCKS, "the upload"
    )
    eng.shutdown()
    d.stop()
    d.start()
    return d, Engine(d.socket), a


def g4_again(d: Daemon, ns: str, keys, in_host: int = 0) -> None:
    """Back to the chain's first `in_host` blocks in host memory and the
    rest only in G4 (a probe or a promotion leaves them in host memory;
    their leases go in the background)."""
    c = Client(d.socket)

    def settled():
        c.clear(tier="host")
        return c.lookup_counts(ns, keys) == (BLOCKS, 0, 0, 0)

    wait_for(settled, "host memory cleared")
    for k in keys[:in_host]:
        assert c.get(ns, k) is not None  # read back from G4 into host memory
    assert c.lookup_counts(ns, keys) == (BLOCKS, in_host, 0, in_host)


def cost(bb: int, g4_secs_per_block: float | None) -> CostModel:
    """Host copies at 1 µs a block; prefill at 100 ms a token (a very
    slow engine: a promotion may take seconds before recomputing would have
    been faster, so a loaded test machine does not give it up); G4 at
    `g4_secs_per_block`, or unknown."""
    m = CostModel()
    m.observe_load(100 * bb, 0, 100e-6)
    m.observe_prefill(1024, 1024 * 0.1)
    if g4_secs_per_block is not None:
        m.observe_remote_read(100 * bb, 100 * g4_secs_per_block)
    return m


def test_lookups_say_where_the_node_part_ends(tmp_path, garage):
    """Both lookup paths (the pool socket's frames and gRPC over TCP) count
    the node's own prefix apart from the G4 rest."""
    d, eng, a = on_g4_only(tmp_path, garage)
    ns = eng.worker.worker_side.namespace
    keys = a.block_hashes
    g4_again(d, ns, keys, in_host=2)
    assert Client(f"http://{d.grpc}").lookup_counts(ns, keys) == (BLOCKS, 2, 0, 2)
    # The GPU's own hit past the node's part: the rest is still G4's.
    assert Client(d.socket).lookup_counts(ns, keys[3:]) == (2, 0, 0, 0)
    eng.shutdown()
    d.stop()


def test_g4_of_unknown_speed_is_measured_not_bet_on(tmp_path, garage):
    """The node's part loads; the G4 rest is recomputed this time while a
    probe reads it to measure G4 (not the disk)."""
    d, eng, a = on_g4_only(tmp_path, garage)
    side = eng.scheduler.scheduler_side
    ns = eng.worker.worker_side.namespace
    g4_again(d, ns, a.block_hashes, in_host=2)
    side.cost = cost(side.block_bytes, None)
    b = eng.request("B", prompt(16 * BLOCKS))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (32, True)
    probe = next(p for p in side.promotions.values() if p.probe)
    assert (probe.tier, probe.first, len(probe.keys)) == ("remote", 2, BLOCKS - 2)
    wait_for(lambda: side.stats["remote_probes"] == 1, "the probe")
    assert side.cost.knows_remote() and not side.cost.knows_disk()
    assert side.stats["disk_probes"] == 0 and side.stats["promotions"] == 0
    eng.allocate(b, 32)
    out = eng.step()
    assert out.finished_recving == {"B"} and not out.invalid_block_ids
    assert side.stats["planned_remote_blocks"] == 0
    eng.shutdown()
    d.stop()


def test_g4_loads_only_when_faster_than_recompute(tmp_path, garage):
    d, eng, a = on_g4_only(tmp_path, garage)
    side = eng.scheduler.scheduler_side
    ns = eng.worker.worker_side.namespace
    bb = side.block_bytes
    # G4 slower than recomputing (10 s a block, 1.6 s to recompute one),
    # behind a node part in host memory: the match ends where that part
    # does.
    g4_again(d, ns, a.block_hashes, in_host=2)
    side.cost = cost(bb, 10.0)
    c = eng.request("C", prompt(16 * BLOCKS))
    assert eng.scheduler.get_num_new_matched_tokens(c, 0) == (32, True)
    assert side.stats["skipped_slow_remote_blocks"] == BLOCKS - 2
    assert not side.promotions
    # Nothing on the node: nothing to load.
    g4_again(d, ns, a.block_hashes)
    b = eng.request("B", prompt(16 * BLOCKS))
    assert eng.scheduler.get_num_new_matched_tokens(b, 0) == (0, False)
    assert side.stats["skipped_slow_remote_blocks"] == 2 * BLOCKS - 2
    # A fast G4: promoted into host memory and leased first (vLLM asks
    # again meanwhile), then loaded, bytes identical.
    side.cost = cost(bb, 1e-6)
    answers = ask_until_reported(eng, b)
    assert answers[0] == (None, False) and answers[-1] == (16 * BLOCKS - 1, True), answers
    assert side.stats["promotions"] == 1 and side.stats["promotions_given_up"] == 0
    eng.allocate(b, 16 * BLOCKS - 1)
    out = eng.step()
    assert out.finished_recving == {"B"} and not out.invalid_block_ids
    for i in range(BLOCKS):
        assert torch.equal(eng.block_bytes(eng.blocks["B"][i]), eng.expected(a.block_hashes[i]))
    assert side.stats["planned_remote_blocks"] == BLOCKS
    eng.shutdown()
    d.stop()
