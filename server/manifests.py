"""Manifest endpoints: GET/HEAD (end-3), PUT (end-7), DELETE (end-9).

Manifests are served as the exact stored bytes with the stored media type; nothing is ever
converted. Content negotiation (distribution-spec "Pulling manifests"): for a tag whose
manifest type the client's ``Accept`` explicitly leaves out, the answer is MANIFEST_UNKNOWN
rather than bytes the client said it cannot read; a digest is always served as stored, since
the digest names exactly one content.
"""

from __future__ import annotations

from aiohttp import web

from storage import ManifestInfo, ManifestTooLarge
from storage.digest import is_digest_reference
from storage.manifest import DOCKER_MANIFEST, MANIFEST_TYPES, SCHEMA1_TYPES

from .context import store_of
from .errors import OCIError
from .http import media_type
from .proxy import proxied, upstream_error
from .upstream import UpstreamError

__all__ = ["get_manifest", "put_manifest", "delete_manifest"]


def _accepted(request: web.Request) -> set[str]:
    types: set[str] = set()
    for header in request.headers.getall("Accept", []):
        for part in header.split(","):
            t = part.split(";", 1)[0].strip().lower()
            if t:
                types.add(t)
    return types


def _negotiate(request: web.Request, reference: str, info: ManifestInfo) -> None:
    if is_digest_reference(reference):
        return
    accepted = _accepted(request)
    known = MANIFEST_TYPES | SCHEMA1_TYPES
    # Only a client that named manifest types, and no wildcard or generic type, is refused;
    # a Docker schema2 image manifest, as distribution does, never (every client reads it)
    if not accepted or not accepted <= known or info.media_type in (*accepted, DOCKER_MANIFEST):
        return
    raise OCIError(
        "MANIFEST_UNKNOWN",
        f"manifest {reference!r} is {info.media_type}, which the Accept header does not allow",
        status=404,
    )


def _headers(info: ManifestInfo) -> dict[str, str]:
    return {
        "Content-Type": info.media_type,
        "Docker-Content-Digest": str(info.digest),
        "ETag": f'"{info.digest}"',
    }


async def get_manifest(request: web.Request) -> web.StreamResponse:
    name, reference = request.match_info["name"], request.match_info["reference"]
    store = store_of(request)
    stored_as = reference
    cache = proxied(request, name)
    if cache is not None:
        proxy, sources = cache
        try:
            stored_as = str((await proxy.manifest(name, reference, sources)).digest)
        except UpstreamError as e:
            raise upstream_error(e, "manifest", sources) from None
    if request.method == "HEAD":
        info = await store.stat_manifest(name, stored_as)
        _negotiate(request, reference, info)
        headers = _headers(info)
        headers["Content-Length"] = str(info.size)
        return web.Response(status=200, headers=headers)
    info, body = await store.get_manifest(name, stored_as)
    _negotiate(request, reference, info)
    return web.Response(status=200, body=body, headers=_headers(info))


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it grows past ``limit``."""
    parts: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise ManifestTooLarge(f"manifest exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def put_manifest(request: web.Request) -> web.StreamResponse:
    name, reference = request.match_info["name"], request.match_info["reference"]
    store = store_of(request)
    limit = store.manifest_limit
    if request.content_length is not None and request.content_length > limit:
        raise ManifestTooLarge(
            f"manifest of {request.content_length} bytes exceeds the limit of {limit} bytes"
        )
    body = await _read_bounded(request, limit)
    extra_tags = tuple(request.query.getall("tag", []))
    digest, subject = await store.put_manifest(
        name, reference, body, media_type(request), extra_tags
    )
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": str(digest)}
    if subject is not None:
        headers["OCI-Subject"] = str(subject)
    if extra_tags:
        headers["OCI-Tag"] = ", ".join(extra_tags)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.StreamResponse:
    name, reference = request.match_info["name"], request.match_info["reference"]
    await store_of(request).delete_manifest(name, reference)
    return web.Response(status=202)
