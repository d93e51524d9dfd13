"""The README's "Server" example, verbatim but for the lines marked `# test:`.

The test harness sets KORINET_EXAMPLE_PORT (the README uses 1235) and
KORINET_EXAMPLE_N (how many messages before the endless loops stop).
"""

import os  # test: port and bounds come from the environment
import socket  # test: missing from the README
import time
import traceback

from korinet import server

PORT = int(os.environ.get("KORINET_EXAMPLE_PORT", "1235"))  # test
N = int(os.environ.get("KORINET_EXAMPLE_N", "3"))  # test: stop after N messages
DEADLINE = time.monotonic() + float(os.environ.get("KORINET_EXAMPLE_SECONDS", "30"))  # test
received = 0  # test

# SOCKET
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", PORT))  # test: was 1235
sock.listen(10)
sock.settimeout(5)
try:
    while received < N and time.monotonic() < DEADLINE:  # test: was `while True`
        try:
            conn, addr = sock.accept()
            client = server(conn)
            while received < N:  # test: was `while True`
                print(client.recv(giveID=True))
                client.send({"status": True})
                received += 1  # test
                time.sleep(1)
        except Exception as e:
            print(traceback.format_exc())
            print(e)
except Exception as e:
    print(traceback.format_exc())
    print(e)
