"""A scripted run with connection cuts and a half-open link, then a scrape over HTTP:
the metrics must equal what the test counted itself."""

from __future__ import annotations

import asyncio
import importlib.metadata
import urllib.request
from typing import Any

import pytest
from korinet_metrics import DeliveryMetrics
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server, SessionConfig, SessionExpired, hookimpl
from korinet.plugins import PluginManager

T = 10 * TIMEOUT_FACTOR


def test_installed_as_a_distribution_with_an_entry_point() -> None:
    dist = importlib.metadata.distribution("korinet-metrics")
    [ep] = [ep for ep in dist.entry_points if ep.group == "korinet"]
    assert (ep.name, ep.value) == ("metrics", "korinet_metrics.plugin")
    others = [e.name for e in importlib.metadata.entry_points(group="korinet") if e.name != "metrics"]
    pm = PluginManager.load(disabled=others)
    assert "metrics" in {info.name for info in pm.plugins()}


async def scrape(port: int) -> dict[tuple[str, str], float]:
    """``{(sample name, side): value}`` from /metrics, fetched over HTTP."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T) as response:
            body: bytes = response.read()
            return body.decode()

    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for s in family.samples:
            if "le" not in s.labels:
                samples[(s.name, s.labels.get("side", ""))] = s.value
    return samples


class LinkWatch:
    """The test's own count of links lost, independent of the metrics plugin."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()

    @hookimpl
    def korinet_session_lost(self, session: Any, error: BaseException) -> None:
        if isinstance(session, Client):
            self.lost.set()


@pytest.mark.timeout(60 * TIMEOUT_FACTOR)
async def test_scraped_counts_equal_what_happened() -> None:
    metrics = DeliveryMetrics(CollectorRegistry())
    watch = LinkWatch()
    port = metrics.serve(0)
    pm = PluginManager.load(entry_points=False, extra=[metrics, watch])
    received: list[int] = []
    all_in = asyncio.Event()
    total = 0

    async def collect(peer: Any) -> None:
        async for n in peer:
            received.append(n)
            if len(received) == total:
                all_in.set()

    # The server pings often and the client seldom, so that when the relay swallows
    # everything the client is the side that finds the link half-open (after 2.5
    # server intervals), long before the server would (2.5 client intervals).
    f = TIMEOUT_FACTOR
    server_config = SessionConfig(heartbeat_interval=0.2 * f)
    client_config = SessionConfig(heartbeat_interval=2.0 * f)
    server = await Server("127.0.0.1", 0, handler=collect, plugins=pm, config=server_config).start()
    relay = await Relay("127.0.0.1", server.port).start()
    client = await Client.connect("127.0.0.1", relay.port, plugins=pm, config=client_config, backoff_cap=0.05)
    sent = 0
    replayed = 0  # what we expect the client to replay, counted here
    try:
        for _ in range(20):
            await client.send(sent, timeout=T)
            sent += 1
        for burst in (3, 5, 7):  # cut while messages are in flight and unacknowledged
            relay.black_hole = True
            futures = [client.send_nowait(sent + i) for i in range(burst)]
            sent += burst
            replayed += burst
            relay.black_hole = False
            relay.cut()
            await asyncio.wait_for(asyncio.gather(*futures), T)
        # A half-open link: nothing gets through, nothing is closed.
        relay.black_hole = True
        watch.lost.clear()
        futures = [client.send_nowait(sent + i) for i in range(4)]
        sent += 4
        replayed += 4
        await asyncio.wait_for(watch.lost.wait(), T)
        relay.black_hole = False
        await asyncio.wait_for(asyncio.gather(*futures), T)
        total = sent
        if len(received) < total:
            await asyncio.wait_for(all_in.wait(), T)
        reconnects = relay.connections - 1

        m = await scrape(port)
        assert received == list(range(sent))  # exactly once, in order: nothing to drop
        assert reconnects == 4
        assert m[("korinet_reconnects_total", "client")] == reconnects
        assert m[("korinet_resumes_total", "client")] == reconnects
        assert m[("korinet_resumes_total", "server")] == reconnects
        assert m[("korinet_messages_replayed_total", "client")] == replayed
        assert m[("korinet_messages_replayed_total", "server")] == 0  # the server sent only ACKs
        assert m[("korinet_duplicates_dropped_total", "server")] == len(received) - len(set(received)) == 0
        assert m[("korinet_heartbeat_timeouts_total", "client")] == 1
        assert m[("korinet_heartbeat_timeouts_total", "server")] == 0
        assert m[("korinet_links_lost_total", "client")] == reconnects
        assert m[("korinet_messages_sent_total", "client")] == sent
        assert m[("korinet_messages_received_total", "server")] == sent
        assert m[("korinet_sessions_open", "client")] == m[("korinet_sessions_open", "server")] == 1
        assert m[("korinet_sessions_opened_total", "client")] == 1
        assert m[("korinet_unacked_messages", "client")] == 0
        # One probe at a time: at least one per burst of sends, never more than the sends.
        assert 4 <= m[("korinet_ack_rtt_seconds_count", "client")] <= sent
        assert 0 < m[("korinet_ack_rtt_seconds_sum", "client")] < T

        # While unacknowledged messages wait, the buffer depth shows them.
        relay.black_hole = True
        futures = [client.send_nowait(sent + i) for i in range(6)]
        sent += 6
        m = await scrape(port)
        assert m[("korinet_unacked_messages", "client")] == 6
        assert m[("korinet_unacked_bytes", "client")] == 6  # a msgpack small int is one byte
        relay.black_hole = False
        relay.cut()
        total = sent
        all_in.clear()
        await asyncio.wait_for(asyncio.gather(*futures), T)
        if len(received) < total:
            await asyncio.wait_for(all_in.wait(), T)
    finally:
        await client.close()
        await relay.close()
    try:
        # Closed sessions keep their counts in the totals.
        m = await scrape(port)
        assert m[("korinet_sessions_open", "client")] == 0
        assert m[("korinet_sessions_closed_total", "client")] == 1
        assert m[("korinet_messages_replayed_total", "client")] == replayed + 6
        assert m[("korinet_messages_sent_total", "client")] == sent
        assert m[("korinet_heartbeat_timeouts_total", "client")] == 1
    finally:
        await server.close()
        metrics.stop()


