"""Helpers for API tests: push blobs and manifests through the HTTP API of a test client."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from aiohttp.test_utils import TestClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
EMPTY_JSON = "application/vnd.oci.empty.v1+json"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


async def push_blob(client: TestClient, repo: str, data: bytes) -> str:
    d = digest_of(data)
    r = await client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": d}, data=io.BytesIO(data))
    assert r.status == 201, await r.text()
    return d


def image_manifest(
    config: bytes,
    layers: list[bytes],
    media_type: str = OCI_MANIFEST,
    indent: int | None = None,
    **extra: Any,
) -> bytes:
    docker = media_type == DOCKER_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(
            "application/vnd.docker.container.image.v1+json"
            if docker
            else "application/vnd.oci.image.config.v1+json",
            config,
        ),
        "layers": [
            descriptor(
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
                if docker
                else "application/vnd.oci.image.layer.v1.tar+gzip",
                layer,
            )
            for layer in layers
        ],
        **extra,
    }
    return json.dumps(doc, indent=indent).encode()


async def push_image(
    client: TestClient,
    repo: str,
    tag: str | None = None,
    seed: bytes = b"",
    media_type: str = OCI_MANIFEST,
    **extra: Any,
) -> tuple[str, bytes]:
    """Push a small image (config + one layer); returns (digest, manifest bytes)."""
    config = b'{"architecture":"amd64","os":"linux","seed":"' + seed + b'"}'
    layer = b"layer-" + seed
    await push_blob(client, repo, config)
    await push_blob(client, repo, layer)
    body = image_manifest(config, [layer], media_type, **extra)
    d = digest_of(body)
    r = await client.put(
        f"/v2/{repo}/manifests/{tag or d}", data=body, headers={"Content-Type": media_type}
    )
    assert r.status == 201, await r.text()
    return d, body


async def error_code(response: Any) -> str:
    body = await response.json(content_type=None)
    return str(body["errors"][0]["code"])
