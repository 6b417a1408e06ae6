"""Routing, the base endpoint, names and the OCI error model on every path."""

from __future__ import annotations

import pytest
from yarl import URL

from storage import Store

from .oci import digest_of, error_code, push_image


async def test_base(client) -> None:
    r = await client.get("/v2/")
    assert r.status == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert await r.json() == {}
    assert (await client.get("/v2")).status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/a/nothing/here", 404, "UNSUPPORTED"),
        ("GET", "/", 404, "UNSUPPORTED"),
        ("POST", "/v2/a/manifests/x", 405, "UNSUPPORTED"),
        ("PUT", "/v2/a/tags/list", 405, "UNSUPPORTED"),
        ("GET", "/v2/UPPER/manifests/x", 400, "NAME_INVALID"),
        ("GET", "/v2/a/_layers/manifests/x", 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2E%2E/b/tags/list", 400, "NAME_INVALID"),
        ("GET", "/v2/a%2Fb/tags/list", 404, "NAME_UNKNOWN"),
        ("POST", "/v2/_a/blobs/uploads/", 400, "NAME_INVALID"),
    ],
)
async def test_errors_are_oci_json(client, method: str, path: str, status: int, code: str) -> None:
    r = await client.request(method, URL(path, encoded=True))
    assert r.status == status
    assert r.headers["Content-Type"] == "application/json"
    assert await error_code(r) == code


async def test_nested_names_containing_api_words(client) -> None:
    """A repository may be called .../manifests/... or .../blobs/...: the path is parsed from the end."""
    d, body = await push_image(client, "a/manifests/b/blobs/uploads", "t")
    r = await client.get(f"/v2/a/manifests/b/blobs/uploads/manifests/{d}")
    assert r.status == 200 and await r.read() == body
    assert (await (await client.get("/v2/a/manifests/b/blobs/uploads/tags/list")).json())[
        "tags"
    ] == ["t"]


async def test_internal_error_has_no_traceback(client, monkeypatch) -> None:
    async def boom(self, *a, **k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(Store, "list_tags", boom)
    r = await client.get("/v2/x/tags/list")
    assert r.status == 500
    text = await r.text()
    assert "UNKNOWN" in text and "secret" not in text and "Traceback" not in text


async def test_head_errors_have_no_body(client) -> None:
    r = await client.head(f"/v2/x/blobs/{digest_of(b'none')}")
    assert r.status == 404
    assert await r.read() == b""


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/", ("base", {})),
        ("/v2", ("base", {})),
        ("/v2/_catalog", ("catalog", {})),
        ("/v2/a/b/manifests/latest", ("manifests", {"name": "a/b", "reference": "latest"})),
        (
            "/v2/a/manifests/b/manifests/c",
            ("manifests", {"name": "a/manifests/b", "reference": "c"}),
        ),
        ("/v2/a/blobs/sha256:x", ("blobs", {"name": "a", "digest": "sha256:x"})),
        ("/v2/a/blobs/uploads/", ("uploads", {"name": "a", "upload": ""})),
        ("/v2/a/blobs/uploads", ("uploads", {"name": "a", "upload": ""})),
        ("/v2/a/blobs/uploads/123-abc", ("uploads", {"name": "a", "upload": "123-abc"})),
        ("/v2/x/blobs/uploads/blobs/d", ("blobs", {"name": "x/blobs/uploads", "digest": "d"})),
        ("/v2/a/b/tags/list", ("tags", {"name": "a/b"})),
        ("/v2/tags/list", None),
        ("/v2/a/referrers/sha256:x", ("referrers", {"name": "a", "digest": "sha256:x"})),
        ("/v2/a/manifests/", None),
        ("/v2/a/nothing/here", None),
        ("/v2/manifests/x", None),
        ("/other", None),
    ],
)
def test_route(path: str, expected: object) -> None:
    from server.app import route

    assert route(path) == expected
