"""Latency of KvtierConnector.get_num_new_matched_tokens against a local kvbm.

An 8k-token request (512 blocks of 16 tokens) whose blocks are all in kvbm;
the scheduler-side connector asks kvbm for the match, as vLLM's scheduler
does for every new request. Prints one JSON line (microseconds).

    python connectors/bench/latency.py [--socket PATH] [--iters N]

Without --socket it starts ``$KVTIER_BIN_DIR/kvbm`` (default
``target/release/kvbm``, else ``target/debug/kvbm``) in a temporary
directory.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvbm_proc import start_kvbm

ROOT = Path(__file__).resolve().parents[2]


def kvbm_binary() -> str:
    bin_dir = os.environ.get("KVTIER_BIN_DIR")
    candidates = [Path(bin_dir) / "kvbm"] if bin_dir else []
    candidates += [ROOT / "target/release/kvbm", ROOT / "target/debug/kvbm"]
    binary = next((p for p in candidates if p.exists()), None)
    if binary is None:
        sys.exit("no kvbm binary: cargo build --release -p kvbm")
    return str(binary)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()

    import torch
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.request import Request

    from kvtier import Client, Pool
    from kvtier.vllm import KvtierConnector

    proc = None
    tmp = tempfile.TemporaryDirectory()
    socket = args.socket
    if socket is None:
        proc, socket = start_kvbm(kvbm_binary(), tmp.name, "64MiB")
    try:
        bs = 16
        config = VllmConfig(
            cache_config=CacheConfig(block_size=bs, prefix_caching_hash_algo="sha256_cbor"),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KvtierConnector",
                kv_connector_module_path="kvtier.vllm",
                kv_role="kv_both",
                kv_connector_extra_config={
                    "socket": socket,
                    "model": "bench/llama-3-8b",
                    "events": False,
                },
            ),
            device_config=DeviceConfig(device="cpu"),
        )
        names = [f"model.layers.{i}.self_attn.attn" for i in range(32)]
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
        kcc = KVCacheConfig(
            num_blocks=1024, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)]
        )
        sched = KvtierConnector(config, KVConnectorRole.SCHEDULER, kcc)
        ns = sched.scheduler_side.namespaces[0]

        init_none_hash(sha256_cbor)
        req = Request(
            "bench",
            list(range(args.tokens)),
            SamplingParams(max_tokens=1),
            None,
            block_hasher=get_request_block_hasher(bs, sha256_cbor),
        )
        keys = list(req.block_hashes)

        # Store the chain through the pool (small blocks: only keys matter).
        client = Client(socket)
        client.register_namespace(ns, 4096, {"model": "bench", "tokens_per_block": bs})
        pool = Pool(socket)
        parents = [b""] + keys[:-1]
        pool.reserve(ns, keys, parents, list(range(args.tokens)), bs)
        pool.commit(ns, keys)

        matched = sched.get_num_new_matched_tokens(req, 0)
        # Loaded in the computing step (the default load_mode, layerwise).
        assert matched == (args.tokens - 1, False), matched
        for _ in range(200):
            sched.get_num_new_matched_tokens(req, 0)
        samples = []
        for _ in range(args.iters):
            t = time.perf_counter_ns()
            sched.get_num_new_matched_tokens(req, 0)
            samples.append((time.perf_counter_ns() - t) / 1000)
        def timed(call) -> list[float]:
            out = []
            for _ in range(args.iters):
                t = time.perf_counter_ns()
                call(ns, keys)
                out.append((time.perf_counter_ns() - t) / 1000)
            return sorted(out)

        # The call alone: over the pool socket's fast path (what the
        # connector uses) and over gRPC (lookup_tiers), as a baseline.
        raw = timed(client.lookup)
        grpc = timed(client.lookup_tiers)
        samples.sort()
        print(
            json.dumps(
                {
                    "bench": "get_num_new_matched_tokens",
                    "tokens": args.tokens,
                    "blocks": len(keys),
                    "iters": args.iters,
                    "median_us": round(statistics.median(samples), 1),
                    "p90_us": round(samples[int(0.9 * len(samples))], 1),
                    "p99_us": round(samples[int(0.99 * len(samples))], 1),
                    "client_lookup_median_us": round(statistics.median(raw), 1),
                    "grpc_lookup_median_us": round(statistics.median(grpc), 1),
                }
            )
        )
        pool.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
