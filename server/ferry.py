"""``bastion export`` and ``bastion import``: carrying the store across the air gap as an OCI
image layout (``storage.layout``), incrementally, verified on both sides, resumable.

Beside the layout, ``bastion-export.json`` describes the export::

    {"format": 1, "id": ..., "base": <id of the export it builds on, or null>,
     "chain": [ids of the earlier exports, oldest first], "created": ...,
     "blobs": [{"digest", "size"}, ...],          what this export carries (manifests too)
     "repositories": {name: {"tags": {tag: digest}, "manifests": [digest, ...]}},
     "carried": [digest, ...],                    everything the chain carried, this included
     "signatures": ["sha256=<hex>/signature-1", ...]}

so ``--since`` needs only that file to compute an increment. While an export runs the directory
holds ``bastion-export.partial.json`` instead (its id and base), so a rerun continues it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from storage import (
    Digest,
    FilesystemDriver,
    InvalidName,
    Store,
    StoreError,
    paths,
    validate_name,
    volumes,
)
from storage import layout as oci
from storage.digest import validate_tag

from .config import Config, ConfigError
from .mirror import _size
from .progress import Progress
from .reference import ImageReference, ReferenceError
from .release import ReleaseError, read_payload

__all__ = [
    "EXPORT_JSON",
    "ExportOptions",
    "FerryError",
    "ImportOptions",
    "export_store",
    "import_layout",
]

log = logging.getLogger("bastion.ferry")

EXPORT_JSON: Final = "bastion-export.json"
PARTIAL_JSON: Final = "bastion-export.partial.json"
FORMAT: Final = 1
_META_LIMIT: Final = 256 * 1024 * 1024


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
    source: str
    repo: str | None = None
    concurrency: int = 4


@dataclass
class Root:
    """One index.json entry: a manifest tree in a repository, by tag or by digest only."""

    repository: str
    tag: str | None
    tree: oci.ManifestTree

    @property
    def ref_name(self) -> str:
        if self.tag is not None:
            return f"{self.repository}:{self.tag}"
        return f"{self.repository}@{self.tree.digest}"

    @property
    def key(self) -> tuple[str, str | None, str]:
        return self.repository, self.tag, str(self.tree.digest)


def _store(config: Config) -> Store:
    return Store(FilesystemDriver(config.storage.root), config.limits.manifest_size)


async def _gather_limited(n: int, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    slots = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with slots:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


# ---- selection --------------------------------------------------------------------------------


async def _roots_of(store: Store, repository: str, only: set[Digest] | None = None) -> list[Root]:
    """Every tag and digest-only manifest of ``repository`` (within ``only`` if given); trees
    missing content are skipped with a warning (a cache holds partial images)."""
    tags, digests = await oci.repository_roots(store, repository)
    wanted: list[tuple[str | None, Digest]] = [(t, d) for t, d in sorted(tags.items())]
    wanted += [(None, d) for d in digests]
    if only is not None:
        wanted = [(t, d) for t, d in wanted if d in only]
        tagged = {d for t, d in wanted if t is not None}
        wanted += [(None, d) for d in only if d not in tagged and (None, d) not in wanted]
    trees: dict[Digest, oci.ManifestTree | None] = {}
    out = []
    for tag, digest in wanted:
        if digest not in trees:
            try:
                trees[digest] = await oci.read_store_tree(store, repository, digest)
            except oci.Incomplete as e:
                if only is not None:
                    raise FerryError(f"cannot export {e}") from None
                log.warning("skipped %s (incomplete in the store)", e)
                trees[digest] = None
        tree = trees[digest]
        if tree is not None:
            out.append(Root(repository, tag, tree))
    return out


async def _select_repositories(store: Store, patterns: list[str]) -> list[str]:
    names = await store.list_repositories()
    if not patterns:
        return names
    selected = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise FerryError(f"no repository in the store matches {pattern!r}")
        selected += matched
    return sorted(set(selected))


def _parse_local(text: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@digest`` -> (repo, reference)."""
    if "@" in text:
        repo, _, reference = text.partition("@")
    else:
        head, _, last = text.rpartition("/")
        name, sep, tag = last.partition(":")
        repo, reference = (f"{head}/{name}" if head else name), (tag if sep else "latest")
    return repo, reference


