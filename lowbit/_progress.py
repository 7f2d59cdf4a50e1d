"""Progress of long work: a bar on a terminal, one line per stage in a log.

Every loop of lowbit that takes seconds or more reports through :func:`bar`, on stderr: tqdm
draws a bar where stderr is a terminal; where it is not (a log, CI, a pipe) each stage ends
with one line naming it, its size and its time, so a long export or training run is never
silent there, and stdout keeps only results (``ACC=$(lowbit run ...)`` stays one line).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

_START = time.monotonic()  # stage lines show the time since lowbit was imported


def _logged() -> bool:
    return not sys.stderr.isatty()


def _line(text: str) -> None:
    print(f"[{time.monotonic() - _START:7.1f}s] {text}", file=sys.stderr, flush=True)


class _Stage:
    """A bar-like object (``update``/``close``, iterable) that prints one line at its end."""

    def __init__(self, iterable: Iterable | None, desc: str, unit: str, bar: Any) -> None:
        self.iterable, self.desc, self.unit, self.bar = iterable, desc, unit, bar
        self.n, self.t0, self.closed = 0, time.monotonic(), False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kwargs)

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.bar is None else self.bar:
            self.n += 1
            yield item
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if _logged():
            _line(f"{self.desc}: {self.n:,} {self.unit} in {time.monotonic() - self.t0:.1f}s")

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str,
        unit: str = "it", enabled: bool = True) -> _Stage:
    """Progress of one stage: a tqdm bar on a terminal (when tqdm is installed), a closing
    line off one; nothing at all when not ``enabled`` (``progress=False``, ``-q``)."""
    shown = None
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # the edge install has no tqdm
            tqdm = None
        if tqdm is not None:
            shown = tqdm(iterable, total=total, desc=desc, unit=unit, leave=False,
                         file=sys.stderr)
    stage = _Stage(iterable, desc, unit, shown)
    if not enabled:
        stage.closed = True  # silent
    return stage


def note(text: str, enabled: bool = True) -> None:
    """A line for the user that does not break a bar (tqdm's ``write`` where tqdm is)."""
    if not enabled:
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(text, flush=True)
        return
    tqdm.write(text)
