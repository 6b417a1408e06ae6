from __future__ import annotations

import pytest

from server.reference import ImageReference, ReferenceError

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "digest"),
    [
        (
            "quay.io/openshift-release-dev/ocp-release:4.15.0-x86_64",
            "quay.io",
            "openshift-release-dev/ocp-release",
            "4.15.0-x86_64",
            None,
        ),
        (
            f"quay.io/openshift-release-dev/ocp-v4.0-art-dev@{D}",
            "quay.io",
            "openshift-release-dev/ocp-v4.0-art-dev",
            None,
            D,
        ),
        (f"registry.local:8443/a/b:v1@{D}", "registry.local:8443", "a/b", "v1", D),
        ("localhost/x", "localhost", "x", "latest", None),
        ("docker://quay.io/a/b:c", "quay.io", "a/b", "c", None),
    ],
)
def test_parse(text: str, host: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = ImageReference.parse(text)
    assert (ref.host, ref.repository, ref.tag, str(ref.digest) if ref.digest else None) == (
        host,
        repo,
        tag,
        digest,
    )
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ubuntu:22.04", "registry host is required"),
        ("library/ubuntu", "registry host is required"),
        ("quay.io/A/b", "invalid repository name"),
        ("quay.io/a/b:-bad", "invalid tag"),
        ("quay.io/a/b@sha256:zz", "invalid"),
    ],
)
def test_invalid(text: str, fragment: str) -> None:
    with pytest.raises(ReferenceError, match=fragment):
        ImageReference.parse(text)
