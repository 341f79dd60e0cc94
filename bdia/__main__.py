"""Command line: ``python -m bdia demo [options]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "bdia.digits.demo"}
    if not argv or argv[0] not in commands:
        print("usage: python -m bdia demo [--help]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
