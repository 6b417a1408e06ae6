"""Release signatures fetched from a signature store over HTTP (``server.signatures``): every
byte of each ``signature-N`` however it arrives, until the first one missing, and a body over
the bound refused with a line naming it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.signatures import MAX_SIGNATURE, SignatureError, fetch_signatures
from storage import Digest

RELEASE = Digest.of(b"release manifest")


@pytest.fixture
async def store() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """A signature store over HTTP that sends every body in small pieces, apart in time (as a
    body can arrive over a real network); the dict maps ``signature-N`` to its bytes."""
    bodies: dict[str, bytes] = {}

    async def signature(request: web.Request) -> web.StreamResponse:
        body = bodies.get(request.match_info["name"])
        if request.match_info["release"] != f"sha256={RELEASE.hex}" or body is None:
            raise web.HTTPNotFound()
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(0, len(body), 1000):
            await response.write(body[i : i + 1000])
            await asyncio.sleep(0.005)
        return response

    app = web.Application()
    app.router.add_get("/sigs/{release}/{name}", signature)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/sigs")), bodies
    await server.close()


async def test_each_signature_is_fetched_whole_until_the_first_missing(
    store: tuple[str, dict[str, bytes]],
) -> None:
    url, bodies = store
    bodies["signature-1"] = bytes(range(256)) * 9  # 2304 bytes: three pieces
    bodies["signature-2"] = b"\x89second" * 700
    bodies["signature-4"] = b"after a gap: not read"
    assert await fetch_signatures(url, RELEASE) == [bodies["signature-1"], bodies["signature-2"]]


async def test_a_signature_over_the_bound_is_refused(store: tuple[str, dict[str, bytes]]) -> None:
    url, bodies = store
    bodies["signature-1"] = b"x" * (MAX_SIGNATURE + 1)
    with pytest.raises(SignatureError, match=f"signature-1 is larger than {MAX_SIGNATURE} bytes"):
        await fetch_signatures(url, RELEASE)


async def test_no_signature_at_all_is_an_error(store: tuple[str, dict[str, bytes]]) -> None:
    url, _ = store
    with pytest.raises(SignatureError, match=f"no signature for {RELEASE}"):
        await fetch_signatures(url, RELEASE)
