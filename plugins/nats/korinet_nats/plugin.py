"""The entry point: a NatsBus for every ``nats://`` address."""

from __future__ import annotations

from korinet import hookimpl

from .bus import NatsBus


@hookimpl
def korinet_cluster_bus(address: str) -> NatsBus | None:
    if address.startswith(("nats://", "tls://")):
        return NatsBus(address)
    return None
