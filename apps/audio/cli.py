"""The korinet-audio command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("korinet-audio is being built", file=sys.stderr)
    return 2
