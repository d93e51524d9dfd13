"""DeliveryMetrics: session hooks in, Prometheus metrics out.

Where the figures come from (only what the core hands a plugin):

* the session hooks: opened, resumed (with the number of messages replayed),
  lost and closed, counted as they fire;
* each session's ``session.stats`` counters (``duplicates_dropped``,
  ``heartbeat_timeouts``, messages sent and received), read at scrape time from
  the live sessions and kept for the closed ones;
* ``peer.queued`` and ``session.unacked_bytes``: the replay buffer's depth now;
* the acknowledgement round trip from the ``korinet_ack_timed`` hook: KoriNet
  times one message in flight at a time per session, from the moment it is queued
  until its acknowledgement, and discards a sample that lived through a lost link
  (Karn's rule), since its time measures the outage, not the path.

Scrapes run on the HTTP server's thread while the event loop changes the session
table: both sides take ``_lock``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from korinet import Client, hookimpl

__all__ = ["ACK_RTT_BUCKETS", "SIDES", "STAT_COUNTERS", "DeliveryMetrics"]

logger = logging.getLogger(__name__)

SIDES: Final = ("client", "server")
#: From a LAN round trip (~100 µs) to a link that stalls for seconds.
ACK_RTT_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: SessionStats fields exported as counters: (metric name, stats attribute, help).
STAT_COUNTERS: Final = (
    ("duplicates_dropped", "duplicates_dropped", "Replayed messages the receiver already had, dropped."),
    ("heartbeat_timeouts", "heartbeat_timeouts", "Half-open links detected by heartbeats (peer silent)."),
    ("messages_sent", "messages_sent", "Reliable messages queued for sending (replays not counted)."),
    ("messages_received", "messages_received", "Reliable messages received (duplicates not counted)."),
)


@dataclass(slots=True)
class _Tracked:
    """What we remember of one peer (a Client, or a session on a server)."""

    side: str
    #: stats already added to the retired totals (a client whose session expired
    #: opens a new one on the same object, with the same growing counters)
    retired: dict[str, int] = field(default_factory=dict)
    links_lost: int = 0


class DeliveryMetrics:
    """A KoriNet plugin (register the instance) exporting delivery metrics.

    Args:
        registry: where the metrics live; a new CollectorRegistry by default (pass
            ``prometheus_client.REGISTRY`` to share the process-wide one).
        namespace: metric name prefix.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "korinet") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self._lock = threading.Lock()
        self._live: dict[Any, _Tracked] = {}
        # peers seen before, so that a client's new session after expiry counts as a
        # reconnect and its stats are not counted twice; weak: closed peers go away
        self._known: weakref.WeakKeyDictionary[Any, _Tracked] = weakref.WeakKeyDictionary()
        self._retired: dict[tuple[str, str], int] = {}
        self._http: Any = None
        ns = namespace
        labels = ["side"]
        self.opened = Counter(f"{ns}_sessions_opened", "Sessions opened.", labels, registry=self.registry)
        self.closed = Counter(
            f"{ns}_sessions_closed", "Sessions ended for good.", labels, registry=self.registry
        )
        self.reconnects = Counter(
            f"{ns}_reconnects",
            "Links re-established for a session after one was lost (resumed, or restarted after expiry).",
            labels,
            registry=self.registry,
        )
        self.resumes = Counter(
            f"{ns}_resumes", "Sessions resumed on a new link.", labels, registry=self.registry
        )
        self.replayed = Counter(
            f"{ns}_messages_replayed",
            "Unacknowledged messages re-sent after a resume.",
            labels,
            registry=self.registry,
        )
        self.links_lost = Counter(
            f"{ns}_links_lost", "Connections lost under a live session.", labels, registry=self.registry
        )
        self.ack_rtt = Histogram(
            f"{ns}_ack_rtt_seconds",
            "From queueing a reliable message to its acknowledgement (one sample in flight per session).",
            labels,
            buckets=ACK_RTT_BUCKETS,
            registry=self.registry,
        )
        for side in SIDES:  # export zeros from the start: absent series confuse rate()
            for metric in (self.opened, self.closed, self.reconnects, self.resumes, self.replayed,
                           self.links_lost, self.ack_rtt):  # fmt: skip
                metric.labels(side)
        self.registry.register(_LiveCollector(self))

    # ------------------------------------------------------------------ HTTP

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on a daemon thread; return the port (useful
        with port 0). ``addr="0.0.0.0"`` exposes it to the network."""
        if self._http is not None:
            raise RuntimeError("already serving")
        server, _thread = start_http_server(port, addr, registry=self.registry)
        self._http = server
        bound: int = server.server_port
        logger.info("korinet-metrics: serving http://%s:%d/metrics", addr, bound)
        return bound

    def stop(self) -> None:
        """Stop the HTTP server, if any."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # ------------------------------------------------------------------ hooks
    # Plain methods carrying the markers, so that one instance is one plugin.

    @hookimpl
    def korinet_session_opened(self, session: Any) -> None:
        side = _side(session)
        with self._lock:
            tracked = self._known.get(session)
            again = tracked is not None
            if tracked is None:
                tracked = self._known[session] = _Tracked(side)
            self._live[session] = tracked
        self.opened.labels(side).inc()
        if again:  # a client whose session expired, now in a new one
            self.reconnects.labels(side).inc()

    @hookimpl
    def korinet_session_resumed(self, session: Any, replayed: int) -> None:
        with self._lock:
            tracked = self._live.get(session)
        if tracked is None:  # opened before this plugin was registered
            self.korinet_session_opened(session)
        side = _side(session)
        self.resumes.labels(side).inc()
        self.reconnects.labels(side).inc()
        self.replayed.labels(side).inc(replayed)

    @hookimpl
    def korinet_session_lost(self, session: Any, error: BaseException) -> None:
        with self._lock:
            tracked = self._live.get(session)
        if tracked is not None:
            tracked.links_lost += 1
        self.links_lost.labels(_side(session)).inc()

    @hookimpl
    def korinet_session_closed(self, session: Any, reason: str) -> None:
        stats = _stats(session)
        with self._lock:
            tracked = self._live.pop(session, None)
            if tracked is None:
                return
            for name, attr, _ in STAT_COUNTERS:
                now = getattr(stats, attr, 0)
                key = (tracked.side, name)
                self._retired[key] = self._retired.get(key, 0) + now - tracked.retired.get(name, 0)
                tracked.retired[name] = now
        self.closed.labels(tracked.side).inc()

    @hookimpl
    def korinet_ack_timed(self, session: Any, seq: int, rtt: float) -> None:
        # KoriNet samples as TCP does (one message timed per session, Karn's rule)
        self.ack_rtt.labels(_side(session)).observe(rtt)

    # ------------------------------------------------------------------ collection

    def collect_live(self) -> Iterator[Metric]:
        """The metrics read from sessions at scrape time."""
        with self._lock:
            live = list(self._live.items())
            retired = dict(self._retired)
        ns = self.namespace
        open_ = GaugeMetricFamily(
            f"{ns}_sessions_open", "Sessions open now (linked or not).", labels=["side"]
        )
        depth = GaugeMetricFamily(
            f"{ns}_unacked_messages",
            "Reliable messages sent and not yet acknowledged (the replay buffer's depth).",
            labels=["side"],
        )
        depth_bytes = GaugeMetricFamily(
            f"{ns}_unacked_bytes", "Payload bytes of the unacknowledged messages.", labels=["side"]
        )
        totals = {
            name: CounterMetricFamily(f"{ns}_{name}", help_, labels=["side"])
            for name, _, help_ in STAT_COUNTERS
        }
        for side in SIDES:
            mine = [(peer, t) for peer, t in live if t.side == side]
            open_.add_metric([side], len(mine))
            depth.add_metric([side], sum(getattr(peer, "queued", 0) for peer, _ in mine))
            depth_bytes.add_metric(
                [side], sum(getattr(_session(peer), "unacked_bytes", 0) for peer, _ in mine)
            )
            for name, attr, _ in STAT_COUNTERS:
                value = retired.get((side, name), 0)
                for peer, t in mine:
                    value += getattr(_stats(peer), attr, 0) - t.retired.get(name, 0)
                totals[name].add_metric([side], value)
        yield open_
        yield depth
        yield depth_bytes
        yield from totals.values()


class _LiveCollector(Collector):
    def __init__(self, metrics: DeliveryMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect_live()


def _side(peer: Any) -> str:
    return "client" if isinstance(peer, Client) or type(peer).__name__ == "SyncClient" else "server"


def _session(peer: Any) -> Any:
    return getattr(peer, "session", None)


def _stats(peer: Any) -> Any:
    return getattr(_session(peer), "stats", None)
