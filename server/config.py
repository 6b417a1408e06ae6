"""Configuration: the YAML file documented in ``config.example.yaml``, validated strictly.

A wrong key or value raises ``ConfigError`` with one line naming it; the CLI prints that line
and exits 2.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from storage import InvalidName, validate_name

from .authfile import AuthFileError, load_authfile

__all__ = [
    "ConfigError",
    "Config",
    "StorageConfig",
    "S3Config",
    "UpstreamConfig",
    "Mapping",
    "load_config",
    "parse_listen",
    "parse_size",
]

DEFAULT_LISTEN: Final = "0.0.0.0:5000"


class ConfigError(Exception):
    """A configuration problem, described in one line."""


@dataclass
class S3Config:
    endpoint: str = ""
    region: str = "us-east-1"
    bucket: str = "bastion"
    access_key: str | None = None
    secret_key: str | None = None
    path_style: bool = True


@dataclass
class StorageConfig:
    root: str = "./data"
    s3: S3Config | None = None
    redirect: bool = False


@dataclass
class UpstreamConfig:
    host: str
    url: str
    authfile: str | None = None
    ca_file: str | None = None
    tls_verify: bool = True
    namespace: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    tag_ttl: float = 300.0


@dataclass
class Mapping:
    local: str
    sources: list[str]


@dataclass
class AuthConfig:
    htpasswd: str | None = None
    anonymous_pull: bool = True


@dataclass
class TLSConfig:
    cert: str | None = None
    key: str | None = None


@dataclass
class LimitsConfig:
    manifest_size: int = 4 * 1024 * 1024


@dataclass
class Config:
    listen: str = DEFAULT_LISTEN
    workers: int = 0
    log_level: str = "info"
    storage: StorageConfig = field(default_factory=StorageConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    mappings: list[Mapping] = field(default_factory=list)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


def parse_size(value: Any, what: str) -> int:
    """``4194304``, ``"4MiB"``, ``"4GB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            unit = (m.group(2) or "").lower().rstrip("b")
            if unit in _UNITS:
                size = int(float(m.group(1)) * _UNITS[unit])
                if size > 0:
                    return size
    raise ConfigError(f"{what}: expected a positive size such as 4MiB, got {value!r}")


def parse_listen(value: str, what: str = "listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:5000`` for IPv6, ``:5000`` for all addresses) -> (host, port)."""
    m = re.fullmatch(r"(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]*)):(\d{1,5})", str(value))
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = m.group(1) or m.group(2) or "0.0.0.0"
    return host, int(m.group(3))


def _section(data: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        prefix = f"{what}." if what else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (allowed: {', '.join(sorted(allowed))})"
        )
    return data


def _typed(
    data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str, default: Any
) -> Any:
    if key not in data or data[key] is None:
        return default
    value = data[key]
    if kind in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{what}.{key}: expected a number, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{what}.{key}: expected {name}, got {value!r}")
    return value


def _load_storage(data: Any) -> StorageConfig:
    d = _section(data, "storage", {"root", "s3", "redirect"})
    s3 = None
    if d.get("s3") is not None:
        s = _section(d["s3"], "storage.s3", set(S3Config.__dataclass_fields__))
        s3 = S3Config(**{k: v for k, v in s.items() if v is not None})
        if not s3.endpoint:
            raise ConfigError("storage.s3.endpoint is required when storage.s3 is set")
    if s3 is not None:
        raise ConfigError(
            "storage.s3: S3 storage is not available in this version; use storage.root"
        )
    return StorageConfig(
        root=str(_typed(d, "root", str, "storage", "./data")),
        s3=s3,
        redirect=_typed(d, "redirect", bool, "storage", False),
    )


def _existing_file(data: dict[str, Any], key: str, what: str) -> str | None:
    path: str | None = _typed(data, key, str, what, None)
    if path is not None and not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"{what}.{key}: {path} not found")
    return path


def _authfile(data: dict[str, Any], what: str) -> str | None:
    """The pull secret's path. A missing file means anonymous access, as in containers/image;
    one that exists must parse (a typo in it would otherwise surface as "auth refused")."""
    path: str | None = _typed(data, "authfile", str, what, None)
    if path is not None and os.path.exists(os.path.expanduser(path)):
        try:
            load_authfile(path)
        except AuthFileError as e:
            raise ConfigError(f"{what}.authfile: {e}") from None
    return path


