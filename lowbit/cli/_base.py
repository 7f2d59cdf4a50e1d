"""What every command shares: one vocabulary of options, argument types, output claims, and
the way a command ends (one line and status 2 for the user's errors, a traceback for bugs).

Options are declared without importing torch, so argparse reports every missing or
malformed argument before a command loads anything. An option whose default lives in a
library config (``TrainConfig``, ``KDConfig``, ``QuantSpec``, ``PTQConfig``, ``Thresholds``)
parses to ``None`` when not given, and the command builds the config from the given values
only; ``--help`` reads the configs to show their defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from .._choices import ACT_BITS, WEIGHT_BITS, default_act_bits
from .._io import check_outputs, output_lock
from ..errors import LowbitError

DATA_SPECS = "cifar10:DIR, cifar100:DIR, digits or FILE.npz"
# What a command needs beyond the edge install (numpy + onnxruntime), by the module it misses.
_EXTRAS = {"torch": "train", "brevitas": "train", "onnx": "train", "qonnx": "train",
           "onnxoptimizer": "train", "ml_dtypes": "train", "sklearn": "train", "tqdm": "train",
           "matplotlib": "train", "torchvision": "zoo", "timm": "zoo"}


def _number(kind: type, least: float, name: str) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` and refuses values below ``least``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not value >= least:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive = _number(int, 1, "an integer >= 1")
non_negative = _number(int, 0, "an integer >= 0")
non_negative_float = _number(float, 0.0, "a number >= 0")


def json_object(text: str) -> dict:
    """``--arch-kwargs``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def bits(text: str, weights: Sequence[int] = WEIGHT_BITS, acts: Sequence[int] = ACT_BITS
         ) -> tuple[int, int | None]:
    """``--bits W[/A]``: weight bits and activation bits (None when only W is written)."""
    w, sep, a = text.partition("/")
    ok = w.isdigit() and int(w) in weights and (not sep or (a.isdigit() and int(a) in acts))
    if not ok:
        def shown(values: Sequence[int]) -> str:
            return (f"{values[0]}..{values[-1]}" if len(values) > 4
                    else "{" + ",".join(map(str, values)) + "}")

        raise argparse.ArgumentTypeError(
            f"expected W or W/A with W in {shown(weights)} and A in {shown(acts)} (e.g. 2, 4, "
            f"8, 2/8), got {text!r}")
    return int(w), int(a) if sep else None


def resolved_bits(given: tuple[int, int | None]) -> tuple[int, int]:
    """``--bits W`` alone: activations as lowbit's default for those weights (W8 -> A8)."""
    w, a = given
    return w, default_act_bits(w) if a is None else a


def width(text: str) -> int | str:
    """``--first-bits``/``--last-bits``: weight bits, or "same" (the model's --bits)."""
    if text == "same":
        return text
    if text.isdigit() and int(text) in WEIGHT_BITS:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, WEIGHT_BITS))} or "
                                     f"'same', got {text!r}")


def layer_width(text: str) -> tuple[str, int]:
    """``--layer-bits NAME=BITS``."""
    name, sep, value = text.rpartition("=")
    if not (sep and name and value.isdigit()):
        raise argparse.ArgumentTypeError(f"expected LAYER=BITS (e.g. layer1.0.conv1=4), got "
                                         f"{text!r}")
    return name, int(value)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose ``--help`` shows defaults that live in library configs.

    ``defaults()`` returns ``{dest: value}`` for options declared with ``default=None``;
    it runs only when help is shown, so parsing never imports torch.
    """

    def __init__(self, *args: Any, defaults: Callable[[], dict[str, Any]] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._shown_defaults = defaults

    def error(self, message: str) -> NoReturn:
        """Bad arguments: one line (the usage is one ``--help`` away), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        if self._shown_defaults is not None:
            shown = self._shown_defaults()
            for action in self._actions:
                if action.dest in shown and action.default is None:
                    action.default = shown[action.dest]
        return super().format_help()


def subcommand(sub: argparse._SubParsersAction, name: str, *, summary: str, description: str,
               defaults: Callable[[], dict[str, Any]] | None = None) -> Parser:
    """A ``lowbit NAME`` subcommand parser."""
    return sub.add_parser(name, help=summary, description=description, defaults=defaults)


# ------------------------------------------------------------------ one vocabulary of options

def data_option(p: argparse.ArgumentParser, text: str, *, default: str | None = None,
                required: bool = False) -> None:
    p.add_argument("--data", default=default, required=required, metavar="SPEC",
                   help=f"{text} ({DATA_SPECS})")


def limit_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--limit", type=non_negative, default=0, metavar="N",
                   help=f"use only the first N {what} (0: all)")


def batch_size_option(p: argparse.ArgumentParser, text: str, default: int | None = None,
                      many: bool = False) -> None:
    p.add_argument("--batch-size", type=positive, default=default, nargs="+" if many else None,
                   metavar="N", help=text)


def threads_option(p: argparse.ArgumentParser, engine: str) -> None:
    p.add_argument("--threads", type=positive, default=None, metavar="N",
                   help=f"{engine} threads (default: the library's, one per physical core)")


def output_option(p: argparse.ArgumentParser, text: str, *, required: bool = False,
                  default: str | None = None) -> None:
    p.add_argument("-o", "--output", required=required, default=default, metavar="PATH",
                   help=text)


def arch_options(p: argparse.ArgumentParser, help_text: str, default: str | None = None) -> None:
    """``--arch`` (a registered model or user code) and ``--arch-kwargs``."""
    p.add_argument("--arch", default=default, metavar="NAME|package.module:factory",
                   help=f"{help_text}: a registered model (lowbit models) or a factory in your "
                   f"own importable code; a checkpoint that names user code is built only when "
                   f"you name it here")
    p.add_argument("--arch-kwargs", type=json_object, default=None, metavar="JSON",
                   help="keyword arguments of the architecture, e.g. '{\"width\": 8}' (registered "
                   "models also get num_classes and in_channels from the data)")


