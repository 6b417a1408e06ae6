"""``bastion export``: which manifests of the store to carry (``--repo``, ``--release``, all),
and writing them as an OCI image layout (``storage.layout``) with ``bastion-export.json``
(``server.ferry``), only what ``--since`` did not carry, resumable, or as tar volumes
(``storage.volumes``). Besides the images: the release signatures and the mirror step's
configuration files kept in the store."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import fnmatch
import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from storage import Digest, Store, StoreError, validate_name, volumes
from storage import layout as oci
from storage.driver.filesystem import TMP_PREFIX

from .config import Config, ConfigError
from .ferry import (
    EXPORT_JSON,
    FORMAT,
    META_LIMIT,
    PARTIAL_JSON,
    ExportOptions,
    FerryError,
    digest_line,
    gather_limited,
    load_previous,
    open_store,
    os_error_line,
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


def _selection(options: ExportOptions, previous: dict[str, Any] | None) -> dict[str, Any]:
    """What the export carries, as its in-progress marker records it: a rerun continues the
    export only if it asks for the same."""
    return {
        "repos": sorted(set(options.repos)),
        "release": options.release,
        "since": previous["id"] if previous else None,
        "split_size": options.split_size,
    }


def _arguments(selection: dict[str, Any]) -> str:
    """The arguments that ask for ``selection``."""
    words = [f"--repo {r}" for r in selection.get("repos") or []]
    if selection.get("release"):
        words.append(f"--release {selection['release']}")
    if selection.get("since"):
        words.append(f"--since (export {selection['since']})")
    if selection.get("split_size"):
        words.append(f"--split-size {_size(selection['split_size'])}")
    return " ".join(words) or "everything (no --repo, --release, --since or --split-size)"


def _read_marker(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            marker = json.loads(f.read(META_LIMIT))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("id"), str):
        raise ConfigError(f"{path} is unreadable: export to a new directory")
    return marker


def _prepare_directory(directory: str, selection: dict[str, Any]) -> str | None:
    """Id of the interrupted export of ``selection`` to continue in ``directory``, None for a
    fresh one; ``ConfigError`` if ``directory`` cannot take this export."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--to {directory} is a file, not a directory")
    partial = os.path.join(directory, PARTIAL_JSON)
    if os.path.exists(os.path.join(directory, EXPORT_JSON)):
        doc = read_json(os.path.join(directory, EXPORT_JSON))
        # described, but cut before its last steps (the staged layout and the volumes' plan
        # removed, the marker last): the same export continues
        if not os.path.exists(partial) or _read_marker(partial).get("id") != doc.get("id"):
            raise ConfigError(
                f"{directory} already holds export {doc['id']}; export to a new directory"
            )
    if os.path.exists(partial):
        marker = _read_marker(partial)
        recorded = marker.get("selection", selection)  # markers of older versions record none
        if recorded != selection:
            raise ConfigError(
                f"{directory} holds an interrupted export of {_arguments(recorded)}, not of "
                f"{_arguments(selection)}: rerun it with the same arguments or export to a "
                f"new directory"
            )
        return str(marker["id"])
    if os.path.isdir(directory) and os.listdir(directory):
        raise ConfigError(f"{directory} is not empty and holds no interrupted export")
    return None


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
    """Hold ``directory`` (created if need be) for this run: ``FerryError`` if another export
    is writing there, ``ConfigError`` if it cannot be created."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise ConfigError(os_error_line(e)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FerryError(f"another export is writing to {directory}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


async def _begin(directory: str, marker: dict[str, Any]) -> None:
    """Write the in-progress marker, the run's first write: a directory that cannot be
    written is said now, as a usage problem."""
    try:
        await oci.LayoutWriter(directory).put_json(PARTIAL_JSON, marker)
    except OSError as e:
        raise ConfigError(os_error_line(e)) from None


def _remove_temporaries(directory: str) -> int:
    """Remove the temporary files an interrupted run left under ``directory`` (partial blobs
    and volumes, never renamed into place); returns how many."""
    removed = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            if name.startswith(TMP_PREFIX):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed


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
    """Write the export (as volumes with ``split_size``); returns its summary line. Until it
    is complete the directory holds ``PARTIAL_JSON`` (the export's id, base and selection),
    so that a rerun with the same arguments continues it."""
    try:
        return await _export(config, options, progress)
    except OSError as e:
        raise FerryError(os_error_line(e)) from None


async def _export(config: Config, options: ExportOptions, progress: Progress) -> str:
    if options.split_size is not None and options.split_size < volumes.MIN_VOLUME:
        raise ConfigError(f"--split-size must be at least {_size(volumes.MIN_VOLUME)}")
    store = open_store(config, existing=True)
    previous = load_previous(options.since) if options.since else None
    selection = _selection(options, previous)
    _prepare_directory(options.to, selection)  # what is wrong is said before selecting
    roots = await select(store, config, options)
    if not roots:
        raise FerryError("nothing to export: the selection holds no complete image")
    with _exclusive(options.to):
        resumed = _prepare_directory(options.to, selection)  # again, now that it is held
        export_id = (
            resumed or time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]
        )
        base = previous["id"] if previous else None
        await _begin(options.to, {"id": export_id, "base": base, "selection": selection})
        if resumed:
            loop = asyncio.get_running_loop()
            stale = await loop.run_in_executor(None, _remove_temporaries, options.to)
            log.info("continuing export %s (%d temporary files removed)", export_id, stale)
        run = _Run(store, roots, previous, export_id, resumed is not None, options.concurrency)
        if options.split_size is None:
            line = await _write_layout(run, options.to, progress)
        else:
            line = await _write_volumes(run, options.to, options.split_size, progress)
        await oci.LayoutWriter(options.to).driver.delete(PARTIAL_JSON)
    return line


async def _write_volumes(run: _Run, directory: str, size: int, progress: Progress) -> str:
    """The layout in ``directory/layout`` (unless complete already), then packed into
    volumes of at most ``size`` bytes beside it (each blob leaving the layout as soon as it
    is packed) and removed."""
    layout = os.path.join(directory, "layout")
    loop = asyncio.get_running_loop()
    packed = os.path.exists(os.path.join(directory, volumes.PLAN_FILE)) and os.path.exists(
        os.path.join(directory, EXPORT_JSON)
    )
    if packed:  # a run that packed every volume and described them was cut after that
        names = volumes.volumes_in(directory)
        line = f"export {run.export_id} (volumes complete)"
    else:
        if os.path.exists(os.path.join(layout, EXPORT_JSON)):
            line = f"export {run.export_id} (layout complete)"
        else:  # volumes (and their plan) beside it were packed from a layout no longer there
            await loop.run_in_executor(None, volumes.discard, directory)
            line = await _write_layout(run, layout, progress)
        planned = await loop.run_in_executor(None, volumes.prepare, layout, directory, size)
        progress.bytes_done = 0
        progress.start_bytes(sum(piece.length for pieces in planned for piece in pieces))
        names = await loop.run_in_executor(
            None, volumes.pack, layout, directory, planned, progress.advance_bytes
        )
        with open(os.path.join(layout, EXPORT_JSON), "rb") as f:
            description = f.read(META_LIMIT)
        await oci.LayoutWriter(directory).driver.put_content(EXPORT_JSON, description)
    # the plan goes last: while it is there, a rerun finds the volumes as they were packed
    await loop.run_in_executor(None, functools.partial(shutil.rmtree, layout, ignore_errors=True))
    await loop.run_in_executor(None, volumes.finish, directory)
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


@dataclass
class _Run:
    """One run of an export: what it carries, and whether it continues an interrupted one."""

    store: Store
    roots: list[Root]
    previous: dict[str, Any] | None
    export_id: str
    resumed: bool
    concurrency: int


async def _write_layout(run: _Run, directory: str, progress: Progress) -> str:
    """Write the layout in ``directory``, its description last; returns the summary line. A
    resumed run keeps the blobs already there that it carries and removes the others."""
    plan = _plan(run.roots, run.previous)
    summary = ExportSummary(
        run.export_id, len(plan.entries), len({r.repository for r in plan.entries})
    )
    summary.carried_before = plan.carried_before
    progress.set_total_images(len(plan.entries))
    writer = oci.LayoutWriter(directory)
    if run.resumed:
        await writer.prune(plan.blobs.keys() | plan.manifests.keys())
        await writer.clear_extras()
    await writer.start()
    await _copy_blobs(run.store, writer, plan.blobs, summary, progress, run.concurrency)
    for tree in plan.manifests.values():
        await writer.put_manifest(tree)
    for root in plan.entries:
        progress.image_done(root)
    selected = {n.digest for r in run.roots for n in r.tree.walk()}
    signatures = await oci.signature_files(run.store, selected)
    for rel, data in signatures:
        await oci.put_layout_signature(writer, rel, data)
    configs = await _mirror_config(run.store, {r.repository for r in run.roots})
    for rel, data in configs:
        await oci.put_mirror_config(writer.driver, rel, data)
    await writer.write_index(
        [
            oci.LayoutEntry.for_manifest(r.repository, r.tag, r.tree, r.ref_name)
            for r in plan.entries
        ]
    )
    doc = _description(run.export_id, run.previous, plan, run.roots)
    doc["signatures"] = [rel for rel, _ in signatures]
    doc["mirror_config"] = [rel for rel, _ in configs]
    await writer.put_json(EXPORT_JSON, doc)
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
            failures.append(digest_line(digest, str(e)))
            return
        summary.written += 1
        summary.written_bytes += size

    await gather_limited(concurrency, [functools.partial(copy, d, s) for d, s in todo.items()])
    if failures:
        raise FerryError(*failures)
