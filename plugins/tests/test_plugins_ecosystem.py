"""The plugin ecosystem as a user meets it, with real installed distributions:
`korinet plugins` lists them, a name claimed twice stops start-up naming both, a
failing hook is logged with its plugin's name while sessions go on, and any
plugin can be disabled by name.

Besides the plugins of plugins/ (installed with pip), some tests install small
extra distributions into a temporary directory put on PYTHONPATH: a dist-info
folder with an entry_points.txt is all importlib.metadata needs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from testutil import TIMEOUT_FACTOR

from korinet import Client, MessageType, Server, hookimpl
from korinet.plugins import PluginConflict, PluginManager

T = 20 * TIMEOUT_FACTOR
OURS = ("zstd", "metrics", "notebook")


def test_our_plugins_are_installed_distributions() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="korinet")}
    for name in OURS:
        assert name in eps, f"pip install ./plugins/{name} first"
        assert eps[name].dist is not None
        assert eps[name].dist.name == f"korinet-{name}"


def install_fake(site: Path, dist: str, plugin: str, module: str, source: str, requires: str = "") -> None:
    """Install distribution ``dist`` with entry point ``plugin = module`` into ``site``
    (``requires``: its Requires-Dist lines)."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    requires_dist = "".join(f"Requires-Dist: {line}\n" for line in requires.splitlines() if line)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n{requires_dist}")
    (info / "entry_points.txt").write_text(f"[korinet]\n{plugin} = {module}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


def run_korinet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "korinet.cli", *args], capture_output=True, text=True, timeout=T, env=env
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Our plugins and the fakes in tmp_path/site; the apps' plugins blocked (theirs
    to test), KORINET_HOME private."""
    site = tmp_path / "site"
    site.mkdir()
    others = [
        ep.name
        for ep in importlib.metadata.entry_points(group="korinet")
        if ep.name not in OURS and ep.dist is not None and ep.dist.name == "korinet"
    ]
    return {
        **os.environ,
        "PYTHONPATH": str(site),
        "KORINET_HOME": str(tmp_path / "home"),
        "KORINET_DISABLE_PLUGINS": ",".join(others),
        "KORINET_METRICS_PORT": "",
    }


def site_of(env: dict[str, str]) -> Path:
    return Path(env["PYTHONPATH"])


def test_korinet_plugins_lists_ours_with_codecs_and_message_types(env: dict[str, str]) -> None:
    result = run_korinet(env, "plugins")
    assert result.returncode == 0, result.stderr
    blocks = {b.split("  ", 1)[0]: b for b in re.split(r"\n(?=\S)", result.stdout.strip())}
    version = importlib.metadata.version
    # installed, the codec is offered before the built-ins without being asked for
    assert result.stdout.startswith("korinet 0.1.0; codecs offered by default: zstd+msgpack, msgpack, json\n")
    zstd = blocks[f"zstd {version('korinet-zstd')}"].splitlines()
    assert zstd == [
        f"zstd {version('korinet-zstd')}  loaded (supports korinet >=0.1)",
        "  codec         zstd+msgpack",
    ]
    assert f"metrics {version('korinet-metrics')}" in blocks  # hooks only: no codec, no type
    notebook = blocks[f"notebook {version('korinet-notebook')}"]
    for op, what in [("put", "set a key"), ("watch", "be told of every change under a prefix")]:
        assert f"  message type  notebook.{op} [reliable]  {what}" in notebook


def test_plugins_are_disabled_by_name_from_the_environment(env: dict[str, str]) -> None:
    env["KORINET_DISABLE_PLUGINS"] += ",zstd,notebook"
    result = run_korinet(env, "plugins")
    assert result.returncode == 0, result.stderr
    assert "zstd+msgpack" not in result.stdout and "notebook.put" not in result.stdout
    for name in ("zstd", "notebook"):  # still listed, with their state
        assert re.search(rf"^{name} \S+  disabled: named in KORINET_DISABLE_PLUGINS", result.stdout, re.M)
    assert re.search(r"^metrics \S+  loaded", result.stdout, re.M)


CLONE = """
    from korinet import MessageType, hookimpl
    from korinet_zstd import ZstdMsgpackCodec

    @hookimpl
    def korinet_register_codecs():
        return [ZstdMsgpackCodec()]  # the same name, "zstd+msgpack"

    @hookimpl
    def korinet_register_message_types():
        return [MessageType("notebook.put")]
