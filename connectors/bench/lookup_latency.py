"""Median latency of a 512-key Lookup from Python through the kvtier extension,
over the pool socket's fast path and over gRPC in the same run.

The RPC `get_num_new_matched_tokens` makes for an 8k-token request (512 blocks
of 16); `latency.py` measures the whole connector call with vLLM objects, this
measures the call alone where vLLM is not installed (e.g. the GPU machine).

    python connectors/bench/lookup_latency.py --kvbm target/release/kvbm
"""

import argparse
import json
import statistics
import tempfile
import time

from kvbm_proc import start_kvbm
from kvtier import Client


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvbm", default="target/release/kvbm")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc, sock = start_kvbm(args.kvbm, d, "64MiB")
        try:
            c = Client(sock)
            c.register_namespace("lat", 4096, {"model": "m", "tokens_per_block": 16})
            keys = [i.to_bytes(32, "big") for i in range(1, 513)]
            for i, k in enumerate(keys):
                c.put("lat", k, keys[i - 1] if i else b"", bytes(4096))
            assert c.lookup("lat", keys) == 512
            for _ in range(200):
                c.lookup("lat", keys)
            def timed(call) -> list[float]:
                out = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    call("lat", keys)
                    out.append((time.perf_counter() - t) * 1e6)
                return sorted(out)

            fast = timed(c.lookup)  # pool socket fast path
            grpc = timed(c.lookup_tiers)  # gRPC, the baseline
            print(json.dumps({
                "lookup_512_p50_us": round(statistics.median(fast), 1),
                "lookup_512_p99_us": round(fast[len(fast) * 99 // 100], 1),
                "grpc_lookup_512_p50_us": round(statistics.median(grpc), 1),
                "iters": args.iters,
            }))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
