"""What ``bastion export`` (``server.export``) and ``bastion import`` (``server.import_`` into a
store, ``server.import_registry`` into another registry) share: the export description, the
options, errors and progress, and reading verified manifest trees out of a layout.

Beside the layout (``storage.layout``), ``bastion-export.json`` describes the export::

    {"format": 1, "id": ..., "base": <id of the export it builds on, or null>,
     "chain": [ids of the earlier exports, oldest first], "created": ...,
     "blobs": [{"digest", "size"}, ...],          what this export carries (manifests too)
     "repositories": {name: {"tags": {tag: digest}, "manifests": [digest, ...]}},
     "carried": [digest, ...],                    everything the chain carried, this included
     "signatures": ["sha256=<hex>/signature-1", ...],
     "mirror_config": ["<name>/<file>", ...]}     the mirror step's configuration files

so ``--since`` needs only that file to compute an increment. While an export runs the directory
holds ``bastion-export.partial.json`` instead (its id and base), so a rerun continues it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from storage import (
    Digest,
    DigestMismatch,
    FilesystemDriver,
    InvalidName,
    StorageDriver,
    Store,
    StoreError,
    paths,
    volumes,
)
from storage import layout as oci
from storage.digest import validate_name, validate_tag

from .config import Config, ConfigError
from .mirror import _size
from .progress import Progress
from .reference import ImageReference, ReferenceError

__all__ = [
    "EXPORT_JSON",
    "PARTIAL_JSON",
    "FORMAT",
    "ExportOptions",
    "FerryError",
    "FerryProgress",
    "ImportOptions",
    "LayoutTrees",
    "Target",
    "gather_limited",
    "load_previous",
    "open_store",
    "read_json",
    "unpacked_volumes",
    "write_out_dir",
]

log = logging.getLogger("bastion.ferry")

EXPORT_JSON: Final = "bastion-export.json"
PARTIAL_JSON: Final = "bastion-export.partial.json"
FORMAT: Final = 1
#: bastion-export.json of a large release chain lists tens of thousands of digests.
META_LIMIT: Final = 256 * 1024 * 1024


class FerryError(Exception):
    """An export or import failed; ``lines`` are printed one per failure."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0] if lines else "failed")
        self.lines = list(lines) or ["failed"]


class FerryProgress(Progress):
    def start_bytes(self, total: int) -> None:
        self.bytes_total = total
        if self._rich is not None:
            self._rich.update(self._byte_task, total=total)
        elif self.enabled:
            log.info("copying %s", _size(total))


@dataclass
class ExportOptions:
    to: str
    repos: list[str] = field(default_factory=list)
    release: str | None = None
    since: str | None = None
    split_size: int | None = None
    concurrency: int = 4


@dataclass
class ImportOptions:
    """``to`` (``REGISTRY[/PREFIX]``) pushes into another registry instead of the store; the
    options after it only matter then."""

    source: str
    repo: str | None = None
    concurrency: int = 4
    out_dir: str | None = None
    to: str | None = None
    authfile: str | None = None
    plain_http: bool = False
    tls_verify: bool = True
    ca_file: str | None = None
    chunk_size: int | None = None


def open_store(config: Config) -> Store:
    return Store(FilesystemDriver(config.storage.root), config.limits.manifest_size)


