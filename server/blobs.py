"""Blob endpoints: GET/HEAD (end-2) with Range, DELETE (end-10)."""

from __future__ import annotations

from aiohttp import web

from storage import Digest

from .context import store_of
from .errors import OCIError

__all__ = ["get_blob", "delete_blob"]


def _check_range(request: web.Request, size: int) -> None:
    """Refuse a ``Range`` that is malformed or unsatisfiable (RFC 9110 15.5.17) with the OCI
    error body; satisfiable ones are served by ``FileResponse``."""
    if "Range" not in request.headers:
        return
    unsatisfiable = OCIError(
        "RANGE_INVALID",
        f"range {request.headers['Range']!r} not satisfiable for a blob of {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    try:
        rng = request.http_range
    except ValueError:
        raise unsatisfiable from None
    if size == 0 or (rng.start is not None and rng.start >= size):
        raise unsatisfiable


async def get_blob(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    digest = Digest.parse(request.match_info["digest"])
    store = store_of(request)
    size = await store.stat_blob(name, digest)
    _check_range(request, size)
    path = store.blob_local_path(digest)
    if path is None:
        raise OCIError("UNSUPPORTED", "this storage backend cannot serve blobs directly")
    headers = {
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "Cache-Control": "max-age=31536000",
    }
    return web.FileResponse(path, headers=headers)


async def delete_blob(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    digest = Digest.parse(request.match_info["digest"])
    await store_of(request).delete_blob(name, digest)
    return web.Response(status=202, headers={"Docker-Content-Digest": str(digest)})
