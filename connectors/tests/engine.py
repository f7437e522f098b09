"""A stand-in for one vLLM engine: both roles of ``KvtierConnector``, built
and driven with vLLM's own config, ``Request``, ``KVCacheBlocks``,
``SchedulerOutput`` and ``KVConnectorOutput`` objects, and KV tensors on CPU
(or CUDA) in vLLM's layout: per-layer 4-D views ``[blocks, kv_heads,
block_size, K+V]`` of one backing buffer (block-outermost, so the views are
not contiguous).

The harness plays vLLM's scheduler and model runner in the order vLLM calls
the connector; the "forward pass" writes, for every computed block, values
derived from the block's hash, so equal prefixes get equal KV bytes.
"""

import dataclasses
import hashlib
import os

import torch
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256_cbor
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import (
    KVCacheBlock,
    get_request_block_hasher,
    init_none_hash,
)
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvtier.vllm import KvtierConnector

MODEL = "test/tiny-llama"
# The harness runs against vLLM 0.32.0 (CI) and 0.25.1 (the GPU machine's).
SCHEDULER_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(SchedulerOutput)}


def vllm_config(socket: str, block_size: int, hash_algo="sha256_cbor", **extra):
    kvt = KVTransferConfig(
        kv_connector="KvtierConnector",
        kv_connector_module_path="kvtier.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"socket": socket, "model": MODEL, **extra},
    )
    return VllmConfig(
        cache_config=CacheConfig(block_size=block_size, prefix_caching_hash_algo=hash_algo),
        kv_transfer_config=kvt,
        device_config=DeviceConfig(device="cpu"),
    )


class Engine:
    def __init__(
        self,
        socket: str,
        num_blocks: int = 64,
        num_layers: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 8,
        block_size: int = 16,
        dtype=torch.bfloat16,
        device: str | None = None,
        **extra,
    ):
        device = device or os.environ.get("KVTIER_TEST_DEVICE", "cpu")
        # The contract tests of asynchronous loads; layer-by-layer ones (the
        # connector's default) pass load_mode="layerwise".
        extra.setdefault("load_mode", "async")
        self.block_size = block_size
        self.config = vllm_config(socket, block_size, **extra)
        names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_dim, dtype=dtype
        )
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(names, spec)],
        )
        init_none_hash(sha256_cbor)
        self.hasher = get_request_block_hasher(block_size, sha256_cbor)
        self.scheduler = KvtierConnector(
            self.config, KVConnectorRole.SCHEDULER, self.kv_cache_config
        )
        self.worker = KvtierConnector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        backing = torch.zeros(
            (num_blocks, num_layers, num_kv_heads, block_size, 2 * head_dim),
            dtype=dtype,
            device=device,
        )
        self.backing = backing
        self.kv = {name: backing[:, i] for i, name in enumerate(names)}
        self.worker.register_kv_caches(self.kv)
        self.free_blocks = list(range(1, num_blocks))  # 0: vLLM's null block
        self.requests: dict[str, Request] = {}
        self.blocks: dict[str, list[int]] = {}
        self.finished: set[str] = set()
        self.outputs: list[KVConnectorOutput] = []

    # ---- requests and blocks ----

    def request(self, req_id: str, tokens: list[int]) -> Request:
        r = Request(
            req_id,
            list(tokens),
            SamplingParams(max_tokens=8),
            None,
            block_hasher=self.hasher,
        )
        self.requests[req_id] = r
        return r

    def allocate(self, r: Request, num_external_tokens: int) -> KVCacheBlocks:
        n = -(-r.num_tokens // self.block_size)
        ids = [self.free_blocks.pop(0) for _ in range(n)]
        self.blocks[r.request_id] = ids
        blocks = KVCacheBlocks(([KVCacheBlock(i) for i in ids],))
        self.scheduler.update_state_after_alloc(r, blocks, num_external_tokens)
        return blocks

    def block_bytes(self, block_id: int) -> torch.Tensor:
        return self.backing[block_id].cpu()

    def expected(self, key: bytes) -> torch.Tensor:
        """What the forward pass writes for the block with hash ``key``."""
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        shape = self.backing.shape[1:]
        return torch.randn(shape, generator=g).to(self.backing.dtype)

    def forward(self, r: Request, first_token: int, num_tokens: int) -> None:
        bs = self.block_size
        ids = self.blocks[r.request_id]
        last = min((first_token + num_tokens) // bs, len(r.block_hashes))
        for b in range(first_token // bs, last):
            self.backing[ids[b]] = self.expected(r.block_hashes[b]).to(self.backing.device)

    # ---- one engine step ----

    def step(self, new=(), cached=(), finished=(), preempted=None, compute=True, settle=True):
        """``new``: [(request, num_scheduled_tokens)] scheduled for the first
        time; ``cached``: [(request, num_scheduled_tokens)] running ones.
        ``settle``: let the connector's IO thread finish its jobs before and
        after asking what finished (as if the step took long enough)."""
        new_reqs = [
            NewRequestData.from_request(r, (list(self.blocks[r.request_id]),)) for r, _ in new
        ]
        cd = CachedRequestData.make_empty()
        for r, _n in cached:
            cd.req_ids.append(r.request_id)
            cd.new_token_ids.append([])
            cd.new_block_ids.append(None)
            cd.num_computed_tokens.append(r.num_computed_tokens)
            cd.num_output_tokens.append(0)
        num_scheduled = {r.request_id: n for r, n in list(new) + list(cached)}
        extra = {}
        if "num_common_prefix_blocks" in SCHEDULER_OUTPUT_FIELDS:  # vLLM < 0.26
            extra["num_common_prefix_blocks"] = [0]
        so = SchedulerOutput(
            **extra,
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cd,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=set(finished),
            free_encoder_mm_hashes=[],
            preempted_req_ids=preempted,
        )
        meta = self.scheduler.build_connector_meta(so)
        so.kv_connector_metadata = meta
        # The worker runs on a pickled copy, as with several GPUs.
        import pickle

        meta = pickle.loads(pickle.dumps(meta))
        w = self.worker
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        if compute:
            # As vLLM's attention layers do, before using each layer.
            for name in self.kv:
                w.wait_for_layer_load(name)
            for r, n in list(new) + list(cached):
                self.forward(r, r.num_computed_tokens, n)
        w.wait_for_save()
        # kvbm calls and copies run on the connector's IO thread: let them
        # land before asking, so each step's outcome is deterministic.
        if settle:
            w.worker_side.wait_idle()
        sending, recving = w.get_finished(so.finished_req_ids)
        if settle:
            w.worker_side.wait_idle()  # the commits and releases it queued
        out = KVConnectorOutput(
            finished_sending=sending or None,
            finished_recving=recving or None,
            invalid_block_ids=w.get_block_ids_with_load_errors(),
        )
        w.clear_connector_metadata()
        # As vLLM does: a step that ran a forward always reports its output
        # to the connector, one that did not only when it carries something.
        forward = compute and so.total_num_scheduled_tokens > 0
        if forward or sending or recving or out.invalid_block_ids:
            self.scheduler.update_connector_output(out)
        for r, n in list(new) + list(cached):
            r.num_computed_tokens += n
        self.outputs.append(out)
        return out

    def shutdown(self):
        self.worker.shutdown()
        self.scheduler.shutdown()