async def gather_limited(n: int, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs``, at most ``n`` at a time; the first exception is raised once all ended
    (none is left running behind the caller's back)."""
    slots = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with slots:
            await job()

    for result in await asyncio.gather(*(one(j) for j in jobs), return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def read_json(path: str) -> dict[str, Any]:
    """A ``bastion-export.json``; ``FerryError`` naming the file if it is not one."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(META_LIMIT))
    except FileNotFoundError:
        raise FerryError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise FerryError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not doc.get("id"):
        raise FerryError(f"{path} is not a bastion export description")
    return doc


def load_previous(since: str) -> dict[str, Any]:
    """The ``bastion-export.json`` of ``since`` (the export directory or the file itself)."""
    path = os.path.join(since, EXPORT_JSON) if os.path.isdir(since) else since
    return read_json(path)


def read_meta(directory: str) -> dict[str, Any] | None:
    """The export description in ``directory``, None for a layout written by another tool."""
    path = os.path.join(directory, EXPORT_JSON)
    return read_json(path) if os.path.exists(path) else None


def is_tag(text: str) -> bool:
    try:
        validate_tag(text)
        return True
    except StoreError:
        return False


# ---- reading an import's manifest trees ---------------------------------------------------------


@dataclass
class Target:
    """One index.json entry to import: where it goes and its verified tree (None if bad)."""

    repository: str
    tag: str | None
    entry: oci.LayoutEntry
    tree: oci.ManifestTree | None = None


#: Where a manifest the layout lacks (an increment) can be read: (repository, digest) -> its
#: bytes, or None. The bytes are verified against the digest by ``LayoutTrees``.
Fallback = Callable[[str, Digest], Awaitable[bytes | None]]


class LayoutTrees:
    """The manifest trees of a layout's index entries, every manifest verified against its
    digest; what is wrong is collected in ``bad`` (digest -> why) with the repositories each
    digest belongs to in ``owners``. ``missing`` holds what neither the layout nor the
    fallback has (an increment imported before its base)."""

    def __init__(self, reader: oci.LayoutReader, limit: int, fallback: Fallback) -> None:
        self.reader = reader
        self.limit = limit
        self.fallback = fallback
        self.bad: dict[Digest, str] = {}
        self.owners: dict[Digest, set[str]] = {}
        self.blob_sizes: dict[Digest, int] = {}
        self.missing: set[Digest] = set()

    async def targets(
        self, repo_option: str | None, rename: Callable[[str], str] = str
    ) -> list[Target]:
        """The index entries, each with its tree read; ``rename`` maps the repository an entry
        names to the one it goes to."""
        try:
            entries = await self.reader.entries()
        except oci.LayoutError as e:
            raise FerryError(str(e)) from None
        out = []
        for entry in entries:
            repo, tag = destination(entry, repo_option)
            target = Target(rename(repo), tag, entry)
            d = entry.descriptor
            target.tree = await self.read_tree(target.repository, d.digest, d.media_type)
            out.append(target)
        return out

    async def manifest_body(self, repo: str, digest: Digest) -> bytes | None:
        body = await self.reader.manifest(digest, self.limit)
        if body is None:
            body = await self.fallback(repo, digest)
            if body is not None and Digest.of(body, digest.algorithm) != digest:
                raise DigestMismatch(f"manifest {digest} found for {repo} has another digest")
        return body

    async def read_tree(
        self, repo: str, digest: Digest, media_type: str | None
    ) -> oci.ManifestTree | None:
        self.owners.setdefault(digest, set()).add(repo)
        try:
            body = await self.manifest_body(repo, digest)
        except StoreError as e:
            self.bad[digest] = str(e)
            return None
        if body is None:
            self.bad.setdefault(digest, "manifest missing from the layout")
            self.missing.add(digest)
            return None
        try:
            node, children = oci.tree_from_body(digest, body, media_type)
        except StoreError as e:
            self.bad[digest] = str(e)
            return None
        for blob, size in node.blobs.items():
            self.owners.setdefault(blob, set()).add(repo)
            self.blob_sizes[blob] = size
        found = [await self.read_tree(repo, c, t) for c, t in children]
        if any(c is None for c in found):
            return None
        node.children = [c for c in found if c is not None]
        return node

    def complete(self, tree: oci.ManifestTree) -> bool:
        return all(
            n.digest not in self.bad and not (n.blobs.keys() & self.bad.keys()) for n in tree.walk()
        )

    def failure_lines(self, errors: Sequence[str] = ()) -> list[str]:
        """One line per bad digest naming the repositories it belongs to, after ``errors``."""
        return [*errors] + [
            f"{d}: {why} (in {', '.join(sorted(self.owners.get(d, {'?'})))})"
            for d, why in sorted(self.bad.items(), key=lambda kv: str(kv[0]))
        ]


def destination(entry: oci.LayoutEntry, repo_option: str | None) -> tuple[str, str | None]:
    """(repository, tag or None) an index entry is imported as: our own annotations, else
    ``--repo`` (a tag-like ``ref.name`` becomes the tag), else a full reference in
    ``ref.name`` (skopeo's ``oci:DIR:host/repo:tag``). ``ConfigError`` if none names one."""
    repo, tag = entry.repository, entry.tag
    if repo is None and repo_option:
        repo = repo_option
        ref = entry.ref_name
        tag = ref if ref and is_tag(ref) else None
    elif repo is None and entry.ref_name:
        try:
            parsed = ImageReference.parse(entry.ref_name)
            repo = f"{parsed.host}/{parsed.repository}"
            validate_name(repo)
            tag = parsed.tag if parsed.digest is None else None
        except (ReferenceError, InvalidName):
            repo = None
    if repo is None:
        name = entry.ref_name or str(entry.descriptor.digest)
        raise ConfigError(f"index.json entry {name!r} does not name a repository: give --repo NAME")
    return repo, tag


@contextlib.asynccontextmanager
async def unpacked_volumes(
    root: StorageDriver, source: str, limit: int, progress: Progress
) -> AsyncIterator[tuple[str, str, volumes.Unpacked]]:
    """Unpack the volumes in ``source`` (checked against their checksums) into scratch under
    ``root`` (``paths.import_unpack``): yields the scratch's driver path and local directory,
    whose ``layout/`` holds the files up to ``limit`` bytes, and what was unpacked (larger
    blobs, verified, in ``staging/``, listed in ``staged``). The scratch is removed afterwards,
    whatever happens."""
    work = paths.import_unpack(uuid.uuid4().hex)
    local = root.local_path(work)
    if local is None:
        raise FerryError("importing volumes needs the filesystem store")
    names = volumes.volumes_in(source)
    progress.start_bytes(sum(os.path.getsize(os.path.join(source, n)) for n in names))
    loop = asyncio.get_running_loop()
    try:
        try:
            unpacked = await loop.run_in_executor(
                None,
                volumes.unpack,
                source,
                os.path.join(local, "layout"),
                os.path.join(local, "staging"),
                limit,
                progress.advance_bytes,
            )
        except (volumes.VolumeError, tarfile.TarError) as e:
            raise FerryError(f"{source}: {e}") from None
        yield work, local, unpacked
    finally:
        await loop.run_in_executor(None, functools.partial(shutil.rmtree, local, True))


def volumes_in(source: str) -> list[str]:
    """The volumes of ``source`` if it is a folder of volumes (not a layout), else []."""
    try:
        found = volumes.volumes_in(source)
    except volumes.VolumeError as e:
        raise FerryError(str(e)) from None
    return found if not os.path.exists(os.path.join(source, "oci-layout")) else []


async def write_out_dir(out_dir: str, files: Sequence[tuple[str, bytes]]) -> None:
    """Write ``<name>/<file>`` files (the mirror configuration) under ``out_dir``."""
    driver = FilesystemDriver(out_dir)
    for rel, data in files:
        name, file = oci.check_mirror_config_name(rel)
        await driver.put_content(f"{name}/{file}", data)
