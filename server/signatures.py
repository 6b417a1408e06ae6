"""Release signatures: fetched from a signature store (``https://...`` or a directory laid out
as ``sha256=<hex>/signature-N``), kept in the store under ``signatures/`` so an export carries
them, and written with the ConfigMap the cluster-version operator reads
(``openshift-config-managed``, label ``release.openshift.io/verification-signatures``)."""

from __future__ import annotations

import base64
import os
from typing import Final

import aiohttp
import yaml

from storage import Digest, Store

from .upstream import read_at_most

__all__ = ["SignatureError", "fetch_signatures", "configmap", "MAX_SIGNATURE"]

#: Signature bodies are small (library-go reads at most 50 KiB per signature).
MAX_SIGNATURE: Final = 50 * 1024
_MAX_SIGNATURES: Final = 64


class SignatureError(Exception):
    pass


async def _fetch_url(base: str, digest: Digest, n: int) -> bytes | None:
    url = f"{base.rstrip('/')}/{digest.algorithm}={digest.hex}/signature-{n}"
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                raise SignatureError(f"signature store answered {r.status} for {url}")
            data = await read_at_most(r, MAX_SIGNATURE)
            if data is None:
                raise SignatureError(f"{url} is larger than {MAX_SIGNATURE} bytes")
            return data
    except (aiohttp.ClientError, TimeoutError) as e:
        raise SignatureError(f"cannot fetch {url}: {e}") from None


def _read_dir(base: str, digest: Digest, n: int) -> bytes | None:
    path = os.path.join(base, f"{digest.algorithm}={digest.hex}", f"signature-{n}")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_SIGNATURE:
        raise SignatureError(f"{path} is larger than {MAX_SIGNATURE} bytes")
    return data


async def fetch_signatures(source: str, digest: Digest) -> list[bytes]:
    """``signature-1``, ``signature-2``, ... until the first one missing."""
    out: list[bytes] = []
    for n in range(1, _MAX_SIGNATURES + 1):
        if source.startswith(("http://", "https://")):
            data = await _fetch_url(source, digest, n)
        else:
            data = _read_dir(source.removeprefix("file://"), digest, n)
        if data is None:
            break
        out.append(data)
    if not out:
        raise SignatureError(f"no signature for {digest} in {source}")
    return out


def configmap(digest: Digest, signatures: list[bytes]) -> str:
    name = f"{digest.algorithm}-{digest.hex}"
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": "openshift-config-managed",
            "labels": {"release.openshift.io/verification-signatures": ""},
        },
        "binaryData": {
            f"{name}-{i}": base64.b64encode(s).decode() for i, s in enumerate(signatures, 1)
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


async def keep(store: Store, digest: Digest, signatures: list[bytes]) -> None:
    """Keep the signatures in the store (``signatures/<alg>=<hex>/signature-N``)."""
    for i, data in enumerate(signatures, 1):
        await store.driver.put_content(
            f"signatures/{digest.algorithm}={digest.hex}/signature-{i}", data
        )


def write_files(out_dir: str, digest: Digest, signatures: list[bytes]) -> list[str]:
    directory = os.path.join(out_dir, "signatures", f"{digest.algorithm}={digest.hex}")
    os.makedirs(directory, exist_ok=True)
    written = []
    for i, data in enumerate(signatures, 1):
        path = os.path.join(directory, f"signature-{i}")
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
    path = os.path.join(out_dir, "signature-configmap.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(configmap(digest, signatures))
    written.append(path)
    return written
