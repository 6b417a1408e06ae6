"""Synthetic OpenShift release payloads, their upstream repositories and their signatures.

Everything is built offline and deterministically on top of ``tests/images.py`` (see
``/work/shared/OCP-RELEASE.md``, last section, for what a realistic payload needs). A release is:

* tens of **component images** in ``openshift-release-dev/ocp-v4.0-art-dev``, pushed by digest
  only: mostly Docker schema2, every sixth one OCI, plus two multi-arch components (``cli``, a
  Docker manifest list, and ``must-gather``, an OCI index) with amd64, arm64/v8 and s390x
  children. Every image starts with the same base layer (shared across components and list
  children); operators share a second layer, everything else another one;
* the **release image** ``openshift-release-dev/ocp-release:<version>-<arch>``, a Docker schema2
  image built as ``oc adm release new`` does: the cluster-version-operator image's layers (same
  blobs as that component), a layer with ``manifests/`` and a *stale*
  ``release-manifests/image-references``, and the top layer with ``release-manifests/``
  (``image-references``, ``release-metadata``, the ``release-verification`` ConfigMap and one
  ``0000_*.yaml`` manifest). A reader that walks layers top to bottom and keeps the first copy
  (as ``oc`` does, ``read_release_manifests``) sees the current ``image-references``; one that
  lets lower layers win sees the stale one.

Image references always name ``quay.io/openshift-release-dev/...``, whatever host the test
upstream really listens on: tests map ``quay.io`` to it through bastion's upstream config.

Usage::

    base = build_release("4.99.0")
    release = build_release("4.99.1", base=base)       # most components shared with 4.99.0
    push_release(base, client); push_release(release, client)   # client: RegistryClient
    release.components["etcd"]                        # "sha256:..."
    with sign_release(release, tmp_path) as store:    # throwaway GPG key + HTTP store
        urllib.request.urlopen(f"{store.url}/sha256={hex}/signature-1")
        store.verify(store.read(release.release_digest))["critical"]

Building is pure Python (tens of milliseconds for 40 components); the same arguments give the
same bytes and digests on every run. The ``release-verification`` ConfigMap carries a fixed
public key (``DEFAULT_VERIFICATION_KEY``, whose secret half was discarded) unless
``verification_key`` is given: to get a payload whose key verifies the signatures, generate the
key first (``SigningKey.generate()``), build with ``verification_key=key.public_key`` and sign
with ``sign_release(..., key=key)``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import pytest

from tests.images import (
    CREATED,
    DOCKER,
    OCI,
    Artifact,
    Blob,
    Format,
    Image,
    Index,
    build_image,
    build_index,
    build_layer,
    digest_of,
    pseudo_random,
)

if TYPE_CHECKING:
    from tests.upstream import RegistryClient

__all__ = [
    "QUAY",
    "RELEASE_REPO",
    "COMPONENT_REPO",
    "RELEASE_SOURCE",
    "COMPONENT_SOURCE",
    "ARCHITECTURES",
    "LIST_ARCHITECTURES",
    "DOCKER_LIST_COMPONENT",
    "OCI_INDEX_COMPONENT",
    "DEFAULT_SEED",
    "DEFAULT_VERIFICATION_KEY",
    "IMAGE_REFERENCES",
    "RELEASE_METADATA",
    "VERIFICATION_CONFIGMAP",
    "EXTRA_MANIFEST",
    "Manifest",
    "Release",
    "PushStats",
    "component_names",
    "build_release",
    "push_release",
    "read_release_manifests",
    "SignatureError",
    "SigningKey",
    "SignatureStore",
    "signature_body",
    "sign_release",
    "release_signer",
]

QUAY: Final = "quay.io"
RELEASE_REPO: Final = "openshift-release-dev/ocp-release"
COMPONENT_REPO: Final = "openshift-release-dev/ocp-v4.0-art-dev"
#: The two sources an ICSP / IDMS / install-config snippet must map to the mirror.
RELEASE_SOURCE: Final = f"{QUAY}/{RELEASE_REPO}"
COMPONENT_SOURCE: Final = f"{QUAY}/{COMPONENT_REPO}"

#: Release architecture (as in the tag ``4.99.1-x86_64``) -> image platform architecture.
ARCHITECTURES: Final = MappingProxyType(
    {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}
)
LIST_ARCHITECTURES: Final = ("amd64", "arm64", "s390x")
DOCKER_LIST_COMPONENT: Final = "cli"
OCI_INDEX_COMPONENT: Final = "must-gather"
DEFAULT_SEED: Final = "bastion-synthetic-release"

#: Paths in the release image (all under ``release-manifests/``, in the top layer).
IMAGE_REFERENCES: Final = "release-manifests/image-references"
RELEASE_METADATA: Final = "release-manifests/release-metadata"
VERIFICATION_CONFIGMAP: Final = (
    "release-manifests/0000_90_cluster-version-operator_02_release-verification.yaml"
)
EXTRA_MANIFEST: Final = "release-manifests/0000_50_cluster-ingress-operator_00-namespace.yaml"

_VARIANTS: Final = {"arm64": "v8"}
_SIGNATURE_TIMESTAMP: Final = 1704067200  # CREATED as a Unix time

#: An RSA 2048 public key generated once for these tests; its secret key was thrown away, so
#: nothing verifies against it. It is what the release-verification ConfigMap carries unless
#: ``build_release(verification_key=...)`` says otherwise.
#: Fingerprint 384337A90027358C9DE3FAA550178B9D4B1C8528.
DEFAULT_VERIFICATION_KEY: Final = """\
-----BEGIN PGP PUBLIC KEY BLOCK-----