def _candidates(config: Config, text: str) -> list[tuple[str, str]]:
    """Where in the store a reference may live: as written, and under its upstream's
    namespace."""
    out = [_parse_local(text)]
    try:
        ref = ImageReference.parse(text)
    except ReferenceError:
        return out
    upstream = config.upstreams.get(ref.host)
    namespace = upstream.namespace if upstream and upstream.namespace else ref.host
    out.append((f"{namespace}/{ref.repository}", ref.reference))
    return out


async def _find(store: Store, config: Config, text: str, also: list[str]) -> tuple[str, Digest]:
    tried = _candidates(config, text)
    if "@" in text:
        tried += [(repo, text.partition("@")[2]) for repo in also]
    for repo, reference in tried:
        try:
            validate_name(repo)
            return repo, (await store.stat_manifest(repo, reference)).digest
        except StoreError:
            continue
    raise FerryError(f"{text} is not in the store (mirror it first)")


async def _release_roots(store: Store, config: Config, text: str) -> list[Root]:
    repo, digest = await _find(store, config, text, [])
    tree = await oci.read_store_tree(store, repo, digest)
    image = tree
    if tree.children:
        amd64 = _platform_child(tree, "amd64")
        image = amd64 or tree.children[0]
    layers = [Digest.parse(layer["digest"]) for layer in json.loads(image.body).get("layers", [])]

    async def path_of(d: Digest) -> str:
        path = store.blob_local_path(d)
        assert path is not None
        return path

    try:
        payload = await read_payload(path_of, layers)
    except ReleaseError as e:
        raise FerryError(f"{text}: {e}") from None
    by_repo: dict[str, set[Digest]] = {repo: {digest}}
    for name, component in payload.components:
        found_repo, found = await _find(store, config, str(component), [repo])
        log.debug("component %s: %s@%s", name, found_repo, found)
        by_repo.setdefault(found_repo, set()).add(found)
    roots = []
    for name, digests in sorted(by_repo.items()):
        roots += await _roots_of(store, name, digests)
    return roots


def _platform_child(tree: oci.ManifestTree, architecture: str) -> oci.ManifestTree | None:
    for entry in json.loads(tree.body).get("manifests", []):
        if (entry.get("platform") or {}).get("architecture") == architecture:
            for child in tree.children:
                if str(child.digest) == entry.get("digest"):
                    return child
    return None


async def select(store: Store, config: Config, options: ExportOptions) -> list[Root]:
    roots: list[Root] = []
    if options.release:
        roots += await _release_roots(store, config, options.release)
    if options.repos or not options.release:
        for name in await _select_repositories(store, options.repos):
            roots += await _roots_of(store, name)
    unique = {r.key: r for r in roots}
    return [unique[k] for k in sorted(unique, key=lambda k: (k[0], k[1] or "", k[2]))]


# ---- export -----------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(_META_LIMIT))
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
    return _read_json(path)


def _prepare_directory(directory: str) -> str | None:
    """Id of an interrupted export to continue in ``directory``, or None for a fresh one."""
    if os.path.exists(os.path.join(directory, EXPORT_JSON)):
        doc = _read_json(os.path.join(directory, EXPORT_JSON))
        raise FerryError(f"{directory} already holds export {doc['id']}; export to a new directory")
    partial = os.path.join(directory, PARTIAL_JSON)
    if os.path.exists(partial):
        with open(partial, "rb") as f:
            return str(json.loads(f.read(4096))["id"])
    if os.path.isdir(directory) and os.listdir(directory):
        raise FerryError(f"{directory} is not empty and holds no interrupted export")
    return None


