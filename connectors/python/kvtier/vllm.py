"""``KvtierConnector``: vLLM's KV connector (``KVConnectorBase_V1``) over kvbm.

Load with::

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvbm/kvbm.sock"}}'

Scheduler side (``_SchedulerSide``, in ``kvtier.vllm_scheduler``): asks kvbm how many of a request's
blocks beyond the GPU's own prefix hit it holds (loaded layer by layer in
the step that computes the rest, or asynchronously before it),
plans loads and saves into each step's ``KvtierMetadata``, holds a finished
request's blocks while its offload is in flight, and turns kvbm's tier events
into vLLM's KV events.

Worker side (``_WorkerSide``, in ``kvtier.vllm_worker``): learns the layout from the KV tensors,
registers the namespace, maps kvbm's shared pool and moves blocks with
batched copies (``kvtier.mover``): saves through Reserve → copy → Commit,
loads through Acquire → copy → Release, on a background IO thread so the
engine's step never waits for kvbm — except a layer-by-layer load, whose one
Acquire (blocks already in host memory, a short deadline) and copies are
issued by the engine thread in the step that uses them, each layer's
attention waiting only for its own layer's blocks.

When kvbm is down, slow or restarting the engine keeps serving: lookups
report no match, saves are skipped and counted, loads that cannot complete
report their blocks through ``get_block_ids_with_load_errors`` (vLLM
recomputes them), and both sides reconnect by themselves.
"""

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.config import KvtierSettings, layout_info
from kvtier.vllm_scheduler import KvtierMetadata, LoadSpec, SaveSpec, _SchedulerSide
from kvtier.vllm_worker import _WorkerSide

try:
    from kvtier import vllm_metrics as _metrics
except ImportError:  # a vLLM without the connector-metrics hooks
    _metrics = None

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier.vllm")

__all__ = ["KvtierConnector", "KvtierMetadata", "LoadSpec", "SaveSpec"]


def _recompute_failed_loads(kv_transfer_config) -> None:
    """A cache never fails a request: a load that fails (the daemon killed,
    a device error) must make vLLM recompute the blocks, not end the request
    with an error, which is vLLM's default policy (`fail`). The scheduler
    reads the policy after it created its connector, so setting it here
    takes effect."""
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") == "recompute":
        return
    kv_transfer_config.kv_load_failure_policy = "recompute"
    logger.info(
        "kvtier: kv_load_failure_policy set to 'recompute': a failed load "
        "recomputes its blocks instead of failing the request"
    )


class KvtierConnector(KVConnectorBase_V1):
    """vLLM connector offloading to and onboarding from kvbm."""

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-by-layer loads wait in wait_for_layer_load, which a replayed
        # full CUDA graph would skip: vLLM then keeps attention outside its
        # graphs (PIECEWISE). `load_mode=async` leaves the choice to vLLM.
        return KvtierSettings.from_extra(extra_config).load_mode == "layerwise"

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped offload is a later miss.
        return False

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig",
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        _recompute_failed_loads(self._kv_transfer_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = KvtierSettings.from_extra(extra)
        self.info = layout_info(vllm_config, kv_cache_config, self.settings)
        self._scheduler: _SchedulerSide | None = None
        self._worker: _WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            group = kv_cache_config.kv_cache_groups[0]
            block_bytes = group.kv_cache_spec.page_size_bytes * len(group.layer_names)
            async_sched = bool(getattr(vllm_config.scheduler_config, "async_scheduling", False))
            self._scheduler = _SchedulerSide(
                self.settings, self.info, block_bytes, async_scheduling=async_sched
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            try:
                tp_rank = get_tensor_model_parallel_rank()
            except Exception:  # noqa: BLE001 - no process group (tests, 1 GPU)
                tp_rank = 0
            self._worker = _WorkerSide(self.settings, self.info, kv_cache_config, tp_rank)
        logger.info(
            "kvtier: %s connector for namespace %s at %s",
            role.name.lower(),
            self.info.namespace(0),
            self.settings.socket,
        )

    # ---- scheduler side ----

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.matched_tokens(request, num_computed_tokens)

    def on_new_request(self, request: "Request") -> None:
        # Disk promotions start when the request arrives, not when the
        # scheduler first gets to it.
        self._scheduler.matched_tokens(request, 0)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ):
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build_meta(scheduler_output)

    def request_finished(
        self, request: "Request", block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.finished(request), None

    def reset_cache(self) -> bool | None:
        """`reset_prefix_cache(reset_connector=True)`: drops this engine's
        blocks (its namespaces, every tier) from kvbm. Blocks being read or
        written stay."""
        if self._scheduler is None:
            return None
        return self._scheduler.reset()

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        self._scheduler.on_output(connector_output)

    def take_events(self):
        return self._scheduler.take_events()

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        if self._worker is not None:
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.start_loads(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # A layer-by-layer load: the layer's blocks before its attention.
        self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        # Saves are batched over all layers in wait_for_save.
        return

    def wait_for_save(self):
        self._worker.end_forward()
        if self.has_connector_metadata():
            self._worker.start_saves(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    # ---- metrics in vLLM's own logs and /metrics ----

    def get_kv_connector_stats(self):
        if self._worker is None or _metrics is None:
            return None
        delta = self._worker.take_stats_delta()
        return _metrics.KvtierConnectorStats(data=delta) if any(delta.values()) else None

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        if _metrics is None:
            return None
        return _metrics.KvtierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        if _metrics is None:
            return None
        return _metrics.KvtierPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues
        )

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- introspection (tests, benchmarks) ----

    @property
    def scheduler_side(self) -> "_SchedulerSide":
        return self._scheduler

    @property
    def worker_side(self) -> "_WorkerSide":
        return self._worker