mQENBGWSAIABCADeKEtAoDxYQ4qCuQyEzw7V6/tYLwbH/w3KYhmAQ6OlWDAWgHzU
/b0qHEiiYbKanfqwGSpCRJcnTayc9bHZLCFfdQzjtncM7J30djoBvCTWDk6g67eI
elWQZDc18sroMYxHdyHdoBOy17tPDtSgZyJvxBo+/qWCkrOqWNnmbZ8G6/tu4kds
kbjl+rnuAzeG2ub7MlbtKTiBMopCbi4IEH4fYPd8VICpGylRHoaZkvxy5DAt4xbC
u9BUHQ3RQn5Iu+1I7Hkk0OD4OkLxcNg0Q9/rszza5Tya2iVNVGxRy0JUbIWj54m2
dWO8G/bM2YqMwJD+6hvIeJmS3gO8SjWP21JVABEBAAG0aUJhc3Rpb24gU3ludGhl
dGljIFJlbGVhc2UgS2V5IChwdWJsaWMgcGFydCBvbmx5OyB0aGUgc2VjcmV0IGtl
eSB3YXMgZGlzY2FyZGVkKSA8cmVsZWFzZS1rZXlAYmFzdGlvbi50ZXN0PokBTgQT
AQoAOBYhBDhDN6kAJzWMneP6pVAXi51LHIUoBQJlkgCAAhsDBQsJCAcCBhUKCQgL
AgQWAgMBAh4BAheAAAoJEFAXi51LHIUo+S0IAL2edH6lo27glsCZ0zC3C50vKZdj
vppShO6NiuPPYPEDgTPfHR4F98J0FLD3hKqCYL+i2hcaZnY/RG9xQ8G+RC6wi3+a
HcWfVYA+NpvoFqwBUbDpkpoFQUaltYrGFUrZOK8U2pRMVfyF29fhX1VLOJ44p/3y
NirxNO+RNzplIy7F87DxAwIs6yOJ1A0ypHfkjxAQ7DCHCJ6JcvXOocDQnciJE6H8
JZcNUHgM+Y06tIVcAmDjGpNr4qHhXjxG7+zry113CFqwi14ZLfJzMRe5QhpfjPT/
7H1TVNIQVVifO6OMpk6nP825nG01NJzmbfchKV6lEzy1ymLTkFm7TG8YjUo=
=+y1Z
-----END PGP PUBLIC KEY BLOCK-----
"""

# --- component names ---------------------------------------------------------------------------

#: Real payload component names (tags of image-references), the multi-arch ones early so that
#: every release of at least 6 components has both.
_NAMES: Final = (
    "cluster-version-operator",
    "etcd",
    "machine-config-operator",
    "installer",
    DOCKER_LIST_COMPONENT,
    OCI_INDEX_COMPONENT,
    "hyperkube",
    "tools",
    "pod",
    "oauth-server",
    "oauth-proxy",
    "console",
    "console-operator",
    "haproxy-router",
    "coredns",
    "cluster-authentication-operator",
    "cluster-kube-apiserver-operator",
    "cluster-kube-controller-manager-operator",
    "cluster-kube-scheduler-operator",
    "cluster-etcd-operator",
    "cluster-network-operator",
    "cluster-ingress-operator",
    "cluster-dns-operator",
    "cluster-image-registry-operator",
    "cluster-storage-operator",
    "cluster-monitoring-operator",
    "cluster-samples-operator",
    "cluster-node-tuning-operator",
    "cluster-openshift-apiserver-operator",
    "cluster-openshift-controller-manager-operator",
    "cluster-config-operator",
    "cluster-machine-approver",
    "cluster-autoscaler",
    "cluster-autoscaler-operator",
    "cluster-policy-controller",
    "docker-registry",
    "insights-operator",
    "machine-api-operator",
    "multus-cni",
    "ovn-kubernetes",
    "prometheus",
    "prometheus-operator",
    "prometheus-alertmanager",
    "thanos",
    "kube-state-metrics",
    "prometheus-node-exporter",
    "openshift-apiserver",
    "openshift-controller-manager",
    "kube-rbac-proxy",
    "csi-snapshot-controller",
    "service-ca-operator",
    "operator-lifecycle-manager",
    "operator-registry",
    "network-tools",
    "driver-toolkit",
    "rhel-coreos",
    "baremetal-installer",
    "installer-artifacts",
    "cli-artifacts",
    "tests",
)
_PROVIDERS: Final = (
    "aws",
    "azure",
    "gcp",
    "vsphere",
    "openstack",
    "ibm",
    "nutanix",
    "ovirt",
    "powervs",
    "alibaba",
)
_PROVIDER_KINDS: Final = (
    "cloud-controller-manager",
    "csi-driver",
    "csi-driver-operator",
    "machine-controllers",
    "cluster-api-controllers",
)


def component_names(count: int) -> tuple[str, ...]:
    """The first ``count`` component names: real ones, then ``<provider>-<kind>`` (``aws-csi-driver``),
    then ``synthetic-component-NNN``."""
    names = list(_NAMES)
    names += [f"{p}-{k}" for k in _PROVIDER_KINDS for p in _PROVIDERS]
    names += [f"synthetic-component-{i:03d}" for i in range(len(names), count)]
    return tuple(names[:count])


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One manifest to push: exact bytes, where it goes and what it references."""

    repo: str
    digest: str
    data: bytes = field(repr=False)
    media_type: str
    children: tuple[str, ...] = ()  # manifest digests (lists and indexes)
    blobs: tuple[str, ...] = ()  # config and layer digests (images)
    tag: str | None = None  # only the release image
    component: str | None = None  # the component name (children too); None for the release
    platform: Mapping[str, str] | None = None  # list children only

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_list(self) -> bool:
        return self.media_type in (OCI.index, DOCKER.index)


