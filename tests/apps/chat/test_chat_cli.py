"""The korinet-chat command as a user runs it: help, mistakes answered in one line,
the config file, and `serve` as a real process that a client talks through."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from chat_helpers import WAIT, fresh_plugins, room_texts
from korinet_chat.cli import load_config, main
from korinet_chat.client import ChatClient
from testutil import TIMEOUT_FACTOR

pytestmark = pytest.mark.timeout(30 * TIMEOUT_FACTOR)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "korinet-home"
    path.mkdir()
    monkeypatch.setenv("KORINET_HOME", str(path))
    return path


def test_help_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "HOST[:PORT]" in out and "korinet-chat serve" in out and "chat.toml" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nick", "two words", "127.0.0.1"], "invalid nick 'two words'"),
        (["--room", "#no way", "127.0.0.1"], "invalid room name"),
        (["host:notaport"], "bad port"),
    ],
)
def test_mistakes_get_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_file_is_read_and_checked(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "chat.toml").write_text('nick = "zoe"\nroom = "dev"\n')
    assert load_config() == {"nick": "zoe", "room": "dev"}
    (home / "chat.toml").write_text('nickname = "zoe"\n')
    assert main(["127.0.0.1"]) == 2
    assert "unknown setting 'nickname'" in capsys.readouterr().err
    (home / "chat.toml").write_text("nick = 3\n")
    assert main(["127.0.0.1"]) == 2
    assert "'nick' has the wrong type" in capsys.readouterr().err
    (home / "chat.toml").write_text("nick = \n")
    assert main(["127.0.0.1"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_an_unreachable_hub_is_reported_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([f"127.0.0.1:{port}", "--insecure-plaintext", "--connect-timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"cannot join the hub at 127.0.0.1:{port}" in err and "Traceback" not in err


async def test_serve_runs_a_hub_that_keeps_history(home: Path, tmp_path: Path) -> None:
    db = tmp_path / "hub.sqlite3"
    command = [sys.executable, "-c", "from korinet_chat.cli import main; raise SystemExit(main())",
               "serve", "--host", "127.0.0.1", "--port", "0", "--db", str(db), "--no-announce",
               "--insecure-plaintext"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "KORINET_HOME": str(home)},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        assert first.startswith("korinet-chat hub on 127.0.0.1:")
        port = int(first.split(":")[1].split(",")[0])
        warning = (await asyncio.wait_for(proc.stderr.readline(), WAIT)).decode()
        assert "WARNING: --insecure-plaintext" in warning
        plugins = fresh_plugins()
        alice = ChatClient("127.0.0.1", port, "alice", plugins=plugins)
        await alice.start(open_timeout=WAIT)
        alice.say("kept in SQLite")
        await alice.wait_for(lambda c: room_texts(c) == ["kept in SQLite"], WAIT)
        await alice.close()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        out = (await proc.stdout.read()).decode()
        assert "stopping" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT nick, text FROM messages").fetchall() == [("alice", "kept in SQLite")]