@dataclass
class ExportSummary:
    export_id: str
    entries: int = 0
    repositories: int = 0
    written: int = 0
    written_bytes: int = 0
    resumed: int = 0
    resumed_bytes: int = 0
    carried_before: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"export {self.export_id}: {self.entries} manifests in {self.repositories} "
            f"repositories; blobs: {self.written} written ({_size(self.written_bytes)}), "
            f"{self.resumed} already there ({_size(self.resumed_bytes)}), "
            f"{self.carried_before} carried by earlier exports; {elapsed:.1f}s, "
            f"{_size(self.written_bytes / elapsed)}/s"
        )


async def export_store(config: Config, options: ExportOptions, progress: Progress) -> str:
    """Write the export (as volumes with ``split_size``); returns its summary line."""
    if options.split_size is None:
        return await _export_layout(config, options, options.to, progress)
    size = options.split_size
    if size < volumes.MIN_VOLUME:
        raise FerryError(f"--split-size must be at least {_size(volumes.MIN_VOLUME)}")
    if os.path.exists(os.path.join(options.to, EXPORT_JSON)):
        doc = _read_json(os.path.join(options.to, EXPORT_JSON))
        raise FerryError(
            f"{options.to} already holds export {doc['id']}; export to a new directory"
        )
    layout = os.path.join(options.to, "layout")
    if os.path.exists(os.path.join(layout, EXPORT_JSON)):
        line = f"export {_read_json(os.path.join(layout, EXPORT_JSON))['id']} (layout complete)"
    else:
        line = await _export_layout(config, options, layout, progress)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(layout) for f in fs)
    progress.bytes_done = 0
    progress.start_bytes(total)
    loop = asyncio.get_running_loop()
    names = await loop.run_in_executor(
        None, volumes.pack, layout, options.to, size, progress.advance_bytes
    )
    await oci.LayoutWriter(options.to).driver.put_content(
        EXPORT_JSON, _read_bytes(os.path.join(layout, EXPORT_JSON))
    )
    await loop.run_in_executor(None, shutil.rmtree, layout)
    return f"{line}; {len(names)} volumes of at most {_size(size)}"


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_META_LIMIT)


async def _export_layout(
    config: Config, options: ExportOptions, directory: str, progress: Progress
) -> str:
    previous = load_previous(options.since) if options.since else None
    resumed_id = _prepare_directory(directory)
    store = _store(config)
    roots = await select(store, config, options)
    if not roots:
        raise FerryError("nothing to export: the selection holds no complete image")
    export_id = resumed_id or time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
    carried: set[str] = set(previous["carried"]) if previous else set()
    listed: set[tuple[str, str | None, str]] = set()
    if previous:
        for repo, state in previous.get("repositories", {}).items():
            listed.update((repo, t, d) for t, d in state.get("tags", {}).items())
            listed.update((repo, None, d) for d in state.get("manifests", []))
    entries = [r for r in roots if r.key not in listed]
    blobs: dict[Digest, int] = {}
    manifests: dict[Digest, oci.ManifestTree] = {}
    for root in entries:
        for node in root.tree.walk():
            if str(node.digest) not in carried or node is root.tree:
                manifests[node.digest] = node
            blobs.update({d: s for d, s in node.blobs.items() if str(d) not in carried})
    summary = ExportSummary(export_id, len(entries), len({r.repository for r in entries}))
    summary.carried_before = len(
        {d for r in entries for n in r.tree.walk() for d in n.blobs} - blobs.keys()
    )
    progress.set_total_images(len(entries))
    writer = oci.LayoutWriter(directory)
    base = previous["id"] if previous else None
    await writer.put_json(PARTIAL_JSON, {"id": export_id, "base": base})
    await writer.start()
    await _copy_blobs(store, writer, blobs, summary, progress, options.concurrency)
    for tree in manifests.values():
        await writer.put_manifest(tree)
    for root in entries:
        progress.image_done(root)
    selected = {n.digest for r in roots for n in r.tree.walk()}
    signatures = await oci.signature_files(store, selected)
    for rel, data in signatures:
        await oci.put_layout_signature(writer, rel, data)
    await writer.write_index(
        [oci.LayoutEntry.for_manifest(r.repository, r.tag, r.tree, r.ref_name) for r in entries]
    )
    carried_now: list[dict[str, Any]] = [
        {"digest": str(d), "size": s} for d, s in sorted(blobs.items(), key=lambda kv: str(kv[0]))
    ]
    carried_now += [{"digest": str(d), "size": len(t.body)} for d, t in manifests.items()]
    carried |= {str(c["digest"]) for c in carried_now}
    repositories: dict[str, dict[str, Any]] = {}
    for r in roots:
        state = repositories.setdefault(r.repository, {"tags": {}, "manifests": []})
        if r.tag is not None:
            state["tags"][r.tag] = str(r.tree.digest)
        elif str(r.tree.digest) not in state["manifests"]:
            state["manifests"].append(str(r.tree.digest))
    doc = {
        "format": FORMAT,
        "id": export_id,
        "base": base,
        "chain": [*previous.get("chain", []), previous["id"]] if previous else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "blobs": carried_now,
        "repositories": repositories,
        "carried": sorted(carried),
        "signatures": [rel for rel, _ in signatures],
    }
    await writer.put_json(EXPORT_JSON, doc)
    await writer.driver.delete(PARTIAL_JSON)
    return summary.line()