@dataclass(frozen=True)
class Release:
    """A built release payload (``build_release``). Mappings are read-only."""

    version: str
    arch: str
    seed: str
    base_version: str | None
    release_image: Image
    #: component name -> image or list/index, in image-references order (sorted by name)
    component_images: Mapping[str, Artifact]
    #: component name -> the version it was (re)built for (``version`` unless shared with a base)
    builds: Mapping[str, str]
    #: components whose digest differs from ``base`` (empty without a base)
    changed: tuple[str, ...]
    #: every manifest in push order (children before their list, the release image last)
    manifests: tuple[Manifest, ...]
    #: every blob (configs and layers): digest -> bytes
    blobs: Mapping[str, bytes] = field(repr=False)
    #: blob digest -> repositories that reference it (layers of the CVO are in both)
    blob_repos: Mapping[str, frozenset[str]] = field(repr=False)
    #: the files of the release image's top layer (path -> bytes)
    release_files: Mapping[str, bytes] = field(repr=False)
    #: the stale image-references of the lower layer
    stale_image_references: bytes = field(repr=False)
    verification_key: str = field(repr=False)

    # names and references

    @property
    def release_tag(self) -> str:
        return f"{self.version}-{self.arch}"

    @property
    def release_repo(self) -> str:
        return RELEASE_REPO

    @property
    def component_repo(self) -> str:
        return COMPONENT_REPO

    @property
    def release_reference(self) -> str:
        """``quay.io/openshift-release-dev/ocp-release:<version>-<arch>`` (what is signed)."""
        return f"{RELEASE_SOURCE}:{self.release_tag}"

    @property
    def release_pullspec(self) -> str:
        """``quay.io/openshift-release-dev/ocp-release@sha256:...``."""
        return f"{RELEASE_SOURCE}@{self.release_digest}"

    def component_pullspec(self, name: str) -> str:
        """``quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:...`` (as in image-references)."""
        return f"{COMPONENT_SOURCE}@{self.components[name]}"

    # the release image

    @property
    def release_digest(self) -> str:
        return self.release_image.digest

    @property
    def release_manifest(self) -> bytes:
        return self.release_image.manifest

    @property
    def release_media_type(self) -> str:
        return self.release_image.media_type

    @property
    def image_references(self) -> bytes:
        return self.release_files[IMAGE_REFERENCES]

    @property
    def release_metadata(self) -> bytes:
        return self.release_files[RELEASE_METADATA]

    @property
    def verification_configmap(self) -> bytes:
        return self.release_files[VERIFICATION_CONFIGMAP]

    @property
    def top_layer(self) -> Blob:
        return self.release_image.layers[-1]

    @property
    def stale_layer(self) -> Blob:
        return self.release_image.layers[-2]

    # components

    @property
    def components(self) -> dict[str, str]:
        """Component name -> digest (of the list/index for multi-arch components)."""
        return {name: artifact.digest for name, artifact in self.component_images.items()}

    @property
    def multi_arch(self) -> dict[str, Index]:
        return {n: a for n, a in self.component_images.items() if isinstance(a, Index)}

    def manifest(self, digest: str) -> Manifest:
        for manifest in self.manifests:
            if manifest.digest == digest:
                return manifest
        raise KeyError(digest)

    def manifests_in(self, repo: str) -> tuple[Manifest, ...]:
        return tuple(m for m in self.manifests if m.repo == repo)

    def blobs_in(self, repo: str) -> dict[str, bytes]:
        return {d: data for d, data in self.blobs.items() if repo in self.blob_repos[d]}

    def new_blobs(self, since: Release) -> dict[str, bytes]:
        """Blobs of this release that ``since`` does not have (what an increment must carry)."""
        return {d: data for d, data in self.blobs.items() if d not in since.blobs}

    # totals

    @property
    def blob_bytes(self) -> int:
        return sum(len(data) for data in self.blobs.values())

    @property
    def manifest_bytes(self) -> int:
        return sum(m.size for m in self.manifests)

    @property
    def total_bytes(self) -> int:
        return self.blob_bytes + self.manifest_bytes

    @property
    def blob_count(self) -> int:
        return len(self.blobs)

    @property
    def manifest_count(self) -> int:
        return len(self.manifests)

    def summary(self) -> str:
        lists = len(self.multi_arch)
        return (
            f"{self.release_reference} {self.release_digest}: {len(self.component_images)} "
            f"components ({lists} multi-arch), {self.manifest_count} manifests, "
            f"{self.blob_count} blobs, {self.total_bytes} bytes"
        )