"""


@pytest.mark.parametrize("command", [("plugins",), ("serve", "127.0.0.1:0")])
def test_a_name_claimed_twice_stops_start_up_naming_both_plugins(
    env: dict[str, str], command: tuple[str, ...]
) -> None:
    install_fake(site_of(env), "korinet-zstd-clone", "zstd-clone", "zstd_clone", CLONE)
    result = run_korinet(env, *command)
    assert result.returncode == 2
    assert "plugin conflict" in result.stderr
    both = r"codec 'zstd\+msgpack' is registered by both '(zstd|zstd-clone)' and '(zstd|zstd-clone)'"
    assert re.search(both, result.stderr), result.stderr
    assert "'zstd'" in result.stderr and "'zstd-clone'" in result.stderr
    assert "Traceback" not in result.stderr
    # Disabling either one by name resolves it; the message type clash is next in line.
    env["KORINET_DISABLE_PLUGINS"] += ",zstd"
    result = run_korinet(env, "plugins")
    assert result.returncode == 2
    assert "message type 'notebook.put'" in result.stderr
    assert "'notebook'" in result.stderr and "'zstd-clone'" in result.stderr
    env["KORINET_DISABLE_PLUGINS"] += ",notebook"
    result = run_korinet(env, "plugins")
    assert result.returncode == 0, result.stderr
    assert (
        "zstd-clone 1.0  loaded\n  codec         zstd+msgpack\n  message type  notebook.put" in result.stdout
    )


def test_a_conflict_stops_a_server_before_it_listens() -> None:
    class Clone:
        @hookimpl
        def korinet_register_message_types(self) -> list[MessageType]:
            return [MessageType("notebook.put")]

    import korinet_notebook

    pm = PluginManager.load(entry_points=False, extra=[korinet_notebook.NotebookPlugin()])
    pm.register(Clone(), name="clone")
    with pytest.raises(PluginConflict) as info:
        Server("127.0.0.1", 0, plugins=pm)
    assert info.value.name == "notebook.put"
    assert "clone" in info.value.plugins and len(set(info.value.plugins)) == 2


GRUMPY = """
    from korinet import hookimpl

    @hookimpl
    def korinet_session_opened(session):
        raise RuntimeError("grumpy refuses to count sessions")

    @hookimpl
    async def korinet_session_closed(session, reason):
        raise RuntimeError("grumpy fails later too")
"""


def test_an_installed_plugin_failing_in_a_hook_is_logged_by_name_and_sessions_go_on(
    env: dict[str, str],
) -> None:
    install_fake(site_of(env), "korinet-grumpy", "grumpy", "grumpy_plugin", GRUMPY)
    server = subprocess.Popen(
        [sys.executable, "-m", "korinet.cli", "serve", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", banner)
        assert found, banner
        ping = run_korinet(env, "ping", found.group(1), "-c", "3", "-i", "0")
        assert ping.returncode == 0, ping.stderr + ping.stdout
        assert "3 requests, 3 replies, 0 errors" in ping.stdout
        # the client process loaded grumpy too: logged there, and the ping still worked
        assert "plugin 'grumpy' failed in korinet_session_opened" in ping.stderr
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=T)
    assert "plugin 'grumpy' failed in korinet_session_opened" in err
    assert "grumpy refuses to count sessions" in err
    assert "plugin 'grumpy' failed in korinet_session_closed" in err  # the awaited one too


class Failing:
    """Fails in every notification hook, synchronously or once awaited."""

    @hookimpl
    def korinet_server_started(self, server: Any) -> None:
        raise RuntimeError("no start for me")

    @hookimpl
    async def korinet_session_opened(self, session: Any) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async failure")

    @hookimpl
    def korinet_session_lost(self, session: Any, error: BaseException) -> None:
        raise RuntimeError("lost failure")


class Counting:
    def __init__(self) -> None:
        self.opened = 0

    @hookimpl
    def korinet_session_opened(self, session: Any) -> None:
        self.opened += 1


async def test_failing_hooks_cost_only_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="korinet.plugins")
    counting = Counting()
    pm = PluginManager.load(entry_points=False)
    pm.register(Failing(), name="failing")
    pm.register(counting, name="counting")

    async def echo(peer: Any) -> None:
        async for data in peer:
            await peer.send(data)

    server = await Server("127.0.0.1", 0, handler=echo, plugins=pm).start()  # its hook raised
    try:
        client = await Client.connect("127.0.0.1", server.port, plugins=pm)
        await client.send("still here", timeout=T)
        assert await client.recv(timeout=T) == "still here"
        await client.close()
    finally:
        await server.close()
    assert counting.opened == 2  # the other plugin's hook ran, on both sides
    text = caplog.text
    assert "plugin 'failing' failed in korinet_server_started" in text
    assert "plugin 'failing' failed in korinet_session_opened" in text and "async failure" in text


NEEDS_THE_FUTURE = """
    raise ImportError("never imported: its declared range is checked first")
"""


def test_an_incompatible_plugin_is_refused_at_start_up_in_one_line_and_listed(env: dict[str, str]) -> None:
    site = site_of(env)
    install_fake(site, "korinet-future", "future", "future_plugin", NEEDS_THE_FUTURE, "korinet>=9.0,<10")
    fine_requires = "msgpack\nkorinet<0.1; extra == 'old'\nkorinet>=0.1"  # an extra's is not the range
    install_fake(site, "korinet-fine", "fine", "fine_plugin", "", fine_requires)
    install_fake(site, "korinet-broken", "broken", "broken_plugin", "import no_such_module_anywhere\n")
    result = run_korinet(env, "plugins")
    assert result.returncode == 0, result.stderr
    refusal = [line for line in result.stderr.splitlines() if "'future'" in line]
    assert refusal == [
        "plugin 'future' (korinet-future 1.0) not loaded: supports korinet >=9.0,<10; this is korinet 0.1.0"
    ]
    assert "Traceback" not in result.stderr
    out = result.stdout.splitlines()
    assert "future 1.0  incompatible: supports korinet >=9.0,<10; this is korinet 0.1.0" in out
    assert "fine 1.0  loaded (supports korinet >=0.1)" in out
    assert (
        "broken 1.0  failed: import failed: ModuleNotFoundError: No module named 'no_such_module_anywhere'"
        in out
    )
    # the others still serve
    assert any(line.startswith("zstd ") and "loaded" in line for line in out)
