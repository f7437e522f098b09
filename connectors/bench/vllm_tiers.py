"""Does every tier pay off? Reused long documents in a real vLLM engine whose
GPU KV cache is smaller than the working set, served by:

- ``none``: vLLM alone (its GPU prefix cache, then recompute);
- ``native``: vLLM's own CPU offloading (``kv_offloading_size``), the thing
  a vLLM user gets for free;
- ``kvtier_host``: kvtier with a host tier large enough for everything
  (loads layer by layer, the default);
- ``kvtier_host_async``: the same, loading each match in a step of its own
  before the request runs (``load_mode="async"``);
- ``kvtier_disk``: kvtier with a small host tier and a disk tier.

All in the same run on the same device, one fresh engine per mode (a child
process each). A Llama-3-8B-shaped model with dummy weights, one generated
token per request, so a request's wall time is its time to first token.

Each mode: ``--docs`` documents of ``--doc-tokens`` tokens are asked once
(cold), in an order that evicts each from the GPU before it returns; then
``--rounds`` rounds ask each again — round 1 with the cold prompt exactly
(its first token must equal the cold one), later rounds with a fresh
question after the document. Then one concurrent batch of every document
with a fresh question. Reported per mode: TTFT of reused requests, tokens
served from a cache, kvbm's hits per tier, failed requests, first-token
mismatches, and the batch's wall time.

    python connectors/bench/vllm_tiers.py --kvbm .gpu/kvbm [--modes none native kvtier_host kvtier_disk]

Prints one JSON line per request and one summary line per mode.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from kvbm_proc import start_kvbm
from vllm_ttft import LLAMA3_8B_SHAPE

BLOCK_TOKENS = 16
MODES = ("none", "native", "kvtier_host", "kvtier_host_async", "kvtier_disk")


def kvbm_tiers(socket: str) -> dict:
    from kvtier import Client

    tiers = Client(socket).stats()["tiers"]
    return {name: {"hits": t["hits"], "blocks": t["blocks"]} for name, t in tiers.items()}


def connector_stats(llm) -> dict | None:
    """The kvtier scheduler's counters, where the engine core runs in this
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    try:
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        return dict(sched.connector._scheduler.stats)
    except AttributeError:
        return None