# --- building ----------------------------------------------------------------------------------


def _hash_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big")


def _dump_json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def _commit(seed: str, name: str, build: str) -> str:
    return hashlib.sha1(f"{seed}/{name}/{build}".encode()).hexdigest()


def _source_location(name: str) -> str:
    return f"https://github.com/openshift/{name}"


class _Builder:
    """Builds the layers and images of one seed (shared layers built once)."""

    def __init__(self, seed: str, payload_size: int) -> None:
        self.seed = seed
        self.payload_size = payload_size
        self.base_layer = build_layer(
            {
                "etc/os-release": b'NAME="Synthetic Enterprise Linux"\nID="synthetic"\n'
                b'VERSION_ID="9.2"\n',
                "etc/passwd": b"root:x:0:0:root:/root:/bin/bash\n",
                "etc/pki/ca-trust/source/anchors/.keep": b"",
                "usr/lib/base/libsynthetic.so": pseudo_random(f"{seed}/base", 4 * payload_size),
            },
            DOCKER,
        )
        self.group_layers = {
            group: build_layer(
                {
                    f"usr/share/openshift/{group}/runtime.bin": pseudo_random(
                        f"{seed}/group/{group}", 2 * payload_size
                    ),
                },
                DOCKER,
            )
            for group in ("operator", "runtime")
        }

    def group(self, name: str) -> str:
        return "operator" if "operator" in name else "runtime"

    def image(self, name: str, build: str, architecture: str, fmt: Format) -> Image:
        size = self.payload_size // 2 + _hash_int(self.seed, name) % self.payload_size
        app = build_layer(
            {
                f"usr/bin/{name}": pseudo_random(
                    f"{self.seed}/{name}/{build}/{architecture}", size
                ),
                f"usr/share/openshift/{name}/build": f"{name} {build} {architecture}\n".encode(),
            },
            fmt,
        )
        labels = {
            "com.redhat.component": f"ose-{name}-container",
            "io.openshift.build.commit.id": _commit(self.seed, name, build),
            "io.openshift.build.source-location": _source_location(name),
            "io.openshift.release.operator": "true" if "operator" in name else "false",
            "name": f"openshift/ose-{name}",
            "version": f"v{build}",
            "vendor": "bastion-registry tests",
        }
        return build_image(
            [self.base_layer, self.group_layers[self.group(name)], app],
            architecture=architecture,
            variant=_VARIANTS.get(architecture),
            fmt=fmt,
            labels=labels,
        )

    def component(
        self, name: str, build: str, architecture: str, position: int, base: Artifact | None
    ) -> Artifact:
        """A fresh component; ``base`` is the previous build of a changed component (a
        changed Docker list keeps its non-amd64 children, to exercise child dedupe)."""
        if name in (DOCKER_LIST_COMPONENT, OCI_INDEX_COMPONENT):
            fmt = DOCKER if name == DOCKER_LIST_COMPONENT else OCI
            children = []
            for arch in LIST_ARCHITECTURES:
                if isinstance(base, Index) and arch != "amd64":
                    children.append(base.child(arch))
                else:
                    children.append(self.image(name, build, arch, fmt))
            return build_index(children, fmt=fmt)
        fmt = OCI if position % 6 == 3 else DOCKER
        return self.image(name, build, architecture, fmt)


def _image_references(version: str, tags: Iterable[tuple[str, str, str]], seed: str) -> bytes:
    """The ImageStream ``oc adm release new`` writes; ``tags`` are (name, digest, build)."""
    doc = {
        "kind": "ImageStream",
        "apiVersion": "image.openshift.io/v1",
        "metadata": {
            "name": version,
            "creationTimestamp": CREATED,
            "annotations": {"release.openshift.io/from-image-stream": f"ocp/{version}-art-latest"},
        },
        "spec": {
            "lookupPolicy": {"local": False},
            "tags": [
                {
                    "name": name,
                    "annotations": {
                        "io.openshift.build.commit.id": _commit(seed, name, build),
                        "io.openshift.build.commit.ref": "",
                        "io.openshift.build.source-location": _source_location(name),
                    },
                    "from": {"kind": "DockerImage", "name": f"{COMPONENT_SOURCE}@{digest}"},
                    "generation": None,
                    "importPolicy": {},
                    "referencePolicy": {"type": "Source"},
                }
                for name, digest, build in tags
            ],
        },
        "status": {"dockerImageRepository": ""},
    }
    return _dump_json(doc)


def _release_metadata(version: str, previous: Sequence[str], channel: str) -> bytes:
    return _dump_json(
        {
            "kind": "cincinnati-metadata-v0",
            "version": version,
            "previous": list(previous),
            "next": [],
            "metadata": {
                "url": f"https://access.redhat.com/errata/RHBA-2099:{_hash_int(version) % 10000:04d}",
                "io.openshift.upgrades.graph.release.channels": channel,
            },
        }
    )


