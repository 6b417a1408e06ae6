"""Manifests (distribution-spec end-3, end-7, end-9): exact bytes, media types, digest checks,
reference checks, size limit, negotiation, delete."""

from __future__ import annotations

import io
import json

import pytest

from .oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    digest_of,
    error_code,
    image_manifest,
    push_blob,
    push_image,
)


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_exact_bytes_by_tag_and_digest(client, media_type: str) -> None:
    config, layer = b'{"os":"linux"}', b"layer"
    await push_blob(client, "m/repo", config)
    await push_blob(client, "m/repo", layer)
    # odd formatting, tabs and unknown fields must survive byte for byte
    body = image_manifest(config, [layer], media_type, indent=1, newUnspecifiedField=None).replace(
        b" ", b"\t"
    )
    d = digest_of(body)
    r = await client.put("/v2/m/repo/manifests/v1", data=body, headers={"Content-Type": media_type})
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == d
    assert r.headers["Location"] == f"/v2/m/repo/manifests/{d}"
    for ref in ("v1", d):
        g = await client.get(f"/v2/m/repo/manifests/{ref}", headers={"Accept": media_type})
        assert g.status == 200
        assert await g.read() == body
        assert g.headers["Content-Type"] == media_type
        assert g.headers["Docker-Content-Digest"] == d
        h = await client.head(f"/v2/m/repo/manifests/{ref}")
        assert h.status == 200
        assert h.headers["Content-Length"] == str(len(body))
        assert h.headers["Docker-Content-Digest"] == d
        assert h.headers["Content-Type"] == media_type
        assert await h.read() == b""


