"""``bastion export`` / ``bastion import`` in process: selection, the export description,
increments and their order, verification of what is imported, resuming, one-line errors.

Stores are seeded straight from the synthetic release builder (``tests/release.py``) under the
names ``mirror release`` uses, without an upstream; the e2e test does the real mirror."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from storage import Digest, FilesystemDriver, Store, paths
from storage import layout as oci
from tests.images import Image
from tests.release import (
    COMPONENT_SOURCE,
    DOCKER_LIST_COMPONENT,
    RELEASE_SOURCE,
    Release,
    build_release,
)

REPOS = {
    "openshift-release-dev/ocp-release": RELEASE_SOURCE,
    "openshift-release-dev/ocp-v4.0-art-dev": COMPONENT_SOURCE,
}


def seed(root: Path, release: Release, signature: bytes | None = None) -> Store:
    """Put ``release`` into the store at ``root`` as ``mirror release`` does."""
    store = Store(FilesystemDriver(str(root)))

    async def load() -> None:
        for digest, data in release.blobs.items():
            await store.driver.put_content(paths.blob(Digest.parse(digest)), data)
        for m in release.manifests:
            repo = REPOS[m.repo]
            for blob in m.blobs:
                await store.link_blob(repo, Digest.parse(blob))
            await store.put_manifest(repo, m.tag or m.digest, m.data, m.media_type)
        if signature is not None:
            d = Digest.parse(release.release_digest)
            await store.driver.put_content(f"signatures/sha256={d.hex}/signature-1", signature)

    asyncio.run(load())
    return store


def seed_images(root: Path, images: dict[tuple[str, str], Image]) -> Store:
    """Put each image into the store at ``root`` as ``repository:tag``."""
    store = Store(FilesystemDriver(str(root)))

    async def load() -> None:
        for (repo, tag), image in images.items():
            for blob in image.blobs:
                d = Digest.parse(blob.digest)
                await store.driver.put_content(paths.blob(d), blob.data)
                await store.link_blob(repo, d)
            await store.put_manifest(repo, tag, image.manifest, image.media_type)

    asyncio.run(load())
    return store


def export_images(images: dict[tuple[str, str], Image], tmp_path: Path) -> Path:
    """A store of ``images`` under ``tmp_path/src`` exported to ``tmp_path/export``."""
    seed_images(tmp_path / "src", images)
    out = tmp_path / "export"
    assert bastion("export", "--root", str(tmp_path / "src"), "--to", str(out)) == 0
    return out


def edit_json(path: Path, edit: Callable[[Any], object]) -> None:
    """Rewrite the JSON file ``path`` after ``edit`` changed its document in place."""
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def bastion(*args: str) -> int:
    return main(list(args))


def blob_files(directory: Path) -> set[str]:
    return {"sha256:" + p.name for p in (directory / "blobs" / "sha256").iterdir()}


def manifest_digests(release: Release) -> set[str]:
    return {m.digest for m in release.manifests}


@pytest.fixture(scope="module")
def releases() -> list[Release]:
    first = build_release("4.99.0", components=12, payload_size=4096)
    second = build_release("4.99.1", components=12, payload_size=4096, base=first)
    third = build_release("4.99.2", components=12, payload_size=4096, base=second)
    return [first, second, third]


def test_export_then_import_round_trip(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = releases[0]
    seed(tmp_path / "a", release, signature=b"signed")
    out = tmp_path / "export"
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out)) == 0
    assert "Summary: export " in capsys.readouterr().out
    assert json.loads((out / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((out / "index.json").read_text())
    names = {d["annotations"]["org.opencontainers.image.ref.name"] for d in index["manifests"]}
    assert f"{RELEASE_SOURCE}:{release.release_tag}" in names
    assert {f"{COMPONENT_SOURCE}@{d}" for d in release.components.values()} <= names
    assert len(names) == len(release.components) + 1  # list children are not entries
    assert blob_files(out) == set(release.blobs) | manifest_digests(release)
    meta = json.loads((out / "bastion-export.json").read_text())
    assert meta["base"] is None and meta["chain"] == []
    assert set(meta["carried"]) == blob_files(out)
    assert meta["repositories"][RELEASE_SOURCE]["tags"] == {
        release.release_tag: release.release_digest
    }
    hex_ = release.release_digest[7:]
    assert (out / "signatures" / f"sha256={hex_}" / "signature-1").read_bytes() == b"signed"

    b = tmp_path / "b"
    assert bastion("import", str(out), "--root", str(b)) == 0
    assert "Summary: imported" in capsys.readouterr().out
    for m in release.manifests:
        assert (b / "blobs/sha256" / m.digest[7:9] / m.digest[7:]).read_bytes() == m.data
        assert (
            b / "repositories" / REPOS[m.repo] / "_manifests/revisions/sha256" / m.digest[7:]
        ).exists()
    for digest, data in release.blobs.items():
        assert (b / "blobs/sha256" / digest[7:9] / digest[7:]).read_bytes() == data
    tag = b / "repositories" / RELEASE_SOURCE / "_manifests/tags" / release.release_tag
    assert tag.read_text() == release.release_digest
    assert (b / "signatures" / f"sha256={hex_}" / "signature-1").read_bytes() == b"signed"
    # importing again changes nothing and fetches nothing
    assert bastion("import", str(out), "--root", str(b)) == 0
    assert "0 verified and stored" in capsys.readouterr().out


def test_chain_of_increments_carries_only_new_content(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    exports = [tmp_path / f"e{i}" for i in range(3)]
    for i, release in enumerate(releases):
        seed(src, release)
        args = ["export", "--root", str(src), "--to", str(exports[i])]
        if i:
            # the first increment names the previous directory, the second only its json
            since = exports[i - 1] if i == 1 else exports[i - 1] / "bastion-export.json"
            args += ["--since", str(since)]
        assert bastion(*args) == 0, capsys.readouterr().err
    metas = [json.loads((e / "bastion-export.json").read_text()) for e in exports]
    assert metas[1]["base"] == metas[0]["id"] and metas[2]["base"] == metas[1]["id"]
    assert metas[2]["chain"] == [metas[0]["id"], metas[1]["id"]]
    for i in (1, 2):
        files = blob_files(exports[i])
        assert files - manifest_digests(releases[i]) == set(releases[i].new_blobs(releases[i - 1]))
        assert not files & (
            set(releases[i - 1].blobs) - set(releases[i].new_blobs(releases[i - 1]))
        )
        # unchanged component manifests do not travel again
        unchanged = set(releases[i].components.values()) & set(releases[i - 1].components.values())
        assert unchanged and not files & unchanged
    sizes = [sum(f.stat().st_size for f in (e / "blobs/sha256").iterdir()) for e in exports]
    assert sizes[1] < sizes[0] / 2 and sizes[2] < sizes[0] / 2

    # out of order: refused, naming the base
    dst = tmp_path / "dst"
    assert bastion("import", str(exports[1]), "--root", str(dst)) == 1
    err = capsys.readouterr().err
    assert metas[0]["id"] in err and "increment" in err and len(err.strip().splitlines()) == 1
    assert bastion("import", str(exports[0]), "--root", str(dst)) == 0
    assert bastion("import", str(exports[2]), "--root", str(dst)) == 1
    assert metas[1]["id"] in capsys.readouterr().err
    # in order: everything of the three releases, tags included
    assert bastion("import", str(exports[1]), "--root", str(dst)) == 0
    assert bastion("import", str(exports[2]), "--root", str(dst)) == 0
    for release in releases:
        for m in release.manifests:
            path = (
                dst / "repositories" / REPOS[m.repo] / "_manifests/revisions/sha256" / m.digest[7:]
            )
            assert path.exists(), m
        tag = dst / "repositories" / RELEASE_SOURCE / "_manifests/tags" / release.release_tag
        assert tag.read_text() == release.release_digest


def test_flipped_byte_fails_naming_digest_and_keeps_good_content(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = releases[0]
    seed(tmp_path / "a", release)
    out = tmp_path / "export"
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out)) == 0
    cli = next(a for n, a in release.component_images.items() if n == DOCKER_LIST_COMPONENT)
    victim = cli.children[0].layers[-1].digest  # only in one list child
    path = out / "blobs/sha256" / victim[7:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    missing = release.components["etcd"]
    (out / "blobs/sha256" / missing[7:]).unlink()
    capsys.readouterr()
    b = tmp_path / "b"
    assert bastion("import", str(out), "--root", str(b)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bastion:")]
    bad = [line for line in err if victim in line]
    assert len(bad) == 1 and COMPONENT_SOURCE in bad[0]
    assert any(missing in line and "missing" in line for line in err)
    assert not (b / "blobs/sha256" / victim[7:9] / victim[7:]).exists()
    revisions = b / "repositories" / COMPONENT_SOURCE / "_manifests/revisions/sha256"
    assert not (revisions / release.components[DOCKER_LIST_COMPONENT][7:]).exists()
    assert not (revisions / missing[7:]).exists()
    # good content is kept: every other component
    for name, digest in release.components.items():
        if name not in (DOCKER_LIST_COMPONENT, "etcd"):
            assert (revisions / digest[7:]).exists(), name
    assert not any((b / "imports/staging").iterdir()) if (b / "imports/staging").exists() else True


def test_select_by_repository_glob_and_release(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = releases[0]
    store = seed(tmp_path / "a", release)
    extra = tmp_path / "extra-root"
    seed(extra, releases[1])

    async def add_other() -> None:  # an unrelated repository
        data = b'{"architecture": "amd64", "os": "linux"}'
        d = Digest.of(data)
        await store.driver.put_content(paths.blob(d), data)
        await store.link_blob("team/app", d)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": str(d),
                    "size": len(data),
                },
                "layers": [],
            }
        ).encode()
        await store.put_manifest("team/app", "v1", manifest, None)

    asyncio.run(add_other())
    root = str(tmp_path / "a")
    out = tmp_path / "by-glob"
    assert bastion("export", "--root", root, "--to", str(out), "--repo", "team/*") == 0
    index = json.loads((out / "index.json").read_text())
    assert [d["annotations"]["io.bastion.repository"] for d in index["manifests"]] == ["team/app"]
    assert index["manifests"][0]["annotations"]["io.bastion.tag"] == "v1"
    out = tmp_path / "by-release"
    ref = f"{RELEASE_SOURCE}:{release.release_tag}"
    assert bastion("export", "--root", root, "--to", str(out), "--release", ref) == 0
    meta = json.loads((out / "bastion-export.json").read_text())
    assert set(meta["repositories"]) == {RELEASE_SOURCE, COMPONENT_SOURCE}
    assert set(meta["repositories"][COMPONENT_SOURCE]["manifests"]) == set(
        release.components.values()
    )
    capsys.readouterr()
    assert bastion("export", "--root", root, "--to", str(tmp_path / "x"), "--repo", "nope/*") == 1
    assert "nope/*" in capsys.readouterr().err


def test_interrupted_export_resumes(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = releases[0]
    seed(tmp_path / "a", release)
    out = tmp_path / "export"
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out)) == 0
    first = json.loads((out / "bastion-export.json").read_text())
    # simulate a run cut short: the description is not written yet, some blobs are
    (out / "bastion-export.json").unlink()
    (out / "bastion-export.partial.json").write_text(json.dumps({"id": first["id"], "base": None}))
    removed = sorted(release.blobs)[:3]
    for d in removed:
        (out / "blobs/sha256" / d[7:]).unlink()
    (out / "blobs/sha256" / f".tmp-session-{removed[0][7:]}").write_bytes(b"partial")
    capsys.readouterr()
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out)) == 0
    line = capsys.readouterr().out
    assert "blobs: 3 written" in line
    again = json.loads((out / "bastion-export.json").read_text())
    assert again["id"] == first["id"] and not (out / "bastion-export.partial.json").exists()
    assert blob_files(out) == set(release.blobs) | manifest_digests(release)
    assert not list(out.rglob(".tmp-*"))  # the interrupted run's partial blob is gone
    # a finished export directory is not overwritten
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out)) == 2
    assert "already holds export" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bastion("import", str(tmp_path / "nope"), "--root", str(tmp_path)) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bastion("export", "--root", str(tmp_path))
    assert e.value.code == 2
    assert (
        bastion("export", "--root", str(tmp_path), "--to", str(tmp_path / "o"), "--split-size", "x")
        == 2
    )
    assert "--split-size" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert bastion("import", str(tmp_path / "empty"), "--root", str(tmp_path / "r")) == 1
    assert "not an OCI image layout" in capsys.readouterr().err
    empty = str(tmp_path / "empty")
    assert bastion("import", empty, "--plain-http") == 2
    assert "only apply with --to" in capsys.readouterr().err
    assert bastion("import", empty, "--to", "https://quay.example.com/ocp") == 2
    assert "give REGISTRY[/PREFIX]" in capsys.readouterr().err
    assert bastion("import", empty, "--to", "quay.example.com/Bad") == 2
    assert "--to: invalid repository name" in capsys.readouterr().err
    assert bastion("import", empty, "--to", "q.example.com", "--authfile", empty + "/x") == 2
    assert "--authfile" in capsys.readouterr().err
    assert bastion("import", empty, "--to", "q.example.com", "--chunk-size", "4KiB") == 2
    assert "--chunk-size must be at least" in capsys.readouterr().err


def test_a_split_export_needs_about_one_volume_beyond_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a layout packed whole and removed at the end needs twice its size on the portable disk
    from storage import volumes

    release = build_release("4.99.6", components=8, payload_size=300 * 1024)
    seed(tmp_path / "a", release)
    out = tmp_path / "volumes"
    on_disk: list[int] = []
    write = volumes._write_volume

    def measured(layout: str, final: str, pieces: list[volumes.Piece], advance: Any) -> None:
        write(layout, final, pieces, advance)
        on_disk.append(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()))

    monkeypatch.setattr(volumes, "_write_volume", measured)
    args = ["export", "--root", str(tmp_path / "a"), "--to", str(out), "--split-size", "1MiB"]
    assert bastion(*args) == 0, capsys.readouterr().err
    packed = sum(v.stat().st_size for v in out.glob("bastion-export-*.tar"))
    assert len(on_disk) >= 4, on_disk
    # the layout's blobs leave as they are packed: beyond the volumes' size, at most the
    # volume just written (its blobs not yet removed) and a blob cut across volumes (it
    # stays until its last part is in); packed whole, the layout stayed beside every volume
    biggest = max(len(b) for b in release.blobs.values())
    assert max(on_disk) <= packed + (1 << 20) + biggest + (64 << 10), (on_disk, packed)
    assert bastion("import", str(out), "--root", str(tmp_path / "b")) == 0


def test_split_volumes_round_trip_and_a_damaged_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import subprocess

    release = build_release("4.99.5", components=6, payload_size=400 * 1024)
    seed(tmp_path / "a", release)
    out = tmp_path / "volumes"
    args = ["export", "--root", str(tmp_path / "a"), "--to", str(out), "--split-size", "1MiB"]
    assert bastion(*args) == 0, capsys.readouterr().err
    assert "volumes of at most 1.0 MiB" in capsys.readouterr().out
    volumes = sorted(out.glob("bastion-export-*.tar"))
    assert len(volumes) >= 3 and all(v.stat().st_size <= 1 << 20 for v in volumes)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [v.name for v in volumes]
        + [v.name + ".sha256" for v in volumes]
        + ["SHA256SUMS", "bastion-export.json"]
    )
    biggest = max(release.blobs.values(), key=len)
    assert len(biggest) > 1 << 20  # so one blob is cut across volumes
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, check=True)

    b = tmp_path / "b"
    assert bastion("import", str(out), "--root", str(b)) == 0, capsys.readouterr().err
    for digest, data in release.blobs.items():
        assert (b / "blobs/sha256" / digest[7:9] / digest[7:]).read_bytes() == data
    tag = b / "repositories" / RELEASE_SOURCE / "_manifests/tags" / release.release_tag
    assert tag.read_text() == release.release_digest
    assert not list((b / "imports").glob("unpack-*"))

    # one flipped byte inside the big blob's first part: the volume and the blob are named
    victim = Digest.of(biggest)
    for volume in volumes:
        data = bytearray(volume.read_bytes())
        at = data.find(biggest[4096:4160])
        if at >= 0:
            data[at] ^= 0x01
            volume.write_bytes(bytes(data))
            break
    c = tmp_path / "c"
    capsys.readouterr()
    assert bastion("import", str(out), "--root", str(c)) == 1
    err = capsys.readouterr().err
    assert f"volume {volume.name} does not match its checksum" in err
    assert str(victim) in err
    assert not (c / "blobs/sha256" / victim.hex[:2] / victim.hex).exists()
    assert hashlib.sha256(biggest).hexdigest() == victim.hex


def test_mirror_configuration_travels_with_the_export(
    releases: list[Release], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    release = releases[0]
    store = seed(tmp_path / "a", release)
    host = "bastion.example:5000"

    def mirror_map(name: str, repo: str) -> bytes:
        doc = {"name": name, "host": host, "digests": {repo: f"{host}/{repo}"}, "tags": {}}
        return json.dumps(doc).encode()

    async def keep() -> None:  # as `bastion mirror` keeps it
        await oci.keep_mirror_config(
            store,
            "release-4.99.0",
            {"registries.conf": b"conf", "mirror-map.json": mirror_map("x", RELEASE_SOURCE)},
        )
        await oci.keep_mirror_config(
            store, "other", {"registries.conf": b"other", "mirror-map.json": mirror_map("y", "a/b")}
        )

    asyncio.run(keep())
    out = tmp_path / "export"
    ref = f"{RELEASE_SOURCE}:{release.release_tag}"
    assert bastion("export", "--root", str(tmp_path / "a"), "--to", str(out), "--release", ref) == 0
    meta = json.loads((out / "bastion-export.json").read_text())
    # only the configuration that mirrors an exported repository
    assert meta["mirror_config"] == [
        "release-4.99.0/mirror-map.json",
        "release-4.99.0/registries.conf",
    ]
    assert (out / "mirror-config/release-4.99.0/registries.conf").read_bytes() == b"conf"
    assert not (out / "mirror-config/other").exists()

    b, conf = tmp_path / "b", tmp_path / "conf"
    assert bastion("import", str(out), "--root", str(b), "--out-dir", str(conf)) == 0
    assert "1 mirror configurations" in capsys.readouterr().out
    assert (b / "mirror-config/release-4.99.0/registries.conf").read_bytes() == b"conf"
    assert (conf / "release-4.99.0/registries.conf").read_bytes() == b"conf"
