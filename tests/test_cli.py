"""One command line: the same option names on every command, arguments checked before torch
loads, one-line errors on an install that lacks what a command needs, and a CLI reference
that is the --help text itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import cli
from lowbit.cli import _base

ROOT = Path(__file__).resolve().parents[1]
# one name per concept: what a command reads, how many, how many at once, where it writes
VOCABULARY = {"--data", "--limit", "--batch-size", "--threads", "--output", "--arch",
              "--arch-kwargs", "--bits", "--quiet"}
RETIRED = {"--verify-limit", "--batch", "--out", "--act-bits", "--val-fraction", "--test-data",
           "--calib-limit", "--num-threads", "--jobs"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    top = cli.parser()
    commands = dict(top._subparsers._group_actions[0].choices)
    return {**commands, "lowbit-export": cli.export_parser()}


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_speaks_one_vocabulary(name):
    p = _commands()[name]
    options = _options(p)
    assert not RETIRED & set(options), f"{name}: {sorted(RETIRED & set(options))}"
    for flag in set(options) - {"-h", "--help"}:  # long names only, lower-case, dashed
        assert flag.startswith("--") or flag in ("-o", "-q"), (name, flag)
    if "-o" in options:
        assert options["-o"] is options["--output"]
    if "--bits" in options:
        assert options["--bits"].metavar == "W[/A]"
    help_text = p.format_help()
    for flag in VOCABULARY & set(options):
        assert flag in help_text
    assert "(default: None)" not in help_text


def test_export_and_lowbit_export_are_one_command():
    assert set(_options(_commands()["export"])) == set(_options(cli.export_parser()))


@pytest.mark.parametrize("text,expected", [("2", (2, 4)), ("4", (4, 4)), ("8", (8, 8)),
                                           ("2/8", (2, 8)), ("4/2", (4, 2))])
def test_bits_w_over_a(text, expected):
    assert _base.resolved_bits(_base.bits(text)) == expected  # --bits 8 is W8A8


@pytest.mark.parametrize("text", ["3", "2/3", "ternary", "8/", "/4", "16"])
def test_bits_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="W or W/A"):
        _base.bits(text)


def _without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` where torch, onnx and brevitas cannot be imported (the edge install)."""
    block = ("import sys\nfor m in ('torch', 'onnx', 'brevitas', 'qonnx', 'sklearn', 'tqdm'):\n"
             "    sys.modules[m] = None\n")
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_missing_arguments_are_reported_together_before_torch_loads():
    r = _without_torch("from lowbit.cli import main\nmain(['distill'])")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "--teacher" in line and "-o/--output" in line
    r = _without_torch("from lowbit.cli import main\nmain(['distill', '--teacher', 't.pt', "
                       "'-o', 's.pt', '--bits', '3'])")
    assert r.returncode == 2 and "expected W or W/A" in r.stderr
    r = _without_torch("from lowbit.cli import export_main\nsys.exit(export_main(['s.pt']))")
    assert r.returncode == 2 and "--data SPEC" in r.stderr and "--verify-data random" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["models"], ["train", "--help"], ["eval", "s.pt"],
                                  ["footprint", "m.pt"]])
def test_edge_install_names_the_extra(argv):
    r = _without_torch(f"from lowbit.cli import main\nsys.exit(main({argv!r}))")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "pip install 'lowbit[train]'" in line, line
    assert "bug" not in line


def test_cli_reference_is_the_help_text():
    """docs/cli.md is generated from --help (python docs/cli_reference.py > docs/cli.md)."""
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "cli_reference.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (ROOT / "docs" / "cli.md").read_text() == r.stdout, \
        "docs/cli.md is stale: python docs/cli_reference.py > docs/cli.md"


def test_footprint_takes_shipped_names_and_arch(capsys):
    """A shipped checkpoint's name works wherever a checkpoint path does, footprint included."""
    assert cli.main(["footprint", "resnet20_cifar10_ternary", "--batch-size", "1", "--bits",
                     "2/4"]) == 0
    out = capsys.readouterr().out
    assert "weights vs activations" in out and "2/4" in out
    assert cli.main(["footprint", "resnet20", "--input-shape", "3", "32", "32",
                     "--arch-kwargs", '{"num_classes": 100}', "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    fc = [layer for layer in doc["as_is"]["layers"] if layer["name"] == "fc"]
    assert fc and fc[0]["params"] == 64 * 100 + 100  # the registered model built with the kwargs


def test_nbits_options_build_the_library_config():
    from lowbit.cli import _export
    from lowbit.export import NBits

    args = cli.export_parser().parse_args(["s.pt", "--linear-kernel", "nbits", "--nbits-block",
                                           "32", "--lut-gemm", "--verify-data", "random"])
    assert args.linear_kernel == "nbits"
    assert _export._nbits(args) == NBits(block_size=32, lut_gemm=True)
    assert _export._nbits(cli.export_parser().parse_args(["s.pt"])) == NBits()
