"""`adassl-fast` / `python -m adassl_fast`: info, bench, train, compare.

Each subcommand lives in its own module and parses its own flags; this file only routes to it, so a
subcommand's heavy imports happen only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from dataclasses import dataclass

SUBCOMMANDS = {
    "info": ("adassl_fast.apps.cli", "versions, device and the available backends (JSON)"),
    "bench": ("adassl_fast.apps.benchmark", "time and memory of every backend against the reference"),
    "train": ("adassl_fast.apps.train", "train an encoder with AdaSSL or SimCLR"),
    "compare": ("adassl_fast.apps.compare", "SimCLR vs AdaSSL-V vs AdaSSL-S on the embedded benchmark"),
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose user errors are one line, `<prog>: error: ...`, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Option:
    """What one command-line value may be: its type, choices or range, and one line of help.

    `check` serves argparse (through `parse`) and every other source of the value alike (a JSON config,
    keyword arguments), so a value is accepted or refused the same way wherever it comes from.
    """

    help: str
    kind: type = str
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None  # inclusive

    def check(self, name: str, value):
        """`value` if it is allowed, else ValueError naming `name` and what is allowed."""
        name = f"{name} " if name else ""
        expected = (int, float) if self.kind is float else self.kind
        if isinstance(value, bool) != (self.kind is bool) or not isinstance(value, expected):
            raise ValueError(f"{name}must be {_KIND_NAMES[self.kind]}, got {value!r}")
        items = value if self.kind is tuple else (value,)
        for item in items:
            self._check_item(name, item)
        return float(value) if self.kind is float else value

    def _check_item(self, name: str, item) -> None:
        if self.choices and item not in self.choices:
            raise ValueError(f"{name}must be one of {', '.join(map(repr, self.choices))}, got {item!r}")
        if self.kind is tuple and not isinstance(item, int):
            raise ValueError(f"{name}must hold integers, got {item!r}")
        if self.minimum is not None and not item >= self.minimum:
            raise ValueError(f"{name}must be >= {self.minimum}, got {item}")
        if self.above is not None and not item > self.above:
            raise ValueError(f"{name}must be > {self.above}, got {item}")
        if self.maximum is not None and not item <= self.maximum:
            raise ValueError(f"{name}must be <= {self.maximum}, got {item}")

    def allowed(self) -> str:
        """The values `check` accepts, in words for --help: "one of ...", ">= 1", ">= 0, <= 1" or ""."""
        if self.choices:
            return "one of " + ", ".join(repr(c) if c == "" else str(c) for c in self.choices)
        bounds = [f"{op} {bound}" for op, bound in ((">=", self.minimum), (">", self.above), ("<=", self.maximum))
                  if bound is not None]
        return ", ".join(bounds)

    def parse(self, text: str):
        """The argparse `type`: command-line text -> a checked value (argparse reports the error)."""
        try:
            return self.check("", _from_text(self.kind, text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


_KIND_NAMES = {int: "an integer", float: "a number", str: "text", bool: "a boolean",
               tuple: "sizes like 128-128 (a list of integers)"}


def _from_text(kind: type, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")
    try:
        if kind is tuple:  # sizes as 128-128 or 128,128
            return tuple(int(s) for s in text.replace(",", "-").split("-") if s)
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {_KIND_NAMES[kind]}, got {text!r}") from None


def check_device(name: str) -> str:
    """`name` if it is auto, cpu, cuda or cuda:N with that GPU visible to torch, else ValueError saying why."""
    if name in ("auto", "cpu"):
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    import torch  # (here, not at the top: `adassl-fast --help` stays fast)

    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA device here (use cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


def device_flag(text: str) -> str:
    """argparse `type` of a --device flag (check_device)."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    except KeyboardInterrupt:
        # Ctrl-C: one line and the shell's exit status for SIGINT, not a traceback (compare's worker processes
        # are terminated on the way out).
        print("adassl-fast: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)


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