async def _copy_blobs(
    store: Store,
    writer: oci.LayoutWriter,
    blobs: dict[Digest, int],
    summary: ExportSummary,
    progress: Progress,
    concurrency: int,
) -> None:
    todo: dict[Digest, int] = {}
    for digest, size in blobs.items():
        if await writer.has_blob(digest, size):
            summary.resumed += 1
            summary.resumed_bytes += size
        else:
            todo[digest] = size
    progress.start_bytes(sum(todo.values()))
    failures: list[str] = []

    async def copy(digest: Digest, size: int) -> None:
        try:
            await oci.copy_store_blob(store, writer, digest, size, progress.advance_bytes)
        except StoreError as e:
            failures.append(f"blob {digest}: {e}")
            return
        summary.written += 1
        summary.written_bytes += size

    await _gather_limited(concurrency, [functools.partial(copy, d, s) for d, s in todo.items()])
    if failures:
        raise FerryError(*failures)


# ---- import -----------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    manifests: int = 0
    tags: int = 0
    imported: int = 0
    imported_bytes: int = 0
    present: int = 0
    signatures: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (
            f"imported {self.manifests} manifests, {self.tags} tags; blobs: {self.imported} "
            f"verified and stored ({_size(self.imported_bytes)}), {self.present} already "
            f"present; {self.signatures} signatures; {elapsed:.1f}s, "
            f"{_size(self.imported_bytes / elapsed)}/s"
        )


@dataclass
class _Target:
    repository: str
    tag: str | None
    entry: oci.LayoutEntry
    tree: oci.ManifestTree | None = None


