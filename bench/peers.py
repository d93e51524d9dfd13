"""Peer systems for the KoriNet comparison, and the contract each system follows.

A system is a `System` subclass registered in SYSTEMS. It may define any of these
measurement methods; the table prints "—" for the ones it lacks:

    pipelined_64(n)     -> float  acked msgs/s, 64 B payloads, WINDOW unacked, ack every ACK_EVERY
    pipelined_4k(n)     -> float  acked payload MB/s (10^6 B), 4 KiB payloads, same window
    stop_and_wait_64(n) -> float  msgs/s with one 64 B message in flight, each waiting for its ack
    reqrep_latency(n)   -> {"p50": µs, "p99": µs}  64 B request/response, one outstanding

`n` is an upper bound on messages; every run also stops after `self.budget_s` seconds
and reports the rate of what it completed. Each call must run the server side in
another process (benchutil.spawn_child) so client and server don't share a GIL.
`setup()`/`teardown()` bracket all of a system's runs (e.g. start/stop a broker).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as dist_version
from typing import ClassVar

import peer_asyncio
import peer_korinet
import peer_mqtt
import peer_original
import peer_zmq
import zmq
from benchutil import korinet_setup, latency_figures

SMALL = 64
LARGE = 4096


@dataclass(frozen=True)
class Row:
    method: str  # System method that produces it
    key: str | None  # key in the method's dict result, None for a plain float
    label: str  # row label in the table


ROWS: tuple[Row, ...] = (
    Row("pipelined_64", None, "pipelined acked 64 B, msgs/s"),
    Row("pipelined_4k", None, "pipelined acked 4 KiB, MB/s"),
    Row("stop_and_wait_64", None, "stop-and-wait acked 64 B, msgs/s"),
    Row("reqrep_latency", "p50", "req/resp 64 B p50, µs"),
    Row("reqrep_latency", "p99", "req/resp 64 B p99, µs"),
    Row("blocking_stop_and_wait_64", None, "stop-and-wait acked 64 B, blocking API, msgs/s"),
    Row("reconnect_ms", None, "first message after a cut (reconnect + resume), median ms"),
    Row("idle_session_kib", None, "RSS per idle heartbeating session (5,000), KiB"),
)

# Upper bounds on messages per run (the time budget usually isn't reached).
SIZES_FULL: dict[str, int] = {
    "pipelined_64": 200_000,
    "pipelined_4k": 40_000,
    "stop_and_wait_64": 10_000,
    "reqrep_latency": 5_000,
    "blocking_stop_and_wait_64": 10_000,
    "reconnect_ms": 50,
    "idle_session_kib": 5_000,
}
SIZES_QUICK: dict[str, int] = {
    "pipelined_64": 30_000,
    "pipelined_4k": 8_000,
    "stop_and_wait_64": 2_000,
    "reqrep_latency": 1_000,
    "blocking_stop_and_wait_64": 2_000,
    "reconnect_ms": 20,
    "idle_session_kib": 1_000,
}


def msgs_per_s(done: int, seconds: float) -> float:
    return done / seconds


def mb_per_s(done: int, seconds: float, size: int) -> float:
    return done * size / seconds / 1e6


class System:
    name: ClassVar[str] = "?"  # column header

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s

    def setup(self) -> None:
        """Before any run of this system."""

    def teardown(self) -> None:
        """After all runs, even failed ones."""

    def version(self) -> str:
        """Versions worth printing under the table."""
        return ""


class AsyncioSystem(System):
    name = "raw asyncio"

    def version(self) -> str:
        return f"msgpack {dist_version('msgpack')}"

    def pipelined_64(self, n: int) -> float:
        return msgs_per_s(*peer_asyncio.pipelined(n, SMALL, self.budget_s))

    def pipelined_4k(self, n: int) -> float:
        return mb_per_s(*peer_asyncio.pipelined(n, LARGE, self.budget_s), LARGE)

    def stop_and_wait_64(self, n: int) -> float:
        return msgs_per_s(*peer_asyncio.stop_and_wait(n, SMALL, self.budget_s))

    def reqrep_latency(self, n: int) -> dict[str, float]:
        return peer_asyncio.reqrep(n, SMALL, self.budget_s)


class ZmqSystem(System):
    name = "pyzmq"

    def version(self) -> str:
        return f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"

    def pipelined_64(self, n: int) -> float:
        return msgs_per_s(*peer_zmq.pipelined(n, SMALL, self.budget_s))

    def pipelined_4k(self, n: int) -> float:
        return mb_per_s(*peer_zmq.pipelined(n, LARGE, self.budget_s), LARGE)

    def stop_and_wait_64(self, n: int) -> float:
        return msgs_per_s(*peer_zmq.stop_and_wait(n, SMALL, self.budget_s))

    def reqrep_latency(self, n: int) -> dict[str, float]:
        return peer_zmq.reqrep(n, SMALL, self.budget_s)


class MqttSystem(System):
    name = "MQTT QoS 1 (paho + mosquitto)"

    def __init__(self, budget_s: float) -> None:
        super().__init__(budget_s)
        self.broker = peer_mqtt.Mosquitto()

    def setup(self) -> None:
        self.broker.start()

    def teardown(self) -> None:
        self.broker.stop()

    def version(self) -> str:
        return f"paho-mqtt {dist_version('paho-mqtt')}, mosquitto {peer_mqtt.Mosquitto.version()}"

    def pipelined_64(self, n: int) -> float:
        return msgs_per_s(*peer_mqtt.pipelined(self.broker.port, n, SMALL, self.budget_s))

    def pipelined_4k(self, n: int) -> float:
        return mb_per_s(*peer_mqtt.pipelined(self.broker.port, n, LARGE, self.budget_s), LARGE)

    def stop_and_wait_64(self, n: int) -> float:
        return msgs_per_s(*peer_mqtt.stop_and_wait(self.broker.port, n, SMALL, self.budget_s))


class OriginalSystem(System):
    name = f"korinet {peer_original.PIN_VERSION} (original)"

    def setup(self) -> None:
        peer_original.ensure_venv()

    def version(self) -> str:
        return f"korinet {peer_original.PIN_VERSION} in {peer_original.VENV.name}"

    def stop_and_wait_64(self, n: int) -> float:
        r = peer_original.run("ack", n, SMALL, self.budget_s)
        return msgs_per_s(r["done"], r["elapsed"])

    def blocking_stop_and_wait_64(self, n: int) -> float:
        return self.stop_and_wait_64(n)  # the original only has a blocking API

    def reqrep_latency(self, n: int) -> dict[str, float]:
        r = peer_original.run("reqrep", n, SMALL, self.budget_s)
        return latency_figures(r["samples_ns"])


class KorinetSystem(System):
    name = "KoriNet (this repo)"

    def version(self) -> str:
        return f"korinet {peer_korinet.korinet.__version__} ({korinet_setup()})"

    def pipelined_64(self, n: int) -> float:
        return msgs_per_s(*peer_korinet.pipelined(n, SMALL, self.budget_s))

    def pipelined_4k(self, n: int) -> float:
        return mb_per_s(*peer_korinet.pipelined(n, LARGE, self.budget_s), LARGE)

    def stop_and_wait_64(self, n: int) -> float:
        return msgs_per_s(*peer_korinet.stop_and_wait(n, SMALL, self.budget_s))

    def reqrep_latency(self, n: int) -> dict[str, float]:
        return peer_korinet.reqrep(n, SMALL, self.budget_s)

    def blocking_stop_and_wait_64(self, n: int) -> float:
        return msgs_per_s(*peer_korinet.blocking_stop_and_wait(n, SMALL, self.budget_s))

    def reconnect_ms(self, n: int) -> float:
        return peer_korinet.reconnect_ms(n)

    def idle_session_kib(self, n: int) -> float:
        return peer_korinet.idle_session_kib(n)


# Column order in the table; `--only` takes these keys.
SYSTEMS: dict[str, type[System]] = {
    "korinet": KorinetSystem,
    "asyncio": AsyncioSystem,
    "zmq": ZmqSystem,
    "mqtt": MqttSystem,
    "original": OriginalSystem,
}
