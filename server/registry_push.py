"""Pushing content into a registry over the OCI Distribution API (distribution-spec
``spec.md``, "Pushing blobs", "Mounting a blob from another repository", "Pushing manifests").

``RegistryPush`` is ``server.upstream.UpstreamClient`` (one request path: auth challenge, token
cache, retries, bounded reads) with push scopes: a token asks for
``repository:<name>:pull,push``, and for a mount also ``repository:<from>:pull`` (one ``scope``
parameter each, as Quay's token endpoint requires). Requests without a body go through
``UpstreamClient.request``; requests with one (upload chunks, manifests) through ``send``, which
answers challenges and retries the same way when the body can be sent again.

A blob is streamed from ``open_at(offset)`` (never whole in memory) and hashed as it goes out:
a monolithic ``PUT ?digest=`` holds its last piece back until the bytes hashed to the digest, so
bad content aborts the request and never completes an upload; chunked ``PATCH`` uploads check
the hash before the closing ``PUT`` and cancel the upload otherwise. The registry checks the
digest again at the closing ``PUT``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any, Final

import aiohttp
from yarl import URL

from storage import Digest, DigestMismatch, SizeMismatch, StoreError

from .config import UpstreamConfig
from .upstream import (
    MANIFEST_ACCEPT,
    UpstreamAuthError,
    UpstreamClient,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
    read_at_most,
)

__all__ = ["BlobSource", "PushRefused", "RegistryPush"]

log = logging.getLogger("bastion.push")

#: The repository a mount in flight in this task reads from (adds its pull scope).
_MOUNT_FROM: ContextVar[str | None] = ContextVar("bastion_mount_from", default=None)
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_ATTEMPTS: Final = 3
_BLOB_ATTEMPTS: Final = 3
_MAX_RETRY_AFTER: Final = 5.0
#: Error documents are small.
_ERROR_LIMIT: Final = 64 * 1024

#: ``open_at(offset)``: the blob's bytes from ``offset`` on, in pieces.
BlobSource = Callable[[int], AsyncIterator[bytes]]
Advance = Callable[[int], None]


class PushRefused(UpstreamError):
    """The registry answered 4xx/5xx to a push request; ``codes`` are its OCI error codes."""

    def __init__(self, message: str, status: int, codes: list[str]) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes


class _Verified:
    """A blob's bytes, hashed as they go out; the last piece is held back until they hashed to
    ``digest`` with ``size`` bytes (size < 0: unchecked), else ``failure`` is set and raised,
    which aborts the request before the body is complete. Each ``stream()`` starts over."""

    def __init__(self, open_at: BlobSource, digest: Digest, size: int, advance: Advance) -> None:
        self.open_at = open_at
        self.digest = digest
        self.size = size
        self.advance = advance
        self.failure: StoreError | None = None

    async def stream(self) -> AsyncIterator[bytes]:
        hasher = self.digest.hasher()
        seen = 0
        held = b""
        source = self.open_at(0)
        try:
            async for chunk in source:
                if held:
                    yield held
                    self.advance(len(held))
                hasher.update(chunk)
                seen += len(chunk)
                held = chunk
        finally:
            await _close(source)
        self.failure = _mismatch(self.digest, hasher.hexdigest(), self.size, seen)
        if self.failure is not None:
            raise self.failure
        if held:
            yield held
            self.advance(len(held))


def _mismatch(digest: Digest, actual_hex: str, size: int, actual_size: int) -> StoreError | None:
    if actual_hex != digest.hex:
        return DigestMismatch(f"content of {digest} hashes to {digest.algorithm}:{actual_hex}")
    if size >= 0 and actual_size != size:
        return SizeMismatch(f"{digest} has {actual_size} bytes, not {size}")
    return None


class RegistryPush(UpstreamClient):
    """Push requests to one registry. ``chunk_size``: upload blobs larger than it in PATCH
    chunks of that size (None: one monolithic PUT per blob)."""

    role = "registry"

    def __init__(self, config: UpstreamConfig, chunk_size: int | None = None) -> None:
        super().__init__(config)
        self.chunk_size = chunk_size

    # ---- auth: push scopes -------------------------------------------------------------------

    def scopes(self, repository: str) -> list[str]:
        """Push and pull; during a mount also pull from the repository it mounts from."""
        scopes = [f"repository:{repository}:pull,push"]
        source = _MOUNT_FROM.get()
        if source is not None and source != repository:
            scopes.append(f"repository:{source}:pull")
        return scopes

    # ---- requests with a body ----------------------------------------------------------------

    async def send(
        self,
        method: str,
        repository: str,
        url: str,
        body: bytes | _Verified | AsyncIterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """``method`` to ``url`` (a path on the registry or an absolute URL, as upload
        ``Location``s are) with auth. A 401 is answered once; 429/502/503/504 and connection
        errors are retried when the body can be sent again (bytes, ``_Verified``). Returns the
        response for statuses below 400 (the caller closes it); raises ``PushRefused`` with
        the registry's error codes otherwise, or the body's ``DigestMismatch``."""
        target = URL(urllib.parse.urljoin(self.config.url + "/", url), encoded=True)
        replayable = not isinstance(body, AsyncIterator)
        answered = False
        attempt = 0
        while True:
            attempt += 1
            hdrs = {"Accept-Encoding": "identity", **(headers or {})}
            authorization = await self._authorization(repository)
            if authorization:
                hdrs["Authorization"] = authorization
            data = body.stream() if isinstance(body, _Verified) else body
            try:
                response = await self._get_session().request(
                    method, target, headers=hdrs, data=data
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                if isinstance(body, _Verified) and body.failure is not None:
                    raise body.failure from None
                if replayable and attempt < _ATTEMPTS:
                    await asyncio.sleep(0.2 * attempt)
                    continue
                raise UpstreamUnavailable(
                    f"registry {self.host}: {method} {target.path}: {e.__class__.__name__} {e}"
                ) from None
            if response.status == 401 and not answered:
                challenge = self._parse_challenge(response.headers.get("WWW-Authenticate", ""))
                response.release()
                if challenge is None:
                    raise UpstreamAuthError(self._auth_refused(repository, 401))
                self._challenge = challenge
                self._tokens.clear()
                if not replayable:  # part of the body may be gone: the caller starts over
                    raise UpstreamUnavailable(f"registry {self.host}: token refused mid-upload")
                answered = True
                continue
            if response.status in _RETRY_STATUSES and replayable and attempt < _ATTEMPTS:
                retry_after = response.headers.get("Retry-After", "")
                response.release()
                delay = float(retry_after) if retry_after.isdigit() else 0.5 * attempt
                await asyncio.sleep(min(delay, _MAX_RETRY_AFTER))
                continue
            if response.status >= 400:
                raise await self._refused(response, method, repository)
            return response

    async def _refused(
        self, response: aiohttp.ClientResponse, method: str, repository: str
    ) -> UpstreamError:
        status = response.status
        try:
            doc = json.loads(await read_at_most(response, _ERROR_LIMIT) or b"")
            errors = doc.get("errors") if isinstance(doc, dict) else None
        except (ValueError, aiohttp.ClientError, TimeoutError):
            errors = None
        finally:
            response.release()
        if status in (401, 403):
            return UpstreamAuthError(self._auth_refused(repository, status))
        found = [e for e in errors or [] if isinstance(e, dict)]
        detail = "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in found)
        message = f"registry {self.host} answered {status} to {method} {repository}"
        message += f": {detail}" if detail else ""
        if status in _RETRY_STATUSES:
            return UpstreamUnavailable(message)
        return PushRefused(message, status, [str(e.get("code", "")) for e in found])

    # ---- blobs -------------------------------------------------------------------------------

    async def has_blob(self, repository: str, digest: Digest) -> bool:
        try:
            await self.head_blob(repository, str(digest))
        except UpstreamNotFound:
            return False
        return True

    async def start_upload(
        self, repository: str, digest: Digest, mount_from: str | None
    ) -> str | None:
        """``POST .../blobs/uploads/``, asking to mount ``digest`` from ``mount_from`` if given:
        None if the blob was mounted (201), else the upload's ``Location`` (202; a registry
        that cannot or will not mount starts an upload instead)."""
        path = "blobs/uploads/"
        if mount_from is not None:
            query = urllib.parse.urlencode({"mount": str(digest), "from": mount_from})
            path += f"?{query}"
        token = _MOUNT_FROM.set(mount_from)
        try:
            response = await self.request("POST", repository, path)
        except UpstreamAuthError:
            if mount_from is None:
                raise
            log.info("%s: no pull access to %s for a mount; uploading", repository, mount_from)
            self._tokens.clear()
            return await self.start_upload(repository, digest, None)
        finally:
            _MOUNT_FROM.reset(token)
        response.release()
        if response.status == 201:
            return None
        location = response.headers.get("Location")
        if response.status != 202 or not location:
            raise PushRefused(
                f"registry {self.host} answered {response.status} to POST {repository}/{path}",
                response.status,
                [],
            )
        return location

    async def cancel_upload(self, repository: str, location: str) -> None:
        try:
            response = await self.send("DELETE", repository, location)
            response.release()
        except UpstreamError as e:
            log.debug("cancelling upload %s: %s", location, e)

    async def upload(
        self,
        repository: str,
        location: str,
        digest: Digest,
        size: int,
        open_at: BlobSource,
        advance: Advance,
    ) -> None:
        """Send the blob into the upload at ``location`` and close it with its digest."""
        if self.chunk_size is not None and size > self.chunk_size:
            await self._upload_chunked(repository, location, digest, size, open_at, advance)
            return
        body = _Verified(open_at, digest, size, advance)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        response = await self.send("PUT", repository, _with_digest(location, digest), body, headers)
        response.release()

    async def _upload_chunked(
        self,
        repository: str,
        location: str,
        digest: Digest,
        size: int,
        open_at: BlobSource,
        advance: Advance,
    ) -> None:
        assert self.chunk_size is not None
        hasher = digest.hasher()
        offset = 0
        while offset < size:
            length = min(self.chunk_size, size - offset)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "Content-Range": f"{offset}-{offset + length - 1}",
            }
            piece = _piece(open_at(offset), length, hasher, advance)
            response = await self.send("PATCH", repository, location, piece, headers)
            response.release()
            location = response.headers.get("Location", location)
            offset += length
        failure = _mismatch(digest, hasher.hexdigest(), size, offset)
        if failure is not None:
            await self.cancel_upload(repository, location)
            raise failure
        headers = {"Content-Length": "0"}
        response = await self.send("PUT", repository, _with_digest(location, digest), b"", headers)
        response.release()

    async def push_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_at: BlobSource,
        advance: Advance,
        mount_from: str | None = None,
    ) -> bool:
        """Mount (when ``mount_from`` is given and the registry agrees) or upload the blob;
        True if it was mounted. A failed upload starts over a bounded number of times;
        ``DigestMismatch``/``SizeMismatch`` (bad content) never do."""
        for attempt in range(1, _BLOB_ATTEMPTS + 1):
            location = await self.start_upload(repository, digest, mount_from)
            if location is None:
                return True
            try:
                await self.upload(repository, location, digest, size, open_at, advance)
                return False
            except UpstreamUnavailable as e:
                await self.cancel_upload(repository, location)
                if attempt == _BLOB_ATTEMPTS:
                    raise
                log.warning("%s: %s (attempt %d, starting over)", digest, e, attempt)
                await asyncio.sleep(0.5 * attempt)
            except BaseException:
                await self.cancel_upload(repository, location)
                raise
        raise AssertionError("unreachable")

    # ---- manifests ---------------------------------------------------------------------------

    async def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest ``reference`` resolves to in the registry, None if it does not."""
        try:
            digest, _ = await self.head_manifest(repository, reference)
        except UpstreamNotFound:
            return None
        return digest or reference

    async def put_manifest(
        self, repository: str, reference: str, body: bytes, media_type: str, digest: Digest
    ) -> None:
        """``PUT`` the exact ``body`` under ``reference`` (a tag or ``digest``)."""
        headers = {"Content-Type": media_type, "Accept": MANIFEST_ACCEPT}
        response = await self.send(
            "PUT", repository, f"/v2/{repository}/manifests/{reference}", body, headers
        )
        response.release()
        said = response.headers.get("Docker-Content-Digest")
        if said and said != str(digest):
            raise PushRefused(
                f"registry {self.host} stored {repository}:{reference} as {said}, not {digest}",
                response.status,
                [],
            )


def _with_digest(location: str, digest: Digest) -> str:
    sep = "&" if "?" in location else "?"
    return f"{location}{sep}digest={urllib.parse.quote(str(digest), safe='')}"


async def _piece(
    source: AsyncIterator[bytes], length: int, hasher: Any, advance: Advance
) -> AsyncIterator[bytes]:
    """The first ``length`` bytes of ``source``, added to ``hasher`` as they go out;
    ``SizeMismatch`` if it ends before."""
    left = length
    try:
        async for chunk in source:
            chunk = chunk[:left]
            hasher.update(chunk)
            left -= len(chunk)
            yield chunk
            advance(len(chunk))
            if not left:
                return
        raise SizeMismatch(f"the blob ended {left} bytes before the end of a chunk")
    finally:
        await _close(source)


async def _close(source: AsyncIterator[bytes]) -> None:
    """Close a blob source now (its file), not when it is garbage collected."""
    close = getattr(source, "aclose", None)
    if close is not None:
        await close()
