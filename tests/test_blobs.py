"""Blob GET/HEAD/DELETE and Range (distribution-spec end-2, end-10; RFC 9110 14)."""

from __future__ import annotations

import pytest

from .oci import digest_of, error_code, push_blob

BLOB = bytes(range(256)) * 8  # 2048 bytes


async def test_get_and_head(client) -> None:
    d = await push_blob(client, "a/b", BLOB)
    r = await client.get(f"/v2/a/b/blobs/{d}")
    assert r.status == 200
    assert await r.read() == BLOB
    assert r.headers["Docker-Content-Digest"] == d
    assert r.headers["Content-Type"] == "application/octet-stream"
    h = await client.head(f"/v2/a/b/blobs/{d}")
    assert h.status == 200
    assert h.headers["Content-Length"] == str(len(BLOB))
    assert h.headers["Docker-Content-Digest"] == d
    assert await h.read() == b""


async def test_unknown_blob_and_scoping(client) -> None:
    d = await push_blob(client, "one", BLOB)
    r = await client.get(f"/v2/two/blobs/{d}")  # in the store, but not linked into "two"
    assert r.status == 404 and await error_code(r) == "BLOB_UNKNOWN"
    r = await client.head(f"/v2/one/blobs/{digest_of(b'nothing')}")
    assert r.status == 404
    r = await client.get("/v2/one/blobs/sha256:totallywrong")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"


@pytest.mark.parametrize(
    ("header", "status", "expected", "content_range"),
    [
        ("bytes=500-1499", 206, BLOB[500:1500], "bytes 500-1499/2048"),
        ("bytes=500-", 206, BLOB[500:], "bytes 500-2047/2048"),
        ("bytes=-500", 206, BLOB[-500:], "bytes 1548-2047/2048"),
        ("bytes=2000-5000", 206, BLOB[2000:], "bytes 2000-2047/2048"),
        ("bytes=500-0", 416, None, "bytes */2048"),
        ("bytes=5000-10000", 416, None, "bytes */2048"),
        ("bytes=1x-2", 416, None, "bytes */2048"),
        # ignored (RFC 9110 14.2): the whole blob, 200
        ("items=1-2", 200, BLOB, None),
        ("bytes=0-9,100-109", 200, BLOB, None),
    ],
    ids=[
        "middle",
        "open-end",
        "suffix",
        "clamped",
        "reversed",
        "past-end",
        "malformed",
        "other-unit",
        "several",
    ],
)
async def test_range(
    client, header: str, status: int, expected: bytes | None, content_range: str | None
) -> None:
    d = await push_blob(client, "r", BLOB)
    r = await client.get(f"/v2/r/blobs/{d}", headers={"Range": header})
    assert r.status == status
    assert r.headers.get("Content-Range") == content_range
    if status == 200:
        assert r.headers["Content-Length"] == str(len(BLOB))
    if expected is not None:
        assert await r.read() == expected
    else:
        assert await error_code(r) == "RANGE_INVALID"


async def test_delete_unlinks_only_this_repository(client) -> None:
    d = await push_blob(client, "x", BLOB)
    await push_blob(client, "y", BLOB)
    r = await client.delete(f"/v2/x/blobs/{d}")
    assert r.status == 202
    assert (await client.head(f"/v2/x/blobs/{d}")).status == 404
    assert (await client.get(f"/v2/y/blobs/{d}")).status == 200
    r = await client.delete(f"/v2/x/blobs/{d}")
    assert r.status == 404 and await error_code(r) == "BLOB_UNKNOWN"


async def test_zero_byte_blob(client) -> None:
    d = await push_blob(client, "z", b"")
    assert d == digest_of(b"")
    r = await client.get(f"/v2/z/blobs/{d}")
    assert r.status == 200 and await r.read() == b""
