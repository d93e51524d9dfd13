"""One asyncio loop on a daemon thread, shared by every blocking facade object.

The blocking API submits coroutines here, so heartbeats are answered and acks
flow even while the application is busy and not calling recv().
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["get_loop", "run"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=main, name="korinet-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for it. Ctrl-C cancels it."""
    loop = get_loop()
    if threading.current_thread().name == "korinet-loop":
        coro.close()
        raise RuntimeError("the blocking API cannot be called from KoriNet's own loop; use korinet.runtime")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except (KeyboardInterrupt, concurrent.futures.CancelledError):
        future.cancel()
        raise
