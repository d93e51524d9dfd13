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
