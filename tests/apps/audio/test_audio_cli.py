"""korinet-audio as a user runs it: help, errors without tracebacks, the status screen."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import korinet_audio.plugin as audio_plugin
import numpy as np
import pytest
from korinet_audio.talk import Call
from korinet_audio.tui import PushToTalkKey, meter, render, summary
from korinet_audio.wavio import FileCapture, FilePlayback, WavFormatError, read_wav, write_wav
from testutil import TIMEOUT_FACTOR
from testutil.relay import Relay

from korinet import Client, Server
from korinet.plugins import PluginManager

pytestmark = pytest.mark.timeout(60 * TIMEOUT_FACTOR)


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KORINET_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "korinet_audio.cli", *args],
        env=env, capture_output=True, text=True, timeout=30 * TIMEOUT_FACTOR,
    )  # fmt: skip


def test_help_names_every_command_and_option(tmp_path: Path) -> None:
    out = run_cli("--help", home=tmp_path).stdout
    for word in ("serve", "talk", "devices"):
        assert word in out
    out = run_cli("talk", "--help", home=tmp_path).stdout
    for option in ("--channel", "--ptt", "--input-file", "--output-file", "--insecure-plaintext"):
        assert option in out


def test_user_mistakes_get_a_message_not_a_traceback(tmp_path: Path) -> None:
    bad_wav = tmp_path / "stereo.wav"
    import wave

    with wave.open(str(bad_wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(b"\x00" * 400)
    r = run_cli("talk", "127.0.0.1:1", "--input-file", str(bad_wav), "--output-file", "o.wav", home=tmp_path)
    assert r.returncode == 1 and "16000 Hz mono" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("talk", "127.0.0.1:1", "--input-file", "/nonexistent.wav", home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    good = tmp_path / "in.wav"
    write_wav(good, np.zeros(3200, np.int16))
    r = run_cli(
        "talk", "127.0.0.1:1", "--input-file", str(good), "--output-file", str(tmp_path / "o.wav"),
        "--timeout", "1", "--insecure-plaintext", home=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and "cannot reach the hub" in r.stderr and "Traceback" not in r.stderr
    assert "WARNING" in r.stderr and "unencrypted" in r.stderr


#: An ALSA configuration whose only device is a card that is not there: PortAudio then
#: sees no sound device at all, as on a server (whatever cards this machine has).
NO_CARD_ALSA = "pcm.!default { type hw card 99 }\nctl.!default { type hw card 99 }\n"


async def test_talk_without_a_sound_card_says_so_before_joining(tmp_path: Path) -> None:
    (tmp_path / "alsa.conf").write_text(NO_CARD_ALSA)
    no_card = {"ALSA_CONFIG_PATH": str(tmp_path / "alsa.conf")}
    plugins = PluginManager.load(entry_points=False, extra=[audio_plugin])
    async with Server("127.0.0.1", 0, plugins=plugins) as server:
        relay = await Relay("127.0.0.1", server.port).start()  # counts who connects
        address = f"127.0.0.1:{relay.port}"
        for args, device in [
            ((), "microphone"),
            (("--input-file", str(tmp_path / "in.wav")), "speaker"),
            (("--listen-only",), "speaker"),
            (("--output-file", str(tmp_path / "out.wav")), "microphone"),
        ]:
            write_wav(tmp_path / "in.wav", np.zeros(3200, np.int16))
            cmd = ("talk", address, "--insecure-plaintext", "--no-tui", *args)
            r = await asyncio.to_thread(run_cli, *cmd, home=tmp_path, env=no_card)
            said = [line for line in r.stderr.splitlines() if line.startswith("korinet-audio:")]
            assert r.returncode == 1, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr and "joined" not in r.stdout
            assert len(said) == 1, said  # one line, before the plaintext warning or anything else
            assert f"no usable {device}" in said[0] or "PortAudio" in said[0], said
            assert relay.connections == 0, "the hub saw us before the devices were checked"
        assert not server.hub.sessions
        await relay.close()


def test_wav_round_trip(tmp_path: Path) -> None:
    samples = (np.arange(16000) % 100).astype(np.int16)
    write_wav(tmp_path / "a.wav", samples)
    assert np.array_equal(read_wav(tmp_path / "a.wav"), samples)
    with pytest.raises(WavFormatError):
        import wave

        with wave.open(str(tmp_path / "b.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\x00\x00")
        read_wav(tmp_path / "b.wav")


def test_meter_spans_silence_to_full_scale() -> None:
    assert meter(-90, 10) == "-" * 10
    assert meter(0, 10) == "#" * 10
    assert meter(-30, 10) == "#####-----"


async def test_status_screen_shows_the_call_figures(tmp_path: Path) -> None:
    plugins = PluginManager.load(entry_points=False, extra=[audio_plugin])
    async with Server("127.0.0.1", 0, plugins=plugins) as server:
        client = await Client.connect("127.0.0.1", server.port, plugins=plugins)
        tone = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 8000).astype(np.int16)
        call = Call(client, "lobby", "alice", FileCapture(tone), FilePlayback(None), ptt=True)
        await call.join()
        lines = render(call, connected=True, rtt=0.0004)
        assert "#lobby as alice" in lines[0] and "link up" in lines[0]
        assert "members: alice" in lines[1]
        assert "listening (space to talk)" in lines[2]
        call.set_talking(True)
        await call.run(0.3)
        lines = render(call, connected=False, rtt=None)
        assert "TALKING" not in lines[2]  # run() released the key when it ended
        assert "link DOWN" in lines[0]
        assert "sent " in lines[5] and call.stats.frames_sent >= 10
        assert "sent" in summary(call)
        await client.close()


async def test_devices_command_lists_or_explains(tmp_path: Path) -> None:
    r = await asyncio.to_thread(run_cli, "devices", home=tmp_path)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    assert r.stdout or r.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_talk_in_a_real_terminal_toggles_push_to_talk_and_quits(tmp_path: Path) -> None:
    env = {**os.environ, "KORINET_HOME": str(tmp_path)}
    hub = subprocess.Popen(
        [sys.executable, "-m", "korinet_audio.cli", "serve", "127.0.0.1:0", "--insecure-plaintext"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    session = f"korinet-audio-{os.getpid()}"
    try:
        assert hub.stdout is not None
        port = hub.stdout.readline().rsplit(":", 1)[1].strip()
        write_wav(tmp_path / "in.wav", np.full(16000, 3000, np.int16))
        command = (
            f"KORINET_HOME={tmp_path} {sys.executable} -m korinet_audio.cli talk 127.0.0.1:{port} --ptt "
            f"--name alice --insecure-plaintext --input-file {tmp_path}/in.wav --loop "
            f"--output-file {tmp_path}/out.wav; sleep 30"
        )
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "20", command], check=True
        )

        def screen_shows(text: str, timeout: float = 10.0) -> str:
            deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
            while time.monotonic() < deadline:
                pane = subprocess.run(
                    ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
                ).stdout
                if text in pane:
                    return pane
                time.sleep(0.1)
            raise AssertionError(f"{text!r} never appeared; screen:\n{pane}")

        screen_shows("listening (space to talk)")
        subprocess.run(["tmux", "send-keys", "-t", session, " "], check=True)
        screen_shows("TALKING")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        pane = screen_shows("frames (dropped")
        assert "Traceback" not in pane
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        hub.terminate()
        hub.wait(10)


def test_push_to_talk_key_held_then_released() -> None:
    key = PushToTalkKey()
    assert key.press(10.0)  # pressed
    assert key.poll(10.4)  # the auto-repeat delay: still talking
    t = 10.5
    while t < 12.0:  # auto-repeat at 30/s
        assert key.press(t)
        assert key.poll(t + 0.02)
        t += 0.033
    assert key.poll(t + 0.2)  # a repeat is only a little late
    assert not key.poll(t + 0.3), "released: the repeats stopped"
    assert key.press(t + 1.0)  # and pressed again later: talking again


def test_push_to_talk_key_tapped_toggles() -> None:
    key = PushToTalkKey()
    assert key.press(10.0)
    assert key.poll(15.0), "a tap keeps talking until the next tap"
    assert not key.press(15.0)
    assert not key.poll(16.0)
    assert key.press(16.0)