def _verification_configmap(public_key: str) -> bytes:
    key_lines = "".join(
        f"    {line}\n" if line else "\n" for line in public_key.strip().split("\n")
    )
    return (
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: release-verification\n"
        "  namespace: openshift-config-managed\n"
        "  annotations:\n"
        '    include.release.openshift.io/self-managed-high-availability: "true"\n'
        '    include.release.openshift.io/single-node-developer: "true"\n'
        '    release.openshift.io/verification-config-map: ""\n'
        "data:\n"
        "  verifier-public-key-bastion-test: |\n"
        f"{key_lines}"
        "  store-openshift-official-release: "
        "https://mirror.openshift.com/pub/openshift-v4/signatures/openshift/release\n"
        "  store-openshift-official-release-mirror: "
        "https://storage.googleapis.com/openshift-release/official/signatures/openshift/release\n"
    ).encode()


_EXTRA_MANIFEST_YAML: Final = b"""\
apiVersion: v1
kind: Namespace
metadata:
  name: openshift-ingress-operator
  annotations:
    include.release.openshift.io/self-managed-high-availability: "true"
    include.release.openshift.io/single-node-developer: "true"
    openshift.io/node-selector: ""
    workload.openshift.io/allowed: management
  labels:
    openshift.io/cluster-monitoring: "true"
"""

