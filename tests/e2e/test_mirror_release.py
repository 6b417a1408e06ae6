"""The mission end to end: mirror a synthetic OpenShift release from a token-auth upstream
("quay.io"), stop the upstream, serve the store, and pull the release and every component by
its original quay.io digest through the generated registries.conf, as the nodes do."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.release import (
    COMPONENT_REPO,
    COMPONENT_SOURCE,
    RELEASE_SOURCE,
    Release,
    build_release,
    push_release,
    sign_release,
)
from tests.upstream import PULLER, DistributionUpstream, RegistryClient, write_authfile

from .conftest import ClientEnv, Tool, bastion_command, free_addr, start_registry, stop_registry

SOURCE = "quay.io/openshift-release-dev/ocp-release:4.99.1-x86_64"


@pytest.fixture
def release(upstream_client: RegistryClient) -> Release:
    rel = build_release("4.99.1", components=30, payload_size=64 * 1024)
    push_release(rel, upstream_client)
    return rel


@pytest.fixture
def config(tmp_path: Path, distribution_upstream: DistributionUpstream) -> Path:
    secret = write_authfile(tmp_path / "pull-secret.json", {"quay.io": PULLER})
    path = tmp_path / "bastion.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            upstreams:
              quay.io:
                url: {distribution_upstream.url}
                authfile: {secret}
                connect_timeout: 2
                read_timeout: 10
            """
        )
    )
    return path


