"""``korinet plugin new``: write a new plugin package that installs, tests and
publishes as it is (docs/PLUGINS.md §0).

The files are templates filled with :meth:`str.format`-free substitution (``@@KEY@@``
markers), so that the braces of Python and TOML in them stay as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["PluginSpec", "ScaffoldError", "write_plugin"]

#: Plugin names: lowercase words joined by "-" or "_" (the distribution is korinet-NAME).
NAME_RE: Final = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
#: Message type and codec names: ASCII, no spaces (they travel in the handshake/frames).
TYPE_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,62}")
#: Commands of `korinet` itself: a plugin's command may not take their names.
RESERVED: Final = frozenset({"serve", "ping", "plugins", "plugin", "keygen", "id", "authorize"})


class ScaffoldError(ValueError):
    """A name the template cannot use, or a target that already exists."""


@dataclass(frozen=True)
class PluginSpec:
    """What ``korinet plugin new`` was asked for.

    ``message_type`` None and ``codec`` None: a message type named ``NAME.hello``.
    ``codec`` alone: a codec plugin without a message type.
    """

    name: str
    message_type: str | None = None
    codec: str | None = None

    @property
    def package(self) -> str:
        return "korinet_" + self.name.replace("-", "_")

    @property
    def distribution(self) -> str:
        return "korinet-" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str | None:
        if self.message_type is None and self.codec is None:
            return f"{self.name}.hello"
        return self.message_type

    def check(self) -> None:
        """Raises ScaffoldError naming what is wrong."""
        if not NAME_RE.fullmatch(self.name):
            raise ScaffoldError(
                f"plugin name {self.name!r}: use lowercase letters and digits, words joined by - or _"
            )
        if self.name in RESERVED:
            raise ScaffoldError(f"plugin name {self.name!r} is a korinet command; choose another")
        for what, value in (("message type", self.message_type), ("codec", self.codec)):
            if value is not None and not TYPE_RE.fullmatch(value):
                raise ScaffoldError(
                    f"{what} {value!r}: lowercase ASCII letters, digits and . _ + - (at most 63)"
                )
        if self.codec in ("msgpack", "json"):
            raise ScaffoldError(f"codec {self.codec!r} is built into KoriNet; choose another name")


def compatible_range(version: str) -> str:
    """The KoriNet range a new plugin declares: this release up to the next one that
    may break plugins (the next minor while KoriNet is 0.x, else the next major)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return f">={major}.{minor},<{upper}"


def write_plugin(spec: PluginSpec, where: Path, korinet_version: str) -> Path:
    """Write ``korinet-NAME/`` into ``where`` and return its path.

    Raises:
        ScaffoldError: a bad name, or the folder exists already.
    """
    spec.check()
    root = where / spec.distribution
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    pkg = root / "src" / spec.package
    values = {
        "NAME": spec.name,
        "DIST": spec.distribution,
        "PKG": spec.package,
        "TYPE": spec.type_name or "",
        "CODEC": spec.codec or "",
        "RANGE": compatible_range(korinet_version),
        "VERSION": korinet_version,
        "WHAT": _describe(spec),
    }
    files: dict[Path, str] = {
        root / "pyproject.toml": PYPROJECT,
        root / "README.md": README,
        root / ".gitignore": GITIGNORE,
        pkg / "__init__.py": INIT,
        pkg / "py.typed": "",
        pkg / "plugin.py": PLUGIN_HEAD
        + (PLUGIN_TYPES if spec.type_name else "")
        + (PLUGIN_CODECS if spec.codec else "")
        + PLUGIN_CLI,
        pkg / "cli.py": CLI_TYPE if spec.type_name else CLI_CODEC,
        root / "tests" / "conftest.py": CONFTEST,
        root / "tests" / f"test_{spec.package[len('korinet_') :]}.py": _tests(spec),
    }
    if spec.type_name:
        files[pkg / "messages.py"] = MESSAGES
    if spec.codec:
        files[pkg / "codec.py"] = CODEC
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_fill(template, values))
    return root


