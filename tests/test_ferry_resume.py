"""Resuming an interrupted ``bastion export``: the in-progress marker records the selection and
a rerun asking for another one is refused (exit 2) without touching the directory; a rerun
with the same arguments removes what the interrupted run left under temporary names and what
it no longer carries, so the directory ends up exactly what its description lists."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from server import export
from storage import volumes
from tests.images import Image, sample_image
from tests.test_ferry import bastion, seed_images

APP, HUGE = "team/app", "team/huge"


@pytest.fixture(scope="module")
def images() -> dict[tuple[str, str], Image]:
    return {
        (APP, "v1"): sample_image("resume-app", payload_size=1024),
        (HUGE, "v1"): sample_image("resume-huge", payload_size=3 << 20),
    }


@pytest.fixture
def src(images: dict[tuple[str, str], Image], tmp_path: Path) -> Path:
    """A store holding ``images``."""
    seed_images(tmp_path / "src", images)
    return tmp_path / "src"


def interrupted(monkeypatch: pytest.MonkeyPatch, where: str, *args: str) -> None:
    """Run ``bastion export ARGS`` and cut it short (as ^C would) when it calls ``where``
    (a function of ``server.export``), leaving a partial blob beside the complete ones."""

    def cut(*_: Any, **__: Any) -> Any:
        to = Path(args[args.index("--to") + 1])
        blobs = next(to.rglob("blobs")) / "sha256"
        (blobs / ".tmp-session-cut").write_bytes(b"x" * 4096)
        (to / ".tmp-0123").write_bytes(b"half a volume")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export, where, cut)
        assert bastion("export", *args) == 130


def files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def blob_files(directory: Path) -> set[str]:
    return {"sha256:" + p.name for p in (directory / "blobs/sha256").iterdir()}


def test_another_selection_is_refused_and_the_same_one_continues(
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "hx"
    interrupted(monkeypatch, "_mirror_config", "--root", str(src), "--to", str(out), "--repo", HUGE)
    marker = json.loads((out / "bastion-export.partial.json").read_text())
    assert marker["selection"]["repos"] == [HUGE]
    before = files(out)
    capsys.readouterr()

    assert bastion("export", "--root", str(src), "--to", str(out), "--repo", APP) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"holds an interrupted export of --repo {HUGE}, not of --repo {APP}" in line
    assert "same arguments" in line and "new directory" in line
    assert files(out) == before  # refused: nothing touched
    assert bastion("export", "--root", str(src), "--to", str(out)) == 2  # everything is another too

    assert bastion("export", "--root", str(src), "--to", str(out), "--repo", HUGE) == 0
    assert "blobs: 0 written" in capsys.readouterr().out  # what was there was kept
    meta = json.loads((out / "bastion-export.json").read_text())
    assert meta["id"] == marker["id"]
    assert not list(out.rglob(".tmp-*"))
    assert blob_files(out) == set(meta["carried"])
    assert set(meta["repositories"]) == {HUGE}


def test_a_resumed_export_drops_what_it_no_longer_carries(
    images: dict[tuple[str, str], Image],
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    interrupted(monkeypatch, "_mirror_config", "--root", str(src), "--to", str(out))
    huge = images[HUGE, "v1"]
    assert {huge.digest, *(b.digest for b in huge.blobs)} <= blob_files(out)
    shutil.rmtree(src / "repositories" / HUGE)  # gone from the store meanwhile
    assert bastion("export", "--root", str(src), "--to", str(out)) == 0
    meta = json.loads((out / "bastion-export.json").read_text())
    assert set(meta["repositories"]) == {APP}
    assert blob_files(out) == set(meta["carried"])  # the huge image's blobs are gone
    assert not list(out.rglob(".tmp-*"))


def packing_interrupted(
    monkeypatch: pytest.MonkeyPatch, src: Path, tmp_path: Path
) -> tuple[Path, list[str]]:
    """``bastion export --root SRC --to OUT --split-size 1MiB`` cut short while writing its
    second volume; (OUT, the arguments but ``--split-size``)."""
    out = tmp_path / "vols"
    args = ["--root", str(src), "--to", str(out)]
    write = volumes._write_volume

    def cut(layout: str, final: str, pieces: list[volumes.Piece], advance: Any) -> None:
        if not final.endswith("-0002.tar"):
            return write(layout, final, pieces, advance)
        with open(os.path.join(out, ".tmp-0123"), "wb") as f:
            f.write(b"half a volume")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(volumes, "_write_volume", cut)
        assert bastion("export", *args, "--split-size", "1MiB") == 130
    return out, args


def test_a_split_export_whose_staged_layout_is_gone_plans_its_volumes_anew(
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, args = packing_interrupted(monkeypatch, src, tmp_path)
    shutil.rmtree(out / "layout")  # removed by hand; the store changed meanwhile
    shutil.rmtree(src / "repositories" / HUGE)
    assert bastion("export", *args, "--split-size", "1MiB") == 0, capsys.readouterr().err
    meta = json.loads((out / "bastion-export.json").read_text())
    assert set(meta["repositories"]) == {APP}
    assert not (out / volumes.PLAN_FILE).exists()
    assert bastion("import", str(out), "--root", str(tmp_path / "dst")) == 0


def test_split_export_resumes_only_with_the_same_volume_size(
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, args = packing_interrupted(monkeypatch, src, tmp_path)
    # the blobs packed whole into the first volume have left the layout; the plan stays
    saved = volumes.prepare(str(out / "layout"), str(out), 1 << 20)
    first = {p.path for p in saved[0]}
    last = {p.path: n for n, v in enumerate(saved) for p in v}
    gone = {path for path in first if path.startswith("blobs/") and last[path] == 0}
    assert gone and not any((out / "layout" / path).exists() for path in gone)
    capsys.readouterr()
    assert bastion("export", *args, "--split-size", "2MiB") == 2
    line = capsys.readouterr().err
    assert "--split-size 1.0 MiB, not of --split-size 2.0 MiB" in line
    assert bastion("export", *args, "--split-size", "1MiB") == 0, capsys.readouterr().err
    assert "layout complete" in capsys.readouterr().out
    assert not list(out.rglob(".tmp-*")) and not (out / "layout").exists()
    assert not (out / "bastion-export.partial.json").exists()
    assert not (out / volumes.PLAN_FILE).exists()
    assert bastion("import", str(out), "--root", str(tmp_path / "dst")) == 0


def test_an_export_held_by_another_run_is_not_touched(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert bastion("export", "--root", str(src), "--to", str(out)) == 1
    finally:
        os.close(fd)
    assert f"another export is writing to {out}" in capsys.readouterr().err
    assert not list(out.iterdir())


@pytest.mark.parametrize(("where", "first"), [("pack", True), ("finish", False), ("finish", True)])
def test_a_split_export_cut_after_packing_finishes_with_the_volumes_it_packed(
    src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
    first: bool,
) -> None:
    """Cut once every volume is written (before the export is described beside them), once
    the staged layout is removed (the plan not yet), or before the in-progress marker goes:
    the rerun ends with the same volumes, all in SHA256SUMS, and the import takes them. (The
    plan used to go first, and a rerun then planned again from a layout whose blobs had left
    it: one volume in SHA256SUMS.)"""
    out = tmp_path / "vols"
    args = ["--root", str(src), "--to", str(out), "--split-size", "1MiB"]
    real = getattr(volumes, where)

    def cut(*a: Any, **k: Any) -> Any:
        if first:
            real(*a, **k)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(volumes, where, cut)
        assert bastion("export", *args) == 130
    packed = {p.name: p.read_bytes() for p in out.glob("bastion-export-*.tar")}
    assert len(packed) >= 3
    assert bastion("export", *args) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("bastion-export-*.tar")} == packed
    listed = (out / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in listed) == sorted(packed)
    assert not (out / volumes.PLAN_FILE).exists() and not (out / "layout").exists()
    assert bastion("import", str(out), "--root", str(tmp_path / "dst")) == 0
