"""An OCI image layout as numbered tar volumes no larger than a given size (FAT32 and optical
media limits), each with its checksum, and back. Knows nothing of HTTP.

::

    DIR/
      bastion-export-0001.tar           ordinary (POSIX pax) tar archives; together they hold
      bastion-export-0002.tar           every file of the layout
      ...
      SHA256SUMS                        ``sha256sum -c`` checks every volume
      bastion-export-0001.tar.sha256    the same, one file per volume

A file that does not fit in what is left of a volume is cut into parts named
``<path>.part-<n>-of-<total>`` that continue in the next volumes; ``cat`` of the parts in order
gives the file. Files are placed by a plan computed from the layout alone and kept beside the
volumes (``PLAN_FILE``) until they are all written, so a rerun writes the same volumes and skips
those already complete (present under their final name). A blob of the layout is removed as
soon as the volume holding its last byte is complete: packing needs the layout's size plus
about a volume (or the largest blob cut across volumes), not twice the layout. Everything here
is blocking file I/O: call it from a thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

from .digest import Digest
from .driver.filesystem import TMP_PREFIX, fsync_dir
from .errors import InvalidDigest, StoreError

__all__ = [
    "VOLUME_PATTERN",
    "MIN_VOLUME",
    "PLAN_FILE",
    "Piece",
    "plan",
    "prepare",
    "pack",
    "finish",
    "discard",
    "volumes_in",
    "unpack",
]

VOLUME_PATTERN: Final = re.compile(r"bastion-export-(\d{4,})\.tar")
#: Smallest volume accepted: room for tar's blocking and a useful piece of data.
MIN_VOLUME: Final = 1 << 20
_BLOCK: Final = tarfile.BLOCKSIZE
#: tar's end-of-archive marker plus the padding of the last record.
_TRAILER: Final = 2 * _BLOCK + tarfile.RECORDSIZE
_COPY: Final = 1 << 20
_PART: Final = re.compile(r"(.+)\.part-(\d+)-of-(\d+)")
#: The plan of a packing under way, beside the volumes (removed once they are all written).
PLAN_FILE: Final = ".bastion-volumes-plan.json"

Advance = Callable[[int], None]


class VolumeError(StoreError):
    pass


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of layout file ``path`` from ``offset``, stored as member ``name``."""

    path: str
    offset: int
    length: int
    name: str


def _header(name: str, size: int) -> int:
    info = tarfile.TarInfo(name)
    info.size = size
    return len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _layout_files(layout: str) -> list[tuple[str, int]]:
    """Metadata first (import reads it before the blobs), then blobs by name."""
    out = []
    for directory, dirs, files in os.walk(layout):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            out.append((os.path.relpath(full, layout).replace(os.sep, "/"), os.path.getsize(full)))
    return sorted(out, key=lambda f: (f[0].startswith("blobs/"), f[0]))


def plan(layout: str, volume_size: int) -> list[list[Piece]]:
    """Which piece of which file goes into which volume. A file that fits in a volume is
    never cut (it starts a new volume if need be); a larger one fills volumes in turn."""
    if volume_size < MIN_VOLUME:
        raise VolumeError(f"volume size must be at least {MIN_VOLUME} bytes")
    volumes: list[list[Piece]] = [[]]
    used = 0
    for path, size in _layout_files(layout):
        whole = _header(path, size) + _padded(size)
        if used + whole + _TRAILER > volume_size and whole + _TRAILER <= volume_size:
            volumes.append([])
            used = 0
        if used + whole + _TRAILER <= volume_size:
            volumes[-1].append(Piece(path, 0, size, path))
            used += whole
            continue
        pieces: list[tuple[int, int, int]] = []  # (volume, offset, length)
        offset = 0
        header = _header(f"{path}.part-0000-of-0000", size)
        while offset < size:
            room = (volume_size - used - _TRAILER - header) // _BLOCK * _BLOCK
            if room < _BLOCK:
                volumes.append([])
                used = 0
                continue
            take = min(room, size - offset)
            pieces.append((len(volumes) - 1, offset, take))
            used += header + _padded(take)
            offset += take
        for i, (v, off, length) in enumerate(pieces, 1):
            name = f"{path}.part-{i:04d}-of-{len(pieces):04d}"
            volumes[v].append(Piece(path, off, length, name))
    return [v for v in volumes if v]


class _Hashing(io.RawIOBase):
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hasher = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hasher.update(data)
        return self.f.write(data)


def volume_name(n: int) -> str:
    return f"bastion-export-{n:04d}.tar"


