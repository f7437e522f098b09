"""Settings of the vLLM connector, the namespace of a KV layout, and the
start-up check of vLLM's block-hash configuration.

Every key of ``kv_connector_extra_config`` is read here, with its default;
``docs/connector-vllm.md`` describes them.
"""

import hashlib
import os
from dataclasses import dataclass, fields

# Where kvbm listens when started with no flags (relative to its directory).
DEFAULT_SOCKET = "kvtier-data/kvbm.sock"

# vLLM's fixed seed for cryptographic hashes when PYTHONHASHSEED is unset
# (vllm.v1.core.kv_cache_utils.DEFAULT_NONE_HASH_SEED).
VLLM_DEFAULT_HASH_SEED = "vllm-none-hash"


class HashConfigError(ValueError):
    """vLLM's block hashes would differ between processes."""


@dataclass
class KvtierSettings:
    # kvbm's gRPC Unix socket; the pool socket is this path + ".pool".
    socket: str = ""
    # Namespace override; empty: derived from the KV layout.
    namespace: str = ""
    # Model identity in the namespace; empty: vLLM's served model name/path.
    model: str = ""
    # Deadline of the scheduler's Lookup: past it the request has no match.
    lookup_timeout_ms: int = 50
    # Deadline of a layer-by-layer load's Acquire, which the engine's step
    # waits for (its blocks are in host memory: it is quick unless kvbm is
    # hung, and then the blocks are recomputed).
    load_timeout_ms: int = 200
    # Deadline of every other call (Reserve, Commit, Acquire, ...).
    timeout_ms: int = 2000
    # After kvbm was unreachable, wait this long before trying again.
    retry_ms: int = 1000
    # Offload computed blocks to kvbm.
    save: bool = True
    # Onboard blocks from kvbm.
    load: bool = True
    # How: "layerwise" — in the step that computes the rest of the request,
    # each layer's blocks copied while earlier layers compute (the copy
    # hides behind the prefill of the new tokens); "async" — before the
    # request is scheduled, in a step of its own (vLLM's
    # WAITING_FOR_REMOTE_KVS).
    load_mode: str = "layerwise"
    # Ignore external hits that add fewer tokens than this many blocks hold
    # beyond the GPU's own hit (recomputing them beats a load's extra step).
    min_match_blocks: int = 1
    # Publish kvbm's tier events through take_events().
    events: bool = True
    # Largest chunk of an offload (MiB; 0: no limit): bounds its GPU staging
    # memory and how long the engine's own device-to-host copies can queue
    # behind the connector's. Onboards are not chunked (see Mover.load).
    copy_chunk_mb: int = 64
    # Pin the shared pool for the GPU (cudaHostRegister): "auto", "on", "off".
    pin_pool: str = "auto"
    # Accept a block-hash setup that is not reproducible across processes.
    allow_unsafe_hash: bool = False

    @classmethod
    def from_extra(cls, extra: dict | None) -> "KvtierSettings":
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(
                f"kvtier: unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}"
            )
        values = {}
        for name, value in extra.items():
            default = known[name].default
            if isinstance(default, bool):
                if isinstance(value, str):
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                values[name] = bool(value)
            elif isinstance(default, int):
                values[name] = int(value)
            else:
                values[name] = str(value)
        s = cls(**values)
        if not s.socket:
            s.socket = os.environ.get("KVTIER_SOCKET", DEFAULT_SOCKET)
        if s.copy_chunk_mb < 0:
            raise ValueError("kvtier: copy_chunk_mb must be 0 (no limit) or more")
        if s.pin_pool not in ("auto", "on", "off"):
            raise ValueError("kvtier: pin_pool must be auto, on or off")
        if s.load_mode not in ("layerwise", "async"):
            raise ValueError("kvtier: load_mode must be layerwise or async")
        return s


