"""Timing and memory measurement for the runtime benchmark (standard library + numpy only)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Timing:
    """One benchmark row: batch size, median and 90th-percentile latency, images per second."""

    batch: int
    latency_ms: float
    p90_ms: float
    throughput: float
    runs: int

    @classmethod
    def from_times(cls, batch: int, seconds: Sequence[float]) -> Timing:
        t = np.asarray(seconds) * 1e3
        med = float(np.median(t))
        return cls(batch, med, float(np.percentile(t, 90)), batch / med * 1e3, len(t))

    def to_dict(self) -> dict:
        return asdict(self)


def time_calls(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 20,
               min_time: float = 0.5) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then at least ``repeat`` timed
    calls and at least ``min_time`` seconds in all (short calls get more samples)."""
    if warmup < 0 or repeat < 1 or min_time < 0:
        raise UsageError(f"expected warmup >= 0, repeat >= 1, min_time >= 0; got {warmup}, "
                         f"{repeat}, {min_time}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def resident_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; else the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def markdown_table(rows: Sequence[Timing]) -> str:
    """The benchmark rows as a markdown table."""
    lines = ["| batch | latency ms (median) | p90 ms | images/s | runs |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.batch} | {r.latency_ms:.3f} | {r.p90_ms:.3f} | {r.throughput:,.0f} | "
              f"{r.runs} |" for r in rows]
    return "\n".join(lines)
