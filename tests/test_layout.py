"""``storage.layout``: writing and reading OCI image layouts, verification on both sides, the
manifest trees and roots of a repository."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage import Digest, DigestMismatch, SizeMismatch, Store, paths
from storage import layout as oci
from tests.images import multi_arch_index, sample_image, write_oci_layout


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def ignore(n: int) -> None:
    pass


async def put_image(store: Store, repo: str, artifact: object, tag: str | None = None) -> None:
    images = getattr(artifact, "children", None) or (artifact,)
    for image in images:
        for blob in image.blobs:
            d = Digest.parse(blob.digest)
            await store.driver.put_content(paths.blob(d), blob.data)
            await store.link_blob(repo, d)
        await store.put_manifest(repo, image.digest, image.manifest, image.media_type)
    top = artifact  # an index after its children
    await store.put_manifest(
        repo,
        tag or top.digest,  # type: ignore[attr-defined]
        top.manifest,  # type: ignore[attr-defined]
        top.media_type,  # type: ignore[attr-defined]
    )


async def test_copy_blob_renames_only_verified_content(tmp_path: Path) -> None:
    writer = oci.LayoutWriter(str(tmp_path / "out"))
    await writer.start()
    data = b"x" * 5000
    d = Digest.of(data)
    seen: list[int] = []
    await writer.copy_blob(chunks(data), d, len(data), seen.append)
    assert sum(seen) == len(data) and len(seen) == 5
    assert (tmp_path / "out/blobs/sha256" / d.hex).read_bytes() == data
    assert await writer.has_blob(d, len(data)) and not await writer.has_blob(d, 1)

    wrong = Digest.of(b"something else")
    with pytest.raises(DigestMismatch, match=str(wrong)):
        await writer.copy_blob(chunks(data), wrong, len(data), ignore)
    with pytest.raises(SizeMismatch):
        await writer.copy_blob(chunks(data), d, len(data) + 1, ignore)
    names = {p.name for p in (tmp_path / "out/blobs/sha256").iterdir()}
    assert names == {d.hex}  # nothing left behind, not even a temporary file


async def test_import_blob_verifies_before_the_pool(store: Store) -> None:
    data = b"layer bytes" * 1000
    d = Digest.of(data)
    flipped = bytearray(data)
    flipped[100] ^= 1
    with pytest.raises(DigestMismatch, match=str(d)):
        await oci.import_blob(store, chunks(bytes(flipped)), d, len(data), ignore)
    assert await store.blob_size(d) is None
    staging = store.driver.local_path("imports/staging")
    assert staging is not None and not list(Path(staging).iterdir())
    await oci.import_blob(store, chunks(data), d, len(data), ignore)
    assert await store.blob_size(d) == len(data)
    # a second copy of present content is dropped, the first stays
    await oci.import_blob(store, chunks(data), d, -1, ignore)
    assert await store.blob_size(d) == len(data) and not list(Path(staging).iterdir())


async def test_reader_entries_and_verified_manifests(tmp_path: Path) -> None:
    image = sample_image("layout-test")
    index = multi_arch_index("layout-index")
    write_oci_layout(tmp_path / "l", {"v1": image, "multi": index})
    reader = oci.LayoutReader(str(tmp_path / "l"))
    entries = await reader.entries()
    assert [e.ref_name for e in entries] == ["v1", "multi"]
    assert entries[0].repository is None and entries[0].tag is None
    d = Digest.parse(image.digest)
    assert await reader.manifest(d, 1 << 20) == image.manifest
    assert await reader.blob_size(Digest.of(b"absent")) is None
    assert await reader.manifest(Digest.of(b"absent"), 1 << 20) is None
    path = tmp_path / "l/blobs/sha256" / d.hex
    path.write_bytes(path.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(DigestMismatch, match=str(d)):
        await reader.manifest(d, 1 << 20)


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "not an OCI image layout"),
        ({"oci-layout": "{}", "index.json": "{}"}, "imageLayoutVersion"),
        ({"oci-layout": '{"imageLayoutVersion": "1.0.0"}', "index.json": "[]"}, "manifests"),
        (
            {
                "oci-layout": '{"imageLayoutVersion": "1.0.0"}',
                "index.json": '{"manifests": [{"digest": "sha256:12"}]}',
            },
            "manifests[0]",
        ),
    ],
    ids=["empty", "no-version", "no-manifests", "bad-descriptor"],
)
async def test_not_a_layout(tmp_path: Path, files: dict[str, str], fragment: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(oci.LayoutError, match=fragment.replace("[", r"\[")):
        await oci.LayoutReader(str(tmp_path)).entries()


async def test_store_trees_and_roots(store: Store) -> None:
    image = sample_image("roots-image")
    index = multi_arch_index("roots-index")
    loose = sample_image("roots-loose")
    await put_image(store, "team/app", image, tag="v1")
    await put_image(store, "team/app", index)
    await put_image(store, "team/app", loose)
    tags, roots = await oci.repository_roots(store, "team/app")
    assert tags == {"v1": Digest.parse(image.digest)}
    assert set(roots) == {Digest.parse(index.digest), Digest.parse(loose.digest)}
    tree = await oci.read_store_tree(store, "team/app", Digest.parse(index.digest))
    walked = [str(n.digest) for n in tree.walk()]
    assert walked == [c.digest for c in index.children] + [index.digest]  # children first
    assert tree.children[0].blobs == {
        Digest.parse(b.digest): b.size for b in index.children[0].blobs
    }

    # a missing layer makes the tree incomplete, naming it
    gone = Digest.parse(index.children[1].layers[-1].digest)
    await store.driver.delete(paths.blob(gone))
    with pytest.raises(oci.Incomplete, match=str(gone)) as e:
        await oci.read_store_tree(store, "team/app", Digest.parse(index.digest))
    assert e.value.missing == [gone]


async def test_export_description_entry_annotations(tmp_path: Path, store: Store) -> None:
    image = sample_image("annotated")
    await put_image(store, "quay.io/team/app", image, tag="v1")
    tree = await oci.read_store_tree(store, "quay.io/team/app", Digest.parse(image.digest))
    writer = oci.LayoutWriter(str(tmp_path / "o"))
    await writer.start()
    entry = oci.LayoutEntry.for_manifest("quay.io/team/app", "v1", tree, "quay.io/team/app:v1")
    await writer.write_index([entry])
    doc = json.loads((tmp_path / "o/index.json").read_text())
    assert doc["manifests"] == [
        {
            "mediaType": image.media_type,
            "digest": image.digest,
            "size": len(image.manifest),
            "annotations": {
                "org.opencontainers.image.ref.name": "quay.io/team/app:v1",
                "io.bastion.repository": "quay.io/team/app",
                "io.bastion.tag": "v1",
            },
        }
    ]
    (read,) = await oci.LayoutReader(str(tmp_path / "o")).entries()
    assert (read.repository, read.tag, read.ref_name) == (
        "quay.io/team/app",
        "v1",
        "quay.io/team/app:v1",
    )


async def test_mirror_configuration_in_store_and_layout(tmp_path: Path, store: Store) -> None:
    await oci.keep_mirror_config(store, "release-4.99.1", {"a.yaml": b"1", "b.yaml": b"2"})
    await oci.keep_mirror_config(store, "release-4.99.1", {"a.yaml": b"new"})  # replaced whole
    assert await oci.mirror_config_files(store) == [("release-4.99.1/a.yaml", b"new")]
    writer = oci.LayoutWriter(str(tmp_path / "l"))
    await oci.put_mirror_config(writer.driver, "release-4.99.1/a.yaml", b"new")
    reader = oci.LayoutReader(str(tmp_path / "l"))
    assert await reader.mirror_config() == [("release-4.99.1/a.yaml", b"new")]
    (tmp_path / "l/mirror-config/release-4.99.1/.hidden").write_bytes(b"x")
    with pytest.raises(oci.LayoutError, match="unexpected mirror configuration file"):
        await reader.mirror_config()


@pytest.mark.parametrize("name", ["", ".x", "a/b", "..", "a b"], ids=repr)
async def test_mirror_configuration_names_are_plain(store: Store, name: str) -> None:
    with pytest.raises(oci.LayoutError):
        await oci.keep_mirror_config(store, name, {"a.yaml": b""})
    with pytest.raises(oci.LayoutError):
        await oci.keep_mirror_config(store, "ok", {name or "/": b""})


async def test_commit_staged_checks_the_described_size(store: Store) -> None:
    data = b"verified while unpacked" * 100
    d = Digest.of(data)
    await store.driver.put_content("imports/unpack-x/staging/blob", data)
    with pytest.raises(SizeMismatch, match=f"{d} has {len(data)} bytes, its descriptor says 5"):
        await oci.commit_staged(store, "imports/unpack-x/staging/blob", d, 5)
    assert await store.blob_size(d) is None
    stored = await oci.commit_staged(store, "imports/unpack-x/staging/blob", d, len(data))
    assert stored == len(data) and await store.blob_size(d) == len(data)


async def test_prune_keeps_only_the_blobs_asked_for(tmp_path: Path) -> None:
    writer = oci.LayoutWriter(str(tmp_path / "out"))
    kept, dropped = b"kept", b"dropped"
    for data in (kept, dropped):
        await writer.copy_blob(chunks(data), Digest.of(data), len(data), ignore)
    (tmp_path / "out/blobs/sha256/not-a-digest").write_bytes(b"")
    await oci.put_layout_signature(writer, f"sha256={Digest.of(kept).hex}/signature-1", b"s")
    assert await writer.prune({Digest.of(kept)}) == 1
    assert {p.name for p in (tmp_path / "out/blobs/sha256").iterdir()} == {
        Digest.of(kept).hex,
        "not-a-digest",
    }
    await writer.clear_extras()
    assert not (tmp_path / "out/signatures").exists()
