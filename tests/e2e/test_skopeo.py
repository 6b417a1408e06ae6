"""skopeo against ``bastion serve``: push from ``oci:`` and ``dir:``, read back byte for byte,
copy between repositories (cross-repository blob mount), list tags, delete.

Every sample (``conftest.SAMPLES``: an OCI image, a Docker schema2 image, an OCI index over
amd64/arm64/s390x pushed into ``quay.io/openshift-release-dev/ocp-v4.0-art-dev``, and a Docker
manifest list) is pushed by tag; everything is then read back by digest, as OpenShift does.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.images import Index, digest_of, read_dir_transport, read_oci_layout

from .conftest import (
    HOST_ARCH,
    OCP_ART_DEV,
    SAMPLES,
    TAG,
    Published,
    PublishFn,
    RegistryServer,
    Tool,
)

ALL_SAMPLES = list(SAMPLES)
INDEXES = ["oci-index", "docker-list"]
OCI_SAMPLES = ["oci-image", "oci-index"]  # the oci: transport stores OCI manifests only


def raw_manifest(skopeo: Tool, ref: str) -> bytes:
    return skopeo("inspect", "--tls-verify=false", "--raw", ref).stdout


def all_flag(pub: Published) -> list[str]:
    return ["--all"] if pub.is_index else []


def assert_same_contents(got: dict[str, bytes], expected: dict[str, bytes]) -> None:
    """``got`` holds exactly the digests of ``expected``, each with content of that digest
    (so byte-identical to what was built)."""
    assert sorted(got) == sorted(expected)
    for digest, data in got.items():
        assert digest_of(data) == digest, f"content of {digest} does not match its digest"


@pytest.mark.parametrize("sample_id", ALL_SAMPLES)
def test_push_keeps_manifest_bytes(skopeo: Tool, published: PublishFn, sample_id: str) -> None:
    """The manifest served by tag and by digest is the pushed bytes, unchanged."""
    pub = published(sample_id)
    by_tag = raw_manifest(skopeo, pub.by_tag)
    assert digest_of(by_tag) == pub.artifact.digest
    assert by_tag == pub.artifact.manifest
    assert raw_manifest(skopeo, pub.by_digest()) == pub.artifact.manifest


@pytest.mark.parametrize("sample_id", INDEXES)
def test_index_children_by_digest(skopeo: Tool, published: PublishFn, sample_id: str) -> None:
    """Each child of a multi-arch index is served by digest with its exact bytes, and so is
    its config."""
    pub = published(sample_id)
    for child in pub.images:
        assert raw_manifest(skopeo, pub.by_digest(child.digest)) == child.manifest, child.platform
        config = skopeo(
            "inspect", "--tls-verify=false", "--config", "--raw", pub.by_digest(child.digest)
        )
        assert config.stdout == child.config.data, child.platform


def test_nested_repository_resolves_by_digest(skopeo: Tool, published: PublishFn) -> None:
    """The release-payload repository name with a host-like first segment works: the index
    pushed by tag is found by digest, and ``skopeo inspect`` resolves it to this machine's
    child image."""
    pub = published("oci-index")
    assert pub.repo == OCP_ART_DEV
    info = skopeo("inspect", "--tls-verify=false", pub.by_digest()).json()
    assert isinstance(info, dict)
    assert info["Name"] == pub.name
    assert info["Digest"] == pub.artifact.digest
    assert TAG in info["RepoTags"]
    if HOST_ARCH is not None:
        assert isinstance(pub.artifact, Index)
        child = pub.artifact.child(HOST_ARCH)
        assert info["Architecture"] == HOST_ARCH
        assert info["Layers"] == [layer.digest for layer in child.layers]


@pytest.mark.parametrize("sample_id", ALL_SAMPLES)
def test_pull_by_digest_to_dir(
    skopeo: Tool, published: PublishFn, sample_id: str, tmp_path: Path
) -> None:
    """``skopeo copy docker://...@digest dir:`` gives back every manifest and blob unchanged."""
    pub = published(sample_id)
    out = tmp_path / "dir"
    skopeo("copy", "--src-tls-verify=false", *all_flag(pub), pub.by_digest(), f"dir:{out}")
    manifest, blobs = read_dir_transport(out)
    assert manifest == pub.artifact.manifest
    assert_same_contents({**blobs, digest_of(manifest): manifest}, pub.artifact.contents())


