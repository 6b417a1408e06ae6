"""The mirror configuration a cluster needs, in the exact shapes of ../shared/OCP-RELEASE.md:
install-config ``imageContentSources`` and ``imageDigestSources``, an
ImageContentSourcePolicy, an ImageDigestMirrorSet, an ImageTagMirrorSet (when tags were
mirrored) and a ``registries.conf`` drop-in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MirrorMap", "render", "write"]


@dataclass
class MirrorMap:
    """source repository -> mirror location (``host:port/repo``), plus the sources whose tags
    exist at the mirror under the same names."""

    name: str
    digests: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _entries(mapping: dict[str, str], key: str = "mirrors") -> list[dict[str, Any]]:
    return [{"source": src, key: [mirror]} for src, mirror in sorted(mapping.items())]


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def render(m: MirrorMap, *, insecure: bool = False) -> dict[str, str]:
    """File name -> content."""
    files = {
        "install-config-imageContentSources.yaml": _dump(
            {"imageContentSources": _entries(m.digests)}
        ),
        "install-config-imageDigestSources.yaml": _dump(
            {"imageDigestSources": _entries(m.digests)}
        ),
        "imageContentSourcePolicy.yaml": _dump(
            {
                "apiVersion": "operator.openshift.io/v1alpha1",
                "kind": "ImageContentSourcePolicy",
                "metadata": {"name": m.name},
                "spec": {"repositoryDigestMirrors": _entries(m.digests)},
            }
        ),
        "imageDigestMirrorSet.yaml": _dump(
            {
                "apiVersion": "config.openshift.io/v1",
                "kind": "ImageDigestMirrorSet",
                "metadata": {"name": m.name},
                "spec": {"imageDigestMirrors": _entries(m.digests)},
            }
        ),
    }
    if m.tags:
        files["imageTagMirrorSet.yaml"] = _dump(
            {
                "apiVersion": "config.openshift.io/v1",
                "kind": "ImageTagMirrorSet",
                "metadata": {"name": m.name},
                "spec": {"imageTagMirrors": _entries(m.tags)},
            }
        )
    files["registries.conf"] = _registries_conf(m, insecure)
    return files


def _registries_conf(m: MirrorMap, insecure: bool) -> str:
    """A drop-in for /etc/containers/registries.conf.d/ (containers-registries.conf(5))."""
    lines = ["# bastion-registry mirror configuration", ""]
    for source in sorted(set(m.digests) | set(m.tags)):
        lines += ["[[registry]]", f'  location = "{source}"', ""]
        for mirror, mode in (
            (m.digests.get(source), "digest-only"),
            (m.tags.get(source), "tag-only"),
        ):
            if mirror is None:
                continue
            lines += ["  [[registry.mirror]]", f'    location = "{mirror}"']
            if insecure:
                lines.append("    insecure = true")
            lines += [f'    pull-from-mirror = "{mode}"', ""]
    return "\n".join(lines)


def write(files: dict[str, str], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, content in files.items():
        path = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
        written.append(path)
    return written
