"""``bastion import --to`` (``server.import_registry``, ``server.registry_push``) in process,
against CNCF distribution behind token auth: bad content named and kept out while the rest is
pushed, chunked uploads, increments in and out of order, volumes, resuming.

Stores are seeded straight from the synthetic release builder as in ``tests/test_ferry.py``;
the e2e test mirrors for real."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from server.import_registry import retarget
from tests.release import (
    COMPONENT_SOURCE,
    DOCKER_LIST_COMPONENT,
    RELEASE_SOURCE,
    Release,
    build_release,
)
from tests.test_ferry import bastion, seed
from tests.upstream import PULLER, DistributionUpstream, RegistryClient, write_authfile

PREFIX = "site"


@pytest.fixture(scope="module")
def releases() -> list[Release]:
    first = build_release("4.99.0", components=8, payload_size=4096)
    return [first, build_release("4.99.1", components=8, payload_size=4096, base=first)]


def push(
    layout: Path, registry: DistributionUpstream, authfile: Path, tmp_path: Path, *extra: str
) -> int:
    target = f"{registry.host}/{PREFIX}"
    return bastion(
        "import", str(layout), "--to", target, "--authfile", str(authfile), "--plain-http",
        "--root", str(tmp_path / "scratch"), *extra,
    )  # fmt: skip


def export(root: Path, out: Path, *extra: str) -> None:
    assert bastion("export", "--root", str(root), "--to", str(out), *extra) == 0


def in_target(client: RegistryClient, release: Release) -> dict[str, bool]:
    """Which of the release's manifests the target has (by digest, in its repository)."""
    repos = {
        "openshift-release-dev/ocp-release": f"{PREFIX}/{RELEASE_SOURCE}",
        "openshift-release-dev/ocp-v4.0-art-dev": f"{PREFIX}/{COMPONENT_SOURCE}",
    }
    return {
        m.digest: client.get_manifest(repos[m.repo], m.digest).body == m.data
        for m in release.manifests
    }