@pytest.mark.parametrize("sample_id", OCI_SAMPLES)
def test_pull_by_digest_to_oci_layout(
    skopeo: Tool, published: PublishFn, sample_id: str, tmp_path: Path
) -> None:
    """``skopeo copy docker://...@digest oci:`` gives back every manifest and blob unchanged."""
    pub = published(sample_id)
    out = tmp_path / "layout"
    skopeo("copy", "--src-tls-verify=false", *all_flag(pub), pub.by_digest(), f"oci:{out}:back")
    manifest, blobs = read_oci_layout(out, "back")
    assert manifest == pub.artifact.manifest
    assert_same_contents(blobs, pub.artifact.contents())


def _mounted(server: RegistryServer, repo: str) -> set[str]:
    """Digests mounted into ``repo`` (``POST .../blobs/uploads/?mount=...`` answered 201)."""
    pattern = re.compile(
        rf'"POST /v2/{re.escape(repo)}/blobs/uploads/\?\S*mount=sha256(?:%3A|:)([0-9a-f]{{64}})\S* '
        r'HTTP/1\.[01]" 201 '
    )
    return {"sha256:" + m.group(1) for line in server.access_log() if (m := pattern.search(line))}


@pytest.mark.parametrize("sample_id", ALL_SAMPLES)
def test_copy_between_repositories_mounts_layers(
    skopeo: Tool, published: PublishFn, registry_server: RegistryServer, sample_id: str
) -> None:
    """A registry-to-registry copy into another repository keeps every manifest byte for
    byte, and skopeo gets each layer by cross-repository mount instead of uploading it.

    skopeo knows where the layers are from its blob-info cache (filled when they were pushed)
    and prints the same line whether it mounted or uploaded when not on a terminal, so the
    mounts are read from the registry's access log. (It always uploads the config.)"""
    pub = published(sample_id)
    dest = Published(pub.artifact, pub.registry, f"e2e/copies/{sample_id}")
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *all_flag(pub),
        pub.by_digest(),
        dest.by_tag,
    )
    assert raw_manifest(skopeo, dest.by_tag) == pub.artifact.manifest
    for image in pub.images:
        assert raw_manifest(skopeo, dest.by_digest(image.digest)) == image.manifest
    layers = {layer.digest for image in pub.images for layer in image.layers}
    deadline = time.monotonic() + 5  # a worker logs a request just after answering it
    while (
        not layers <= (mounted := _mounted(registry_server, dest.repo))
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert layers <= mounted, f"layers not mounted into {dest.repo}: {sorted(layers - mounted)}"


def test_list_tags(skopeo: Tool, published: PublishFn, registry: str) -> None:
    """``skopeo list-tags`` lists every tag pushed to a repository, nested names included."""
    pub = published("oci-image")
    repo = f"{registry}/e2e/tags"
    tags = ["4.16.0", "4.16.1", "latest"]
    for tag in tags:
        skopeo(
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            pub.by_digest(),
            f"docker://{repo}:{tag}",
        )
    listing = skopeo("list-tags", "--tls-verify=false", f"docker://{repo}").json()
    assert listing == {"Repository": repo, "Tags": tags}
    nested = published("oci-index")
    listing = skopeo("list-tags", "--tls-verify=false", f"docker://{nested.name}").json()
    assert listing == {"Repository": nested.name, "Tags": [TAG]}


@pytest.mark.parametrize("sample_id", ALL_SAMPLES)
def test_delete_manifest_by_digest(
    skopeo: Tool, published: PublishFn, registry: str, sample_id: str, tmp_path: Path
) -> None:
    """``skopeo delete`` by digest removes the manifest from that repository only: reading it
    by digest or by its tag then fails, while the repository it was copied from still serves
    the manifest and all its blobs."""
    pub = published(sample_id)
    victim = Published(pub.artifact, registry, f"e2e/delete/{sample_id}")
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *all_flag(pub),
        pub.by_digest(),
        victim.by_tag,
    )
    assert raw_manifest(skopeo, victim.by_digest()) == pub.artifact.manifest
    skopeo("delete", "--tls-verify=false", victim.by_digest())
    gone = skopeo.fails("inspect", "--tls-verify=false", "--raw", victim.by_digest())
    assert "manifest unknown" in gone.stderr
    untagged = skopeo.fails("inspect", "--tls-verify=false", "--raw", victim.by_tag)
    assert "manifest unknown" in untagged.stderr
    out = tmp_path / "dir"
    skopeo("copy", "--src-tls-verify=false", *all_flag(pub), pub.by_digest(), f"dir:{out}")
    manifest, blobs = read_dir_transport(out)
    assert manifest == pub.artifact.manifest
    assert_same_contents({**blobs, digest_of(manifest): manifest}, pub.artifact.contents())