async def test_a_client_whose_session_expired_is_counted_once() -> None:
    """After a server restart the client carries on in a new session on the same
    object: a reconnect, no resume, and its counters are not counted twice."""
    metrics = DeliveryMetrics(CollectorRegistry())
    port_http = metrics.serve(0)
    client_pm = PluginManager.load(entry_points=False, extra=[metrics])

    async def take(peer: Any) -> None:
        async for _ in peer:
            pass

    server = await Server(
        "127.0.0.1", 0, handler=take, plugins=PluginManager.load(entry_points=False)
    ).start()
    port = server.port
    client = await Client.connect("127.0.0.1", port, plugins=client_pm, backoff_cap=0.05)
    try:
        for n in range(3):
            await client.send(n, timeout=T)
        await server.close()  # every session forgotten, as in a crash
        server = await Server(
            "127.0.0.1", port, handler=take, plugins=PluginManager.load(entry_points=False)
        ).start()
        with pytest.raises(SessionExpired):
            await client.recv(timeout=T)
        await client.send("in the new session", timeout=T)
        m = await scrape(port_http)
        assert m[("korinet_sessions_opened_total", "client")] == 2
        assert m[("korinet_sessions_closed_total", "client")] == 1
        assert m[("korinet_reconnects_total", "client")] == 1
        assert m[("korinet_resumes_total", "client")] == 0
        assert m[("korinet_sessions_open", "client")] == 1
        assert m[("korinet_messages_sent_total", "client")] == 4
    finally:
        await client.close()
        await server.close()
        metrics.stop()
