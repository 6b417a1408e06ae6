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
holds ``bastion-export.partial.json`` instead (its id, base and selection), so a rerun with the
same arguments continues it; a rerun asking for something else is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
    ManifestInvalid,
    SizeMismatch,
    StorageDriver,
    Store,
    StoreError,
    paths,
    volumes,
)
from storage import layout as oci
from storage.digest import validate_name, validate_tag
from storage.driver.filesystem import TMP_PREFIX
from storage.manifest import MANIFEST_TYPES

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
    "Fallback",
    "ImportOptions",
    "LayoutTrees",
    "ListedTag",
    "Target",
    "digest_line",
    "gather_limited",
    "listed_tags",
    "load_previous",
    "open_store",
    "os_error_line",
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
#: Errors only writing gives: said as "cannot write to".
_WRITE_ERRNOS: Final = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: (repository, tag, digest) of a tag ``bastion-export.json`` lists.
ListedTag = tuple[str, str, Digest]


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


def open_store(config: Config, *, existing: bool = False) -> Store:
    """The store at ``storage.root``, created if need be unless ``existing`` (export: a store
    to read must be there); ``ConfigError`` if it cannot be."""
    root = config.storage.root
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"storage root {root} is not a directory")
    if existing and not os.path.exists(root):
        raise ConfigError(f"storage root {root} does not exist")
    return Store(FilesystemDriver(root), config.limits.manifest_size)


def os_error_line(e: OSError) -> str:
    """``e`` as one sentence without its errno number, naming the file it concerns (the
    directory of a temporary file, whose name means nothing to a user)."""
    reason = e.strerror or str(e)
    reason = reason[:1].lower() + reason[1:]
    path = os.fsdecode(e.filename) if e.filename is not None else None
    if path is None:
        return reason
    if os.path.basename(path).startswith(TMP_PREFIX):
        path = os.path.dirname(path)
    if e.errno in _WRITE_ERRNOS:
        return f"cannot write to {path}: {reason}"
    return f"cannot access {path}: {reason}"