def hash_identity(algo: str, allow_unsafe: bool = False) -> str:
    """Checks that vLLM's block hashes are the same in every process and
    returns a short identity of the algorithm and seed for the namespace.

    Refused: the pickle-based algorithms (``sha256``, ``xxhash``), and
    ``xxhash_cbor`` without ``PYTHONHASHSEED`` (vLLM then picks a random
    seed per process) — on vLLM releases before the fixed default seed,
    every algorithm without ``PYTHONHASHSEED``.
    """
    seed = os.environ.get("PYTHONHASHSEED")
    problem = None
    if algo in ("sha256", "xxhash"):
        problem = (
            f"prefix_caching_hash_algo={algo!r} serializes with pickle, so "
            "engines may compute different block hashes for the same tokens"
        )
    elif algo == "xxhash_cbor" and seed is None:
        problem = "xxhash_cbor without PYTHONHASHSEED uses a random seed in every process"
    elif seed is None and not _vllm_has_default_seed():
        problem = (
            f"this vLLM draws a random seed in every process for {algo} "
            "when PYTHONHASHSEED is unset"
        )
    if problem is not None and not allow_unsafe:
        raise HashConfigError(
            f"kvtier: {problem}; engines would never find each other's blocks. "
            "Start vLLM with --prefix-caching-hash-algo sha256_cbor (and the "
            "same PYTHONHASHSEED on every engine; recent vLLM releases may "
            "leave it unset), or xxhash_cbor with a shared PYTHONHASHSEED. "
            'Set kv_connector_extra_config {"allow_unsafe_hash": true} to '
            "override."
        )
    if seed is None:
        seed = VLLM_DEFAULT_HASH_SEED if algo != "xxhash_cbor" else "random"
    digest = hashlib.sha256(seed.encode()).hexdigest()[:8]
    return f"{algo}-{digest}"


def _vllm_has_default_seed() -> bool:
    """Whether the installed vLLM derives its root block hash from a fixed
    default seed when PYTHONHASHSEED is unset (releases with
    ``resolve_none_hash_seed``); older ones (0.25) draw it from os.urandom
    in every process."""
    try:
        from vllm.v1.core import kv_cache_utils
    except ImportError:
        return True
    return hasattr(kv_cache_utils, "resolve_none_hash_seed")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayoutInfo:
    """What identifies one KV layout; the same on the scheduler and the
    workers, computed from the engine configuration alone."""

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    tp_world: int
    kv_layout: str
    hash_id: str
    # kv_connector_extra_config "namespace": replaces the derived name.
    override: str = ""

    def namespace(self, tp_rank: int) -> str:
        if self.override:
            return f"{self.override}/tp{tp_rank}of{self.tp_world}"
        return (
            f"vllm/{self.model}/l{self.num_layers}h{self.num_kv_heads}"
            f"d{self.head_dim}/{self.dtype}/b{self.block_size}"
            f"/tp{tp_rank}of{self.tp_world}/{self.kv_layout}/{self.hash_id}"
        )

    def layout(self, tp_rank: int, extra: str) -> dict:
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "tokens_per_block": self.block_size,
            "tp_rank": tp_rank,
            "tp_world": self.tp_world,
            "extra": extra,
        }


def layout_info(vllm_config, kv_cache_config, settings: KvtierSettings) -> LayoutInfo:
    """The layout of this engine, from its configuration. Supports one KV
    cache group of attention layers (dense models)."""
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise ValueError(
            f"kvtier: {len(groups)} KV cache groups; only single-group "
            "(full attention) models are supported"
        )
    spec = groups[0].kv_cache_spec
    model_config = vllm_config.model_config
    model = settings.model or (model_config.model if model_config else "unknown")
    algo = vllm_config.cache_config.prefix_caching_hash_algo
    # The physical order (NHD/HND) vLLM resolved; the logical views we copy
    # are checked again by the worker against the registered layout.
    kv_layout = os.environ.get("VLLM_KV_CACHE_LAYOUT") or "default"
    return LayoutInfo(
        model=str(model),
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        head_dim=int(spec.head_size),
        dtype=dtype_name(spec.dtype),
        block_size=int(spec.block_size),
        tp_world=int(vllm_config.parallel_config.tensor_parallel_size),
        kv_layout=str(kv_layout),
        hash_id=hash_identity(algo, settings.allow_unsafe_hash),
        override=settings.namespace,
    )