class _Import:
    def __init__(self, store: Store, reader: oci.LayoutReader, options: ImportOptions) -> None:
        self.store = store
        self.reader = reader
        self.options = options
        self.summary = ImportSummary()
        self.bad: dict[Digest, str] = {}  # digest -> what is wrong
        self.owners: dict[Digest, set[str]] = {}  # digest -> repositories it belongs to
        self.blob_sizes: dict[Digest, int] = {}

    def destination(self, entry: oci.LayoutEntry) -> tuple[str, str | None]:
        repo, tag = entry.repository, entry.tag
        if repo is None and self.options.repo:
            repo = self.options.repo
            ref = entry.ref_name
            tag = ref if ref and _is_tag(ref) else None
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
            raise ConfigError(
                f"index.json entry {name!r} does not name a repository: give --repo NAME"
            )
        return repo, tag

    async def manifest_body(self, digest: Digest) -> bytes | None:
        """From the layout, else (an increment) from the store; verified."""
        limit = self.store.manifest_limit
        body = await self.reader.manifest(digest, limit)
        if body is None and await self.store.blob_size(digest) is not None:
            local = await self.store.driver.get_content(paths.blob(digest), limit)
            if Digest.of(local, digest.algorithm) == digest:
                body = local
        return body

    async def read_tree(
        self, repo: str, digest: Digest, media_type: str | None
    ) -> oci.ManifestTree | None:
        self.owners.setdefault(digest, set()).add(repo)
        try:
            body = await self.manifest_body(digest)
        except StoreError as e:
            self.bad[digest] = str(e)
            return None
        if body is None:
            self.bad.setdefault(digest, "manifest missing from the layout")
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

    async def blobs(self, progress: Progress) -> None:
        todo: dict[Digest, int] = {}
        for digest, size in self.blob_sizes.items():
            if digest in self.bad:
                continue
            if await self.store.blob_size(digest) is not None:
                self.summary.present += 1
            elif await self.reader.blob_size(digest) is None:
                self.bad[digest] = "blob missing from the layout"
            else:
                todo[digest] = size
        progress.start_bytes(sum(max(s, 0) for s in todo.values()))

        async def one(digest: Digest, size: int) -> None:
            try:
                await oci.import_blob(
                    self.store, self.reader.read_blob(digest), digest, size, progress.advance_bytes
                )
            except StoreError as e:
                self.bad[digest] = str(e)
                return
            self.summary.imported += 1
            self.summary.imported_bytes += max(size, 0)

        jobs = [functools.partial(one, d, s) for d, s in todo.items()]
        await _gather_limited(self.options.concurrency, jobs)

    def complete(self, tree: oci.ManifestTree) -> bool:
        return all(
            n.digest not in self.bad and not (n.blobs.keys() & self.bad.keys()) for n in tree.walk()
        )

    async def write(self, repo: str, tree: oci.ManifestTree, done: set[tuple[str, Digest]]) -> None:
        """Children first, each manifest after its blobs are linked into ``repo``."""
        for node in tree.walk():
            if (repo, node.digest) in done:
                continue
            for blob in node.blobs:
                if not await self.store.is_linked(repo, blob):
                    await self.store.link_blob(repo, blob)
            await self.store.put_manifest(repo, str(node.digest), node.body, node.media_type)
            done.add((repo, node.digest))
            self.summary.manifests += 1


def _is_tag(text: str) -> bool:
    try:
        validate_tag(text)
        return True
    except StoreError:
        return False


async def _check_base(store: Store, meta: dict[str, Any], root: str) -> None:
    base = meta.get("base")
    if not base or await oci.import_done(store, str(base)):
        return
    own = {b["digest"] for b in meta.get("blobs", [])}
    for text in meta.get("carried", []):
        if text in own:
            continue
        if await store.blob_size(Digest.parse(text)) is None:
            chain = " -> ".join([*meta.get("chain", []), meta["id"]])
            raise FerryError(
                f"export {meta['id']} is an increment on export {base}, which was not imported "
                f"into {root}: import the chain in order ({chain})"
            )


async def import_layout(config: Config, options: ImportOptions, progress: Progress) -> str:
    """Import an OCI layout (or a folder of volumes) into the store; returns the summary line.
    Raises ``FerryError`` with one line per bad digest (good content is kept, nothing bad
    becomes visible)."""
    store = _store(config)
    meta_path = os.path.join(options.source, EXPORT_JSON)
    meta = _read_json(meta_path) if os.path.exists(meta_path) else None
    if meta is not None:
        await _check_base(store, meta, config.storage.root)
    try:
        found = volumes.volumes_in(options.source)
    except volumes.VolumeError as e:
        raise FerryError(str(e)) from None
    if found and not os.path.exists(os.path.join(options.source, "oci-layout")):
        return await _import_volumes(store, meta, options, found, progress)
    return await _import_dir(store, options.source, meta, options, progress)