def digest_line(digest: Digest, why: str) -> str:
    """``why`` prefixed by ``digest`` unless it names the digest already (it reads once)."""
    return why if str(digest) in why else f"{digest}: {why}"


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
    """One index.json entry to import: where it goes and its verified tree (None if bad or
    refused)."""

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
    digest belongs to in ``owners``, and entries that cannot be imported at all (an invalid
    name or tag, a wrong descriptor) in ``refused`` (one line each). ``missing`` holds what
    neither the layout nor the fallback has (an increment imported before its base)."""

    def __init__(self, reader: oci.LayoutReader, limit: int, fallback: Fallback) -> None:
        self.reader = reader
        self.limit = limit
        self.fallback = fallback
        self.bad: dict[Digest, str] = {}
        self.owners: dict[Digest, set[str]] = {}
        self.blob_sizes: dict[Digest, int] = {}
        self.missing: set[Digest] = set()
        self.refused: list[str] = []
        #: (repository, digest) -> (its tree or None if bad, the manifest's size): a child
        #: several lists share is read once
        self._read: dict[tuple[str, Digest], tuple[oci.ManifestTree | None, int]] = {}

    async def targets(
        self, repo_option: str | None, rename: Callable[[str], str] = str
    ) -> list[Target]:
        """The index entries, each with its tree read unless the entry is refused (its tree
        stays None, so nothing of it is imported); ``rename`` maps the repository an entry
        names to the one it goes to."""
        try:
            entries = await self.reader.entries()
        except oci.LayoutError as e:
            raise FerryError(str(e)) from None
        out = []
        for position, entry in enumerate(entries):
            repo, tag = destination(entry, repo_option)
            target = Target(rename(repo), tag, entry)
            d = entry.descriptor
            try:
                check_entry(entry, repo, target)
                target.tree = await self.read_tree(
                    target.repository, d.digest, d.media_type, d.size
                )
            except StoreError as e:
                name = entry.ref_name or str(d.digest)
                self.refused.append(f"index.json manifests[{position}] ({name}): {e}; not imported")
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
        self, repo: str, digest: Digest, media_type: str | None, size: int = -1, depth: int = 0
    ) -> oci.ManifestTree | None:
        """The verified tree of ``digest`` (None if it is bad, see ``bad``); ``SizeMismatch``
        and nothing recorded if the manifest has not the ``size`` its descriptor gives (unless
        negative): the descriptor is wrong, not the manifest."""
        known = self._read.get((repo, digest))
        if known is not None:
            oci.check_described_size(size, known[1], "the manifest")
            return known[0]
        self.owners.setdefault(digest, set()).add(repo)
        if depth > oci.MAX_DEPTH:
            self.bad[digest] = f"indexes nested deeper than {oci.MAX_DEPTH}"
            return None
        try:
            body = await self.manifest_body(repo, digest)
        except StoreError as e:
            self.bad[digest] = str(e)
            return None
        if body is None:
            self.bad.setdefault(digest, "manifest missing from the layout")
            self.missing.add(digest)
            return None
        oci.check_described_size(size, len(body), "the manifest")
        tree = await self._tree(repo, digest, body, media_type, depth)
        self._read[repo, digest] = (tree, len(body))
        return tree

    async def _tree(
        self, repo: str, digest: Digest, body: bytes, media_type: str | None, depth: int
    ) -> oci.ManifestTree | None:
        try:
            node, children = oci.tree_from_body(digest, body, media_type)
        except StoreError as e:
            self.bad[digest] = str(e)
            return None
        for blob, blob_size in node.blobs.items():
            self.owners.setdefault(blob, set()).add(repo)
            self.blob_sizes[blob] = blob_size
        found = [await self.read_child(repo, *child, depth + 1) for child in children]
        if any(c is None for c in found):
            return None
        node.children = [c for c in found if c is not None]
        return node

    async def read_child(
        self, repo: str, digest: Digest, media_type: str | None, size: int, depth: int = 1
    ) -> oci.ManifestTree | None:
        """``read_tree`` of a list's child; a wrong size in the list's descriptor of it makes
        the child bad (so the list is not imported)."""
        try:
            return await self.read_tree(repo, digest, media_type, size, depth)
        except SizeMismatch as e:
            self.bad[digest] = str(e)
            return None

    def complete(self, tree: oci.ManifestTree) -> bool:
        return all(
            n.digest not in self.bad and not (n.blobs.keys() & self.bad.keys()) for n in tree.walk()
        )

    def good(self, target: Target) -> bool:
        """Whether ``target`` was read whole and nothing of its tree is bad (so far)."""
        return target.tree is not None and self.complete(target.tree)

    @property
    def failed(self) -> bool:
        return bool(self.bad or self.refused)

    def unwritten_tags(self, tags: list[ListedTag], targets: list[Target]) -> list[ListedTag]:
        """The ``listed_tags`` no index entry sets, but those on the manifest of an entry that
        failed (already named by its own line)."""
        entries = {(t.repository, t.tag) for t in targets}
        failed = {t.entry.descriptor.digest for t in targets if not self.good(t)}
        return [(r, t, d) for r, t, d in tags if (r, t) not in entries and d not in failed]

    def failure_lines(self, errors: Sequence[str] = ()) -> list[str]:
        """``errors``, the refused entries, then one line per bad digest naming the
        repositories it belongs to."""
        return [*errors, *self.refused] + [
            f"{digest_line(d, why)} (in {', '.join(sorted(self.owners.get(d, {'?'})))})"
            for d, why in sorted(self.bad.items(), key=lambda kv: str(kv[0]))
        ]


def check_entry(entry: oci.LayoutEntry, repo: str, target: Target) -> None:
    """``StoreError`` unless the index entry can be imported as ``target``: valid repository
    names (``repo`` as the entry names it, and where it goes), a valid tag, and a descriptor
    of a manifest."""
    validate_name(repo)
    validate_name(target.repository)
    if target.tag is not None:
        validate_tag(target.tag)
    if entry.descriptor.media_type not in MANIFEST_TYPES:
        raise ManifestInvalid(
            f"mediaType {entry.descriptor.media_type!r} is not a manifest or index media type"
        )


def listed_tags(
    meta: dict[str, Any] | None, rename: Callable[[str], str] = str
) -> tuple[list[ListedTag], list[str]]:
    """The tags ``bastion-export.json`` lists, their repositories mapped by ``rename``, and one
    line for each that is left out: not a valid repository name, tag or digest."""
    out: list[ListedTag] = []
    refused: list[str] = []
    repositories = (meta or {}).get("repositories") or {}
    if not isinstance(repositories, dict):
        return [], [f"{EXPORT_JSON}: 'repositories' is not a mapping; no tag restored"]
    for repo, state in repositories.items():
        tags = state.get("tags", {}) if isinstance(state, dict) else None
        if not isinstance(tags, dict):
            refused.append(f"{EXPORT_JSON}: repository {repo!r} has no tags mapping")
            continue
        for tag, text in tags.items():
            try:
                validate_name(repo)
                digest = Digest.parse(str(text))
                out.append((validate_name(rename(repo)), validate_tag(tag), digest))
            except StoreError as e:
                refused.append(f"{EXPORT_JSON}: tag {tag!r} of {repo!r}: {e}; not restored")
    return out, refused


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