def child(args) -> None:
    work = tempfile.mkdtemp(prefix=f"kvtier-tiers-{args.child}-", dir=args.workdir)
    model = os.path.join(work, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(LLAMA3_8B_SHAPE, f)
    proc = socket = None
    kw = {}
    if args.child.startswith("kvtier"):
        host, disk = (
            (f"{args.host_gib}GiB", "0")
            if args.child.startswith("kvtier_host")
            else (f"{args.small_host_gib}GiB", f"{args.disk_gib}GiB")
        )
        proc, socket = start_kvbm(args.kvbm, work, host, disk_bytes=disk)
        kw["kv_transfer_config"] = {
            "kv_connector": "KvtierConnector",
            "kv_connector_module_path": "kvtier.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "socket": socket,
                "model": "llama3-8b-shape",
                "load_mode": "async" if args.child.endswith("_async") else "layerwise",
            },
        }
    elif args.child == "native":
        kw["kv_offloading_size"] = float(args.host_gib)
        kw["kv_offloading_backend"] = "native"

    if args.trace:
        # The connector's decisions, one line each, on this process's stdout.
        import logging

        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("TRACE %(relativeCreated)9.1f %(message)s"))
        lg = logging.getLogger("kvtier")
        lg.addHandler(h)
        lg.setLevel(logging.DEBUG)

    from vllm import LLM, SamplingParams

    doc_blocks = args.doc_tokens // BLOCK_TOKENS
    try:
        llm = LLM(
            model=model,
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            enable_prefix_caching=True,
            prefix_caching_hash_algo="sha256_cbor",
            max_model_len=args.doc_tokens + 2048,
            max_num_batched_tokens=args.doc_tokens + 2048,
            # The GPU holds about 1.5 documents: each is evicted from it
            # before it is asked again.
            num_gpu_blocks_override=doc_blocks * 3 // 2 + 128,
            gpu_memory_utilization=0.85,
            seed=0,
            **kw,
        )
        sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        rng = random.Random(1234)

        def ids(n):
            return [rng.randrange(1000, 128000) for _ in range(n)]

        def run(prompts, label):
            t = time.perf_counter()
            failed = 0
            outs = []
            try:
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            except Exception as e:  # noqa: BLE001 - a failed request is a result here
                failed = len(prompts)
                print(json.dumps({"mode": args.child, "label": label, "error": repr(e)}), flush=True)
            ms = round((time.perf_counter() - t) * 1e3, 2)
            recs = []
            for p, o in zip(prompts, outs):
                bad = o.outputs[0].finish_reason not in ("length", "stop")
                failed += bad
                recs.append({
                    "mode": args.child, "label": label, "tokens": len(p), "ttft_ms": ms,
                    "cached_tokens": o.num_cached_tokens or 0,
                    "first_token": o.outputs[0].token_ids[0] if o.outputs[0].token_ids else None,
                    "failed": bad,
                })
            for r in recs:
                print(json.dumps(r), flush=True)
            if args.trace:
                print(f"TRACE ---- {label} {ms} ms", flush=True)
            return recs, failed

        def settle():
            # Let asynchronous offloads land before the next document.
            for _ in range(5):
                run([ids(1)], "flush")
                time.sleep(0.05)

        run([ids(1024)], "warmup")
        docs = [ids(args.doc_tokens) for _ in range(args.docs)]
        first_q = [ids(args.question_tokens) for _ in docs]
        cold, reused, failed, mismatch, gpu_hit = {}, [], 0, 0, []
        for i, d in enumerate(docs):
            recs, f = run([d + first_q[i]], "cold")
            failed += f
            cold[i] = recs[0] if recs else None
            settle()
            if args.child == "none":
                # The document again at once, still in vLLM's GPU prefix
                # cache, with a fresh question: the floor every tier aims at.
                recs, f = run([d + ids(args.question_tokens)], "gpu_hit")
                failed += f
                gpu_hit += [r["ttft_ms"] for r in recs]
        before = kvbm_tiers(socket) if socket else None
        for r in range(args.rounds):
            for i, d in enumerate(docs):
                q = first_q[i] if r == 0 else ids(args.question_tokens)
                recs, f = run([d + q], f"reuse{r + 1}")
                failed += f
                if recs and r == 0 and cold[i] and recs[0]["first_token"] != cold[i]["first_token"]:
                    mismatch += 1
                reused += recs
                settle()
        batch, f = run([d + ids(args.question_tokens) for d in docs], "batch")
        failed += f
        after = kvbm_tiers(socket) if socket else None
        ttft = [r["ttft_ms"] for r in reused]
        cold_ttft = [c["ttft_ms"] for c in cold.values() if c]
        summary = {
            "mode": args.child,
            "doc_tokens": args.doc_tokens,
            "cold_ms_median": statistics.median(cold_ttft) if cold_ttft else None,
            "gpu_hit_ms_median": statistics.median(gpu_hit) if gpu_hit else None,
            "reuse_ms_median": statistics.median(ttft) if ttft else None,
            "reuse_ms_max": max(ttft) if ttft else None,
            "reuse_ms_all": ttft,
            "reuse_cached_fraction": round(
                sum(r["cached_tokens"] for r in reused) / max(1, sum(r["tokens"] for r in reused)), 3
            ),
            "batch_ms": batch[0]["ttft_ms"] if batch else None,
            "failed_requests": failed,
            "first_token_mismatches": mismatch,
        }
        conn = connector_stats(llm)
        if conn:
            summary["connector"] = conn
        if before is not None:
            summary["kvbm_hits_during_reuse"] = {
                t: after[t]["hits"] - before.get(t, {"hits": 0})["hits"] for t in after
            }
        print("SUMMARY " + json.dumps(summary), flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvbm", default="target/release/kvbm")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=16384)
    ap.add_argument("--question-tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where kvbm's data and disk tier live")
    ap.add_argument("--host-gib", type=int, default=24,
                    help="host memory of native offloading and kvtier_host")
    ap.add_argument("--small-host-gib", type=int, default=4, help="kvtier_disk's host tier")
    ap.add_argument("--disk-gib", type=int, default=24, help="kvtier_disk's disk tier")
    ap.add_argument("--trace", action="store_true",
                    help="print the connector's decisions (kvtier DEBUG log)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    summaries = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--kvbm", args.kvbm,
               "--docs", str(args.docs), "--doc-tokens", str(args.doc_tokens),
               "--question-tokens", str(args.question_tokens), "--rounds", str(args.rounds),
               "--host-gib", str(args.host_gib), "--small-host-gib", str(args.small_host_gib),
               "--disk-gib", str(args.disk_gib)]
        if args.workdir:
            cmd += ["--workdir", args.workdir]
        if args.trace:
            cmd.append("--trace")
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in out.stdout.splitlines():
            if line.startswith("SUMMARY "):
                summaries.append(json.loads(line[8:]))
                print(line, flush=True)
            elif line.startswith(("{", "TRACE ")):
                print(line, flush=True)
        if out.returncode:
            print(json.dumps({"mode": mode, "exit": out.returncode}), flush=True)
    by = {s["mode"]: s for s in summaries}
    ratios = {}
    for mode in ("kvtier_host", "kvtier_host_async"):
        if "native" in by and mode in by and by["native"]["reuse_ms_median"]:
            ratios[f"{mode}_over_native"] = round(
                by[mode]["reuse_ms_median"] / by["native"]["reuse_ms_median"], 3
            )
    if "none" in by and "kvtier_disk" in by:
        worst = max(
            d / n for d, n in zip(by["kvtier_disk"]["reuse_ms_all"], by["none"]["reuse_ms_all"])
        ) if by["none"]["reuse_ms_all"] else None
        ratios["kvtier_disk_over_none_worst_request"] = worst and round(worst, 3)
    print("RATIOS " + json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