def _tests(spec: PluginSpec) -> str:
    """The test module: the parts that apply, their imports merged into one block."""
    parts = [TESTS_HEAD]
    if spec.type_name:
        parts.append(TESTS_TYPE)
    if spec.codec:
        parts.append(TESTS_CODEC)
    parts.append(TESTS_CLI_TYPE if spec.type_name else TESTS_CLI_CODEC)
    lines = {ln for part in parts for ln in part.splitlines() if ln.startswith("from ")}
    names = sorted({n for ln in lines if ln.startswith(_FROM_KORINET) for n in ln[20:].split(", ")})
    others = sorted(ln for ln in lines if not ln.startswith(_FROM_KORINET))
    third_party = [_FROM_KORINET + ", ".join(names)]
    third_party += [ln for ln in others if ln.startswith("from korinet")]
    own = [ln for ln in others if not ln.startswith("from korinet")]
    bodies = ["\n".join(ln for ln in p.splitlines() if not ln.startswith("from ")).strip() for p in parts]
    return (
        TESTS_DOC
        + "from __future__ import annotations\n\n"
        + "import asyncio\nimport importlib.metadata\nfrom typing import Any\n\n"
        + "import pytest\nfrom conftest import TIMEOUT, manager\n\n"
        + "\n".join(third_party)
        + "\n\n"
        + "\n".join(own)
        + "\n\n\n"
        + "\n\n\n".join(bodies)
        + "\n"
    )


_FROM_KORINET: Final = "from korinet import "


def _describe(spec: PluginSpec) -> str:
    parts = []
    if spec.type_name:
        parts.append(f"the {spec.type_name!r} message type")
    if spec.codec:
        parts.append(f"the {spec.codec!r} codec")
    return "A KoriNet plugin: " + " and ".join(parts)


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    assert "@@" not in template, template
    return template.lstrip("\n")


# ---------------------------------------------------------------------- templates

PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]  # 77+: license = "MIT" as an SPDX expression
build-backend = "setuptools.build_meta"

[project]
name = "@@DIST@@"
version = "0.1.0"
description = "@@WHAT@@"
readme = "README.md"
requires-python = ">=3.11"
license = "MIT"
keywords = ["korinet", "korinet-plugin"]
classifiers = ["Programming Language :: Python :: 3", "Typing :: Typed"]
# The KoriNet versions this plugin supports: pip checks it when installing, and
# KoriNet at start-up (a version outside it does not load the plugin and says so).
dependencies = ["korinet@@RANGE@@", "msgpack>=1.0"]

[project.optional-dependencies]
test = ["pytest>=8"]

# KoriNet finds plugins through this entry-point group; "@@NAME@@" is the plugin's
# name in `korinet plugins`, in error messages and in KORINET_DISABLE_PLUGINS.
[project.entry-points.korinet]
@@NAME@@ = "@@PKG@@.plugin"

[tool.setuptools.packages.find]
where = ["src"]

[tool.setuptools.package-data]
@@PKG@@ = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]
# The tests run their own event loops (asyncio.run): pytest-asyncio, if installed
# for another project, is not needed here, and unconfigured it warns on every run.
addopts = ["-p", "no:asyncio"]
"""

GITIGNORE = """
__pycache__/
*.egg-info/
build/
dist/
"""

README = """
# @@DIST@@

@@WHAT@@.

Made with `korinet plugin new` (KoriNet @@VERSION@@); it supports KoriNet
`@@RANGE@@` (the `korinet` requirement in `pyproject.toml`).

## Use

```
pip install ./@@DIST@@
korinet plugins          # lists "@@NAME@@ 0.1.0  loaded"
korinet serve &          # every KoriNet server and client now has the plugin
korinet @@NAME@@ --help
```

## Develop

```
pip install -e './@@DIST@@[test]'
pytest @@DIST@@
```

The tests start a real KoriNet server on 127.0.0.1 (a free port) and talk to it.
`KORINET_TRACE_PLUGINS=1` logs every hook call of every plugin, with its duration.

