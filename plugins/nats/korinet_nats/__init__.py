"""KoriNet's cluster bus on NATS JetStream (see korinet.cluster and docs/CLUSTER.md)."""

from .bus import NatsBus, parse_address

__all__ = ["NatsBus", "parse_address"]
