"""put and get against a directory someone else can write to: planted links and hard
links, swapped names, setuid bits, and the policy's directories (issue 14: an agent
running as root must not become "overwrite any file as root")."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from admin_helpers import CLI, cli_env, connect, install_client_identity, running_agent
from korinet_admin import protocol as p
from korinet_admin.execclient import AdminConnection
from korinet_admin.policy import Policy
from korinet_admin.transfer import TransferError, get_file, partial_path, put_file
from testutil import TIMEOUT_FACTOR

from korinet import MessageRejected
from korinet.security import AuthorizedKeys, Identity

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)

WAIT = 30 * TIMEOUT_FACTOR
DATA = b"new content\n" * 1000
SHA = hashlib.sha256(DATA).hexdigest()
VICTIM = b"root:secret-hash:19000:0:99999:7:::\n"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")


class Scene:
    """An allowed directory ``srv`` (the policy's ``files``), a victim file outside it,
    and a local source file."""

    def __init__(self, base: Path) -> None:
        self.srv = base / "srv"
        self.srv.mkdir()
        self.outside = base / "etc"
        self.outside.mkdir()
        self.victim = self.outside / "shadow"
        self.victim.write_bytes(VICTIM)
        self.victim.chmod(0o640)
        self.source = base / "upload.bin"
        self.source.write_bytes(DATA)
        self.policy = Policy.from_mapping({"roles": {"admin": {"files": [str(self.srv)]}}})

    def victim_untouched(self) -> bool:
        st = self.victim.lstat()
        return (
            stat.S_ISREG(st.st_mode)
            and self.victim.read_bytes() == VICTIM
            and stat.S_IMODE(st.st_mode) == 0o640
        )


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


@pytest.fixture
async def conn(
    tmp_path: Path, scene: Scene, server_identity: Identity, alice: Identity, authorized: AuthorizedKeys
) -> AsyncIterator[AdminConnection]:
    async with running_agent(tmp_path, server_identity, authorized, policy=scene.policy) as agent:
        connection = await connect(agent.target, alice, tmp_path)
        connection.audit = agent.audit  # type: ignore[attr-defined]
        try:
            yield connection
        finally:
            await connection.close()


def _symlink(scene: Scene, at: Path) -> None:
    at.symlink_to(scene.victim)


def _hardlink(scene: Scene, at: Path) -> None:
    os.link(scene.victim, at)


def _fifo(scene: Scene, at: Path) -> None:
    os.mkfifo(at, 0o600)


def _others_file(scene: Scene, at: Path) -> None:
    at.write_bytes(DATA[:100])
    os.chown(at, 65534, 65534)


def _writable_by_others(scene: Scene, at: Path) -> None:
    at.write_bytes(DATA[:100])
    at.chmod(0o666)


PLANTS: list[tuple[Callable[[Scene, Path], None], str]] = [
    (_symlink, "is a symbolic link: refusing to resume"),
    (_hardlink, "has 2 hard links"),
    (_fifo, "is not a regular file"),
    pytest.param(_others_file, "belongs to uid 65534", marks=as_root),  # type: ignore[list-item]
    (_writable_by_others, "is writable by others"),
]


# ---------------------------------------------------------------------- put (the agent writes)


@pytest.mark.parametrize(("plant", "message"), PLANTS)
async def test_put_refuses_a_planted_partial_file(
    scene: Scene, conn: AdminConnection, plant: Callable[[Scene, Path], None], message: str
) -> None:
    destination = scene.srv / "app.conf"
    plant(scene, partial_path(destination, SHA))
    with pytest.raises(MessageRejected, match=message) as info:
        await put_file(conn.client, scene.source, str(destination), timeout=WAIT)
    assert "remove it if you did not make it" in str(info.value)
    assert scene.victim_untouched()
    assert not destination.exists()


async def test_put_replaces_a_link_planted_at_the_destination(scene: Scene, conn: AdminConnection) -> None:
    destination = scene.srv / "app.conf"
    destination.symlink_to(scene.victim)
    done = await put_file(conn.client, scene.source, str(destination), timeout=WAIT)
    assert done["path"] == str(destination)
    assert not destination.is_symlink() and destination.read_bytes() == DATA  # the link itself was replaced
    assert scene.victim_untouched()


async def test_put_refuses_a_directory_that_leads_outside_the_allowed_ones(
    scene: Scene, conn: AdminConnection
) -> None:
    (scene.srv / "logs").symlink_to(scene.outside)  # a symlinked parent directory
    for remote in (scene.srv / "logs" / "shadow", scene.srv / ".." / "etc" / "shadow"):
        with pytest.raises(MessageRejected, match="outside the directories"):
            await put_file(conn.client, scene.source, str(remote), timeout=WAIT)
    assert scene.victim_untouched()
    assert sorted(os.listdir(scene.outside)) == ["shadow"]  # not even a partial file
    denied = [e for e in conn.audit() if e["event"] == "put" and e["decision"] == "denied"]  # type: ignore[attr-defined]
    assert [e["real"] for e in denied] == [str(scene.victim)] * 2


def swap_after_realpath(monkeypatch: pytest.MonkeyPatch, scene: Scene, directory: Path) -> None:
    """The race the agent cannot prevent: ``directory`` becomes a link leading outside
    right after realpath resolved a path through it. What is opened is checked again."""
    realpath = os.path.realpath

    def racing(path: object, *args: object, **kwargs: object) -> str:
        answer = realpath(path, *args, **kwargs)  # type: ignore[call-overload]
        if (answer == str(directory) or answer.startswith(f"{directory}/")) and not directory.is_symlink():
            directory.rename(directory.with_name("moved-away"))
            directory.symlink_to(scene.outside)
        return str(answer)

    monkeypatch.setattr(os.path, "realpath", racing)


async def test_put_checks_the_directory_it_opened(
    scene: Scene, conn: AdminConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    (scene.srv / "sub").mkdir()
    swap_after_realpath(monkeypatch, scene, scene.srv / "sub")
    with pytest.raises(MessageRejected, match=f"{scene.outside}/shadow is outside the directories"):
        await put_file(conn.client, scene.source, str(scene.srv / "sub" / "shadow"), timeout=WAIT)
    assert (scene.srv / "sub").is_symlink()  # the swap happened
    assert scene.victim_untouched()
    assert sorted(os.listdir(scene.outside)) == ["shadow"]


async def test_get_checks_the_file_it_opened(
    scene: Scene, conn: AdminConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    (scene.srv / "sub").mkdir()
    (scene.srv / "sub" / "shadow").write_bytes(b"harmless")
    swap_after_realpath(monkeypatch, scene, scene.srv / "sub")
    with pytest.raises(MessageRejected, match=f"{scene.outside}/shadow is outside the directories"):
        await conn.request({"path": str(scene.srv / "sub" / "shadow")}, p.GET_OPEN)
    assert (scene.srv / "sub").is_symlink()


async def test_put_detects_the_partial_file_swapped_for_a_link_before_the_rename(
    scene: Scene, conn: AdminConnection
) -> None:
    destination = scene.srv / "app.conf"
    part = partial_path(destination, SHA)
    await conn.request(
        {"path": str(destination), "size": len(DATA), "sha256": SHA, "mode": 0o644}, p.PUT_OPEN
    )
    await conn.request({"path": str(destination), "sha256": SHA, "offset": 0, "data": DATA}, p.PUT_CHUNK)
    part.rename(scene.srv / "moved-away")  # the writable directory lets anyone do this
    part.symlink_to(scene.victim)
    with pytest.raises(MessageRejected, match="is NOT the verified file"):
        await conn.request({"path": str(destination), "sha256": SHA}, p.PUT_CLOSE)
    assert scene.victim_untouched()  # never written, chmod'ed or renamed through
    assert (scene.srv / "moved-away").read_bytes() == DATA
    assert "put-failed" in [e["event"] for e in conn.audit()]  # type: ignore[attr-defined]


async def test_put_drops_setuid_unless_asked(scene: Scene, conn: AdminConnection) -> None:
    scene.source.chmod(0o4755 | stat.S_ISGID)
    plain, kept = scene.srv / "tool", scene.srv / "tool-setid"
    await put_file(conn.client, scene.source, str(plain), timeout=WAIT)
    await put_file(conn.client, scene.source, str(kept), timeout=WAIT, preserve_setid=True)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o755
    assert stat.S_IMODE(kept.stat().st_mode) == 0o6755
    done = [e for e in conn.audit() if e["event"] == "put-done"]  # type: ignore[attr-defined]
    assert [e["mode"] for e in done] == ["755", "6755"]


async def test_put_resumes_its_own_partial_file(scene: Scene, conn: AdminConnection) -> None:
    destination = scene.srv / "app.conf"
    part = partial_path(destination, SHA)
    part.write_bytes(DATA[:5000])
    part.chmod(0o600)
    opened = await conn.request(
        {"path": str(destination), "size": len(DATA), "sha256": SHA, "mode": 0o644}, p.PUT_OPEN
    )
    assert opened == {"offset": 5000}
    await put_file(conn.client, scene.source, str(destination), timeout=WAIT)
    assert destination.read_bytes() == DATA and not part.exists()


# ---------------------------------------------------------------------- get (the agent reads)


async def test_get_follows_no_link_out_of_the_allowed_directories(
    scene: Scene, conn: AdminConnection, tmp_path: Path
) -> None:
    (scene.srv / "shadow-link").symlink_to(scene.victim)
    (scene.srv / "etc").symlink_to(scene.outside)
    local = tmp_path / "local"
    local.mkdir()
    for remote in ("shadow-link", "etc/shadow", "../etc/shadow"):
        with pytest.raises(MessageRejected, match="outside the directories"):
            await get_file(conn.client, str(scene.srv / remote), local / "x", timeout=WAIT)
    assert os.listdir(local) == []


async def test_get_refuses_a_file_swapped_after_it_was_checked(scene: Scene, conn: AdminConnection) -> None:
    inside = scene.srv / "report.txt"
    inside.write_bytes(DATA)
    info = await conn.request({"path": str(inside)}, p.GET_OPEN)
    assert info["sha256"] == SHA
    inside.unlink()
    inside.symlink_to(scene.victim)
    with pytest.raises(MessageRejected, match="replaced since it was opened"):
        await conn.request({"path": str(inside), "offset": 0, "length": 100}, p.GET_CHUNK)


# ---------------------------------------------------------------------- get (the client writes)


@pytest.mark.parametrize(("plant", "message"), PLANTS)
async def test_get_refuses_a_planted_partial_file_on_the_client(
    scene: Scene, conn: AdminConnection, tmp_path: Path, plant: Callable[[Scene, Path], None], message: str
) -> None:
    remote = scene.srv / "report.txt"
    remote.write_bytes(DATA)
    local = tmp_path / "downloads" / "report.txt"
    local.parent.mkdir()
    plant(scene, partial_path(local, SHA))
    with pytest.raises(TransferError, match=message):
        await get_file(conn.client, str(remote), local, timeout=WAIT)
    assert scene.victim_untouched()
    assert not local.exists()


async def test_get_replaces_a_link_planted_at_the_local_destination(
    scene: Scene, conn: AdminConnection, tmp_path: Path
) -> None:
    remote = scene.srv / "tool"
    remote.write_bytes(DATA)
    remote.chmod(0o4755)
    local = tmp_path / "tool"
    local.symlink_to(scene.victim)
    await get_file(conn.client, str(remote), local, timeout=WAIT)
    assert not local.is_symlink() and local.read_bytes() == DATA
    assert stat.S_IMODE(local.stat().st_mode) == 0o755  # setuid dropped
    assert scene.victim_untouched()
    await get_file(conn.client, str(remote), local, timeout=WAIT, preserve_setid=True)
    assert stat.S_IMODE(local.stat().st_mode) == 0o4755


# ---------------------------------------------------------------------- the command line


async def test_the_cli_says_why_and_never_verified(
    scene: Scene, conn: AdminConnection, home: Path, alice: Identity
) -> None:
    install_client_identity(home, alice)
    destination = scene.srv / "app.conf"
    partial_path(destination, SHA).symlink_to(scene.victim)
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "put",
        f"{conn.target.host}:{conn.target.port}",
        "--preserve-setid",
        str(scene.source),
        str(destination),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(home),
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 255 and b"verified" not in out
    assert (
        b"is a symbolic link: refusing to resume into it" in err
        and b"remove it if you did not make it" in err
    )
    assert scene.victim_untouched()


# ---------------------------------------------------------------------- progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_counts_confirmed_bytes_from_a_resumed_offset_to_the_end(
    scene: Scene, conn: AdminConnection, tmp_path: Path
) -> None:
    big = os.urandom(5 * 1024 * 1024 + 123)  # several chunks, the last one short
    scene.source.write_bytes(big)
    sha = hashlib.sha256(big).hexdigest()
    destination = scene.srv / "big.bin"
    part = partial_path(destination, sha)
    part.write_bytes(big[: 1024 * 1024])  # an earlier, interrupted upload
    part.chmod(0o600)
    seen: list[tuple[int, int]] = []
    await put_file(conn.client, scene.source, str(destination), progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (1024 * 1024, len(big)), "starts where the resumed upload was"
    assert seen[-1] == (len(big), len(big))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "never goes back"
    got: list[tuple[int, int]] = []
    await get_file(
        conn.client, str(destination), tmp_path / "back.bin", progress=lambda d, t: got.append((d, t))
    )
    assert got[0] == (0, len(big)) and got[-1] == (len(big), len(big))
    assert (tmp_path / "back.bin").read_bytes() == big


def test_the_meter_draws_on_a_terminal_only_and_says_rate_and_time_left() -> None:
    from korinet_admin.progress import Meter

    now = [100.0]
    screen = FakeTerminal()
    meter = Meter("upload.bin -> web1", screen, clock=lambda: now[0])
    meter(0, 100 << 20)
    now[0] += 1.0
    meter(10 << 20, 100 << 20)
    now[0] += 0.05
    meter(11 << 20, 100 << 20)  # within the redraw interval: not drawn
    meter.finish()
    lines = screen.getvalue().split("\r")
    assert "upload.bin -> web1  10.0 MiB / 100.0 MiB   10%  10.0 MiB/s  0:09 left" in lines[2]
    assert screen.getvalue().endswith("\n") and "11.0 MiB / 100.0 MiB" in lines[-1]
    quiet = io.StringIO()  # not a terminal: a script's stderr stays clean
    meter = Meter("x", quiet)
    meter(5, 10)
    meter.finish()
    assert quiet.getvalue() == ""
