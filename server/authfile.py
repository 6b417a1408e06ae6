"""Credentials from a pull secret / ``auth.json`` (containers-auth.json(5)).

``{"auths": {"quay.io": {"auth": "<base64 user:password>"}}}``, as written by ``podman login``
and found in the OpenShift pull secret. Keys may carry a scheme (``https://quay.io``, as old
Docker configs do) or a namespace (``quay.io/team``); as in containers/image, the most specific
key matching ``host/repository`` wins, then the bare host.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass

__all__ = ["Credentials", "AuthFileError", "load_authfile", "lookup"]


class AuthFileError(Exception):
    """The auth file is missing or malformed (one line naming it)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never log a password
        return f"Credentials(username={self.username!r})"

    def basic(self) -> str:
        """The ``Authorization`` header value for Basic auth (RFC 7617)."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()


def _normalise_key(key: str) -> str:
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    key = key.rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    return key


def load_authfile(path: str) -> dict[str, Credentials]:
    """Entries of the file keyed by ``host`` or ``host/namespace``."""
    full = os.path.expanduser(path)
    try:
        with open(full, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise AuthFileError(f"authfile {path} not found") from None
    except (OSError, ValueError) as e:
        raise AuthFileError(f"authfile {path} is not valid JSON: {e}") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise AuthFileError(f'authfile {path} has no "auths" object')
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        key = str(key)
        if not isinstance(entry, dict):
            raise AuthFileError(f"authfile {path}: entry {key!r} is not an object")
        creds = _entry_credentials(entry, f"authfile {path}: entry {key!r}")
        if creds is None:
            continue  # e.g. an identity-token-only entry: treated as anonymous
        out[_normalise_key(key)] = creds
    return out


def _entry_credentials(entry: dict[str, object], what: str) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode("".join(auth.split()), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            # as containers/image: a broken entry is an error, not silently anonymous
            raise AuthFileError(f"{what}: 'auth' is not base64 of user:password") from None
        user, sep, password = decoded.partition(":")
        if sep:
            return Credentials(user, password)
        return None
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str):
        return Credentials(username, secret)
    return None


def lookup(entries: dict[str, Credentials], host: str, repository: str) -> Credentials | None:
    """The most specific entry for ``host/repository``: ``host/a/b``, ``host/a``, ``host``."""
    parts = f"{host}/{repository}".split("/")
    for n in range(len(parts), 0, -1):
        creds = entries.get("/".join(parts[:n]))
        if creds is not None:
            return creds
    return None
