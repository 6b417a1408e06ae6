"""Referrers API (end-12a, end-12b): an OCI image index of the manifests whose ``subject`` is
the given digest, optionally filtered by ``artifactType`` (then ``OCI-Filters-Applied``)."""

from __future__ import annotations

import json

from aiohttp import web

from storage import Digest
from storage.manifest import OCI_INDEX

from .context import store_of

__all__ = ["get_referrers"]


async def get_referrers(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    subject = Digest.parse(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    descriptors = await store_of(request).list_referrers(name, subject, artifact_type)
    # Content-Type exactly the index type, without a charset parameter (spec "Listing Referrers").
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [d.to_json() for d in descriptors],
    }
    return web.Response(body=json.dumps(body).encode(), headers=headers)