def prepare(layout: str, out_dir: str, volume_size: int) -> list[list[Piece]]:
    """The plan of packing ``layout`` into ``out_dir``: the one an interrupted packing left
    there (whose blobs may be gone from the layout already), else a new one, saved there."""
    path = os.path.join(out_dir, PLAN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        volumes = plan(layout, volume_size)
        doc = {
            "volume_size": volume_size,
            "volumes": [[[p.path, p.offset, p.length, p.name] for p in v] for v in volumes],
        }
        _atomic_text(path, json.dumps(doc))
        return volumes
    except (OSError, ValueError) as e:
        raise VolumeError(f"{path}: unreadable plan of an interrupted packing: {e}") from None
    try:
        size, planned = saved["volume_size"], saved["volumes"]
        volumes = [[Piece(*piece) for piece in volume] for volume in planned]
    except (KeyError, TypeError) as e:
        raise VolumeError(f"{path}: unreadable plan of an interrupted packing: {e!r}") from None
    if size != volume_size:
        raise VolumeError(
            f"{out_dir} holds a packing into volumes of {size} bytes, not {volume_size}"
        )
    return volumes


def pack(layout: str, out_dir: str, volumes: list[list[Piece]], advance: Advance) -> list[str]:
    """Write ``layout`` into ``out_dir`` as the ``volumes`` of its plan (``prepare``), skipping
    those already complete, and their checksums, removing each blob of the layout once its
    last byte is in a complete volume; returns the volume names. The plan stays until
    ``finish``: until the export is described beside the volumes, a rerun packs the same."""
    last = {p.path: n for n, pieces in enumerate(volumes) for p in pieces}
    names = []
    sums = []
    for n, pieces in enumerate(volumes):
        name = volume_name(n + 1)
        final = os.path.join(out_dir, name)
        if not (os.path.exists(final) and os.path.exists(final + ".sha256")):
            _write_volume(layout, final, pieces, advance)
        else:
            advance(sum(p.length for p in pieces))
        for path in dict.fromkeys(p.path for p in pieces):
            if last[path] == n and path.startswith("blobs/"):  # metadata stays to the end
                # missing: removed by the run this one continues
                Path(layout, path).unlink(missing_ok=True)
        with open(final + ".sha256", encoding="utf-8") as f:
            sums.append(f.read())
        names.append(name)
    _atomic_text(os.path.join(out_dir, "SHA256SUMS"), "".join(sums))
    return names


def finish(out_dir: str) -> None:
    """Remove the plan of a packing whose export is complete."""
    Path(out_dir, PLAN_FILE).unlink(missing_ok=True)
    fsync_dir(out_dir)


def discard(out_dir: str) -> None:
    """Remove the volumes, checksums and plan of an earlier packing into ``out_dir``."""
    for name in os.listdir(out_dir):
        if VOLUME_PATTERN.fullmatch(name.removesuffix(".sha256")) or name in (
            "SHA256SUMS",
            PLAN_FILE,
        ):
            Path(out_dir, name).unlink(missing_ok=True)


def _write_volume(layout: str, final: str, pieces: list[Piece], advance: Advance) -> None:
    tmp = os.path.join(os.path.dirname(final), f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as raw:
            hashing = _Hashing(raw)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for piece in pieces:
                    info = tarfile.TarInfo(piece.name)
                    info.size = piece.length
                    info.mode = 0o644
                    with open(os.path.join(layout, piece.path), "rb") as src:
                        src.seek(piece.offset)
                        tar.addfile(info, _Limited(src, piece.length, advance))
            raw.flush()
            os.fsync(raw.fileno())
        digest = hashing.hasher.hexdigest()
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _atomic_text(final + ".sha256", f"{digest}  {os.path.basename(final)}\n")


class _Limited(io.RawIOBase):
    def __init__(self, f: BinaryIO, length: int, advance: Advance) -> None:
        self.f = f
        self.left = length
        self.advance = advance

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        self.advance(len(data))
        return data


def _atomic_text(path: str, text: str) -> None:
    """Write ``path`` whole or not at all, durably: the directory is synced after the rename
    (and with it any rename before it there, such as a volume's before its checksum: only
    then may the blobs it holds leave the layout)."""
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def volumes_in(directory: str) -> list[str]:
    """The volume files of ``directory`` in order (empty if it holds none)."""
    found = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(directory)
        if (m := VOLUME_PATTERN.fullmatch(name))
    )
    names = [name for _, name in found]
    if names and [n for n, _ in found] != list(range(1, len(found) + 1)):
        raise VolumeError(f"{directory}: volumes are not numbered 1 to {len(found)} without gaps")
    return names


@dataclass
class Unpacked:
    staged: dict[Digest, str] = field(default_factory=dict)  # large blobs, verified
    bad: dict[Digest, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def unpack(
    directory: str, small_dir: str, staging_dir: str, small_limit: int, advance: Advance
) -> Unpacked:
    """Read the volumes of ``directory`` in order, checking each against ``SHA256SUMS``.
    Files up to ``small_limit`` bytes (metadata, manifests, small blobs) are written under
    ``small_dir`` as a layout; larger blobs are hashed while written to ``staging_dir`` and kept
    (in ``staged``) only if they match their digest. A damaged volume (cut short, say) is
    named in ``errors``; the files it was in the middle of and what it holds after the damage
    are left out, and the volumes after it are read as usual."""
    sums = _read_sums(os.path.join(directory, "SHA256SUMS"))
    unpacker = _Unpacker(small_dir, staging_dir, small_limit, advance)
    for name in volumes_in(directory):
        unpacker.volume(os.path.join(directory, name), sums.get(name))
    return unpacker.finish()


def _read_sums(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 20).splitlines()
    except FileNotFoundError:
        raise VolumeError(f"{path} not found: the volumes cannot be checked") from None
    out = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        out[name.strip()] = digest.strip()
    return out


class _HashingReader(io.RawIOBase):
    def __init__(self, f: BinaryIO, hasher: Any) -> None:
        self.f = f
        self.hasher = hasher

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hasher.update(data)
        return data


def _blob_digest(path: str) -> Digest | None:
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        try:
            return Digest.parse(f"{parts[1]}:{parts[2]}")
        except InvalidDigest:
            return None
    return None


@dataclass
class _Partial:
    """A layout file being written: the open file, its hasher (large blobs only) and how many
    of its parts were written."""

    file: BinaryIO
    hasher: Any | None
    parts: int = 0


class _Unpacker:
    """``unpack``, one volume after the other."""

    def __init__(self, small_dir: str, staging_dir: str, small_limit: int, advance: Advance):
        self.small_dir = small_dir
        self.staging_dir = staging_dir
        self.small_limit = small_limit
        self.advance = advance
        self.out = Unpacked()
        self.open: dict[str, _Partial] = {}  # layout path -> file still expecting parts
        self.lost: set[str] = set()  # files a damaged volume cut: their later parts are skipped
        self.name = ""  # the volume being read

    def volume(self, path: str, checksum: str | None) -> None:
        """Read one volume; ``checksum``: its sha256 in ``SHA256SUMS`` (None if not listed)."""
        self.name = os.path.basename(path)
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as raw:
                reader = _HashingReader(raw, hasher)
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        if member.isfile():
                            self.member(tar, member)
                while reader.read(_COPY):
                    pass
        except tarfile.TarError as e:
            self.lost.update(self.drop_open())
            self.out.errors.append(
                f"volume {self.name} is damaged ({e}): the files in it from there on are missing"
            )
            return
        if checksum is None:
            self.out.errors.append(f"volume {self.name} is not listed in SHA256SUMS")
        elif checksum != hasher.hexdigest():
            self.out.errors.append(f"volume {self.name} does not match its checksum in SHA256SUMS")

    def finish(self) -> Unpacked:
        for path in self.drop_open():
            self.out.errors.append(f"{path}: the volumes end before its last part")
        return self.out

    def drop_open(self) -> list[str]:
        """Remove the files still expecting parts; returns their layout paths."""
        paths = list(self.open)
        for partial in self.open.values():
            partial.file.close()
            os.unlink(partial.file.name)
        self.open.clear()
        return paths

    def safe(self, path: str) -> str:
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise VolumeError(f"unsafe member name {path!r} in volume {self.name}")
        return path

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        m = _PART.fullmatch(member.name)
        path = self.safe(m.group(1) if m else member.name)
        n, total = (int(m.group(2)), int(m.group(3))) if m else (1, 1)
        partial = self.open.get(path)
        if partial is None:
            if n != 1:
                if path not in self.lost:
                    self.out.errors.append(f"{member.name}: its earlier parts are missing")
                return
            partial = self.open[path] = self.start(path, member.size, total)
        if partial.parts + 1 != n:
            self.out.errors.append(f"{member.name}: parts out of order")
        src = tar.extractfile(member)
        assert src is not None
        while chunk := src.read(_COPY):
            partial.file.write(chunk)
            if partial.hasher is not None:
                partial.hasher.update(chunk)
            self.advance(len(chunk))
        partial.parts = n
        if n == total:
            del self.open[path]
            self.complete(path, partial)

    def start(self, path: str, size: int, total: int) -> _Partial:
        """Open where layout file ``path`` goes: a large blob (or one cut in parts) into
        staging under a unique name, anything else into the layout."""
        digest = _blob_digest(path)
        if digest is not None and (size > self.small_limit or total > 1):
            target = os.path.join(self.staging_dir, f"{digest.hex}-{uuid.uuid4().hex}")
            hasher = digest.hasher()
        else:
            target = os.path.join(self.small_dir, *path.split("/"))
            hasher = None
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return _Partial(open(target, "wb"), hasher)

    def complete(self, path: str, partial: _Partial) -> None:
        """Close a file whose last part was written; a large blob is kept only if it matches
        its digest."""
        f = partial.file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        digest = _blob_digest(path)
        if partial.hasher is None or digest is None:
            return
        if partial.hasher.hexdigest() != digest.hex:
            self.out.bad[digest] = "content in the volumes does not hash to its digest"
            os.unlink(f.name)
        else:
            self.out.staged[digest] = str(f.name)