async def _import_volumes(
    store: Store,
    meta: dict[str, Any] | None,
    options: ImportOptions,
    found: list[str],
    progress: Progress,
) -> str:
    """Unpack the volumes (checked against their checksums): large blobs stream into the store
    (verified), the rest into a scratch layout in the store's ``imports/`` that is then
    imported as usual and removed."""
    work = f"imports/unpack-{uuid.uuid4().hex}"
    local = store.driver.local_path(work)
    if local is None:
        raise FerryError("importing volumes needs the filesystem store")
    progress.start_bytes(sum(os.path.getsize(os.path.join(options.source, n)) for n in found))
    loop = asyncio.get_running_loop()
    try:
        try:
            unpacked = await loop.run_in_executor(
                None,
                volumes.unpack,
                options.source,
                os.path.join(local, "layout"),
                os.path.join(local, "staging"),
                store.manifest_limit,
                progress.advance_bytes,
            )
        except (volumes.VolumeError, tarfile.TarError) as e:
            raise FerryError(f"{options.source}: {e}") from None
        for digest, path in unpacked.staged.items():
            await store.commit_blob(f"{work}/staging/{os.path.basename(path)}", digest)
        return await _import_dir(
            store,
            os.path.join(local, "layout"),
            meta,
            options,
            progress,
            unpacked.bad,
            unpacked.errors,
        )
    finally:
        await loop.run_in_executor(None, functools.partial(shutil.rmtree, local, True))


async def _import_dir(
    store: Store,
    directory: str,
    meta: dict[str, Any] | None,
    options: ImportOptions,
    progress: Progress,
    prefailed: dict[Digest, str] | None = None,
    errors: list[str] | None = None,
) -> str:
    reader = oci.LayoutReader(directory)
    try:
        entries = await reader.entries()
    except oci.LayoutError as e:
        raise FerryError(str(e)) from None
    job = _Import(store, reader, options)
    job.bad.update(prefailed or {})
    targets = []
    for entry in entries:
        repo, tag = job.destination(entry)
        target = _Target(repo, tag, entry)
        d = entry.descriptor
        target.tree = await job.read_tree(repo, d.digest, d.media_type)
        targets.append(target)
    progress.set_total_images(len(targets))
    await job.blobs(progress)
    done: set[tuple[str, Digest]] = set()
    failed = 0
    for target in targets:
        if target.tree is None or not job.complete(target.tree):
            failed += 1
            continue
        try:
            await job.write(target.repository, target.tree, done)
        except StoreError as e:
            job.bad[target.tree.digest] = str(e)
            failed += 1
            continue
        if target.tag is not None:
            await store.touch_tag(target.repository, target.tag, target.tree.digest)
            job.summary.tags += 1
        progress.image_done(target)
    if meta is not None and not job.bad:
        await _restore_tags(store, meta, {(t.repository, t.tag) for t in targets}, job)
    for rel, data in await reader.signatures():
        await oci.put_signature(store, rel, data)
        job.summary.signatures += 1
    if job.bad or errors:
        lines = list(errors or [])
        lines += [
            f"{d}: {why} (in {', '.join(sorted(job.owners.get(d, {'?'})))})"
            for d, why in sorted(job.bad.items(), key=lambda kv: str(kv[0]))
        ]
        lines.append(
            f"{failed} of {len(targets)} images not imported; the rest is in the store "
            f"({job.summary.line()})"
        )
        raise FerryError(*lines)
    if meta is not None:
        await oci.mark_import_done(store, str(meta["id"]), {"source": options.source})
    return job.summary.line()


async def _restore_tags(
    store: Store, meta: dict[str, Any], written: set[tuple[str, str | None]], job: _Import
) -> None:
    """Tags the export lists without an index entry (they point at manifests an earlier
    export carried) are pointed at those manifests, which must be in the store by now."""
    for repo, state in meta.get("repositories", {}).items():
        for tag, text in state.get("tags", {}).items():
            if (repo, tag) in written:
                continue
            digest = Digest.parse(text)
            try:
                await store.stat_manifest(repo, text)
            except StoreError:
                job.bad[digest] = f"tag {tag} points at a manifest not in the store"
                job.owners.setdefault(digest, set()).add(repo)
                continue
            await store.touch_tag(repo, tag, digest)
            job.summary.tags += 1
