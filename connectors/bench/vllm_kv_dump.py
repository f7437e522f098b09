"""Dumps the KV a real vLLM engine computed, as raw bytes, for the codec measure.

A Llama-3-8B-shaped model (dummy weights: no trained weights reach the GPU
machine), one prompt of random token ids (8,192 unless given), its KV saved by
vLLM's own ExampleConnector (one safetensors file per layer); the tensors' raw
bytes are concatenated into /tmp/kv.bin for `kvbm/examples/g4_codec.rs --input`.

Run on the GPU machine beside ../shared/gpu-vllm/'s files (the model config
`llama3-8b-shape/` next to this script), vLLM importable:

    python3 vllm_kv_dump.py 8192
"""
import glob, os, random, sys

import torch

from vllm import LLM, SamplingParams

store = "/tmp/kvstore"
llm = LLM(
    model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3-8b-shape"),
    load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
    max_model_len=16384, gpu_memory_utilization=0.85, seed=0,
    max_num_batched_tokens=16384,
    kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"shared_storage_path": store}},
)
rng = random.Random(7)
prompt = [rng.randrange(1000, 128000) for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)]
llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)

from safetensors.torch import load_file

files = sorted(glob.glob(f"{store}/**/*.safetensors", recursive=True))
n = 0
with open("/tmp/kv.bin", "wb") as out:
    for f in files:
        for name, t in load_file(f).items():
            b = t.contiguous().view(-1).view(dtype=torch.uint8).cpu().numpy().tobytes()
            out.write(b)
            n += len(b)
            if n == len(b):
                print("first tensor", name, tuple(t.shape), t.dtype, flush=True)
print(f"files {len(files)} bytes {n}", flush=True)
