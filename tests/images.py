"""Deterministic synthetic container images, built in memory with the standard library only.

Tests (and, later, synthetic release payloads) need real-looking images without a network:
valid image configs that podman accepts, gzip tar layers, OCI and Docker schema2 manifests,
image indexes and manifest lists. Everything here is a pure function of its arguments: the
same call gives the same bytes and the same digests on every machine and every run (tar
entries have fixed owners and times, gzip is written with ``mtime=0``).

Each manifest is serialised exactly once and its bytes are kept (``Image.manifest``,
``Index.manifest``); nothing is ever re-serialised, so a test can compare what a registry
or client hands back byte for byte with what was built. The serialisation is deliberately
not the compact form Go's ``encoding/json`` writes (it is indented and ends with a newline),
so anything along the way that re-encodes a manifest shows up as a digest mismatch.

Building::

    base = build_layer({"etc/os-release": b"ID=synthetic\\n"})
    image = build_image([base, build_layer({"app/hello": b"hi\\n"})], architecture="amd64")
    index = multi_arch_index("release", architectures=("amd64", "arm64", "s390x"))

Writing to disk in the formats skopeo reads (``oci:`` and ``dir:`` transports)::

    write_oci_layout(path, {"latest": image, "multi": index})
    write_dir_transport(path, docker_image)
    manifest, blobs = read_dir_transport(path)     # what ``skopeo copy ... dir:`` wrote
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "OCI",
    "DOCKER",
    "Format",
    "Blob",
    "Image",
    "Index",
    "Platform",
    "Artifact",
    "CREATED",
    "digest_of",
    "pseudo_random",
    "layer_tar",
    "build_layer",
    "build_image",
    "build_index",
    "sample_image",
    "multi_arch_index",
    "write_oci_layout",
    "read_oci_layout",
    "write_dir_transport",
    "read_dir_transport",
]

#: Fixed creation time for configs and history (tar entries use the same instant).
CREATED: Final = "2024-01-01T00:00:00Z"
_MTIME: Final = 1704067200  # CREATED as a Unix time

_OCI_REF_NAME: Final = "org.opencontainers.image.ref.name"
_DIR_TRANSPORT_VERSION: Final = "Directory Transport Version: 1.1\n"
_PATH_ENV: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Format:
    """The media types of one manifest family (OCI image-spec, or Docker schema2)."""

    name: str
    manifest: str
    index: str
    config: str
    layer_gzip: str


OCI: Final = Format(
    name="oci",
    manifest="application/vnd.oci.image.manifest.v1+json",
    index="application/vnd.oci.image.index.v1+json",
    config="application/vnd.oci.image.config.v1+json",
    layer_gzip="application/vnd.oci.image.layer.v1.tar+gzip",
)
DOCKER: Final = Format(
    name="docker",
    manifest="application/vnd.docker.distribution.manifest.v2+json",
    index="application/vnd.docker.distribution.manifest.list.v2+json",
    config="application/vnd.docker.container.image.v1+json",
    layer_gzip="application/vnd.docker.image.rootfs.diff.tar.gzip",
)


def digest_of(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pseudo_random(seed: str, size: int) -> bytes:
    """``size`` incompressible but reproducible bytes derived from ``seed``."""
    return hashlib.shake_256(seed.encode()).digest(size)


def _serialise(doc: Mapping[str, Any]) -> bytes:
    """The one place a document becomes bytes (see the module docstring for the format)."""
    return (json.dumps(doc, indent=3) + "\n").encode()


@dataclass(frozen=True)
class Blob:
    """Content plus the media type it is referenced with. ``diff_id`` is set for layers:
    the digest of the uncompressed tar, as listed in the config's ``rootfs.diff_ids``."""

    media_type: str
    data: bytes = field(repr=False)
    diff_id: str | None = None

    @property
    def digest(self) -> str:
        return digest_of(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, media_type: str | None = None) -> dict[str, Any]:
        return {
            "mediaType": media_type or self.media_type,
            "digest": self.digest,
            "size": self.size,
        }


@dataclass(frozen=True)
class Platform:
    architecture: str
    os: str = "linux"
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        doc = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            doc["variant"] = self.variant
        return doc


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest bytes (kept as built), config and layers."""

    format: Format
    manifest: bytes = field(repr=False)
    config: Blob
    layers: tuple[Blob, ...]
    platform: Platform

    @property
    def media_type(self) -> str:
        return self.format.manifest

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config and layers (everything the manifest references)."""
        return (self.config, *self.layers)

    def contents(self) -> dict[str, bytes]:
        """Every content-addressed object (manifest, config, layers): digest -> bytes."""
        return {self.digest: self.manifest, **{blob.digest: blob.data for blob in self.blobs}}

    def descriptor(self, *, with_platform: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
        }
        if with_platform:
            doc["platform"] = self.platform.as_json()
        return doc


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list over ``children``."""

    format: Format
    manifest: bytes = field(repr=False)
    children: tuple[Image, ...]

    @property
    def media_type(self) -> str:
        return self.format.index

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Every distinct config and layer of every child (shared layers once), in order."""
        seen: dict[str, Blob] = {}
        for child in self.children:
            for blob in child.blobs:
                seen.setdefault(blob.digest, blob)
        return tuple(seen.values())

    def contents(self) -> dict[str, bytes]:
        """Every content-addressed object (this index, the children's manifests, configs and
        layers): digest -> bytes."""
        objects = {self.digest: self.manifest}
        for child in self.children:
            objects.update(child.contents())
        return objects

    def child(self, architecture: str) -> Image:
        for image in self.children:
            if image.platform.architecture == architecture:
                return image
        raise KeyError(architecture)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}


