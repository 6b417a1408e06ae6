"""Bearer tokens from a registry's token service (``server.upstream.UpstreamClient``, shared by
the pull-through cache and ``RegistryPush``): one ``scope`` parameter per scope, one token per
set of scopes, and a token answer read whole but never beyond its bound."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.config import UpstreamConfig
from server.registry_push import RegistryPush
from server.upstream import UpstreamClient, UpstreamError, UpstreamNotFound
from storage import Digest

TOKEN = "t0ken"


class Registry:
    """A registry that wants a Bearer token on every request and the token service beside it;
    ``answer`` writes the token service's response body."""

    def __init__(self) -> None:
        self.token_queries: list[list[str]] = []
        self.answer: Callable[[web.StreamResponse], Any] | None = None
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._registry)
        self.server = TestServer(app)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_queries.append(request.query.getall("scope", []))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if self.answer is None:
            await response.write(json.dumps({"token": TOKEN, "expires_in": 300}).encode())
        else:
            await self.answer(response)
        return response

    async def _registry(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            realm = self.server.make_url("/token")
            challenge = f'Bearer realm="{realm}",service="test"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        if request.method == "POST":
            return web.Response(status=202, headers={"Location": "/v2/upload/1"})
        return web.Response(status=404)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    reg = Registry()
    await reg.server.start_server()
    yield reg
    await reg.server.close()


def _config(registry: Registry) -> UpstreamConfig:
    url = str(registry.server.make_url("")).rstrip("/")
    return UpstreamConfig(host=url.split("//", 1)[1], url=url)


async def test_a_mount_asks_for_both_scopes_apart_and_tokens_are_kept_per_scope_set(
    registry: Registry,
) -> None:
    client = RegistryPush(_config(registry))
    digest = Digest.of(b"layer")
    try:
        for _ in range(2):
            await client.start_upload("site/dst", digest, mount_from="site/src")
            assert not await client.has_blob("site/dst", digest)
    finally:
        await client.close()
    # one token for the mount (two scope parameters, not one joined), one for the HEADs
    assert registry.token_queries == [
        ["repository:site/dst:pull,push", "repository:site/src:pull"],
        ["repository:site/dst:pull,push"],
    ]


async def test_a_token_answer_in_pieces_is_read_whole(registry: Registry) -> None:
    body = json.dumps({"token": TOKEN, "expires_in": 300}).encode()

    async def slowly(response: web.StreamResponse) -> None:
        for i in range(0, len(body), 5):
            await response.write(body[i : i + 5])
            await asyncio.sleep(0.01)

    registry.answer = slowly
    for client in (UpstreamClient(_config(registry)), RegistryPush(_config(registry))):
        try:
            with pytest.raises(UpstreamNotFound):  # the token was good: the registry answered
                await client.head_blob("repo", str(Digest.of(b"x")))
            if isinstance(client, RegistryPush):  # and with two scopes
                await client.start_upload("site/dst", Digest.of(b"x"), mount_from="site/src")
        finally:
            await client.close()
    assert len(registry.token_queries) == 3


async def test_an_endless_token_answer_is_refused_at_its_bound(registry: Registry) -> None:
    async def endless(response: web.StreamResponse) -> None:
        await response.write(b'{"token": "')
        piece = b"x" * (256 << 10)
        for _ in range(64):  # 16 MiB, far beyond a token's bound
            await response.write(piece)

    registry.answer = endless
    client = UpstreamClient(_config(registry))
    try:
        with pytest.raises(UpstreamError, match=r"token service .* larger than"):
            await client.head_blob("repo", str(Digest.of(b"x")))
    finally:
        await client.close()
