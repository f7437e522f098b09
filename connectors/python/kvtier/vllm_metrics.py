"""kvtier's figures in vLLM's own metrics: the worker's counters per logging
interval (`KvtierConnectorStats`, which vLLM logs as "KV Transfer metrics")
and as Prometheus counters in vLLM's `/metrics` (`KvtierPromMetrics`).

vLLM versions without these hooks (they arrived after 0.25) simply never
call them; the imports below then fail and the connector offers none."""

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

# Worker-side counters (the `_WorkerSide.stats` keys), with their meaning.
COUNTERS = {
    "saved_blocks": "KV blocks offloaded to kvtier",
    "save_skipped_blocks": "KV blocks not offloaded (kvtier unreachable, slow or full)",
    "save_present_blocks": "KV blocks not offloaded because kvtier already held them",
    "loaded_blocks": "KV blocks onboarded from kvtier instead of recomputed",
    "load_failed_blocks": "KV blocks whose onboard failed (recomputed instead)",
    "reattaches": "Times the worker re-attached kvbm's host pool",
}


@dataclass
class KvtierConnectorStats(KVConnectorStats):
    """Counter increments of one interval: `data` maps a `COUNTERS` key to
    the blocks (or events) counted in it."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "KvtierConnectorStats":
        for name, n in other.data.items():
            self.data[name] = self.data.get(name, 0) + n
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: n for name, n in self.data.items() if n}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvtierPromMetrics(KVConnectorPromMetrics):
    """`vllm:kvtier_<counter>_total`, one series per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for name, doc in COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:kvtier_{name}", documentation=doc, labelnames=labelnames
            )
            self.counters[name] = create_metric_per_engine(counter, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, n in transfer_stats_data.items():
            if n and name in self.counters:
                self.counters[name][engine_idx].inc(n)
