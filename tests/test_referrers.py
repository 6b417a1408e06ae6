"""Referrers API and OCI-Subject (distribution-spec "Listing Referrers", end-12)."""

from __future__ import annotations

import json

from .oci import EMPTY_JSON, OCI_INDEX, OCI_MANIFEST, descriptor, digest_of, push_blob, push_image


async def push_referrer(
    client, repo: str, subject: dict, artifact_type: str | None, config_type: str, note: str
) -> str:
    config = b"{}" if config_type == EMPTY_JSON else b"custom-config-" + note.encode()
    await push_blob(client, repo, config)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [],
        "subject": subject,
        "annotations": {"org.opencontainers.conformance.test": note},
    }
    if artifact_type:
        doc["artifactType"] = artifact_type
    body = json.dumps(doc).encode()
    r = await client.put(
        f"/v2/{repo}/manifests/{digest_of(body)}", data=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status == 201, await r.text()
    assert r.headers["OCI-Subject"] == subject["digest"]
    return digest_of(body)


async def test_referrers_listing_and_filter(client) -> None:
    subject_digest, subject_body = await push_image(client, "ref", "base")
    subject = descriptor(OCI_MANIFEST, subject_body)
    a = await push_referrer(
        client, "ref", subject, None, "application/vnd.nhl.peanut.butter.bagel", "a-config"
    )
    b = await push_referrer(
        client, "ref", subject, "application/vnd.nhl.peanut.butter.bagel", EMPTY_JSON, "a-layer"
    )
    c = await push_referrer(client, "ref", subject, "application/vnd.other", EMPTY_JSON, "b")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": "application/vnd.food.stand",
            "manifests": [],
            "subject": subject,
        }
    ).encode()
    r = await client.put(
        f"/v2/ref/manifests/{digest_of(index)}", data=index, headers={"Content-Type": OCI_INDEX}
    )
    assert r.status == 201 and r.headers["OCI-Subject"] == subject_digest

    r = await client.get(f"/v2/ref/referrers/{subject_digest}")
    assert r.status == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    doc = await r.json(content_type=None)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in doc["manifests"]}
    assert set(by_digest) == {a, b, c, digest_of(index)}
    assert (
        by_digest[a]["artifactType"] == "application/vnd.nhl.peanut.butter.bagel"
    )  # from config.mediaType
    assert by_digest[a]["annotations"] == {"org.opencontainers.conformance.test": "a-config"}
    assert by_digest[digest_of(index)]["mediaType"] == OCI_INDEX
    assert by_digest[digest_of(index)]["artifactType"] == "application/vnd.food.stand"

    r = await client.get(
        f"/v2/ref/referrers/{subject_digest}",
        params={"artifactType": "application/vnd.nhl.peanut.butter.bagel"},
    )
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert {m["digest"] for m in (await r.json(content_type=None))["manifests"]} == {a, b}

    # deleting a referrer removes it from the list
    assert (await client.delete(f"/v2/ref/manifests/{c}")).status == 202
    r = await client.get(f"/v2/ref/referrers/{subject_digest}")
    assert c not in {m["digest"] for m in (await r.json(content_type=None))["manifests"]}


async def test_dangling_subject_and_unknown_subject(client) -> None:
    ghost = {"mediaType": OCI_MANIFEST, "digest": digest_of(b"never pushed"), "size": 12}
    d = await push_referrer(client, "dang", ghost, "application/vnd.sig", EMPTY_JSON, "sig")
    r = await client.get(f"/v2/dang/referrers/{ghost['digest']}")
    assert [m["digest"] for m in (await r.json(content_type=None))["manifests"]] == [d]
    r = await client.get(f"/v2/nowhere/referrers/{digest_of(b'x')}")
    assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX
    assert (await r.json(content_type=None))["manifests"] == []
    r = await client.get("/v2/dang/referrers/sha256:bad")
    assert r.status == 400


async def test_tag_schema_fallback_is_included(client) -> None:
    subject_digest, _ = await push_image(client, "fb", "base")
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(b"old-style"),
        "size": 9,
        "artifactType": "application/vnd.old",
    }
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    # an index pushed by a client that used the <alg>-<hex> tag schema (children need not exist
    # for this test: push an empty index, then rewrite the expectation through the store)
    tag = subject_digest.replace(":", "-")
    r = await client.put(f"/v2/fb/manifests/{tag}", data=index, headers={"Content-Type": OCI_INDEX})
    assert r.status == 201
    r = await client.get(f"/v2/fb/referrers/{subject_digest}")
    assert (await r.json(content_type=None))["manifests"] == []
    d2, body2 = await push_image(client, "fb", seed=b"sig")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**descriptor(OCI_MANIFEST, body2), "artifactType": "application/vnd.old"}
            ],
        }
    ).encode()
    assert (
        await client.put(f"/v2/fb/manifests/{tag}", data=index, headers={"Content-Type": OCI_INDEX})
    ).status == 201
    r = await client.get(f"/v2/fb/referrers/{subject_digest}")
    manifests = (await r.json(content_type=None))["manifests"]
    assert [m["digest"] for m in manifests] == [d2]
    assert manifests[0]["artifactType"] == entry["artifactType"]
