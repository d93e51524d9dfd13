"""paho-mqtt (2.x, CallbackAPIVersion.VERSION2) QoS 1 through a mosquitto we start.

Three processes: mosquitto (the broker), a subscriber (spawned, QoS 1 subscription)
and the publisher (this process, paho's network thread via loop_start). A publish
counts as acked on PUBACK from the broker; the pipelined figures are end to end:
they stop the clock when the subscriber has received every message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import paho.mqtt.client as mqtt
from benchutil import (
    ACK_EVERY,
    CHILD_MAX_S,
    DRAIN_S,
    LOOPBACK,
    WINDOW,
    Deadline,
    free_port,
    spawn_child,
    wait_for_port,
)
from paho.mqtt.enums import CallbackAPIVersion

TOPIC = "korinet-bench/t"


class Mosquitto:
    """A private mosquitto on a free loopback port, separate from any system service:
    own config, no persistence, no pid file, nothing outside its temp dir."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: str | None = None

    @staticmethod
    def binary() -> str:
        path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(path, os.X_OK):
            raise RuntimeError("mosquitto not found: apt-get update && apt-get install -y mosquitto")
        return path

    @staticmethod
    def version() -> str:
        cmd = [Mosquitto.binary(), "-h"]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10)
        first = (out.stdout or out.stderr).strip().splitlines()
        return first[0].removeprefix("mosquitto version ").strip() if first else "?"

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="korinet-bench-mosquitto-")
        os.chmod(self.tmp, 0o755)  # mosquitto drops root to its own user
        for _ in range(3):  # free_port() can race with another process; retry a couple of times
            self.port = free_port()
            conf = Path(self.tmp, "mosquitto.conf")
            conf.write_text(
                f"listener {self.port} {LOOPBACK}\n"
                "allow_anonymous true\n"
                "persistence false\n"
                # Defaults (20 in flight, 1000 queued) would throttle the subscriber and
                # silently drop QoS 1 messages queued for it; a tuned broker raises them.
                f"max_inflight_messages {WINDOW}\n"
                "max_queued_messages 1000000\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
            )
            log = open(Path(self.tmp, "mosquitto.log"), "wb")  # the child keeps its own copy
            cmd = [self.binary(), "-c", str(conf)]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
            if wait_for_port(self.port, 10.0) and self.proc.poll() is None:
                return
            self._kill()
        raise RuntimeError(f"mosquitto did not start; see {self.tmp}/mosquitto.log")

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)


def _connect(client: mqtt.Client, port: int) -> None:
    """Connect, start paho's network thread, and wait (bounded) for CONNACK."""
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props: connected.set()
    client.connect(LOOPBACK, port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        raise TimeoutError("no CONNACK from mosquitto")


# --------------------------------------------------------------------------- subscriber


class _Tally:
    """Messages received so far and when the last one arrived (paho thread writes, main thread waits)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.t_last = 0.0

    def on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.count += 1
            # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
            self.t_last = time.perf_counter()
            self.cond.notify()

    def wait_for(self, expected: int) -> tuple[int, float]:
        """Wait until expected messages arrived, giving up after DRAIN_S without progress."""
        with self.cond:
            seen = -1
            while self.count < expected and self.count != seen:
                seen = self.count
                self.cond.wait_for(lambda: self.count >= expected, DRAIN_S)
            return self.count, self.t_last


def subscriber_main(conn: Connection, port: int) -> None:
    """Subscribe at QoS 1, report ready, then answer each ("expect", k) with
    (count, t_last) once k messages arrived (or arrivals stalled)."""
    tally = _Tally()
    subscribed = threading.Event()
    client = _client(f"kb-sub-{os.getpid()}")
    client.on_message = tally.on_message
    client.on_subscribe = lambda c, u, mid, rcs, props: subscribed.set()
    _connect(client, port)
    try:
        client.subscribe(TOPIC, qos=1)
        if not subscribed.wait(10):
            raise TimeoutError("no SUBACK")
        conn.send("ready")
        life = Deadline(CHILD_MAX_S)
        while not life.expired():
            if not conn.poll(0.2):
                continue
            cmd = conn.recv()
            if cmd == "stop":
                return
            _, expected = cmd
            conn.send(tally.wait_for(expected))
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------- publisher


class _Publisher:
    def __init__(self, port: int) -> None:
        self.cond = threading.Condition()
        self.acked = 0
        self.client = _client(f"kb-pub-{os.getpid()}")
        # 0 = no paho limit; our own WINDOW bounds what is in flight. A paho limit of
        # ~1000 gives the same flow on the wire but halves throughput: on every PUBACK
        # paho 2.x rescans all queued messages (Client._update_inflight), O(window).
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)  # unlimited, for the same reason
        self.client.on_publish = self._on_publish
        _connect(self.client, port)

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: object, props: object) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify()

    def wait_acked(self, target: int, timeout: float = DRAIN_S) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.acked >= target, timeout):
                raise TimeoutError(f"PUBACKs {self.acked} < {target}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _delivered(sub: Connection, sent: int) -> tuple[int, float]:
    sub.send(("expect", sent))
    if not sub.poll(DRAIN_S * 3):
        raise TimeoutError("subscriber did not report")
    count, t_last = sub.recv()
    if count < sent:
        raise RuntimeError(f"subscriber got {count} of {sent} QoS 1 messages")
    return int(count), float(t_last)


def pipelined(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    """Keep up to WINDOW QoS 1 publishes in flight; returns (delivered, seconds to last delivery)."""
    with spawn_child(subscriber_main, port) as (sub, _):
        pub = _Publisher(port)
        payload = os.urandom(size)
        try:
            deadline = Deadline(budget_s)
            sent = 0
            t0 = time.perf_counter()
            while sent < n and not deadline.expired():
                burst = min(WINDOW - (sent - pub.acked), n - sent)
                for _ in range(burst):
                    pub.client.publish(TOPIC, payload, qos=1)
                sent += max(burst, 0)
                # Top the window up once ACK_EVERY slots are free, like the other peers.
                pub.wait_acked(min(sent, sent - WINDOW + ACK_EVERY))
            pub.wait_acked(sent)
            _, t_last = _delivered(sub, sent)
            return sent, t_last - t0
        finally:
            pub.close()


def stop_and_wait(port: int, n: int, size: int, budget_s: float) -> tuple[int, float]:
    """Publish, wait for its PUBACK, repeat; the subscriber must still get them all."""
    with spawn_child(subscriber_main, port) as (sub, _):
        pub = _Publisher(port)
        payload = os.urandom(size)
        try:
            deadline = Deadline(budget_s)
            sent = 0
            t0 = time.perf_counter()
            while sent < n and not deadline.expired():
                info = pub.client.publish(TOPIC, payload, qos=1)
                info.wait_for_publish(DRAIN_S)
                if not info.is_published():
                    raise TimeoutError("no PUBACK")
                sent += 1
            elapsed = time.perf_counter() - t0
            _delivered(sub, sent)
            return sent, elapsed
        finally:
            pub.close()
