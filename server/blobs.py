"""Blob endpoints: GET/HEAD (end-2) with Range, DELETE (end-10); pull-through for proxied
repositories (served while being cached)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from storage import Digest, Store
from storage.fill import Fill, FillFailed, SourceMissing

from .context import store_of
from .errors import OCIError
from .proxy import Proxy, Source, proxied, upstream_error
from .upstream import UpstreamError, UpstreamNotFound

__all__ = ["get_blob", "delete_blob"]

log = logging.getLogger("bastion.blobs")


def _unsatisfiable(request: web.Request, size: int) -> OCIError:
    return OCIError(
        "RANGE_INVALID",
        f"range {request.headers['Range']!r} not satisfiable for a blob of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _ignored_range(request: web.Request) -> bool:
    """Whether ``Range`` is one to ignore, answering with the whole blob (RFC 9110 14.2): in a
    unit other than bytes (which a server MUST ignore), or asking for several ranges (which it
    may; containers/image's partial pulls of zstd:chunked layers take the whole blob)."""
    value = request.headers.get("Range")
    if value is None:
        return False
    return not value.strip().lower().startswith("bytes=") or "," in value


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a satisfiable ``Range`` (RFC 9110 14.1.2), None without one or with
    one to ignore (``_ignored_range``); a malformed or unsatisfiable range raises RANGE_INVALID
    with ``Content-Range: bytes */size``."""
    if "Range" not in request.headers or _ignored_range(request):
        return None
    try:
        rng = request.http_range
    except ValueError:
        raise _unsatisfiable(request, size) from None
    start, stop = rng.start, rng.stop
    if start is not None and start < 0:  # suffix: the last -start bytes
        start = max(size + start, 0)
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if size == 0 or start >= size or start >= stop:
        raise _unsatisfiable(request, size)
    return start, stop


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }


def _serve_file(
    request: web.Request, store: Store, digest: Digest, size: int
) -> web.StreamResponse:
    _byte_range(request, size)  # refuse bad ranges with the OCI error body
    path = store.blob_local_path(digest)
    if path is None:
        raise OCIError("UNSUPPORTED", "this storage backend cannot serve blobs directly")
    # sendfile, Range (206) and conditional requests are FileResponse's
    whole = _WholeFileResponse if _ignored_range(request) else web.FileResponse
    return whole(path, headers=_blob_headers(digest))


class _WholeFileResponse(web.FileResponse):
    """A ``FileResponse`` that answers as if the request had no ``Range`` (FileResponse
    would answer 416 to one that ``_ignored_range`` ignores)."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = request.headers.copy()
        headers.popall("Range", None)
        return await super().prepare(request.clone(headers=headers))


async def get_blob(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    digest = Digest.parse(request.match_info["digest"])
    store = store_of(request)
    cache = proxied(request, name)
    if cache is not None:
        return await _get_proxied(request, store, name, digest, *cache)
    size = await store.stat_blob(name, digest)
    return _serve_file(request, store, digest, size)


async def _get_proxied(
    request: web.Request,
    store: Store,
    name: str,
    digest: Digest,
    proxy: Proxy,
    sources: list[Source],
) -> web.StreamResponse:
    size = await store.blob_size(digest)
    if size is not None:
        if not await store.is_linked(name, digest):
            # in the pool for another repository: this one's upstream must have it too (then
            # it is not fetched again); offline, what is cached is served
            try:
                await proxy.head_blob(name, digest, sources)
            except UpstreamNotFound:
                raise OCIError("BLOB_UNKNOWN", f"blob {digest} unknown to the upstream") from None
            except UpstreamError as e:
                log.warning("serving cached %s@%s unchecked: %s", name, digest, e)
            await store.link_blob(name, digest)
        proxy.stats["blob_hits"] += 1
        return _serve_file(request, store, digest, size)
    try:
        if request.method == "HEAD":
            size = await proxy.head_blob(name, digest, sources)
            headers = _blob_headers(digest)
            if size is not None:
                headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        proxy.stats["blob_misses"] += 1
        upstream = sources[0].upstream.config
        fill = await proxy.fills.open(
            digest,
            proxy.fetcher(digest, sources),
            on_commit=lambda: store.link_blob(name, digest),
            start_timeout=upstream.connect_timeout + upstream.read_timeout,
        )
    except SourceMissing:
        raise OCIError("BLOB_UNKNOWN", f"blob {digest} unknown to the upstream") from None
    except FillFailed as e:
        log.error("fetch of %s@%s failed: %s", name, digest, e)
        hosts = ", ".join(dict.fromkeys(s.upstream.host for s in sources))
        raise OCIError(
            "UNKNOWN", f"fetch from upstream {hosts} failed (see the registry log)", status=502
        ) from None
    except UpstreamError as e:
        raise upstream_error(e, "blob", sources) from None
    if fill is None:  # it landed meanwhile
        await store.link_blob(name, digest)
        return _serve_file(request, store, digest, await store.stat_blob(name, digest))
    return await _stream_fill(request, store, name, fill)


async def _stream_fill(
    request: web.Request, store: Store, name: str, fill: Fill
) -> web.StreamResponse:
    """Stream a blob while it is being fetched. If the fetch fails midway the connection is
    cut, so the client sees a short body rather than a wrong one."""
    headers = _blob_headers(fill.digest)
    start, end, status = 0, fill.size, 200
    if fill.size is not None:
        rng = _byte_range(request, fill.size)
        if rng is not None:
            start, end, status = rng[0], rng[1], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{fill.size}"
    response = web.StreamResponse(status=status, headers=headers)
    if end is not None:
        response.content_length = end - start
    await response.prepare(request)
    transport = request.transport
    try:
        if end is not None and transport is not None and not transport.get_extra_info("sslcontext"):
            # what has landed goes out with sendfile(2), as FileResponse sends a whole blob
            loop = asyncio.get_running_loop()
            with fill.open_file() as file:
                async for offset, count in fill.regions(file, start, end):
                    await loop.sendfile(transport, file, offset, count)
        else:
            async for chunk in fill.stream(start, end):
                await response.write(chunk)
    except FillFailed as e:
        log.error("serving %s@%s while fetching: %s", name, fill.digest, e)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    if await store.blob_size(fill.digest) is not None:
        await store.link_blob(name, fill.digest)
    return response


async def delete_blob(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    digest = Digest.parse(request.match_info["digest"])
    await store_of(request).delete_blob(name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
