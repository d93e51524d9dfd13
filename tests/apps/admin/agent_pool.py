"""Many korinet-admin agents in one process, for fleet tests at scale.

    python agent_pool.py STATE_DIR COUNT PREFIX [--tls HOME] [--deny] [--env NAME=VALUE...]

Starts COUNT agents on 127.0.0.1, port 0 each, and prints ``NAME PORT`` per agent
(NAME is PREFIX and a number; its jobs see ``HOST_NAME=NAME``), then ``ready``.
Serves until its stdin closes. ``--tls HOME``: the agent key and authorized_keys in
HOME (else plaintext: every client is admin); ``--deny``: the policy lets the admin
role run ``true`` only, so other commands are refused. ``--dial PORT --keys DIR``:
each agent uses the identity in DIR/NAME (made if missing) and dials home to the relay
on 127.0.0.1:PORT (jitter ceiling ``--jitter`` s, at most ``--cap`` s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

from admin_helpers import running_agent
from korinet_admin.dialhome import DialHome
from korinet_admin.policy import DEFAULT_POLICY, Policy

from korinet.runtime.server import raise_open_file_limit
from korinet.security import AuthorizedKeys, Identity


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("prefix")
    parser.add_argument("--tls", type=Path, metavar="HOME")
    parser.add_argument("--deny", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--dial", type=int, metavar="PORT")
    parser.add_argument("--keys", type=Path, metavar="DIR")
    parser.add_argument("--jitter", type=float, default=1.0)
    parser.add_argument("--cap", type=float, default=4.0)
    args = parser.parse_args()
    raise_open_file_limit()
    identity = authorized = None
    if args.tls is not None:
        identity = Identity.load(args.tls)
        authorized = AuthorizedKeys(args.tls / "authorized_keys")
    policy = (
        Policy.from_mapping({"roles": {"admin": {"commands": ["true"]}}}) if args.deny else DEFAULT_POLICY
    )
    extra = dict(item.split("=", 1) for item in args.env)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        for i in range(args.count):
            name = f"{args.prefix}{i:03d}"
            own = identity
            if args.dial is not None:
                own = Identity.load_or_create(args.keys / name)
            agent = await stack.enter_async_context(
                running_agent(args.state_dir, own, authorized, policy=policy,
                              job_env={"HOST_NAME": name, **extra})
            )  # fmt: skip
            if args.dial is not None:
                dial = DialHome(agent.server.hub, agent.server.ssl, own, [("127.0.0.1", args.dial)], name,
                                initial=args.jitter, backoff_cap=args.cap)  # fmt: skip
                dial.start()
                stack.push_async_callback(dial.close)
            sys.stdout.write(f"{name} {agent.port}\n")
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        # until the test closes our stdin (or kills us)
        await loop.run_in_executor(None, sys.stdin.buffer.read)


if __name__ == "__main__":
    asyncio.run(main())