_CVO_MANIFESTS: Final = {
    "manifests/0000_00_cluster-version-operator_01_clusterversion.crd.yaml": b"""\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: clusterversions.config.openshift.io
spec:
  group: config.openshift.io
  names: {kind: ClusterVersion, plural: clusterversions, singular: clusterversion}
  scope: Cluster
""",
    "manifests/0000_00_cluster-version-operator_03_deployment.yaml": b"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: cluster-version-operator
  namespace: openshift-cluster-version
spec:
  selector: {matchLabels: {k8s-app: cluster-version-operator}}
  template:
    metadata: {labels: {k8s-app: cluster-version-operator}}
    spec:
      containers:
      - name: cluster-version-operator
        image: '{{.ReleaseImage}}'
        args: [start, --release-image={{.ReleaseImage}}]
""",
}


def _changed_components(names: Sequence[str], base: Release, seed: str, version: str) -> set[str]:
    shared = [n for n in names if n in base.component_images]
    wanted = max(3, len(shared) // 10)
    changed = {n for n in ("machine-config-operator", DOCKER_LIST_COMPONENT) if n in shared}
    others = sorted(
        (
            n
            for n in shared
            if n not in changed and n not in base.multi_arch and n != "cluster-version-operator"
        ),
        key=lambda n: _hash_int(seed, version, n),
    )
    changed.update(others[: max(0, wanted - len(changed))])
    return changed


def build_release(
    version: str = "4.99.1",
    arch: str = "x86_64",
    components: int = 40,
    seed: str | None = None,
    base: Release | None = None,
    *,
    changed: Iterable[str] | None = None,
    previous: Sequence[str] | None = None,
    channel: str | None = None,
    payload_size: int = 16 * 1024,
    verification_key: str | None = None,
) -> Release:
    """Build a release payload (nothing is pushed; see ``push_release``).

    ``components`` (at least 6) component images named by ``component_names``. With ``base``
    (an earlier release of the same seed, which ``seed`` defaults to), every component of
    ``base`` is reused as is (same digests) except ``changed`` (default: machine-config-operator,
    the ``cli`` manifest list, whose arm64 and s390x children stay the same, and a few more
    picked deterministically, about 10%); ``previous`` defaults to ``[base.version]``.
    ``payload_size`` scales the layers (base layer 4x, shared group layers 2x, application
    layers 0.5x-1.5x). ``channel`` defaults to ``stable-<major>.<minor>``."""
    if components < 6:
        raise ValueError("a release needs at least 6 components (both multi-arch ones)")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown release architecture {arch!r} (one of {sorted(ARCHITECTURES)})")
    if seed is None:
        seed = base.seed if base is not None else DEFAULT_SEED
    elif base is not None and seed != base.seed:
        raise ValueError("a release built on a base uses the base's seed")
    if base is not None and base.arch != arch:
        raise ValueError("a release built on a base has the base's architecture")
    platform_arch = ARCHITECTURES[arch]
    builder = _Builder(seed, payload_size)
    names = component_names(components)

    if base is None:
        changed_set: set[str] = set()
    elif changed is None:
        changed_set = _changed_components(names, base, seed, version)
    else:
        changed_set = set(changed)
        unknown = changed_set - set(base.component_images)
        if unknown:
            raise ValueError(f"changed components not in the base: {sorted(unknown)}")

    artifacts: dict[str, Artifact] = {}
    builds: dict[str, str] = {}
    for position, name in enumerate(names):
        previous_build = base.component_images.get(name) if base is not None else None
        if base is not None and previous_build is not None and name not in changed_set:
            artifacts[name], builds[name] = previous_build, base.builds[name]
        else:
            artifacts[name] = builder.component(
                name, version, platform_arch, position, previous_build
            )
            builds[name] = version
    changed_names = tuple(
        sorted(
            n
            for n in names
            if base is not None
            and n in base.component_images
            and base.component_images[n].digest != artifacts[n].digest
        )
    )
    ordered = sorted(artifacts)

    # The release image: the CVO image plus the stale layer plus release-manifests/.
    cvo = artifacts["cluster-version-operator"]
    assert isinstance(cvo, Image)
    image_references = _image_references(
        version, [(n, artifacts[n].digest, builds[n]) for n in ordered], seed
    )
    stale_names = [*ordered[: max(1, len(ordered) // 3)], "removed-in-this-release"]
    stale_references = _image_references(
        version, [(n, digest_of(f"stale/{seed}/{n}".encode()), "stale") for n in stale_names], seed
    )
    major_minor = ".".join(version.split(".")[:2])
    release_files = {
        IMAGE_REFERENCES: image_references,
        RELEASE_METADATA: _release_metadata(
            version,
            previous if previous is not None else ([base.version] if base is not None else []),
            channel or f"stable-{major_minor}",
        ),
        VERIFICATION_CONFIGMAP: _verification_configmap(
            verification_key or DEFAULT_VERIFICATION_KEY
        ),
        EXTRA_MANIFEST: _EXTRA_MANIFEST_YAML,
    }
    stale_layer = build_layer({**_CVO_MANIFESTS, IMAGE_REFERENCES: stale_references}, DOCKER)
    top_layer = build_layer(release_files, DOCKER)
    release_image = build_image(
        [*cvo.layers, stale_layer, top_layer],
        architecture=platform_arch,
        variant=_VARIANTS.get(platform_arch),
        fmt=DOCKER,
        labels={
            "io.openshift.release": version,
            "io.openshift.release.base-image-digest": cvo.digest,
            "io.openshift.build.commit.id": _commit(
                seed, "cluster-version-operator", builds["cluster-version-operator"]
            ),
            "io.openshift.build.source-location": _source_location("cluster-version-operator"),
        },
    )

    # Manifests in push order, and every blob with the repositories that reference it.
    manifests: list[Manifest] = []
    blobs: dict[str, bytes] = {}
    blob_repos: dict[str, set[str]] = {}

    def add_image(
        image: Image, repo: str, component: str | None, *, tag: str | None = None, child: bool
    ) -> None:
        for blob in image.blobs:
            blobs.setdefault(blob.digest, blob.data)
            blob_repos.setdefault(blob.digest, set()).add(repo)
        manifests.append(
            Manifest(
                repo,
                image.digest,
                image.manifest,
                image.media_type,
                blobs=tuple(b.digest for b in image.blobs),
                tag=tag,
                component=component,
                platform=MappingProxyType(image.platform.as_json()) if child else None,
            )
        )

    for name in ordered:
        artifact = artifacts[name]
        if isinstance(artifact, Index):
            for child in artifact.children:
                add_image(child, COMPONENT_REPO, name, child=True)
            manifests.append(
                Manifest(
                    COMPONENT_REPO,
                    artifact.digest,
                    artifact.manifest,
                    artifact.media_type,
                    children=tuple(c.digest for c in artifact.children),
                    component=name,
                )
            )
        else:
            add_image(artifact, COMPONENT_REPO, name, child=False)
    add_image(release_image, RELEASE_REPO, None, tag=f"{version}-{arch}", child=False)

    return Release(
        version=version,
        arch=arch,
        seed=seed,
        base_version=base.version if base is not None else None,
        release_image=release_image,
        component_images=MappingProxyType({n: artifacts[n] for n in ordered}),
        builds=MappingProxyType({n: builds[n] for n in ordered}),
        changed=changed_names,
        manifests=tuple(manifests),
        blobs=MappingProxyType(blobs),
        blob_repos=MappingProxyType({d: frozenset(r) for d, r in blob_repos.items()}),
        release_files=MappingProxyType(release_files),
        stale_image_references=stale_references,
        verification_key=verification_key or DEFAULT_VERIFICATION_KEY,
    )


def read_release_manifests(
    layers: Iterable[bytes], prefix: str = "release-manifests/"
) -> dict[str, bytes]:
    """The files under ``prefix`` of an image whose gzip tar ``layers`` are given bottom
    first (manifest order), read as ``oc`` reads a payload: layers walked top to bottom,
    regular files only, the first copy of a name wins. Names are normalised (no ``./``)."""
    files: dict[str, bytes] = {}
    for layer in reversed(list(layers)):
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer)), mode="r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not name.startswith(prefix) or not member.isfile() or name in files:
                    continue
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[name] = extracted.read()
    return files


# --- pushing -----------------------------------------------------------------------------------


@dataclass
class PushStats:
    blobs_uploaded: int = 0
    blobs_present: int = 0  # already in the repository (HEAD 200), not uploaded again
    bytes_uploaded: int = 0
    manifests: int = 0


def push_release(
    release: Release,
    client: RegistryClient,
    *,
    component_repo: str = COMPONENT_REPO,
    release_repo: str = RELEASE_REPO,
) -> PushStats:
    """Push ``release`` with ``client`` (a ``tests.upstream.RegistryClient`` logged in with
    push rights): per manifest, its blobs (skipped when HEAD finds them), then the manifest,
    children before their list; components by digest only, the release image by its tag.
    Idempotent. The repositories can be renamed (the payload still names quay.io's)."""
    repos = {COMPONENT_REPO: component_repo, RELEASE_REPO: release_repo}
    stats = PushStats()
    done: set[tuple[str, str]] = set()
    for manifest in release.manifests:
        repo = repos[manifest.repo]
        for digest in manifest.blobs:
            if (repo, digest) in done:
                continue
            done.add((repo, digest))
            head = client.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            if head.status == 200:
                stats.blobs_present += 1
                continue
            data = release.blobs[digest]
            client.push_blob(repo, data)
            stats.blobs_uploaded += 1
            stats.bytes_uploaded += len(data)
        client.push_manifest(repo, manifest.tag, manifest.data, manifest.media_type)
        stats.manifests += 1
    return stats


# --- signatures --------------------------------------------------------------------------------


class SignatureError(Exception):
    """gpg did not find a good signature (or failed)."""


def _gpg_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GNUPGHOME": str(home),
        "HOME": str(home),
        "LANG": "C",
        "LC_ALL": "C",
    }


def _kill_agent(home: Path) -> None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["gpgconf", "--kill", "all"],
            env=_gpg_env(home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )


def _destroy_home(home: Path) -> None:
    _kill_agent(home)
    shutil.rmtree(home, ignore_errors=True)


_KEY_PARAMETERS: Final = """\
%no-protection
Key-Type: RSA
Key-Length: 2048
Key-Usage: sign
Name-Real: {name}
Name-Email: {email}
Expire-Date: 0
%commit
"""


class SigningKey:
    """A throwaway RSA 2048 signing key (no passphrase) in its own temporary GNUPGHOME (under
    /tmp, short enough for the agent's socket path). ``close()`` kills the gpg-agent
    (``gpgconf --kill all``) and removes the directory; it also happens when the object is
    garbage-collected or at exit."""

    def __init__(self, home: Path, fingerprint: str, public_key: str) -> None:
        self.home = home
        self.fingerprint = fingerprint
        self.public_key = public_key
        self._finalizer = weakref.finalize(self, _destroy_home, home)

    @classmethod
    def generate(
        cls,
        name: str = "Bastion Test Release Signing",
        email: str = "release-signing@bastion.test",
    ) -> SigningKey:
        home = Path(tempfile.mkdtemp(prefix="bastion-gpg-"))
        try:
            params = _KEY_PARAMETERS.format(name=name, email=email).encode()
            _gpg(home, ["--gen-key"], params)
            listing = _gpg(home, ["--with-colons", "--list-secret-keys"]).stdout.decode()
            fingerprints = [
                line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
            ]
            public_key = _gpg(home, ["--armor", "--export", fingerprints[0]]).stdout.decode()
        except BaseException:
            _destroy_home(home)
            raise
        return cls(home, fingerprints[0], public_key)

    def sign(self, body: bytes) -> bytes:
        """A non-detached, binary OpenPGP signed message holding ``body``."""
        return _gpg(
            self.home,
            [
                "--local-user",
                self.fingerprint,
                "--digest-algo",
                "SHA256",
                "--sign",
                "--output",
                "-",
            ],
            body,
        ).stdout

    def verify(self, data: bytes) -> tuple[bytes, str]:
        """The body of a signed message and the fingerprint of the key that signed it (which
        must be in this keyring); raises ``SignatureError`` otherwise."""
        proc = _gpg(
            self.home, ["--status-fd", "2", "--decrypt", "--output", "-"], data, check=False
        )
        status = [
            line[len("[GNUPG:] ") :].split()
            for line in proc.stderr.decode(errors="replace").splitlines()
            if line.startswith("[GNUPG:] ")
        ]
        good = any(s and s[0] == "GOODSIG" for s in status)
        valid = [s[1] for s in status if len(s) > 1 and s[0] == "VALIDSIG"]
        if proc.returncode != 0 or not good or not valid:
            raise SignatureError(
                f"gpg --decrypt: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout, valid[0]

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SigningKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gpg(
    home: Path, args: Sequence[str], stdin: bytes = b"", *, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        ["gpg", "--batch", "--no-tty", "--yes", *args],
        input=stdin,
        env=_gpg_env(home),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if check and proc.returncode != 0:
        raise SignatureError(
            f"gpg {' '.join(args)}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def signature_body(
    digest: str, reference: str, *, creator: str = "bastion tests", timestamp: int | None = None
) -> bytes:
    """The JSON an OpenShift release signature signs ("atomic container signature")."""
    doc = {
        "critical": {
            "type": "atomic container signature",
            "image": {"docker-manifest-digest": digest},
            "identity": {"docker-reference": reference},
        },
        "optional": {
            "creator": creator,
            "timestamp": _SIGNATURE_TIMESTAMP if timestamp is None else timestamp,
        },
    }
    return json.dumps(doc).encode()


_SIGNATURE_PATH: Final = re.compile(r"/(sha256=[0-9a-f]{64})/(signature-[1-9][0-9]*)")


class SignatureStore:
    """A release signature store: ``dir/sha256=<hex>/signature-N``, served over HTTP on
    127.0.0.1 (``url``; ``GET {url}/sha256=<hex>/signature-N`` answers 200 or 404, nothing
    else is served; ``path_prefix`` puts the store below a path as real stores are).
    ``fail_status`` makes every request answer that status. ``requests`` logs (method, path,
    status). ``close()`` stops the server and, if the store made its key, destroys it."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        key: SigningKey,
        *,
        owns_key: bool = False,
        path_prefix: str = "",
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.path_prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
        self.fail_status: int | None = None
        self._owns_key = owns_key
        self._requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # content

    @property
    def public_key(self) -> str:
        return self.key.public_key

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def path(self, digest: str, n: int = 1) -> Path:
        algorithm, _, hex_digest = digest.partition(":")
        return self.dir / f"{algorithm}={hex_digest}" / f"signature-{n}"

    def signatures(self, digest: str) -> list[bytes]:
        """signature-1, -2, ... until the first missing one."""
        found, n = [], 1
        while self.path(digest, n).is_file():
            found.append(self.path(digest, n).read_bytes())
            n += 1
        return found

    def read(self, digest: str, n: int = 1) -> bytes:
        return self.path(digest, n).read_bytes()

    def add(self, digest: str, data: bytes) -> Path:
        """Store ``data`` as the next ``signature-N`` of ``digest`` (any bytes: a test can add
        a bogus or foreign signature)."""
        path = self.path(digest, len(self.signatures(digest)) + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def sign(
        self,
        release: Release | None = None,
        *,
        digest: str | None = None,
        reference: str | None = None,
        timestamp: int | None = None,
    ) -> Path:
        """Sign ``release`` (or ``digest`` as ``reference``) with this store's key and store
        the signature as the next ``signature-N``."""
        if release is not None:
            digest = digest or release.release_digest
            reference = reference or release.release_reference
        if digest is None or reference is None:
            raise ValueError("give a release, or a digest and a reference")
        body = signature_body(digest, reference, timestamp=timestamp)
        return self.add(digest, self.key.sign(body))

    def verify(self, data: bytes) -> dict[str, Any]:
        """The JSON body of a signature made by this store's key (``SignatureError`` if the
        signature is bad or made by another key)."""
        body, fingerprint = self.key.verify(data)
        if fingerprint != self.key.fingerprint:
            raise SignatureError(f"signed by {fingerprint}, not by {self.key.fingerprint}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    # serving

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the signature store is not serving (start() it)")
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.path_prefix}"

    @property
    def file_url(self) -> str:
        return self.dir.resolve().as_uri()

    def signature_url(self, digest: str, n: int = 1) -> str:
        algorithm, _, hex_digest = digest.partition(":")
        return f"{self.url}/{algorithm}={hex_digest}/signature-{n}"

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return list(self._requests)

    def _answer(self, method: str, raw_path: str) -> tuple[int, bytes | None]:
        path = raw_path.partition("?")[0]
        status, data = 404, None
        if self.fail_status is not None:
            status = self.fail_status
        elif path.startswith(self.path_prefix + "/"):
            m = _SIGNATURE_PATH.fullmatch(path[len(self.path_prefix) :])
            if m is not None:
                file = self.dir / m[1] / m[2]
                if file.is_file():
                    status, data = 200, file.read_bytes()
        with self._lock:
            self._requests.append((method, path, status))
        return status, data

    def start(self) -> SignatureStore:
        if self._server is not None:
            return self
        store = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, body: bool) -> None:
                status, data = store._answer(self.command, self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                if body and data:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="signature-store",
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(10)

    def close(self) -> None:
        self.stop()
        if self._owns_key:
            self.key.close()

    def __enter__(self) -> SignatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sign_release(
    release: Release,
    workdir: str | os.PathLike[str],
    *,
    key: SigningKey | None = None,
    serve: bool = True,
    path_prefix: str = "",
) -> SignatureStore:
    """Sign ``release`` (``signature-1`` of its digest, identity ``release_reference``) with
    ``key`` or a throwaway key generated here, in a store under ``workdir/signatures``,
    serving over HTTP unless ``serve`` is false. Close the store when done (it is a context
    manager; a key generated here is destroyed with it, a given ``key`` is not)."""
    owns_key = key is None
    key = key or SigningKey.generate()
    store = SignatureStore(
        Path(workdir) / "signatures", key, owns_key=owns_key, path_prefix=path_prefix
    )
    try:
        store.sign(release)
        if serve:
            store.start()
    except BaseException:
        store.close()
        raise
    return store


@pytest.fixture
def release_signer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SignatureStore]]:
    """``release_signer(release, **kwargs)`` -> a serving ``SignatureStore`` (``sign_release``
    in a fresh directory); every store is closed, and its gpg-agent killed, at teardown."""
    stores: list[SignatureStore] = []

    def sign(release: Release, **kwargs: Any) -> SignatureStore:
        store = sign_release(release, tmp_path_factory.mktemp("signatures"), **kwargs)
        stores.append(store)
        return store

    try:
        yield sign
    finally:
        for store in stores:
            store.close()
