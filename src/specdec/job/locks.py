"""Lock files: opened without following links, held with `fcntl.flock`, naming their holder.

A lock file sits in a folder others may write to (a shared GPU lock folder, a results folder),
so it is opened as a plain file of that name or not at all: a symbolic link there (someone
pointing the name at a file of yours) is refused, and so are a FIFO, a device and a hard link
to another file. Nothing is chmod-ed: a new lock file gets the mode the umask gives it. The
kernel drops a flock when its holder exits, however it exits (SIGKILL included).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import IO


class LockRefused(ValueError):
    """A lock file or its folder is not safe to use; the message says which and why."""


def safe_folder(folder: Path) -> int:
    """An open descriptor of `folder` (made if missing, mode 0755 less the umask) that only
    you or root can fill: refused when it belongs to another user, or when group or others
    may write to it without the sticky bit (/tmp's bit: then no one replaces your files)."""
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    info = os.fstat(fd)
    problem = None
    if info.st_uid not in (os.getuid(), 0):
        problem = f"belongs to uid {info.st_uid}, not to you (uid {os.getuid()}) or root"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        problem = f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o}) without the sticky bit"
    if problem is not None:
        os.close(fd)
        raise LockRefused(f"lock folder {folder} {problem}: someone else could plant links to your files in it")
    return fd


def open_lock(folder_fd: int, folder: Path, name: str) -> IO[str]:
    """The lock file `name` in `folder` (open as `folder_fd`), created if missing. Another
    user's lock file that you may not write is opened to read: a flock needs no more, but
    then you cannot leave your name in it."""
    shown_as = folder / name
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO must not hang the open
    try:
        try:
            fd, mode = os.open(name, os.O_RDWR | flags, 0o666, dir_fd=folder_fd), "r+"
        except PermissionError:
            fd, mode = os.open(name, os.O_RDONLY | flags, 0o666, dir_fd=folder_fd), "r"
    except OSError as error:
        reason = "is a symbolic link" if error.errno == errno.ELOOP else f"cannot be opened: {error.strerror}"
        raise LockRefused(f"lock file {shown_as} {reason}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a plain file"
        raise LockRefused(f"lock file {shown_as} {what}")
    return os.fdopen(fd, mode, encoding="utf-8", errors="replace")


def try_lock(handle: IO[str]) -> bool:
    """Take the lock without waiting: False if another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def sign(handle: IO[str], label: str) -> None:
    """Write `pid=PID LABEL` into a lock you hold (when it is yours to write), so that a
    process that finds it held can say who holds it."""
    if handle.writable():
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()} {label}\n")
        handle.flush()


def holder(handle: IO[str]) -> str:
    """What the holder of a held lock wrote into it (a holder that could not write it
    leaves an earlier holder's words)."""
    handle.seek(0)
    return handle.read(200).strip() or "unknown"
