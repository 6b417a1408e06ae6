"""Tag listing (end-8a, end-8b) with ``n`` / ``last`` pagination and a ``Link`` header.

In a pull-through repository the list is the upstream's (every source of a mapping, merged)
together with the tags cached here, as distribution's proxy mode and zot's on-demand sync
answer it; with the upstream unreachable it is what is cached, as manifests are served then.
"""

from __future__ import annotations

from aiohttp import web

from storage import RepositoryUnknown, Store

from .context import store_of
from .http import next_link, page_params, paginate
from .proxy import Proxy, Source, proxied, upstream_error
from .upstream import UpstreamError, UpstreamNotFound

__all__ = ["get_tags"]


async def get_tags(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    n, last = page_params(request)
    store = store_of(request)
    cache = proxied(request, name)
    if cache is None:
        tags = await store.list_tags(name)
    else:
        tags = await _proxied_tags(store, name, *cache)
    page, more = paginate(tags, n, last)
    headers = {}
    if more and n is not None:
        headers["Link"] = next_link(request.path, n, page[-1])
    return web.json_response({"name": name, "tags": page}, headers=headers)


async def _proxied_tags(store: Store, name: str, proxy: Proxy, sources: list[Source]) -> list[str]:
    try:
        cached: list[str] | None = await store.list_tags(name)
    except RepositoryUnknown:
        cached = None
    try:
        upstream = await proxy.list_tags(name, sources)
    except UpstreamNotFound:
        if cached is None:
            raise RepositoryUnknown(f"repository {name} unknown here and upstream") from None
        return cached
    except UpstreamError as e:
        if cached is None:  # nothing to fall back on: say that the upstream failed
            raise upstream_error(e, "tags list", sources) from None
        return cached  # offline: what is cached (the failure is logged)
    return sorted(set(upstream).union(cached or ()))
