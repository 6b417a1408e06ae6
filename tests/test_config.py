from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.config import ConfigError, load_config, parse_listen, parse_size

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults() -> None:
    cfg = load_config(None)
    assert (cfg.listen, cfg.workers, cfg.storage.root) == ("0.0.0.0:5000", 0, "./data")
    assert cfg.limits.manifest_size == 4 * 1024 * 1024
    assert cfg.auth.anonymous_pull is True


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = load_config(str(ROOT / "config.example.yaml"))
    assert "quay.io" in cfg.upstreams
    assert cfg.upstreams["quay.io"].url == "https://quay.io"
    assert cfg.mappings[0].local == "openshift4/ocp4"
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    assert {
        "listen",
        "workers",
        "storage",
        "upstreams",
        "mappings",
        "auth",
        "tls",
        "limits",
    } <= set(raw)


def test_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1\nstorage: {root: /x}\n")
    cfg = load_config(path, {"root": "/y", "listen": "127.0.0.1:2", "workers": 3})
    assert (cfg.storage.root, cfg.listen, cfg.workers) == ("/y", "127.0.0.1:2", 3)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus: 1\n", "unknown config key bogus"),
        ("storage: {rooot: x}\n", "unknown config key storage.rooot"),
        ("workers: many\n", "config.workers"),
        ("workers: -1\n", "workers"),
        ("listen: nowhere\n", "listen"),
        ("limits: {manifest_size: huge}\n", "limits.manifest_size"),
        ("upstreams: {'registry.local:8443': {url: 'https://registry.local:8443'}}\n", "namespace"),
        ("upstreams: {quay.io: {url: 'ftp://x'}}\n", "upstreams.quay.io.url"),
        ("tls: {cert: /a}\n", "cert and key"),
        ("storage: [1]\n", "storage: expected a mapping"),
        ("a: [\n", "invalid YAML at line"),
        ("auth: {htpasswd: /etc/htpasswd}\n", "auth.htpasswd"),
        ("mappings: [{local: a/b, sources: [nowhere.io/x]}]\n", "configured upstream host"),
        (
            "upstreams: {quay.io: {}}\nmappings: [{local: Bad, sources: [quay.io/x]}]\n",
            "mappings[0].local",
        ),
        ("storage: {s3: {endpoint: 'http://x', bucket: b}}\n", "storage.s3"),
        ("upstreams: {quay.io: null}\n", "upstreams.quay.io: expected a mapping"),
        (
            "upstreams: {quay.io: {ca_file: /nonexistent.pem}}\n",
            "ca_file: /nonexistent.pem not found",
        ),
        ("upstreams: {quay.io: {connect_timeout: -1}}\n", "connect_timeout: expected more than 0"),
        ("upstreams: {quay.io: {read_timeout: 0}}\n", "read_timeout: expected more than 0"),
        ("upstreams: {quay.io: {tag_ttl: -5}}\n", "tag_ttl: expected 0 or more"),
        ("workers: 2\nlisten: ':5000'\nworkers: 4\n", "key 'workers' given twice (line 3)"),
        ("upstreams:\n  quay.io: {url: 'https://a', url: 'https://b'}\n", "'url' given twice"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_unreadable_files_are_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfeworkers: 1\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(binary))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.0.0.0:5000", ("0.0.0.0", 5000)), ("[::1]:80", ("::1", 80)), (":5000", ("0.0.0.0", 5000))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4MiB", 4 << 20), ("4GB", 4 * 10**9), (1024, 1024), ("10", 10), ("1.5KiB", 1536)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text, "x") == expected
