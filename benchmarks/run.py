"""Run every benchmark of the project in one go and write one summary with the machine described.

Each benchmark runs as its own process with this Python, against its baselines in the same run
(float PyTorch, float ONNX in onnxruntime, onnxruntime's int8, Brevitas' QCDQ and QONNX
exports, Brevitas' default QAT quantizers); each writes ``benchmarks/results/<name>.{json,md}``.
Then ``benchmarks/results/summary.{json,md}`` collect them: the machine (CPU, cores, memory,
library versions, git commit, date) and one section per benchmark with its own markdown
table, its command, status and wall time. A benchmark that fails is reported as failed (with
the end of its output) and the run exits with status 1 after the others have run.

CIFAR-10 comes from ``--data DIR`` or ``$LOWBIT_DATA`` (the folder holding
``cifar-10-batches-py``); without it the CIFAR-only benchmark is skipped and the others use
random images of CIFAR shape where they need inputs.

    python benchmarks/run.py                        # full settings (~2 h on 2 cores)
    python benchmarks/run.py --quick                # small settings (~15 min), same tables
    python benchmarks/run.py --quick --only kd_digits footprint_resnet20
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from lowbit._backend import cpu_features
from lowbit._io import atomic_write, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEACHER = "lowbit/models/weights/resnet20_cifar10.pt"


@dataclass(frozen=True)
class Benchmark:
    """One command; ``{threads}``, ``{data}`` (cifar10:DIR) and ``{tmp}`` are filled in."""

    name: str
    args: tuple[str, ...]  # after ``python``
    results: tuple[str, ...]  # files it writes under results/; the .md ones go in the summary
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    with_data: tuple[str, ...] = ()  # added when CIFAR-10 is available
    needs_data: bool = False  # skipped without CIFAR-10


BENCHMARKS = (
    Benchmark("export_size", ("benchmarks/export_size.py", "--threads", "{threads}"),
              ("export_size.json", "export_size.md"), with_data=("--data", "{data}")),
    Benchmark("runtime_speed", ("benchmarks/runtime_speed.py", "--threads", "{threads}",
                                "--build-dir", "{tmp}"),
              ("runtime_speed.json", "runtime_speed.md"),
              quick=("--images", "1000", "--rounds", "2", "--min-time", "0.1"),
              with_data=("--data", "{data}")),
    Benchmark("train_speed", ("benchmarks/train_speed.py", "--threads", "{threads}"),
              ("train_speed.json", "train_speed.md"), full=("--steps", "8", "--rounds", "2"),
              quick=("--steps", "3", "--rounds", "1"), with_data=("--data", "{data}")),
    Benchmark("quant_speed", ("benchmarks/quant_speed.py", "--threads", "{threads}"),
              ("quant_speed.json", "quant_speed.md"), quick=("--rounds", "2")),
    Benchmark("kd_digits", ("benchmarks/kd_cifar10.py", "--data", "digits", "--threads",
                            "{threads}", "--batch-size", "64"),
              ("kd_digits.json", "kd_digits.md"), full=("--epochs", "4", "--seeds", "3"),
              quick=("--epochs", "2", "--seeds", "1")),
    Benchmark("kd_cifar10", ("benchmarks/kd_cifar10.py", "--data", "{data}", "--threads",
                             "{threads}", "--precision", "bf16"),
              ("kd_cifar10.json", "kd_cifar10.md"), full=("--epochs", "3"),
              quick=("--epochs", "1", "--limit", "2000", "--test-limit", "2000"),
              needs_data=True),
    Benchmark("quant_rules", ("benchmarks/quant_rules.py", "--threads", "{threads}"),
              ("quant_rules.json", "quant_rules.md"),
              quick=("--digits-float-epochs", "5", "--digits-epochs", "3", "--cifar-steps",
                     "30", "--cifar-val", "500"), with_data=("--data", "{data}")),
    Benchmark("your_models", ("benchmarks/your_models.py", "--threads", "{threads}"),
              ("your_models.json", "your_models.md"),
              quick=("--images", "64", "--rounds", "2", "--min-time", "0.05")),
    Benchmark("linear_kernels", ("benchmarks/linear_kernels.py", "--threads", "{threads}"),
              ("linear_kernels.json", "linear_kernels.md"), full=("--epochs", "2"),
              quick=("--sizes", "1024", "4096", "--rounds", "2", "--width", "1024",
                     "--epochs", "1")),
    Benchmark("ptq_digits", ("benchmarks/ptq_digits.py", "--threads", "{threads}"),
              ("ptq_digits.json", "ptq_digits.md")),
    Benchmark("footprint_check", ("benchmarks/footprint_check.py",),
              ("footprint_check.json", "footprint_check.md"), quick=("--batch", "1", "8")),
    Benchmark("footprint_resnet20", ("-m", "lowbit.cli", "footprint", TEACHER, "--batch-size",
                                     "1", "8", "--bits", "2/4", "32",
                                     "--json", "benchmarks/results/footprint_resnet20.json",
                                     "--plot", "benchmarks/results/footprint_resnet20.png"),
              ("footprint_resnet20.json", "footprint_resnet20.png")),
)


def machine() -> dict:
    """What the numbers were measured on: CPU, cores, memory, versions, commit, date."""
    cpu = cpu_features()
    versions = {}
    for pkg in ("lowbit", "torch", "onnxruntime", "brevitas", "onnx", "qonnx", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip() or None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu["cpu"], "cpu_features": cpu["flags"], "u8s8": cpu["u8s8"],
            "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                / 2**30, 1),
            "load_average": os.getloadavg()[0], "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "commit": f"{commit}{' + uncommitted changes' if dirty else ''}" if commit else None}


def run(command: list[str]) -> tuple[int, str]:
    """Run ``command`` with its output passed through live; returns (exit status, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks = []
    while chunk := os.read(proc.stdout.fileno(), 1 << 14):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def tail(output: str, n: int) -> str:
    """The last ``n`` non-empty lines of ``output`` as a terminal shows them (progress bars
    redrawn with carriage returns keep their last state)."""
    lines = [line.rsplit("\r", 1)[-1] for line in output.splitlines()]
    return "\n".join([line for line in lines if line.strip()][-n:])


def section(entry: dict) -> str:
    """The markdown section of one benchmark: status, time and command, then its own tables."""
    lines = [f"## {entry['name']}", ""]
    if "command" in entry:
        lines += [f"{entry['status']}, {entry['seconds']:.0f} s: "
                  f"`{' '.join(entry['command'])}`", ""]
    else:
        lines += [entry["status"], ""]
    if entry["status"] != "ok":
        return "\n".join(lines + (["```", entry["output_tail"], "```", ""]
                                  if entry.get("output_tail") else []))
    tables = [(RESULTS / f).read_text().strip() + "\n" for f in entry["results"]
              if f.endswith(".md")]
    if not tables:  # a command without a markdown report: what it printed
        tables = ["```", entry["output_tail"], "```", ""]
    return "\n".join(lines + tables + [f"![{f}]({f})\n" for f in entry["results"]
                                        if f.endswith(".png")])


def main() -> int:
    names = [b.name for b in BENCHMARKS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings (~15 min on 2 cores)")
    p.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                   help=f"run only these: {', '.join(names)}")
    p.add_argument("--data", default=os.environ.get("LOWBIT_DATA"),
                   help="folder holding cifar-10-batches-py (default: $LOWBIT_DATA)")
    p.add_argument("--threads", type=int, default=2, help="threads per benchmark (default 2)")
    args = p.parse_args()

    data = f"cifar10:{args.data}" if args.data else None
    mode = "quick" if args.quick else "full"
    report = {"mode": mode, "machine": machine(), "benchmarks": []}
    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        for i, bench in enumerate(selected, 1):
            entry: dict = {"name": bench.name, "results": list(bench.results)}
            report["benchmarks"].append(entry)
            if bench.needs_data and data is None:
                entry["status"] = "skipped (needs CIFAR-10: --data DIR or $LOWBIT_DATA)"
                print(f"[{i}/{len(selected)}] {bench.name}: {entry['status']}", flush=True)
                continue
            fill = {"threads": str(args.threads), "data": data or "", "tmp": tmp}
            extra = (bench.quick if args.quick else bench.full) + \
                (bench.with_data if data else ())
            command = [sys.executable, *[a.format(**fill) for a in bench.args + extra]]
            entry["command"] = ["python", *command[1:]]
            print(f"\n[{i}/{len(selected)}] {bench.name}: {' '.join(entry['command'])}",
                  flush=True)
            start = time.time()
            code, output = run(command)
            entry["seconds"] = time.time() - start
            stale = [f for f in bench.results
                     if not (RESULTS / f).is_file() or (RESULTS / f).stat().st_mtime < start]
            if code != 0 or stale:
                entry["status"] = f"FAILED (exit status {code})" if code else \
                    f"FAILED (did not write {', '.join(stale)})"
            else:
                entry["status"] = "ok"
            entry["output_tail"] = tail(output, 100)

    failed = [e["name"] for e in report["benchmarks"] if e["status"].startswith("FAILED")]
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    header = [f"# lowbit benchmarks ({mode} settings)", "",
              f"{m['date']}; {m['cpu']} ({', '.join(m['cpu_features']) or 'no AVX2'}), "
              f"{m['usable_cpus']} of {m['logical_cpus']} logical CPUs usable, "
              f"{m['memory_gib']} GiB; load average at the start {m['load_average']:.1f}; "
              f"{m['platform']}, Python {m['python']}; {versions}; commit {m['commit']}.", "",
              f"Regenerate: `python benchmarks/run.py{' --quick' if args.quick else ''}` "
              f"(CIFAR-10 from `$LOWBIT_DATA`); {args.threads} threads per benchmark.", ""]
    if failed:
        header += [f"**Failed: {', '.join(failed)}.**", ""]
    md = "\n".join(header + [section(e) for e in report["benchmarks"]])
    write_json(RESULTS / "summary.json", report)
    atomic_write(RESULTS / "summary.md", lambda path: path.write_text(md))
    print(f"\n-> {RESULTS / 'summary.md'}, {RESULTS / 'summary.json'}")
    for e in report["benchmarks"]:
        print(f"  {e['name']:20s} {e['status']}" +
              (f" ({e['seconds']:.0f} s)" if "seconds" in e else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
