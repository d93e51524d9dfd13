"""The korinet-chat command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("korinet-chat is being built", file=sys.stderr)
    return 2
