"""The ``bastion`` command line.

Exit codes: 0 success; 1 an operation failed (one line per failure); 2 a usage or configuration
problem (one line naming it). No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from .config import ConfigError, load_config
from .serve import ServeError, serve

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (see config.example.yaml)")
    p.add_argument("--root", metavar="DIR", help="storage root, overriding storage.root")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bastion",
        description="bastion-registry: OCI registry, pull-through cache and air-gap ferry",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    s = sub.add_parser("serve", help="serve the registry over HTTP")
    _common(s)
    s.add_argument(
        "--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)"
    )
    s.add_argument("--workers", metavar="N", type=int, help="worker processes (0: one per CPU)")
    return parser


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
            serve(config)
    except (ServeError, ConfigError) as e:
        print(f"bastion: {e}", file=sys.stderr)
        return 1 if isinstance(e, ServeError) else 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
