"""The on-disk layout, documented once; every path the store touches is computed here.

::

    <root>/
      blobs/<alg>/<first 2 hex>/<hex>                 immutable content (blobs and manifests), one
                                                      copy for all repositories
      repositories/<name>/                            <name> may be nested (a/b/c)
        _layers/<alg>/<hex>                           the blob is linked into this repository
        _manifests/revisions/<alg>/<hex>              the manifest is in this repository; the file
                                                      holds {"mediaType": ...} as received
        _manifests/tags/<tag>                         holds the digest the tag points at
        _referrers/<alg>/<subject hex>/<alg>-<hex>    a descriptor (JSON) of a manifest whose
                                                      subject is that digest
      uploads/<uuid>/info                             {"repository": ..., "started": ...}
      uploads/<uuid>/data                             bytes received so far
      proxy/<alg>/<hex>.lock, .state                  pull-through fill of one blob: the lock and
      proxy/<alg>/<hex>.<token>                       its state; the bytes as they arrive
                                                      (``storage.fill``)
      signatures/<alg>=<hex>/signature-N              release signatures kept for export
      mirror-config/<name>/<file>                     the mirror configuration ``bastion mirror``
                                                      printed (registries.conf, IDMS, ...) and
                                                      its ``mirror-map.json``, kept for export;
                                                      <name> as in the IDMS metadata.name
      imports/staging/<alg>-<hex>-<token>             an imported blob being written and hashed;
                                                      moved into blobs/ only once it matches
      imports/unpack-<token>/                         scratch of an import from tar volumes
                                                      (``layout/`` and ``staging/``), removed
                                                      at the end
      imports/done/<export id>                        a completed import of that export (JSON),
                                                      so an increment can check its base

Repository names are validated (``storage.digest.validate_name``) before they reach these
functions: no component can start with ``_`` or be ``..``, so a name never collides with the
metadata directories. Tags are validated likewise and never contain ``/``.
"""

from __future__ import annotations

from typing import Final

from .digest import Digest

__all__ = [
    "BLOBS",
    "REPOSITORIES",
    "UPLOADS",
    "blob",
    "repository",
    "layer_link",
    "layers_dir",
    "manifest_revision",
    "revisions_dir",
    "tag",
    "tags_dir",
    "referrers_dir",
    "referrer",
    "upload_dir",
    "upload_info",
    "upload_data",
    "IMPORTS",
    "MIRROR_CONFIG",
    "import_staging_dir",
    "import_staging",
    "import_unpack",
    "import_done",
    "mirror_config_dir",
    "mirror_config",
]

BLOBS: Final = "blobs"
REPOSITORIES: Final = "repositories"
UPLOADS: Final = "uploads"
IMPORTS: Final = "imports"
MIRROR_CONFIG: Final = "mirror-config"


def blob(digest: Digest) -> str:
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def repository(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


def layers_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_layers"


def layer_link(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_layers/{digest.algorithm}/{digest.hex}"


def revisions_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/revisions"


def manifest_revision(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}"


def tags_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags"


def tag(name: str, tag_name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags/{tag_name}"


def referrers_dir(name: str, subject: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_referrers/{subject.algorithm}/{subject.hex}"


def referrer(name: str, subject: Digest, manifest: Digest) -> str:
    return f"{referrers_dir(name, subject)}/{manifest.algorithm}-{manifest.hex}"


def upload_dir(upload_id: str) -> str:
    return f"{UPLOADS}/{upload_id}"


def upload_info(upload_id: str) -> str:
    return f"{UPLOADS}/{upload_id}/info"


def upload_data(upload_id: str) -> str:
    return f"{UPLOADS}/{upload_id}/data"


def import_staging_dir() -> str:
    return f"{IMPORTS}/staging"


def import_staging(digest: Digest, token: str) -> str:
    return f"{IMPORTS}/staging/{digest.algorithm}-{digest.hex}-{token}"


def import_unpack(token: str) -> str:
    return f"{IMPORTS}/unpack-{token}"


def import_done(export_id: str) -> str:
    """``export_id`` must be validated by the caller (``storage.layout``)."""
    return f"{IMPORTS}/done/{export_id}"


def mirror_config_dir(name: str) -> str:
    return f"{MIRROR_CONFIG}/{name}"


def mirror_config(name: str, file: str) -> str:
    """``name`` and ``file`` must be validated by the caller (``storage.layout``)."""
    return f"{MIRROR_CONFIG}/{name}/{file}"
