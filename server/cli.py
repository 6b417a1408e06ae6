"""The ``bastion`` command line.

Exit codes: 0 success; 1 an operation failed (one line per failure); 2 a usage or configuration
problem (one line naming it). No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Final, NoReturn

from storage import StoreError, validate_name
from storage.driver import DriverError

from .authfile import AuthFileError, load_authfile
from .config import Config, ConfigError, load_config, parse_size
from .serve import ServeError, serve

if TYPE_CHECKING:
    from .ferry import ImportOptions

__all__ = ["main"]

#: What the cluster may call this registry: a DNS name, IPv4 or [IPv6], optional port.
_HOST_PORT_RE: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed and make sure it is a directory this process can write in
    (a read-only mount or a file in the way is said now, not as a 500 on the first push)."""
    if not path:
        raise ConfigError(f"{what} is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".bastion-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {e.strerror or e}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument("--root", metavar="DIR", help="storage root, overriding storage.root")


def _version() -> str:
    try:
        return version("bastion-registry")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bastion",
        description="bastion-registry: OCI registry, pull-through cache and air-gap ferry",
    )
    parser.add_argument("--version", action="version", version=f"bastion {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    s = sub.add_parser("serve", help="serve the registry over HTTP")
    _common(s)
    s.add_argument(
        "--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)"
    )
    s.add_argument("--workers", metavar="N", type=int, help="worker processes (0: one per CPU)")

    m = sub.add_parser("mirror", help="copy images from upstream registries into the store")
    msub = m.add_subparsers(dest="mirror_command", metavar="WHAT", parser_class=_Parser)
    msub.required = True
    r = msub.add_parser("release", help="a whole OpenShift release and its components")
    r.add_argument(
        "source",
        metavar="SOURCE_REF",
        help="e.g. quay.io/openshift-release-dev/ocp-release:4.15.0-x86_64",
    )
    _mirror_options(r)
    r.add_argument(
        "--signatures-from",
        metavar="URL_OR_DIR",
        help="signature store with sha256=<hex>/signature-N",
    )
    i = msub.add_parser("image", help="any other images (operators, additional images)")
    i.add_argument("sources", metavar="SOURCE_REF", nargs="*")
    i.add_argument("--from-file", metavar="LIST", help="a file with one image reference per line")
    _mirror_options(i)

    e = sub.add_parser("export", help="write the store (or part of it) as an OCI image layout")
    _common(e)
    e.add_argument("--to", metavar="DIR", required=True, help="directory to write the export to")
    e.add_argument(
        "--repo", metavar="NAME", action="append", default=[], help="repository (globs: *)"
    )
    e.add_argument("--release", metavar="REF", help="a mirrored release and all its components")
    e.add_argument(
        "--since", metavar="PREVIOUS_EXPORT", help="only what that export chain did not carry"
    )
    e.add_argument("--split-size", metavar="SIZE", help="numbered tar volumes of at most SIZE")
    e.add_argument("--concurrency", metavar="N", type=int, default=4, help="blobs copied at once")
    im = sub.add_parser("import", help="load an export (or any OCI image layout) into the store")
    _common(im)
    im.add_argument("source", metavar="DIR", help="the export directory (or folder of volumes)")
    im.add_argument(
        "--repo", metavar="NAME", help="repository for entries that name none (other tools)"
    )
    im.add_argument("--concurrency", metavar="N", type=int, default=4, help="blobs copied at once")
    im.add_argument(
        "--out-dir", metavar="DIR", help="also write the mirror configuration files here"
    )
    im.add_argument(
        "--to",
        metavar="REGISTRY[/PREFIX]",
        help="push into this registry over the OCI API instead of the store; each repository "
        "keeps its original path under PREFIX (quay.io/a/b -> REGISTRY/PREFIX/quay.io/a/b)",
    )
    im.add_argument("--authfile", metavar="FILE", help="auth.json with credentials for --to")
    im.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to --to")
    im.add_argument(
        "--no-tls-verify", action="store_true", help="do not verify the TLS certificate of --to"
    )
    im.add_argument("--ca-file", metavar="FILE", help="CA bundle for the TLS certificate of --to")
    im.add_argument(
        "--chunk-size",
        metavar="SIZE",
        help="upload blobs larger than SIZE in chunks of SIZE (default: one PUT per blob)",
    )
    return parser


def _mirror_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--to", metavar="LOCAL_REPO", help="put everything in this one repository")
    p.add_argument("--authfile", metavar="FILE", help="pull secret / auth.json for the upstreams")
    p.add_argument("--out-dir", metavar="DIR", help="write the mirror configuration files here")
    p.add_argument(
        "--mirror-host", metavar="HOST:PORT", help="how the cluster reaches this registry"
    )
    p.add_argument(
        "--mirror-insecure",
        action="store_true",
        help="mark the mirror insecure (plain HTTP) in registries.conf",
    )
    p.add_argument(
        "--concurrency", metavar="N", type=int, default=8, help="blobs fetched at once (default 8)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched and its size")


def _run_mirror(args: argparse.Namespace, config: Config) -> int:
    from .mirror_commands import (
        CommandError,
        MirrorOptions,
        UsageError,
        mirror_images,
        mirror_release,
        read_list,
    )

    if args.authfile:
        try:
            load_authfile(args.authfile)  # a broken pull secret is said now, not as "refused"
        except AuthFileError as e:
            raise ConfigError(str(e)) from None
    if args.mirror_host and not _HOST_PORT_RE.fullmatch(args.mirror_host):
        raise ConfigError(f"--mirror-host {args.mirror_host!r}: expected HOST or HOST:PORT")
    if args.to is not None:
        try:
            validate_name(args.to)
        except StoreError as e:
            raise ConfigError(f"--to: {e}") from None
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if not args.dry_run:
        _writable_dir(config.storage.root, "storage root")
        if args.out_dir:
            _writable_dir(args.out_dir, "--out-dir")
    options = MirrorOptions(
        to=args.to,
        authfile=args.authfile,
        out_dir=args.out_dir,
        mirror_host=args.mirror_host,
        concurrency=args.concurrency,
        dry_run=args.dry_run,
        signatures_from=getattr(args, "signatures_from", None),
        insecure=args.mirror_insecure,
    )
    try:
        if args.mirror_command == "release":
            return asyncio.run(mirror_release(config, args.source, options))
        sources = list(args.sources)
        if args.from_file:
            sources += read_list(args.from_file)
        if not sources:
            raise ConfigError("give at least one SOURCE_REF or --from-file")
        return asyncio.run(mirror_images(config, sources, options))
    except CommandError as e:
        for line in str(e).splitlines() or [""]:  # several failures: one line each
            print(f"bastion: {line}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


def _import_options(args: argparse.Namespace, config: Config) -> ImportOptions:
    from .ferry import ImportOptions

    if not os.path.isdir(args.source):
        raise ConfigError(f"{args.source} is not a directory")
    options = ImportOptions(args.source, args.repo, args.concurrency, args.out_dir)
    remote = [args.authfile, args.plain_http, args.no_tls_verify, args.ca_file, args.chunk_size]
    if args.to is None:
        if any(remote):
            raise ConfigError(
                "--authfile, --plain-http, --no-tls-verify, --ca-file and "
                "--chunk-size only apply with --to"
            )
        _writable_dir(config.storage.root, "storage root")
        return options
    host, _, prefix = args.to.partition("/")
    if not host or host.startswith(("http:", "https:")):
        raise ConfigError(f"--to {args.to}: give REGISTRY[/PREFIX], e.g. quay.example.com/ocp")
    if prefix:
        try:
            validate_name(prefix)
        except StoreError as e:
            raise ConfigError(f"--to: {e}") from None
    for name, path in (("--authfile", args.authfile), ("--ca-file", args.ca_file)):
        if path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"{name} {path} not found")
    options.to = args.to
    options.authfile = args.authfile
    options.plain_http = args.plain_http
    options.tls_verify = not args.no_tls_verify
    options.ca_file = args.ca_file
    if args.chunk_size:
        options.chunk_size = parse_size(args.chunk_size, "--chunk-size")
        if options.chunk_size < 1 << 20:
            raise ConfigError("--chunk-size must be at least 1MiB")
    return options


def _run_ferry(args: argparse.Namespace, config: Config) -> int:
    from .export import export_store
    from .ferry import ExportOptions, FerryError, FerryProgress
    from .import_ import import_layout

    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    try:
        for name in [args.repo] if isinstance(args.repo, str) else []:
            validate_name(name)
    except StoreError as e:
        raise ConfigError(f"--repo: {e}") from None
    with FerryProgress() as progress:
        try:
            if args.command == "export":
                split = parse_size(args.split_size, "--split-size") if args.split_size else None
                if args.since and not os.path.exists(args.since):
                    raise ConfigError(f"--since {args.since} not found")
                options = ExportOptions(
                    args.to, args.repo, args.release, args.since, split, args.concurrency
                )
                line = asyncio.run(export_store(config, options, progress))
            else:
                line = asyncio.run(import_layout(config, _import_options(args, config), progress))
        except FerryError as e:
            for failure in e.lines:
                print(f"bastion: {failure}", file=sys.stderr)
            return 1
        except (OSError, StoreError, DriverError) as e:
            print(f"bastion: {e}", file=sys.stderr)
            return 1
        except RecursionError:
            print(f"bastion: {args.command}: content nested too deeply", file=sys.stderr)
            return 1
    print(f"Summary: {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(
            args.config,
            {
                "root": args.root,
                "listen": getattr(args, "listen", None),
                "workers": getattr(args, "workers", None),
            },
        )
    except ConfigError as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            _writable_dir(config.storage.root, "storage root")
            serve(config)
        elif args.command == "mirror":
            return _run_mirror(args, config)
        elif args.command in ("export", "import"):
            return _run_ferry(args, config)
    except (ServeError, ConfigError) as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 1 if isinstance(e, ServeError) else 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
