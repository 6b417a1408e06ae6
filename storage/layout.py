"""OCI image layouts (image-spec ``image-layout.md``) to and from the store: what
``bastion export`` writes and ``bastion import`` reads. Knows nothing of HTTP.

A layout written here::

    DIR/
      oci-layout                          {"imageLayoutVersion": "1.0.0"}
      index.json                          one descriptor per exported manifest (a tag, or a
                                          manifest only reachable by digest), annotated with
                                          its full reference and source repository
      blobs/<alg>/<hex>                   layers, configs and manifests (list children too),
                                          one copy for every repository
      signatures/<alg>=<hex>/signature-N  release signatures kept in the store
      mirror-config/<name>/<file>         the mirror configuration ``bastion mirror`` wrote
                                          (registries.conf, IDMS, ...), as kept in the store

Every file is written to a hidden temporary name, fsynced and renamed (the filesystem driver's
write session), and a blob only after its bytes hashed to its digest: a blob present under its
final name is complete and verified, which is what lets an interrupted export resume.

Imported content passes through the store's staging area (``storage.paths.import_staging``) and
reaches the blob pool only once verified; a completed import leaves a marker
(``storage.paths.import_done``) so an increment can check that its base is there.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from . import paths
from .digest import ALGORITHMS, Descriptor, Digest
from .driver import DriverError, FilesystemDriver, PathNotFound, StorageDriver
from .errors import (
    BlobUnknown,
    DigestMismatch,
    InvalidDigest,
    ManifestInvalid,
    ManifestUnknown,
    SizeMismatch,
    StoreError,
)
from .manifest import OCI_INDEX, parse_manifest
from .store import Store

__all__ = [
    "LAYOUT_VERSION",
    "REF_NAME",
    "REPOSITORY_ANNOTATION",
    "TAG_ANNOTATION",
    "LayoutError",
    "LayoutEntry",
    "ManifestTree",
    "Incomplete",
    "LayoutWriter",
    "LayoutReader",
    "import_blob",
    "commit_staged",
    "read_store_tree",
    "repository_roots",
    "import_done",
    "mark_import_done",
    "signature_files",
    "mirror_config_files",
    "put_mirror_config",
    "keep_mirror_config",
    "MIRROR_CONFIG",
    "check_mirror_config_name",
]

LAYOUT_VERSION: Final = "1.0.0"
#: image-spec annotations.md: the reference this manifest is known by.
REF_NAME: Final = "org.opencontainers.image.ref.name"
#: Our own annotations, so an import restores repository names and tags exactly.
REPOSITORY_ANNOTATION: Final = "io.bastion.repository"
TAG_ANNOTATION: Final = "io.bastion.tag"
#: index.json of a release with thousands of entries is a few MiB.
INDEX_LIMIT: Final = 64 * 1024 * 1024
#: Read (and write) blobs in pieces of this size.
CHUNK: Final = 1 << 20
_SIGNATURES: Final = "signatures"
_SIGNATURE_LIMIT: Final = 64 * 1024
#: Layout directory of the mirror configuration (the same name as in the store).
MIRROR_CONFIG: Final = paths.MIRROR_CONFIG
#: Each mirror configuration file (YAML snippets, a JSON map) is a few KiB to a few MiB.
_MIRROR_CONFIG_LIMIT: Final = 16 * 1024 * 1024

Advance = Callable[[int], None]


class LayoutError(StoreError):
    """The directory is not a readable OCI image layout (one line naming why)."""


class Incomplete(StoreError):
    """A manifest tree in the store lacks content (``missing`` digests)."""

    def __init__(self, message: str, missing: list[Digest]) -> None:
        super().__init__(message)
        self.missing = missing


def layout_blob(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _staging(digest: Digest) -> str:
    return paths.import_staging(digest, uuid.uuid4().hex)


# ---- manifests in the store -------------------------------------------------------------------


#: Indexes nested deeper than this are refused (images nest one or two; the bound keeps a
#: crafted chain from exhausting the stack).
MAX_DEPTH: Final = 8


@dataclass
class ManifestTree:
    """A manifest, its exact bytes, the blobs it references (digest -> size its descriptor
    declares) and its child manifests (lists and indexes)."""

    digest: Digest
    media_type: str
    body: bytes = field(repr=False)
    blobs: dict[Digest, int] = field(default_factory=dict)
    children: list[ManifestTree] = field(default_factory=list)

    def walk(self, seen: set[Digest] | None = None) -> Iterator[ManifestTree]:
        """Every manifest of the tree once (a child several lists share too), children before
        their parent."""
        seen = set() if seen is None else seen
        if self.digest in seen:
            return
        seen.add(self.digest)
        for child in self.children:
            yield from child.walk(seen)
        yield self

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.body))


def descriptor_sizes(body: bytes) -> dict[str, tuple[int, str | None]]:
    """digest -> (size, mediaType) of every descriptor in a manifest or index."""
    doc = json.loads(body)
    out: dict[str, tuple[int, str | None]] = {}
    for d in [doc.get("config"), *doc.get("layers", []), *doc.get("manifests", [])]:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            size = d.get("size")
            media_type = d.get("mediaType")
            out[d["digest"]] = (
                size if isinstance(size, int) else -1,
                media_type if isinstance(media_type, str) else None,
            )
    return out


def tree_from_body(
    digest: Digest, body: bytes, media_type: str | None
) -> tuple[ManifestTree, list[tuple[Digest, str | None, int]]]:
    """A tree node for ``body`` (children not yet filled) and its children's digests with the
    media types and sizes their descriptors give (-1: none). ``ManifestInvalid`` if the body
    cannot be parsed."""
    parsed = parse_manifest(body, media_type)
    sizes = descriptor_sizes(body)
    node = ManifestTree(digest, parsed.media_type, body)
    node.blobs = {d: sizes.get(str(d), (-1, None))[0] for d in dict.fromkeys(parsed.blobs)}
    children = []
    for d in dict.fromkeys(parsed.children):
        size, child_type = sizes.get(str(d), (-1, None))
        children.append((d, child_type, size))
    return node, children


def check_described_size(size: int, actual: int, what: str) -> None:
    """``SizeMismatch`` (naming ``what``) unless ``actual`` is the ``size`` a descriptor gives
    (any if negative): content of another size is not the content the descriptor describes."""
    if size >= 0 and actual != size:
        raise SizeMismatch(f"{what} has {actual} bytes, its descriptor says {size}")


async def read_store_tree(store: Store, repository: str, digest: Digest) -> ManifestTree:
    """The tree of manifest ``digest`` in ``repository``; ``Incomplete`` naming every child
    manifest or blob missing from the store. A child several lists share is read once."""
    missing: list[Digest] = []
    read: dict[Digest, asyncio.Future[ManifestTree | None]] = {}

    async def visit(d: Digest, depth: int = 0) -> ManifestTree | None:
        if depth > MAX_DEPTH:
            raise ManifestInvalid(f"{repository}@{digest} nests indexes deeper than {MAX_DEPTH}")
        if d not in read:
            read[d] = asyncio.ensure_future(_visit(d, depth))
        return await read[d]

    async def _visit(d: Digest, depth: int) -> ManifestTree | None:
        try:
            info, body = await store.get_manifest(repository, str(d))
        except ManifestUnknown:
            missing.append(d)
            return None
        if Digest.of(body, d.algorithm) != d:
            raise DigestMismatch(f"manifest {d} in the store does not hash to its digest")
        node, children = tree_from_body(d, body, info.media_type)
        for blob in node.blobs:
            size = await store.blob_size(blob)
            if size is None:
                missing.append(blob)
            else:
                node.blobs[blob] = size
        found = await asyncio.gather(*(visit(c, depth + 1) for c, _, _ in children))
        node.children = [c for c in found if c is not None]
        return node

    root = await visit(digest)
    if missing or root is None:
        names = ", ".join(str(d) for d in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise Incomplete(f"{repository}@{digest} lacks {names}{more}", missing)
    return root


async def repository_roots(store: Store, repository: str) -> tuple[dict[str, Digest], list[Digest]]:
    """The tags of ``repository`` (tag -> digest) and the manifests reachable only by digest:
    neither tagged nor a child of another manifest in the repository."""
    tags: dict[str, Digest] = {}
    for tag in await store.list_tags(repository):
        try:
            tags[tag] = (await store.stat_manifest(repository, tag)).digest
        except ManifestUnknown:
            continue
    revisions: list[Digest] = []
    for algorithm in ("sha256", "sha512"):
        try:
            names = await store.driver.list(f"{paths.revisions_dir(repository)}/{algorithm}")
        except PathNotFound:
            continue
        for name in names:
            try:
                revisions.append(Digest.parse(f"{algorithm}:{name}"))
            except InvalidDigest:
                continue
    children: set[Digest] = set()
    for digest in revisions:
        try:
            info, body = await store.get_manifest(repository, str(digest))
            children.update(parse_manifest(body, info.media_type).children)
        except (ManifestUnknown, ManifestInvalid):
            continue
    tagged = set(tags.values())
    roots = [d for d in revisions if d not in children and d not in tagged]
    return tags, roots


# ---- writing a layout -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutEntry:
    """One descriptor of ``index.json``."""

    descriptor: Descriptor

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.descriptor.annotations or {})

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME)

    @property
    def repository(self) -> str | None:
        return self.annotations.get(REPOSITORY_ANNOTATION)

    @property
    def tag(self) -> str | None:
        return self.annotations.get(TAG_ANNOTATION)

    @classmethod
    def for_manifest(
        cls, repository: str, tag: str | None, tree: ManifestTree, ref_name: str
    ) -> LayoutEntry:
        annotations = {REF_NAME: ref_name, REPOSITORY_ANNOTATION: repository}
        if tag is not None:
            annotations[TAG_ANNOTATION] = tag
        d = tree.descriptor
        return cls(Descriptor(d.media_type, d.digest, d.size, annotations=annotations))


class LayoutWriter:
    """Writes an OCI image layout in ``directory`` (created if needed)."""

    def __init__(self, directory: str) -> None:
        self.driver = FilesystemDriver(directory)
        self.directory = self.driver.root

    async def start(self) -> None:
        await self.put_json("oci-layout", {"imageLayoutVersion": LAYOUT_VERSION})

    async def put_json(self, name: str, doc: Any) -> None:
        await self.driver.put_content(name, (json.dumps(doc, indent=1) + "\n").encode())

    async def has_blob(self, digest: Digest, size: int) -> bool:
        """Whether the blob is in the layout under its final name (so verified) with ``size``."""
        try:
            return (await self.driver.stat(layout_blob(digest))).size == size
        except PathNotFound:
            return False

    async def copy_blob(
        self, source: AsyncIterator[bytes], digest: Digest, size: int, advance: Advance
    ) -> None:
        """Stream ``source`` into the layout, hashing as it goes; rename it into place only if
        it hashes to ``digest`` and has ``size`` bytes, else raise ``DigestMismatch`` or
        ``SizeMismatch`` and leave nothing."""
        hasher = digest.hasher()
        async with self.driver.writer(layout_blob(digest), hasher=hasher) as writer:
            async for chunk in source:
                await writer.write(chunk)
                advance(len(chunk))
            _check(digest, hasher.hexdigest(), size, writer.size)
            await writer.commit()

    async def put_manifest(self, tree: ManifestTree) -> None:
        if not await self.has_blob(tree.digest, len(tree.body)):
            await self.driver.put_content(layout_blob(tree.digest), tree.body)

    async def prune(self, keep: set[Digest]) -> int:
        """Remove the blobs not in ``keep`` (what an interrupted run wrote that this one does
        not carry, its store having changed since); returns how many were removed."""
        removed = 0
        for algorithm in ALGORITHMS:
            try:
                names = await self.driver.list(f"blobs/{algorithm}")
            except PathNotFound:
                continue
            for name in names:
                try:
                    digest = Digest.parse(f"{algorithm}:{name}")
                except InvalidDigest:
                    continue  # not a blob this writer wrote
                if digest not in keep:
                    await self.driver.delete(layout_blob(digest))
                    removed += 1
        return removed

    async def clear_extras(self) -> None:
        """Remove the signatures and mirror configuration files (an interrupted run's: an
        export writes them whole, after the blobs)."""
        for top in (_SIGNATURES, MIRROR_CONFIG):
            try:
                await self.driver.delete(top)
            except PathNotFound:
                pass

    async def write_index(self, entries: list[LayoutEntry]) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [e.descriptor.to_json() for e in entries],
        }
        await self.put_json("index.json", doc)


def _check(digest: Digest, actual_hex: str, size: int, actual_size: int) -> None:
    if actual_hex != digest.hex:
        raise DigestMismatch(f"content of {digest} hashes to {digest.algorithm}:{actual_hex}")
    check_described_size(size, actual_size, str(digest))


# ---- reading a layout -------------------------------------------------------------------------


class LayoutReader:
    """Reads an OCI image layout in ``directory``, verifying what it hands out. Only regular
    files inside it are read (no symlinks out of it, no devices or FIFOs): it may come from
    anywhere."""

    def __init__(self, directory: str) -> None:
        self.driver = FilesystemDriver(directory, strict=True)
        self.directory = self.driver.root

    async def entries(self) -> list[LayoutEntry]:
        """The descriptors of ``index.json``; ``LayoutError`` if this is not a layout."""
        try:
            marker = json.loads(await self.driver.get_content("oci-layout", 4096))
            doc = json.loads(await self.driver.get_content("index.json", INDEX_LIMIT))
        except PathNotFound as e:
            raise LayoutError(f"{self.directory} is not an OCI image layout (no {e})") from None
        except (ValueError, DriverError) as e:
            raise LayoutError(
                f"{self.directory}: unreadable oci-layout or index.json: {e}"
            ) from None
        except RecursionError:
            raise LayoutError(f"{self.directory}/index.json is nested too deeply") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("imageLayoutVersion"), str):
            raise LayoutError(f"{self.directory}/oci-layout has no imageLayoutVersion")
        manifests = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(manifests, list):
            raise LayoutError(f"{self.directory}/index.json has no manifests list")
        out = []
        for i, d in enumerate(manifests):
            try:
                annotations = d.get("annotations") or {}
                out.append(
                    LayoutEntry(
                        Descriptor(
                            str(d["mediaType"]),
                            Digest.parse(d["digest"]),
                            int(d["size"]),
                            annotations={str(k): str(v) for k, v in annotations.items()},
                        )
                    )
                )
            except (KeyError, TypeError, ValueError, AttributeError, InvalidDigest) as e:
                raise LayoutError(f"index.json manifests[{i}] is not a descriptor: {e}") from None
        return out

    async def blob_size(self, digest: Digest) -> int | None:
        try:
            return (await self.driver.stat(layout_blob(digest))).size
        except PathNotFound:
            return None

    def read_blob(self, digest: Digest) -> AsyncIterator[bytes]:
        return self.driver.reader(layout_blob(digest), chunk_size=CHUNK)

    async def manifest(self, digest: Digest, limit: int) -> bytes | None:
        """The manifest's bytes if the layout has it (None if not); ``DigestMismatch`` if they
        do not hash to ``digest``."""
        try:
            body = await self.driver.get_content(layout_blob(digest), limit)
        except PathNotFound:
            return None
        except ValueError:
            raise ManifestInvalid(f"manifest {digest} is larger than {limit} bytes") from None
        except DriverError as e:
            raise ManifestInvalid(f"manifest {digest}: {e}") from None
        actual = Digest.of(body, digest.algorithm)
        if actual != digest:
            raise DigestMismatch(f"content of {digest} hashes to {actual}")
        return body

    async def signatures(self) -> list[tuple[str, bytes]]:
        """(``<alg>=<hex>/signature-N``, bytes) for every signature in the layout;
        ``LayoutError`` for one that could not have been written by an export."""
        found = await self._extras(_SIGNATURES, _SIGNATURE_LIMIT)
        for rel, _ in found:
            check_signature_name(rel)
        return found

    async def mirror_config(self) -> list[tuple[str, bytes]]:
        """(``<name>/<file>``, bytes) for every mirror configuration file in the layout;
        ``LayoutError`` for a name that could not have been written by an export."""
        found = await self._extras(MIRROR_CONFIG, _MIRROR_CONFIG_LIMIT)
        for rel, _ in found:
            check_mirror_config_name(rel)
        return found

    async def _extras(self, top: str, limit: int) -> list[tuple[str, bytes]]:
        try:
            return await _two_level_files(self.driver, top, limit)
        except (ValueError, DriverError) as e:
            raise LayoutError(f"{self.directory}/{top}: {e}") from None


async def import_blob(
    store: Store, source: AsyncIterator[bytes], digest: Digest, size: int, advance: Advance
) -> None:
    """Stream ``source`` into the store's staging area, hashing as it goes, and move it into
    the blob pool only if it hashes to ``digest`` (and has ``size`` bytes unless ``size`` is
    negative). Otherwise raise ``DigestMismatch``/``SizeMismatch``; nothing becomes visible."""
    staging = _staging(digest)
    hasher = digest.hasher()
    async with store.driver.writer(staging, hasher=hasher) as writer:
        async for chunk in source:
            await writer.write(chunk)
            advance(len(chunk))
        _check(digest, hasher.hexdigest(), size, writer.size)
        await writer.commit()
    try:
        await store.commit_blob(staging, digest)
    except BaseException:
        try:
            await store.driver.delete(staging)
        except PathNotFound:
            pass
        raise


async def commit_staged(store: Store, staging: str, digest: Digest, size: int) -> int:
    """Move a blob that was verified against ``digest`` while it was written to ``staging`` (a
    path of the store's driver, e.g. a large blob unpacked from volumes) into the blob pool if
    it has ``size`` bytes (any if negative), and return its size; else ``SizeMismatch`` and
    nothing becomes visible."""
    actual = (await store.driver.stat(staging)).size
    check_described_size(size, actual, str(digest))
    await store.commit_blob(staging, digest)
    return actual


async def copy_store_blob(
    store: Store, writer: LayoutWriter, digest: Digest, size: int, advance: Advance
) -> None:
    """Copy a blob of the store into the layout, verified (a corrupt store blob raises)."""
    if await store.blob_size(digest) is None:
        raise BlobUnknown(f"blob {digest} is not in the store")
    await writer.copy_blob(store.read_blob(digest), digest, size, advance)


# ---- signatures and import markers ------------------------------------------------------------


async def _two_level_files(
    driver: StorageDriver, top: str, limit: int, keep: Callable[[str], bool] | None = None
) -> list[tuple[str, bytes]]:
    """(``<dir>/<file>``, bytes) of every file two levels under ``top`` (none if ``top`` is
    absent), only directories for which ``keep`` is true if given."""
    out = []
    try:
        directories = await driver.list(top)
    except PathNotFound:
        return []
    for directory in directories:
        if keep is not None and not keep(directory):
            continue
        try:
            names = await driver.list(f"{top}/{directory}")
        except PathNotFound:
            continue
        for name in names:
            rel = f"{directory}/{name}"
            out.append((rel, await driver.get_content(f"{top}/{rel}", limit)))
    return out


async def signature_files(
    store: Store, digests: set[Digest] | None = None
) -> list[tuple[str, bytes]]:
    """(``<alg>=<hex>/signature-N``, bytes) kept in the store, for ``digests`` or all."""

    def wanted(name: str) -> bool:
        algorithm, _, hex_ = name.partition("=")
        return digests is None or Digest(algorithm, hex_) in digests

    return await _two_level_files(store.driver, _SIGNATURES, _SIGNATURE_LIMIT, wanted)


def check_signature_name(rel: str) -> None:
    """``LayoutError`` unless ``rel`` is ``<alg>=<hex>/signature-N``."""
    directory, _, name = rel.partition("/")
    algorithm, _, hex_ = directory.partition("=")
    try:
        Digest.parse(f"{algorithm}:{hex_}")  # validates the path segment
    except InvalidDigest:
        raise LayoutError(f"unexpected signature file {rel!r}") from None
    if not name.startswith("signature-") or not name[len("signature-") :].isdigit():
        raise LayoutError(f"unexpected signature file {rel!r}")


async def put_signature(store: Store, rel: str, data: bytes) -> None:
    check_signature_name(rel)
    await store.driver.put_content(f"{_SIGNATURES}/{rel}", data)


async def put_layout_signature(writer: LayoutWriter, rel: str, data: bytes) -> None:
    await writer.driver.put_content(f"{_SIGNATURES}/{rel}", data)


def _plain_name(text: str) -> bool:
    """Letters, digits, ``-_.``, not starting with a dot: safe as one path segment."""
    return bool(text) and all(c.isalnum() or c in "-_." for c in text) and text[0] != "."


def check_export_id(export_id: object) -> str:
    """``export_id`` if it is a plain name (it names a file); else ``LayoutError``."""
    if not isinstance(export_id, str) or not _plain_name(export_id):
        raise LayoutError(f"invalid export id {export_id!r}")
    return export_id


def _done_path(export_id: str) -> str:
    return paths.import_done(check_export_id(export_id))


def check_mirror_config_name(rel: str) -> tuple[str, str]:
    """(name, file) of ``<name>/<file>``; ``LayoutError`` unless both are plain names."""
    name, _, file = rel.partition("/")
    if not _plain_name(name) or not _plain_name(file):
        raise LayoutError(f"unexpected mirror configuration file {rel!r}")
    return name, file


async def mirror_config_files(store: Store) -> list[tuple[str, bytes]]:
    """(``<name>/<file>``, bytes) of every mirror configuration kept in the store."""
    return await _two_level_files(store.driver, MIRROR_CONFIG, _MIRROR_CONFIG_LIMIT, _plain_name)


async def put_mirror_config(driver: StorageDriver, rel: str, data: bytes) -> None:
    """Write ``<name>/<file>`` under ``mirror-config/`` of a store's or a layout's driver."""
    name, file = check_mirror_config_name(rel)
    await driver.put_content(paths.mirror_config(name, file), data)


async def keep_mirror_config(store: Store, name: str, files: dict[str, bytes]) -> None:
    """Replace the mirror configuration ``name`` in the store by ``files`` (file -> bytes)."""
    if not _plain_name(name):
        raise LayoutError(f"invalid mirror configuration name {name!r}")
    for file in files:
        check_mirror_config_name(f"{name}/{file}")
    try:
        await store.driver.delete(paths.mirror_config_dir(name))
    except PathNotFound:
        pass
    for file, data in files.items():
        await store.driver.put_content(paths.mirror_config(name, file), data)


async def import_done(store: Store, export_id: str) -> bool:
    """Whether an import of export ``export_id`` completed into this store."""
    try:
        await store.driver.stat(_done_path(export_id))
        return True
    except PathNotFound:
        return False


async def mark_import_done(store: Store, export_id: str, summary: dict[str, Any]) -> None:
    await store.driver.put_content(_done_path(export_id), json.dumps(summary).encode())
