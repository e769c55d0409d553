"""`adassl-fast` / `python -m adassl_fast`: info, bench, train, compare.

Each subcommand lives in its own module and parses its own flags; this file only routes to it, so a
subcommand's heavy imports happen only when it runs.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys

SUBCOMMANDS = {
    "info": ("adassl_fast.cli", "versions, device and the available backends (JSON)"),
    "bench": ("adassl_fast.benchmark", "time and memory of every backend against the reference"),
    "train": ("adassl_fast.train", "train an encoder with AdaSSL or SimCLR"),
    "compare": ("adassl_fast.compare", "SimCLR vs AdaSSL-V vs AdaSSL-S on the embedded benchmark"),
}


def info_main(argv: list[str]) -> int:
    import adassl_fast

    if argv:
        print("usage: adassl-fast info", file=sys.stderr)
        return 2
    print(json.dumps(adassl_fast.info(), indent=2))
    return 0


def _usage() -> str:
    lines = ["usage: adassl-fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _route(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # The reader went away (`adassl-fast info | head`): stop quietly, as a C tool killed by SIGPIPE
        # would. Python would raise again when flushing stdout at exit, so point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + int(signal.SIGPIPE)


def _route(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"adassl-fast: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "info":
        return info_main(rest)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
