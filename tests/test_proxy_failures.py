"""The pull-through cache against an upstream that lies, truncates, stalls or is overloaded:
nothing wrong is ever cached, clients get a short body or a prompt error, a retry refetches."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from server.app import make_app
from server.config import Config, StorageConfig, UpstreamConfig
from server.context import STORE
from server.upstream import MAX_RESUMES
from storage import Digest
from tests.upstream import Behavior, LyingUpstream, Serve, Stall, Status, Truncate, WrongBytes

from .oci import DOCKER_MANIFEST, error_code, image_manifest

REPO = "team/app"
LOCAL = f"quay.io/{REPO}"
BLOB = os.urandom(2 * 1024 * 1024)


@pytest.fixture
async def cache(aiohttp_client, tmp_path: Path, lying_upstream: LyingUpstream):  # type: ignore[no-untyped-def]
    up = UpstreamConfig(
        host="quay.io",
        url=lying_upstream.url,
        namespace="quay.io",
        connect_timeout=2,
        read_timeout=1.5,
    )
    config = Config(storage=StorageConfig(root=str(tmp_path / "cache")), upstreams={"quay.io": up})
    return await aiohttp_client(make_app(config))


async def fetch(cache, digest: str) -> tuple[int, bytes | None]:  # type: ignore[no-untyped-def]
    """Status and body; None as body if the connection was cut short."""
    r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}")
    try:
        return r.status, await r.read()
    except aiohttp.ClientPayloadError:
        return r.status, None


async def assert_cached_soon(cache, digest: str) -> None:  # type: ignore[no-untyped-def]
    """The whole blob is committed to the store within 5 s (the fetch may outlive the client)."""
    store = cache.server.app[STORE]
    for _ in range(100):
        if await store.blob_size(Digest.parse(digest)) is not None:
            break
        await asyncio.sleep(0.05)
    assert await store.blob_size(Digest.parse(digest)) == len(BLOB)


async def assert_not_cached(cache, digest: str) -> None:  # type: ignore[no-untyped-def]
    store = cache.server.app[STORE]
    assert await store.blob_size(Digest.parse(digest)) is None


def broken_every_time(lie: Behavior) -> list[Behavior]:
    """``lie`` for the first request and for every resume of it (the fetch gives up), then
    the right bytes."""
    if isinstance(lie, WrongBytes):  # a complete body: nothing to resume
        return [lie, Serve()]
    return [lie] * (1 + MAX_RESUMES) + [Serve()]


@pytest.mark.parametrize(
    "lie",
    [WrongBytes(), Truncate(), Stall(seconds=10)],
    ids=["wrong-bytes", "truncated", "stalled"],
)
async def test_bad_body_is_never_cached_and_retry_refetches(
    cache, lying_upstream: LyingUpstream, lie
) -> None:  # type: ignore[no-untyped-def]
    plan = broken_every_time(lie)
    digest = lying_upstream.add_blob(REPO, BLOB, *plan)
    status, body = await fetch(cache, digest)
    # the connection is cut before the last piece (or an error answers): never a complete body
    assert body is None or status >= 400, (status, len(body))
    await assert_not_cached(cache, digest)
    # the next request fetches again and gets the right bytes
    for _ in range(50):
        status, body = await fetch(cache, digest)
        if body == BLOB:
            break
        await asyncio.sleep(0.1)
    assert status == 200 and body == BLOB
    assert lying_upstream.count("GET", f"/blobs/{digest}") == len(plan)
    status, body = await fetch(cache, digest)
    assert body == BLOB
    assert lying_upstream.count("GET", f"/blobs/{digest}") == len(plan)  # now from the cache


@pytest.mark.parametrize(
    "lie", [Truncate(), Stall(seconds=10)], ids=["connection-closed", "read-timeout"]
)
@pytest.mark.parametrize("ranges", [True, False], ids=["206", "200-without-range-support"])
async def test_a_body_that_breaks_off_is_resumed_where_it_stopped(
    cache, lying_upstream: LyingUpstream, lie, ranges: bool
) -> None:  # type: ignore[no-untyped-def]
    digest = lying_upstream.add_blob(REPO, BLOB, lie, Serve(ranges=ranges))
    status, body = await fetch(cache, digest)
    assert status == 200 and body == BLOB  # the client never noticed
    half = len(BLOB) // 2
    assert lying_upstream.ranges(f"/blobs/{digest}") == [None, f"bytes={half}-"]
    await assert_cached_soon(cache, digest)


async def test_a_resume_answered_with_other_bytes_is_not_cached(
    cache, lying_upstream: LyingUpstream
) -> None:
    # the resumed part comes from content that changed meanwhile: the digest check catches it
    digest = lying_upstream.add_blob(REPO, BLOB, Truncate(), WrongBytes())
    status, body = await fetch(cache, digest)
    assert body is None or status >= 400
    await assert_not_cached(cache, digest)


async def test_stall_before_headers_fails_within_timeout(
    cache, lying_upstream: LyingUpstream
) -> None:
    digest = lying_upstream.add_blob(REPO, BLOB, Stall(seconds=30, before_headers=True))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, _ = await fetch(cache, digest)
    assert status == 502
    assert loop.time() - t0 < 10
    await assert_not_cached(cache, digest)


async def test_overloaded_upstream_is_retried_honouring_retry_after(
    cache, lying_upstream: LyingUpstream
) -> None:
    digest = lying_upstream.add_blob(
        REPO, BLOB, Status(503, retry_after=1), Status(429, retry_after=0), Serve()
    )
    status, body = await fetch(cache, digest)
    assert status == 200 and body == BLOB
    assert lying_upstream.count("GET", f"/blobs/{digest}") == 3


async def test_upstream_error_after_retries_is_a_502(cache, lying_upstream: LyingUpstream) -> None:
    digest = lying_upstream.add_blob(REPO, BLOB, Status(503))
    status, _ = await fetch(cache, digest)
    assert status == 502


async def test_manifest_with_wrong_bytes_is_refused(
    cache, lying_upstream: LyingUpstream, caplog
) -> None:  # type: ignore[no-untyped-def]
    config, layer = b"{}", b"layer"
    lying_upstream.add_blob(REPO, config)
    lying_upstream.add_blob(REPO, layer)
    body = image_manifest(config, [layer], DOCKER_MANIFEST)
    digest = lying_upstream.add_manifest(
        REPO, body, DOCKER_MANIFEST, tags=["v1"], behaviors=[WrongBytes(), Serve()]
    )
    r = await cache.get(f"/v2/{LOCAL}/manifests/{digest}")
    assert r.status == 502 and await error_code(r) == "UNKNOWN"
    assert "sent an invalid answer" in (await r.json())["errors"][0]["message"]
    assert f"not {digest}" in caplog.text  # the details are in the log
    r = await cache.get(f"/v2/{LOCAL}/manifests/{digest}")
    assert r.status == 200 and await r.read() == body


async def test_tag_whose_body_contradicts_its_digest_header_is_refused(
    cache, lying_upstream: LyingUpstream
) -> None:
    body = image_manifest(b"{}", [], DOCKER_MANIFEST)
    digest = lying_upstream.add_manifest(REPO, body, DOCKER_MANIFEST, tags=["v1"])
    lying_upstream.set_behavior(lying_upstream.manifest_path(REPO, "v1"), WrongBytes())
    r = await cache.get(f"/v2/{LOCAL}/manifests/v1")
    assert r.status == 502
    assert "announced" in (await r.json())["errors"][0]["message"]  # our check, not upstream text
    store = cache.server.app[STORE]
    assert await store.blob_size(Digest.parse(digest)) is None


async def test_cache_write_survives_the_client_leaving(
    cache, lying_upstream: LyingUpstream
) -> None:
    # the upstream sends half, pauses, then finishes: the client reads its first bytes
    # (time to first byte does not wait for the whole blob) and hangs up during the pause
    digest = lying_upstream.add_blob(REPO, BLOB, Stall(seconds=0.8, then="finish"))
    r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}")
    assert r.status == 200 and r.headers["Content-Length"] == str(len(BLOB))
    first = await r.content.readexactly(1024)
    assert first == BLOB[:1024]
    r.close()
    await assert_cached_soon(cache, digest)
    status, body = await fetch(cache, digest)
    assert status == 200 and body == BLOB
    assert lying_upstream.count("GET", f"/blobs/{digest}") == 1


async def test_range_on_an_uncached_blob_streams_that_range(
    cache, lying_upstream: LyingUpstream
) -> None:
    digest = lying_upstream.add_blob(REPO, BLOB)
    r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
    assert r.status == 206
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
    assert await r.read() == BLOB[1000:2000]
    # several ranges: the whole blob (as from the store: tests/test_blobs.py)
    r = await cache.get(f"/v2/{LOCAL}/blobs/{digest}", headers={"Range": "bytes=0-9,20-29"})
    assert r.status == 200 and "Content-Range" not in r.headers
    assert await r.read() == BLOB


async def test_a_failed_fetch_does_not_fail_the_next_burst(
    cache, lying_upstream: LyingUpstream
) -> None:
    plan = broken_every_time(Truncate())
    digest = lying_upstream.add_blob(REPO, BLOB, *plan)
    status, body = await fetch(cache, digest)
    assert body is None or status >= 400
    results = await asyncio.gather(*(fetch(cache, digest) for _ in range(30)))
    assert [s for s, _ in results] == [200] * 30
    assert all(b == BLOB for _, b in results)
    assert lying_upstream.count("GET", f"/blobs/{digest}") == len(plan)
