"""korinet-metrics: Prometheus metrics of what KoriNet's delivery guarantees cost.

Sessions open, reconnects, resumes, messages replayed, duplicates dropped, the
acknowledgement round trip, unacknowledged messages (buffer depth) and half-open
links found by heartbeats, per side (``side="client"`` / ``side="server"``).

In a program::

    metrics = DeliveryMetrics()                  # its own CollectorRegistry
    port = metrics.serve(9464)                   # http://127.0.0.1:9464/metrics
    plugins = PluginManager.load(extra=[metrics])

From the command line: ``korinet serve --metrics-port 9464``, or
``KORINET_METRICS_PORT=9464`` in the environment of any KoriNet program.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import ACK_RTT_BUCKETS, DeliveryMetrics

__all__ = ["ACK_RTT_BUCKETS", "DeliveryMetrics"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: every KoriNet process imports korinet_metrics.plugin (and
    # so this package), and must not pay for prometheus-client unless it is used.
    if name in __all__:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