#: Anything a reference can name: a single image, or an index / manifest list.
Artifact = Image | Index


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed, reproducible tar of ``files`` (path -> content), parents included.

    Entries are sorted, owned by 0:0, dated ``CREATED``; directories 0755, files 0644
    (0755 under ``bin/``). Paths are relative (``etc/hosts``), as in real image layers.
    """
    dirs: set[str] = set()
    for path in files:
        parts = path.strip("/").split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(dirs | {p.strip("/") for p in files}):
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = _MTIME, 0, 0, "root", "root"
            content = files.get(name, files.get("/" + name))
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode = 0o755 if name.startswith("bin/") else 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def build_layer(files: Mapping[str, bytes], fmt: Format = OCI) -> Blob:
    """A gzip-compressed tar layer of ``files`` with its ``diff_id``."""
    tar = layer_tar(files)
    return Blob(fmt.layer_gzip, gzip.compress(tar, compresslevel=6, mtime=0), digest_of(tar))


def _config(
    layers: Iterable[Blob], platform: Platform, labels: Mapping[str, str]
) -> dict[str, Any]:
    diff_ids = [layer.diff_id for layer in layers]
    if None in diff_ids:
        raise ValueError("every layer needs a diff_id (build layers with build_layer)")
    doc: dict[str, Any] = {"created": CREATED, "author": "bastion-registry tests"}
    doc.update(platform.as_json())
    doc["config"] = {
        "Env": [_PATH_ENV],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/",
        "Labels": dict(labels),
    }
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    doc["history"] = [
        {"created": CREATED, "created_by": f"tests/images.py: layer {i}"}
        for i in range(len(diff_ids))
    ]
    return doc


def build_image(
    layers: Iterable[Blob],
    *,
    architecture: str = "amd64",
    os_name: str = "linux",
    variant: str | None = None,
    fmt: Format = OCI,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """An image of ``layers`` (bottom first) for one platform, with a valid image config.

    Layers built for the other format are referenced with this format's layer media type
    (the bytes are the same gzip tar either way). ``annotations`` are OCI only.
    """
    layers = tuple(
        layer
        if layer.media_type == fmt.layer_gzip
        else Blob(fmt.layer_gzip, layer.data, layer.diff_id)
        for layer in layers
    )
    platform = Platform(architecture, os_name, variant)
    config = Blob(fmt.config, _serialise(_config(layers, platform, labels or {})))
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": fmt.manifest,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        if fmt is not OCI:
            raise ValueError("annotations are an OCI manifest field")
        doc["annotations"] = dict(annotations)
    return Image(fmt, _serialise(doc), config, layers, platform)


def build_index(children: Iterable[Image], *, fmt: Format = OCI) -> Index:
    """An image index (OCI) or manifest list (Docker) over ``children``, each with its
    ``platform``. Children must be of the same format."""
    children = tuple(children)
    if any(child.format is not fmt for child in children):
        raise ValueError(f"children of a {fmt.name} index must be {fmt.name} images")
    doc = {
        "schemaVersion": 2,
        "mediaType": fmt.index,
        "manifests": [child.descriptor(with_platform=True) for child in children],
    }
    return Index(fmt, _serialise(doc), children)


#: Variants that clients expect for an architecture when selecting from an index.
_VARIANTS: Final = {"arm64": "v8", "arm": "v7"}


def sample_image(
    name: str,
    *,
    architecture: str = "amd64",
    fmt: Format = OCI,
    layer_count: int = 2,
    payload_size: int = 64 * 1024,
) -> Image:
    """A small image whose content is derived from ``name``: a base layer with a few text
    files and, if ``layer_count`` is 2, an application layer with ``payload_size``
    incompressible bytes. Different names give disjoint content."""
    if layer_count not in (1, 2):
        raise ValueError("layer_count must be 1 or 2")
    layers = [build_layer(_base_files(name), fmt)]
    if layer_count == 2:
        layers.append(build_layer(_app_files(name, architecture, payload_size), fmt))
    return build_image(
        layers,
        architecture=architecture,
        variant=_VARIANTS.get(architecture),
        fmt=fmt,
        labels={"io.bastion.test.name": name},
    )


def multi_arch_index(
    name: str,
    *,
    architectures: Iterable[str] = ("amd64", "arm64", "s390x"),
    fmt: Format = OCI,
    payload_size: int = 32 * 1024,
) -> Index:
    """An index whose children (one per architecture) share one base layer (same digest) and
    each add their own application layer and config."""
    base = build_layer(_base_files(name), fmt)
    children = [
        build_image(
            [base, build_layer(_app_files(name, arch, payload_size), fmt)],
            architecture=arch,
            variant=_VARIANTS.get(arch),
            fmt=fmt,
            labels={"io.bastion.test.name": name},
        )
        for arch in architectures
    ]
    return build_index(children, fmt=fmt)


def _base_files(name: str) -> dict[str, bytes]:
    return {
        "etc/os-release": f'ID=synthetic\nNAME="bastion test image {name}"\n'.encode(),
        "etc/hostname": b"synthetic\n",
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
        "usr/share/bastion/name": name.encode() + b"\n",
    }


def _app_files(name: str, architecture: str, payload_size: int) -> dict[str, bytes]:
    return {
        "app/architecture": architecture.encode() + b"\n",
        "app/payload.bin": pseudo_random(f"{name}/{architecture}", payload_size),
    }


# --- on-disk formats --------------------------------------------------------------------------


def _write_blob(blobs_dir: Path, digest: str, data: bytes) -> None:
    path = blobs_dir / digest.removeprefix("sha256:")
    if not path.exists():
        path.write_bytes(data)


def write_oci_layout(directory: str | os.PathLike[str], refs: Mapping[str, Artifact]) -> Path:
    """Write an OCI image layout (image-spec ``image-layout.md``) holding ``refs``, each
    named in ``index.json`` by ``org.opencontainers.image.ref.name`` so that skopeo can
    address it as ``oci:DIR:REF``. Returns the directory.

    A Docker manifest list is written like an index (its descriptor keeps its own media
    type), which is valid for the layout but which skopeo 1.9 does not read ("no descriptor
    found for reference"): hand Docker lists to skopeo with ``write_dir_transport``."""
    root = Path(directory)
    blobs_dir = root / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descriptors = []
    for ref, artifact in refs.items():
        images = artifact.children if isinstance(artifact, Index) else (artifact,)
        for image in images:
            for blob in image.blobs:
                _write_blob(blobs_dir, blob.digest, blob.data)
            _write_blob(blobs_dir, image.digest, image.manifest)
        if isinstance(artifact, Index):
            _write_blob(blobs_dir, artifact.digest, artifact.manifest)
        descriptors.append({**artifact.descriptor(), "annotations": {_OCI_REF_NAME: ref}})
    index = {"schemaVersion": 2, "mediaType": OCI.index, "manifests": descriptors}
    (root / "index.json").write_bytes(_serialise(index))
    return root


def read_oci_layout(directory: str | os.PathLike[str], ref: str) -> tuple[bytes, dict[str, bytes]]:
    """The manifest bytes named ``ref`` in an OCI layout and every blob in the layout
    (digest -> bytes), as written by ``skopeo copy ... oci:DIR:REF``."""
    root = Path(directory)
    index = json.loads((root / "index.json").read_bytes())
    matches = [d for d in index["manifests"] if d.get("annotations", {}).get(_OCI_REF_NAME) == ref]
    if len(matches) != 1:
        raise KeyError(f"{ref!r} names {len(matches)} manifests in {root}/index.json")
    blobs = {"sha256:" + p.name: p.read_bytes() for p in (root / "blobs" / "sha256").iterdir()}
    return blobs[matches[0]["digest"]], blobs


def write_dir_transport(directory: str | os.PathLike[str], artifact: Artifact) -> Path:
    """Write ``artifact`` in the layout of skopeo's ``dir:`` transport (version 1.1):
    ``manifest.json``, one file per blob named by its hex digest, and ``version``. An index
    or manifest list is written as ``skopeo copy --all`` does: its children's manifests as
    ``<hex>.manifest.json``. (skopeo 1.9 reads only OCI manifests and indexes from an OCI
    layout, so this is the way to hand it a Docker manifest list.)"""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for blob in artifact.blobs:
        _write_blob(root, blob.digest, blob.data)
    if isinstance(artifact, Index):
        for child in artifact.children:
            hex_digest = child.digest.removeprefix("sha256:")
            (root / f"{hex_digest}.manifest.json").write_bytes(child.manifest)
    (root / "manifest.json").write_bytes(artifact.manifest)
    (root / "version").write_text(_DIR_TRANSPORT_VERSION)
    return root


def read_dir_transport(directory: str | os.PathLike[str]) -> tuple[bytes, dict[str, bytes]]:
    """``manifest.json`` and the blobs (digest -> bytes) of a ``dir:`` transport directory.
    Per-instance manifests written by ``--all`` (``<hex>.manifest.json``) count as blobs."""
    root = Path(directory)
    if (root / "version").read_text() != _DIR_TRANSPORT_VERSION:
        raise ValueError(f"{root}: unexpected dir transport version")
    blobs: dict[str, bytes] = {}
    for path in root.iterdir():
        hex_digest = path.name.removesuffix(".manifest.json")
        if len(hex_digest) == 64 and all(c in "0123456789abcdef" for c in hex_digest):
            blobs["sha256:" + hex_digest] = path.read_bytes()
    return (root / "manifest.json").read_bytes(), blobs
