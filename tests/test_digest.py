from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage import (
    Digest,
    InvalidDigest,
    InvalidName,
    InvalidReference,
    validate_name,
    validate_tag,
)
from storage.digest import MAX_NAME_LENGTH

HEX = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "library/ubuntu",
        "quay.io/openshift-release-dev/ocp-v4.0-art-dev",
        "a__b/c--d/e.f_g",
        "0/1/2/3/4/5/6/7/8/9",
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "a/",
        "/a",
        "a//b",
        "_a",
        "a/_layers",
        "a/../b",
        "..",
        "a/.",
        "a.",
        "-a",
        "a___b",
        "a b",
        "a:5000/b",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


def test_name_length_limit() -> None:
    validate_name("a" * MAX_NAME_LENGTH)
    with pytest.raises(InvalidName):
        validate_name("a" * (MAX_NAME_LENGTH + 1))


@pytest.mark.parametrize("tag", ["latest", "4.15.0-x86_64-etcd", "_x", "A" * 128])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".INVALID_MANIFEST_NAME", "-x", "a/b", "a:b", "A" * 129])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidReference):
        validate_tag(tag)


def test_digest_parse_and_str() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert (d.algorithm, d.hex, str(d)) == ("sha256", HEX, f"sha256:{HEX}")
    sha512 = hashlib.sha512(b"x").hexdigest()
    assert Digest.parse(f"sha512:{sha512}").algorithm == "sha512"
    assert Digest.of(b"x") == d


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX.upper()}",
        f"md5:{HEX}",
        "sha256:totallywrong",
        f"sha512:{HEX}",
        f"SHA256:{HEX}",
    ],
)
def test_digest_invalid(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


@given(st.text(max_size=80))
def test_digest_parse_never_crashes(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest:
        return
    assert str(d) == text


@given(st.text(max_size=80))
def test_name_validation_never_yields_unsafe_paths(text: str) -> None:
    try:
        validate_name(text)
    except InvalidName:
        return
    for part in text.split("/"):
        assert part and part[0] not in "._-" and part != ".."
