"""Blob uploads (distribution-spec "Pushing blobs"): monolithic, POST+PUT, chunked, streamed,
status, cancel, cross-repository mount, digest and size verification."""

from __future__ import annotations

import hashlib
import io
import os

from .oci import digest_of, error_code, push_blob

BLOB = os.urandom(42)


async def start(client, repo: str = "up") -> str:
    r = await client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status == 202
    assert r.headers["Range"] == "0-0"
    assert r.headers["Location"].startswith(f"/v2/{repo}/blobs/uploads/")
    assert r.headers["Docker-Upload-UUID"] in r.headers["Location"]
    return r.headers["Location"]


async def test_post_then_put_whole_body(client) -> None:
    loc = await start(client)
    d = digest_of(BLOB)
    r = await client.put(loc, params={"digest": d}, data=BLOB)
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/up/blobs/{d}"
    assert r.headers["Docker-Content-Digest"] == d
    assert await (await client.get(r.headers["Location"])).read() == BLOB
    assert (await client.get(loc)).status == 404  # the session is gone


async def test_chunked_upload_with_stale_url_retry_and_status(client) -> None:
    post_loc = await start(client)
    r = await client.patch(post_loc, data=BLOB[22:], headers={"Content-Range": "22-41"})
    assert r.status == 416  # out of order on an empty session
    post_loc = await start(client)
    r = await client.patch(
        post_loc,
        data=BLOB[:22],
        headers={"Content-Range": "0-21", "Content-Type": "application/octet-stream"},
    )
    assert r.status == 202
    assert r.headers["Range"] == "0-21"
    loc = r.headers["Location"]
    # the same chunk again on the original URL: refused, nothing appended
    r = await client.patch(post_loc, data=BLOB[:22], headers={"Content-Range": "0-21"})
    assert r.status == 416 and await error_code(r) == "RANGE_INVALID"
    status = await client.get(post_loc)
    assert status.status == 204
    assert status.headers["Range"] == "0-21"
    assert status.headers["Location"]
    r = await client.patch(loc, data=BLOB[22:], headers={"Content-Range": "22-41"})
    assert r.status == 202 and r.headers["Range"] == "0-41"
    r = await client.put(
        r.headers["Location"], params={"digest": digest_of(BLOB)}, headers={"Content-Length": "0"}
    )
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{digest_of(BLOB)}")).read() == BLOB


async def test_last_chunk_in_put(client) -> None:
    loc = await start(client)
    r = await client.patch(loc, data=BLOB[:30], headers={"Content-Range": "0-29"})
    assert r.status == 202
    r = await client.put(
        loc, params={"digest": digest_of(BLOB)}, data=BLOB[30:], headers={"Content-Range": "30-41"}
    )
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{digest_of(BLOB)}")).read() == BLOB


async def test_streamed_patch_without_content_range(client) -> None:
    big = os.urandom(3 * 1024 * 1024 + 5)

    async def gen():  # chunked transfer encoding, no Content-Length
        for i in range(0, len(big), 100_000):
            yield big[i : i + 100_000]

    loc = await start(client)
    r = await client.patch(loc, data=gen())
    assert r.status == 202 and r.headers["Range"] == f"0-{len(big) - 1}"
    r = await client.put(r.headers["Location"], params={"digest": digest_of(big)})
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{digest_of(big)}")).read() == big


async def test_digest_mismatch_makes_nothing_visible(client) -> None:
    wrong = digest_of(b"something else")
    r = await client.post("/v2/up/blobs/uploads/", params={"digest": wrong}, data=BLOB)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/up/blobs/{wrong}")).status == 404
    assert (await client.head(f"/v2/up/blobs/{digest_of(BLOB)}")).status == 404
    loc = await start(client)
    r = await client.put(loc, params={"digest": wrong}, data=BLOB)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    assert (await client.head(f"/v2/up/blobs/{wrong}")).status == 404


async def test_put_without_digest_and_bad_digest(client) -> None:
    loc = await start(client)
    r = await client.put(loc, data=BLOB)
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    r = await client.put(loc, params={"digest": "sha256:nothex"}, data=b"")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


async def test_size_mismatch_between_content_length_and_range(client) -> None:
    loc = await start(client)
    r = await client.patch(loc, data=BLOB[:10], headers={"Content-Range": "0-19"})
    assert r.status == 400 and await error_code(r) == "SIZE_INVALID"


async def test_sha512_blob(client) -> None:
    d = digest_of(BLOB, "sha512")
    r = await client.post("/v2/up/blobs/uploads/", params={"digest": d}, data=BLOB)
    assert r.status == 201 and r.headers["Docker-Content-Digest"] == d
    loc = await start(client)
    await client.patch(loc, data=BLOB[:5], headers={"Content-Range": "0-4"})
    r = await client.put(
        loc, params={"digest": d}, data=BLOB[5:], headers={"Content-Range": "5-41"}
    )
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{d}")).read() == BLOB


