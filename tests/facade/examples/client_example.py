"""The README's "Client" example, verbatim but for the lines marked `# test:`.

The test harness sets KORINET_EXAMPLE_PORT (the README uses 1235) and
KORINET_EXAMPLE_N (how many pings before the endless loop stops).
"""

import os  # test: port and bound come from the environment
import time  # test: missing from the README

from korinet import client

C = client("127.0.0.1", int(os.environ.get("KORINET_EXAMPLE_PORT", "1235")), timeout=4)  # test: port
num = 0
while num < int(os.environ.get("KORINET_EXAMPLE_N", "3")):  # test: was `while True`
    C.send({"type": "ping", "num": num})
    print(C.recv())
    num += 1
    time.sleep(1)
