"""Reading a file that must lie inside a root folder, checked on the opened descriptor, not on its path.

A path checked first and opened later can be swapped for a link (or a FIFO) in between. So the file is opened
first, without blocking, and what was opened is checked: a regular file whose real path, read back from the
descriptor, is inside the root. Whatever was swapped in before the open is what gets checked; whatever is
swapped in after it is not read.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
from pathlib import Path

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class ConfinedFileError(ValueError):
    """A file that is not a regular file inside its root folder; the message names the file, never the outside."""


class NotRegularFileError(OSError):
    """What was opened is a FIFO, device or folder (or a link to one), not a file to read."""


def open_regular(path: str | Path) -> int:
    """A descriptor of ``path`` (links followed), opened for reading without blocking, when what was opened is a
    regular file; else ``NotRegularFileError``, so a FIFO swapped in is refused, never waited on. The caller
    closes the descriptor."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file (a FIFO, device, folder or a link to one)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, links resolved, is ``root`` (links resolved) or inside it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def descriptor_path(fd: int, opened_as: str | Path) -> str:
    """The real path of the open file ``fd``: from ``/proc`` on Linux, ``F_GETPATH`` on macOS; elsewhere the
    path it was opened as, resolved, when that still names the same file (device and inode) as ``fd``."""
    proc = f"/proc/self/fd/{fd}"
    if os.path.islink(proc):
        return os.readlink(proc)
    if sys.platform == "darwin":
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_GETPATH, b"\0" * 1024).rstrip(b"\0").decode()
    real, opened = os.path.realpath(opened_as), os.fstat(fd)
    try:
        here = os.stat(real)
    except OSError:
        return ""
    return real if (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino) else ""


def open_confined(path: str | Path, root: str | Path, what: str = "file") -> int:
    """A descriptor of ``path``, opened for reading, when it is a regular file inside ``root``; else a
    ``ConfinedFileError`` (an ``OSError`` when it cannot be opened at all). FIFOs and devices are refused
    without blocking. The caller closes the descriptor."""
    name = Path(path).name
    try:
        fd = open_regular(path)
    except NotRegularFileError:
        raise ConfinedFileError(f"{what} {name} is not a regular file (a FIFO, device or folder); "
                                "replace it with the file itself") from None
    if not is_inside(descriptor_path(fd, path), root):
        os.close(fd)
        raise ConfinedFileError(f"{what} {name} leads outside its folder (a link, or swapped for one); "
                                "put the file itself inside the folder")
    return fd


def read_confined(path: str | Path, root: str | Path, what: str = "file") -> bytes:
    """The bytes of ``path``, read through ``open_confined``: exactly the file that was checked."""
    with os.fdopen(open_confined(path, root, what), "rb") as f:
        return f.read()


def confined_buffer(path: str | Path, root: str | Path, what: str = "file") -> io.BytesIO:
    """``read_confined`` as a seekable in-memory file, for readers that take a file object (PyAV)."""
    return io.BytesIO(read_confined(path, root, what))
