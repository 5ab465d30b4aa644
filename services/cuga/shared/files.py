"""Owner-only directories and files, whatever the process umask.

Everything cuga writes (the data directory, SQLite databases and their ``-wal``/``-shm``
files, audit files, spill files, the worker sandbox, tokens, keys and certificates) is
made with these helpers: directories 0700, files 0600. New paths are created with that
mode and then ``chmod``-ed to it, since the umask can only take bits away and a library
must not change the process umask for everyone else. An existing path that other users
can read or write (an install made before this, a directory made by hand) loses its
group and other bits, and a WARNING names it once: after the change there is nothing left
to tighten, so nothing is logged again. Only regular files and directories are changed;
a device or pipe given as an output (``/dev/stdout``) is left alone.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("cuga.files")

#: Mode of every directory cuga creates.
PRIVATE_DIR = 0o700
#: Mode of every file cuga creates.
PRIVATE_FILE = 0o600
#: Permission bits that let other users (group or world) in.
_OTHERS = 0o077


def _tighten_mode(path: Path, st: os.stat_result, chmod: Callable[[int], None]) -> None:
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return
    mode = stat.S_IMODE(st.st_mode)
    if not mode & _OTHERS:
        return
    tight = mode & ~_OTHERS
    try:
        chmod(tight)
    except PermissionError as exc:
        # Not ours (a shared parent such as /tmp): nothing we may change; say so.
        log.warning(
            "%s is open to other users (mode %04o) and could not be made owner-only: %s",
            path,
            mode,
            exc.strerror,
        )
        return
    log.warning("%s was open to other users (mode %04o); made owner-only (%04o)", path, mode, tight)


def tighten(path: str | Path) -> None:
    """Take group and other permissions off an existing file or directory (no-op if absent).

    Logs a WARNING naming the path when it changed something.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    _tighten_mode(path, st, lambda mode: os.chmod(path, mode))


def private_dir(path: str | Path) -> Path:
    """Make ``path`` an owner-only directory (0700), with any missing parents likewise.

    Parents that already exist are left as they are (a home directory, ``/var/lib``),
    except that ``path`` itself, if it exists, is tightened (:func:`tighten`).

    Returns:
        ``path``.

    Raises:
        OSError: a directory cannot be created (or ``path`` is a file).
    """
    path = Path(path)
    missing: list[Path] = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    if not missing:
        tighten(path)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR)
        except FileExistsError:
            tighten(folder)  # another process made it at the same moment
            continue
        os.chmod(folder, PRIVATE_DIR)  # the umask may have taken owner bits too
    return path


def private_file(path: str | Path) -> Path:
    """Make sure ``path`` exists as an owner-only file: a new, empty one 0600, an existing
    one tightened. For files another library opens by name (SQLite).

    Returns:
        ``path``.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        tighten(path)
        return path
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path


def open_private(path: str | Path, mode: str = "a", *, encoding: str | None = None) -> IO[Any]:
    """``open(path, mode)`` for writing, creating the file 0600 (an existing one is
    tightened first). The file object's ``name`` is ``path``, as with :func:`open`.

    Args:
        path: the file.
        mode: ``a``/``w`` (append / truncate), with ``b`` for binary.
        encoding: text encoding (text modes only).

    Raises:
        ValueError: another mode.
        OSError: the file cannot be opened.
    """
    if mode.replace("b", "") not in ("a", "w"):
        raise ValueError(f"open_private mode must be a, ab, w or wb, not {mode!r}")
    path = Path(path)

    def opener(name: str, flags: int) -> int:
        fd = os.open(name, flags, PRIVATE_FILE)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.fchmod(fd, PRIVATE_FILE)  # new (or empty): exactly 0600, whatever the umask
            else:
                _tighten_mode(path, st, lambda m: os.fchmod(fd, m))
        except BaseException:
            os.close(fd)
            raise
        return fd

    return open(path, mode, encoding=encoding, opener=opener)


def write_private(path: str | Path, data: bytes | str) -> None:
    """Replace ``path``'s content with ``data`` in a new owner-only file.

    The data goes to a temporary file beside it, is fsynced and renamed into place, so a
    reader never sees half of it and the result is 0600 even when the old file was not.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, PRIVATE_FILE)
        f.write(payload)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)


__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "open_private",
    "private_dir",
    "private_file",
    "tighten",
    "write_private",
]
