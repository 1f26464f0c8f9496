"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. A
    process killed inside the block leaves at most a ``.<name>.*.tmp`` file behind.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename, and a model saved for a
    # service running as another user must be readable by it (the umask decides).
    # The file is created inside the try: a signal (Ctrl-C, SIGTERM) that lands just after
    # its creation removes it too.
    tmp: str | None = None
    try:
        while True:
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:  # another's file: never ours to remove
                tmp = None
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def check_destination(path: str, what: str, example: str) -> str:
    """Refuse a file destination that cannot be written, before any work is done:
    ``path`` a folder, in a folder that does not exist, or in one not writable.
    ``what`` names it in the message (``--output``); ``example`` is a file name to
    suggest inside a folder. Returns the folder."""
    from .errors import ConfigError

    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a folder; give a file path inside it, e.g. "
                          f"{os.path.join(path, example)!r}.")
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {path!r}: the folder {folder!r} does not exist; create it "
                          f"first (mkdir -p {folder}) or give another path.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{what} {path!r}: the folder {folder!r} is not writable; give "
                          "another path.")
    return folder


class LockBusy(OSError):
    """``file_lock(..., wait=False)`` found the lock held; ``holder`` is what its owner wrote."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path: str, *, wait: bool = True, note: str = "") -> Iterator[None]:
    """Exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block.

    wait: block until the lock is free; False raises LockBusy at once instead.
    note: written into the lock file while held (who holds it), for LockBusy's message.
    The lock file is removed on release, still under the lock, so no ``.lock`` is left
    beside the user's files. One writer is kept: a process that locked a file which was
    removed meanwhile (its inode is no longer the one at ``path``) tries again on the
    new one. The kernel drops the lock if the process dies (the file then stays, and
    the next holder removes it).
    """
    import fcntl

    while True:
        fh = open(path, "a+b")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                fh.seek(0)
                raise LockBusy(path, fh.read(200).decode("utf-8", "replace").strip()) from None
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fh.fileno()).st_ino:  # removed by its last holder: again
                fh.close()
                continue
        except BaseException:
            fh.close()
            raise
        break
    try:
        if note:
            fh.truncate(0)
            fh.write(note.encode())
            fh.flush()
        yield
    finally:
        try:
            os.unlink(path)  # under the lock: a waiter on this inode will see it gone
        except OSError:
            pass
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
