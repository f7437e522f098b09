"""Offload/onboard throughput of the kvtier connector's copy path on a GPU.

512 scattered blocks in Llama-3-8B geometry (32 layers, 8 KV heads, head dim
128, bf16, 16 tokens per block: 2 MiB per block, 1 GiB in all), between
vLLM-layout KV tensors on the GPU and kvbm's shared pool:

- ``ours``: the connector's path: Reserve → batched gather + copy into the
  pool → Commit (offload; Reserve and Commit over the pool session's binary
  frames, as the connector does); Acquire → copy out of the pool + batched scatter →
  Release (onboard). ``ours_copy`` times the copies alone.
- ``baseline``: plain torch in the same run: per-layer ``index_select`` into
  a GPU staging tensor, then one copy to a pinned host tensor (and back).

Runs with the pool pinned (``cudaHostRegister``) and not pinned. Also
``probe``: how long an engine-like small device-to-host copy on the default
stream takes while an offload of all the blocks is in flight (``--chunk-mb``
sets the connector's ``copy_chunk_mb``), against the same copy on an idle GPU.
Prints one JSON line. Needs a kvbm daemon: ``--socket`` or ``--kvbm PATH`` to start one.
"""

import argparse
import json
import tempfile
import time

import torch

from kvbm_proc import start_kvbm
from kvtier import Client, Pool
from kvtier.config import KvtierSettings
from kvtier.mover import Mover, pool_tensor


