"""Temporary files and folders that become the lab's files by an atomic rename.

``tempfile.mkdtemp`` / ``mkstemp`` create owner-only entries (0700 / 0600) on purpose; renamed
into place they would keep those modes, and a technician's or a pipeline's account could not
read the plate files or crops. These give them the modes an ordinary ``mkdir`` / ``open`` would
(0777 / 0666 less the process umask) as soon as they exist.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` where there is one (reading it changes nothing,
    so other threads are unaffected), else by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """An empty folder in ``parent`` with a unique name starting ``prefix``, mode as ``mkdir`` gives
    (the setgid bit a shared group folder passes on is kept)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    special = os.stat(path).st_mode & 0o7000
    os.chmod(path, special | (0o777 & ~current_umask()))
    return path


def make_temp_file(parent: str | Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``(fd, path)`` of a new empty file in ``parent``, mode as ``open(..., 'w')`` gives."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, path


def naming_path(exc: OSError, path: str | Path) -> OSError:
    """``exc`` again with ``path`` in its message: pyarrow's "No space left on device" names no file."""
    if exc.errno is None:
        return OSError(f"cannot write {path}: {exc}")
    return OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}")


def write_files_atomically(writers: dict[Path, Callable[[str], object]]) -> None:
    """``writers[path](tmp)`` writes each file to a temporary beside it (a unique name, the mode
    ``open`` would give); the targets are replaced only when all are written, so a failure leaves
    the earlier files together (never new images beside old metadata) and no temporary behind."""
    temps: dict[Path, str] = {}
    try:
        for path, write in writers.items():
            fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temps[path] = tmp
            write(tmp)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
