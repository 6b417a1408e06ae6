"""Blob upload endpoints (distribution-spec "Pushing blobs", end-4a .. end-6, end-11, end-13):
monolithic POST, POST + PUT, chunked and streamed PATCH, status, cancel, cross-repo mount."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from storage import Digest, Store, UploadUnknown, validate_name

from .context import store_of
from .errors import OCIError
from .http import content_range, digest_param

__all__ = ["post_upload", "patch_upload", "put_upload", "get_upload", "delete_upload"]


def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in the pieces it arrived in, not joined or copied (never ``async for``
    over the reader itself: that splits at newlines)."""
    return request.content.iter_any()


def _upload_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
    }


def _created(name: str, digest: Digest) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": str(digest)},
    )


def _body_length(request: web.Request) -> tuple[int | None, int | None]:
    """(start, length) of the request body from Content-Range / Content-Length."""
    rng = content_range(request)
    length = request.content_length
    if rng is not None:
        start, range_length = rng
        if length is not None and length != range_length:
            raise OCIError(
                "SIZE_INVALID",
                f"Content-Length {length} does not match Content-Range of {range_length} bytes",
            )
        return start, range_length
    return None, length


async def post_upload(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    store = store_of(request)
    query = request.query
    if "mount" in query:
        digest = digest_param(query["mount"], "mount")
        source = query.get("from") or None
        if source is not None:
            validate_name(source)
        size = await store.mount_blob(name, digest, source)
        if size is not None:
            return _created(name, digest)
        # Not mountable: the spec says to start an ordinary upload session instead (202).
    upload_id = await store.uploads.start(name)
    if "digest" in query:
        digest = digest_param(query["digest"])
        _, length = _body_length(request)
        try:
            await store.uploads.finish(name, upload_id, digest, _body(request), length=length)
        except BaseException:
            await _discard(store, name, upload_id)
            raise
        return _created(name, digest)
    return web.Response(status=202, headers=_upload_headers(name, upload_id, 0))


async def _discard(store: Store, name: str, upload_id: str) -> None:
    try:
        await store.uploads.cancel(name, upload_id)
    except UploadUnknown:
        pass


async def patch_upload(request: web.Request) -> web.StreamResponse:
    name, upload_id = request.match_info["name"], request.match_info.get("upload") or ""
    start, length = _body_length(request)
    size = await store_of(request).uploads.append(
        name, upload_id, _body(request), start=start, length=length
    )
    return web.Response(status=202, headers=_upload_headers(name, upload_id, size))


async def put_upload(request: web.Request) -> web.StreamResponse:
    name, upload_id = request.match_info["name"], request.match_info.get("upload") or ""
    digest = digest_param(request.query.get("digest"))
    start, length = _body_length(request)
    has_body = request.body_exists and length != 0
    await store_of(request).uploads.finish(
        name, upload_id, digest, _body(request) if has_body else None, start=start, length=length
    )
    return _created(name, digest)


async def get_upload(request: web.Request) -> web.StreamResponse:
    name, upload_id = request.match_info["name"], request.match_info.get("upload") or ""
    size = await store_of(request).uploads.size(name, upload_id)
    return web.Response(status=204, headers=_upload_headers(name, upload_id, size))


async def delete_upload(request: web.Request) -> web.StreamResponse:
    name, upload_id = request.match_info["name"], request.match_info.get("upload") or ""
    await store_of(request).uploads.cancel(name, upload_id)
    return web.Response(status=204)
