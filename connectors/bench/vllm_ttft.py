"""Time to first token in a real vLLM engine with KvtierConnector.

A Llama-3-8B-shaped model with dummy weights (no download: the config is
written here, weights are random), one generated token per request, so a
`generate` call's wall time is the time to first token. For each prompt
length:

- ``cold``: nothing cached; vLLM computes the prefill, the connector offloads
  the blocks to kvbm.
- ``gpu_hit``: the same prompt again, from vLLM's own GPU prefix cache, at
  once (the connector's offload of the cold request is still copying).
- ``gpu_hit_idle``: the same again, half a second later (offload done).
- ``kvtier_hit``: after ``reset_prefix_cache`` (the GPU copy is gone), the
  same prompt: the connector matches it in kvbm and loads it onto the GPU.

The baseline is ``cold`` in the same run; the figure of merit is
cold / kvtier_hit. ``--no-connector`` runs the same engine without the
connector (cold and GPU hits only), for what the connector costs a GPU hit.
Needs a GPU, vLLM and the kvtier package.

    python connectors/bench/vllm_ttft.py --kvbm .gpu/kvbm [--tokens 2000 8000 20000] [--tp 2]

Prints one JSON line per request and a summary line.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from kvbm_proc import start_kvbm

LLAMA3_8B_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 32768,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvbm", default="target/release/kvbm")
    ap.add_argument("--host-bytes", default="24GiB")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2000, 8000, 20000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (worker processes)")
    ap.add_argument("--chunk-mb", type=int, help="the connector's copy_chunk_mb (default: its own)")
    ap.add_argument("--no-connector", action="store_true", help="vLLM alone, for the baseline")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one gpu_hit and one kvtier_hit of the longest prompt")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="kvtier-ttft-")
    model = os.path.join(work, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(LLAMA3_8B_SHAPE, f)
    proc, socket = start_kvbm(args.kvbm, work, args.host_bytes)

    from vllm import LLM, SamplingParams

    extra = {"socket": socket, "model": "llama3-8b-shape"}
    if args.chunk_mb is not None:
        extra["copy_chunk_mb"] = args.chunk_mb

    try:
        llm = LLM(
            model=model,
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            enable_prefix_caching=True,
            prefix_caching_hash_algo="sha256_cbor",  # reproducible across engines
            max_model_len=32768,
            max_num_batched_tokens=32768,
            gpu_memory_utilization=0.85,
            seed=0,
            tensor_parallel_size=args.tp,
            kv_transfer_config=None if args.no_connector else {
                "kv_connector": "KvtierConnector",
                "kv_connector_module_path": "kvtier.vllm",
                "kv_role": "kv_both",
                "kv_connector_extra_config": extra,
            },
        )
        sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        rng = random.Random(1234)

        def ids(n):
            return [rng.randrange(1000, 128000) for _ in range(n)]

        def run(tokens, label):
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": tokens}], sp, use_tqdm=False)[0]
            rec = {"label": label, "tokens": len(tokens),
                   "ttft_ms": round((time.perf_counter() - t) * 1e3, 2),
                   "cached_tokens": out.num_cached_tokens}
            print(json.dumps(rec), flush=True)
            return rec

        def settle():
            # Offloads finish asynchronously and are committed to kvbm when
            # the engine next polls the connector: step it with a one-token
            # request until kvbm holds them, then drop the GPU cache.
            for _ in range(50):
                run(ids(1), "flush")
                time.sleep(0.02)
                if llm.reset_prefix_cache():
                    return
            raise SystemExit("reset_prefix_cache kept failing")

        run(ids(1024), "warmup")
        run(ids(20000), "warmup")
        settle()
        rows = []
        for n in args.tokens:
            for _ in range(args.reps):
                p = ids(n)
                rows.append(run(p, "cold"))
                rows.append(run(p, "gpu_hit"))
                time.sleep(0.5)
                rows.append(run(p, "gpu_hit_idle"))
                if args.no_connector:
                    llm.reset_prefix_cache()
                    continue
                settle()
                rows.append(run(p, "kvtier_hit"))
                settle()
        if args.profile:
            import cProfile
            import pstats

            p = ids(max(args.tokens))
            run(p, "cold")
            for label in ("gpu_hit", "kvtier_hit"):
                if label == "kvtier_hit":
                    settle()
                prof = cProfile.Profile()
                prof.enable()
                run(p, f"profiled_{label}")
                prof.disable()
                print(f"PROFILE {label}", flush=True)
                pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        summary = {}
        for n in args.tokens:
            med = {}
            for label in ("cold", "gpu_hit", "gpu_hit_idle", "kvtier_hit"):
                t = [r["ttft_ms"] for r in rows if r["tokens"] == n and r["label"] == label]
                if t:
                    med[f"{label}_ms"] = statistics.median(t)
            summary[n] = med
            if "kvtier_hit_ms" in med:
                med["cold_over_kvtier"] = round(med["cold_ms"] / med["kvtier_hit_ms"], 2)
                med["kvtier_cached_tokens"] = [
                    r["cached_tokens"]
                    for r in rows
                    if r["tokens"] == n and r["label"] == "kvtier_hit"
                ]
        print(json.dumps({"summary": summary}), flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
