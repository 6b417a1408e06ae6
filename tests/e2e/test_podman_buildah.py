"""podman and buildah against ``bastion serve``: pulls by tag and by digest into a private vfs
store, a pull through a ``registries.conf`` digest-only mirror as an OpenShift node does it,
and an image built with buildah, pushed, and read back.

Each test gets an empty podman/buildah store, so every pull really talks to the registry.
"""

from __future__ import annotations

import gzip
import io
import json
import platform
import tarfile
import textwrap
from pathlib import Path
from typing import Any, Final

import pytest

from tests.images import DOCKER, OCI, Image, Index, digest_of, read_dir_transport

from .conftest import HOST_ARCH, OCP_ART_DEV, SAMPLES, ClientEnv, Published, PublishFn, Tool


def inspect_image(podman: Tool, ref: str) -> dict[str, Any]:
    infos = podman("image", "inspect", ref).json()
    assert isinstance(infos, list) and len(infos) == 1, infos
    info = infos[0]
    assert isinstance(info, dict)
    return info


def host_image(pub: Published) -> Image:
    """The image podman stores for ``pub`` on this machine."""
    if isinstance(pub.artifact, Image):
        return pub.artifact
    if HOST_ARCH is None:
        pytest.skip(f"no image in the samples for {platform.machine()}")
    return pub.artifact.child(HOST_ARCH)


def assert_stored(info: dict[str, Any], pub: Published, ref_digest: str) -> None:
    """podman recorded the digest it pulled by and unpacked exactly the expected layers."""
    image = host_image(pub)
    assert info["Digest"] == ref_digest
    assert f"{pub.name}@{image.digest}" in info["RepoDigests"]
    assert info["Id"] == image.config.digest.removeprefix("sha256:")
    assert info["Architecture"] == image.platform.architecture
    assert info["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]


@pytest.mark.parametrize("sample_id", list(SAMPLES))
def test_podman_pull_by_tag(
    podman: Tool, client_env: ClientEnv, published: PublishFn, sample_id: str
) -> None:
    """``podman pull REGISTRY/REPO:TAG`` stores the image under the pushed manifest digest."""
    pub = published(sample_id)
    ref = f"{pub.name}:{pub.tag}"
    podman("pull", "--tls-verify=false", "--signature-policy", client_env.policy, ref)
    assert_stored(inspect_image(podman, ref), pub, pub.artifact.digest)


@pytest.mark.parametrize("sample_id", list(SAMPLES))
def test_podman_pull_by_digest(
    podman: Tool, client_env: ClientEnv, published: PublishFn, sample_id: str
) -> None:
    """``podman pull REGISTRY/REPO@DIGEST`` (OCI/Docker image, index or list) succeeds and
    records that digest."""
    pub = published(sample_id)
    ref = f"{pub.name}@{pub.artifact.digest}"
    podman("pull", "--tls-verify=false", "--signature-policy", client_env.policy, ref)
    assert_stored(inspect_image(podman, ref), pub, pub.artifact.digest)


def _mirror_conf(client_env: ClientEnv, registry: str) -> str:
    return client_env.registries_conf(
        "mirror",
        textwrap.dedent(
            f"""\
            unqualified-search-registries = []

            [[registry]]
            location = "{OCP_ART_DEV}"

            [[registry.mirror]]
            location = "{registry}/{OCP_ART_DEV}"
            insecure = true
            pull-from-mirror = "digest-only"
            """
        ),
    )


@pytest.mark.parametrize("what", ["index", "host-child"])
def test_podman_pull_through_digest_only_mirror(
    podman: Tool, client_env: ClientEnv, published: PublishFn, registry: str, what: str
) -> None:
    """What an OpenShift node does: ``podman pull quay.io/openshift-release-dev/...@DIGEST``
    with a registries.conf mirror (digest-only, insecure) pointing at us. There is no route
    to quay.io, so only the mirror can answer."""
    pub = published("oci-index")
    assert isinstance(pub.artifact, Index)
    digest = pub.artifact.digest if what == "index" else host_image(pub).digest
    mirrored = podman.with_env(CONTAINERS_REGISTRIES_CONF=_mirror_conf(client_env, registry))
    ref = f"{OCP_ART_DEV}@{digest}"
    mirrored("pull", "--signature-policy", client_env.policy, ref)
    info = inspect_image(mirrored, ref)
    image = host_image(pub)
    assert info["Digest"] == digest
    assert f"{OCP_ART_DEV}@{digest}" in info["RepoDigests"]
    assert info["Id"] == image.config.digest.removeprefix("sha256:")
    assert info["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]


# buildah push --format names, the buildah commit --format to build with, the manifest type
BUILDAH_FORMATS: Final = {
    "oci": ("oci", OCI.manifest),
    "v2s2": ("docker", DOCKER.manifest),
}
HELLO: Final = b"hello from buildah\n"


def _layer_files(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {
            member.name.lstrip("./"): tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


@pytest.mark.parametrize("push_format", list(BUILDAH_FORMATS))
def test_buildah_build_push_pull_back(
    buildah: Tool,
    skopeo: Tool,
    podman: Tool,
    client_env: ClientEnv,
    registry: str,
    tmp_path: Path,
    push_format: str,
) -> None:
    """``buildah from scratch`` + ``copy`` + ``commit`` + ``push`` to the registry; the digest
    buildah reports is the digest of the manifest skopeo reads back, the layer holds the
    copied file, and podman pulls the image by that digest."""
    commit_format, media_type = BUILDAH_FORMATS[push_format]
    source = tmp_path / "hello.txt"
    source.write_bytes(HELLO)
    container = buildah("from", "--signature-policy", client_env.policy, "scratch").text.strip()
    buildah("copy", container, str(source), "/hello.txt")
    buildah("config", "--cmd", "/hello", "--label", "io.bastion.test=buildah", container)
    buildah(
        "commit",
        "--signature-policy",
        client_env.policy,
        "--format",
        commit_format,
        container,
        "localhost/e2e-built:latest",
    )
    repo = f"{registry}/e2e/buildah/{push_format}"
    digest_file = tmp_path / "digest"
    buildah(
        "push",
        "--signature-policy",
        client_env.policy,
        "--tls-verify=false",
        "--format",
        push_format,
        "--digestfile",
        str(digest_file),
        "localhost/e2e-built:latest",
        f"docker://{repo}:v1",
    )
    digest = digest_file.read_text().strip()

    raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{repo}:v1").stdout
    assert digest_of(raw) == digest
    manifest = json.loads(raw)
    assert manifest["mediaType"] == media_type
    out = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{repo}@{digest}", f"dir:{out}")
    manifest_bytes, blobs = read_dir_transport(out)
    assert manifest_bytes == raw
    (layer,) = manifest["layers"]
    assert _layer_files(blobs[layer["digest"]]) == {"hello.txt": HELLO}
    config = json.loads(blobs[manifest["config"]["digest"]])
    assert config["config"]["Labels"]["io.bastion.test"] == "buildah"

    podman(
        "pull", "--tls-verify=false", "--signature-policy", client_env.policy, f"{repo}@{digest}"
    )
    assert inspect_image(podman, f"{repo}@{digest}")["Digest"] == digest
