"""``bastion import`` of index entries and export descriptions that cannot be imported as they
stand: invalid repository names and tags, descriptors whose size or media type is wrong. Each
is refused with one line naming it and why, nothing of it is written, and every other entry is
imported (exit 1, never a traceback). Also: a bad digest is named once per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from storage import Digest, paths
from storage.manifest import OCI_INDEX
from tests.images import Image, multi_arch_index, sample_image
from tests.test_ferry import bastion, edit_json, export_images

APP, OTHER = "team/app", "team/other"


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, str], Image]:
    return {
        (APP, "v1"): sample_image("entries-v1", payload_size=1024),
        (APP, "v2"): sample_image("entries-v2", payload_size=1024),
        (OTHER, "v1"): sample_image("entries-other", payload_size=1024),
    }


@pytest.fixture
def exported(images: dict[tuple[str, str], Image], tmp_path: Path) -> Path:
    """An export of ``images``; index.json lists them in order (team/app:v2 second)."""
    return export_images(images, tmp_path)


def entry(out: Path, position: int) -> dict[str, Any]:
    return dict(json.loads((out / "index.json").read_text())["manifests"][position])


def import_failures(out: Path, root: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Import ``out`` into ``root``, which must fail (exit 1); its error lines."""
    capsys.readouterr()
    assert bastion("import", str(out), "--root", str(root)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("bastion: ") for line in lines), err
    return lines


def tag_of(root: Path, repo: str, tag: str) -> str | None:
    path = root / "repositories" / repo / "_manifests/tags" / tag
    return path.read_text() if path.exists() else None


def assert_imported(
    root: Path, images: dict[tuple[str, str], Image], *keys: tuple[str, str]
) -> None:
    for repo, tag in keys:
        assert tag_of(root, repo, tag) == images[repo, tag].digest, (repo, tag)


BAD_ENTRIES = [
    ("io.bastion.repository", "../../../tmp/x/evil", "invalid repository name"),
    ("io.bastion.repository", "Team/App", "invalid repository name 'Team/App'"),
    ("io.bastion.tag", "bad tag/..", "invalid tag 'bad tag/..'"),
    ("io.bastion.tag", "bad tag", "invalid tag 'bad tag'"),
    ("io.bastion.tag", "t" * 200, "invalid tag"),
]


@pytest.mark.parametrize(
    ("annotation", "value", "why"),
    BAD_ENTRIES,
    ids=["path-escape", "uppercase", "tag-escape", "tag-space", "tag-200"],
)
def test_invalid_name_or_tag_in_an_entry_is_refused_and_the_rest_imported(
    images: dict[tuple[str, str], Image],
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    annotation: str,
    value: str,
    why: str,
) -> None:
    edit_json(
        exported / "index.json",
        lambda doc: doc["manifests"][1]["annotations"].update({annotation: value}),
    )
    root = tmp_path / "dst"
    lines = import_failures(exported, root, capsys)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"bastion: index.json manifests[1] ({APP}:v2): {why}")
    assert lines[0].endswith("; not imported")
    assert lines[1].startswith("bastion: 1 of 3 images not imported; the rest is in the store")
    assert_imported(root, images, (APP, "v1"), (OTHER, "v1"))
    # nothing of the refused entry was written, under any name
    assert tag_of(root, APP, "v2") is None
    assert sorted(p.name for p in (root / "repositories").iterdir()) == ["team"]
    assert sorted(p.name for p in (root / "repositories/team").iterdir()) == ["app", "other"]
    assert {p.name for p in (root / "repositories" / APP / "_manifests/tags").iterdir()} == {"v1"}
    assert not list(tmp_path.rglob("evil"))
    revisions = root / "repositories" / APP / "_manifests/revisions/sha256"
    assert not (revisions / images[APP, "v2"].digest[7:]).exists()
    v2_layer = Digest.parse(images[APP, "v2"].layers[-1].digest)
    assert not (root / paths.blob(v2_layer)).exists()


