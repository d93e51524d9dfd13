"""The README's "RAW Protocol" example, verbatim but for the lines marked `# test:`.

The README leaves `sock` to the reader ("raw TCP socket required"); the test
harness sets KORINET_EXAMPLE_PORT to a raw v2 peer listening on loopback.
"""

import os  # test: the port comes from the environment
import socket  # test: missing from the README

from korinet import protocol

sock = socket.create_connection(("127.0.0.1", int(os.environ["KORINET_EXAMPLE_PORT"])), timeout=10)  # test

session = protocol.v2(sock)  # raw TCP socket required
session.send({"type": "ping"})

response = session.recv()
if response["status"] is not True:
    raise RuntimeError("Invalid response")
print(response)  # test: show what came back