def test_bad_content_is_named_and_the_rest_pushed(
    releases: list[Release],
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release = releases[0]
    seed(tmp_path / "a", release)
    out = tmp_path / "export"
    export(tmp_path / "a", out)
    cli = next(a for n, a in release.component_images.items() if n == DOCKER_LIST_COMPONENT)
    victim = cli.children[0].layers[-1].digest  # only in one list child
    path = out / "blobs/sha256" / victim[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    gone = release.components["etcd"]
    (out / "blobs/sha256" / gone[7:]).unlink()
    capsys.readouterr()

    assert push(out, distribution_upstream, upstream_authfile, tmp_path) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bastion:")]
    dest = f"{PREFIX}/{COMPONENT_SOURCE}"
    assert any(victim in line and "hashes to" in line and dest in line for line in err), err
    assert any(gone in line and "missing" in line and dest in line for line in err), err
    assert "2 of 9 images not pushed" in err[-1]
    client = RegistryClient(distribution_upstream.url, PULLER)
    assert client.request("HEAD", f"/v2/{dest}/blobs/{victim}").status == 404
    assert distribution_upstream.count_requests("PUT", f"digest={victim.replace(':', '%3A')}") == 0
    present = in_target(client, release)
    assert not present[release.components[DOCKER_LIST_COMPONENT]] and not present[gone]
    others = {d for n, d in release.components.items() if n not in (DOCKER_LIST_COMPONENT, "etcd")}
    assert all(present[d] for d in others) and present[release.release_digest]
    tag = client.get_manifest(f"{PREFIX}/{RELEASE_SOURCE}", release.release_tag)
    assert tag.status == 200 and tag.body == release.release_manifest


def test_chunked_uploads_and_a_rerun(
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release = build_release("4.99.5", components=6, payload_size=400 * 1024)
    seed(tmp_path / "a", release)
    out = tmp_path / "export"
    export(tmp_path / "a", out)
    biggest = max(release.blobs, key=lambda d: len(release.blobs[d]))
    assert len(release.blobs[biggest]) > 1 << 20
    capsys.readouterr()
    assert (
        push(out, distribution_upstream, upstream_authfile, tmp_path, "--chunk-size", "1MiB") == 0
    )
    assert "Summary: pushed to" in capsys.readouterr().out
    assert distribution_upstream.count_requests("PATCH", "/blobs/uploads/", status=202) >= 2
    client = RegistryClient(distribution_upstream.url, PULLER)
    got = client.get_blob(f"{PREFIX}/{COMPONENT_SOURCE}", biggest)
    assert got.status == 200 and got.body == release.blobs[biggest]
    assert all(in_target(client, release).values())
    # a rerun uploads nothing
    distribution_upstream.reset_counts()
    assert (
        push(out, distribution_upstream, upstream_authfile, tmp_path, "--chunk-size", "1MiB") == 0
    )
    assert "blobs: 0 uploaded" in capsys.readouterr().out
    for method in ("POST", "PATCH", "PUT"):  # blobs, manifests and the tag: HEAD finds them
        assert distribution_upstream.count_requests(method, "") == 0, method


@pytest.mark.parametrize(
    "chunk", [["--chunk-size", "1MiB"], []], ids=["chunked-then-cancelled", "monolithic-aborted"]
)
def test_a_corrupt_large_blob_never_completes_an_upload(
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
    capsys: pytest.CaptureFixture[str],
    chunk: list[str],
) -> None:
    release = build_release("4.99.6", components=6, payload_size=400 * 1024)
    seed(tmp_path / "a", release)
    out = tmp_path / "export"
    export(tmp_path / "a", out)
    biggest = max(release.blobs, key=lambda d: len(release.blobs[d]))
    path = out / "blobs/sha256" / biggest[7:]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # in the last piece
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert push(out, distribution_upstream, upstream_authfile, tmp_path, *chunk) == 1
    err = capsys.readouterr().err
    assert f"bastion: content of {biggest} hashes to" in err
    if chunk:  # the chunks went out; the upload is cancelled instead of closed
        assert distribution_upstream.count_requests("DELETE", "/blobs/uploads/") >= 1
    client = RegistryClient(distribution_upstream.url, PULLER)
    assert client.request("HEAD", f"/v2/{PREFIX}/{COMPONENT_SOURCE}/blobs/{biggest}").status == 404
    assert client.request("HEAD", f"/v2/{PREFIX}/{RELEASE_SOURCE}/blobs/{biggest}").status == 404


def test_increments_in_order_and_out_of_order(
    releases: list[Release],
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = tmp_path / "src"
    first, second = tmp_path / "e0", tmp_path / "e1"
    seed(src, releases[0])
    export(src, first)
    seed(src, releases[1])
    export(src, second, "--since", str(first))
    metas = [json.loads((e / "bastion-export.json").read_text()) for e in (first, second)]
    capsys.readouterr()

    assert push(second, distribution_upstream, upstream_authfile, tmp_path) == 1
    err = capsys.readouterr().err
    assert metas[0]["id"] in err and "increment" in err and len(err.strip().splitlines()) == 1
    assert distribution_upstream.count_requests("PUT", "") == 0  # refused before any push

    assert push(first, distribution_upstream, upstream_authfile, tmp_path) == 0
    assert push(second, distribution_upstream, upstream_authfile, tmp_path) == 0, (
        capsys.readouterr().err
    )
    client = RegistryClient(distribution_upstream.url, PULLER)
    for release in releases:
        assert all(in_target(client, release).values())
        tag = client.get_manifest(f"{PREFIX}/{RELEASE_SOURCE}", release.release_tag)
        assert tag.status == 200 and tag.body == release.release_manifest


def test_volumes(
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    release = build_release("4.99.7", components=6, payload_size=400 * 1024)
    seed(tmp_path / "a", release)
    out = tmp_path / "volumes"
    export(tmp_path / "a", out, "--split-size", "1MiB")
    assert push(out, distribution_upstream, upstream_authfile, tmp_path) == 0, (
        capsys.readouterr().err
    )
    client = RegistryClient(distribution_upstream.url, PULLER)
    assert all(in_target(client, release).values())
    assert not list((tmp_path / "scratch" / "imports").glob("unpack-*"))


def test_retarget_renders_the_configuration_for_the_target() -> None:
    doc = {
        "name": "release-4.99.1",
        "host": "bastion.example:5000",
        "insecure": False,
        "digests": {RELEASE_SOURCE: f"bastion.example:5000/{RELEASE_SOURCE}"},
        "tags": {},
    }
    configs = [
        ("release-4.99.1/mirror-map.json", json.dumps(doc).encode()),
        ("release-4.99.1/registries.conf", b"old"),
        ("release-4.99.1/signature-configmap.yaml", b"kept"),
        ("other/registries.conf", b"no map: as it is"),
    ]
    out = dict(retarget(configs, "quay.site.example/ocp", insecure=False))
    conf = out["release-4.99.1/registries.conf"].decode()
    assert f'location = "quay.site.example/ocp/{RELEASE_SOURCE}"' in conf
    assert out["release-4.99.1/signature-configmap.yaml"] == b"kept"
    assert out["other/registries.conf"] == b"no map: as it is"
    idms = out["release-4.99.1/imageDigestMirrorSet.yaml"].decode()
    assert f"- quay.site.example/ocp/{RELEASE_SOURCE}" in idms
    assert json.loads(out["release-4.99.1/mirror-map.json"])["host"] == "quay.site.example/ocp"


def test_refused_credentials_stop_the_push_with_one_reason(
    releases: list[Release],
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(tmp_path / "a", releases[0])
    out = tmp_path / "export"
    export(tmp_path / "a", out)
    wrong = write_authfile(tmp_path / "auth.json", {distribution_upstream.host: ("puller", "no")})
    capsys.readouterr()
    assert push(out, distribution_upstream, wrong, tmp_path) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "refused the credentials of user 'puller'" in err[0], err
    assert err[1].startswith("bastion: stopped; so far: pushed to")
    assert distribution_upstream.count_requests("PUT", "") == 0


def test_an_unreachable_target_stops_the_push_with_one_reason(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(tmp_path / "a", releases[0])
    out = tmp_path / "export"
    export(tmp_path / "a", out)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    capsys.readouterr()
    code = bastion(
        "import", str(out), "--to", f"127.0.0.1:{port}/{PREFIX}", "--plain-http",
        "--root", str(tmp_path / "scratch"),
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    # one reason, not one line per blob; the target is not called "upstream"
    assert len(err) == 2, err
    assert err[0].startswith(f"bastion: registry 127.0.0.1:{port} unreachable"), err
    assert err[1].startswith("bastion: stopped; so far: pushed to")
