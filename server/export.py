"""``bastion export``: which manifests of the store to carry (``--repo``, ``--release``, all),
and writing them as an OCI image layout (``storage.layout``) with ``bastion-export.json``
(``server.ferry``), only what ``--since`` did not carry, resumable, or as tar volumes
(``storage.volumes``). Besides the images: the release signatures and the mirror step's
configuration files kept in the store."""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from storage import Digest, Store, StoreError, validate_name, volumes
from storage import layout as oci

from .config import Config
from .ferry import (
    EXPORT_JSON,
    FORMAT,
    META_LIMIT,
    PARTIAL_JSON,
    ExportOptions,
    FerryError,
    gather_limited,
    load_previous,
    open_store,
    read_json,
)
from .mirror import _size
from .mirror_commands import MIRROR_MAP
from .progress import Progress
from .reference import ImageReference, ReferenceError
from .release import ReleaseError, read_payload

__all__ = ["Root", "export_store", "select"]

log = logging.getLogger("bastion.export")


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


def _prepare_directory(directory: str) -> str | None:
    """Id of an interrupted export to continue in ``directory``, or None for a fresh one."""
    if os.path.exists(os.path.join(directory, EXPORT_JSON)):
        doc = read_json(os.path.join(directory, EXPORT_JSON))
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
        doc = read_json(os.path.join(options.to, EXPORT_JSON))
        raise FerryError(
            f"{options.to} already holds export {doc['id']}; export to a new directory"
        )
    layout = os.path.join(options.to, "layout")
    if os.path.exists(os.path.join(layout, EXPORT_JSON)):
        line = f"export {read_json(os.path.join(layout, EXPORT_JSON))['id']} (layout complete)"
    else:
        line = await _export_layout(config, options, layout, progress)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(layout) for f in fs)
    progress.bytes_done = 0
    progress.start_bytes(total)
    loop = asyncio.get_running_loop()
    names = await loop.run_in_executor(
        None, volumes.pack, layout, options.to, size, progress.advance_bytes
    )
    with open(os.path.join(layout, EXPORT_JSON), "rb") as f:
        description = f.read(META_LIMIT)
    await oci.LayoutWriter(options.to).driver.put_content(EXPORT_JSON, description)
    await loop.run_in_executor(None, shutil.rmtree, layout)
    return f"{line}; {len(names)} volumes of at most {_size(size)}"


@dataclass
class _Plan:
    """What an export writes: index entries, blobs and manifests the chain did not carry."""

    entries: list[Root]
    blobs: dict[Digest, int]
    manifests: dict[Digest, oci.ManifestTree]
    carried_before: int


def _plan(roots: list[Root], previous: dict[str, Any] | None) -> _Plan:
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
    before = len({d for r in entries for n in r.tree.walk() for d in n.blobs} - blobs.keys())
    return _Plan(entries, blobs, manifests, before)


async def _export_layout(
    config: Config, options: ExportOptions, directory: str, progress: Progress
) -> str:
    previous = load_previous(options.since) if options.since else None
    resumed_id = _prepare_directory(directory)
    store = open_store(config)
    roots = await select(store, config, options)
    if not roots:
        raise FerryError("nothing to export: the selection holds no complete image")
    export_id = resumed_id or time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
    plan = _plan(roots, previous)
    summary = ExportSummary(export_id, len(plan.entries), len({r.repository for r in plan.entries}))
    summary.carried_before = plan.carried_before
    progress.set_total_images(len(plan.entries))
    writer = oci.LayoutWriter(directory)
    base = previous["id"] if previous else None
    await writer.put_json(PARTIAL_JSON, {"id": export_id, "base": base})
    await writer.start()
    await _copy_blobs(store, writer, plan.blobs, summary, progress, options.concurrency)
    for tree in plan.manifests.values():
        await writer.put_manifest(tree)
    for root in plan.entries:
        progress.image_done(root)
    selected = {n.digest for r in roots for n in r.tree.walk()}
    signatures = await oci.signature_files(store, selected)
    for rel, data in signatures:
        await oci.put_layout_signature(writer, rel, data)
    configs = await _mirror_config(store, {r.repository for r in roots})
    for rel, data in configs:
        await oci.put_mirror_config(writer.driver, rel, data)
    await writer.write_index(
        [
            oci.LayoutEntry.for_manifest(r.repository, r.tag, r.tree, r.ref_name)
            for r in plan.entries
        ]
    )
    doc = _description(export_id, previous, plan, roots)
    doc["signatures"] = [rel for rel, _ in signatures]
    doc["mirror_config"] = [rel for rel, _ in configs]
    await writer.put_json(EXPORT_JSON, doc)
    await writer.driver.delete(PARTIAL_JSON)
    return summary.line()


def _description(
    export_id: str, previous: dict[str, Any] | None, plan: _Plan, roots: list[Root]
) -> dict[str, Any]:
    """``bastion-export.json`` (``server.ferry``), without signatures and mirror config."""
    carried_now: list[dict[str, Any]] = [
        {"digest": str(d), "size": s}
        for d, s in sorted(plan.blobs.items(), key=lambda kv: str(kv[0]))
    ]
    carried_now += [{"digest": str(d), "size": len(t.body)} for d, t in plan.manifests.items()]
    carried: set[str] = set(previous["carried"]) if previous else set()
    carried |= {str(c["digest"]) for c in carried_now}
    repositories: dict[str, dict[str, Any]] = {}
    for r in roots:
        state = repositories.setdefault(r.repository, {"tags": {}, "manifests": []})
        if r.tag is not None:
            state["tags"][r.tag] = str(r.tree.digest)
        elif str(r.tree.digest) not in state["manifests"]:
            state["manifests"].append(str(r.tree.digest))
    return {
        "format": FORMAT,
        "id": export_id,
        "base": previous["id"] if previous else None,
        "chain": [*previous.get("chain", []), previous["id"]] if previous else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "blobs": carried_now,
        "repositories": repositories,
        "carried": sorted(carried),
    }


async def _mirror_config(store: Store, repositories: set[str]) -> list[tuple[str, bytes]]:
    """The mirror configuration files kept in the store that concern ``repositories``: those
    whose ``mirror-map.json`` names one of them as a mirror (all of a configuration without
    one). Small files, carried again by every increment."""
    files = await oci.mirror_config_files(store)
    maps = {rel.partition("/")[0]: data for rel, data in files if rel.endswith("/" + MIRROR_MAP)}
    wanted: set[str] = set()
    for name in {rel.partition("/")[0] for rel, _ in files}:
        if name not in maps or _mirrors_any(maps[name], repositories):
            wanted.add(name)
    return [(rel, data) for rel, data in files if rel.partition("/")[0] in wanted]


def _mirrors_any(data: bytes, repositories: set[str]) -> bool:
    try:
        doc = json.loads(data)
        host = str(doc["host"])
        mirrors = [*doc.get("digests", {}).values(), *doc.get("tags", {}).values()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return True
    return any(str(m).removeprefix(host + "/") in repositories for m in mirrors)


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

    await gather_limited(concurrency, [functools.partial(copy, d, s) for d, s in todo.items()])
    if failures:
        raise FerryError(*failures)
