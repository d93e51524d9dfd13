"""The entry point: idle until switched on, so that every KoriNet process may load it.

Switched on by ``KORINET_METRICS_PORT`` (with ``KORINET_METRICS_ADDR``, default
127.0.0.1) in any KoriNet program's environment, or by ``korinet serve
--metrics-port PORT [--metrics-addr ADDR]``. Then one :class:`DeliveryMetrics` on
prometheus-client's process-wide registry (so process and GC metrics come too)
serves ``/metrics``; until then prometheus-client is not even imported.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Any

from korinet import hookimpl

if TYPE_CHECKING:
    from .metrics import DeliveryMetrics

__all__ = ["ADDR_ENV", "PORT_ENV", "active", "enable"]

logger = logging.getLogger(__name__)

PORT_ENV = "KORINET_METRICS_PORT"
ADDR_ENV = "KORINET_METRICS_ADDR"

_active: DeliveryMetrics | None = None
_env_checked = False


def enable(port: int, addr: str = "127.0.0.1") -> tuple[DeliveryMetrics, int]:
    """Switch the process's metrics on and serve them; return them and the port."""
    global _active
    if _active is not None:
        raise RuntimeError("korinet-metrics is already on in this process")
    from prometheus_client import REGISTRY

    from .metrics import DeliveryMetrics

    metrics = DeliveryMetrics(REGISTRY)
    bound = metrics.serve(port, addr)
    _active = metrics
    return metrics, bound


def active() -> DeliveryMetrics | None:
    """The process's metrics, switching them on from the environment on first call."""
    global _env_checked
    if _active is None and not _env_checked:
        _env_checked = True
        text = os.environ.get(PORT_ENV, "").strip()
        if text:
            try:
                enable(int(text), os.environ.get(ADDR_ENV, "127.0.0.1"))
            except (ValueError, OSError) as exc:  # a bad setting must not break the program
                logger.error("korinet-metrics: cannot serve on %s=%r: %s", PORT_ENV, text, exc)
    return _active


@hookimpl
def korinet_session_opened(session: Any) -> None:
    if (m := active()) is not None:
        m.korinet_session_opened(session)


@hookimpl
def korinet_session_resumed(session: Any, replayed: int) -> None:
    if (m := active()) is not None:
        m.korinet_session_resumed(session, replayed)


@hookimpl
def korinet_session_lost(session: Any, error: BaseException) -> None:
    if (m := active()) is not None:
        m.korinet_session_lost(session, error)


@hookimpl
def korinet_session_closed(session: Any, reason: str) -> None:
    if (m := active()) is not None:
        m.korinet_session_closed(session, reason)


@hookimpl
def korinet_ack_timed(session: Any, seq: int, rtt: float) -> None:
    if (m := active()) is not None:
        m.korinet_ack_timed(session, seq, rtt)


@hookimpl
def korinet_server_started(server: Any) -> None:
    active()  # a server with KORINET_METRICS_PORT serves metrics before its first session


@hookimpl
def korinet_add_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Give ``korinet serve`` a ``--metrics-port`` option.

    The core has no hook for options of its own commands, so this finds the serve
    parser among the subcommands and wraps its function (see the report).
    """
    serve = subparsers.choices.get("serve")
    if serve is None:
        return
    serve.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"serve Prometheus metrics on PORT at /metrics (korinet-metrics; or set {PORT_ENV})",
    )
    serve.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    original = serve.get_default("func")

    async def serve_with_metrics(args: argparse.Namespace, plugins: Any) -> int:
        if args.metrics_port is not None:
            try:
                _, port = enable(args.metrics_port, args.metrics_addr)
            except (OSError, RuntimeError) as exc:
                print(f"korinet serve: cannot serve metrics on port {args.metrics_port}: {exc}", flush=True)
                return 1
            print(f"metrics on http://{args.metrics_addr}:{port}/metrics", flush=True)
        result: int = await original(args, plugins)
        return result

    serve.set_defaults(func=serve_with_metrics)
