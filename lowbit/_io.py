"""Safe file writes: outputs never clobber inputs or non-files, and a write is all or nothing.

Each file is written to a temp file beside its target, fsynced and renamed over it, so a crash
or an interrupt leaves either the old file or the new one, and no temp file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .errors import OutputError

Writer = Callable[[Path], None]


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (any spelling, links, hard links)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_writable(path: str | Path) -> Path:
    """Refuse a target that a rename would replace by a regular file: a symlink, a directory,
    a device or a FIFO (writing there would destroy the link or lose the data)."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; lowbit writes regular files only "
                          f"(give the link's target, {path.resolve()}, or another path)")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device or FIFO)"
        raise OutputError(f"{path}: is {kind}; give a file path for the output")
    return path


def check_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None] = (),
                  *, overwrite: bool = True, hint: str = "pass --overwrite to replace it"
                  ) -> None:
    """Refuse outputs that would destroy something: an input (compared as resolved paths),
    another output, a non-regular file, or (``overwrite=False``) any existing file."""
    outs = [Path(p).expanduser() for p in outputs if p is not None]
    ins = [Path(p).expanduser() for p in inputs if p is not None]
    for i, out in enumerate(outs):
        check_writable(out)
        for src in ins:
            if _same_file(out, src):
                raise OutputError(f"{out}: output would overwrite the input {src}; choose another "
                                  f"output path")
        for other in outs[:i]:
            if _same_file(out, other):
                raise OutputError(f"{out}: two outputs would be written to the same file; "
                                  f"choose another output path")
        if not overwrite and out.exists():
            raise OutputError(f"{out}: already exists; {hint}")


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` over ``path``: a crash leaves no half file."""
    return atomic_write_all({path: write})[0]


def atomic_write_all(writes: Mapping[str | Path, Writer]) -> list[Path]:
    """Write several files as one: every temp file is written and synced before the first
    rename, so a failure (or Ctrl-C) while writing leaves all old files and no temp file."""
    paths = [check_writable(p) for p in writes]
    tmps: list[Path] = []
    try:
        for path, write in zip(paths, writes.values(), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            # listed before it exists: an interrupt (SIGTERM, Ctrl-C) landing right after the
            # create must still find it to remove
            tmps.append(tmp)
            try:
                # O_EXCL: never an existing file; mode 0o666 less the umask, as open() gives
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                tmps.pop()  # somebody else's file: not ours to remove
                raise
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    return paths


def write_json(path: str | Path, obj: object) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))
