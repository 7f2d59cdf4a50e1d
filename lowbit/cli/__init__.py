"""Command line: ``lowbit COMMAND`` and ``lowbit-export``.

Each command parses strings, calls the library, prints; one module per group of commands
(``_training``: torch; ``_edge``: numpy + onnxruntime; ``_export``), one vocabulary of
options (``_base``). Errors the user can fix (a :class:`~lowbit.errors.LowbitError`, or a
command run on an install that lacks what it needs) print one line and exit with status 2;
anything else is a bug in lowbit and shows its traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import _base, _edge, _export, _training

__all__ = ["export_main", "main", "parser"]

SUBCOMMANDS = (_training.add_train, _training.add_distill, _training.add_eval,
               _training.add_models, _training.add_demo, _edge.add_run, _edge.add_bench,
               _edge.add_convert_ort, _edge.add_footprint, _export.add_export)


def parser() -> argparse.ArgumentParser:
    """The ``lowbit`` command line."""
    top = _base.Parser(prog="lowbit", description="lowbit: float model -> ternary/4-bit "
                       "student -> packed ONNX that stock onnxruntime runs.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND",
                             parser_class=_base.Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return top


def export_parser() -> argparse.ArgumentParser:
    """The ``lowbit-export`` command line (the same options as ``lowbit export``)."""
    p = _base.Parser(prog="lowbit-export", description=_export.DESCRIPTION,
                     defaults=_export.help_defaults)
    _export.arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit``."""
    return _base.finish(_base.run(parser(), argv), argv)


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit-export`` (same as ``lowbit export``)."""
    return _base.finish(_base.run(export_parser(), argv), argv)
