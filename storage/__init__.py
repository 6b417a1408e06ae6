"""Content-addressed storage for bastion-registry. Knows nothing of HTTP.

Layers talk only downward: ``storage.driver`` (bytes at paths) <- ``storage.store`` (blobs,
manifests, tags, uploads, referrers by digest) <- ``server``.
"""

from .digest import Descriptor, Digest, validate_name, validate_tag
from .driver import FilesystemDriver, StorageDriver
from .errors import *  # noqa: F403
from .errors import __all__ as _errors
from .store import DEFAULT_MANIFEST_LIMIT, ManifestInfo, Store

__all__ = [
    "Descriptor",
    "Digest",
    "validate_name",
    "validate_tag",
    "FilesystemDriver",
    "StorageDriver",
    "Store",
    "ManifestInfo",
    "DEFAULT_MANIFEST_LIMIT",
    *_errors,
]
