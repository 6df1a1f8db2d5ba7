"""Durable writes: files and directories that are either the old or the complete new version, even after a kill or
a power loss.

A file or directory is written under a temporary name next to its destination (`.NAME.tmp-PID-…`), flushed to
disk (fsync of every file and folder), then renamed over the destination and the parent folder fsynced. A
directory that already exists is swapped with renameat2(RENAME_EXCHANGE) on Linux, so its path never stops
pointing at a complete directory; elsewhere it is moved aside first (`.NAME.old-PID-…`) for the instant between
two renames. Temporary names start with "." and contain ".tmp-" or ".old-" (`is_temporary`), so the owner of a
folder can remove what a killed writer left.

A failed write raises OSError with the errno that caused it (`errno_of` finds it behind torch's and
safetensors' own exception types), so a full disk is reported as ENOSPC rather than as a serialisation error.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import re
import shutil
import sys
import uuid
from typing import Iterator, Optional, Union


def fsync_path(path: str) -> None:
    """Flushes a file or a directory (its entries: names created or renamed in it) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync of every file and folder under root, children before parents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def temporary_name(path: str, kind: str = "tmp") -> str:
    """A fresh hidden name next to `path`: .NAME.tmp-PID-RANDOM (kind "tmp") or .NAME.old-PID-RANDOM."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    """Whether a folder entry is a temporary of this module (or of the checkpoint writers before it)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def remove_temporaries(folder: str) -> list[str]:
    """Cleans up after killed writers (call it only while no writer can be active in `folder`): an old
    directory moved aside whose replacement never arrived is put back, every other temporary is removed.
    Returns the names removed or restored."""
    done = []
    if not os.path.isdir(folder):
        return done
    for name in sorted(os.listdir(folder)):
        if not is_temporary(name):
            continue
        path = os.path.join(folder, name)
        original = os.path.join(folder, name[1:].split(".old-")[0]) if ".old-" in name else None
        if original is not None and not os.path.lexists(original):
            os.rename(path, original)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        done.append(name)
    return done


def write_file(path: str, data: Union[str, bytes]) -> None:
    """Replaces the file at `path` by `data` atomically and durably."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


class _WriteErrorRecorder(io.RawIOBase):
    """A file wrapper that remembers the first OSError of a write: torch.save reports a failed write only as
    "unexpected pos …"."""

    def __init__(self, f):
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise


def torch_save(obj, path: str) -> None:
    """torch.save into a new file, fsynced; a failed write raises the OSError behind it."""
    import torch

    with open(path, "wb") as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
            f.flush()
        except Exception as e:
            if recorder.error is not None:
                raise recorder.error from e
            raise
        os.fsync(f.fileno())


_OS_ERROR_IN_TEXT = re.compile(r"(?:os error|Errno) (\d+)")


def errno_of(exc: BaseException) -> Optional[int]:
    """The errno behind a failed write: of an OSError in the exception's chain, or quoted in its message (the
    Rust I/O errors of safetensors say "(os error 28)")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        m = _OS_ERROR_IN_TEXT.search(str(exc))
        if m:
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths; False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_directory(src: str, dst: str) -> None:
    """Moves the complete directory `src` to `dst`, replacing what is there, and removes the old one."""
    parent = os.path.dirname(os.path.abspath(dst))
    old = None
    if not os.path.lexists(dst):
        os.rename(src, dst)
    elif _exchange(src, dst):
        old = src
    else:
        old = temporary_name(dst, "old")
        os.rename(dst, old)
        os.rename(src, dst)
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(dst: str) -> Iterator[str]:
    """Yields an empty temporary directory next to `dst`; when the block ends without an exception its files are
    flushed to disk and the directory replaces `dst` (replace_directory); otherwise it is removed."""
    tmp = temporary_name(dst)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
