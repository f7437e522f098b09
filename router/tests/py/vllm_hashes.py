"""Prints vLLM's own block hashes for the cases given on stdin.

Input (stdin): a JSON list of cases
  {"algo": "sha256_cbor" | "xxhash_cbor", "seed": str | null,
   "tokens": [int], "block_size": int,
   "lora": {"name": str, "path": str} | null, "cache_salt": str | null}
Output (stdout): a JSON list, one entry per case: the hex digests of the
request's full blocks, computed by vLLM's real Request + block hasher
(`get_request_block_hasher`, `generate_block_hash_extra_keys`,
`hash_block_tokens`, `init_none_hash`). A null seed unsets PYTHONHASHSEED
before `init_none_hash` runs (vLLM reads it at that moment).

Used by router/tests/engine_hash.rs.
"""

import json
import os
import sys

from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.utils.hashing import sha256_cbor, xxhash_cbor
from vllm.v1.core import kv_cache_utils
from vllm.v1.request import Request


def main() -> None:
    cases = json.load(sys.stdin)
    out = []
    for i, c in enumerate(cases):
        hash_fn = {"sha256_cbor": sha256_cbor, "xxhash_cbor": xxhash_cbor}[c["algo"]]
        if c["seed"] is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = c["seed"]
        kv_cache_utils.init_none_hash(hash_fn)
        lora = None
        if c["lora"] is not None:
            lora = LoRARequest(c["lora"]["name"], i + 1, c["lora"]["path"])
        req = Request(
            request_id=f"r{i}",
            prompt_token_ids=c["tokens"],
            sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None,
            lora_request=lora,
            cache_salt=c["cache_salt"],
            block_hasher=kv_cache_utils.get_request_block_hasher(
                c["block_size"], hash_fn
            ),
        )
        out.append([bytes(h).hex() for h in req.block_hashes])
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
