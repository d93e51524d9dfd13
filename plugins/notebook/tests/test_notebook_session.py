"""The installed korinet-notebook plugin end to end on loopback."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import pytest
from korinet_notebook import CHANGED, PUT, NoSuchKey, NotebookPlugin, remote
from korinet_notebook.plugin import plugin as installed_plugin
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, MessageRejected, Server, SessionConfig
from korinet.plugins import PluginManager

T = 10 * TIMEOUT_FACTOR


def test_installed_as_a_distribution_with_an_entry_point() -> None:
    dist = importlib.metadata.distribution("korinet-notebook")
    [ep] = [ep for ep in dist.entry_points if ep.group == "korinet"]
    assert (ep.name, ep.value) == ("notebook", "korinet_notebook.plugin:plugin")
    assert ep.load() is installed_plugin
    others = [e.name for e in importlib.metadata.entry_points(group="korinet") if e.name != "notebook"]
    pm = PluginManager.load(disabled=others)
    [info] = [i for i in pm.plugins() if i.name == "notebook"]
    assert info.version == dist.version
    assert set(info.message_types) == {
        f"notebook.{op}" for op in ("put", "get", "delete", "list", "watch", "changed")
    }


@pytest.fixture
async def served() -> Any:
    """A server with a fresh notebook, and a client (both load the plugin, as two
    machines with korinet-notebook installed would)."""
    nb = NotebookPlugin()
    server = await Server("127.0.0.1", 0, plugins=PluginManager.load(entry_points=False, extra=[nb])).start()
    client_pm = PluginManager.load(entry_points=False, extra=[NotebookPlugin()])
    client = await Client.connect("127.0.0.1", server.port, plugins=client_pm, open_timeout=T)
    try:
        yield nb, server, client, client_pm
    finally:
        await client.close()
        await server.close()


async def test_put_get_list_delete(served: Any) -> None:
    nb, _, client, _ = served
    assert await remote.put(client, "hosts/a", "10.0.0.1", timeout=T) == 1
    assert await remote.put(client, "hosts/b", b"\x01", timeout=T) == 2
    assert await remote.put(client, "motd", "hello", timeout=T) == 3
    entry = await remote.get(client, "hosts/b", timeout=T)
    assert (entry.value, entry.version) == (b"\x01", 2)
    assert [e.key for e in await remote.list_entries(client, "hosts/", timeout=T)] == ["hosts/a", "hosts/b"]
    assert await remote.delete(client, "motd", timeout=T) is True
    assert await remote.delete(client, "motd", timeout=T) is False
    assert nb.notebook.version == 4 and len(nb.notebook) == 2


async def test_invalid_put_is_rejected_with_the_validators_reason(served: Any) -> None:
    nb, _, client, _ = served
    with pytest.raises(MessageRejected, match=r"invalid 'notebook\.put' message: key 'two words' contains"):
        await client.request({"key": "two words", "value": "v"}, PUT, timeout=T)
    with pytest.raises(MessageRejected, match="value must be text or bytes"):
        await remote.put(client, "n", 42, timeout=T)  # type: ignore[arg-type]
    # A plain send (not a request) is rejected the same way: send() raises.
    with pytest.raises(MessageRejected, match="missing field"):
        await client.send({"key": "k"}, PUT, timeout=T)
    assert len(nb.notebook) == 0
    assert await remote.put(client, "ok", "still works", timeout=T) == 1


async def test_unknown_key_is_an_answer_not_a_handler_failure(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, client, _ = served
    with pytest.raises(NoSuchKey, match="no such key: 'nope'"):
        await remote.get(client, "nope", timeout=T)
    assert "failed" not in caplog.text  # no traceback in the server's log


async def test_a_client_does_not_serve_notebook_requests(served: Any) -> None:
    _, server, _, _ = served
    [server_peer] = server.hub.sessions.values()
    with pytest.raises(MessageRejected, match="served by a notebook server"):
        await server_peer.request({"key": "k", "value": "v"}, PUT, timeout=T)


async def test_watchers_get_every_change_once_across_connection_cuts() -> None:
    nb = NotebookPlugin()
    config = SessionConfig(heartbeat_interval=0.2 * TIMEOUT_FACTOR)
    server = await Server(
        "127.0.0.1", 0, plugins=PluginManager.load(entry_points=False, extra=[nb]), config=config
    ).start()
    relay = await Relay("127.0.0.1", server.port).start()
    pm = PluginManager.load(entry_points=False, extra=[NotebookPlugin()])
    watcher = await Client.connect("127.0.0.1", relay.port, plugins=pm, config=config, backoff_cap=0.05)
    writer = await Client.connect("127.0.0.1", server.port, plugins=pm, config=config)
    try:
        await remote.put(writer, "cfg/before", "0", timeout=T)
        now, changes = await remote.watch(watcher, "cfg/", timeout=T)
        assert [(e.key, e.value) for e in now] == [("cfg/before", "0")]
        for i in range(30):
            await remote.put(writer, f"cfg/{i % 3}", str(i), timeout=T)
            await remote.put(writer, "other", str(i), timeout=T)  # not watched
            if i % 10 == 5:
                relay.cut()  # the watcher reconnects; the changes wait in its session
        await remote.delete(writer, "cfg/0", timeout=T)
        seen = []
        async with asyncio.timeout(T):
            async for change in changes:
                seen.append((change["key"], change["value"], change["deleted"]))
                if change["deleted"]:
                    break
        assert seen == [(f"cfg/{i % 3}", str(i), False) for i in range(30)] + [("cfg/0", None, True)]
        assert relay.cuts == 3 and watcher.session.stats.resumes >= 3
        # Nothing else was queued for the watcher: the next message would be a change.
        assert watcher.session.stats.messages_received == 1 + 31  # the watch reply + changes
    finally:
        await watcher.close()
        await writer.close()
        await relay.close()
        await server.close()
    assert not nb.watchers  # both sessions closed: nobody is watched any more


async def test_changed_messages_are_validated_on_the_client(served: Any) -> None:
    _, server, client, _ = served
    [server_peer] = server.hub.sessions.values()
    with pytest.raises(MessageRejected, match="missing field"):
        await server_peer.send({"key": "k"}, CHANGED, timeout=T)
    # A valid one waits in the inbox: acknowledged only once the application takes it.
    acked = server_peer.send_nowait({"key": "k", "value": "v", "version": 1, "deleted": False}, CHANGED)
    msg = await client.recv_message(timeout=T)
    assert (msg.type, msg.data["key"]) == (CHANGED, "k")
    await asyncio.wait_for(acked, T)
