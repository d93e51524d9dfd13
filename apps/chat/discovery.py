"""Finding a hub on the LAN, and being found: DNS-SD over mDNS (``zeroconf``).

A hub announces ``<name>._korinet-chat._tcp.local.`` with its port, addresses and,
in the TXT record, its key's fingerprint and whether it speaks TLS. mDNS is not
authenticated: the fingerprint there is only shown to the user; the client pins
the key it meets on first use (known_hosts), as for any other address.

The record also says when the hub started (``t``) and whether it is a standalone
``serve`` hub (``role``): :func:`hub_rank` is the one rule for "which hub is the
hub" when several are announced (docs/CHAT.md). A hub on a cluster bus also says
which cluster (``cl``, the id its hubs share on the bus): :func:`same_cluster` gives a
client every announced hub of its hub's cluster, to fail over to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = [
    "SERVICE_TYPE",
    "Announcement",
    "FoundHub",
    "HubWatcher",
    "announce",
    "answers",
    "browse",
    "hub_rank",
    "same_cluster",
]

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_korinet-chat._tcp.local."


@dataclass(frozen=True, slots=True)
class FoundHub:
    name: str
    host: str
    port: int
    tls: bool
    fingerprint: str | None
    started: float | None = None  # when the hub started (epoch seconds), as announced
    standalone: bool = False  # a `korinet-chat serve` hub
    cluster: str | None = None  # the cluster it shares rooms with (``serve --cluster``)


def hub_rank(hub: FoundHub) -> tuple[int, float, str, str, int]:
    """Sort key of the one rule for "which hub is the hub" on a LAN: a standalone
    (``serve``) hub first, then the one that started first, then the lower key
    fingerprint (then the address, so the order is total). A hub that does not say
    when it started comes after those that do."""
    started = hub.started if hub.started is not None else float("inf")
    return (0 if hub.standalone else 1, started, hub.fingerprint or "", hub.host, hub.port)


def same_cluster(chosen: FoundHub, found: Sequence[FoundHub]) -> list[tuple[str, int]]:
    """``chosen`` and every other hub of ``found`` on its cluster (same ``cluster`` id
    and TLS setting), in the order of the rule: where a client fails over to."""
    hubs = [(chosen.host, chosen.port)]
    if chosen.cluster is None:
        return hubs
    for hub in sorted(found, key=hub_rank):
        if hub.cluster == chosen.cluster and hub.tls == chosen.tls and (hub.host, hub.port) not in hubs:
            hubs.append((hub.host, hub.port))
    return hubs


def _found(name: str, info: AsyncServiceInfo) -> FoundHub | None:
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or info.port is None:
        return None
    props = info.properties or {}
    try:
        started: float | None = float(_decode(props.get(b"t")) or "")
    except ValueError:
        started = None
    return FoundHub(
        name=name.removesuffix("." + SERVICE_TYPE),
        host=addresses[0],
        port=info.port,
        tls=_decode(props.get(b"tls")) != "0",
        fingerprint=_decode(props.get(b"fp")),
        started=started,
        standalone=_decode(props.get(b"role")) == "serve",
        cluster=_decode(props.get(b"cl")),
    )


def _interfaces(interfaces: Sequence[str] | None) -> Any:
    from zeroconf import InterfaceChoice

    return list(interfaces) if interfaces else InterfaceChoice.All


def _decode(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None


async def browse(timeout: float = 1.5, *, interfaces: Sequence[str] | None = None) -> list[FoundHub]:
    """Hubs that answer within ``timeout`` seconds, in the order they answered.

    Args:
        interfaces: addresses to use (``["127.0.0.1"]`` in tests); default: all.
    """
    azc = AsyncZeroconf(interfaces=_interfaces(interfaces), ip_version=IPVersion.V4Only)
    names: list[str] = []
    seen = asyncio.Event()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and name not in names:
            names.append(name)
            seen.set()

    browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    found: list[FoundHub] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Stop at the first answer (plus a moment for others on the same LAN).
        try:
            async with asyncio.timeout(timeout):
                await seen.wait()
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        except TimeoutError:
            pass
        for name in names:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(azc.zeroconf, 1000):
                continue
            hub = _found(name, info)
            if hub is not None:
                found.append(hub)
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return found


async def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port`` within ``timeout``.

    An announcement outlives a hub that crashed (mDNS records are cached for their
    TTL), so a found hub is probed before anyone waits on it.
    """
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


class HubWatcher:
    """Calls ``on_found(name)`` for every hub that appears on the LAN from now on, until
    :meth:`close` (an embedded hub uses it to tell its user of a rival hub; a client, to
    hear its hub announce itself again after a restart).

    Args:
        updates: also call it when a known hub's record changes (a hub that crashed
            and came back may be cached still: it is updated, not added).
    """

    def __init__(
        self,
        on_found: Callable[[str], None],
        interfaces: Sequence[str] | None = None,
        *,
        updates: bool = False,
    ) -> None:
        self.azc = AsyncZeroconf(interfaces=_interfaces(interfaces), ip_version=IPVersion.V4Only)
        wanted = (
            {ServiceStateChange.Added, ServiceStateChange.Updated} if updates else {ServiceStateChange.Added}
        )

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            if state_change in wanted:
                on_found(name.removesuffix("." + SERVICE_TYPE))

        self.browser = AsyncServiceBrowser(self.azc.zeroconf, [SERVICE_TYPE], handlers=[on_change])

    async def lookup(self, name: str, timeout: float = 1.0) -> FoundHub | None:
        """The record of the hub called ``name`` (None: it did not answer in time)."""
        info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}")
        if not await info.async_request(self.azc.zeroconf, int(timeout * 1000)):
            return None
        return _found(info.name, info)

    async def close(self) -> None:
        await self.browser.async_cancel()
        await self.azc.async_close()


class Announcement:
    """A hub's DNS-SD record, published until :meth:`close`."""

    def __init__(self, azc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
        self.azc = azc
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name.removesuffix("." + SERVICE_TYPE)

    async def close(self) -> None:
        try:
            await self.azc.async_unregister_service(self.info)
        finally:
            await self.azc.async_close()


async def announce(
    port: int,
    *,
    name: str | None = None,
    addresses: Sequence[str] | None = None,
    fingerprint: str | None = None,
    tls: bool = True,
    interfaces: Sequence[str] | None = None,
    started: float | None = None,
    standalone: bool = False,
    cluster: str | None = None,
) -> Announcement:
    """Publish a hub listening on ``port`` at ``addresses`` (default: this host's LAN address).

    A name already taken on the LAN gets a suffix (zeroconf's ``allow_name_change``).
    """
    if not addresses:
        addresses = [lan_address()]
    label = name or f"korinet-chat on {socket.gethostname()}"
    props = {"tls": "1" if tls else "0", "v": "1"}
    if fingerprint:
        props["fp"] = fingerprint
    if started is not None:
        props["t"] = f"{started:.3f}"
    props["role"] = "serve" if standalone else "embedded"
    if cluster:
        props["cl"] = cluster
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in addresses],
        port=port,
        properties=props,
        server=f"{socket.gethostname()}.local.",
    )
    azc = AsyncZeroconf(interfaces=_interfaces(interfaces), ip_version=IPVersion.V4Only)
    try:
        await azc.async_register_service(info, allow_name_change=True)
    except BaseException:
        await azc.async_close()
        raise
    return Announcement(azc, info)


def lan_address() -> str:
    """This host's address on the LAN (the one a default route would use); 127.0.0.1
    when there is none. No packet is sent: connecting a UDP socket only picks a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed further than the table
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
