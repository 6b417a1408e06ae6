from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from server.authfile import AuthFileError, Credentials, load_authfile, lookup


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write(tmp_path: Path, doc: object) -> str:
    p = tmp_path / "auth.json"
    p.write_text(json.dumps(doc))
    return str(p)


def test_pull_secret_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "auths": {
                "quay.io": {
                    "auth": b64("openshift-release-dev+ocm:TOKEN:with:colons")[:20]
                    + "\n"
                    + b64("openshift-release-dev+ocm:TOKEN:with:colons")[20:],
                    "email": "x@y",
                },
                "https://registry.redhat.io/v1/": {"auth": b64("rh:pw")},
                "quay.io/special/repo": {"auth": b64("narrow:pw")},
                "registry.local:8443": {"username": "u", "password": "p"},
                "cloud.openshift.com": {"identitytoken": "abc"},
            }
        },
    )
    entries = load_authfile(path)
    assert entries["quay.io"] == Credentials("openshift-release-dev+ocm", "TOKEN:with:colons")
    assert entries["registry.redhat.io"] == Credentials("rh", "pw")
    assert "cloud.openshift.com" not in entries
    assert lookup(entries, "quay.io", "openshift-release-dev/ocp-release") == entries["quay.io"]
    assert lookup(entries, "quay.io", "special/repo") == Credentials("narrow", "pw")
    assert lookup(entries, "registry.local:8443", "a/b") == Credentials("u", "p")
    assert lookup(entries, "docker.io", "library/x") is None
    assert "TOKEN" not in repr(entries["quay.io"])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[]", 'no "auths"'),
        ('{"auths": {"h": 1}}', "not an object"),
        ('{"auths": []}', 'no "auths"'),
        ('{"auths": {"quay.io": {"auth": "%%%not-base64"}}}', "'quay.io': 'auth' is not base64"),
    ],
)
def test_bad_authfiles(tmp_path: Path, content: str, fragment: str) -> None:
    p = tmp_path / "a.json"
    p.write_text(content)
    with pytest.raises(AuthFileError, match=fragment):
        load_authfile(str(p))
    with pytest.raises(AuthFileError, match="not found"):
        load_authfile(str(tmp_path / "missing.json"))