async def test_cancel_and_unknown_sessions(client) -> None:
    loc = await start(client)
    r = await client.delete(loc)
    assert r.status == 204
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        r = await client.request(
            method, loc, params={"digest": digest_of(b"")} if method == "PUT" else None
        )
        assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN", method
    r = await client.get("/v2/up/blobs/uploads/not-a-uuid!")
    assert r.status == 404
    other = await start(client, "elsewhere")
    r = await client.get(other.replace("/elsewhere/", "/up/"))  # session of another repository
    assert r.status == 404 and await error_code(r) == "BLOB_UPLOAD_UNKNOWN"


async def test_cross_repository_mount(client) -> None:
    d = await push_blob(client, "src/repo", BLOB)
    r = await client.post("/v2/dst/blobs/uploads/", params={"mount": d, "from": "src/repo"})
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/dst/blobs/{d}"
    assert await (await client.get(r.headers["Location"])).read() == BLOB
    # a blob the source does not hold is never mounted: an ordinary session starts
    missing = digest_of(b"missing")
    r = await client.post("/v2/dst2/blobs/uploads/", params={"mount": missing, "from": "src/repo"})
    assert r.status == 202 and r.headers["Location"].startswith("/v2/dst2/blobs/uploads/")
    # the source must really hold it, even if the store has it elsewhere
    other = await push_blob(client, "third", b"only in third")
    r = await client.post("/v2/dst3/blobs/uploads/", params={"mount": other, "from": "src/repo"})
    assert r.status == 202
    assert (await client.head(f"/v2/dst3/blobs/{other}")).status == 404


async def test_automatic_mount_without_from(client) -> None:
    d = await push_blob(client, "has", BLOB)
    r = await client.post("/v2/auto/blobs/uploads/", params={"mount": d})
    assert r.status == 201 and r.headers["Location"] == f"/v2/auto/blobs/{d}"
    r = await client.post("/v2/auto/blobs/uploads/", params={"mount": digest_of(b"nowhere")})
    assert r.status == 202


async def test_session_resumes_in_another_process_state(client, config) -> None:
    """A second app on the same root (another worker) can continue and finish a session."""
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import make_app

    loc = await start(client)
    await client.patch(loc, data=BLOB[:20], headers={"Content-Range": "0-19"})
    async with TestClient(TestServer(make_app(config))) as other:
        r = await other.patch(loc, data=BLOB[20:], headers={"Content-Range": "20-41"})
        assert r.status == 202
    r = await client.put(loc, params={"digest": digest_of(BLOB)})
    assert r.status == 201  # this process's running hash was stale: it re-hashed from disk
    body = await (await client.get(f"/v2/up/blobs/{digest_of(BLOB)}")).read()
    assert hashlib.sha256(body).hexdigest() == digest_of(BLOB).split(":")[1]


async def test_bodies_without_newlines(client) -> None:
    """Bodies are read in pieces, never line by line (a long run without b"\\n" is fine)."""
    zeros = bytes(3 * 1024 * 1024)
    d = digest_of(zeros)
    r = await client.post("/v2/up/blobs/uploads/", params={"digest": d}, data=io.BytesIO(zeros))
    assert r.status == 201
    loc = await start(client)
    r = await client.patch(
        loc, data=io.BytesIO(zeros), headers={"Content-Range": f"0-{len(zeros) - 1}"}
    )
    assert r.status == 202
    r = await client.put(loc, params={"digest": d}, data=io.BytesIO(b""))
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{d}")).read() == zeros


async def test_a_session_is_used_by_one_request_at_a_time(client) -> None:
    """A PUT racing a slow PATCH on the same session must not commit bytes that arrive after
    its digest check (the pool would then hold wrong bytes under that digest)."""
    import asyncio

    loc = await start(client)
    first = b"a" * 100
    release = asyncio.Event()

    async def slow_body():  # type: ignore[no-untyped-def]
        yield first
        await release.wait()
        yield b"b" * 100

    patch = asyncio.ensure_future(client.patch(loc, data=slow_body()))
    await asyncio.sleep(0.3)  # the PATCH holds the session now
    r = await client.put(loc, params={"digest": digest_of(first)})
    assert r.status == 400 and await error_code(r) == "BLOB_UPLOAD_INVALID"
    r = await client.patch(loc, data=b"c", headers={"Content-Range": "0-0"})
    assert r.status == 400 and await error_code(r) == "BLOB_UPLOAD_INVALID"
    release.set()
    assert (await patch).status == 202
    assert (await client.head(f"/v2/up/blobs/{digest_of(first)}")).status == 404
    whole = first + b"b" * 100
    r = await client.put(loc, params={"digest": digest_of(whole)})
    assert r.status == 201
    assert await (await client.get(f"/v2/up/blobs/{digest_of(whole)}")).read() == whole


async def test_concurrent_puts_commit_at_most_once_and_right(client) -> None:
    import asyncio

    loc = await start(client)
    await client.patch(loc, data=BLOB, headers={"Content-Range": f"0-{len(BLOB) - 1}"})
    results = await asyncio.gather(
        *(client.put(loc, params={"digest": digest_of(BLOB)}) for _ in range(5))
    )
    statuses = sorted(r.status for r in results)
    assert statuses.count(201) >= 1
    assert all(s in (201, 400, 404) for s in statuses)
    assert await (await client.get(f"/v2/up/blobs/{digest_of(BLOB)}")).read() == BLOB
