"""The aiohttp application: ``make_app(config)`` and the one route table.

Repository names contain ``/``, so aiohttp's router cannot split them; one catch-all route
hands ``/v2/...`` to ``dispatch``, which matches the table below (distribution-spec v1.1
"Endpoints" end-1 .. end-13) from the end of the path (``route``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from storage import FilesystemDriver, Store, validate_name

from . import blobs, catalog, manifests, referrers, tags, uploads
from .config import Config
from .context import CONFIG, PROXY, STORE
from .errors import OCIError, error_middleware
from .proxy import Proxy, proxied, refuse_write

__all__ = ["make_app", "route"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTES_BY_KIND: Final[dict[str, dict[str, Handler]]] = {
    "base": {"GET": catalog.base, "HEAD": catalog.base},
    "catalog": {"GET": catalog.get_catalog},
    "uploads": {
        "POST": uploads.post_upload,
        "PATCH": uploads.patch_upload,
        "PUT": uploads.put_upload,
        "GET": uploads.get_upload,
        "DELETE": uploads.delete_upload,
    },
    "blobs": {"GET": blobs.get_blob, "HEAD": blobs.get_blob, "DELETE": blobs.delete_blob},
    "manifests": {
        "GET": manifests.get_manifest,
        "HEAD": manifests.get_manifest,
        "PUT": manifests.put_manifest,
        "DELETE": manifests.delete_manifest,
    },
    "tags": {"GET": tags.get_tags},
    "referrers": {"GET": referrers.get_referrers},
}
#: match-info key of the last path segment, per kind
_LAST_KEY: Final = {
    "blobs": "digest",
    "manifests": "reference",
    "referrers": "digest",
    "uploads": "upload",
}


def route(path: str) -> tuple[str, dict[str, str]] | None:
    """(kind, match info) of an API path, parsed from its end, since repository names contain
    ``/`` and may even contain ``blobs`` or ``manifests`` components (distribution-spec v1.1
    "Endpoints" end-1 .. end-13)."""
    if path in ("/v2", "/v2/"):
        return "base", {}
    if path == "/v2/_catalog":
        return "catalog", {}
    if not path.startswith("/v2/"):
        return None
    rest, _, last = path[4:].rpartition("/")
    name, _, kind = rest.rpartition("/")
    if kind == "tags" and last == "list":
        return ("tags", {"name": name}) if name else None
    if kind == "uploads":  # .../blobs/uploads/<id>
        name, _, blobs_word = name.rpartition("/")
        if blobs_word == "blobs" and name:
            return "uploads", {"name": name, "upload": last}
        return None
    if kind == "blobs" and last == "uploads":  # .../blobs/uploads without the slash
        return ("uploads", {"name": name, "upload": ""}) if name else None
    if kind in _LAST_KEY and name and last:
        return kind, {"name": name, _LAST_KEY[kind]: last}
    return None


async def dispatch(request: web.Request) -> web.StreamResponse:
    found = route(request.path)
    if found is None:
        raise OCIError("UNSUPPORTED", "no such API endpoint", status=404)
    kind, params = found
    methods = _ROUTES_BY_KIND[kind]
    handler = methods.get(request.method)
    if handler is None:
        raise OCIError(
            "UNSUPPORTED",
            f"{request.method} is not supported on this endpoint",
            headers={"Allow": ", ".join(methods)},
        )
    if "name" in params:
        validate_name(params["name"])
        if request.method not in ("GET", "HEAD"):
            cache = proxied(request, params["name"])
            if cache is not None:
                raise refuse_write(params["name"], cache[1])
    request.match_info.update(params)
    return await handler(request)


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
