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
gives the file. Files are placed by a plan computed from the layout alone, so a rerun writes the
same volumes and skips those already complete (present under their final name). Everything
here is blocking file I/O: call it from a thread.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from .digest import Digest
from .errors import InvalidDigest, StoreError

__all__ = ["VOLUME_PATTERN", "MIN_VOLUME", "Piece", "plan", "pack", "volumes_in", "unpack"]

VOLUME_PATTERN: Final = re.compile(r"bastion-export-(\d{4,})\.tar")
#: Smallest volume accepted: room for tar's blocking and a useful piece of data.
MIN_VOLUME: Final = 1 << 20
_BLOCK: Final = tarfile.BLOCKSIZE
#: tar's end-of-archive marker plus the padding of the last record.
_TRAILER: Final = 2 * _BLOCK + tarfile.RECORDSIZE
_COPY: Final = 1 << 20
_PART: Final = re.compile(r"(.+)\.part-(\d+)-of-(\d+)")

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


def pack(layout: str, out_dir: str, volume_size: int, advance: Advance) -> list[str]:
    """Write ``layout`` into ``out_dir`` as volumes (skipping those already complete) and their
    checksums; returns the volume names."""
    names = []
    sums = []
    for n, pieces in enumerate(plan(layout, volume_size), 1):
        name = volume_name(n)
        final = os.path.join(out_dir, name)
        if not (os.path.exists(final) and os.path.exists(final + ".sha256")):
            _write_volume(layout, final, pieces, advance)
        else:
            advance(sum(p.length for p in pieces))
        with open(final + ".sha256", encoding="utf-8") as f:
            sums.append(f.read())
        names.append(name)
    _atomic_text(os.path.join(out_dir, "SHA256SUMS"), "".join(sums))
    return names


def _write_volume(layout: str, final: str, pieces: list[Piece], advance: Advance) -> None:
    tmp = os.path.join(os.path.dirname(final), f".tmp-{uuid.uuid4().hex}")
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
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    (in ``staged``) only if they match their digest."""
    sums = _read_sums(os.path.join(directory, "SHA256SUMS"))
    out = Unpacked()
    state: dict[str, tuple[BinaryIO, object, int]] = {}  # path -> (file, hasher, parts seen)
    for name in volumes_in(directory):
        hasher = hashlib.sha256()
        with open(os.path.join(directory, name), "rb") as raw:
            reader = _HashingReader(raw, hasher)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        _member(
                            tar, member, small_dir, staging_dir, small_limit, state, out, advance
                        )
            while reader.read(_COPY):
                pass
        if sums.get(name) not in (None, hasher.hexdigest()):
            out.errors.append(f"volume {name} does not match its checksum in SHA256SUMS")
        elif name not in sums:
            out.errors.append(f"volume {name} is not listed in SHA256SUMS")
    for path, (f, _, _) in state.items():
        f.close()
        out.errors.append(f"{path}: the volumes end before its last part")
    return out


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
    def __init__(self, f: BinaryIO, hasher: object) -> None:
        self.f = f
        self.hasher = hasher

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hasher.update(data)  # type: ignore[attr-defined]
        return data


def _safe(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise VolumeError(f"unsafe member name {path!r} in a volume")
    return path


def _blob_digest(path: str) -> Digest | None:
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        try:
            return Digest.parse(f"{parts[1]}:{parts[2]}")
        except InvalidDigest:
            return None
    return None


def _member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    small_dir: str,
    staging_dir: str,
    small_limit: int,
    state: dict[str, tuple[BinaryIO, object, int]],
    out: Unpacked,
    advance: Advance,
) -> None:
    m = _PART.fullmatch(member.name)
    path = _safe(m.group(1) if m else member.name)
    n, total = (int(m.group(2)), int(m.group(3))) if m else (1, 1)
    digest = _blob_digest(path)
    src = tar.extractfile(member)
    assert src is not None
    if path not in state:
        if n != 1:
            out.errors.append(f"{member.name}: its earlier parts are missing")
            return
        big = digest is not None and (member.size > small_limit or total > 1)
        target = os.path.join(staging_dir if big else small_dir, *path.split("/"))
        if big:
            assert digest is not None
            target = os.path.join(staging_dir, f"{digest.hex}-{uuid.uuid4().hex}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        state[path] = (open(target, "wb"), hashlib.sha256() if big else None, 0)
    f, hasher, seen = state[path]
    if seen + 1 != n:
        out.errors.append(f"{member.name}: parts out of order")
    while chunk := src.read(_COPY):
        f.write(chunk)
        if hasher is not None:
            hasher.update(chunk)  # type: ignore[attr-defined]
        advance(len(chunk))
    state[path] = (f, hasher, n)
    if n < total:
        return
    del state[path]
    f.flush()
    os.fsync(f.fileno())
    f.close()
    if hasher is not None and digest is not None:
        if hasher.hexdigest() != digest.hex:  # type: ignore[attr-defined]
            out.bad[digest] = f"content of {digest} in the volumes does not hash to its digest"
            os.unlink(f.name)
        else:
            out.staged[digest] = str(f.name)
