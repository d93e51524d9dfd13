"""The korinet-admin command."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("korinet-admin is being built", file=sys.stderr)
    return 2
