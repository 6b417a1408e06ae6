"""Blob upload sessions (distribution-spec "Pushing blobs": monolithic, POST+PUT, chunked).

A session is ``uploads/<id>/info`` (which repository it belongs to) and the bytes received so
far, kept resumable by the driver's write session. Any worker process can continue any session:
the running hash is cached in this process only while its length matches the bytes on disk;
otherwise the finished upload is re-hashed from the store before it is committed. Nothing
becomes visible in the blob pool until its digest and size were verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from . import paths
from .digest import Digest, validate_name
from .driver import FileWriter, PathNotFound
from .errors import DigestMismatch, SizeMismatch, UploadBusy, UploadOffsetInvalid, UploadUnknown

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Uploads", "WRITE_BATCH"]

#: Bytes gathered from the network before one write (and hash update) off the event loop.
WRITE_BATCH: Final = 1 << 20
#: Running hashes kept per process; the oldest are dropped beyond this (they can be rebuilt).
_MAX_CACHED_HASHES: Final = 1024
_UPLOAD_ID_CHARS: Final = frozenset("0123456789abcdef-")


def _try_flock(path: str) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if another request holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Uploads:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._driver = store.driver
        self._hashes: dict[str, tuple[int, Any]] = {}  # upload id -> (offset, sha256 state)

    async def start(self, name: str) -> str:
        """Open a new session for repository ``name``; returns its id."""
        validate_name(name)
        upload_id = str(uuid.uuid4())
        info = {"repository": name, "started": time.time()}
        await self._driver.put_content(paths.upload_info(upload_id), json.dumps(info).encode())
        return upload_id

    async def _check(self, name: str, upload_id: str) -> None:
        if not upload_id or not set(upload_id) <= _UPLOAD_ID_CHARS or len(upload_id) > 64:
            raise UploadUnknown(f"upload {upload_id!r} unknown")
        try:
            info = json.loads(await self._driver.get_content(paths.upload_info(upload_id), 4096))
        except (PathNotFound, ValueError):
            raise UploadUnknown(f"upload {upload_id} unknown") from None
        if info.get("repository") != name:
            raise UploadUnknown(f"upload {upload_id} unknown to repository {name}")

    @contextlib.asynccontextmanager
    async def _locked(self, name: str, upload_id: str) -> AsyncIterator[None]:
        """Exclusive use of a session by one request, across worker processes: a second PATCH
        or PUT on a session in use is refused rather than interleaved (their bytes would
        otherwise mix, or land after the digest check)."""
        await self._check(name, upload_id)
        path = self._driver.local_path(paths.upload_info(upload_id))
        if path is None:
            yield
            return
        loop = asyncio.get_running_loop()
        try:
            fd = await loop.run_in_executor(None, _try_flock, path)
        except FileNotFoundError:
            raise UploadUnknown(f"upload {upload_id} unknown") from None
        if fd is None:
            raise UploadBusy(f"upload {upload_id} is in use by another request")
        try:
            yield
        finally:
            os.close(fd)

    async def size(self, name: str, upload_id: str) -> int:
        """Bytes received so far."""
        await self._check(name, upload_id)
        writer = self._driver.writer(paths.upload_data(upload_id), append=True)
        try:
            await writer.open()
            return writer.size
        finally:
            await writer.close()

    async def append(
        self,
        name: str,
        upload_id: str,
        chunks: AsyncIterable[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> int:
        """Append a chunk. ``start`` (from Content-Range) must equal the bytes received so far;
        ``length`` (Content-Length) must equal the bytes that arrive. Returns the new size.
        On a size mismatch the bytes that did arrive are kept (the client sees the new size)."""
        async with self._locked(name, upload_id):
            return await self._append(upload_id, chunks, start, length)

    async def _append(
        self, upload_id: str, chunks: AsyncIterable[bytes], start: int | None, length: int | None
    ) -> int:
        cached = self._hashes.pop(upload_id, None)
        hasher = cached[1] if cached else hashlib.sha256()
        writer = self._driver.writer(paths.upload_data(upload_id), append=True, hasher=hasher)
        try:
            await writer.open()
            if start is not None and start != writer.size:
                raise UploadOffsetInvalid(
                    f"chunk starts at {start} but the upload holds {writer.size} bytes",
                    writer.size,
                )
            # The running hash is valid only if it covers exactly the bytes already on disk
            # (another worker may have appended since this process last saw the session).
            valid = writer.size == (cached[0] if cached else 0)
            received = await self._pump(chunks, writer)
            if valid:
                self._remember(upload_id, writer.size, hasher)
            if length is not None and received != length:
                raise SizeMismatch(f"received {received} bytes, Content-Length said {length}")
            return writer.size
        finally:
            await writer.close()

    async def _pump(self, chunks: AsyncIterable[bytes], writer: FileWriter) -> int:
        """Copy ``chunks`` to ``writer`` in batches of about ``WRITE_BATCH`` bytes."""
        received = 0
        batch: list[bytes] = []
        batched = 0
        async for chunk in chunks:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                await writer.write(batch)  # one thread hop, no copies: writev + hash there
                received += batched
                batch, batched = [], 0
        if batch:
            await writer.write(batch)
            received += batched
        return received

    def _remember(self, upload_id: str, offset: int, hasher: Any) -> None:
        if len(self._hashes) >= _MAX_CACHED_HASHES:
            self._hashes.pop(next(iter(self._hashes)))
        self._hashes[upload_id] = (offset, hasher)

    async def finish(
        self,
        name: str,
        upload_id: str,
        digest: Digest,
        chunks: AsyncIterable[bytes] | None = None,
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> int:
        """Append the optional last chunk, verify the whole upload against ``digest`` and move it
        into the blob pool, link it into ``name`` and end the session. Returns the blob size.
        A digest mismatch ends the session and nothing becomes visible. The session is held
        exclusively from the last chunk to the commit."""
        async with self._locked(name, upload_id):
            if chunks is not None:
                await self._append(upload_id, chunks, start, length)
            return await self._finish(name, upload_id, digest)

    async def _finish(self, name: str, upload_id: str, digest: Digest) -> int:
        cached = self._hashes.pop(upload_id, None)
        data = paths.upload_data(upload_id)
        writer = self._driver.writer(data, append=True)
        await writer.open()
        size = writer.size
        await writer.commit()
        if cached is not None and cached[0] == size and digest.algorithm == "sha256":
            actual = Digest("sha256", cached[1].hexdigest())
        else:
            hasher = digest.hasher()
            async for block in self._driver.reader(data):
                hasher.update(block)
            actual = Digest(digest.algorithm, hasher.hexdigest())
        if actual != digest:
            self._hashes.pop(upload_id, None)
            await self._driver.delete(paths.upload_dir(upload_id))
            raise DigestMismatch(f"uploaded content has digest {actual}, not {digest}")
        await self._store.commit_blob(data, digest)
        await self._store.link_blob(name, digest)
        await self._driver.delete(paths.upload_dir(upload_id))
        return size

    async def cancel(self, name: str, upload_id: str) -> None:
        async with self._locked(name, upload_id):
            self._hashes.pop(upload_id, None)
            try:
                await self._driver.delete(paths.upload_dir(upload_id))
            except PathNotFound:
                raise UploadUnknown(f"upload {upload_id} unknown") from None
