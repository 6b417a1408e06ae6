"""Tests of the synthetic OpenShift release builder (tests/release.py): determinism, the shape
of the payload, pushing it to CNCF distribution, and release signatures."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.images import DOCKER, OCI, Image, digest_of
from tests.release import (
    COMPONENT_REPO,
    COMPONENT_SOURCE,
    DEFAULT_VERIFICATION_KEY,
    DOCKER_LIST_COMPONENT,
    EXTRA_MANIFEST,
    IMAGE_REFERENCES,
    LIST_ARCHITECTURES,
    OCI_INDEX_COMPONENT,
    RELEASE_METADATA,
    RELEASE_REPO,
    VERIFICATION_CONFIGMAP,
    Release,
    SignatureError,
    SignatureStore,
    SigningKey,
    build_release,
    component_names,
    push_release,
    read_release_manifests,
    release_signer,
    sign_release,
)
from tests.upstream import (
    RegistryClient,
    distribution_upstream,
    token_service,
    upstream_client,
)

__all__ = [  # the fixtures, imported so that pytest finds them here
    "distribution_upstream",
    "release_signer",
    "token_service",
    "upstream_client",
]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def base() -> Release:
    return build_release("4.99.0")


@pytest.fixture(scope="module")
def release(base: Release) -> Release:
    return build_release("4.99.1", base=base)


def fingerprint(release: Release) -> list[tuple[str, str, str]]:
    return [(m.repo, m.digest, m.media_type) for m in release.manifests] + [
        ("blob", d, digest_of(data)) for d, data in sorted(release.blobs.items())
    ]


def tags_of(image_references: bytes) -> dict[str, str]:
    doc = json.loads(image_references)
    return {tag["name"]: tag["from"]["name"] for tag in doc["spec"]["tags"]}


def http_get(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with _OPENER.open(urllib.request.Request(url, method=method), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def agent_processes(home: Path) -> list[int]:
    """Live processes whose command line mentions ``home`` (the gpg-agent has --homedir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(home).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --- building ------------------------------------------------------------------------------------


def test_building_is_deterministic(base: Release, release: Release) -> None:
    again = build_release("4.99.1", base=build_release("4.99.0"))
    assert fingerprint(again) == fingerprint(release)
    assert again.release_manifest == release.release_manifest
    assert again.image_references == release.image_references
    assert again.components == release.components

    other = build_release("4.99.0", seed="another seed")
    assert other.release_digest != base.release_digest
    assert not set(other.components.values()) & set(base.components.values())
    # different versions without a base share only the seed's base and group layers
    fresh = build_release("4.99.1")
    assert not set(fresh.components.values()) & set(base.components.values())
    assert len(set(fresh.blobs) & set(base.blobs)) == 3


def test_component_names() -> None:
    names = component_names(120)
    assert len(set(names)) == 120
    assert names[:6] == (
        "cluster-version-operator",
        "etcd",
        "machine-config-operator",
        "installer",
        DOCKER_LIST_COMPONENT,
        OCI_INDEX_COMPONENT,
    )
    assert "aws-csi-driver" in names and names[-1] == "synthetic-component-119"
    with pytest.raises(ValueError):
        build_release(components=5)


def test_components(release: Release) -> None:
    assert len(release.components) == 40
    assert list(release.components) == sorted(component_names(40))
    images = {n: a for n, a in release.component_images.items() if isinstance(a, Image)}
    formats = Counter(image.format.name for image in images.values())
    assert formats["docker"] > formats["oci"] >= 3

    lists = release.multi_arch
    assert set(lists) == {DOCKER_LIST_COMPONENT, OCI_INDEX_COMPONENT}
    assert lists[DOCKER_LIST_COMPONENT].format is DOCKER
    assert lists[OCI_INDEX_COMPONENT].format is OCI
    for index in lists.values():
        doc = json.loads(index.manifest)
        assert doc["mediaType"] == index.format.index
        platforms = [d["platform"] for d in doc["manifests"]]
        assert [p["architecture"] for p in platforms] == list(LIST_ARCHITECTURES)
        assert all(p["os"] == "linux" for p in platforms)
        assert platforms[1]["variant"] == "v8"
        assert [d["digest"] for d in doc["manifests"]] == [c.digest for c in index.children]
        assert all(d["mediaType"] == index.format.manifest for d in doc["manifests"])

    # one base layer under every image, list children included
    every_image = [*images.values(), *(c for i in lists.values() for c in i.children)]
    base_layer = every_image[0].layers[0].digest
    assert all(image.layers[0].digest == base_layer for image in every_image)
    assert len({image.layers[1].digest for image in every_image}) == 2  # operator / runtime
    assert len({image.layers[-1].digest for image in every_image}) == len(every_image)

    # deterministic gzip: no timestamp, no file name
    for digest, data in release.blobs.items():
        if data[:2] == b"\x1f\x8b":
            assert data[4:8] == b"\0\0\0\0", digest
            assert not data[3] & 0x08, digest  # FNAME

    # manifests: each component once, children before their list, the release image last
    by_digest = {m.digest: m for m in release.manifests}
    assert len(by_digest) == len(release.manifests) == release.manifest_count
    assert release.manifests[-1].digest == release.release_digest
    assert release.manifests[-1].tag == "4.99.1-x86_64" == release.release_tag
    assert all(m.tag is None for m in release.manifests[:-1])
    position = {m.digest: i for i, m in enumerate(release.manifests)}
    for manifest in release.manifests:
        assert digest_of(manifest.data) == manifest.digest
        assert manifest.repo == (RELEASE_REPO if manifest.tag else COMPONENT_REPO)
        for child in manifest.children:
            assert position[child] < position[manifest.digest]
            assert by_digest[child].platform is not None
        for blob in manifest.blobs:
            assert manifest.repo in release.blob_repos[blob]
    assert release.total_bytes == release.blob_bytes + release.manifest_bytes
    assert release.blob_count == len(release.blobs)


def test_release_image(release: Release) -> None:
    manifest = json.loads(release.release_manifest)
    assert manifest["mediaType"] == DOCKER.manifest == release.release_media_type
    assert {layer["mediaType"] for layer in manifest["layers"]} == {DOCKER.layer_gzip}
    config = json.loads(release.blobs[manifest["config"]["digest"]])
    cvo = release.component_images["cluster-version-operator"]
    assert config["config"]["Labels"]["io.openshift.release"] == "4.99.1"
    assert config["config"]["Labels"]["io.openshift.release.base-image-digest"] == cvo.digest
    assert config["architecture"] == "amd64"
    # built on the CVO image: its layers are the release image's lower layers
    assert isinstance(cvo, Image)
    assert [layer["digest"] for layer in manifest["layers"][: len(cvo.layers)]] == [
        layer.digest for layer in cvo.layers
    ]
    assert release.blob_repos[cvo.layers[0].digest] == {RELEASE_REPO, COMPONENT_REPO}

    # the top layer: release-manifests/ with its directory entry, no "./"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(release.top_layer.data))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["release-manifests"].isdir()
    assert set(members) == {"release-manifests", *release.release_files}
    assert not any(name.startswith(("./", "/")) for name in members)
    raw = gzip.decompress(release.top_layer.data)
    assert raw[:512].startswith(b"release-manifests/\0")  # the directory, as tar spells it

    # image-references: every component by digest under its quay.io name
    doc = json.loads(release.image_references)
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == (
        "image.openshift.io/v1",
        "ImageStream",
        "4.99.1",
    )
    assert all(t["from"]["kind"] == "DockerImage" for t in doc["spec"]["tags"])
    assert tags_of(release.image_references) == {
        name: f"{COMPONENT_SOURCE}@{digest}" for name, digest in release.components.items()
    }
    for name, index in release.multi_arch.items():
        assert release.component_pullspec(name).endswith(index.digest)

    # the stale copy underneath: fewer and other tags; oc's reading (top down) skips it
    stale = tags_of(release.stale_image_references)
    assert len(stale) < len(release.components)
    assert not set(stale.values()) & set(tags_of(release.image_references).values())
    layers = [layer.data for layer in release.release_image.layers]
    files = read_release_manifests(layers)
    assert files == dict(release.release_files)
    assert read_release_manifests(layers[:-1])[IMAGE_REFERENCES] == release.stale_image_references
    lower = read_release_manifests(layers[:-1], prefix="manifests/")
    assert lower and all(name.startswith("manifests/0000_") for name in lower)

    metadata = json.loads(release.release_files[RELEASE_METADATA])
    assert metadata == {
        "kind": "cincinnati-metadata-v0",
        "version": "4.99.1",
        "previous": ["4.99.0"],
        "next": [],
        "metadata": {
            "url": metadata["metadata"]["url"],
            "io.openshift.upgrades.graph.release.channels": "stable-4.99",
        },
    }
    configmap = yaml.safe_load(release.verification_configmap)
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["namespace"] == "openshift-config-managed"
    assert configmap["metadata"]["name"] == "release-verification"
    assert configmap["data"]["verifier-public-key-bastion-test"] == DEFAULT_VERIFICATION_KEY
    assert any(k.startswith("store-") for k in configmap["data"])
    assert Path(VERIFICATION_CONFIGMAP).name.startswith("0000_")
    assert yaml.safe_load(release.release_files[EXTRA_MANIFEST])["kind"] == "Namespace"


def test_release_on_a_base(base: Release, release: Release) -> None:
    assert base.base_version is None and base.changed == ()
    assert release.base_version == "4.99.0"
    assert 3 <= len(release.changed) <= 6
    assert {"machine-config-operator", DOCKER_LIST_COMPONENT} <= set(release.changed)
    for name, digest in release.components.items():
        assert (digest != base.components[name]) == (name in release.changed), name
        assert release.builds[name] == ("4.99.1" if name in release.changed else "4.99.0")
    # the changed manifest list keeps its arm64 and s390x children
    old, new = base.multi_arch[DOCKER_LIST_COMPONENT], release.multi_arch[DOCKER_LIST_COMPONENT]
    assert old.child("amd64").digest != new.child("amd64").digest
    for arch in ("arm64", "s390x"):
        assert old.child(arch).digest == new.child(arch).digest
    # an increment carries little: the changed app layers and configs, and the release layers
    new_blobs = release.new_blobs(base)
    assert 0 < len(new_blobs) < len(release.blobs) // 4
    assert release.stale_layer.digest in new_blobs and release.top_layer.digest in new_blobs
    assert json.loads(base.release_metadata)["previous"] == []

    picked = build_release("4.99.1", base=base, changed=["etcd"])
    assert picked.changed == ("etcd",)
    with pytest.raises(ValueError):
        build_release("4.99.1", base=base, changed=["no-such-component"])
    with pytest.raises(ValueError):
        build_release("4.99.1", base=base, seed="other")


# --- pushing -------------------------------------------------------------------------------------


def check_pushed(client: RegistryClient, release: Release) -> None:
    for manifest in release.manifests:
        resp = client.get_manifest(manifest.repo, manifest.digest)
        assert resp.status == 200, (manifest.repo, manifest.digest, resp.body[:300])
        assert resp.body == manifest.data
        assert resp.headers["Content-Type"] == manifest.media_type
        assert resp.headers["Docker-Content-Digest"] == manifest.digest
        if manifest.is_list:
            listed = [d["digest"] for d in json.loads(resp.body)["manifests"]]
            assert listed == list(manifest.children)
            for child in listed:
                # distribution answers 404 for an OCI manifest not in Accept
                head = client.request(
                    "HEAD",
                    f"/v2/{manifest.repo}/manifests/{child}",
                    headers={"Accept": release.manifest(child).media_type},
                )
                assert head.status == 200, child
                assert head.headers["Docker-Content-Digest"] == child
    for digest in release.blobs:
        for repo in release.blob_repos[digest]:
            head = client.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            assert head.status == 200, (repo, digest)
    tagged = client.get_manifest(RELEASE_REPO, release.release_tag)
    assert tagged.status == 200
    assert tagged.headers["Docker-Content-Digest"] == release.release_digest
    assert tagged.body == release.release_manifest


def test_push_release(
    distribution_upstream: object, upstream_client: RegistryClient, base: Release, release: Release
) -> None:
    stats = push_release(release, upstream_client)
    assert stats.manifests == release.manifest_count
    # each blob once per repository that needs it (the CVO's layers go to both)
    per_repo = sum(len(repos) for repos in release.blob_repos.values())
    assert stats.blobs_uploaded == per_repo and stats.blobs_present == 0
    check_pushed(upstream_client, release)

    # components are there by digest only; the release repository has the one tag
    tags = upstream_client.request("GET", f"/v2/{COMPONENT_REPO}/tags/list")
    assert tags.status == 404 or not tags.json().get("tags")
    tags = upstream_client.request("GET", f"/v2/{RELEASE_REPO}/tags/list")
    assert tags.json()["tags"] == [release.release_tag]

    # read the payload back as oc does: layers top to bottom, first copy wins
    pulled = json.loads(upstream_client.get_manifest(RELEASE_REPO, release.release_tag).body)
    layers = [upstream_client.get_blob(RELEASE_REPO, d["digest"]).body for d in pulled["layers"]]
    files = read_release_manifests(layers)
    references = files[IMAGE_REFERENCES]
    assert references == release.image_references != release.stale_image_references
    pullspecs = tags_of(references)
    assert set(pullspecs) == set(release.components)
    for name, pullspec in pullspecs.items():
        source, _, digest = pullspec.partition("@")
        assert source == COMPONENT_SOURCE
        assert upstream_client.get_manifest(COMPONENT_REPO, digest).status == 200, name

    # idempotent; the older release then only adds what it does not share
    again = push_release(release, upstream_client)
    assert (again.blobs_uploaded, again.blobs_present) == (0, per_repo)
    older = push_release(base, upstream_client)
    assert older.blobs_uploaded == sum(
        len(repos) for d, repos in base.blob_repos.items() if d not in release.blobs
    )
    check_pushed(upstream_client, base)
    tags = upstream_client.request("GET", f"/v2/{RELEASE_REPO}/tags/list")
    assert sorted(tags.json()["tags"]) == ["4.99.0-x86_64", "4.99.1-x86_64"]


# --- signatures ----------------------------------------------------------------------------------


def test_signature_store(release: Release, tmp_path: Path) -> None:
    store = sign_release(release, tmp_path)
    home = store.key.home
    try:
        hex_digest = release.release_digest.removeprefix("sha256:")
        path = tmp_path / "signatures" / f"sha256={hex_digest}" / "signature-1"
        assert store.dir == tmp_path / "signatures"
        assert path.is_file() and store.path(release.release_digest) == path
        signature = path.read_bytes()
        assert signature[:1] != b"-"  # binary OpenPGP, not armored
        assert b"atomic container signature" not in signature  # compressed, as gpg does

        status, body = http_get(f"{store.url}/sha256={hex_digest}/signature-1")
        assert (status, body) == (200, signature)
        assert http_get(store.signature_url(release.release_digest, 2))[0] == 404
        assert http_get(f"{store.url}/sha256={hex_digest}/signature-1", "HEAD") == (200, b"")
        assert http_get(f"{store.url}/sha256={hex_digest}/")[0] == 404  # no listings
        assert http_get(f"{store.url}/../signatures")[0] == 404
        assert [r[2] for r in store.requests] == [200, 404, 200, 404, 404]

        doc = store.verify(signature)
        assert doc == {
            "critical": {
                "type": "atomic container signature",
                "image": {"docker-manifest-digest": release.release_digest},
                "identity": {
                    "docker-reference": "quay.io/openshift-release-dev/ocp-release:4.99.1-x86_64"
                },
            },
            "optional": {"creator": "bastion tests", "timestamp": doc["optional"]["timestamp"]},
        }
        assert isinstance(doc["optional"]["timestamp"], int)
        assert store.public_key.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

        tampered = bytearray(signature)
        tampered[len(tampered) // 2] ^= 0xFF
        with pytest.raises(SignatureError):
            store.verify(bytes(tampered))

        store.fail_status = 503
        assert http_get(store.signature_url(release.release_digest))[0] == 503
        assert agent_processes(home)  # signing started an agent
    finally:
        store.close()
    assert store.key.closed and not home.exists()
    assert agent_processes(home) == []


def test_signatures_verify_against_the_payload_key(
    base: Release, release_signer: Callable[..., SignatureStore], tmp_path: Path
) -> None:
    with SigningKey.generate() as key:
        signed = build_release("4.99.1", base=base, verification_key=key.public_key)
        configmap = yaml.safe_load(signed.verification_configmap)
        assert configmap["data"]["verifier-public-key-bastion-test"] == key.public_key
        assert signed.components == build_release("4.99.1", base=base).components

        store = release_signer(signed, key=key, path_prefix="pub/openshift-v4/signatures")
        assert store.url.endswith("/pub/openshift-v4/signatures")
        status, data = http_get(store.signature_url(signed.release_digest))
        assert status == 200
        critical = store.verify(data)["critical"]
        assert critical["image"]["docker-manifest-digest"] == signed.release_digest
        # a second signature, and a foreign one that does not verify with this key
        store.sign(signed)
        assert http_get(store.signature_url(signed.release_digest, 2))[0] == 200
        assert len(store.signatures(signed.release_digest)) == 2
        with SigningKey.generate() as other:
            foreign = other.sign(b'{"critical": {}}')
            assert other.verify(foreign) == (b'{"critical": {}}', other.fingerprint)
        with pytest.raises(SignatureError):
            store.verify(foreign)
        store.close()  # a store does not destroy a key it was given
        assert not key.closed and store.verify(data)
    assert key.closed and not os.path.exists(key.home)
