"""The air gap end to end: mirror the synthetic release from a token-auth upstream, export it,
take the upstream away, import the export into a fresh root while ``bastion serve`` already
runs on it, and pull components by their original quay.io digests through the registries.conf
the mirror step wrote, as the nodes do. skopeo reads what export writes, and import reads what
skopeo writes. ``import --to`` pushes the export into another registry (distribution behind
token auth) and the components are read back by digest."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.images import sample_image, write_oci_layout
from tests.release import (
    COMPONENT_SOURCE,
    DOCKER_LIST_COMPONENT,
    OCI_INDEX_COMPONENT,
    RELEASE_REPO,
    RELEASE_SOURCE,
    Release,
    build_release,
    push_release,
)
from tests.upstream import PULLER, DistributionUpstream, RegistryClient, write_authfile

from .conftest import (
    ClientEnv,
    Tool,
    bastion_command,
    free_addr,
    start_registry,
    stop_registry,
)

SOURCE = "quay.io/openshift-release-dev/ocp-release:4.99.1-x86_64"


@pytest.fixture
def release(upstream_client: RegistryClient) -> Release:
    rel = build_release("4.99.1", components=12, payload_size=32 * 1024)
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


def bastion(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bastion_command(), *args], capture_output=True, text=True, timeout=timeout
    )


def test_mirror_export_import_serve_offline(
    release: Release,
    config: Path,
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    podman: Tool,
    skopeo: Tool,
    client_env: ClientEnv,
) -> None:
    connected, site, out, disk = (tmp_path / n for n in ("connected", "site", "out", "disk"))
    addr = free_addr()
    p = bastion(
        "mirror", "release", SOURCE, "--config", str(config), "--root", str(connected),
        "--out-dir", str(out), "--mirror-host", addr, "--mirror-insecure",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = bastion("export", "--config", str(config), "--root", str(connected), "--to", str(disk))
    assert p.returncode == 0, p.stderr
    assert "Summary: export" in p.stdout and "Traceback" not in p.stderr

    # skopeo reads the layout by the full original reference (OCI entries: skopeo 1.9 reads
    # only OCI manifests and indexes from a layout)
    installer = release.components["installer"]
    got = tmp_path / "skopeo-installer"
    skopeo("copy", f"oci:{disk}:{COMPONENT_SOURCE}@{installer}", f"dir:{got}")
    assert (got / "manifest.json").read_bytes() == release.manifest(installer).data
    index = release.components[OCI_INDEX_COMPONENT]
    skopeo("copy", "--all", f"oci:{disk}:{COMPONENT_SOURCE}@{index}", f"dir:{tmp_path / 'idx'}")
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == release.manifest(index).data

    # the site: no upstream; serve first, import while serving
    distribution_upstream.stop()
    server = start_registry(tmp_path / "serve", "log_level: info\n", addr=addr, root=site)
    try:
        p = bastion("import", str(disk), "--root", str(site))
        assert p.returncode == 0, p.stderr
        assert "Summary: imported" in p.stdout
        for m in release.manifests:  # byte for byte, list children included
            got_bytes = (site / "blobs/sha256" / m.digest[7:9] / m.digest[7:]).read_bytes()
            assert got_bytes == m.data
        conf = client_env.registries_conf(
            "export-import",
            "unqualified-search-registries = []\n\n" + (out / "registries.conf").read_text(),
        )
        node = podman.with_env(CONTAINERS_REGISTRIES_CONF=conf)
        refs = [f"{RELEASE_SOURCE}@{release.release_digest}"]
        refs += [
            f"{COMPONENT_SOURCE}@{release.components[n]}"
            for n in ("etcd", "installer", DOCKER_LIST_COMPONENT, OCI_INDEX_COMPONENT)
        ]
        for ref in refs:
            node("pull", "-q", "--signature-policy", client_env.policy, ref)
            info = json.loads(node("image", "inspect", ref).stdout)[0]
            assert info["Digest"] == ref.split("@")[1]
    finally:
        stop_registry(server)


def test_import_of_skopeo_written_layout(skopeo: Tool, tmp_path: Path) -> None:
    image, other = sample_image("ferry-skopeo"), sample_image("ferry-skopeo-2")
    src = write_oci_layout(tmp_path / "src", {"a": image, "b": other})
    layout = tmp_path / "by-skopeo"
    skopeo("copy", f"oci:{src}:a", f"oci:{layout}:registry.example.com/team/app:v1")
    skopeo("copy", f"oci:{src}:b", f"oci:{layout}:v2")
    root = tmp_path / "root"
    # "v2" names no repository: import says so (usage error) and writes nothing
    p = bastion("import", str(layout), "--root", str(root))
    assert p.returncode == 2 and "--repo" in p.stderr and len(p.stderr.splitlines()) == 1
    p = bastion("import", str(layout), "--root", str(root), "--repo", "team/other")
    assert p.returncode == 0, p.stderr
    tags = root / "repositories/team/other/_manifests/tags"
    assert (tags / "v2").read_text() == other.digest
    assert [t.name for t in tags.iterdir()] == ["v2"]  # the other entry is digest-only there
    revisions = root / "repositories/team/other/_manifests/revisions/sha256"
    assert (revisions / image.digest[7:]).exists()
    # a layout naming full references needs no --repo
    skopeo("copy", f"oci:{src}:a", f"oci:{tmp_path / 'only-a'}:registry.example.com/team/app:v1")
    p = bastion("import", str(tmp_path / "only-a"), "--root", str(root))
    assert p.returncode == 0, p.stderr
    tag = root / "repositories/registry.example.com/team/app/_manifests/tags/v1"
    assert tag.read_text() == image.digest


def test_mirror_export_import_to_registry(
    release: Release,
    config: Path,
    tmp_path: Path,
    distribution_upstream: DistributionUpstream,
    upstream_authfile: Path,
) -> None:
    """``import --to``: the export goes into another registry (here the same distribution,
    behind token auth, under ``site/``), every repository keeping its path under the prefix;
    blobs shared between repositories are mounted, not uploaded again; the mirror
    configuration is rendered for the target."""
    connected, disk, out = tmp_path / "connected", tmp_path / "disk", tmp_path / "site-config"
    p = bastion(
        "mirror", "release", SOURCE, "--config", str(config), "--root", str(connected),
        "--mirror-host", "bastion.example:5000",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    p = bastion("export", "--config", str(config), "--root", str(connected), "--to", str(disk))
    assert p.returncode == 0, p.stderr
    meta = json.loads((disk / "bastion-export.json").read_text())
    name = "release-4.99.1"
    assert f"{name}/registries.conf" in meta["mirror_config"]
    assert (
        "bastion.example:5000/" in (disk / "mirror-config" / name / "registries.conf").read_text()
    )

    distribution_upstream.reset_counts()
    target = f"{distribution_upstream.host}/site"
    args = ["import", str(disk), "--to", target, "--authfile", str(upstream_authfile)]
    p = bastion(*args, "--plain-http", "--out-dir", str(out), "--root", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"Summary: pushed to {target}: ") and "Traceback" not in p.stderr
    mounted = distribution_upstream.count_requests("POST", "mount=", status=201)
    assert mounted >= 1 and f", {mounted} mounted," in summary

    client = RegistryClient(distribution_upstream.url, PULLER)
    components = [f"site/{COMPONENT_SOURCE}", f"site/{RELEASE_SOURCE}"]
    for n in ("etcd", "installer", DOCKER_LIST_COMPONENT, OCI_INDEX_COMPONENT):
        digest = release.components[n]
        got = client.get_manifest(components[0], digest)
        assert got.status == 200 and got.body == release.manifest(digest).data, n
    tagged = client.get_manifest(components[1], release.release_tag)
    assert tagged.status == 200 and tagged.body == release.release_manifest
    for m in (release.manifest(release.components["etcd"]), release.manifests[-1]):
        repo = f"site/{RELEASE_SOURCE if m.repo == RELEASE_REPO else COMPONENT_SOURCE}"
        for blob in m.blobs:
            assert client.get_blob(repo, blob).body == release.blobs[blob]
    conf = (out / name / "registries.conf").read_text()
    assert f'location = "{target}/{RELEASE_SOURCE}"' in conf and "bastion.example" not in conf
    assert (out / name / "mirror-map.json").exists()

    # a rerun finds everything there
    p = bastion(*args, "--plain-http", "--root", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    assert ": 0 manifests (" in p.stdout and "0 uploaded" in p.stdout and " 0 mounted" in p.stdout
