"""The storage driver contract: bytes at paths, nothing else.

Paths are ``/``-separated, relative, produced only by ``storage.paths`` (never from user input
directly). Drivers know nothing of digests, repositories or HTTP. Every backend runs the one
conformance suite in ``tests/test_driver.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DriverError",
    "PathNotFound",
    "InvalidPath",
    "InvalidOffset",
    "FileInfo",
    "FileWriter",
    "StorageDriver",
]


class DriverError(Exception):
    """Base of driver errors."""


class PathNotFound(DriverError):
    """Nothing exists at the path."""


class InvalidPath(DriverError):
    """The path is malformed (absolute, empty segment, '.' or '..')."""


class NotRegularFile(DriverError):
    """A strict driver found a symlink, device, FIFO or socket where a file was read."""


class InvalidOffset(DriverError):
    """A read offset lies beyond the end of the file."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    size: int
    mtime: float
    is_dir: bool


class FileWriter(Protocol):
    """A write session on one path. Content written is invisible at the path until ``commit``.

    Use as ``async with``: leaving the block without ``commit`` cancels. ``cancel`` is
    idempotent and safe after ``commit`` (then it does nothing).
    """

    @property
    def size(self) -> int:
        """Bytes in the session so far, including those present when it was resumed."""
        ...

    async def open(self) -> None:
        """Prepare the session (idempotent); afterwards ``size`` is the resumed size."""
        ...

    async def write(self, data: bytes | list[bytes]) -> None:
        """Append ``data`` (a list of pieces is written in order without being joined). If the
        writer was made with ``hasher``, it is updated with the same bytes, in the same worker
        thread as the write, off the event loop."""
        ...

    async def commit(self) -> None:
        """Make the content durable (fsync) and visible at the path, atomically."""
        ...

    async def close(self) -> None:
        """Make the content so far durable but keep the session resumable (``append=True``)."""
        ...

    async def cancel(self) -> None:
        """Discard the session; the path keeps what it had before."""
        ...

    async def __aenter__(self) -> FileWriter: ...

    async def __aexit__(self, *exc: object) -> None: ...


class StorageDriver(Protocol):
    """Bytes at paths. Every method raises ``InvalidPath`` for a malformed path."""

    name: str

    async def stat(self, path: str) -> FileInfo:
        """Size, mtime and kind of ``path``; ``PathNotFound`` if absent."""
        ...

    async def get_content(self, path: str, limit: int) -> bytes:
        """The whole file, for small metadata only; ``PathNotFound`` if absent, ``ValueError``
        if it is larger than ``limit``."""
        ...

    async def put_content(self, path: str, data: bytes) -> None:
        """Replace the file atomically (readers see the old or the new bytes, never a mix)."""
        ...

    def reader(self, path: str, offset: int = 0, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Chunks from ``offset`` to the end of the file; ``PathNotFound`` if absent,
        ``InvalidOffset`` if ``offset`` is past the end."""
        ...

    def writer(self, path: str, *, append: bool = False, hasher: Any = None) -> FileWriter:
        """A write session for ``path``. With ``append`` a session left by ``close`` resumes at
        its end; without, any earlier uncommitted session for the path is discarded."""
        ...

    async def list(self, path: str) -> list[str]:
        """Names (not paths) of the direct children of directory ``path``, sorted;
        ``PathNotFound`` if it does not exist."""
        ...

    async def move(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst``, replacing ``dst``; creates parents."""
        ...

    async def delete(self, path: str) -> None:
        """Remove a file or a whole directory tree; ``PathNotFound`` if absent."""
        ...

    def walk(self, path: str) -> AsyncIterator[FileInfo]:
        """Every file and directory below ``path`` (not ``path`` itself), parents first."""
        ...

    def local_path(self, path: str) -> str | None:
        """A filesystem path the server may ``sendfile`` from, or None if the backend is not a
        local filesystem. The file may vanish later; callers stat it when they open it."""
        ...