def bits_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--bits", type=bits, default=None, metavar="W[/A]",
                   help=f"{text}: W-bit weights (2 = ternary, 4, 8) and A-bit activations; W "
                   f"alone: activations as wide, at least 4 (2 = 2/4, 4 = 4/4, 8 = W8A8)")


def layer_width_options(p: argparse.ArgumentParser, unset: str) -> None:
    """The user's precision policy: ``--first-bits``, ``--last-bits``, ``--layer-bits``."""
    p.add_argument("--first-bits", type=width, default=None, metavar="BITS|same",
                   help=f"weight bits of the first conv/linear layer (same: --bits; {unset})")
    p.add_argument("--last-bits", type=width, default=None, metavar="BITS|same",
                   help=f"weight bits of the last layer (same: --bits; {unset})")
    p.add_argument("--layer-bits", type=layer_width, action="append", default=[],
                   metavar="LAYER=BITS", help="weight bits of one layer by its module name "
                   "(repeatable; wins over --first-bits/--last-bits; names: lowbit footprint "
                   "or describe())")


def layer_widths(args: argparse.Namespace) -> dict:
    """QuantSpec fields of :func:`layer_width_options` (unset ones left out)."""
    widths = {k: (None if v == "same" else v) for k, v in
              (("first_bits", args.first_bits), ("last_bits", args.last_bits)) if v is not None}
    return {**widths, **({"overrides": tuple(args.layer_bits)} if args.layer_bits else {})}


def quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the result (and errors): no progress bars, stage lines or "
                   "verification details")


def allow_modified_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-modified", action="store_true",
                   help="read a lowbit export whose weights or graph no longer match the "
                   "digests recorded at export (refused by default: a corrupt copy still runs, "
                   "with wrong answers); for files you changed on purpose")


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options among ``names`` the user gave (declared with default None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def allowed(args: argparse.Namespace) -> set[str]:
    """The user-code architectures named on this command line (checkpoints may use them)."""
    return {a for a in (getattr(args, "arch", None), getattr(args, "teacher_arch", None)) if a}


def spec_paths(*specs: str | None) -> list[str]:
    """The files or folders that data specs read (``cifar10:DIR`` -> DIR, FILE.npz)."""
    return [spec.partition(":")[2] or spec for spec in specs if spec and spec != "random"]


def set_threads(args: argparse.Namespace) -> None:
    """``--threads`` of a torch command (the command owns its process)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


# ------------------------------------------------------------------ outputs

def claim(args: argparse.Namespace, outputs: Sequence[object], inputs: Sequence[object] = ()
          ) -> None:
    """Check the outputs (see ``check_outputs``) and lock them until the command ends: a
    second lowbit process given one of them is refused instead of racing this one."""
    check_outputs(outputs, inputs)
    args.claims.enter_context(output_lock(outputs))


# ------------------------------------------------------------------ how a command ends

@contextlib.contextmanager
def _interrupts() -> Iterator[list[int]]:
    """Let SIGTERM (``kill``, a scheduler's time limit) unwind like Ctrl-C, so the temp files
    of an unfinished write are removed, and list the signals received: an interrupt that
    lands inside a library's import can be swallowed there and resurface as another error,
    which is then still reported as the interrupt. The previous handlers are restored."""
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield received
        return
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _missing_extra(exc: ModuleNotFoundError, parser: argparse.ArgumentParser,
                   argv: Sequence[str] | None) -> str | None:
    """One line for a command run on an install that lacks what it needs, else None."""
    module = (exc.name or "").partition(".")[0]
    if module not in _EXTRAS:
        return None
    words = list(sys.argv[1:] if argv is None else argv)
    command = parser.prog if parser.prog != "lowbit" or not words else f"lowbit {words[0]}"
    return (f"{command} needs {module}, which this install lacks: pip install "
            f"'lowbit[{_EXTRAS[module]}]' (the edge install, numpy + onnxruntime, runs lowbit "
            f"run, bench and convert-ort)")


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run one command; the exit status (2: the user's error, 1: a bug, 130:
    interrupted)."""
    received: list[int] = []
    try:
        # a command imports torch (seconds) when it starts, so Ctrl-C may land there
        with _interrupts() as received, contextlib.ExitStack() as claims:
            args = parser.parse_args(argv)
            args.claims = claims  # output locks, released when the command ends (claim)
            args.func(args)
    except KeyboardInterrupt:
        received.append(signal.SIGINT)
    except LowbitError as exc:
        if not received:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
    except ModuleNotFoundError as exc:
        line = None if received else _missing_extra(exc, parser, argv)
        if line is None and not received:
            return _bug()
        if line is not None:
            print(f"{parser.prog}: error: {line}", file=sys.stderr)
            return 2
    except Exception:  # noqa: BLE001  (a bug: show it as one, with its traceback)
        if not received:
            return _bug()
    if received:  # also when the interrupt surfaced as another error (see _interrupts)
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _bug() -> int:
    from .. import __version__

    traceback.print_exc()
    print(f"lowbit: internal error in lowbit {__version__}: this is a bug, please report it "
          f"with the traceback above and the command line", file=sys.stderr)
    return 1


def finish(code: int, argv: Sequence[str] | None) -> int:
    """The exit status; on the command line (``argv`` None) an interrupt ends the process
    here with 130: CPython would otherwise kill itself with SIGINT at exit (status -2, no
    message) when the interrupt landed in code that C ran for an import (torch's), even
    though lowbit handled it. Outputs are complete or absent by then (atomic writes)."""
    if code == 130 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code
