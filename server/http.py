"""Small request-parsing helpers shared by the handlers (parse once, at the edge)."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlencode

from aiohttp import web

from storage import Digest

from .errors import OCIError

__all__ = [
    "digest_param",
    "page_params",
    "paginate",
    "next_link",
    "content_range",
    "media_type",
]

_CONTENT_RANGE_RE: Final = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def digest_param(text: str | None, what: str = "digest") -> Digest:
    if not text:
        raise OCIError("DIGEST_INVALID", f"{what} is required")
    return Digest.parse(text)


def page_params(request: web.Request) -> tuple[int | None, str | None]:
    """``n`` and ``last`` of a paginated list (distribution-spec "Listing Tags")."""
    raw_n = request.query.get("n")
    n = None
    if raw_n is not None and raw_n != "":
        if not re.fullmatch(r"[0-9]{1,9}", raw_n):
            raise OCIError(
                "PAGINATION_NUMBER_INVALID", f"n must be a non-negative integer, got {raw_n!r}"
            )
        n = int(raw_n)
    return n, request.query.get("last") or None


def paginate(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The page of sorted ``items`` after ``last`` of at most ``n``; and whether more follow."""
    if last is not None:
        items = [i for i in items if i > last]
    if n is None:
        return items, False
    return items[:n], len(items) > n and n > 0


def next_link(path: str, n: int, last: str) -> str:
    """RFC 8288 ``Link`` header value for the next page."""
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'


def content_range(request: web.Request) -> tuple[int, int] | None:
    """The ``Content-Range`` of a chunk as (start, length), or None if absent."""
    raw = request.headers.get("Content-Range")
    if raw is None:
        return None
    m = _CONTENT_RANGE_RE.fullmatch(raw.strip())
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise OCIError("RANGE_INVALID", f"invalid Content-Range {raw!r}")
    start, end = int(m.group(1)), int(m.group(2))
    return start, end - start + 1


def media_type(request: web.Request) -> str | None:
    """The request's Content-Type without parameters, or None if it sent none."""
    raw = request.headers.get("Content-Type")
    if not raw:
        return None
    return raw.split(";", 1)[0].strip().lower() or None
