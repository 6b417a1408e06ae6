"""``GET /v2/`` (end-1) and the catalog (``GET /v2/_catalog``, paginated like tags)."""

from __future__ import annotations

from aiohttp import web

from .context import store_of
from .http import next_link, page_params, paginate

__all__ = ["base", "get_catalog"]


async def base(request: web.Request) -> web.StreamResponse:
    return web.json_response({})


async def get_catalog(request: web.Request) -> web.StreamResponse:
    n, last = page_params(request)
    page, more = paginate(await store_of(request).list_repositories(), n, last)
    headers = {}
    if more and n is not None:
        headers["Link"] = next_link(request.path, n, page[-1])
    return web.json_response({"repositories": page}, headers=headers)
