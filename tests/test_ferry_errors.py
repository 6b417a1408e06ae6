"""What ``bastion export`` and ``bastion import`` say when the file system or the volumes are
not what they should be: one readable line (no errno numbers, no temporary file names, the
volume file named), exit 2 for a usage problem and 1 for a failed operation; and the counts an
import of volumes reports."""

from __future__ import annotations

import errno
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from storage import Digest, FilesystemDriver, paths
from storage import layout as oci
from tests.images import Image, sample_image
from tests.test_ferry import bastion, seed_images


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, str], Image]:
    return {
        ("team/big", "v1"): sample_image("errors-big", payload_size=3 << 20),
        ("team/small", "v1"): sample_image("errors-small", payload_size=1024),
    }


@pytest.fixture
def src(images: dict[tuple[str, str], Image], tmp_path: Path) -> Path:
    seed_images(tmp_path / "src", images)
    return tmp_path / "src"


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bastion: ") and "Errno" not in line and ".tmp-" not in line, line
    return line.removeprefix("bastion: ")


def raising(error: OSError) -> Any:
    def fail(*_: Any, **__: Any) -> Any:
        raise error

    return fail


def test_export_to_a_file(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert bastion("export", "--root", str(src), "--to", str(afile)) == 2
    assert one_line(capsys) == f"--to {afile} is a file, not a directory"


def test_export_to_a_read_only_directory(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ro = tmp_path / "ro"
    error = OSError(errno.EROFS, "Read-only file system", f"{ro}/.tmp-0123456789abcdef")
    monkeypatch.setattr(FilesystemDriver, "put_content", raising(error))
    assert bastion("export", "--root", str(src), "--to", str(ro)) == 2
    assert one_line(capsys) == f"cannot write to {ro}: read-only file system"


def test_a_disk_filling_up_midway_is_one_sentence(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    partial = f"{out}/blobs/sha256/.tmp-session-0123"
    monkeypatch.setattr(
        oci.LayoutWriter, "copy_blob", raising(OSError(errno.ENOSPC, "No space left", partial))
    )
    assert bastion("export", "--root", str(src), "--to", str(out)) == 1
    assert one_line(capsys) == f"cannot write to {out}/blobs/sha256: no space left"

    monkeypatch.undo()
    out = tmp_path / "good"
    assert bastion("export", "--root", str(src), "--to", str(out)) == 0
    layer = f"{out}/blobs/sha256/abc"
    monkeypatch.setattr(
        oci, "import_blob", raising(OSError(errno.EIO, "Input/output error", layer))
    )
    capsys.readouterr()
    assert bastion("import", str(out), "--root", str(tmp_path / "dst")) == 1
    assert one_line(capsys) == f"cannot access {layer}: input/output error"


def test_a_write_that_fails_names_where(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """writev(2) names no file in its error: the writer adds the one it was writing."""
    out = tmp_path / "out"
    monkeypatch.setattr(os, "writev", raising(OSError(errno.ENOSPC, "No space left on device")))
    assert bastion("export", "--root", str(src), "--to", str(out)) == 1
    assert one_line(capsys) == f"cannot write to {out}/blobs/sha256: no space left on device"


def test_import_into_a_root_that_is_a_file(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert bastion("export", "--root", str(src), "--to", str(out)) == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    capsys.readouterr()
    assert bastion("import", str(out), "--root", str(afile)) == 2
    assert one_line(capsys) == f"storage root {afile} is not a directory"


def test_export_from_a_store_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "nonexistent-root"
    assert bastion("export", "--root", str(root), "--to", str(tmp_path / "out")) == 2
    assert one_line(capsys) == f"storage root {root} does not exist"
    assert not root.exists() and not (tmp_path / "out").exists()


def members(volume: Path) -> list[str]:
    with tarfile.open(volume) as tar:
        return tar.getnames()


def test_a_truncated_volume_is_named_and_the_rest_imported(
    images: dict[tuple[str, str], Image],
    src: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "v1"
    assert bastion("export", "--root", str(src), "--to", str(out), "--split-size", "1MiB") == 0
    volumes = sorted(out.glob("bastion-export-*.tar"))
    assert len(volumes) >= 3
    held = {v.name: {re.sub(r"\.part-.*", "", n) for n in members(v)} for v in volumes}
    cut = volumes[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    capsys.readouterr()
    dst = tmp_path / "dst"
    assert bastion("import", str(out), "--root", str(dst)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    damaged = [line for line in lines if cut.name in line]
    assert damaged == [f"bastion: volume {cut.name} is damaged (unexpected end of data): "
                       "the files in it from there on are missing"]  # fmt: skip
    assert "images not imported; the rest is in the store" in lines[-1]
    # of an image whose manifest came through, every blob no part of which was in the
    # damaged volume is in the store
    intact = set().union(*(names for v, names in held.items() if v != cut.name)) - held[cut.name]
    readable = [i for i in images.values() if f"blobs/sha256/{i.digest[7:]}" in intact]
    kept = [b.digest for i in readable for b in i.blobs if f"blobs/sha256/{b.digest[7:]}" in intact]
    assert kept, held
    for digest in kept:
        assert (dst / paths.blob(Digest.parse(digest))).exists(), digest
    assert not list((dst / "imports").glob("unpack-*"))


def test_an_import_of_volumes_counts_what_it_stored(
    images: dict[tuple[str, str], Image],
    src: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "vols"
    assert bastion("export", "--root", str(src), "--to", str(out), "--split-size", "1MiB") == 0
    blobs = {b.digest: b.size for image in images.values() for b in image.blobs}
    total = sum(blobs.values())
    capsys.readouterr()
    dst = tmp_path / "dst"
    assert bastion("import", str(out), "--root", str(dst)) == 0
    line = capsys.readouterr().out
    assert f"blobs: {len(blobs)} verified and stored (" in line and ", 0 already present" in line
    stored = re.search(r"verified and stored \(([\d.]+) MiB\)", line)
    assert stored and abs(float(stored.group(1)) - total / (1 << 20)) < 0.1, line
    assert bastion("import", str(out), "--root", str(dst)) == 0
    assert f"blobs: 0 verified and stored (0 B), {len(blobs)} already present" in (
        capsys.readouterr().out
    )