async def test_put_by_digest_checks_the_body(client) -> None:
    d, body = await push_image(client, "m", seed=b"1")
    wrong = digest_of(body + b" ")
    r = await client.put(
        f"/v2/m/manifests/{wrong}", data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    r = await client.put(
        "/v2/m/manifests/sha256:baddigeststring", data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 400
    r = await client.put(f"/v2/m/manifests/{d}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201  # same bytes again: still 201


async def test_sha512_manifest_by_digest(client) -> None:
    config, layer = b"{}", b"l"
    await push_blob(client, "m5", config)
    await push_blob(client, "m5", layer)
    body = image_manifest(config, [layer])
    d = digest_of(body, "sha512")
    r = await client.put(f"/v2/m5/manifests/{d}", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201 and r.headers["Docker-Content-Digest"] == d
    assert await (await client.get(f"/v2/m5/manifests/{d}")).read() == body


async def test_missing_blobs_are_refused(client) -> None:
    config = b"{}"
    await push_blob(client, "m", config)
    body = image_manifest(config, [b"never pushed"])
    r = await client.put("/v2/m/manifests/t", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"
    assert (await client.get("/v2/m/manifests/t")).status == 404
    # blobs in the store but in another repository do not count (OCI scoping)
    await push_blob(client, "other", b"elsewhere")
    body = image_manifest(config, [b"elsewhere"])
    r = await client.put("/v2/m/manifests/t", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 400 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"


async def test_foreign_layers_need_not_be_pushed(client) -> None:
    config = b"{}"
    await push_blob(client, "f", config)
    doc = json.loads(image_manifest(config, []))
    doc["layers"] = [
        descriptor(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            b"windows base",
            urls=["https://example.invalid/x"],
        )
    ]
    body = json.dumps(doc).encode()
    r = await client.put("/v2/f/manifests/t", data=body, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201


@pytest.mark.parametrize("index_type", [OCI_INDEX, DOCKER_LIST])
async def test_index_requires_children(client, index_type: str) -> None:
    child_type = OCI_MANIFEST if index_type == OCI_INDEX else DOCKER_MANIFEST
    _d1, b1 = await push_image(client, "idx", seed=b"amd64", media_type=child_type)
    _d2, b2 = await push_image(client, "idx", seed=b"arm64", media_type=child_type)
    children = [
        {**descriptor(child_type, b1), "platform": {"architecture": "amd64", "os": "linux"}},
        {**descriptor(child_type, b2), "platform": {"architecture": "arm64", "os": "linux"}},
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": children}).encode()
    r = await client.put("/v2/idx/manifests/multi", data=body, headers={"Content-Type": index_type})
    assert r.status == 201
    g = await client.get("/v2/idx/manifests/multi", headers={"Accept": index_type})
    assert await g.read() == body and g.headers["Content-Type"] == index_type
    missing = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [descriptor(child_type, b"nope")],
        }
    ).encode()
    r = await client.put(
        "/v2/idx/manifests/bad", data=missing, headers={"Content-Type": index_type}
    )
    assert r.status == 400 and await error_code(r) == "MANIFEST_BLOB_UNKNOWN"


async def test_empty_index_and_manifest_without_media_type(client) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    r = await client.put("/v2/e/manifests/empty", data=body, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    await push_blob(client, "e", b"{}")
    doc = {
        "schemaVersion": 2,
        "config": descriptor("application/vnd.oci.image.config.v1+json", b"{}"),
        "layers": [],
    }
    body = json.dumps(doc).encode()
    r = await client.put(
        "/v2/e/manifests/emptylayer", data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 201
    g = await client.get("/v2/e/manifests/emptylayer")
    assert g.headers["Content-Type"] == OCI_MANIFEST and await g.read() == body


@pytest.mark.parametrize(
    ("body", "content_type", "fragment"),
    [
        (b"not json", OCI_MANIFEST, "not valid JSON"),
        (b"[]", OCI_MANIFEST, "not a JSON object"),
        (
            json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "schema1",
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(),
            OCI_MANIFEST,
            "does not match",
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": "application/x-weird"}).encode(),
            None,
            "unsupported manifest media type",
        ),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"digest": "sha256:zz", "size": 1},
                    "layers": [],
                }
            ).encode(),
            OCI_MANIFEST,
            "config",
        ),
    ],
    ids=["garbage", "array", "schema1", "type-mismatch", "unknown-type", "bad-descriptor"],
)
async def test_invalid_manifests(
    client, body: bytes, content_type: str | None, fragment: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await client.put("/v2/bad/manifests/t", data=body, headers=headers)
    assert r.status == 400
    doc = await r.json()
    assert doc["errors"][0]["code"] == "MANIFEST_INVALID"
    assert fragment in doc["errors"][0]["message"]


async def test_size_limit(client) -> None:
    await push_blob(client, "big", b"{}")
    pad = "x" * (4 * 1024 * 1024)
    body = image_manifest(b"{}", [], annotations={"pad": pad})
    r = await client.put(
        "/v2/big/manifests/t", data=io.BytesIO(body), headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 413
    assert await error_code(r) == "SIZE_INVALID"
    # just under 4 MiB is fine (the conformance suite pushes ~3.9 MB)
    body = image_manifest(b"{}", [], annotations={"pad": "x" * 3_900_000})
    r = await client.put(
        "/v2/big/manifests/t", data=io.BytesIO(body), headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 201


async def test_unknown_and_invalid_references(client) -> None:
    await push_image(client, "u", "v1")
    for ref in ("nope", ".INVALID_MANIFEST_NAME", digest_of(b"absent")):
        assert (await client.get(f"/v2/u/manifests/{ref}")).status == 404
        assert (await client.head(f"/v2/u/manifests/{ref}")).status == 404
    r = await client.get("/v2/u/manifests/sha256:totallywrong")
    assert r.status == 400 and await error_code(r) == "DIGEST_INVALID"
    r = await client.put(
        "/v2/u/manifests/-bad-tag", data=b"{}", headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 400 and await error_code(r) == "TAG_INVALID"


async def test_negotiation_by_tag(client) -> None:
    """As distribution does: an OCI manifest is refused to a client that names only other
    manifest types; a Docker schema2 one is served whatever the Accept header (a client
    asking for OCI only reads it all the same, by its Content-Type)."""
    await push_image(client, "o", "v1", media_type=OCI_MANIFEST)
    r = await client.get("/v2/o/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    assert r.status == 404 and await error_code(r) == "MANIFEST_UNKNOWN"
    await push_image(client, "n", "v1", media_type=DOCKER_MANIFEST)
    r = await client.get("/v2/n/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert r.status == 200 and r.headers["Content-Type"] == DOCKER_MANIFEST
    for accept in (f"{OCI_MANIFEST}, {DOCKER_MANIFEST};q=0.9", "*/*", "application/json"):
        r = await client.get("/v2/n/manifests/v1", headers={"Accept": accept})
        assert r.status == 200, accept
    r = await client.get(
        "/v2/n/manifests/v1", headers=[("Accept", OCI_MANIFEST), ("Accept", DOCKER_MANIFEST)]
    )
    assert r.status == 200


async def test_delete_by_digest_removes_its_tags(client) -> None:
    d, _ = await push_image(client, "del", "a", seed=b"s")
    for t in ("b", "c"):
        await push_image(client, "del", t, seed=b"s")
    _other, _ = await push_image(client, "del", "keep", seed=b"other")
    r = await client.delete(f"/v2/del/manifests/{d}")
    assert r.status == 202
    assert (await client.get(f"/v2/del/manifests/{d}")).status == 404
    for t in ("a", "b", "c"):
        assert (await client.head(f"/v2/del/manifests/{t}")).status == 404
    tags = (await (await client.get("/v2/del/tags/list")).json())["tags"]
    assert tags == ["keep"]
    assert (await client.delete(f"/v2/del/manifests/{d}")).status == 404
    assert (await client.delete(f"/v2/nothere/manifests/{d}")).status == 404


async def test_delete_tag_keeps_manifest(client) -> None:
    d, _ = await push_image(client, "dt", "a")
    await push_image(client, "dt", "b")
    r = await client.delete("/v2/dt/manifests/a")
    assert r.status == 202
    assert (await client.head("/v2/dt/manifests/a")).status == 404
    assert (await client.head("/v2/dt/manifests/b")).status == 200
    assert (await client.head(f"/v2/dt/manifests/{d}")).status == 200
    assert (await client.delete("/v2/dt/manifests/a")).status == 404


async def test_put_with_extra_tags(client) -> None:
    config, layer = b"{}", b"x"
    await push_blob(client, "tt", config)
    await push_blob(client, "tt", layer)
    body = image_manifest(config, [layer])
    d = digest_of(body)
    r = await client.put(
        f"/v2/tt/manifests/{d}?tag=one&tag=two", data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 201
    assert r.headers["OCI-Tag"] == "one, two"
    assert (await (await client.get("/v2/tt/tags/list")).json())["tags"] == ["one", "two"]


async def test_cached_tags_and_manifests_follow_other_workers(client, config) -> None:
    """Worker A caches a tag; worker B (another app on the same root) moves it and deletes a
    manifest: A sees both at once."""
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import make_app

    d1, b1 = await push_image(client, "cw", "t", seed=b"1")
    for _ in range(2):  # the second read is a cache hit
        assert await (await client.get("/v2/cw/manifests/t")).read() == b1
    async with TestClient(TestServer(make_app(config))) as other:
        d2, b2 = await push_image(other, "cw", "t", seed=b"2")
        r = await client.get("/v2/cw/manifests/t")
        assert await r.read() == b2 and r.headers["Docker-Content-Digest"] == d2
        assert (await client.head(f"/v2/cw/manifests/{d1}")).status == 200
        assert (await other.delete(f"/v2/cw/manifests/{d1}")).status == 202
        assert (await client.get(f"/v2/cw/manifests/{d1}")).status == 404
        assert (await other.delete("/v2/cw/manifests/t")).status == 202
        assert (await client.get("/v2/cw/manifests/t")).status == 404