## Publish

```
python -m pip install build twine
python -m build @@DIST@@
python -m twine upload @@DIST@@/dist/*
```

Keep the `korinet-` prefix and the `korinet-plugin` keyword: that is how people
find KoriNet plugins on PyPI.
"""

INIT = '''
"""@@WHAT@@.

KoriNet loads :mod:`@@PKG@@.plugin` through the ``korinet`` entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"
'''

MESSAGES = '''
"""The ``@@TYPE@@`` message: its payload types, validator and handler.

Pure functions: testable without a network (tests/test_*.py does both).
"""

from __future__ import annotations

from typing import Any, Final, TypedDict

from korinet import Message

__all__ = ["MAX_TEXT", "TYPE", "Reply", "Request", "handle", "validate"]

TYPE: Final = "@@TYPE@@"
#: Bound every field a peer controls.
MAX_TEXT: Final = 1000


class Request(TypedDict):
    text: str


class Reply(TypedDict):
    text: str
    chars: int


def validate(payload: Any) -> None:
    """Runs on the receiving side before the handler. Raise ValueError, TypeError
    or KeyError to reject: the sender's request() raises MessageRejected."""
    if not isinstance(payload, dict) or set(payload) != {"text"}:
        raise TypeError("expected {'text': str}")
    text = payload["text"]
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise ValueError(f"text longer than {MAX_TEXT} characters")


def handle(peer: Any, msg: Message) -> Reply:
    """The handler: for a request, what it returns is the reply."""
    request: Request = msg.data
    return {"text": request["text"].upper(), "chars": len(request["text"])}
'''

CODEC = '''
"""The ``@@CODEC@@`` codec: msgpack, compressed with zlib above a size threshold.

Each payload starts with a marker byte (0: plain msgpack, 1: zlib). Decompression
is bounded: a payload that would inflate past ``max_output`` bytes is refused with
CodecError before the memory is spent (a "zip bomb" ends the sender's session, not
the receiver). Replace the compression, keep the bound.
"""

from __future__ import annotations

import zlib
from typing import Any, Final

import msgpack

from korinet import CodecError

__all__ = ["NAME", "PlainOrZlibCodec"]

NAME: Final = "@@CODEC@@"
_PLAIN: Final = b"\\x00"
_ZLIB: Final = b"\\x01"


class PlainOrZlibCodec:
    """Registered once per process and shared by every session (and thread)."""

    name = NAME
    #: Clients offer installed codecs highest preference first, msgpack last.
    preference = 10

    def __init__(self, min_size: int = 256, max_output: int = 16 * 1024 * 1024) -> None:
        self.min_size = min_size
        self.max_output = max_output

    def encode(self, obj: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"{NAME} cannot encode {type(obj).__name__}: {exc}") from exc
        if len(packed) >= self.min_size:
            compressed = zlib.compress(packed, 1)
            if len(compressed) < len(packed):
                return _ZLIB + compressed
        return _PLAIN + packed

    def decode(self, data: bytes) -> Any:
        """Raises CodecError (and nothing else) on a bad payload."""
        mark, body = data[:1], data[1:]
        if mark == _ZLIB:
            inflater = zlib.decompressobj()
            try:
                body = inflater.decompress(body, self.max_output)
            except zlib.error as exc:
                raise CodecError(f"corrupt {NAME} payload: {exc}") from exc
            if inflater.unconsumed_tail or not inflater.eof:
                raise CodecError(f"{NAME} payload inflates past {self.max_output} bytes, or is cut")
        elif mark != _PLAIN:
            raise CodecError(f"{NAME} payload with an unknown marker {mark!r}")
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises many unrelated types on garbage
            raise CodecError(f"invalid msgpack in a {NAME} payload: {exc}") from exc
'''

PLUGIN_HEAD = '''
"""The hook implementations KoriNet loads through the ``korinet`` entry point.

Every KoriNet process imports this module: keep it cheap (the CLI is imported only
when the command line is built) and free of side effects.
"""

