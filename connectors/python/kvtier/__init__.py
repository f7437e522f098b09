"""kvtier: engine connectors for the kvbm KV block manager.

The vLLM connector is ``kvtier.vllm.KvtierConnector``; load it with::

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvbm/kvbm.sock"}}'

``kvtier._kvtier`` is the Rust client of the daemon (``Client``, ``Pool``,
``EventStream``) and kvtier's cost model (``CostModel``).
"""

from kvtier._kvtier import (
    Client,
    CostModel,
    EventStream,
    KvbmError,
    KvbmUnavailable,
    Pool,
    __version__,
)

__all__ = [
    "Client",
    "CostModel",
    "EventStream",
    "KvbmError",
    "KvbmUnavailable",
    "Pool",
    "__version__",
]