def timed(fn, iters: int) -> float:
    """Best-of and median wall time (s) of fn(), synchronised."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def probe(mover, ids, offsets, iters: int, result: dict) -> None:
    """Wall time of a sampled-token-sized copy to the host on the default
    stream, on an idle GPU and 0-10 ms after an offload was queued."""
    small = torch.zeros(256, dtype=torch.long, device=mover.device)

    def sample_copy() -> float:
        t = time.perf_counter()
        small.add_(1)
        small.cpu()
        return time.perf_counter() - t

    idle, busy = [], []
    for _ in range(iters):
        for delay in (0, 0.002, 0.005, 0.010):
            torch.cuda.synchronize()
            idle.append(sample_copy())
            transfer = mover.save(ids, offsets)
            time.sleep(delay)  # the offload's copies, not its gathers, running
            busy.append(sample_copy())
            transfer.wait()
    result["chunk_mb"] = mover.chunk_blocks * mover.block_bytes >> 20
    result["probe_idle_ms"] = round(sorted(idle)[len(idle) // 2] * 1e3, 3)
    result["probe_during_offload_ms"] = round(sorted(busy)[len(busy) // 2] * 1e3, 3)
    result["probe_during_offload_max_ms"] = round(max(busy) * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--kvbm", default=".gpu/kvbm")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--gpu-blocks", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--host-bytes", default="3GiB")
    ap.add_argument("--chunk-mb", type=int, default=KvtierSettings.copy_chunk_mb)
    args = ap.parse_args()

    dev = torch.device("cuda")
    L, H, D, B, N = args.layers, args.heads, args.head_dim, args.block_size, args.blocks
    # vLLM's per-layer views [blocks, kv_heads, block_size, K+V] of one
    # layer-outermost backing buffer.
    backing = torch.randn((L, args.gpu_blocks, H, B, 2 * D), dtype=torch.bfloat16, device=dev)
    layers = [backing[i] for i in range(L)]
    layer_bytes = layers[0][0].numel() * 2
    block_bytes = layer_bytes * L
    total = block_bytes * N
    # Sources and destinations disjoint (block 0 is vLLM's null block), so
    # onboarding never overwrites a block a later offload reads and the final
    # bytes check compares what was offloaded with what came back.
    perm = torch.randperm(args.gpu_blocks - 1).add_(1)
    ids = perm[:N].tolist()
    dst_ids = perm[N : 2 * N].tolist()
    ids_dev = torch.tensor(ids, device=dev)
    dst_dev = torch.tensor(dst_ids, device=dev)

    proc = None
    tmp = tempfile.TemporaryDirectory()
    socket = args.socket
    if socket is None:
        proc, socket = start_kvbm(args.kvbm, tmp.name, args.host_bytes)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "blocks": N,
        "block_bytes": block_bytes,
        "total_bytes": total,
    }
    try:
        # Baseline: gather on the GPU + one copy to pinned host memory.
        staging = torch.empty((N, L, layer_bytes), dtype=torch.uint8, device=dev)
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)

        def base_offload():
            for i, layer in enumerate(layers):
                staging[:, i].copy_(layer.index_select(0, ids_dev).view(N, -1).view(torch.uint8))
            host.copy_(staging.view(-1), non_blocking=True)

        def base_onboard():
            staging.view(-1).copy_(host, non_blocking=True)
            for i, layer in enumerate(layers):
                layer.index_copy_(
                    0, dst_dev, staging[:, i].view(torch.bfloat16).view(N, H, B, 2 * D)
                )

        t = timed(base_offload, args.iters)
        result["baseline_offload_GBps"] = round(total / t / 1e9, 2)
        t = timed(base_onboard, args.iters)
        result["baseline_onboard_GBps"] = round(total / t / 1e9, 2)
        staging = host = None  # free them before the pool runs

        client = Client(socket, timeout_ms=30000)
        ns = "bench/gpu-throughput"
        client.register_namespace(ns, block_bytes, {"model": "bench", "tokens_per_block": B})
        for pinned in (True, False):
            pool = Pool(socket)
            tensor = pool_tensor(pool.address, pool.size)
            if pinned:
                rc = torch.cuda.cudart().cudaHostRegister(pool.address, pool.size, 0)
                if int(getattr(rc, "value", rc)) != 0:
                    result["pin_error"] = str(rc)
                    pool.close()
                    continue
            mover = Mover(layers, tensor, chunk_bytes=args.chunk_mb << 20)
            tag = "pinned" if pinned else "unpinned"
            # Key chains made before timing: an engine has its block hashes
            # already (vLLM's request.block_hashes).
            chains = [
                [f"{tag}-{r}-{i}".encode().ljust(32, b"\0")[:32] for i in range(N)]
                for r in range(2 * args.iters + 2)
            ]

            def chain():
                return chains.pop()

            keys_box = {}

            def offload():
                keys = chain()
                slots = pool.reserve(ns, keys, [b""] * N, [], B)
                mover.save(ids, [o for o, _ in slots]).wait()
                pool.commit(ns, keys)
                keys_box["keys"] = keys

            def onboard():
                lease, slots, _ = client.acquire(pool.session, ns, keys_box["keys"])
                mover.load(dst_ids, [o for o, _ in slots]).wait()
                client.release(pool.session, lease)

            copy_slots = {}

            def offload_copy():
                mover.save(ids, copy_slots["offsets"]).wait()

            def onboard_copy():
                mover.load(dst_ids, copy_slots["offsets"]).wait()

            t = timed(offload, args.iters)
            result[f"ours_offload_{tag}_GBps"] = round(total / t / 1e9, 2)
            t = timed(onboard, args.iters)
            result[f"ours_onboard_{tag}_GBps"] = round(total / t / 1e9, 2)
            # Copies alone, into the slots of the last offload.
            lease, slots, _ = client.acquire(pool.session, ns, keys_box["keys"])
            copy_slots["offsets"] = [o for o, _ in slots]
            t = timed(offload_copy, args.iters)
            result[f"ours_copy_offload_{tag}_GBps"] = round(total / t / 1e9, 2)
            t = timed(onboard_copy, args.iters)
            result[f"ours_copy_onboard_{tag}_GBps"] = round(total / t / 1e9, 2)
            if pinned:
                probe(mover, ids, copy_slots["offsets"], args.iters, result)
            client.release(pool.session, lease)
            # Bytes check: what was onboarded equals what was offloaded.
            ok = all(
                torch.equal(layer.index_select(0, dst_dev), layer.index_select(0, ids_dev))
                for layer in layers
            )
            result[f"ours_{tag}_bytes_identical"] = ok
            client.evict(ns, keys_box["keys"])
            mover = tensor = None
            if pinned:
                torch.cuda.cudart().cudaHostUnregister(pool.address)
            pool.close()
        for tag in ("pinned", "unpinned"):
            k = f"ours_offload_{tag}_GBps"
            if k in result:
                result[f"offload_ratio_{tag}"] = round(
                    result[k] / result["baseline_offload_GBps"], 3
                )
                result[f"onboard_ratio_{tag}"] = round(
                    result[f"ours_onboard_{tag}_GBps"] / result["baseline_onboard_GBps"], 3
                )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