from __future__ import annotations

import argparse
from typing import Any

from korinet import hookimpl
'''

PLUGIN_TYPES = """

@hookimpl
def korinet_register_message_types() -> list[Any]:
    from korinet import MessageType

    from .messages import TYPE, handle, validate

    return [MessageType(TYPE, validate=validate, handler=handle, description="answers in capitals")]
"""

PLUGIN_CODECS = """

@hookimpl
def korinet_register_codecs() -> list[Any]:
    from .codec import PlainOrZlibCodec

    return [PlainOrZlibCodec()]
"""

PLUGIN_CLI = """

@hookimpl
def korinet_add_cli_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .cli import add_command

    add_command(subparsers)
"""

CLI_TYPE = '''
"""``korinet @@NAME@@ ADDRESS TEXT``: send one ``@@TYPE@@`` request, print the reply."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from korinet import Client, KoriNetError
from korinet.cli import parse_address

from .messages import TYPE


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("@@NAME@@", help=f"send a {TYPE} request to a KoriNet server")
    p.add_argument("address", help="HOST[:PORT] of a server with @@DIST@@ installed")
    p.add_argument("text", help="what to send")
    p.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p.set_defaults(func=run, is_async=True)


async def run(args: argparse.Namespace, plugins: Any) -> int:
    host, port = parse_address(args.address)
    try:
        async with await Client.connect(host, port, plugins=plugins, open_timeout=args.timeout) as client:
            reply = await client.request({"text": args.text}, TYPE, timeout=args.timeout)
            codec = client.session.codec.name if client.session.codec else "?"
    except KoriNetError as exc:
        print(f"korinet @@NAME@@: {exc}", file=sys.stderr)
        return 1
    print(f"{reply['text']} ({reply['chars']} characters, codec {codec})")
    return 0
'''

CLI_CODEC = '''
"""``korinet @@NAME@@ ADDRESS``: open a session, say which codec it negotiated, and
round-trip a payload through the server's echo."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from korinet import Client, KoriNetError
from korinet.cli import parse_address


def add_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("@@NAME@@", help="check which codec a KoriNet server and this one agree on")
    p.add_argument("address", help="HOST[:PORT] of a KoriNet server")
    p.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p.set_defaults(func=run, is_async=True)


async def run(args: argparse.Namespace, plugins: Any) -> int:
    host, port = parse_address(args.address)
    payload = {"text": "KoriNet " * 100}
    try:
        async with await Client.connect(host, port, plugins=plugins, open_timeout=args.timeout) as client:
            echoed = await client.request(payload, "korinet.echo", timeout=args.timeout)
            codec = client.session.codec.name if client.session.codec else "?"
    except KoriNetError as exc:
        print(f"korinet @@NAME@@: {exc}", file=sys.stderr)
        return 1
    print(f"codec {codec}; echo {'intact' if echoed == payload else 'CHANGED'}")
    return 0 if echoed == payload else 1