def mirror(
    config: Path, root: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *bastion_command(),
            "mirror",
            "release",
            "--config",
            str(config),
            "--root",
            str(root),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def blobs_in(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs" / "sha256").glob("*/*")}


def podman_node(podman: Tool, client_env: ClientEnv, registries_conf: str) -> Tool:
    conf = client_env.registries_conf(
        "mirror-release", "unqualified-search-registries = []\n\n" + registries_conf
    )
    return podman.with_env(CONTAINERS_REGISTRIES_CONF=conf)


def test_mirror_release_then_install_offline(
    release: Release,
    config: Path,
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    podman: Tool,
    client_env: ClientEnv,
) -> None:
    root, out, addr = tmp_path / "root", tmp_path / "out", free_addr()
    signatures = sign_release(release, tmp_path / "sigstore")
    try:
        p = mirror(
            config,
            root,
            SOURCE,
            "--out-dir",
            str(out),
            "--mirror-host",
            addr,
            "--mirror-insecure",
            "--signatures-from",
            signatures.url,
        )
    finally:
        signatures.close()
    assert p.returncode == 0, p.stderr
    assert "Success" in p.stdout and "Traceback" not in p.stderr

    # the snippets, field by field (shapes of ../shared/OCP-RELEASE.md)
    mirrors = {
        RELEASE_SOURCE: f"{addr}/{RELEASE_SOURCE}",
        COMPONENT_SOURCE: f"{addr}/{COMPONENT_SOURCE}",
    }
    expected = [{"source": s, "mirrors": [m]} for s, m in sorted(mirrors.items())]
    assert yaml.safe_load((out / "install-config-imageContentSources.yaml").read_text()) == {
        "imageContentSources": expected
    }
    assert yaml.safe_load((out / "install-config-imageDigestSources.yaml").read_text()) == {
        "imageDigestSources": expected
    }
    icsp = yaml.safe_load((out / "imageContentSourcePolicy.yaml").read_text())
    assert (
        icsp["apiVersion"] == "operator.openshift.io/v1alpha1"
        and icsp["kind"] == "ImageContentSourcePolicy"
    )
    assert icsp["spec"]["repositoryDigestMirrors"] == expected
    idms = yaml.safe_load((out / "imageDigestMirrorSet.yaml").read_text())
    assert idms["apiVersion"] == "config.openshift.io/v1" and idms["kind"] == "ImageDigestMirrorSet"
    assert idms["spec"]["imageDigestMirrors"] == expected
    itms = yaml.safe_load((out / "imageTagMirrorSet.yaml").read_text())
    assert itms["kind"] == "ImageTagMirrorSet"
    assert itms["spec"]["imageTagMirrors"] == [
        {"source": RELEASE_SOURCE, "mirrors": [mirrors[RELEASE_SOURCE]]}
    ]
    # the signature ConfigMap the cluster-version operator reads
    digest_hex = release.release_digest.split(":")[1]
    cm = yaml.safe_load((out / "signature-configmap.yaml").read_text())
    assert cm["metadata"] == {
        "name": f"sha256-{digest_hex}",
        "namespace": "openshift-config-managed",
        "labels": {"release.openshift.io/verification-signatures": ""},
    }
    signature = base64.b64decode(cm["binaryData"][f"sha256-{digest_hex}-1"])
    assert signature == (out / "signatures" / f"sha256={digest_hex}" / "signature-1").read_bytes()
    assert (root / "signatures" / f"sha256={digest_hex}" / "signature-1").read_bytes() == signature

    # the upstream goes away; the bastion serves the store; the nodes pull by digest
    distribution_upstream.stop()
    server = start_registry(tmp_path / "serve", "log_level: info\n", addr=addr, root=root)
    try:
        node = podman_node(podman, client_env, (out / "registries.conf").read_text())
        refs = [f"{RELEASE_SOURCE}@{release.release_digest}"]
        refs += [f"{COMPONENT_SOURCE}@{d}" for d in release.components.values()]
        for ref in refs:
            node("pull", "-q", "--signature-policy", client_env.policy, ref)
            info = json.loads(node("image", "inspect", ref).stdout)[0]
            assert info["Digest"] == ref.split("@")[1]
        # every manifest of the release, list children included, byte for byte
        for m in release.manifests:
            repo = RELEASE_SOURCE if m.repo.endswith("ocp-release") else COMPONENT_SOURCE
            got = (root / "blobs" / "sha256" / m.digest[7:9] / m.digest[7:]).read_bytes()
            assert got == m.data, repo
    finally:
        stop_registry(server)


def test_to_one_repository_with_oc_style_tags(
    release: Release, config: Path, tmp_path: Path
) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    p = mirror(
        config,
        root,
        SOURCE,
        "--to",
        "openshift4/ocp4",
        "--out-dir",
        str(out),
        "--mirror-host",
        "mirror.example:5000",
    )
    assert p.returncode == 0, p.stderr
    tags = set((root / "repositories/openshift4/ocp4/_manifests/tags").iterdir())
    names = {t.name for t in tags}
    assert "4.99.1-x86_64" in names
    assert {f"4.99.1-x86_64-{c}" for c in release.components} <= names
    assert (
        root / "repositories/openshift4/ocp4/_manifests/tags/4.99.1-x86_64"
    ).read_text() == release.release_digest
    etcd = (root / "repositories/openshift4/ocp4/_manifests/tags/4.99.1-x86_64-etcd").read_text()
    assert etcd == release.components["etcd"]
    assert "Update image:  mirror.example:5000/openshift4/ocp4:4.99.1-x86_64" in p.stdout
    assert "Mirror prefix: mirror.example:5000/openshift4/ocp4" in p.stdout
    idms = yaml.safe_load((out / "imageDigestMirrorSet.yaml").read_text())
    assert idms["spec"]["imageDigestMirrors"] == [
        {"source": RELEASE_SOURCE, "mirrors": ["mirror.example:5000/openshift4/ocp4"]},
        {"source": COMPONENT_SOURCE, "mirrors": ["mirror.example:5000/openshift4/ocp4"]},
    ]


def test_interrupted_mirror_resumes_fetching_only_what_is_missing(
    release: Release, config: Path, tmp_path: Path, distribution_upstream: DistributionUpstream
) -> None:
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [
            *bastion_command(),
            "mirror",
            "release",
            "--config",
            str(config),
            "--root",
            str(root),
            "--concurrency",
            "1",
            SOURCE,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(blobs_in(root)) < 12:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    present = blobs_in(root)
    assert 0 < len(present) < release.blob_count, "kill the mirror halfway"
    distribution_upstream.reset_counts()
    p = mirror(config, root, SOURCE)
    assert p.returncode == 0, p.stderr
    fetched = distribution_upstream.count_requests("GET", "/blobs/sha256:", status=200)
    assert fetched == release.blob_count - len(present & {d[7:] for d in release.blobs})
    # a third run fetches nothing at all
    distribution_upstream.reset_counts()
    p = mirror(config, root, SOURCE)
    assert p.returncode == 0, p.stderr
    assert distribution_upstream.count_requests("GET", "/blobs/sha256:", status=200) == 0
    assert "0 fetched" in p.stdout


def test_dry_run_writes_nothing(release: Release, config: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    p = mirror(config, root, SOURCE, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert f"would fetch {release.blob_count} blobs" in p.stdout
    assert not blobs_in(root)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("quay.io/openshift-release-dev/ocp-release:4.99.7-x86_64", "not found"),
        ("quay.io/openshift-release-dev/ocp-release", "not found"),
    ],
)
def test_unknown_release_is_one_line(
    release: Release, config: Path, tmp_path: Path, source: str, fragment: str
) -> None:
    p = mirror(config, tmp_path / "root", source)
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.startswith("bastion:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in p.stderr


def test_a_release_by_digest_is_pinned_by_digest(
    release: Release, config: Path, tmp_path: Path
) -> None:
    """Without a tag (and no --to) the "Update image" reference carries the digest: a bare
    repository would mean :latest, which the mirror does not have."""
    p = mirror(
        config,
        tmp_path / "root",
        f"{RELEASE_SOURCE}@{release.release_digest}",
        "--mirror-host",
        "mirror.example:5000",
    )
    assert p.returncode == 0, p.stderr
    expected = f"Update image:  mirror.example:5000/{RELEASE_SOURCE}@{release.release_digest}"
    assert expected in p.stdout


def test_missing_signatures_fail_before_anything_is_copied(
    release: Release, config: Path, tmp_path: Path
) -> None:
    root, empty = tmp_path / "root", tmp_path / "no-signatures"
    empty.mkdir()
    p = mirror(config, root, SOURCE, "--signatures-from", str(empty))
    assert p.returncode == 1
    lines = [line for line in p.stderr.splitlines() if line.startswith("bastion:")]
    assert len(lines) == 1 and "no signature for" in lines[0], p.stderr
    # only the release image's own layers (read for its payload) were fetched; no tag
    assert len(blobs_in(root)) <= len(release.release_image.blobs)
    assert not (root / "repositories" / RELEASE_SOURCE / "_manifests" / "tags").exists()


def test_every_missing_component_is_named(
    release: Release, config: Path, tmp_path: Path, upstream_client: RegistryClient
) -> None:
    gone = sorted(set(release.components.values()))[:2]
    for digest in gone:
        r = upstream_client.delete_manifest(COMPONENT_REPO, digest)
        assert r.status == 202, r.status
    root = tmp_path / "root"
    try:
        p = mirror(config, root, SOURCE)
    finally:
        push_release(release, upstream_client)  # the upstream is shared with other tests
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("bastion:")]
    assert len(lines) == 2, p.stderr
    for digest in gone:
        assert sum(digest in line and "not found" in line for line in lines) == 1, lines
    assert not (root / "repositories" / RELEASE_SOURCE / "_manifests" / "tags").exists()


def test_mirror_image_to_one_repository_refuses_a_tag_two_sources_share(
    config: Path, tmp_path: Path, upstream_client: RegistryClient
) -> None:
    from tests.images import sample_image
    from tests.upstream import push_artifact

    for team in ("a", "b"):
        push_artifact(upstream_client, f"team/{team}", sample_image(f"shared-{team}"), tag="v1")
    p = subprocess.run(
        [
            *bastion_command(),
            "mirror",
            "image",
            "--config",
            str(config),
            "--root",
            str(tmp_path / "root"),
            "--to",
            "mirror/all",
            "quay.io/team/a:v1",
            "quay.io/team/b:v1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert line.startswith("bastion: ") and "both be tagged v1 in mirror/all" in line
    assert not (tmp_path / "root" / "blobs").exists()


def test_refused_credentials_name_authfile_and_host(
    release: Release, tmp_path: Path, distribution_upstream: DistributionUpstream
) -> None:
    bad = write_authfile(tmp_path / "bad.json", {"quay.io": ("puller", "nope")})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"upstreams:\n  quay.io:\n    url: {distribution_upstream.url}\n    connect_timeout: 2\n"
    )
    p = mirror(cfg, tmp_path / "root", SOURCE, "--authfile", str(bad))
    assert p.returncode == 1
    line = next(x for x in p.stderr.splitlines() if x.startswith("bastion:"))
    assert str(bad) in line and "quay.io" in line


def test_mirror_image_while_serving_shares_fetches(
    config: Path,
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_client: RegistryClient,
) -> None:
    """``mirror image`` and a running ``serve`` (pull-through) on one root: every blob is
    fetched from the upstream once in all, whoever asks first."""
    from tests.images import multi_arch_index, sample_image
    from tests.upstream import push_artifact

    images = [sample_image(f"extra-{i}", payload_size=2 * 1024 * 1024) for i in range(3)]
    index = multi_arch_index("extra-index")
    refs = []
    for i, image in enumerate(images):
        push_artifact(upstream_client, "team/extra", image, tag=f"v{i}")
        refs.append(f"quay.io/team/extra:v{i}")
    index_digest = push_artifact(upstream_client, "team/multi", index)
    refs.append(f"quay.io/team/multi@{index_digest}")
    listing = tmp_path / "images.txt"
    listing.write_text("# additional images\n" + "\n".join(refs) + "\n")
    root = tmp_path / "root"
    server = start_registry(tmp_path / "serve", config.read_text(), root=root)
    distribution_upstream.reset_counts()
    try:
        proc = subprocess.Popen(
            [
                *bastion_command(),
                "mirror",
                "image",
                "--config",
                str(config),
                "--root",
                str(root),
                "--from-file",
                str(listing),
                "--out-dir",
                str(tmp_path / "out"),
                "--mirror-host",
                server.addr,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        import urllib.request

        for image in images:  # nodes pulling the same blobs through the cache meanwhile
            for blob in image.blobs:
                url = f"http://{server.addr}/v2/quay.io/team/extra/blobs/{blob.digest}"
                with urllib.request.urlopen(url, timeout=60) as r:
                    assert r.read() == blob.data
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        unique = {b.digest for image in [*images, *index.children] for b in image.blobs}
        assert distribution_upstream.count_requests("GET", "/blobs/sha256:", status=200) == len(
            unique
        )
        assert "Success" in out
        for i in range(3):
            assert (
                root / f"repositories/quay.io/team/extra/_manifests/tags/v{i}"
            ).read_text() == images[i].digest
        itms = yaml.safe_load((tmp_path / "out" / "imageTagMirrorSet.yaml").read_text())
        assert itms["spec"]["imageTagMirrors"] == [
            {"source": "quay.io/team/extra", "mirrors": [f"{server.addr}/quay.io/team/extra"]}
        ]
    finally:
        stop_registry(server)
