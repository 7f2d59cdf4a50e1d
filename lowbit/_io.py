"""Safe file writes: outputs never clobber inputs or non-files, and a write is all or nothing.

Each file is written to a temp file beside its target, fsynced and renamed over it, so a crash
or an interrupt leaves either the old file or the new one, and no temp file. Several files
written as one (an ONNX + QONNX pair) are committed together: a failure between their renames
puts the old files back. An output's directory must exist and be writable before any work
starts, and the operating system's refusals (a full disk, a read-only filesystem, no
permission) are :class:`OutputError` lines that name the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .errors import OutputError

Writer = Callable[[Path], None]


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (any spelling, links, hard links)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# What the OS says when an output cannot be written: the user's disk or permissions, not a bug.
_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                       errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
                       errno.ENAMETOOLONG, errno.ETXTBSY})


def os_refusal(path: str | Path, exc: OSError) -> OutputError:
    """One line for an operating-system refusal to write ``path`` (ENOSPC, EROFS, ...)."""
    what = exc.strerror or os.strerror(exc.errno or 0)
    hint = {errno.ENOSPC: "free some space or write elsewhere",
            errno.EDQUOT: "free some space or write elsewhere",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)"}
    more = hint.get(exc.errno, "choose another output path")
    return OutputError(f"{path}: cannot write it: {what} [{errno.errorcode.get(exc.errno, '?')}]"
                       f"; {more}")


def _check_directory(path: Path) -> None:
    """The directory ``path`` goes into exists and this process may create files there."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a directory; expected an existing "
                          f"directory for the output")
    if not parent.is_dir():
        raise OutputError(f"{path}: its directory {parent} does not exist; expected an "
                          f"existing directory (create it first: mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):  # also EROFS and chattr +i, even for root
        raise OutputError(f"{path}: cannot write into {parent} (read-only or no permission); "
                          f"choose another output path")


def check_writable(path: str | Path) -> Path:
    """Refuse a target that a rename would replace by a regular file: a symlink, a directory,
    a device or a FIFO (writing there would destroy the link or lose the data), or that
    cannot be written at all: a missing or read-only directory."""
    path = Path(path)
    _check_directory(path)
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
    rename, and a failure between the renames (an unreplaceable target, a signal) puts the
    replaced files back, so a failure (or Ctrl-C) anywhere leaves all old files and no temp
    file. An OS refusal (full disk, read-only, ...) is an :class:`OutputError`."""
    paths = [check_writable(p) for p in writes]
    tmps: list[Path] = []
    olds: dict[Path, Path] = {}  # target -> a link to its old file, kept until all renames
    renamed: list[Path] = []
    current = paths[0] if paths else Path()
    try:
        for path, write in zip(paths, writes.values(), strict=True):
            current = path
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
            current = path
            if len(paths) > 1 and path.exists():
                olds[path] = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
                _link_or_copy(path, olds[path])
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException as exc:
        for path in reversed(renamed):  # undo the renames done: the old file, or none
            if path in olds:
                os.replace(olds.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError) \
                and exc.errno in _REFUSALS:
            raise os_refusal(current, exc) from None
        raise
    finally:
        for old in olds.values():
            old.unlink(missing_ok=True)
    return paths


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no data copied), or a copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def write_json(path: str | Path, obj: object) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


@contextlib.contextmanager
def output_lock(outputs: Iterable[str | Path | None]) -> Iterator[None]:
    """Hold a lock on each output for the whole command, so that a second process given the
    same output is refused at once instead of racing to replace the first one's result.

    The lock is ``flock`` on ``.NAME.lock`` beside the output (released by the OS when the
    process dies), removed on exit; where ``fcntl`` is missing (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    held: list[tuple[Path, int]] = []
    try:
        for out in dict.fromkeys(Path(p).expanduser().resolve() for p in outputs
                                 if p is not None):
            lock = out.with_name(f".{out.name}.lock")
            while True:
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
                except OSError as exc:
                    raise os_refusal(out, exc) from None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise OutputError(f"{out}: another lowbit process (pid {pid}) is writing "
                                      f"it; wait for it to finish or choose another output "
                                      f"path") from None
                try:  # the holder may have removed the file between our open and flock
                    same = os.fstat(fd).st_ino == os.stat(lock).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            held.append((lock, fd))
        yield
    finally:
        for lock, fd in reversed(held):
            lock.unlink(missing_ok=True)  # before unlocking: a waiter then retries a new file
            os.close(fd)
