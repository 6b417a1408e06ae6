from __future__ import annotations

import tomllib

import yaml

from server.snippets import MirrorMap, render


def test_shapes_and_registries_conf() -> None:
    m = MirrorMap(
        "release-4-99-1",
        digests={
            "quay.io/openshift-release-dev/ocp-release": "m:5000/ocp4/openshift4",
            "quay.io/openshift-release-dev/ocp-v4.0-art-dev": "m:5000/ocp4/openshift4",
        },
        tags={"quay.io/openshift-release-dev/ocp-release": "m:5000/ocp4/openshift4"},
    )
    files = render(m, insecure=True)
    ics = yaml.safe_load(files["install-config-imageContentSources.yaml"])["imageContentSources"]
    assert ics[1] == {
        "source": "quay.io/openshift-release-dev/ocp-v4.0-art-dev",
        "mirrors": ["m:5000/ocp4/openshift4"],
    }
    itms = yaml.safe_load(files["imageTagMirrorSet.yaml"])
    assert itms["spec"]["imageTagMirrors"] == [
        {
            "source": "quay.io/openshift-release-dev/ocp-release",
            "mirrors": ["m:5000/ocp4/openshift4"],
        }
    ]
    conf = tomllib.loads(files["registries.conf"])
    by_location = {r["location"]: r for r in conf["registry"]}
    release = by_location["quay.io/openshift-release-dev/ocp-release"]
    assert [(x["pull-from-mirror"], x["insecure"]) for x in release["mirror"]] == [
        ("digest-only", True),
        ("tag-only", True),
    ]
    assert "mirror-by-digest-only" not in files["registries.conf"]


def test_no_tag_mirror_set_without_tags() -> None:
    files = render(MirrorMap("x", digests={"quay.io/a/b": "m:1/quay.io/a/b"}))
    assert "imageTagMirrorSet.yaml" not in files
    assert "insecure" not in files["registries.conf"]
