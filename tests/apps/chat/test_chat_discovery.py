"""Discovery on loopback: a hub announced with zeroconf bound to 127.0.0.1 is found by
browse() on 127.0.0.1, with its port, address and fingerprint; once withdrawn it is not.

Multicast on the loopback interface works here (Linux delivers it to local sockets), so
this is a real mDNS exchange between two zeroconf instances, only not leaving the host."""

from __future__ import annotations

import pytest
from korinet_chat.discovery import announce, browse
from testutil import TIMEOUT_FACTOR

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)

LOOPBACK = ["127.0.0.1"]


async def test_an_announced_hub_is_found_then_gone() -> None:
    announcement = await announce(
        43210, name="test hub", addresses=LOOPBACK, fingerprint="SHA256:abc", interfaces=LOOPBACK
    )
    try:
        found = await browse(3.0 * TIMEOUT_FACTOR, interfaces=LOOPBACK)
        mine = [h for h in found if h.port == 43210]
        assert len(mine) == 1
        hub = mine[0]
        assert (hub.host, hub.tls, hub.fingerprint) == ("127.0.0.1", True, "SHA256:abc")
        assert hub.name.startswith("test hub")
    finally:
        await announcement.close()
    after = await browse(0.5 * TIMEOUT_FACTOR, interfaces=LOOPBACK)
    assert all(h.port != 43210 for h in after)


async def test_browsing_an_empty_lan_returns_nothing_in_time() -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    started = loop.time()
    found = await browse(0.3, interfaces=LOOPBACK)
    assert [h for h in found if h.port == 43211] == []
    assert loop.time() - started < 3.0 * TIMEOUT_FACTOR


async def test_a_watcher_hears_of_a_hub_that_appears_later() -> None:
    import asyncio

    from korinet_chat.discovery import HubWatcher

    heard: list[str] = []
    appeared = asyncio.Event()

    def found(name: str) -> None:
        heard.append(name)
        appeared.set()

    watcher = HubWatcher(found, interfaces=LOOPBACK)
    try:
        announcement = await announce(43212, name="rival hub", addresses=LOOPBACK, interfaces=LOOPBACK)
        try:
            await asyncio.wait_for(appeared.wait(), 5.0 * TIMEOUT_FACTOR)
            assert any(name.startswith("rival hub") for name in heard)
        finally:
            await announcement.close()
    finally:
        await watcher.close()


async def test_a_cluster_hub_says_its_cluster_and_a_client_gets_every_hub_of_it() -> None:
    from korinet_chat.discovery import FoundHub, same_cluster

    announcement = await announce(
        43213, name="cluster hub", addresses=LOOPBACK, interfaces=LOOPBACK, standalone=True, cluster="c0ffee"
    )
    try:
        found = await browse(3.0 * TIMEOUT_FACTOR, interfaces=LOOPBACK)
        mine = [h for h in found if h.port == 43213]
        assert len(mine) == 1 and mine[0].cluster == "c0ffee" and mine[0].standalone
    finally:
        await announcement.close()

    def hub(port: int, cluster: str | None, started: float, tls: bool = True) -> FoundHub:
        return FoundHub(
            f"h{port}", "10.0.0.1", port, tls, None, started=started, standalone=True, cluster=cluster
        )

    chosen = hub(1, "a", 5.0)
    others = [hub(2, "b", 1.0), hub(3, "a", 9.0), chosen, hub(4, "a", 2.0), hub(5, "a", 0.5, tls=False)]
    # the hub chosen first, then its cluster's others by the rule; other clusters and
    # hubs that do not speak its TLS setting are not ours
    assert same_cluster(chosen, others) == [("10.0.0.1", 1), ("10.0.0.1", 4), ("10.0.0.1", 3)]
    assert same_cluster(hub(6, None, 1.0), others) == [("10.0.0.1", 6)]  # a lone hub: itself only
