"""Filesystem driver: every path lives under one root directory.

Durability: content and metadata writes go to a temporary name in the same directory, are
fsynced, renamed into place, and the directory is fsynced, so a crash leaves either the old or
the new file, never a partial one. Blocking syscalls run in the default thread executor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO, Final, TypeVar

from .base import FileInfo, InvalidOffset, InvalidPath, NotRegularFile, PathNotFound

__all__ = ["FilesystemDriver", "fsync_dir"]

_T = TypeVar("_T")

#: Temporary files carry this prefix; nothing the store names starts with '.'.
TMP_PREFIX: Final = ".tmp-"
_SESSION_PREFIX: Final = TMP_PREFIX + "session-"
#: Pieces per writev(2) call (Linux allows 1024).
_IOV_MAX: Final = 512


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _run(func: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


class FilesystemDriver:
    """``strict``: for a tree that came from elsewhere (an OCI layout to import), whose paths
    must not lead out of it: reads refuse any path through a symlink and anything but a
    regular file (a device or a FIFO would be read forever or block), with ``NotRegularFile``."""

    name = "filesystem"

    def __init__(self, root: str, *, strict: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.strict = strict
        os.makedirs(self.root, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

    def _full(self, path: str) -> str:
        parts = path.split("/")
        if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise InvalidPath(path)
        full = os.path.join(self.root, *parts)
        if self.strict and os.path.realpath(full) != os.path.join(self._real_root, *parts):
            raise NotRegularFile(f"{full} is or passes through a symbolic link")
        return full

    def _open_read(self, full: str) -> BinaryIO:
        if not self.strict:
            return open(full, "rb")
        # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotRegularFile(f"{full} is not a regular file")
        return os.fdopen(fd, "rb")

    def local_path(self, path: str) -> str | None:
        return self._full(path)

    async def stat(self, path: str) -> FileInfo:
        full = self._full(path)
        try:
            st = await _run(os.stat, full)
        except FileNotFoundError:
            raise PathNotFound(path) from None
        except NotADirectoryError:
            raise PathNotFound(path) from None
        return FileInfo(path, st.st_size, st.st_mtime, os.path.isdir(full))

    async def get_content(self, path: str, limit: int) -> bytes:
        full = self._full(path)

        def read() -> bytes:
            with self._open_read(full) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise ValueError(f"{path} is larger than {limit} bytes")
            return data

        try:
            return await _run(read)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise PathNotFound(path) from None

    async def put_content(self, path: str, data: bytes) -> None:
        full = self._full(path)
        await _run(_atomic_write, full, data)

    async def reader(
        self, path: str, offset: int = 0, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        full = self._full(path)
        try:
            f: BinaryIO = await _run(self._open_read, full)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise PathNotFound(path) from None
        try:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                raise InvalidOffset(f"{path}: offset {offset} > size {size}")
            f.seek(offset)
            while True:
                chunk = await _run(f.read, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    def writer(self, path: str, *, append: bool = False, hasher: Any = None) -> _FileWriter:
        return _FileWriter(self._full(path), append=append, hasher=hasher)

    async def list(self, path: str) -> list[str]:
        full = self._full(path)
        try:
            names = await _run(os.listdir, full)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        return sorted(n for n in names if not n.startswith(TMP_PREFIX))

    async def move(self, src: str, dst: str) -> None:
        s, d = self._full(src), self._full(dst)

        def move() -> None:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            try:
                os.replace(s, d)
            except FileNotFoundError:
                raise PathNotFound(src) from None
            fsync_dir(os.path.dirname(d))

        await _run(move)

    async def delete(self, path: str) -> None:
        full = self._full(path)

        def delete() -> None:
            try:
                if os.path.isdir(full) and not os.path.islink(full):
                    # rename first so a concurrent reader never sees a half-deleted tree
                    doomed = f"{full}{TMP_PREFIX}deleting-{uuid.uuid4().hex}"
                    os.rename(full, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
                else:
                    os.unlink(full)
            except FileNotFoundError:
                raise PathNotFound(path) from None

        await _run(delete)

    async def walk(self, path: str) -> AsyncIterator[FileInfo]:
        full = self._full(path)
        if not await _run(os.path.isdir, full):
            raise PathNotFound(path)

        def scan(directory: str) -> list[tuple[str, bool, int, float]]:
            out = []
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if entry.name.startswith(TMP_PREFIX):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                            out.append((entry.name, entry.is_dir(), st.st_size, st.st_mtime))
                        except FileNotFoundError:
                            continue
            except (FileNotFoundError, NotADirectoryError):
                pass
            return sorted(out)

        stack = [path]
        while stack:
            rel = stack.pop()
            entries = await _run(scan, self._full(rel))
            for name, is_dir, size, mtime in entries:
                child = f"{rel}/{name}"
                yield FileInfo(child, size, mtime, is_dir)
            stack.extend(f"{rel}/{n}" for n, d, _, _ in reversed(entries) if d)


def _atomic_write(full: str, data: bytes) -> None:
    directory = os.path.dirname(full)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, full)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


class _FileWriter:
    """Writes to ``<dir>/.tmp-session-<name>`` (hidden from ``list`` and ``walk``, found again
    by ``append``) and renames it onto ``<dir>/<name>`` at commit."""

    def __init__(self, full: str, *, append: bool, hasher: Any) -> None:
        self._full = full
        directory, base = os.path.split(full)
        self._partial = os.path.join(directory, _SESSION_PREFIX + base)
        self._append = append
        self._hasher = hasher
        self._fd: int | None = None
        self._size = 0
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self._partial), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT
        flags |= os.O_APPEND if self._append else os.O_TRUNC
        self._fd = os.open(self._partial, flags, 0o644)
        self._size = os.fstat(self._fd).st_size

    async def open(self) -> None:
        if self._fd is None:
            await _run(self._open)

    def _write(self, pieces: list[bytes]) -> None:
        """writev(2) the pieces without joining them, then feed the hasher."""
        assert self._fd is not None
        views = [memoryview(p) for p in pieces if p]
        while views:
            batch = views[:_IOV_MAX]
            try:
                n = os.writev(self._fd, batch)
            except InterruptedError:
                continue
            except OSError as e:  # ENOSPC, EFBIG, EIO: say where (writev does not)
                if e.filename is None:
                    e.filename = self._partial
                raise
            while n:  # drop what was written, keep the rest of a partly written piece
                if n >= len(views[0]):
                    n -= len(views.pop(0))
                else:
                    views[0] = views[0][n:]
                    n = 0
        if self._hasher is not None:
            for piece in pieces:
                self._hasher.update(piece)

    async def write(self, data: bytes | list[bytes]) -> None:
        if self._done:
            raise ValueError("write after commit or cancel")
        await self.open()
        pieces = data if isinstance(data, list) else [data]
        await _run(self._write, pieces)
        self._size += sum(len(p) for p in pieces)

    def _finish(self, rename: bool) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        if rename:
            os.replace(self._partial, self._full)
            fsync_dir(os.path.dirname(self._full))

    async def commit(self) -> None:
        if self._done:
            raise ValueError("commit after commit or cancel")
        await _run(self._finish, True)
        self._done = True

    async def close(self) -> None:
        if self._done:
            return
        await _run(self._finish, False)
        self._done = True

    async def cancel(self) -> None:
        if self._done:
            return
        self._done = True

        def cancel() -> None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                os.unlink(self._partial)
            except FileNotFoundError:
                pass

        await _run(cancel)

    async def __aenter__(self) -> _FileWriter:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()
