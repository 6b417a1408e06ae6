"""Tag listing and catalog with n / last pagination and Link headers."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from .oci import error_code, push_blob, push_image

TAGS = ["1.0", "10", "2.0", "A", "_z", "latest", "v1"]


@pytest.fixture
async def tagged(client):
    for t in reversed(TAGS):
        await push_image(client, "t/repo", t)
    return client


async def test_tags_sorted(tagged) -> None:
    r = await tagged.get("/v2/t/repo/tags/list")
    assert r.status == 200
    assert await r.json() == {"name": "t/repo", "tags": sorted(TAGS)}
    assert "Link" not in r.headers


async def test_tags_pagination_follows_links(tagged) -> None:
    seen: list[str] = []
    url = "/v2/t/repo/tags/list?n=3"
    while url:
        r = await tagged.get(url)
        page = (await r.json())["tags"]
        assert len(page) <= 3
        seen += page
        link = r.headers.get("Link")
        if link:
            assert link.endswith('; rel="next"')
            url = link[1 : link.index(">")]
            q = parse_qs(urlsplit(url).query)
            assert q["n"] == ["3"] and q["last"] == [page[-1]]
        else:
            url = ""
    assert seen == sorted(TAGS)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("n=0", []),
        ("n=2", sorted(TAGS)[:2]),
        ("last=A", [t for t in sorted(TAGS) if t > "A"]),
        ("n=1&last=A", [t for t in sorted(TAGS) if t > "A"][:1]),
        ("last=zzz", []),
        ("n=100", sorted(TAGS)),
    ],
)
async def test_tags_page_params(tagged, query: str, expected: list[str]) -> None:
    r = await tagged.get(f"/v2/t/repo/tags/list?{query}")
    assert r.status == 200
    assert (await r.json())["tags"] == expected


async def test_tags_errors(client) -> None:
    r = await client.get("/v2/never/tags/list")
    assert r.status == 404 and await error_code(r) == "NAME_UNKNOWN"
    await push_blob(client, "blobonly", b"x")
    r = await client.get("/v2/blobonly/tags/list")
    assert r.status == 200 and (await r.json())["tags"] == []
    await push_image(client, "p", "x")
    r = await client.get("/v2/p/tags/list?n=-1")
    assert r.status == 400 and await error_code(r) == "PAGINATION_NUMBER_INVALID"


async def test_catalog(client) -> None:
    names = ["b", "a/c", "a", "quay.io/openshift-release-dev/ocp-release", "a/b/c"]
    for n in names:
        await push_image(client, n, "t")
    r = await client.get("/v2/_catalog")
    assert (await r.json()) == {"repositories": sorted(names)}
    r = await client.get("/v2/_catalog?n=2")
    assert (await r.json())["repositories"] == sorted(names)[:2]
    assert r.headers["Link"].startswith("</v2/_catalog?n=2&last=a%2Fb%2Fc>")
    r = await client.get("/v2/_catalog?n=2&last=a%2Fc")
    assert (await r.json())["repositories"] == ["b", "quay.io/openshift-release-dev/ocp-release"]


async def test_empty_catalog(client) -> None:
    assert await (await client.get("/v2/_catalog")).json() == {"repositories": []}