def _seconds(data: dict[str, Any], key: str, what: str, default: float, *, zero: bool) -> float:
    value = float(_typed(data, key, float, what, default))
    if value < 0 or (value == 0 and not zero):
        wanted = "0 or more" if zero else "more than 0"
        raise ConfigError(f"{what}.{key}: expected {wanted} seconds, got {value:g}")
    return value


def _load_upstream(host: str, data: Any) -> UpstreamConfig:
    what = f"upstreams.{host}"
    if data is None:
        raise ConfigError(f"{what}: expected a mapping with at least 'url:', got nothing")
    d = _section(data, what, set(UpstreamConfig.__dataclass_fields__) - {"host"})
    url = _typed(d, "url", str, what, f"https://{host}")
    if not re.match(r"https?://", url):
        raise ConfigError(f"{what}.url: expected an http:// or https:// URL, got {url!r}")
    namespace = _typed(d, "namespace", str, what, None)
    if namespace is None and ":" in host:
        raise ConfigError(f"{what}: a host with a port needs a 'namespace:' to be served under")
    up = UpstreamConfig(
        host=host,
        url=url.rstrip("/"),
        authfile=_authfile(d, what),
        ca_file=_existing_file(d, "ca_file", what),
        tls_verify=_typed(d, "tls_verify", bool, what, True),
        namespace=namespace or host,
        connect_timeout=_seconds(d, "connect_timeout", what, 10.0, zero=False),
        read_timeout=_seconds(d, "read_timeout", what, 60.0, zero=False),
        tag_ttl=_seconds(d, "tag_ttl", what, 300.0, zero=True),
    )
    return up


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    one silently, so a typo'd duplicate would quietly override a setting)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"key {key!r} given twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (or defaults), then apply command-line ``overrides`` (listen, workers, root)."""
    raw: Any = {}
    if path is not None:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # a SafeLoader
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory") from None
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path}: invalid YAML{where}") from None
    top = _section(raw, "", set(Config.__dataclass_fields__))
    cfg = Config(
        listen=str(_typed(top, "listen", (str, int), "config", DEFAULT_LISTEN)),
        workers=_typed(top, "workers", int, "config", 0),
        log_level=_typed(top, "log_level", str, "config", "info"),
        storage=_load_storage(top.get("storage")),
    )
    ups = _section(top.get("upstreams"), "upstreams", set(map(str, (top.get("upstreams") or {}))))
    cfg.upstreams = {str(h): _load_upstream(str(h), v) for h, v in ups.items()}
    maps = top.get("mappings") or []
    if not isinstance(maps, list):
        raise ConfigError("mappings: expected a list")
    for i, m in enumerate(maps):
        d = _section(m, f"mappings[{i}]", {"local", "sources"})
        if not isinstance(d.get("local"), str) or not isinstance(d.get("sources"), list):
            raise ConfigError(f"mappings[{i}]: needs 'local' (a name) and 'sources' (a list)")
        local, sources = d["local"], [str(s) for s in d["sources"]]
        try:
            validate_name(local)
        except InvalidName as e:
            raise ConfigError(f"mappings[{i}].local: {e}") from None
        for source in sources:
            host, _, repository = source.partition("/")
            if host not in cfg.upstreams or not repository:
                raise ConfigError(
                    f"mappings[{i}].sources: {source!r} does not start with a configured upstream host"
                )
        cfg.mappings.append(Mapping(local, sources))
    a = _section(top.get("auth"), "auth", {"htpasswd", "anonymous_pull"})
    cfg.auth = AuthConfig(
        _typed(a, "htpasswd", str, "auth", None), _typed(a, "anonymous_pull", bool, "auth", True)
    )
    if cfg.auth.htpasswd:
        raise ConfigError("auth.htpasswd: client authentication is not available in this version")
    t = _section(top.get("tls"), "tls", {"cert", "key"})
    cfg.tls = TLSConfig(_typed(t, "cert", str, "tls", None), _typed(t, "key", str, "tls", None))
    lim = _section(top.get("limits"), "limits", {"manifest_size"})
    if "manifest_size" in lim:
        cfg.limits.manifest_size = parse_size(lim["manifest_size"], "limits.manifest_size")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "root":
            cfg.storage.root = value
        else:
            setattr(cfg, key, value)
    parse_listen(cfg.listen)
    if cfg.workers < 0:
        raise ConfigError(f"workers: expected 0 (one per CPU) or more, got {cfg.workers}")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log_level: expected debug, info, warning or error, got {cfg.log_level!r}"
        )
    if bool(cfg.tls.cert) != bool(cfg.tls.key):
        raise ConfigError("tls: cert and key must be given together")
    return cfg