def test_invalid_names_and_tags_in_the_export_description_are_refused(
    images: dict[tuple[str, str], Image],
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v1 = images[APP, "v1"].digest

    def tamper(doc: dict[str, Any]) -> None:
        doc["repositories"][APP]["tags"].update(
            {"bad tag": v1, "t" * 200: v1, "fine": v1, "broken": "sha256:12"}
        )
        doc["repositories"]["Team/App"] = {"tags": {"v1": v1}, "manifests": []}

    edit_json(exported / "bastion-export.json", tamper)
    root = tmp_path / "dst"
    lines = import_failures(exported, root, capsys)
    refused = [line for line in lines if line.startswith("bastion: bastion-export.json: ")]
    assert len(refused) == 4 and len(lines) == 5, lines
    assert any("'bad tag'" in line and "invalid tag" in line for line in refused)
    assert any("'t" in line and "invalid tag" in line for line in refused)
    assert any("'Team/App'" in line and "invalid repository name" in line for line in refused)
    assert any("'broken'" in line and "invalid" in line for line in refused)
    assert lines[-1].startswith("bastion: 0 of 3 images not imported")
    # every image, and the valid extra tag, are in; the invalid ones are nowhere
    assert_imported(root, images, *images)
    assert tag_of(root, APP, "fine") == v1
    tags = {p.name for p in (root / "repositories" / APP / "_manifests/tags").iterdir()}
    assert tags == {"v1", "v2", "fine"}
    assert not (root / "repositories/Team").exists()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"size": 5}, "the manifest has {size} bytes, its descriptor says 5"),
        (
            {"mediaType": "text/plain"},
            "mediaType 'text/plain' is not a manifest or index media type",
        ),
    ],
    ids=["size", "media-type"],
)
def test_a_wrong_index_descriptor_is_refused(
    images: dict[tuple[str, str], Image],
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    why: str,
) -> None:
    v2 = images[APP, "v2"]

    def tamper(doc: dict[str, Any]) -> None:
        # the same manifest, described rightly, under another tag: that entry is good
        again = json.loads(json.dumps(doc["manifests"][1]))
        again["annotations"]["io.bastion.tag"] = "v2-again"
        doc["manifests"].append(again)
        doc["manifests"][1].update(change)

    edit_json(exported / "index.json", tamper)
    root = tmp_path / "dst"
    lines = import_failures(exported, root, capsys)
    assert len(lines) == 2, lines
    expected = why.format(size=len(v2.manifest))
    assert lines[0] == f"bastion: index.json manifests[1] ({APP}:v2): {expected}; not imported"
    assert lines[1].startswith("bastion: 1 of 4 images not imported")
    assert_imported(root, images, (APP, "v1"), (OTHER, "v1"))
    assert tag_of(root, APP, "v2") is None
    assert tag_of(root, APP, "v2-again") == v2.digest


def test_a_wrong_size_in_a_list_descriptor_fails_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index = multi_arch_index("entries-list")
    child = index.children[0]
    doc = json.loads(index.manifest)
    doc["manifests"][0]["size"] = len(child.manifest) + 1
    body = json.dumps(doc).encode()
    digest = Digest.of(body)
    layout = tmp_path / "layout"
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for image in index.children:
        for name, data in image.contents().items():
            (blobs / name[7:]).write_bytes(data)
    (blobs / digest.hex).write_bytes(body)
    descriptor = {"mediaType": OCI_INDEX, "digest": str(digest), "size": len(body)}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    capsys.readouterr()
    root = tmp_path / "dst"
    assert bastion("import", str(layout), "--root", str(root), "--repo", "team/list") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == (
        f"bastion: {child.digest}: the manifest has {len(child.manifest)} bytes, its descriptor "
        f"says {len(child.manifest) + 1} (in team/list)"
    )
    assert lines[1].startswith("bastion: 1 of 1 images not imported")
    revisions = root / "repositories/team/list/_manifests/revisions/sha256"
    assert not (revisions / digest.hex).exists()


def test_a_bad_digest_is_named_once_per_line(
    images: dict[tuple[str, str], Image],
    exported: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = images[APP, "v2"].digest
    layer = images[OTHER, "v1"].layers[-1].digest
    for digest in (manifest, layer):
        path = exported / "blobs/sha256" / digest[7:]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    lines = import_failures(exported, tmp_path / "dst", capsys)
    for digest, repo in ((manifest, APP), (layer, OTHER)):
        (line,) = [line for line in lines if digest in line]
        assert line.count(digest) == 1 and "hashes to sha256:" in line and f"(in {repo})" in line

    # the export side too: a store blob that does not hash to its digest
    src = tmp_path / "src"
    (src / paths.blob(Digest.parse(layer))).write_bytes(b"rotten")
    capsys.readouterr()
    assert bastion("export", "--root", str(src), "--to", str(tmp_path / "again")) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.count(layer) == 1, line


def test_an_invalid_digest_in_the_export_description_is_one_line(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def tamper(doc: dict[str, Any]) -> None:
        doc["base"] = "20260101T000000Z-00000000"
        doc["carried"].append("sha256:12")

    edit_json(exported / "bastion-export.json", tamper)
    (line,) = import_failures(exported, tmp_path / "dst", capsys)
    assert line == f"bastion: {exported}/bastion-export.json: invalid sha256 digest 'sha256:12'"
