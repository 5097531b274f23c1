"""Writing files without losing any: the one write path under every file the tool writes.

- ``check_targets`` refuses, before any work, an output that is (by realpath) a protected
  file (the input, its external data), another output of the same command, a folder, or in
  a folder that is missing or not writable.
- ``staging`` is a temporary folder beside the target: files are written and checked there,
  then renamed into place (a rename within one folder is atomic). It is removed on failure,
  on SIGINT/SIGTERM (the CLI turns both into exceptions) and at exit; folders that killed
  runs left behind (their process is gone) are removed by the next run in that folder.
- Files get the input's mode, or 0644: ``mkstemp`` would make them 0600.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .errors import OutputError, UsageError

PREFIX = ".onnx-merge-"
_OWNER = "owner"  # inside each staging folder: "<host> <pid>", so only dead runs' folders are removed
_STAGING = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
DEFAULT_MODE = 0o644
_live: set[Path] = set()


def real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def check_targets(targets, protect=()) -> list[Path]:
    """The targets as Paths, or a UsageError naming the first one that must not or cannot be
    written. ``protect``: files no target may be (None entries are ignored in both)."""
    protected = {real(p): Path(p) for p in protect if p is not None}
    seen: dict[Path, Path] = {}
    checked = []
    for target in targets:
        if target is None:
            continue
        if str(target).strip() == "":
            raise UsageError("an output path is empty; name a file")
        path, resolved = Path(target), real(target)
        if resolved in protected:
            raise UsageError(f"{path}: is the input file {protected[resolved]}; refusing to overwrite it, "
                             "choose another output path")
        if resolved in seen:
            raise UsageError(f"{path}: named twice as an output of this command (also {seen[resolved]})")
        if path.is_dir():
            raise UsageError(f"{path}: is a folder; name a file inside it")
        if path.exists() and not path.is_file():
            raise UsageError(f"{path}: exists and is not a regular file")
        folder = resolved.parent
        if not folder.is_dir():
            raise UsageError(f"{path}: output folder {path.parent} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{path}: output folder {folder} is not writable")
        seen[resolved] = path
        checked.append(path)
    return checked


def mode_like(source: str | os.PathLike | None) -> int:
    """Permission bits for a new file: the source's, else 0644."""
    try:
        return os.stat(source).st_mode & 0o777 if source is not None else DEFAULT_MODE
    except OSError:
        return DEFAULT_MODE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


STALE_AFTER_S = 600  # a staging folder younger than this is never taken for a dead run's


def remove_stale(folder: Path) -> None:
    """Remove staging folders of this tool's earlier runs, on this host, whose process is gone
    and that nothing has touched for STALE_AFTER_S (a sweep's workers write side by side: a
    liveness check alone once took a working folder away under load)."""
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _STAGING.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or int(match.group(1)) == os.getpid():
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
        except OSError:  # gone meanwhile
            continue
        try:
            owner = (Path(entry.path) / _OWNER).read_text().split()
        except OSError:
            owner = None
        mine = owner == [host, match.group(1)] or (owner is None and not os.listdir(entry.path))
        if mine and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def staging(target: Path):
    """A temporary folder beside ``target``; always removed afterwards."""
    folder = real(target).parent
    remove_stale(folder)
    with os_errors(target):
        tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=folder))
    _live.add(tmp)
    try:
        (tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _live.discard(tmp)


def remove_live_staging() -> None:
    """Remove this process's staging folders (from a signal handler or at exit)."""
    for tmp in list(_live):
        shutil.rmtree(tmp, ignore_errors=True)
        _live.discard(tmp)


atexit.register(remove_live_staging)


@contextlib.contextmanager
def os_errors(path: str | os.PathLike):
    """OSError -> OutputError naming ``path`` and the cause (errno alone names neither)."""
    try:
        yield
    except OSError as exc:
        cause = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        if exc.filename and str(exc.filename) != str(path):  # the file the system named: a missing folder, say
            cause += f": {exc.filename}"
        raise OutputError(f"{path}: cannot write ({cause})") from None


def finish(path: Path, mode: int) -> None:
    """Give a staged file its mode and flush it to disk before it is renamed into place."""
    os.chmod(path, mode)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, protect=(), *, mode: int = DEFAULT_MODE) -> Path:
    """Write ``data`` to ``path`` all at once or not at all; never onto a ``protect``ed file."""
    (path,) = check_targets([path], protect)
    with os_errors(path), staging(path) as tmp:
        staged = tmp / "file"
        staged.write_bytes(data)
        finish(staged, mode)
        os.replace(staged, path)
        sync_folder(real(path).parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, protect=(), *, mode: int = DEFAULT_MODE) -> Path:
    return write_bytes_atomic(path, text.encode(), protect, mode=mode)
