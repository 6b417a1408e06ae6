"""Pull-through of blobs an upstream redirects to a CDN, as quay.io does (its blob GETs answer
302 with a signed URL on another host): the cache follows the redirect, does not send the
upstream's token to the CDN (which refuses a request with two kinds of auth, as S3 does), and
resumes a body that broke off through the upstream again."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import make_app

from .test_proxy import LOCAL, proxy_config

TOKEN = "upstream-token"


@dataclass
class Upstream:
    """A registry whose blob GETs redirect to a CDN; ``cut_once`` makes the CDN break off the
    first body it sends halfway."""

    blobs: dict[str, bytes]
    registry_auth: list[str | None] = field(default_factory=list)
    cdn_auth: list[str | None] = field(default_factory=list)
    cdn_ranges: list[str | None] = field(default_factory=list)
    cdn_gets: int = 0
    cut_once: bool = False
    registry: TestServer | None = None
    cdn: TestServer | None = None

    async def start(self) -> None:
        reg = web.Application()
        reg.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self._redirect)
        reg.router.add_get("/token", self._token)
        cdn = web.Application()
        cdn.router.add_route("*", "/cdn/{digest}", self._serve)
        self.registry, self.cdn = TestServer(reg), TestServer(cdn)
        await self.registry.start_server()
        await self.cdn.start_server()

    async def close(self) -> None:
        for server in (self.registry, self.cdn):
            if server is not None:
                await server.close()

    async def _token(self, request: web.Request) -> web.Response:
        return web.json_response({"token": TOKEN, "expires_in": 300})

    async def _redirect(self, request: web.Request) -> web.Response:
        assert self.registry is not None and self.cdn is not None
        auth = request.headers.get("Authorization")
        self.registry_auth.append(auth)
        if auth != f"Bearer {TOKEN}":
            realm = self.registry.make_url("/token")
            return web.Response(
                status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="t"'}
            )
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.Response(status=404)
        signed = self.cdn.make_url(f"/cdn/{digest}").with_query(signature="abc")
        return web.Response(status=302, headers={"Location": str(signed)})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.cdn_auth.append(request.headers.get("Authorization"))
        self.cdn_ranges.append(request.headers.get("Range"))
        self.cdn_gets += request.method == "GET"
        if "Authorization" in request.headers:  # S3: "Only one auth mechanism allowed"
            return web.Response(status=400, text="InvalidArgument")
        body = self.blobs[request.match_info["digest"]]
        start = 0
        if request.http_range.start is not None:
            start = request.http_range.start
        status = 206 if start else 200
        headers = {"Content-Length": str(len(body) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        if self.cut_once:
            self.cut_once = False
            await response.write(body[start : len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(body[start:])
        return response


def _blob(size: int, seed: int) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    return f"sha256:{hashlib.sha256(data).hexdigest()}", data


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(dict([_blob(16 << 10, 1), _blob(3 << 20, 2)]))
    await up.start()
    yield up
    await up.close()


async def _cache(
    aiohttp_client: Any, tmp_path: Path, up: Upstream
) -> TestClient[web.Request, web.Application]:
    assert up.registry is not None
    url = str(up.registry.make_url("")).rstrip("/")
    client: TestClient[web.Request, web.Application]
    client = await aiohttp_client(make_app(proxy_config(tmp_path, url)))
    return client


async def test_redirected_blobs_are_fetched_without_the_upstreams_token(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream
) -> None:
    cache = await _cache(aiohttp_client, tmp_path, upstream)
    for digest, data in upstream.blobs.items():  # a small one, and one taken over (>= 1 MiB)
        r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}")
        assert r.status == 200, await r.text()
        assert await r.read() == data
        r = await cache.head(f"/v2/{LOCAL}/blobs/{digest}")
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data))
    assert upstream.cdn_gets == 2  # one fetch per blob
    assert upstream.cdn_auth and not any(upstream.cdn_auth)  # HEADs (not yet committed) too
    assert f"Bearer {TOKEN}" in upstream.registry_auth


async def test_a_redirected_body_that_breaks_off_is_resumed(
    aiohttp_client: Any, tmp_path: Path, upstream: Upstream
) -> None:
    digest, data = max(upstream.blobs.items(), key=lambda item: len(item[1]))
    upstream.cut_once = True
    cache = await _cache(aiohttp_client, tmp_path, upstream)
    r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    # the second CDN request asked for the rest only, and neither carried the token
    assert upstream.cdn_auth == [None, None]
    assert upstream.cdn_ranges[0] is None
    assert upstream.cdn_ranges[1] == f"bytes={len(data) // 2}-"
