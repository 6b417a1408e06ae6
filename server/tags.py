"""Tag listing (end-8a, end-8b) with ``n`` / ``last`` pagination and a ``Link`` header."""

from __future__ import annotations

from aiohttp import web

from .context import store_of
from .http import next_link, page_params, paginate

__all__ = ["get_tags"]


async def get_tags(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    n, last = page_params(request)
    page, more = paginate(await store_of(request).list_tags(name), n, last)
    headers = {}
    if more and n is not None:
        headers["Link"] = next_link(request.path, n, page[-1])
    return web.json_response({"name": name, "tags": page}, headers=headers)
