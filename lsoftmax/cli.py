"""The ``lsoftmax`` command line: ``lsoftmax demo|train|plot|export|infer|convert ...``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# Command modules under lsoftmax.commands, in the order --help lists them.
COMMANDS = ("demo", "train", "plot", "export", "infer", "convert")


class CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default, unless its help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        # Identity, not ==: 0 and 0.0 are defaults worth showing, None/False/[] are not.
        unset = default is None or default is False or default is argparse.SUPPRESS
        if (
            action.option_strings
            and not unset
            and default != []
            and "default" not in text
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """Every ``lsoftmax`` (sub)command parser: help with defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from lsoftmax import __version__

    parser = Parser(
        prog="lsoftmax",
        description="Large-margin softmax (L-Softmax, L-GM): train, export, serve, convert.",
    )
    parser.add_argument("--version", action="version", version=f"lsoftmax {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lsoftmax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lsoftmax.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"lsoftmax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lsoftmax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
