"""Reading release-manifests/ from layers: top layer wins, whiteouts hide, bounded reads."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from server.release import ReleaseError, parse_image_references, read_payload
from storage import Digest


def layer(tmp_path: Path, files: dict[str, bytes | None], name: str) -> tuple[Digest, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(raw.getvalue(), mtime=0)
    digest = Digest.of(blob)
    path = tmp_path / name
    path.write_bytes(blob)
    return digest, str(path)


def image_references(version: str, names: list[str]) -> bytes:
    tags = [
        {
            "name": n,
            "from": {
                "kind": "DockerImage",
                "name": f"quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:{str(i) * 64}",
            },
        }
        for i, n in enumerate(names)
    ]
    return json.dumps(
        {
            "apiVersion": "image.openshift.io/v1",
            "kind": "ImageStream",
            "metadata": {"name": version},
            "spec": {"tags": tags},
        }
    ).encode()


async def read(tmp_path: Path, layers: list[dict[str, bytes | None]]):  # type: ignore[no-untyped-def]
    built = [layer(tmp_path, files, f"l{i}") for i, files in enumerate(layers)]
    paths = dict(built)

    async def path_of(d: Digest) -> str:
        return paths[d]

    return await read_payload(path_of, [d for d, _ in built])


async def test_top_layer_wins(tmp_path: Path) -> None:
    payload = await read(
        tmp_path,
        [
            {"release-manifests/image-references": image_references("4.0.0", ["stale"])},
            {
                "release-manifests": None,
                "./release-manifests/image-references": image_references("4.99.1", ["etcd", "cli"]),
                "release-manifests/release-metadata": json.dumps(
                    {"kind": "cincinnati-metadata-v0", "version": "4.99.1"}
                ).encode(),
            },
        ],
    )
    assert payload.version == "4.99.1"
    assert [n for n, _ in payload.components] == ["etcd", "cli"]
    assert payload.components[0][1].digest is not None


async def test_whiteout_hides_lower_copy(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="no release-manifests/image-references"):
        await read(
            tmp_path,
            [
                {"release-manifests/image-references": image_references("4.0.0", ["x"])},
                {"release-manifests/.wh.image-references": b""},
            ],
        )


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{", "not valid JSON or YAML"),
        (b'{"kind": "Pod"}', "not an image.openshift.io/v1 ImageStream"),
        (b'{"kind": "ImageStream", "apiVersion": "v1"}', "not an image.openshift.io/v1"),
        (
            b'{"kind": "ImageStream", "apiVersion": "image.openshift.io/v1", "metadata": {"name": "v"}, "spec": {"tags": [{"name": "a", "from": {"kind": "DockerImage", "name": "quay.io/a/b:tag"}}]}}',
            "not by digest",
        ),
        (
            b'{"kind": "ImageStream", "apiVersion": "image.openshift.io/v1", "metadata": {"name": "v"}, "spec": {"tags": []}}',
            "no metadata.name or no spec.tags",
        ),
    ],
)
def test_malformed_image_references(data: bytes, fragment: str) -> None:
    with pytest.raises(ReleaseError, match=fragment):
        parse_image_references(data)


def test_image_references_tags_that_name_no_image_are_passed_over() -> None:
    """As oc adm release mirror does: a tag without ``from.kind: DockerImage`` (an
    ImageStreamTag, or none) is no image to mirror; the others still are."""
    digest = "sha256:" + "a" * 64
    doc = {
        "kind": "ImageStream",
        "apiVersion": "image.openshift.io/v1",
        "metadata": {"name": "4.99.1"},
        "spec": {
            "tags": [
                {"name": "cli", "from": {"kind": "DockerImage", "name": f"quay.io/o/c@{digest}"}},
                {"name": "alias", "from": {"kind": "ImageStreamTag", "name": "cli"}},
                {"name": "empty"},
            ]
        },
    }
    name, components = parse_image_references(json.dumps(doc).encode())
    assert name == "4.99.1"
    assert [(n, str(ref)) for n, ref in components] == [("cli", f"quay.io/o/c@{digest}")]
