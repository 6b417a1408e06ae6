"""``bastion import`` of a layout that is damaged or was made to do harm: symlinks out of it,
devices and FIFOs where blobs should be, blobs of another size than their descriptors, names an
export never writes, JSON nested without end. Each is one readable line and exit 1, never a
traceback, a hang or a file from outside the layout in the store; what is good is imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.images import Image, sample_image
from tests.test_ferry import bastion, edit_json, export_images, seed_images

GOOD, VICTIM = ("team/good", "v1"), ("team/victim", "v1")


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, str], Image]:
    return {
        GOOD: sample_image("hostile-good", payload_size=2048),
        VICTIM: sample_image("hostile-victim", payload_size=4096),
    }


@pytest.fixture
def layout(images: dict[tuple[str, str], Image], tmp_path: Path) -> Path:
    return export_images(images, tmp_path)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return [line for line in captured.err.splitlines() if line.startswith("bastion: ")]


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def stored(root: Path, digest: str) -> bool:
    hex_ = digest.removeprefix("sha256:")
    return (root / "blobs" / "sha256" / hex_[:2] / hex_).exists()


def victim_layer(images: dict[tuple[str, str], Image]) -> str:
    return images[VICTIM].layers[-1].digest


@pytest.mark.parametrize("kind", ["symlink-out", "device", "fifo", "too-large"])
def test_a_blob_that_is_no_plain_file_of_its_size_is_refused_without_reading_it(
    layout: Path,
    images: dict[tuple[str, str], Image],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    digest = victim_layer(images)
    path = blob_path(layout, digest)
    path.unlink()
    if kind == "symlink-out":
        outside = tmp_path / "outside"
        outside.write_bytes(images[VICTIM].layers[-1].data)  # even the right bytes
        path.symlink_to(outside)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)  # opened without a writer, a read would wait for ever
    else:
        path.write_bytes(b"\0" * (len(images[VICTIM].layers[-1].data) + 1))
    capsys.readouterr()
    root = tmp_path / "root"
    assert bastion("import", str(layout), "--root", str(root)) == 1
    err = lines(capsys)
    assert any(digest in line for line in err), err
    assert not stored(root, digest)
    assert stored(root, images[GOOD].layers[-1].digest)  # the rest is imported
    staging = root / "imports" / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_a_signature_linked_out_of_the_layout_stops_the_import_before_it_writes(
    layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = layout / "signatures" / f"sha256={'a' * 64}"
    directory.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (directory / "signature-1").symlink_to(secret)
    capsys.readouterr()
    root = tmp_path / "root"
    assert bastion("import", str(layout), "--root", str(root)) == 1
    (line,) = lines(capsys)
    assert "signatures" in line and "symbolic link" in line
    assert not (root / "signatures").exists() and not (root / "repositories").exists()


@pytest.mark.parametrize(
    ("rel", "fragment"),
    [
        ("signatures/foo/signature-1", "unexpected signature file 'foo/signature-1'"),
        ("mirror-config/.hidden/file", "unexpected mirror configuration file '.hidden/file'"),
    ],
)
def test_an_extra_file_an_export_never_writes_is_one_line_before_anything_is_written(
    layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rel: str, fragment: str
) -> None:
    path = layout / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    capsys.readouterr()
    root = tmp_path / "root"
    assert bastion("import", str(layout), "--root", str(root)) == 1
    (line,) = lines(capsys)
    assert fragment in line
    assert not (root / "repositories").exists()


def test_a_descriptor_that_disagrees_with_the_stored_blob_is_refused(
    layout: Path,
    images: dict[tuple[str, str], Image],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same layout is refused whether or not the store already holds the blob."""
    image = images[VICTIM]
    layer = image.layers[-1]
    doc = json.loads(image.manifest)
    doc["layers"][-1]["size"] = len(layer.data) + 1
    manifest = json.dumps(doc).encode()
    from storage import Digest

    digest = str(Digest.of(manifest))
    blob_path(layout, digest).write_bytes(manifest)
    edit_json(
        layout / "index.json",
        lambda index: [
            m.update(digest=digest, size=len(manifest))
            for m in index["manifests"]
            if m["digest"] == image.digest
        ],
    )
    for root in (tmp_path / "empty", tmp_path / "holding"):
        if root.name == "holding":
            seed_images(root, {VICTIM: image})  # the blob is in the store already
        capsys.readouterr()
        assert bastion("import", str(layout), "--root", str(root)) == 1
        err = lines(capsys)
        assert any(f"its descriptor says {len(layer.data) + 1}" in line for line in err), err
        revisions = root / "repositories" / VICTIM[0] / "_manifests" / "revisions" / "sha256"
        assert not (revisions / digest.removeprefix("sha256:")).exists()


def test_an_index_nested_without_end_is_one_line(
    layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (layout / "index.json").write_text("[" * 200_000)
    capsys.readouterr()
    assert bastion("import", str(layout), "--root", str(tmp_path / "root")) == 1
    (line,) = lines(capsys)
    assert "index.json" in line


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"id": "../../x y"}, "invalid export id"),
        ({"base": "abc", "blobs": [1]}, "blobs is not a list of dict"),
    ],
)
def test_an_export_description_it_could_not_have_written_is_refused_first(
    layout: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: dict[str, object],
    fragment: str,
) -> None:
    edit_json(layout / "bastion-export.json", lambda doc: doc.update(edit))
    capsys.readouterr()
    root = tmp_path / "root"
    assert bastion("import", str(layout), "--root", str(root)) == 1
    (line,) = lines(capsys)
    assert "bastion-export.json" in line and fragment in line
    assert not (root / "repositories").exists()


def _nest(layout: Path, image: Image, levels: int, fan: int) -> tuple[str, int]:
    """Write ``levels`` of OCI indexes over ``image``'s manifest into ``layout``, each level
    ``fan`` indexes that all list every index of the level below; (top digest, size)."""
    from storage import Digest

    below = [{"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}]
    for level in range(levels):
        current = []
        for i in range(fan):
            doc = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": below,
                "annotations": {"level": f"{level}/{i}"},
            }
            body = json.dumps(doc).encode()
            digest = str(Digest.of(body))
            blob_path(layout, digest).write_bytes(body)
            current.append({"mediaType": doc["mediaType"], "digest": digest, "size": len(body)})
        below = current
    return below[0]["digest"], below[0]["size"]


@pytest.mark.parametrize(("levels", "fan", "imported"), [(7, 3, True), (12, 1, False)])
def test_nested_indexes_are_read_once_each_and_only_so_deep(
    layout: Path,
    images: dict[tuple[str, str], Image],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    levels: int,
    fan: int,
    imported: bool,
) -> None:
    """Indexes listing the same children (3 ** 7 paths to the image, 22 manifests) import in
    no time; a chain deeper than the bound is refused, one line."""
    top, size = _nest(layout, images[GOOD], levels, fan)
    entry = {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": top,
        "size": size,
        "annotations": {
            "org.opencontainers.image.ref.name": "team/nested:v1",
            "io.bastion.repository": "team/nested",
            "io.bastion.tag": "v1",
        },
    }
    edit_json(layout / "index.json", lambda index: index["manifests"].append(entry))
    capsys.readouterr()
    root = tmp_path / "root"
    code = bastion("import", str(layout), "--root", str(root))
    tag = root / "repositories" / "team/nested" / "_manifests" / "tags" / "v1"
    if imported:
        assert code == 0, capsys.readouterr().err
        assert tag.exists()
    else:
        assert code == 1
        assert any("nested deeper than 8" in line for line in lines(capsys))
        assert not tag.exists()
