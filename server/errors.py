"""The OCI error model: one registry of codes, one exception type, one middleware.

Codes from distribution-spec v1.1 "Error Codes" (plus distribution's TAG_INVALID and
UNKNOWN). Domain errors from ``storage`` carry no HTTP status; ``from_store_error`` maps them
here, at the edge. Anything unmapped is logged and answered as UNKNOWN/500 without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

import storage
from storage.driver import DriverError

__all__ = ["OCIError", "CODES", "error_middleware", "from_store_error", "error_response"]

log = logging.getLogger("bastion.server")

#: code -> (HTTP status, default message)
CODES: Final[dict[str, tuple[int, str]]] = {
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "BLOB_UPLOAD_INVALID": (400, "blob upload invalid"),
    "BLOB_UPLOAD_UNKNOWN": (404, "blob upload unknown to registry"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "MANIFEST_BLOB_UNKNOWN": (400, "manifest references a manifest or blob unknown to registry"),
    "MANIFEST_INVALID": (400, "manifest invalid"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown to registry"),
    "NAME_INVALID": (400, "invalid repository name"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "SIZE_INVALID": (400, "provided length did not match content length"),
    "TAG_INVALID": (400, "manifest tag did not match URI"),
    "RANGE_INVALID": (416, "invalid content range"),
    "PAGINATION_NUMBER_INVALID": (400, "invalid number of results requested"),
    "UNAUTHORIZED": (401, "authentication required"),
    "DENIED": (403, "requested access to the resource is denied"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "TOOMANYREQUESTS": (429, "too many requests"),
    "UNKNOWN": (500, "unknown error"),
}


class OCIError(Exception):
    """Raised by handlers; written by ``error_middleware`` as ``{"errors": [...]}``."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        default_status, default_message = CODES[code]
        super().__init__(message or default_message)
        self.code = code
        self.message = message or default_message
        self.status = status or default_status
        self.detail = detail
        self.headers = headers or {}


def error_response(err: OCIError, method: str = "GET") -> web.Response:
    entry: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.detail is not None:
        entry["detail"] = err.detail
    body = json.dumps({"errors": [entry]}).encode()
    return web.Response(
        status=err.status,
        body=None if method == "HEAD" else body,
        content_type="application/json",
        headers=err.headers,
    )


_STORE_CODES: Final[list[tuple[type[Exception], str]]] = [
    (storage.InvalidName, "NAME_INVALID"),
    (storage.InvalidReference, "TAG_INVALID"),
    (storage.InvalidDigest, "DIGEST_INVALID"),
    (storage.DigestMismatch, "DIGEST_INVALID"),
    (storage.SizeMismatch, "SIZE_INVALID"),
    (storage.BlobUnknown, "BLOB_UNKNOWN"),
    (storage.ManifestUnknown, "MANIFEST_UNKNOWN"),
    (storage.RepositoryUnknown, "NAME_UNKNOWN"),
    (storage.UploadUnknown, "BLOB_UPLOAD_UNKNOWN"),
    (storage.UploadBusy, "BLOB_UPLOAD_INVALID"),
    (storage.ManifestInvalid, "MANIFEST_INVALID"),
    (storage.ManifestBlobUnknown, "MANIFEST_BLOB_UNKNOWN"),
]


def from_store_error(exc: storage.StoreError) -> OCIError:
    """Translate a domain error from ``storage`` into its OCI error."""
    if isinstance(exc, storage.ManifestTooLarge):
        return OCIError("SIZE_INVALID", str(exc), status=413)
    if isinstance(exc, storage.UploadOffsetInvalid):
        end = max(exc.size - 1, 0)
        return OCIError("RANGE_INVALID", str(exc), headers={"Range": f"0-{end}"})
    if isinstance(exc, storage.ManifestBlobUnknown):
        return OCIError("MANIFEST_BLOB_UNKNOWN", str(exc), detail={"digest": exc.digest})
    for cls, code in _STORE_CODES:
        if isinstance(exc, cls):
            return OCIError(code, str(exc))
    return OCIError("UNKNOWN", str(exc))


def _from_http_exception(exc: web.HTTPException) -> OCIError:
    if exc.status == 404:
        return OCIError("UNSUPPORTED", "no such API endpoint", status=404)
    if exc.status == 405:
        return OCIError("UNSUPPORTED", "method not allowed on this endpoint")
    if exc.status == 413:
        return OCIError("SIZE_INVALID", "request body too large", status=413)
    return OCIError("UNKNOWN", exc.reason, status=exc.status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OCIError as err:
        return error_response(err, request.method)
    except storage.StoreError as exc:
        return error_response(from_store_error(exc), request.method)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc), request.method)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except (DriverError, OSError, Exception):
        log.exception("%s %s failed", request.method, request.path)
        return error_response(OCIError("UNKNOWN", "internal error"), request.method)
