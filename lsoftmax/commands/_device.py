"""The ``--device cpu|cuda`` option of ``train``, ``demo`` and ``infer`` (one spelling for all)."""

from __future__ import annotations

import argparse
import sys

DEVICES = ("cpu", "cuda")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of ``--device``: still accepted, with a warning naming the new one."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(
            f"lsoftmax: warning: {option_string} is deprecated; use --device {values}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_device_argument(
    p: argparse.ArgumentParser, what: str, deprecated: str | None = None
) -> None:
    """``--device`` (and, for an old command line, a hidden deprecated alias of it)."""
    p.add_argument("--device", choices=DEVICES, default="cpu", help=f"where to run {what}")
    if deprecated:
        p.add_argument(
            deprecated, dest="device", choices=DEVICES, action=_DeprecatedAlias,
            help=argparse.SUPPRESS,
        )


def check_torch_device(device: str) -> None:
    """Fail before any work when ``--device cuda`` cannot run (checked again by ``train``)."""
    from lsoftmax.cli import CLIError
    from lsoftmax.train import torch_device

    try:
        torch_device(device)
    except ValueError as e:
        raise CLIError(f"--device {device}: {e}") from None