'''

CONFTEST = '''
"""A real KoriNet server on 127.0.0.1 (port 0: a free one) with this plugin."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from korinet import Server
from korinet.plugins import PluginManager

from @@PKG@@ import plugin

TIMEOUT = 30.0


def manager() -> PluginManager:
    """KoriNet's built-ins and this plugin only, registered explicitly: the tests do
    not depend on what else is installed (test_installed checks the entry point)."""
    return PluginManager.load(entry_points=False, extra=[plugin])


@pytest.fixture
def server_address() -> Iterator[str]:
    """``HOST:PORT`` of a server running on its own thread (the CLI under test runs
    its own event loop in the main thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Server:
        return await Server("127.0.0.1", 0, plugins=manager()).start()

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
'''

TESTS_DOC = '''
"""@@DIST@@, tested as users meet it: pure functions, then a real server on
loopback, then the installed entry point and the `korinet @@NAME@@` command."""

'''

TESTS_HEAD = """
from korinet import Client, Server
from korinet.cli import main
from korinet.plugins import PluginManager
from @@PKG@@ import plugin


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_the_entry_point_is_installed_and_loads() -> None:
    (ep,) = importlib.metadata.entry_points(group="korinet", name="@@NAME@@")
    assert ep.load() is plugin
    info = {i.name: i for i in PluginManager.load().plugins()}["@@NAME@@"]
    assert info.state == "loaded", info.detail  # its korinet range admits this korinet
    assert info.requires and info.distribution == "@@DIST@@"
"""

TESTS_TYPE = """
from korinet import MessageRejected
from @@PKG@@.messages import MAX_TEXT, TYPE, validate


@pytest.mark.parametrize(
    "payload", [None, "text", {"text": 3}, {"text": "x" * (MAX_TEXT + 1)}, {"text": "a", "extra": 1}]
)
def test_the_validator_refuses_malformed_payloads(payload: Any) -> None:
    with pytest.raises((TypeError, ValueError, KeyError)):
        validate(payload)


def test_a_request_is_answered_by_a_real_server() -> None:
    async def scenario() -> None:
        plugins = manager()
        async with Server("127.0.0.1", 0, plugins=plugins) as server:
            async with await Client.connect("127.0.0.1", server.port, plugins=plugins) as client:
                assert await client.request({"text": "hello"}, TYPE, timeout=TIMEOUT) == {
                    "text": "HELLO",
                    "chars": 5,
                }
                with pytest.raises(MessageRejected, match="text must be a string"):
                    await client.request({"text": 42}, TYPE, timeout=TIMEOUT)

    run(scenario())
"""

TESTS_CODEC = """
from korinet import CodecError
from @@PKG@@.codec import NAME, PlainOrZlibCodec


def test_the_codec_round_trips_and_refuses_garbage_and_bombs() -> None:
    codec = PlainOrZlibCodec(max_output=64 * 1024)
    for obj in [None, 1, "é", b"\\x00\\xff", {"k": ["v"] * 1000}]:
        assert codec.decode(codec.encode(obj)) == obj
    assert len(codec.encode("a" * 10_000)) < 1000  # compressed
    for garbage in [b"", b"\\x02abc", b"\\x01not zlib", b"\\x00\\xc1"]:
        with pytest.raises(CodecError):
            codec.decode(garbage)
    bomb = PlainOrZlibCodec(max_output=1 << 30).encode(b"\\x00" * (1 << 20))
    with pytest.raises(CodecError, match="inflates past"):
        codec.decode(bomb)


def test_an_installed_codec_is_negotiated_without_being_asked_for() -> None:
    async def scenario() -> None:
        plugins = manager()
        assert plugins.codec_offer()[0] == NAME
        async with Server("127.0.0.1", 0, plugins=plugins) as server:
            async with await Client.connect("127.0.0.1", server.port, plugins=plugins) as client:
                assert client.session.codec is not None and client.session.codec.name == NAME
                big = {"text": "KoriNet " * 1000}
                assert await client.request(big, "korinet.echo", timeout=TIMEOUT) == big

    run(scenario())


def test_a_server_without_the_codec_falls_back_to_msgpack() -> None:
    async def scenario() -> None:
        bare = PluginManager.load(entry_points=False)
        async with Server("127.0.0.1", 0, plugins=bare) as server:
            async with await Client.connect("127.0.0.1", server.port, plugins=manager()) as client:
                assert client.session.codec is not None and client.session.codec.name == "msgpack"

    run(scenario())
"""

TESTS_CLI_TYPE = """

def test_the_korinet_command_has_the_subcommand(
    server_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["@@NAME@@", server_address, "hi there"]) == 0
    out = capsys.readouterr().out
    assert "HI THERE (8 characters" in out, out
"""

TESTS_CLI_CODEC = """

def test_the_korinet_command_has_the_subcommand(
    server_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["@@NAME@@", server_address]) == 0
    out = capsys.readouterr().out
    assert "codec " in out and "echo intact" in out, out
"""
