"""The aiohttp application: ``make_app(config)`` and the one route table.

Repository names contain ``/``, so aiohttp's router cannot split them; one catch-all route
hands ``/v2/...`` to ``dispatch``, which matches the table below (distribution-spec v1.1
"Endpoints" end-1 .. end-13) from the end of the path, uploads before blobs.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from storage import FilesystemDriver, Store, validate_name

from . import blobs, catalog, manifests, referrers, tags, uploads
from .config import Config
from .context import CONFIG, PROXY, STORE
from .errors import OCIError, error_middleware
from .proxy import Proxy, proxied, refuse_write

__all__ = ["make_app", "ROUTES"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NAME: Final = r"(?P<name>.+?)"
ROUTES: Final[list[tuple[re.Pattern[str], dict[str, Handler]]]] = [
    (re.compile(r"/v2/?"), {"GET": catalog.base, "HEAD": catalog.base}),
    (re.compile(r"/v2/_catalog"), {"GET": catalog.get_catalog}),
    (
        re.compile(rf"/v2/{_NAME}/blobs/uploads(?:/(?P<upload>[^/]*))?"),
        {
            "POST": uploads.post_upload,
            "PATCH": uploads.patch_upload,
            "PUT": uploads.put_upload,
            "GET": uploads.get_upload,
            "DELETE": uploads.delete_upload,
        },
    ),
    (
        re.compile(rf"/v2/{_NAME}/blobs/(?P<digest>[^/]+)"),
        {"GET": blobs.get_blob, "HEAD": blobs.get_blob, "DELETE": blobs.delete_blob},
    ),
    (
        re.compile(rf"/v2/{_NAME}/manifests/(?P<reference>[^/]+)"),
        {
            "GET": manifests.get_manifest,
            "HEAD": manifests.get_manifest,
            "PUT": manifests.put_manifest,
            "DELETE": manifests.delete_manifest,
        },
    ),
    (re.compile(rf"/v2/{_NAME}/tags/list"), {"GET": tags.get_tags}),
    (re.compile(rf"/v2/{_NAME}/referrers/(?P<digest>[^/]+)"), {"GET": referrers.get_referrers}),
]


async def dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    for pattern, methods in ROUTES:
        m = pattern.fullmatch(path)
        if m is None:
            continue
        handler = methods.get(request.method)
        if handler is None:
            raise OCIError(
                "UNSUPPORTED",
                f"{request.method} is not supported on this endpoint",
                headers={"Allow": ", ".join(methods)},
            )
        params = m.groupdict()
        if "name" in params:
            validate_name(params["name"])
            if request.method not in ("GET", "HEAD"):
                cache = proxied(request, params["name"])
                if cache is not None:
                    raise refuse_write(params["name"], cache[1])
        request.match_info.update(params)
        return await handler(request)
    raise OCIError("UNSUPPORTED", "no such API endpoint", status=404)


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Docker-Distribution-API-Version", "registry/2.0")


async def _close_proxy(app: web.Application) -> None:
    await app[PROXY].close()


def make_app(config: Config, store: Store | None = None) -> web.Application:
    """The registry application for ``config``; ``store`` overrides the configured storage."""
    if store is None:
        store = Store(FilesystemDriver(config.storage.root), config.limits.manifest_size)
    app = web.Application(
        middlewares=[error_middleware], client_max_size=config.limits.manifest_size
    )
    app[CONFIG] = config
    app[STORE] = store
    if config.upstreams or config.mappings:
        app[PROXY] = Proxy(config, store)
        app.on_cleanup.append(_close_proxy)
    app.on_response_prepare.append(_common_headers)
    app.router.add_route("*", "/v2", dispatch)
    app.router.add_route("*", "/v2/{tail:.*}", dispatch)
    return app
